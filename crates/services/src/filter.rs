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
}

/// The sync `Filter` object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SyncFilter {
    pub room: RoomFilter,
    pub account_data: EventFilter,
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
