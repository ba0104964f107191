//! Query: what a room's DAG holds, as other servers ask for it (the state
//! and auth chain at an event, history before some events, the events
//! between two points), and which servers may see what.

use std::collections::{BTreeSet, BinaryHeap, HashSet};

use ruma::{EventId, OwnedEventId, OwnedServerName, RoomId, ServerName, UserId};
use weft_core::{Error, Result};
use weft_store::StoredEvent;

use crate::Rooms;

/// Most events one `/backfill` or `/get_missing_events` answers.
pub const MAX_HISTORY_EVENTS: usize = 100;

impl Rooms {
    /// An event of `room_id` that is part of its DAG (not an outlier, not
    /// rejected); `M_NOT_FOUND` otherwise.
    async fn dag_event(&self, room_id: &RoomId, event_id: &EventId) -> Result<weft_store::EventPlace> {
        match self.store.event_place(event_id.as_str()).await? {
            Some(p) if p.room_id == room_id.as_str() && !p.outlier && p.rejected.is_none() => Ok(p),
            _ => Err(Error::not_found("Unknown event")),
        }
    }

    /// The state before `event_id` and the auth chain of that state
    /// (`/state_ids`, `/state`).
    pub async fn state_ids_at(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        let place = self.dag_event(room_id, event_id).await?;
        let state: Vec<OwnedEventId> = match place.state_before {
            Some(g) => self.group_ids(g).await?.into_values().collect(),
            // The create event: nothing before it.
            None => Vec::new(),
        };
        let chain = self.auth_chain_ids(&state).await?;
        Ok((state, chain))
    }

    /// The auth chain of `events` (every event reached through
    /// `auth_events`, not the events themselves).
    pub async fn auth_chain_ids(&self, events: &[OwnedEventId]) -> Result<Vec<OwnedEventId>> {
        let chain = self
            .store
            .auth_chain(events.iter().map(|e| e.to_string()).collect())
            .await?;
        Ok(chain
            .into_iter()
            .filter_map(|id| OwnedEventId::try_from(id).ok())
            .collect())
    }

    /// The auth chain of one event of the room (`/event_auth`).
    pub async fn event_auth(&self, room_id: &RoomId, event_id: &EventId) -> Result<Vec<OwnedEventId>> {
        match self.store.event_place(event_id.as_str()).await? {
            Some(p) if p.room_id == room_id.as_str() => self.auth_chain_ids(&[event_id.to_owned()]).await,
            _ => Err(Error::not_found("Unknown event")),
        }
    }

    /// Stored events by ID (as stored, with their PDU JSON).
    pub async fn events_by_id(&self, ids: &[OwnedEventId]) -> Result<Vec<StoredEvent>> {
        self.store
            .events_by_id(ids.iter().map(|e| e.to_string()).collect())
            .await
    }

    /// History before and including `from` (`/backfill`): walks prev
    /// events, deepest first, at most `limit`.
    pub async fn backfill(&self, room_id: &RoomId, from: &[OwnedEventId], limit: usize) -> Result<Vec<StoredEvent>> {
        let limit = limit.min(MAX_HISTORY_EVENTS);
        let mut heap: BinaryHeap<(i64, OwnedEventId)> = BinaryHeap::new();
        let mut seen = HashSet::new();
        for id in from {
            if let Ok(p) = self.dag_event(room_id, id).await
                && seen.insert(id.clone())
            {
                heap.push((p.depth, id.clone()));
            }
        }
        let mut out = Vec::new();
        while let Some((_, id)) = heap.pop() {
            if out.len() >= limit {
                break;
            }
            out.push(id.clone());
            for prev in self.store.prev_events(id.as_str()).await? {
                let Ok(prev) = OwnedEventId::try_from(prev) else {
                    continue;
                };
                if seen.insert(prev.clone())
                    && let Ok(p) = self.dag_event(room_id, &prev).await
                {
                    heap.push((p.depth, prev));
                }
            }
        }
        self.in_order(out).await
    }

    /// The events before `latest` that are not before or among `earliest`
    /// (`/get_missing_events`): walks prev events breadth first, at most
    /// `limit`, none shallower than `min_depth`; oldest first.
    pub async fn missing_events(
        &self,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: i64,
    ) -> Result<Vec<StoredEvent>> {
        let limit = limit.min(MAX_HISTORY_EVENTS);
        let stop: HashSet<&OwnedEventId> = earliest.iter().collect();
        let mut seen: HashSet<OwnedEventId> = latest.iter().cloned().collect();
        let mut frontier: Vec<OwnedEventId> = latest.to_vec();
        let mut out = Vec::new();
        while !frontier.is_empty() && out.len() < limit {
            let mut next = Vec::new();
            for id in frontier {
                for prev in self.store.prev_events(id.as_str()).await? {
                    let Ok(prev) = OwnedEventId::try_from(prev) else {
                        continue;
                    };
                    if stop.contains(&prev) || !seen.insert(prev.clone()) {
                        continue;
                    }
                    let Ok(p) = self.dag_event(room_id, &prev).await else {
                        continue;
                    };
                    if p.depth < min_depth || out.len() >= limit {
                        continue;
                    }
                    out.push(prev.clone());
                    next.push(prev);
                }
            }
            frontier = next;
        }
        let mut events = self.in_order(out).await?;
        events.reverse();
        Ok(events)
    }

    /// Events by ID, deepest first.
    async fn in_order(&self, ids: Vec<OwnedEventId>) -> Result<Vec<StoredEvent>> {
        let mut events = Vec::new();
        for ev in self.events_by_id(&ids).await? {
            // The depth is the PDU's own: no second read per event.
            let depth = crate::parse_stored(&ev).map(|p| p.depth).unwrap_or_default();
            events.push((depth, ev));
        }
        events.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.position.cmp(&a.1.position)));
        Ok(events.into_iter().map(|(_, e)| e).collect())
    }

    /// The servers with a joined member in the room now (ours included).
    pub async fn servers_in_room(&self, room_id: &RoomId) -> Result<BTreeSet<OwnedServerName>> {
        self.with_view(room_id, |c| c.joined_servers.keys().cloned().collect())
            .await
    }

    /// Whether `server` has a joined member in the room now.
    pub async fn server_in_room(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        Ok(self.servers_in_room(room_id).await?.contains(server))
    }

    /// Whether `server` may see an event, by the history visibility at it
    /// and its users' memberships there (world_readable and shared: any
    /// server in the room; invited: one with a member invited or joined at
    /// the event; joined: one with a member joined at it).
    pub async fn server_can_see(&self, room_id: &RoomId, event_id: &EventId, server: &ServerName) -> Result<bool> {
        let place = self.dag_event(room_id, event_id).await?;
        let Some(group) = place.state_before else {
            return Ok(true); // the create event
        };
        let state = self.group_ids(group).await?;
        // Only the visibility and this server's members matter.
        let wanted: Vec<OwnedEventId> = state
            .iter()
            .filter(|((t, k), _)| {
                t == "m.room.history_visibility"
                    || (t == "m.room.member" && UserId::parse(k).map(|u| u.server_name() == server).unwrap_or(false))
            })
            .map(|(_, id)| id.clone())
            .collect();
        let mut visibility = "shared".to_owned();
        let mut memberships = Vec::new();
        for ev in self.events_by_id(&wanted).await? {
            let p = crate::parse_stored(&ev)?;
            if ev.event_type == "m.room.history_visibility" {
                if let Some(v) = serde_json::from_str::<serde_json::Value>(p.content.get())
                    .ok()
                    .and_then(|c| c["history_visibility"].as_str().map(str::to_owned))
                {
                    visibility = v;
                }
            } else {
                memberships.extend(membership_of(&p));
            }
        }
        if visibility == "world_readable" || visibility == "shared" {
            return Ok(true);
        }
        Ok(memberships
            .iter()
            .any(|m| m == "join" || (m == "invite" && visibility == "invited")))
    }
}

/// The `membership` of a member event's content.
pub(crate) fn membership_of(p: &crate::Pdu) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(p.content.get())
        .ok()
        .and_then(|c| c["membership"].as_str().map(str::to_owned))
}
