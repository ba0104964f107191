//! Rooms: creation, membership, sending, state, reading and sync.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::Error;
use weft_services::room_ops::{CreateRoomRequest, Pagination};
use weft_services::sync::{EventFilter, SyncRequest};
use weft_store::{Direction, StoredEvent};

use crate::extract::{Auth, JsonBody, P, Q};
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

pub async fn create_room(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(req): JsonBody<CreateRoomRequest>,
) -> ApiResult {
    let room_id = s.create_room(&session, req).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

pub async fn join(State(s): State<AppState>, Auth(session): Auth, P(room): P<String>) -> ApiResult {
    let room_id = s.join(&session.user_id, &room).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

#[derive(Deserialize)]
pub struct TargetRequest {
    user_id: String,
    reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ReasonRequest {
    reason: Option<String>,
}

pub async fn invite(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    JsonBody(r): JsonBody<TargetRequest>,
) -> ApiResult {
    s.set_membership(&session.user_id, &room, &r.user_id, "invite", r.reason)
        .await?;
    Ok(Json(json!({})))
}

pub async fn leave(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    JsonBody(r): JsonBody<ReasonRequest>,
) -> ApiResult {
    s.set_membership(&session.user_id, &room, session.user_id.as_str(), "leave", r.reason)
        .await?;
    Ok(Json(json!({})))
}

pub async fn kick(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    JsonBody(r): JsonBody<TargetRequest>,
) -> ApiResult {
    s.set_membership(&session.user_id, &room, &r.user_id, "leave", r.reason)
        .await?;
    Ok(Json(json!({})))
}

pub async fn ban(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    JsonBody(r): JsonBody<TargetRequest>,
) -> ApiResult {
    s.set_membership(&session.user_id, &room, &r.user_id, "ban", r.reason)
        .await?;
    Ok(Json(json!({})))
}

pub async fn unban(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    JsonBody(r): JsonBody<TargetRequest>,
) -> ApiResult {
    s.set_membership(&session.user_id, &room, &r.user_id, "leave", r.reason)
        .await?;
    Ok(Json(json!({})))
}

pub async fn forget(State(s): State<AppState>, Auth(session): Auth, P(room): P<String>) -> ApiResult {
    s.forget(&session.user_id, &room).await?;
    Ok(Json(json!({})))
}

pub async fn joined_rooms(State(s): State<AppState>, Auth(session): Auth) -> ApiResult {
    Ok(Json(json!({ "joined_rooms": s.joined_rooms(&session.user_id).await? })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct MembersQuery {
    membership: Option<String>,
    not_membership: Option<String>,
}

pub async fn members(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(room): P<String>,
    Q(q): Q<MembersQuery>,
) -> ApiResult {
    let members = s
        .members(
            &session.user_id,
            &room,
            q.membership.as_deref(),
            q.not_membership.as_deref(),
        )
        .await?;
    Ok(Json(
        json!({ "chunk": members.iter().map(|e| fmt(e, &session)).collect::<Vec<_>>() }),
    ))
}

pub async fn joined_members(State(s): State<AppState>, Auth(session): Auth, P(room): P<String>) -> ApiResult {
    let members = s.members(&session.user_id, &room, Some("join"), None).await?;
    let mut joined = serde_json::Map::new();
    for e in members {
        let c = content_of(&e);
        joined.insert(
            e.state_key.clone().unwrap_or_default(),
            json!({ "display_name": c.get("displayname"), "avatar_url": c.get("avatar_url") }),
        );
    }
    Ok(Json(json!({ "joined": joined })))
}

pub async fn send(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, event_type, txn)): P<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult {
    let event_id = s
        .send_event(&session, &room, &event_type, None, Some(&txn), content)
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}

/// `POST .../send/{type}` without a transaction ID, as the original
/// `api/v1` path (and the CoAP form in the talk) sends it.
pub async fn send_no_txn(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, event_type)): P<(String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult {
    let event_id = s.send_event(&session, &room, &event_type, None, None, content).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn state(State(s): State<AppState>, Auth(session): Auth, P(room): P<String>) -> ApiResult {
    let state = s.room_state(&session.user_id, &room).await?;
    Ok(Json(Value::Array(state.iter().map(|e| fmt(e, &session)).collect())))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct FormatQuery {
    format: Option<String>,
}

async fn get_state_inner(
    s: &AppState,
    session: &weft_services::Session,
    room: &str,
    t: &str,
    k: &str,
    format: Option<String>,
) -> ApiResult {
    let ev = s.state_event(&session.user_id, room, t, k).await?;
    if format.as_deref() == Some("event") {
        return Ok(Json(fmt(&ev, session)));
    }
    Ok(Json(content_of(&ev)))
}

pub async fn get_state(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, t, k)): P<(String, String, String)>,
    Q(q): Q<FormatQuery>,
) -> ApiResult {
    get_state_inner(&s, &session, &room, &t, &k, q.format).await
}

pub async fn get_state_empty_key(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, t)): P<(String, String)>,
    Q(q): Q<FormatQuery>,
) -> ApiResult {
    get_state_inner(&s, &session, &room, &t, "", q.format).await
}

pub async fn put_state(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, t, k)): P<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult {
    let event_id = s.send_event(&session, &room, &t, Some(&k), None, content).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn put_state_empty_key(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, t)): P<(String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult {
    let event_id = s.send_event(&session, &room, &t, Some(""), None, content).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn event(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, event_id)): P<(String, String)>,
) -> ApiResult {
    let ev = s.event(&session.user_id, &room, &event_id).await?;
    Ok(Json(fmt(&ev, &session)))
}

pub async fn redact(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((room, event_id, txn)): P<(String, String, String)>,
    JsonBody(r): JsonBody<ReasonRequest>,
) -> ApiResult {
    let event_id = s.redact(&session, &room, &event_id, &txn, r.reason).await?;
    Ok(Json(json!({ "event_id": event_id })))
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

pub async fn get_alias(State(s): State<AppState>, P(alias): P<String>) -> ApiResult {
    let record = s
        .store
        .resolve_alias(&alias)
        .await?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    Ok(Json(json!({ "room_id": record.room_id, "servers": [s.server_name] })))
}

#[derive(Deserialize)]
pub struct PutAlias {
    room_id: String,
}

pub async fn put_alias(
    State(s): State<AppState>,
    Auth(session): Auth,
    P(alias): P<String>,
    JsonBody(b): JsonBody<PutAlias>,
) -> ApiResult {
    s.put_alias(&session.user_id, &alias, &b.room_id).await?;
    Ok(Json(json!({})))
}

pub async fn delete_alias(State(s): State<AppState>, Auth(session): Auth, P(alias): P<String>) -> ApiResult {
    s.delete_alias(&session.user_id, &alias).await?;
    Ok(Json(json!({})))
}

pub async fn room_aliases(State(s): State<AppState>, Auth(session): Auth, P(room): P<String>) -> ApiResult {
    let (room_id, _) = s.read_view(&session.user_id, &room).await?;
    Ok(Json(
        json!({ "aliases": s.store.room_aliases(room_id.as_str()).await? }),
    ))
}

pub async fn public_rooms(State(s): State<AppState>) -> ApiResult {
    let mut chunk = Vec::new();
    for room_id in s.store.public_rooms().await? {
        let state = s.store.current_state(&room_id).await?;
        let get = |t: &str, k: &str| {
            state
                .iter()
                .find(|e| e.event_type == t)
                .map(|e| content_of(e).get(k).cloned())
        };
        let joined = state
            .iter()
            .filter(|e| {
                e.event_type == "m.room.member" && weft_services::room_ops::membership_of(e).as_deref() == Some("join")
            })
            .count();
        chunk.push(json!({
            "room_id": room_id,
            "name": get("m.room.name", "name").flatten(),
            "topic": get("m.room.topic", "topic").flatten(),
            "canonical_alias": get("m.room.canonical_alias", "alias").flatten(),
            "num_joined_members": joined,
            "world_readable": get("m.room.history_visibility", "history_visibility").flatten() == Some(json!("world_readable")),
            "guest_can_join": get("m.room.guest_access", "guest_access").flatten() == Some(json!("can_join")),
            "join_rule": get("m.room.join_rules", "join_rule").flatten(),
        }));
    }
    Ok(Json(
        json!({ "chunk": chunk, "total_room_count_estimate": chunk.len() }),
    ))
}
