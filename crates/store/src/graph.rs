//! Reads of the room DAG: forward extremities, state groups, and the
//! places events hold in their rooms (docs/design-federation.md). Written
//! only by the event write path ([`crate::Store::persist_event`]).

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::Result;

/// A state: (type, state_key) → event ID.
pub type StateMap = BTreeMap<(String, String), String>;

/// Where a stored event stands in its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPlace {
    pub room_id: String,
    pub position: i64,
    pub depth: i64,
    pub outlier: bool,
    /// Why it was rejected, if it was.
    pub rejected: Option<String>,
    pub soft_failed: bool,
    pub state_before: Option<i64>,
    pub state_after: Option<i64>,
}

#[async_trait]
pub trait RoomGraphStore: Send + Sync {
    /// The highest state group ID in use (0 when there is none).
    async fn max_state_group(&self) -> Result<i64>;
    /// `n` new state group IDs no other caller (in this process or, on
    /// PostgreSQL, any process on the database) is given.
    async fn reserve_state_groups(&self, n: i64) -> Result<Vec<i64>>;
    /// A room's forward extremities with their depths, deepest first.
    async fn extremities(&self, room_id: &str) -> Result<Vec<(String, i64)>>;
    /// The group of a room's current state, with its chain length.
    async fn room_state_group(&self, room_id: &str) -> Result<Option<(i64, i64)>>;
    /// The full state a group holds.
    async fn state_group(&self, group: i64) -> Result<StateMap>;
    /// Where an event stands, if it is stored.
    async fn event_place(&self, event_id: &str) -> Result<Option<EventPlace>>;
    /// A group's chain of deltas, if the group exists.
    async fn state_group_chain(&self, group: i64) -> Result<Option<i64>>;
    /// The auth chain of events: every event reached by following
    /// `auth_events` from them (not the events themselves), as far as
    /// stored.
    async fn auth_chain(&self, event_ids: Vec<String>) -> Result<Vec<String>>;
    /// The stored events among `event_ids`, in any order.
    async fn events_by_id(&self, event_ids: Vec<String>) -> Result<Vec<crate::StoredEvent>>;
    /// The IDs of an event's prev events (its DAG edges).
    async fn prev_events(&self, event_id: &str) -> Result<Vec<String>>;
    /// A local user's membership in a room this server is not in (an
    /// invite from another server, or its refusal): `event` is stored as
    /// an outlier and the user's membership changes at a new stream
    /// position, so `/sync` shows it; an invite keeps the room's stripped
    /// state (`stripped_state`, a JSON array) for the invited user.
    fn remote_membership(
        &self,
        event: crate::NewEvent,
        user_id: String,
        membership: String,
        stripped_state: Option<String>,
    ) -> crate::Pending<i64>;
    /// The stripped state kept with a remote invite.
    async fn remote_invite_state(&self, room_id: &str, user_id: &str) -> Result<Option<String>>;
}
