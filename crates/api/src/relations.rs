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

/// The parts every relations response has.
type Page<T> = (Vec<T>, Option<String>, Option<String>);

fn page<T: serde::de::DeserializeOwned>(p: RelationsPage) -> Result<Page<T>, Error> {
    Ok((convert(&p.chunk)?, p.next_batch, p.prev_batch))
}

pub async fn relating(
    s: AppState,
    req: Ruma<get_relating_events::v1::Request>,
) -> Result<get_relating_events::v1::Response, Error> {
    let b = &req.body;
    let q = RelationsQuery {
        from: b.from.as_deref(),
        to: b.to.as_deref(),
        forward: b.dir == Direction::Forward,
        limit: limit_of(b.limit),
        ..Default::default()
    };
    let (chunk, next, prev) = page(
        s.relations(&req.caller, b.room_id.as_str(), b.event_id.as_str(), q)
            .await?,
    )?;
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
    let q = RelationsQuery {
        rel_type: Some(&rel_type),
        from: b.from.as_deref(),
        to: b.to.as_deref(),
        forward: b.dir == Direction::Forward,
        limit: limit_of(b.limit),
        ..Default::default()
    };
    let (chunk, next, prev) = page(
        s.relations(&req.caller, b.room_id.as_str(), b.event_id.as_str(), q)
            .await?,
    )?;
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
    let q = RelationsQuery {
        rel_type: Some(&rel_type),
        event_type: Some(&event_type),
        from: b.from.as_deref(),
        to: b.to.as_deref(),
        forward: b.dir == Direction::Forward,
        limit: limit_of(b.limit),
    };
    let (chunk, next, prev) = page(
        s.relations(&req.caller, b.room_id.as_str(), b.event_id.as_str(), q)
            .await?,
    )?;
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
