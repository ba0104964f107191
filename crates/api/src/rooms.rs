//! Rooms: creation, membership, sending, state, reading and sync.

use axum::http::Method;
use ruma::api::error::FromHttpRequestError;
use ruma::api::{IncomingRequest, Metadata};
use serde::Serialize;
use serde_json::Value;
use weft_core::{Error, ErrorKind};
use weft_services::filter::EventFilter;
use weft_services::room_ops::Pagination;
use weft_services::sync::SyncRequest;

use ruma::api::client::alias::{create_alias, delete_alias, get_alias};
use ruma::api::client::context::get_context;
use ruma::api::client::directory::get_public_rooms;
use ruma::api::client::membership::invite_user::v3::InvitationRecipient;
use ruma::api::client::membership::{
    ban_user, forget_room, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias, joined_members,
    joined_rooms, kick_user, leave_room, unban_user,
};
use ruma::api::client::message::{get_message_events, send_message_event};
use ruma::api::client::redact::redact_event;
use ruma::api::client::room::{aliases, get_room_event};
use ruma::api::client::room::{create_room, upgrade_room};
use ruma::api::client::state::get_state_event_for_key::v3::StateEventFormat;
use ruma::api::client::state::{get_state_event_for_key, get_state_events, send_state_event};
use ruma::api::client::sync::sync_events;

use crate::AppState;
use crate::endpoint::{Full, Ruma, bad_json, convert, query_has, raw, with_query_default};
use crate::own::send_without_txn;

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
    let room_id = s
        .join_via(&req.caller.user_id, req.body.room_id_or_alias.as_str(), &req.body.via)
        .await?;
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

/// Kick, ban and unban: one membership change of another user, with a
/// reason; the services check the caller's power.
macro_rules! membership_of_other {
    ($name:ident, $endpoint:ident, $membership:literal) => {
        pub async fn $name(s: AppState, req: Ruma<$endpoint::v3::Request>) -> Result<$endpoint::v3::Response, Error> {
            let b = req.body;
            s.set_membership(
                &req.caller.user_id,
                b.room_id.as_str(),
                b.user_id.as_str(),
                $membership,
                b.reason,
            )
            .await?;
            Ok($endpoint::v3::Response::new())
        }
    };
}

membership_of_other!(kick, kick_user, "leave");
membership_of_other!(ban, ban_user, "ban");
membership_of_other!(unban, unban_user, "leave");

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
        .member_events(
            &req.caller,
            b.room_id.as_str(),
            b.membership.as_ref().map(|m| m.as_str()),
            b.not_membership.as_ref().map(|m| m.as_str()),
        )
        .await?;
    Ok(get_member_events::v3::Response::new(
        members.into_iter().map(raw).collect::<Result<_, _>>()?,
    ))
}

pub async fn room_joined_members(
    s: AppState,
    req: Ruma<joined_members::v3::Request>,
) -> Result<joined_members::v3::Response, Error> {
    let members = s.joined_member_contents(&req.caller, req.body.room_id.as_str()).await?;
    let mut joined = std::collections::BTreeMap::new();
    for (user, c) in members {
        let Ok(user_id) = ruma::OwnedUserId::try_from(user) else {
            continue;
        };
        let mut member = joined_members::v3::RoomMember::new();
        member.display_name = c.get("displayname").and_then(Value::as_str).map(str::to_owned);
        member.avatar_url = c.get("avatar_url").and_then(Value::as_str).map(Into::into);
        joined.insert(user_id, member);
    }
    Ok(joined_members::v3::Response::new(joined))
}

/// Sends an event whose content came as raw JSON (every send and state
/// endpoint).
#[allow(clippy::too_many_arguments)]
async fn send_raw<T>(
    s: &AppState,
    session: &weft_services::Session,
    room_id: &ruma::RoomId,
    event_type: &str,
    state_key: Option<&str>,
    txn_id: Option<&str>,
    content: &ruma::serde::Raw<T>,
    ts: Option<ruma::MilliSecondsSinceUnixEpoch>,
) -> Result<ruma::OwnedEventId, Error> {
    let content = serde_json::from_str(content.json().get()).map_err(bad_json)?;
    let ts = ts.map(|t| u64::from(t.get()));
    s.send_event_at(session, room_id.as_str(), event_type, state_key, txn_id, content, ts)
        .await
}

pub async fn send(
    s: AppState,
    req: Ruma<send_message_event::v3::Request>,
) -> Result<send_message_event::v3::Response, Error> {
    let body = req.body;
    let event_id = send_raw(
        &s,
        &req.caller,
        &body.room_id,
        &body.event_type.to_string(),
        None,
        Some(body.txn_id.as_str()),
        &body.body,
        body.timestamp,
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
    let event_id = send_raw(
        &s,
        &req.caller,
        &body.room_id,
        &body.event_type.to_string(),
        None,
        None,
        &body.body,
        None,
    )
    .await?;
    Ok(send_without_txn::Response::new(event_id))
}

pub async fn state(
    s: AppState,
    req: Ruma<get_state_events::v3::Request>,
) -> Result<get_state_events::v3::Response, Error> {
    let state = s.state_events(&req.caller, req.body.room_id.as_str()).await?;
    Ok(get_state_events::v3::Response::new(
        state.into_iter().map(raw).collect::<Result<_, _>>()?,
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
    let event_id = send_raw(
        &s,
        &req.caller,
        &b.room_id,
        &b.event_type.to_string(),
        Some(&b.state_key),
        None,
        &b.body,
        b.timestamp,
    )
    .await?;
    Ok(send_state_event::v3::Response::new(event_id))
}

pub async fn event(s: AppState, req: Ruma<get_room_event::v3::Request>) -> Result<get_room_event::v3::Response, Error> {
    let b = &req.body;
    let ev = s.event(&req.caller, b.room_id.as_str(), b.event_id.as_str()).await?;
    Ok(get_room_event::v3::Response::new(raw(ev)?))
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

/// `GET /rooms/{room}/messages`: ruma's request, except that `dir` may be
/// left out and then means backwards (`b`). The spec requires `dir`, but
/// the talk's CoAP examples and CoAP Observe on `/messages` send none, and
/// Weft has always read a missing `dir` as `b`. The default is put into the
/// query before ruma reads it, so paths, authentication, the other
/// parameters and the errors for bad values are all ruma's.
pub struct MessagesRequest {
    pub inner: get_message_events::v3::Request,
    /// Whether the query set `limit`; without it the filter's `limit`
    /// applies (10 when neither does).
    pub limit_given: bool,
}

type MessagesV3 = get_message_events::v3::Request;

impl Metadata for MessagesRequest {
    const METHOD: Method = <MessagesV3 as Metadata>::METHOD;
    const RATE_LIMITED: bool = <MessagesV3 as Metadata>::RATE_LIMITED;
    type Authentication = <MessagesV3 as Metadata>::Authentication;
    type PathBuilder = <MessagesV3 as Metadata>::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = <MessagesV3 as Metadata>::PATH_BUILDER;
}

impl IncomingRequest for MessagesRequest {
    type EndpointError = <MessagesV3 as IncomingRequest>::EndpointError;
    type OutgoingResponse = <MessagesV3 as IncomingRequest>::OutgoingResponse;

    fn try_from_http_request<B, S>(req: axum::http::Request<B>, path_args: &[S]) -> Result<Self, FromHttpRequestError>
    where
        B: AsRef<[u8]>,
        S: AsRef<str>,
    {
        let limit_given = query_has(req.uri(), "limit");
        let req = with_query_default(req, "dir", "b");
        MessagesV3::try_from_http_request(req, path_args).map(|inner| Self { inner, limit_given })
    }
}

fn usize_of(n: ruma::UInt) -> usize {
    usize::try_from(u64::from(n)).unwrap_or(usize::MAX)
}

pub async fn messages(s: AppState, req: Ruma<MessagesRequest>) -> Result<get_message_events::v3::Response, Error> {
    let MessagesRequest { inner: b, limit_given } = req.body;
    let filter: EventFilter = convert(&b.filter)?;
    let limit = if limit_given {
        usize_of(b.limit)
    } else {
        filter.limit.unwrap_or(10)
    };
    let page = s
        .messages(
            &req.caller,
            b.room_id.as_str(),
            Pagination {
                from: b.from.as_deref(),
                to: b.to.as_deref(),
                dir: b.dir,
                limit,
            },
            &filter,
        )
        .await?;
    let mut out = get_message_events::v3::Response::new();
    out.start = page.start;
    out.end = page.end;
    out.chunk = page.chunk.into_iter().map(raw).collect::<Result<_, _>>()?;
    out.state = page.state.into_iter().map(raw).collect::<Result<_, _>>()?;
    Ok(out)
}

/// The `/context` answer with every field, empty lists included: ruma's
/// response leaves out an empty `events_before`, `events_after` or
/// `state`, which Weft has always sent and clients may read as lists.
#[derive(Serialize)]
pub struct ContextAnswer {
    start: String,
    end: String,
    event: Value,
    events_before: Vec<Value>,
    events_after: Vec<Value>,
    state: Vec<Value>,
}

pub async fn context(s: AppState, req: Ruma<get_context::v3::Request>) -> Result<Full<ContextAnswer>, Error> {
    let b = &req.body;
    let filter: EventFilter = convert(&b.filter)?;
    let c = s
        .context(
            &req.caller.user_id,
            b.room_id.as_str(),
            b.event_id.as_str(),
            usize_of(b.limit).min(100),
            &filter,
        )
        .await?;
    Ok(Full(ContextAnswer {
        start: c.start,
        end: c.end,
        event: c.event,
        events_before: c.events_before,
        events_after: c.events_after,
        state: c.state,
    }))
}

/// The `/sync` answer: the JSON the sync service builds, passed on as it
/// is. `/sync` is the hottest read path: ruma's typed response would parse
/// the whole answer into ruma's event types only to write it out again
/// (and would leave out the empty sections Weft sends). The fields name
/// the parts of the answer; each stays the service's JSON, and anything
/// else the service adds is passed on too.
#[derive(Serialize)]
pub struct SyncAnswer {
    next_batch: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    rooms: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    presence: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    account_data: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    to_device: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    device_lists: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    device_one_time_keys_count: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    device_unused_fallback_key_types: Value,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

impl SyncAnswer {
    /// Takes the parts out of the service's answer (moves, no copies).
    fn of(v: Value) -> Result<Self, Error> {
        let Value::Object(mut m) = v else {
            return Err(Error::internal("sync answer is not an object"));
        };
        let mut take = |k: &str| m.remove(k).unwrap_or(Value::Null);
        let next_batch = match take("next_batch") {
            Value::String(t) => t,
            _ => return Err(Error::internal("sync answer without next_batch")),
        };
        Ok(Self {
            next_batch,
            rooms: take("rooms"),
            presence: take("presence"),
            account_data: take("account_data"),
            to_device: take("to_device"),
            device_lists: take("device_lists"),
            device_one_time_keys_count: take("device_one_time_keys_count"),
            device_unused_fallback_key_types: take("device_unused_fallback_key_types"),
            other: m,
        })
    }
}

pub async fn sync(s: AppState, req: Ruma<sync_events::v3::Request>) -> Result<Full<SyncAnswer>, Error> {
    use sync_events::v3::Filter;
    let b = req.body;
    // The service reads a filter as the query has it: inline JSON or an ID.
    // An inline filter ruma cannot read arrives as a `FilterId` holding the
    // text (ruma's `Filter` is untagged), and the service answers it as a
    // bad inline filter, not as an unknown ID.
    let filter = match &b.filter {
        None => None,
        Some(Filter::FilterId(id)) => Some(id.clone()),
        Some(Filter::FilterDefinition(def)) => Some(serde_json::to_string(def).map_err(Error::internal)?),
        Some(_) => return Err(Error::invalid_param("Unsupported filter")),
    };
    let filter = s.sync_filter(&req.caller, filter.as_deref()).await?;
    let resp = s
        .sync(
            &req.caller,
            SyncRequest {
                since: b.since,
                timeout_ms: b
                    .timeout
                    .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
                full_state: b.full_state,
                filter,
                set_presence: Some(b.set_presence.as_str().to_owned()),
            },
        )
        .await?;
    Ok(Full(SyncAnswer::of(resp)?))
}

pub async fn get_alias(s: AppState, req: Ruma<get_alias::v3::Request>) -> Result<get_alias::v3::Response, Error> {
    let (room_id, servers) = s.alias_directory(&req.body.room_alias).await?;
    Ok(get_alias::v3::Response::new(room_id, servers))
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
    req: Ruma<get_public_rooms::v3::Request>,
) -> Result<get_public_rooms::v3::Response, Error> {
    let b = req.body;
    if let Some(server) = b.server.filter(|server| *server != s.server_name) {
        // Another server's directory, asked over federation.
        let page = s.remote_public_rooms(&server, b.limit, b.since, None).await?;
        let mut resp = get_public_rooms::v3::Response::new(page.chunk);
        resp.next_batch = page.next_batch;
        resp.prev_batch = page.prev_batch;
        resp.total_room_count_estimate = Some(ruma::UInt::new_saturating(page.total));
        return Ok(resp);
    }
    let chunk = s.public_rooms().await?;
    let total = ruma::UInt::new_saturating(chunk.len() as u64);
    let mut resp = get_public_rooms::v3::Response::new(chunk);
    resp.total_room_count_estimate = Some(total);
    Ok(resp)
}

pub async fn upgrade(s: AppState, req: Ruma<upgrade_room::v3::Request>) -> Result<upgrade_room::v3::Response, Error> {
    let b = req.body;
    let room = s
        .upgrade_room(
            &req.caller,
            b.room_id.as_str(),
            b.new_version.as_str(),
            b.additional_creators,
        )
        .await?;
    Ok(upgrade_room::v3::Response::new(room))
}

/// `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`:
/// simplified sliding sync (MSC4186).
pub async fn sliding_sync(
    s: AppState,
    req: Ruma<ruma::api::client::sync::sync_events::v5::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(s.sliding_sync(&req.caller, &req.body).await?))
}
