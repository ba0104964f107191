//! Discovery, filters, account data, and the ephemeral endpoints Weft
//! accepts without storing yet (typing, receipts, presence).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use ruma::api::client::config::{
    get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
};
use ruma::api::client::filter::{create_filter, get_filter};
use ruma::api::client::presence::set_presence;
use ruma::api::client::push::get_pushrules_all;
use ruma::api::client::read_marker::set_read_marker;
use ruma::api::client::receipt::create_receipt;
use ruma::api::client::typing::create_typing_event;
use ruma::push::Ruleset;
use weft_core::Error;

use crate::AppState;
use crate::endpoint::{Ruma, bad_json, raw};
use crate::extract::Auth;

pub async fn versions(State(s): State<AppState>) -> Json<Value> {
    Json(s.versions())
}

pub async fn well_known(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "m.homeserver": { "base_url": s.config.base_url() } }))
}

pub async fn capabilities(State(s): State<AppState>, Auth(_): Auth) -> Json<Value> {
    let available: serde_json::Map<String, Value> = weft_rooms::SUPPORTED_VERSIONS
        .iter()
        .map(|v| (v.to_string(), json!("stable")))
        .collect();
    Json(json!({ "capabilities": {
        "m.change_password": { "enabled": true },
        "m.room_versions": { "default": s.rooms.default_version().as_str(), "available": available },
        "m.set_displayname": { "enabled": true },
        "m.set_avatar_url": { "enabled": true },
        "m.3pid_changes": { "enabled": false },
    }}))
}

/// Typing, receipts, read markers, presence: checked, accepted, not yet relayed.
pub async fn typing(
    s: AppState,
    req: Ruma<create_typing_event::v3::Request>,
) -> Result<create_typing_event::v3::Response, Error> {
    let b = &req.body;
    s.set_typing(&req.caller, b.room_id.as_str(), b.user_id.as_str())
        .await?;
    Ok(create_typing_event::v3::Response::new())
}

pub async fn presence(s: AppState, req: Ruma<set_presence::v3::Request>) -> Result<set_presence::v3::Response, Error> {
    s.set_presence(&req.caller, req.body.user_id.as_str()).await?;
    Ok(set_presence::v3::Response::new())
}

pub async fn receipt(
    s: AppState,
    req: Ruma<create_receipt::v3::Request>,
) -> Result<create_receipt::v3::Response, Error> {
    s.set_read_marker(&req.caller, req.body.room_id.as_str()).await?;
    Ok(create_receipt::v3::Response::new())
}

pub async fn read_markers(
    s: AppState,
    req: Ruma<set_read_marker::v3::Request>,
) -> Result<set_read_marker::v3::Response, Error> {
    s.set_read_marker(&req.caller, req.body.room_id.as_str()).await?;
    Ok(set_read_marker::v3::Response::new())
}

/// A sync filter, stored as ruma reads it (fields the spec does not
/// define are dropped).
pub async fn put_filter(
    s: AppState,
    req: Ruma<create_filter::v3::Request>,
) -> Result<create_filter::v3::Response, Error> {
    let b = req.body;
    let filter = serde_json::to_value(&b.filter).map_err(Error::internal)?;
    let id = s.put_filter(&req.caller, b.user_id.as_str(), filter).await?;
    Ok(create_filter::v3::Response::new(id))
}

pub async fn get_filter(s: AppState, req: Ruma<get_filter::v3::Request>) -> Result<get_filter::v3::Response, Error> {
    let b = &req.body;
    let filter = s.get_filter(&req.caller, b.user_id.as_str(), &b.filter_id).await?;
    // A filter stored before filters were read as the spec defines them
    // may not be one: the client uploads it again, as after any 404.
    let filter = serde_json::from_value(filter).map_err(|e| {
        tracing::warn!("stored filter {} is not a filter definition: {e}", b.filter_id);
        Error::not_found("Filter not found")
    })?;
    Ok(get_filter::v3::Response::new(filter))
}

pub async fn put_account_data(
    s: AppState,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<set_global_account_data::v3::Response, Error> {
    let b = req.body;
    let content = serde_json::from_str(b.data.json().get()).map_err(bad_json)?;
    s.put_account_data(
        &req.caller,
        b.user_id.as_str(),
        None,
        &b.event_type.to_string(),
        content,
    )
    .await?;
    Ok(set_global_account_data::v3::Response::new())
}

pub async fn get_account_data(
    s: AppState,
    req: Ruma<get_global_account_data::v3::Request>,
) -> Result<get_global_account_data::v3::Response, Error> {
    let b = &req.body;
    let content = s
        .account_data(&req.caller, b.user_id.as_str(), None, &b.event_type.to_string())
        .await?;
    Ok(get_global_account_data::v3::Response::new(raw(content)?))
}

pub async fn put_room_account_data(
    s: AppState,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<set_room_account_data::v3::Response, Error> {
    let b = req.body;
    let content = serde_json::from_str(b.data.json().get()).map_err(bad_json)?;
    s.put_account_data(
        &req.caller,
        b.user_id.as_str(),
        Some(b.room_id.as_str()),
        &b.event_type.to_string(),
        content,
    )
    .await?;
    Ok(set_room_account_data::v3::Response::new())
}

pub async fn get_room_account_data(
    s: AppState,
    req: Ruma<get_room_account_data::v3::Request>,
) -> Result<get_room_account_data::v3::Response, Error> {
    let b = &req.body;
    let content = s
        .account_data(
            &req.caller,
            b.user_id.as_str(),
            Some(b.room_id.as_str()),
            &b.event_type.to_string(),
        )
        .await?;
    Ok(get_room_account_data::v3::Response::new(raw(content)?))
}

/// Push rules are not evaluated or stored yet; clients get the spec's
/// server-default rule set for the caller (what they expect to find, e.g.
/// to show notification settings).
pub async fn push_rules(
    _: AppState,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<get_pushrules_all::v3::Response, Error> {
    Ok(get_pushrules_all::v3::Response::new(Ruleset::server_default(
        &req.caller.user_id,
    )))
}
