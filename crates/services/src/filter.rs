//! Event and sync filters (the `filter` of `/sync`, `/messages` and
//! `/context`, and stored filters).

use serde::Deserialize;
use serde_json::Value;
use weft_core::{Error, Result};
use weft_store::StoredEvent;

/// A `RoomEventFilter` (the parts Weft applies).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    pub limit: Option<usize>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub lazy_load_members: bool,
    /// Unread counts per thread (`unread_thread_notifications` in /sync).
    pub unread_thread_notifications: bool,
}

fn glob_match(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

impl EventFilter {
    pub fn matches(&self, ev: &StoredEvent) -> bool {
        if let Some(types) = &self.types
            && !types.iter().any(|t| glob_match(t, &ev.event_type))
        {
            return false;
        }
        if self.not_types.iter().any(|t| glob_match(t, &ev.event_type)) {
            return false;
        }
        if let Some(s) = &self.senders
            && !s.iter().any(|s| s == &ev.sender)
        {
            return false;
        }
        if self.not_senders.iter().any(|s| s == &ev.sender) {
            return false;
        }
        self.room_allowed(&ev.room_id)
    }

    /// For events that are not stored (ephemeral events, presence): the
    /// event type, the sender if it has one, the room if it is in one.
    pub fn matches_parts(&self, event_type: &str, sender: Option<&str>, room_id: Option<&str>) -> bool {
        if let Some(types) = &self.types
            && !types.iter().any(|t| glob_match(t, event_type))
        {
            return false;
        }
        if self.not_types.iter().any(|t| glob_match(t, event_type)) {
            return false;
        }
        if let Some(sender) = sender {
            if let Some(s) = &self.senders
                && !s.iter().any(|s| s == sender)
            {
                return false;
            }
            if self.not_senders.iter().any(|s| s == sender) {
                return false;
            }
        }
        room_id.is_none_or(|r| self.room_allowed(r))
    }

    /// Keeps the events (JSON with `type` and maybe `sender`) this filter
    /// lets through, at most `limit` of them.
    pub fn apply(&self, events: Vec<serde_json::Value>, room_id: Option<&str>) -> Vec<serde_json::Value> {
        let mut kept: Vec<serde_json::Value> = events
            .into_iter()
            .filter(|e| {
                self.matches_parts(
                    e["type"].as_str().unwrap_or_default(),
                    e.get("sender").and_then(serde_json::Value::as_str),
                    room_id,
                )
            })
            .collect();
        if let Some(limit) = self.limit {
            kept.truncate(limit);
        }
        kept
    }

    pub fn room_allowed(&self, room_id: &str) -> bool {
        self.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room_id))
            && !self.not_rooms.iter().any(|x| x == room_id)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub account_data: EventFilter,
    /// `m.typing` and `m.receipt` in a joined room's `ephemeral`.
    pub ephemeral: EventFilter,
}

/// The sync `Filter` object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SyncFilter {
    pub room: RoomFilter,
    pub account_data: EventFilter,
    /// The top-level `presence` events.
    pub presence: EventFilter,
}

impl SyncFilter {
    /// Parses a filter body, refusing anything that is not a filter object.
    pub fn parse(value: Value) -> Result<Self> {
        serde_json::from_value(value).map_err(|e| Error::bad_json(format!("Invalid filter: {e}")))
    }

    pub(crate) fn room_allowed(&self, room_id: &str) -> bool {
        self.room.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room_id))
            && !self.room.not_rooms.iter().any(|x| x == room_id)
    }
}
