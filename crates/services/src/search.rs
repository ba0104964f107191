//! Full-text search over the rooms a user is in (`POST /search`): the
//! user's words, each matched as a word prefix, all required; in
//! `content.body`, `content.name` and `content.topic` (or the keys asked
//! for); best match or newest first. Only events the user may see come
//! back, each with the events around it.

use std::collections::HashMap;

use serde_json::{Value, json};
use weft_core::{Error, Result};
use weft_store::Direction;
pub use weft_store::SearchKey;

use crate::room_ops::ReadView;
use crate::stream::client_event;
use crate::{Services, Session};

/// The most results one page returns.
pub const MAX_RESULTS: usize = 50;
const DEFAULT_RESULTS: usize = 10;
/// The most events of context on each side of a result.
pub const MAX_CONTEXT: usize = 20;

/// What a search asks for.
#[derive(Clone, Debug, Default)]
pub struct SearchQuery {
    pub term: String,
    /// Empty: all three.
    pub keys: Vec<SearchKey>,
    /// Only these rooms (of those the user is in).
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub by_rank: bool,
    pub limit: Option<usize>,
    pub before_limit: usize,
    pub after_limit: usize,
    /// The `next_batch` of the previous page.
    pub next_batch: Option<String>,
}

/// One page of results.
#[derive(Clone, Debug, Default)]
pub struct SearchAnswer {
    /// About how many events match in all.
    pub count: u64,
    /// (rank, event, context) — rank: higher is better.
    pub results: Vec<(f64, Value, Value)>,
    pub next_batch: Option<String>,
    /// The words searched for, for clients to highlight.
    pub highlights: Vec<String>,
}

/// The user's words as an FTS5 query: every word required, as a prefix;
/// quoted, so FTS5's own syntax in them is taken literally.
fn fts_query(term: &str) -> (String, Vec<String>) {
    let words: Vec<String> = term
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(16)
        .map(str::to_lowercase)
        .collect();
    let query = words.iter().map(|w| format!("\"{w}\"*")).collect::<Vec<_>>().join(" ");
    (query, words)
}

impl Services {
    pub async fn search(&self, session: &Session, q: SearchQuery) -> Result<SearchAnswer> {
        if q.term.len() > 1000 {
            return Err(Error::invalid_param("search_term is too long"));
        }
        let (query, highlights) = fts_query(&q.term);
        if query.is_empty() {
            return Ok(SearchAnswer::default());
        }
        let offset = match &q.next_batch {
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| Error::invalid_param("Invalid next_batch"))?,
            None => 0,
        };
        let limit = q.limit.unwrap_or(DEFAULT_RESULTS).clamp(1, MAX_RESULTS);
        let rooms: Vec<String> = self
            .store
            .user_memberships(session.user_id.as_str())
            .await?
            .into_iter()
            .filter(|m| m.membership == "join")
            .map(|m| m.room_id)
            .filter(|r| q.rooms.as_ref().is_none_or(|only| only.contains(r)))
            .filter(|r| !q.not_rooms.contains(r))
            .collect();
        let keys = if q.keys.is_empty() {
            vec![SearchKey::Body, SearchKey::Name, SearchKey::Topic]
        } else {
            q.keys.clone()
        };
        let (found, count) = self
            .store
            .search_events(&rooms, &query, &keys, q.by_rank, offset, limit)
            .await?;
        let next_batch =
            (offset + found.len() < count as usize && found.len() == limit).then(|| (offset + found.len()).to_string());
        let mut views: HashMap<String, Option<ReadView>> = HashMap::new();
        let mut results = Vec::new();
        for (event, rank) in found {
            if !views.contains_key(&event.room_id) {
                let view = self
                    .read_view(&session.user_id, &event.room_id)
                    .await
                    .ok()
                    .map(|(_, v)| v);
                views.insert(event.room_id.clone(), view);
            }
            let Some(Some(view)) = views.get(&event.room_id) else {
                continue;
            };
            let visible = |p: i64| p <= view.upto && view.visibility.can_see(p);
            if !visible(event.position) {
                continue;
            }
            let around = |dir: Direction, n: usize| {
                let (from, to) = match dir {
                    Direction::Backward => (event.position, 0),
                    Direction::Forward => (event.position, i64::MAX),
                };
                self.store.room_events(&event.room_id, from, to, dir, n)
            };
            let before_n = q.before_limit.min(MAX_CONTEXT);
            let after_n = q.after_limit.min(MAX_CONTEXT);
            let before = if before_n > 0 {
                around(Direction::Backward, before_n).await?
            } else {
                vec![]
            };
            let after = if after_n > 0 {
                around(Direction::Forward, after_n).await?
            } else {
                vec![]
            };
            let shown = |evs: &[weft_store::StoredEvent]| -> Vec<Value> {
                evs.iter()
                    .filter(|e| visible(e.position))
                    .map(|e| client_event(e, session))
                    .collect()
            };
            let context = json!({
                "events_before": shown(&before),
                "events_after": shown(&after),
                "start": crate::tokens::make_token(before.last().map_or(event.position, |e| e.position) - 1),
                "end": crate::tokens::make_token(after.last().map_or(event.position, |e| e.position)),
            });
            // FTS5's rank is lower for better matches; clients expect higher.
            results.push((-rank, client_event(&event, session), context));
        }
        Ok(SearchAnswer {
            count,
            results,
            next_batch,
            highlights,
        })
    }
}
