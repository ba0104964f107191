//! Finding people, calling them, reporting abuse, and third-party IDs
//! (none: Weft has no identity server).

use ruma::api::client::account::get_3pids;
use ruma::api::client::reporting::report_user;
use ruma::api::client::room::report_content;
use ruma::api::client::thirdparty::{
    get_location_for_protocol, get_location_for_room_alias, get_protocol, get_protocols, get_user_for_protocol,
    get_user_for_user_id,
};
use ruma::api::client::user_directory::search_users;
use ruma::api::client::voip::get_turn_server_info;
use serde::Serialize;
use weft_core::Error;

use crate::AppState;
use crate::endpoint::{Full, Ruma, convert};

pub async fn search(s: AppState, req: Ruma<search_users::v3::Request>) -> Result<search_users::v3::Response, Error> {
    let limit = usize::try_from(u64::from(req.body.limit)).unwrap_or(usize::MAX);
    let (results, limited) = s
        .search_user_directory(&req.caller, &req.body.search_term, limit)
        .await?;
    Ok(search_users::v3::Response::new(convert(&results)?, limited))
}

/// `GET /voip/turnServer`: ruma's response needs every field; with no
/// TURN server configured the answer is `{}`, as clients expect.
#[derive(Serialize, Default)]
pub struct TurnAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uris: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<u64>,
}

pub async fn turn_server(s: AppState, req: Ruma<get_turn_server_info::v3::Request>) -> Result<Full<TurnAnswer>, Error> {
    Ok(Full(match s.turn_server(&req.caller)? {
        Some(t) => TurnAnswer {
            username: Some(t.username),
            password: Some(t.password),
            uris: Some(t.uris),
            ttl: Some(t.ttl),
        },
        None => TurnAnswer::default(),
    }))
}

/// `GET /account/3pid`: `{"threepids": []}` (ruma leaves an empty list out).
#[derive(Serialize)]
pub struct ThreePids {
    threepids: Vec<serde_json::Value>,
}

pub async fn three_pids(_: AppState, _: Ruma<get_3pids::v3::Request>) -> Result<Full<ThreePids>, Error> {
    Ok(Full(ThreePids { threepids: vec![] }))
}

pub async fn report_event(
    s: AppState,
    req: Ruma<report_content::v3::Request>,
) -> Result<report_content::v3::Response, Error> {
    let b = req.body;
    s.report_event(&req.caller, b.room_id.as_str(), b.event_id.as_str(), b.reason)
        .await?;
    Ok(report_content::v3::Response::new())
}

pub async fn report_user(s: AppState, req: Ruma<report_user::v3::Request>) -> Result<report_user::v3::Response, Error> {
    let b = req.body;
    s.report_user(&req.caller, &b.user_id, Some(b.reason)).await?;
    Ok(report_user::v3::Response::new())
}

// Third-party networks (`/thirdparty/*`): asked of the application
// services that offer the protocol (docs/appservices.md); their answers
// are passed on as they are.

fn pairs(fields: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub async fn thirdparty_protocols(
    s: AppState,
    _: Ruma<get_protocols::v3::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(
        serde_json::to_value(s.thirdparty_protocols().await?).map_err(Error::internal)?,
    ))
}

pub async fn thirdparty_protocol(
    s: AppState,
    req: Ruma<get_protocol::v3::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(s.thirdparty_protocol(&req.body.protocol).await?))
}

pub async fn thirdparty_locations(
    s: AppState,
    req: Ruma<get_location_for_protocol::v3::Request>,
) -> Result<Full<Vec<serde_json::Value>>, Error> {
    let b = &req.body;
    Ok(Full(
        s.thirdparty_lookup("location", &b.protocol, &pairs(&b.fields)).await?,
    ))
}

pub async fn thirdparty_users(
    s: AppState,
    req: Ruma<get_user_for_protocol::v3::Request>,
) -> Result<Full<Vec<serde_json::Value>>, Error> {
    let b = &req.body;
    Ok(Full(s.thirdparty_lookup("user", &b.protocol, &pairs(&b.fields)).await?))
}

pub async fn thirdparty_location_for_alias(
    s: AppState,
    req: Ruma<get_location_for_room_alias::v3::Request>,
) -> Result<Full<Vec<serde_json::Value>>, Error> {
    Ok(Full(s.thirdparty_reverse("location", req.body.alias.as_str()).await?))
}

pub async fn thirdparty_user_for_userid(
    s: AppState,
    req: Ruma<get_user_for_user_id::v3::Request>,
) -> Result<Full<Vec<serde_json::Value>>, Error> {
    Ok(Full(s.thirdparty_reverse("user", req.body.userid.as_str()).await?))
}
