//! Relations and threads: `/rooms/{id}/relations/{eventId}[/{relType}
//! [/{eventType}]]` and `/rooms/{id}/threads`.

use ruma::api::Direction;
use ruma::api::client::relations::{
    get_relating_events, get_relating_events_with_rel_type, get_relating_events_with_rel_type_and_event_type,
};
use ruma::api::client::threads::get_threads;
use ruma::api::client::threads::get_threads::v1::IncludeThreads;
use weft_core::Error;
use weft_services::relations::{RelationsPage, RelationsQuery};

use crate::AppState;
use crate::endpoint::{QueryDefaults, Ruma, WithDefaults, convert};

fn limit_of(limit: Option<ruma::UInt>) -> Option<usize> {
    limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX))
}

/// What every relations request carries besides the relation filters.
struct Paging<'a> {
    room_id: &'a ruma::RoomId,
    event_id: &'a ruma::EventId,
    from: Option<&'a str>,
    to: Option<&'a str>,
    dir: Direction,
    limit: Option<ruma::UInt>,
}

/// One page of the events relating to an event, with the relation and
/// event type filters given: the chunk, `next_batch`, `prev_batch`.
async fn page<T: serde::de::DeserializeOwned>(
    s: &AppState,
    session: &weft_services::Session,
    p: Paging<'_>,
    rel_type: Option<&str>,
    event_type: Option<&str>,
) -> Result<(Vec<T>, Option<String>, Option<String>), Error> {
    let q = RelationsQuery {
        rel_type,
        event_type,
        from: p.from,
        to: p.to,
        forward: p.dir == Direction::Forward,
        limit: limit_of(p.limit),
    };
    let found: RelationsPage = s.relations(session, p.room_id.as_str(), p.event_id.as_str(), q).await?;
    Ok((convert(&found.chunk)?, found.next_batch, found.prev_batch))
}

macro_rules! paging {
    ($b:expr) => {
        Paging {
            room_id: &$b.room_id,
            event_id: &$b.event_id,
            from: $b.from.as_deref(),
            to: $b.to.as_deref(),
            dir: $b.dir,
            limit: $b.limit,
        }
    };
}

pub async fn relating(
    s: AppState,
    req: Ruma<get_relating_events::v1::Request>,
) -> Result<get_relating_events::v1::Response, Error> {
    let b = &req.body;
    let (chunk, next, prev) = page(&s, &req.caller, paging!(b), None, None).await?;
    let mut r = get_relating_events::v1::Response::new(chunk);
    r.next_batch = next;
    r.prev_batch = prev;
    Ok(r)
}

pub async fn relating_with_rel_type(
    s: AppState,
    req: Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> Result<get_relating_events_with_rel_type::v1::Response, Error> {
    let b = &req.body;
    let rel_type = b.rel_type.to_string();
    let (chunk, next, prev) = page(&s, &req.caller, paging!(b), Some(&rel_type), None).await?;
    let mut r = get_relating_events_with_rel_type::v1::Response::new(chunk);
    r.next_batch = next;
    r.prev_batch = prev;
    Ok(r)
}

pub async fn relating_with_rel_type_and_event_type(
    s: AppState,
    req: Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> Result<get_relating_events_with_rel_type_and_event_type::v1::Response, Error> {
    let b = &req.body;
    let (rel_type, event_type) = (b.rel_type.to_string(), b.event_type.to_string());
    let (chunk, next, prev) = page(&s, &req.caller, paging!(b), Some(&rel_type), Some(&event_type)).await?;
    let mut r = get_relating_events_with_rel_type_and_event_type::v1::Response::new(chunk);
    r.next_batch = next;
    r.prev_batch = prev;
    Ok(r)
}

/// `include` of `GET /rooms/{roomId}/threads` is optional (default
/// `all`); ruma's request type requires it.
pub struct ThreadsDefaults;

impl QueryDefaults for ThreadsDefaults {
    const DEFAULTS: &'static [(&'static str, &'static str)] = &[("include", "all")];
}

pub async fn threads(
    s: AppState,
    req: Ruma<WithDefaults<get_threads::v1::Request, ThreadsDefaults>>,
) -> Result<get_threads::v1::Response, Error> {
    let b = &req.body.request;
    let (chunk, next) = s
        .threads(
            &req.caller,
            b.room_id.as_str(),
            b.include == IncludeThreads::Participated,
            b.from.as_deref(),
            limit_of(b.limit),
        )
        .await?;
    let mut r = get_threads::v1::Response::new(convert(&chunk)?);
    r.next_batch = next;
    Ok(r)
}
