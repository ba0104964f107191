//! `POST /search`: full-text search over the rooms the user is in.

use ruma::api::client::search::search_events;
use ruma::api::client::search::search_events::v3::{OrderBy, SearchKeys};
use serde::Serialize;
use serde_json::Value;
use weft_core::Error;
use weft_services::search::{SearchKey, SearchQuery};

use crate::AppState;
use crate::endpoint::{Full, Ruma};

/// The answer, with `room_events` always present (ruma leaves an empty
/// one out; matrix-js-sdk reads `search_categories.room_events.results`
/// unconditionally).
#[derive(Serialize)]
pub struct SearchAnswer {
    search_categories: Categories,
}

#[derive(Serialize)]
struct Categories {
    room_events: RoomEvents,
}

#[derive(Serialize)]
struct RoomEvents {
    count: u64,
    highlights: Vec<String>,
    results: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_batch: Option<String>,
}

fn usize_of(n: ruma::UInt) -> usize {
    usize::try_from(u64::from(n)).unwrap_or(usize::MAX)
}

pub async fn search(s: AppState, req: Ruma<search_events::v3::Request>) -> Result<Full<SearchAnswer>, Error> {
    let b = req.body;
    let Some(c) = b.search_categories.room_events else {
        // No category asked for: nothing found.
        return Ok(Full(SearchAnswer {
            search_categories: Categories {
                room_events: RoomEvents {
                    count: 0,
                    highlights: vec![],
                    results: vec![],
                    next_batch: None,
                },
            },
        }));
    };
    let mut keys = Vec::new();
    for k in c.keys.unwrap_or_default() {
        keys.push(match k {
            SearchKeys::ContentBody => SearchKey::Body,
            SearchKeys::ContentName => SearchKey::Name,
            SearchKeys::ContentTopic => SearchKey::Topic,
            other => return Err(Error::invalid_param(format!("Unknown search key {other}"))),
        });
    }
    let q = SearchQuery {
        term: c.search_term,
        keys,
        rooms: c.filter.rooms.map(|r| r.into_iter().map(|r| r.to_string()).collect()),
        not_rooms: c.filter.not_rooms.into_iter().map(|r| r.to_string()).collect(),
        by_rank: c.order_by != Some(OrderBy::Recent),
        limit: c.filter.limit.map(usize_of),
        before_limit: usize_of(c.event_context.before_limit),
        after_limit: usize_of(c.event_context.after_limit),
        next_batch: b.next_batch,
    };
    let found = s.search(&req.caller, q).await?;
    Ok(Full(SearchAnswer {
        search_categories: Categories {
            room_events: RoomEvents {
                count: found.count,
                highlights: found.highlights,
                results: found
                    .results
                    .into_iter()
                    .map(|(rank, result, context)| serde_json::json!({ "rank": rank, "result": result, "context": context }))
                    .collect(),
                next_batch: found.next_batch,
            },
        },
    }))
}
