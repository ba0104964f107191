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
    /// Ephemeral events (typing, receipts) in the same window, oldest
    /// first, when asked for ([`Services::wait_room_feed`]).
    pub ephemeral: Vec<EphemeralItem>,
    /// Pass as `since` next time; every event up to it has been considered.
    pub next: i64,
}

/// An ephemeral event of a room at a stream position: `m.typing` (the
/// room's full list of typers after a change) or `m.receipt` (one
/// receipt), in the Client-Server format with `room_id`.
#[derive(Debug, Clone)]
pub struct EphemeralItem {
    pub position: i64,
    pub room_id: String,
    pub event: serde_json::Value,
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
    /// What the stream positions in (`seen`, `upto`] carried that `pick`
    /// picks, in stream order: `None` when this process's record of the
    /// stream no longer reaches back to `seen` (the caller asks the
    /// database instead). The followers of the stream (revocations, the
    /// federation queue, push, MQTT claims) read their keys through it.
    pub(crate) fn stream_keys<T>(
        &self,
        seen: i64,
        upto: i64,
        mut pick: impl FnMut(StreamKey) -> Option<T>,
    ) -> Option<Vec<T>> {
        Some(
            self.store
                .changes_since(seen)?
                .into_iter()
                .filter(|(p, _)| *p <= upto)
                .filter_map(|(_, k)| pick(k))
                .collect(),
        )
    }

    /// Whether a position in (`seen`, `upto`] carried a key `pred` takes,
    /// true when this process's record no longer reaches back to `seen`.
    pub(crate) fn stream_touched(&self, seen: i64, upto: i64, mut pred: impl FnMut(&StreamKey) -> bool) -> bool {
        self.store.any_change(seen, upto, &mut pred).unwrap_or(true)
    }

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
        self.room_events_between(user, rooms, since, self.store.current_position(), limit, false)
            .await
    }

    /// [`Services::room_events_after`] with the rooms' ephemeral events
    /// (typing changes, receipts the user may see) too.
    pub async fn room_feed_after(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        since: i64,
        limit: usize,
    ) -> Result<Feed> {
        self.room_events_between(user, rooms, since, self.store.current_position(), limit, true)
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
        with_ephemeral: bool,
    ) -> Result<Feed> {
        let limit = limit.max(1);
        let mut merged: Vec<StoredEvent> = Vec::new();
        // (room, how far the user may read it)
        let mut readable: Vec<(String, i64)> = Vec::new();
        for room in rooms {
            let Ok((room_id, view)) = self.read_view(user, room.as_str()).await else {
                continue;
            };
            let bound = upto.min(view.upto);
            if bound <= since {
                continue;
            }
            readable.push((room_id.to_string(), bound));
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
        let ephemeral = if with_ephemeral {
            self.ephemeral_between(user.as_str(), &readable, since, next).await?
        } else {
            Vec::new()
        };
        Ok(Feed {
            events: merged,
            ephemeral,
            next,
        })
    }

    /// The ephemeral events of `rooms` (each up to its bound) in
    /// (since, upto]: every receipt `user` may see, one `m.receipt` each,
    /// and the room's current typers if they changed; oldest first.
    async fn ephemeral_between(
        &self,
        user: &str,
        rooms: &[(String, i64)],
        since: i64,
        upto: i64,
    ) -> Result<Vec<EphemeralItem>> {
        let mut out = Vec::new();
        let now = weft_core::now_ms();
        for (room, bound) in rooms {
            let bound = upto.min(*bound);
            for r in self.store.receipts_since(room, since, bound).await? {
                if r.receipt_type == crate::ephemeral::RECEIPT_READ_PRIVATE && r.user_id != user {
                    continue;
                }
                let mut receipt = serde_json::json!({ "ts": r.ts });
                if !r.thread_id.is_empty() {
                    receipt["thread_id"] = serde_json::json!(r.thread_id);
                }
                let mut content = serde_json::json!({});
                content[r.event_id.as_str()][r.receipt_type.as_str()][r.user_id.as_str()] = receipt;
                out.push(EphemeralItem {
                    position: r.position,
                    room_id: room.clone(),
                    event: serde_json::json!({ "type": "m.receipt", "room_id": room, "content": content }),
                });
            }
            let (users, position) = self.store.typing(room, now).await?;
            if position > since && position <= bound {
                out.push(EphemeralItem {
                    position,
                    room_id: room.clone(),
                    event: serde_json::json!({
                        "type": "m.typing",
                        "room_id": room,
                        "content": { "user_ids": users },
                    }),
                });
            }
        }
        out.sort_by_key(|e| e.position);
        Ok(out)
    }

    /// Like [`Services::room_events_after`], but waits up to `timeout` for
    /// something to arrive when nothing is there yet.
    pub async fn wait_room_events(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        since: i64,
        limit: usize,
        timeout: Duration,
    ) -> Result<Feed> {
        self.wait_feed(user, rooms, since, limit, timeout, false).await
    }

    /// [`Services::wait_room_events`] with the rooms' ephemeral events
    /// (typing changes, receipts the user may see) too: it also returns
    /// when only those arrived.
    pub async fn wait_room_feed(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        since: i64,
        limit: usize,
        timeout: Duration,
    ) -> Result<Feed> {
        self.wait_feed(user, rooms, since, limit, timeout, true).await
    }

    async fn wait_feed(
        &self,
        user: &UserId,
        rooms: &[OwnedRoomId],
        mut since: i64,
        limit: usize,
        timeout: Duration,
        with_ephemeral: bool,
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
                            changes.iter().any(|(p, k)| {
                                *p <= upto
                                    && match k {
                                        StreamKey::Room(r) => x.as_str() == r,
                                        StreamKey::Typing(r) | StreamKey::Receipt(r) => {
                                            with_ephemeral && x.as_str() == r
                                        }
                                        _ => false,
                                    }
                            })
                        })
                        .cloned()
                        .collect(),
                };
                if changed.is_empty() {
                    since = upto;
                } else {
                    let feed = self
                        .room_events_between(user, &changed, since, upto, limit, with_ephemeral)
                        .await?;
                    if !feed.events.is_empty() || !feed.ephemeral.is_empty() {
                        return Ok(feed);
                    }
                    since = feed.next;
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(Feed { next: since, ..Feed::default() });
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(Feed { next: since, ..Feed::default() }),
            }
        }
    }
}
