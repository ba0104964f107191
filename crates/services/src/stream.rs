//! Readers of the one ordered stream for the doors that push events to
//! subscribers (MQTT subscriptions, CoAP observers, WebSocket feeds): the
//! events of some rooms after a stream position, filtered by membership and
//! history visibility exactly as `/sync` and `/messages` are, and a waiting
//! variant that wakes on the store's position watch.

use std::time::Duration;

use ruma::{OwnedRoomId, UserId};
use weft_core::Result;
/// A persisted event, as stream readers get it.
pub use weft_store::StoredEvent;
use weft_store::{Direction, StreamKey};

use crate::Services;

/// Events read from the stream, oldest first, and where to continue.
#[derive(Debug, Default)]
pub struct Feed {
    pub events: Vec<StoredEvent>,
    /// Pass as `since` next time; every event up to it has been considered.
    pub next: i64,
}

impl Feed {
    /// The events as `session`'s device sees them: the client format, with
    /// its own transaction IDs.
    pub fn client_events(&self, session: &crate::Session) -> Vec<serde_json::Value> {
        let now = weft_core::now_ms();
        self.events.iter().map(|e| client_event_at(e, session, now)).collect()
    }
}

/// An event as `session`'s device sees it: the client format, with its own
/// transaction ID.
pub fn client_event(event: &StoredEvent, session: &crate::Session) -> serde_json::Value {
    client_event_at(event, session, weft_core::now_ms())
}

pub(crate) fn client_event_at(event: &StoredEvent, session: &crate::Session, now: u64) -> serde_json::Value {
    weft_rooms::client_event(event, Some((session.user_id.as_str(), session.device_id.as_str())), now)
}

impl Services {
    /// Events after `since` in `rooms` that `user` may see, oldest first,
    /// at most `limit`. Rooms the user may not read are skipped (a door
    /// checks access when subscribing; this keeps a later leave or ban
    /// effective).
    pub async fn room_events_after(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        since: i64,
        limit: usize,
    ) -> Result<Feed> {
        self.room_events_between(user, rooms, since, self.store.current_position(), limit)
            .await
    }

    /// [`Services::room_events_after`] up to the stream position `upto`.
    async fn room_events_between(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        since: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Feed> {
        let limit = limit.max(1);
        let mut merged: Vec<StoredEvent> = Vec::new();
        for room in rooms {
            let Ok((room_id, view)) = self.read_view(user, room.as_str()).await else {
                continue;
            };
            let bound = upto.min(view.upto);
            if bound <= since {
                continue;
            }
            let events = self
                .store
                .room_events(room_id.as_str(), since, bound + 1, Direction::Forward, limit)
                .await?;
            merged.extend(events.into_iter().filter(|e| view.visibility.can_see(e.position)));
        }
        merged.sort_by_key(|e| e.position);
        // Each room's list is complete up to its own last event, so the
        // first `limit` of the merge are complete up to the last one taken.
        let next = if merged.len() > limit {
            merged.truncate(limit);
            merged.last().map(|e| e.position).unwrap_or(upto)
        } else {
            upto.max(since)
        };
        Ok(Feed { events: merged, next })
    }

    /// Like [`Services::room_events_after`], but waits up to `timeout` for
    /// something to arrive when nothing is there yet.
    pub async fn wait_room_events(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        mut since: i64,
        limit: usize,
        timeout: Duration,
    ) -> Result<Feed> {
        let mut rx = self.store.subscribe_position();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let upto = *rx.borrow_and_update();
            if upto > since {
                // Only the rooms that changed are read (all of them if the
                // store no longer remembers what changed since `since`).
                let changed: Vec<OwnedRoomId> = match self.store.changes_since(since) {
                    None => rooms.to_vec(),
                    Some(changes) => rooms
                        .iter()
                        .filter(|x| {
                            changes
                                .iter()
                                .any(|(p, k)| *p <= upto && matches!(k, StreamKey::Room(r) if x.as_str() == r))
                        })
                        .cloned()
                        .collect(),
                };
                if changed.is_empty() {
                    since = upto;
                } else {
                    let feed = self.room_events_between(user, &changed, since, upto, limit).await?;
                    if !feed.events.is_empty() {
                        return Ok(feed);
                    }
                    since = feed.next;
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(Feed { events: vec![], next: since });
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(Feed { events: vec![], next: since }),
            }
        }
    }
}
