//! Rooms: creation, membership, sending, state, reading and sync.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind};
use weft_services::filter::EventFilter;
use weft_services::room_ops::Pagination;
use weft_services::sync::SyncRequest;
use weft_store::{Direction, StoredEvent};

use ruma::api::client::alias::{create_alias, delete_alias, get_alias};
use ruma::api::client::directory::get_public_rooms;
use ruma::api::client::membership::invite_user::v3::InvitationRecipient;
use ruma::api::client::membership::{
    ban_user, forget_room, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias, joined_members,
    joined_rooms, kick_user, leave_room, unban_user,
};
use ruma::api::client::message::send_message_event;
use ruma::api::client::redact::redact_event;
use ruma::api::client::room::create_room;
use ruma::api::client::room::{aliases, get_room_event};
use ruma::api::client::state::get_state_event_for_key::v3::StateEventFormat;
use ruma::api::client::state::{get_state_event_for_key, get_state_events, send_state_event};

use crate::endpoint::{Ruma, bad_json, convert, raw};
use crate::extract::{Auth, P, Q};
use crate::own::send_without_txn;
use crate::{ApiResult, AppState};

fn fmt(e: &StoredEvent, session: &weft_services::Session) -> Value {
    weft_rooms::client_event(
        e,
        Some((session.user_id.as_str(), session.device_id.as_str())),
        weft_core::now_ms(),
    )
}

fn content_of(e: &StoredEvent) -> Value {
    serde_json::from_str::<Value>(&e.pdu_json)
        .ok()
        .and_then(|v| v.get("content").cloned())
        .unwrap_or(json!({}))
}

pub async fn create_room(s: AppState, req: Ruma<create_room::v3::Request>) -> Result<create_room::v3::Response, Error> {
    let room_id = s.create_room(&req.caller, req.body).await?;
    Ok(create_room::v3::Response::new(room_id))
}

pub async fn join(
    s: AppState,
    req: Ruma<join_room_by_id::v3::Request>,
) -> Result<join_room_by_id::v3::Response, Error> {
    let room_id = s.join(&req.caller.user_id, req.body.room_id.as_str()).await?;
    Ok(join_room_by_id::v3::Response::new(room_id))
}

pub async fn join_by_id_or_alias(
    s: AppState,
    req: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<join_room_by_id_or_alias::v3::Response, Error> {
    let room_id = s.join(&req.caller.user_id, req.body.room_id_or_alias.as_str()).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id))
}

pub async fn invite(s: AppState, req: Ruma<invite_user::v3::Request>) -> Result<invite_user::v3::Response, Error> {
    let body = req.body;
    let InvitationRecipient::UserId(recipient) = body.recipient else {
        return Err(Error::new(
            ErrorKind::Unrecognized {
                method_not_allowed: false,
            },
            "Third-party invites are not supported",
        ));
    };
    s.set_membership(
        &req.caller.user_id,
        body.room_id.as_str(),
        recipient.user_id.as_str(),
        "invite",
        recipient.reason,
    )
    .await?;
    Ok(invite_user::v3::Response::new())
}

pub async fn leave(s: AppState, req: Ruma<leave_room::v3::Request>) -> Result<leave_room::v3::Response, Error> {
    let user = req.caller.user_id;
    s.set_membership(
        &user,
        req.body.room_id.as_str(),
        user.as_str(),
        "leave",
        req.body.reason,
    )
    .await?;
    Ok(leave_room::v3::Response::new())
}

pub async fn kick(s: AppState, req: Ruma<kick_user::v3::Request>) -> Result<kick_user::v3::Response, Error> {
    let b = req.body;
    s.set_membership(
        &req.caller.user_id,
        b.room_id.as_str(),
        b.user_id.as_str(),
        "leave",
        b.reason,
    )
    .await?;
    Ok(kick_user::v3::Response::new())
}

pub async fn ban(s: AppState, req: Ruma<ban_user::v3::Request>) -> Result<ban_user::v3::Response, Error> {
    let b = req.body;
    s.set_membership(
        &req.caller.user_id,
        b.room_id.as_str(),
        b.user_id.as_str(),
        "ban",
        b.reason,
    )
    .await?;
    Ok(ban_user::v3::Response::new())
}

pub async fn unban(s: AppState, req: Ruma<unban_user::v3::Request>) -> Result<unban_user::v3::Response, Error> {
    let b = req.body;
    s.set_membership(
        &req.caller.user_id,
        b.room_id.as_str(),
        b.user_id.as_str(),
        "leave",
        b.reason,
    )
    .await?;
    Ok(unban_user::v3::Response::new())
}

pub async fn forget(s: AppState, req: Ruma<forget_room::v3::Request>) -> Result<forget_room::v3::Response, Error> {
    s.forget(&req.caller.user_id, req.body.room_id.as_str()).await?;
    Ok(forget_room::v3::Response::new())
}

pub async fn joined_rooms(
    s: AppState,
    req: Ruma<joined_rooms::v3::Request>,
) -> Result<joined_rooms::v3::Response, Error> {
    Ok(joined_rooms::v3::Response::new(convert(
        &s.joined_rooms(&req.caller.user_id).await?,
    )?))
}

pub async fn members(
    s: AppState,
    req: Ruma<get_member_events::v3::Request>,
) -> Result<get_member_events::v3::Response, Error> {
    let b = &req.body;
    let members = s
        .members(
            &req.caller.user_id,
            b.room_id.as_str(),
            b.membership.as_ref().map(|m| m.as_str()),
            b.not_membership.as_ref().map(|m| m.as_str()),
        )
        .await?;
    Ok(get_member_events::v3::Response::new(
        members
            .iter()
            .map(|e| raw(fmt(e, &req.caller)))
            .collect::<Result<_, _>>()?,
    ))
}

pub async fn room_joined_members(
    s: AppState,
    req: Ruma<joined_members::v3::Request>,
) -> Result<joined_members::v3::Response, Error> {
    let members = s
        .members(&req.caller.user_id, req.body.room_id.as_str(), Some("join"), None)
        .await?;
    let mut joined = std::collections::BTreeMap::new();
    for e in members {
        let Some(user_id) = e.state_key.as_deref().and_then(|k| ruma::OwnedUserId::try_from(k).ok()) else {
            continue;
        };
        let c = content_of(&e);
        let mut member = joined_members::v3::RoomMember::new();
        member.display_name = c.get("displayname").and_then(Value::as_str).map(str::to_owned);
        member.avatar_url = c.get("avatar_url").and_then(Value::as_str).map(Into::into);
        joined.insert(user_id, member);
    }
    Ok(joined_members::v3::Response::new(joined))
}

pub async fn send(
    s: AppState,
    req: Ruma<send_message_event::v3::Request>,
) -> Result<send_message_event::v3::Response, Error> {
    let body = req.body;
    let content = serde_json::from_str(body.body.json().get()).map_err(bad_json)?;
    let event_id = s
        .send_event(
            &req.caller,
            body.room_id.as_str(),
            &body.event_type.to_string(),
            None,
            Some(body.txn_id.as_str()),
            content,
        )
        .await?;
    Ok(send_message_event::v3::Response::new(event_id))
}

/// `POST .../send/{type}` without a transaction ID, as the original
/// `api/v1` path (and the CoAP form in the talk) sends it.
pub async fn send_without_txn(
    s: AppState,
    req: Ruma<send_without_txn::Request>,
) -> Result<send_without_txn::Response, Error> {
    let body = req.body;
    let content = serde_json::from_str(body.body.json().get()).map_err(bad_json)?;
    let event_id = s
        .send_event(
            &req.caller,
            body.room_id.as_str(),
            &body.event_type.to_string(),
            None,
            None,
            content,
        )
        .await?;
    Ok(send_without_txn::Response::new(event_id))
}

pub async fn state(
    s: AppState,
    req: Ruma<get_state_events::v3::Request>,
) -> Result<get_state_events::v3::Response, Error> {
    let state = s.room_state(&req.caller.user_id, req.body.room_id.as_str()).await?;
    Ok(get_state_events::v3::Response::new(
        state
            .iter()
            .map(|e| raw(fmt(e, &req.caller)))
            .collect::<Result<_, _>>()?,
    ))
}

/// The paths of the state endpoints for the empty state key that ruma's
/// metadata lacks: without the key, with or without the trailing slash
/// (ruma's own client sends it).
pub const EMPTY_STATE_KEY: [&str; 2] = [
    "/rooms/{room_id}/state/{event_type}",
    "/rooms/{room_id}/state/{event_type}/",
];

/// One state event's content, or (`?format=event`) the whole event.
pub async fn get_state(
    s: AppState,
    req: Ruma<get_state_event_for_key::v3::Request>,
) -> Result<get_state_event_for_key::v3::Response, Error> {
    let b = &req.body;
    let (room, event_type) = (b.room_id.as_str(), b.event_type.to_string());
    let v = match b.format {
        StateEventFormat::Event => {
            s.state_client_event(&req.caller, room, &event_type, &b.state_key)
                .await?
        }
        _ => {
            s.state_content(&req.caller.user_id, room, &event_type, &b.state_key)
                .await?
        }
    };
    Ok(get_state_event_for_key::v3::Response::new(
        serde_json::value::to_raw_value(&v).map_err(Error::internal)?,
    ))
}

pub async fn put_state(
    s: AppState,
    req: Ruma<send_state_event::v3::Request>,
) -> Result<send_state_event::v3::Response, Error> {
    let b = req.body;
    let content = serde_json::from_str(b.body.json().get()).map_err(bad_json)?;
    let event_id = s
        .send_event(
            &req.caller,
            b.room_id.as_str(),
            &b.event_type.to_string(),
            Some(&b.state_key),
            None,
            content,
        )
        .await?;
    Ok(send_state_event::v3::Response::new(event_id))
}

pub async fn event(s: AppState, req: Ruma<get_room_event::v3::Request>) -> Result<get_room_event::v3::Response, Error> {
    let b = &req.body;
    let ev = s
        .event(&req.caller.user_id, b.room_id.as_str(), b.event_id.as_str())
        .await?;
    Ok(get_room_event::v3::Response::new(raw(fmt(&ev, &req.caller))?))
}

pub async fn redact(s: AppState, req: Ruma<redact_event::v3::Request>) -> Result<redact_event::v3::Response, Error> {
    let b = req.body;
    let event_id = s
        .redact(
            &req.caller,
            b.room_id.as_str(),
            b.event_id.as_str(),
            b.txn_id.as_str(),
            b.reason,
        )
        .await?;
    Ok(redact_event::v3::Response::new(event_id))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<usize>,
    filter: Option<String>,
}

fn event_filter(filter: Option<&str>) -> Result<EventFilter, Error> {
    match filter {
        None => Ok(EventFilter::default()),
        Some(f) => serde_json::from_str(f).map_err(|e| Error::bad_json(format!("Invalid filter: {e}"))),
    }
}

pub async fn messages(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    Q(q): Q<MessagesQuery>,
) -> ApiResult {
    let dir = match q.dir.as_deref() {
        Some("b") | None => Direction::Backward,
        Some("f") => Direction::Forward,
        Some(_) => return Err(Error::invalid_param("dir must be b or f").into()),
    };
    let filter = event_filter(q.filter.as_deref())?;
    let limit = q.limit.or(filter.limit).unwrap_or(10);
    let page = s
        .messages(
            &session.user_id,
            &room,
            Pagination {
                from: q.from.as_deref(),
                to: q.to.as_deref(),
                dir,
                limit,
            },
            &filter,
        )
        .await?;
    let mut out = json!({
        "chunk": page.chunk.iter().map(|e| fmt(e, &session)).collect::<Vec<_>>(),
        "start": page.start,
        "state": page.state.iter().map(|e| fmt(e, &session)).collect::<Vec<_>>(),
    });
    if let Some(end) = page.end {
        out["end"] = end.into();
    }
    Ok(Json(out))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ContextQuery {
    limit: Option<usize>,
    filter: Option<String>,
}

pub async fn context(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, event_id)): P<(String, String)>,
    Q(q): Q<ContextQuery>,
) -> ApiResult {
    let filter = event_filter(q.filter.as_deref())?;
    Ok(Json(
        s.context(
            &session.user_id,
            &room,
            &event_id,
            q.limit.unwrap_or(10).min(100),
            &filter,
        )
        .await?,
    ))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SyncQuery {
    since: Option<String>,
    timeout: Option<u64>,
    full_state: Option<bool>,
    filter: Option<String>,
    set_presence: Option<String>,
}

pub async fn sync(State(s): State<AppState>, Auth(session): Auth, Q(q): Q<SyncQuery>) -> ApiResult {
    let _ = q.set_presence;
    let filter = s.sync_filter(&session, q.filter.as_deref()).await?;
    let resp = s
        .sync(
            &session,
            SyncRequest {
                since: q.since,
                timeout_ms: q.timeout.unwrap_or(0),
                full_state: q.full_state.unwrap_or(false),
                filter,
            },
        )
        .await?;
    Ok(Json(resp))
}

pub async fn get_alias(s: AppState, req: Ruma<get_alias::v3::Request>) -> Result<get_alias::v3::Response, Error> {
    let room_id = s.alias_room(req.body.room_alias.as_str()).await?;
    Ok(get_alias::v3::Response::new(room_id, vec![s.server_name.clone()]))
}

pub async fn put_alias(s: AppState, req: Ruma<create_alias::v3::Request>) -> Result<create_alias::v3::Response, Error> {
    let b = req.body;
    s.put_alias(&req.caller.user_id, b.room_alias.as_str(), b.room_id.as_str())
        .await?;
    Ok(create_alias::v3::Response::new())
}

pub async fn delete_alias(
    s: AppState,
    req: Ruma<delete_alias::v3::Request>,
) -> Result<delete_alias::v3::Response, Error> {
    s.delete_alias(&req.caller.user_id, req.body.room_alias.as_str())
        .await?;
    Ok(delete_alias::v3::Response::new())
}

pub async fn room_aliases(s: AppState, req: Ruma<aliases::v3::Request>) -> Result<aliases::v3::Response, Error> {
    let aliases = s.room_aliases(&req.caller.user_id, req.body.room_id.as_str()).await?;
    Ok(aliases::v3::Response::new(convert(&aliases)?))
}

pub async fn public_rooms(
    s: AppState,
    _req: Ruma<get_public_rooms::v3::Request>,
) -> Result<get_public_rooms::v3::Response, Error> {
    let chunk = s.public_rooms().await?;
    let total = ruma::UInt::new_saturating(chunk.len() as u64);
    let mut resp = get_public_rooms::v3::Response::new(chunk);
    resp.total_room_count_estimate = Some(total);
    Ok(resp)
}
