//! Discovery, filters, account data, and the ephemeral endpoints Weft
//! accepts without storing yet (typing, receipts, presence).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use ruma::api::client::config::{
    get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
};
use weft_core::Error;

use crate::endpoint::{Ruma, bad_json, raw};
use crate::extract::{Auth, JsonBody, P};
use crate::{ApiResult, AppState};

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
pub async fn typing(State(s): State<AppState>, Auth(session): Auth, P((room, user)): P<(String, String)>) -> ApiResult {
    s.set_typing(&session, &room, &user).await?;
    Ok(Json(json!({})))
}

pub async fn presence(State(s): State<AppState>, Auth(session): Auth, P(user): P<String>) -> ApiResult {
    s.set_presence(&session, &user).await?;
    Ok(Json(json!({})))
}

pub async fn receipt(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, _, _)): P<(String, String, String)>,
) -> ApiResult {
    s.set_read_marker(&session, &room).await?;
    Ok(Json(json!({})))
}

pub async fn read_markers(State(s): State<AppState>, Auth(session): Auth, P(room): P<String>) -> ApiResult {
    s.set_read_marker(&session, &room).await?;
    Ok(Json(json!({})))
}

pub async fn put_filter(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(user_id): P<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult {
    let id = s.put_filter(&session, &user_id, body).await?;
    Ok(Json(json!({ "filter_id": id })))
}

pub async fn get_filter(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((user_id, filter_id)): P<(String, String)>,
) -> ApiResult {
    Ok(Json(s.get_filter(&session, &user_id, &filter_id).await?))
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

/// Push rules are not evaluated yet; clients get an empty rule set.
pub async fn push_rules(Auth(_): Auth) -> Json<Value> {
    Json(json!({ "global": { "override": [], "content": [], "room": [], "sender": [], "underride": [] } }))
}
