//! Relations between events (`m.relates_to`): the events relating to one
//! (`/rooms/{id}/relations/{eventId}[/{relType}[/{eventType}]]`) and a
//! room's threads (`/rooms/{id}/threads`). Both answer only what the
//! caller may see of the room, like `/messages`.

use serde_json::{Value, json};
use weft_core::Result;
use weft_store::Direction;

use crate::stream::client_event;
use crate::tokens::{make_token, parse_token};
use crate::{Services, Session};

/// The most events one page returns; also the default.
pub const MAX_PAGE: usize = 100;
const DEFAULT_PAGE: usize = 50;

/// A page of related events.
#[derive(Debug, Clone)]
pub struct RelationsPage {
    pub chunk: Vec<Value>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
}

/// What a relations request asks for.
#[derive(Debug, Clone, Default)]
pub struct RelationsQuery<'a> {
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    /// Oldest first; the default is newest first.
    pub forward: bool,
    pub limit: Option<usize>,
}

fn page_size(limit: Option<usize>) -> usize {
    limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
}

impl Services {
    /// The events relating to `event_id` that the caller may see.
    /// `404 M_NOT_FOUND` if the caller cannot see that event.
    pub async fn relations(
        &self,
        session: &Session,
        room: &str,
        event_id: &str,
        q: RelationsQuery<'_>,
    ) -> Result<RelationsPage> {
        // The parent must be visible; the answer is the same whether it
        // does not exist or is hidden.
        self.event(session, room, event_id).await?;
        let (room_id, view) = self.read_view(&session.user_id, room).await?;
        let limit = page_size(q.limit);
        let dir = if q.forward {
            Direction::Forward
        } else {
            Direction::Backward
        };
        let from = match q.from {
            Some(t) => parse_token(t)?,
            None if q.forward => 0,
            None => i64::MAX,
        };
        let to = match q.to {
            Some(t) => parse_token(t)?,
            None if q.forward => i64::MAX,
            None => 0,
        };
        let found = self
            .store
            .relations(
                room_id.as_str(),
                event_id,
                q.rel_type,
                q.event_type,
                from,
                to,
                dir,
                limit,
            )
            .await?;
        let full = found.len() == limit;
        let last = found.last().map(|e| e.position);
        let chunk = found
            .iter()
            .filter(|e| e.position <= view.upto && view.visibility.can_see(e.position))
            .map(|e| client_event(e, session))
            .collect();
        // A token stands between positions: the next page continues past
        // the last event of this one.
        let next_batch = if full { last.map(make_token) } else { None };
        Ok(RelationsPage {
            chunk,
            next_batch,
            prev_batch: q.from.map(str::to_owned),
        })
    }

    /// A room's threads, newest reply first: each root event with its
    /// thread summary in `unsigned["m.relations"]["m.thread"]` (newest
    /// reply, reply count, whether the caller took part).
    pub async fn threads(
        &self,
        session: &Session,
        room: &str,
        only_participated: bool,
        from: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<Value>, Option<String>)> {
        let (room_id, view) = self.read_view(&session.user_id, room).await?;
        let limit = page_size(limit);
        let before = match from {
            Some(t) => parse_token(t)?,
            None => i64::MAX,
        };
        let user = session.user_id.as_str();
        let threads = self
            .store
            .threads(room_id.as_str(), user, only_participated, before, limit)
            .await?;
        let full = threads.len() == limit;
        let next = threads.last().map(|t| make_token(t.latest_position));
        let mut chunk = Vec::new();
        for t in threads {
            let visible = |p: i64| p <= view.upto && view.visibility.can_see(p);
            if !visible(t.root.position) {
                continue;
            }
            let latest = self
                .store
                .relations(
                    room_id.as_str(),
                    &t.root.event_id,
                    Some("m.thread"),
                    None,
                    t.latest_position + 1,
                    0,
                    Direction::Backward,
                    1,
                )
                .await?;
            let Some(latest) = latest.into_iter().find(|e| visible(e.position)) else {
                continue;
            };
            let mut root = client_event(&t.root, session);
            root["unsigned"]["m.relations"]["m.thread"] = json!({
                "latest_event": client_event(&latest, session),
                "count": t.count,
                "current_user_participated": t.participated,
            });
            chunk.push(root);
        }
        Ok((chunk, if full { next } else { None }))
    }
}
