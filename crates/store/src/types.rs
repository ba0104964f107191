//! Plain records passed across the storage interface.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct NewUser {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub admin: bool,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub admin: bool,
    pub deactivated: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Copy)]
pub enum ProfileField {
    DisplayName,
    AvatarUrl,
}

#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub user_id: String,
    pub device_id: String,
}

/// A device's DTLS pre-shared key, found by its identity.
#[derive(Clone)]
pub struct PskOwner {
    pub user_id: String,
    pub device_id: String,
    pub psk: Vec<u8>,
}

impl std::fmt::Debug for PskOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskOwner")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ms: Option<u64>,
    /// The address the device last made an authenticated request from.
    pub last_seen_ip: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AccountDataRecord {
    pub room_id: Option<String>,
    pub data_type: String,
    pub content_json: String,
    pub position: i64,
}

/// One read receipt: `user_id` read up to `event_id` in `room_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    pub room_id: String,
    /// `m.read` or `m.read.private`.
    pub receipt_type: String,
    pub user_id: String,
    /// `""` for an unthreaded receipt, else `main` or a thread root's ID.
    pub thread_id: String,
    pub event_id: String,
    /// When it was sent (ms since the epoch).
    pub ts: u64,
    /// Its stream position (ignored when storing one).
    pub position: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// An event ready to be stored, with what it changes.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub room_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: u64,
    /// The full PDU as canonical JSON.
    pub pdu_json: String,
    /// Set on the create event: the room's row.
    pub new_room: Option<NewRoom>,
    /// For `m.room.member` events: the membership value.
    pub membership: Option<String>,
    /// For `m.room.history_visibility`: the visibility value.
    pub history_visibility: Option<String>,
    /// (device_id, txn_id) the sender used, for idempotent sends.
    pub txn: Option<(String, String)>,
    /// For redactions: the target event and its redacted PDU JSON.
    pub redaction: Option<(String, String)>,
    /// What `content.m.relates_to` names, if anything.
    pub relation: Option<Relation>,
    /// The text `/search` finds the event by: `content.body` of an
    /// `m.room.message`, `content.name` of `m.room.name`, `content.topic`
    /// of `m.room.topic`.
    pub search_text: Option<String>,
    /// The PDU's `prev_events` (its edges in the room's DAG). Must match
    /// `pdu_json`: the store reads an event's edges back from its PDU.
    pub prev_events: Vec<String>,
    /// The PDU's `auth_events` (read back from `pdu_json` likewise).
    pub auth_events: Vec<String>,
    /// The PDU's `depth`.
    pub depth: i64,
    /// Where the event goes in the room.
    pub kind: EventKind,
    /// The state groups of the room's state before and after the event
    /// (`None` for an outlier).
    pub state_before: Option<i64>,
    pub state_after: Option<i64>,
    /// State groups first used by this event, stored with it.
    pub new_groups: Vec<NewStateGroup>,
    /// How the room's current state changes with this event, if it does.
    pub current_state: Option<CurrentStateChange>,
    /// The room's forward extremities as its builder saw them (every one,
    /// not only the `prev_events`). When set, the store refuses the event
    /// with [`weft_core::ErrorKind::RoomMoved`] unless the room's stored
    /// extremities are exactly these, checked in the write itself: with
    /// several processes on one database, another may have written to
    /// the room since this one's view of it was made, and an event built
    /// on a stale view would fork the room's DAG and state.
    pub expect_extremities: Option<Vec<String>>,
    /// For a local event: how to build it again on the room as stored,
    /// should it be refused as [`NewEvent::room_moved`] (see [`Rebase`]
    /// and [`NewEvent::rebaseable`]).
    pub rebase: Option<Rebaser>,
}

/// Builds a local event again on other `prev_events`: new depth, hashes,
/// signature and event ID, the same content, sender, auth events and
/// timestamp. The store's writer asks it (PostgreSQL: under the
/// stream-head lock) when another writer moved the event's room on by
/// message events only (the room's state is the one the event was
/// authorized against: see [`NewEvent::rebaseable`]), so an event refused
/// once is never refused again: several processes sending to one room at
/// full speed cannot starve each other, nor starve a state event of
/// theirs.
pub trait Rebase: Send + Sync {
    /// `ev` built on `extremities` (the room's, every one; the greatest
    /// depth among them `max_depth`), or `None` if it cannot be.
    fn rebase(&self, ev: &NewEvent, extremities: &[String], max_depth: i64) -> Option<NewEvent>;
}

/// A hold on a room's state turn ([`crate::Store::room_turn`]): released
/// when dropped.
pub struct RoomTurn(pub Box<dyn Send + Sync>);

/// A shared [`Rebase`].
#[derive(Clone)]
pub struct Rebaser(pub std::sync::Arc<dyn Rebase>);

impl std::fmt::Debug for Rebaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rebaser")
    }
}

impl NewEvent {
    /// Whether the room's stored extremities (`stored`, the JSON array
    /// of `rooms.extremities`) are the ones this event expects: true when
    /// it expects none in particular.
    pub fn extremities_match(&self, stored: Option<&str>) -> bool {
        let Some(expected) = &self.expect_extremities else {
            return true;
        };
        let stored: Vec<String> = stored.and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
        stored.len() == expected.len() && expected.iter().all(|e| stored.contains(e))
    }

    /// Whether its `prev_events` are every extremity it expects (so a
    /// linear room's one-statement advance also proves the expectation).
    pub fn builds_on_all_expected(&self) -> bool {
        match &self.expect_extremities {
            None => true,
            Some(expected) => {
                expected.len() == self.prev_events.len() && expected.iter().all(|e| self.prev_events.contains(e))
            }
        }
    }

    /// Whether the writer may build it again on the room's extremities
    /// ([`Rebase`]) when it finds the room moved: a local timeline event
    /// on a room whose state group is still the one the event was
    /// authorized against (`current_group`), so only messages moved it.
    /// A state event may be too: its new state group and current-state
    /// change are renamed with it ([`NewEvent::rebased_on`]). (The writer
    /// also checks that every other event it names is stored:
    /// [`NewEvent::names`].)
    pub fn rebaseable(&self, current_group: Option<i64>) -> bool {
        let state = match &self.current_state {
            None => self.new_groups.is_empty() && self.state_after == self.state_before,
            Some(change) => self.state_key.is_some() && self.state_after == Some(change.group),
        };
        self.rebase.is_some()
            && self.kind == EventKind::Timeline
            && self.new_room.is_none()
            && self.state_before.is_some()
            && self.state_before == current_group
            && state
    }

    /// This event built again ([`Rebase`]) on the room as the writer read
    /// it: its extremities (`extremities`, the JSON array of
    /// `rooms.extremities`), its state group and the greatest depth among
    /// the extremities. `None` if it may not be ([`NewEvent::rebaseable`]).
    /// A state event's new groups and current-state change name it by its
    /// new ID.
    pub fn rebased_on(&self, extremities: &str, group: Option<i64>, max_depth: Option<i64>) -> Option<NewEvent> {
        let rebase = self.rebase.as_ref()?;
        if !self.rebaseable(group) {
            return None;
        }
        let extremities: Vec<String> = serde_json::from_str(extremities).ok()?;
        if extremities.is_empty() {
            return None;
        }
        let mut again = rebase.0.rebase(self, &extremities, max_depth?)?;
        let renamed = again.event_id.clone();
        let rename = |e: &mut (String, String, String)| {
            if e.2 == self.event_id {
                e.2.clone_from(&renamed);
            }
        };
        again
            .new_groups
            .iter_mut()
            .flat_map(|g| g.entries.iter_mut())
            .for_each(rename);
        if let Some(change) = again.current_state.as_mut() {
            change.changes.iter_mut().for_each(rename);
        }
        Some(again)
    }

    /// The other events it names as its auth events or in the state it
    /// makes (a snapshot group holds the whole state), which must be
    /// stored for it to be built again on the room as stored
    /// ([`NewEvent::rebased_on`]): one this process built on top of another
    /// of its events that was itself built again names that one's old ID,
    /// never stored, and goes back to its builder.
    pub fn names(&self) -> Vec<&str> {
        let state = self.new_groups.iter().flat_map(|g| &g.entries);
        let changes = self.current_state.iter().flat_map(|c| &c.changes);
        let mut ids: Vec<&str> = state
            .chain(changes)
            .map(|e| e.2.as_str())
            .chain(self.auth_events.iter().map(String::as_str))
            .filter(|id| *id != self.event_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The refusal of an event whose expected extremities moved.
    pub fn room_moved(&self) -> weft_core::Error {
        weft_core::Error::new(
            weft_core::ErrorKind::RoomMoved,
            format!("room {} was written to meanwhile; build the event again", self.room_id),
        )
    }
}

/// Where an event goes in its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A new event of the timeline: it gets the next stream position, and
    /// replaces its `prev_events` as a forward extremity. Every prev event
    /// must be stored already (or earlier in the same batch), so no event
    /// points at a parent that failed to commit.
    Timeline,
    /// A new event whose prev events may be missing (a remote event after
    /// a gap): as `Timeline` otherwise.
    TimelineAfterGap,
    /// An older event (backfill): a timeline event with a position below
    /// every stored one (the stream never announces it), no extremity. An
    /// event stored as an outlier moves to that position, off the outliers.
    Backfilled,
    /// Stored without the state before it (auth chains, a join's state):
    /// no timeline, no extremity.
    Outlier,
    /// Failed authorization: kept (so it is not fetched again), never
    /// served as timeline, never state.
    Rejected(String),
    /// Passed authorization at its own state but not at the room's
    /// current state: kept, not served, not an extremity.
    SoftFailed,
}

impl EventKind {
    /// Whether the event gets a place on the stream (a positive position).
    pub fn on_stream(&self) -> bool {
        matches!(self, EventKind::Timeline | EventKind::TimelineAfterGap)
    }
}

/// A state group to store: a delta on `prev_group`, or a snapshot.
#[derive(Debug, Clone)]
pub struct NewStateGroup {
    pub id: i64,
    pub prev_group: Option<i64>,
    /// Deltas down to the snapshot (0 for a snapshot).
    pub chain: i64,
    /// (type, state_key, event_id): what the group changes (a delta) or
    /// holds (a snapshot).
    pub entries: Vec<(String, String, String)>,
}

/// A change of a room's current state.
#[derive(Debug, Clone)]
pub struct CurrentStateChange {
    /// The group of the new current state.
    pub group: i64,
    /// The keys that now point at another event: (type, state_key,
    /// event_id). The event is this one, or one stored before.
    pub changes: Vec<(String, String, String)>,
}

#[derive(Debug, Clone)]
pub struct NewRoom {
    pub room_version: String,
    pub creator: String,
}

/// A stored event.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub position: i64,
    pub event_id: String,
    pub room_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: u64,
    pub pdu_json: String,
    /// Event ID of the redaction that redacted it, if any.
    pub redacted_by: Option<String>,
    /// (device_id, txn_id) of the sending device, if sent with one.
    pub txn: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct RoomRecord {
    pub room_id: String,
    pub room_version: String,
    pub creator: String,
}

#[derive(Debug, Clone)]
pub struct MembershipRecord {
    pub room_id: String,
    pub membership: String,
    pub event_id: String,
    pub position: i64,
}

#[derive(Debug, Clone)]
pub struct AliasRecord {
    pub alias: String,
    pub room_id: String,
    pub creator: String,
}

/// What a stream position touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKey {
    /// An event in this room.
    Room(String),
    /// The current state of this room changed (with the event at this
    /// position, besides its `Room` key).
    State(String),
    /// Something for this user: account data, a membership change of them,
    /// or a to-device message for one of their devices.
    User(String),
    /// This user's device list changed (device keys uploaded or removed).
    DeviceKeys(String),
    /// A read receipt in this room was set (no new event).
    Receipt(String),
    /// A notification row for this user (first) in this room (second) was
    /// added: their unread counts there changed.
    Notification(String, String),
    /// Who types in this room changed (started, stopped, timed out, left).
    Typing(String),
    /// This user's presence changed.
    Presence(String),
    /// Rows were queued for this federation destination by someone other
    /// than the outgoing queue's reader, or it came back after failures:
    /// wakes its sender on whichever process leads (docs/scale-out.md).
    Outbox(String),
    /// Credentials of this user were revoked (a device deleted or logged
    /// out, the user deactivated, a device's pre-shared key replaced):
    /// open connections of the user on every process check theirs again.
    Revoked(String),
    /// The MQTT client (first: `USER\nCLIENT_ID`) was claimed by a new
    /// connection (second: `+OWNER`), whose process's broker is the only
    /// one that may keep a connection for it, or the connection `OWNER`
    /// ended and saved its session (second: `-OWNER`).
    MqttClient(String, String),
}

/// A user's presence as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    pub user_id: String,
    /// `online`, `unavailable` or `offline`.
    pub presence: String,
    pub status_msg: Option<String>,
    /// When the user last did something (ms since the epoch).
    pub last_active_ms: u64,
    /// Past this (ms since the epoch) without a sync the user goes
    /// offline; 0: no such deadline.
    pub online_until_ms: u64,
    /// The stream position of its last change (ignored when storing).
    pub position: i64,
}

/// Keys a device uploads in one `/keys/upload`.
#[derive(Debug, Clone, Default)]
pub struct KeyUpload {
    /// The device keys object as JSON, if uploaded.
    pub device_keys: Option<String>,
    /// One-time keys: (key ID "algorithm:id", key JSON).
    pub one_time_keys: Vec<(String, String)>,
    /// Fallback keys: (key ID "algorithm:id", key JSON).
    pub fallback_keys: Vec<(String, String)>,
}

/// The stored device keys of one device.
#[derive(Debug, Clone)]
pub struct DeviceKeysRecord {
    pub user_id: String,
    pub device_id: String,
    /// The JSON exactly as uploaded.
    pub keys_json: String,
    /// The device's display name (from the devices table), if any.
    pub display_name: Option<String>,
}

/// A key handed out by a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    pub user_id: String,
    pub device_id: String,
    /// "algorithm:id".
    pub key_id: String,
    pub key_json: String,
}

/// Which devices of a user a to-device message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    One(String),
    /// Every device the user has when the message is stored (`"*"`).
    All,
}

/// One to-device message to store.
#[derive(Debug, Clone)]
pub struct NewToDevice {
    pub user_id: String,
    pub target: DeviceTarget,
    pub content_json: String,
}

/// A pending to-device message for one device.
#[derive(Debug, Clone)]
pub struct ToDeviceMessage {
    pub position: i64,
    pub sender: String,
    pub event_type: String,
    pub content_json: String,
}

/// One signature uploaded for a key: the target key (a device ID, or a
/// cross-signing key's public key) of `target_user`, signed by
/// `signer_user`'s key `signer_key` ("ed25519:…").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySignature {
    pub target_user: String,
    pub target_key: String,
    pub signer_user: String,
    pub signer_key: String,
    pub signature: String,
}

/// One key-backup version of a user.
#[derive(Clone, Debug)]
pub struct BackupVersion {
    pub version: i64,
    /// `{"algorithm": …, "auth_data": …}` as the client sent it.
    pub algorithm_json: String,
    pub etag: i64,
    /// How many keys the version holds.
    pub count: u64,
}

/// One backed-up Megolm session.
#[derive(Clone, Debug)]
pub struct BackupKey {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    /// The client's `KeyBackupData` verbatim.
    pub key_json: String,
}

/// The answer to a write of backup keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupWrite {
    /// Written (or nothing to change): the version's etag and key count.
    Done { etag: i64, count: u64 },
    /// The version named is not the current one (`None`: there is none).
    WrongVersion { current: Option<i64> },
}

/// A report of an event (`room_id` and `event_id`) or of a user
/// (`target_user`). `id` is set by the store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub id: i64,
    pub reporter: String,
    pub room_id: Option<String>,
    pub event_id: Option<String>,
    pub target_user: Option<String>,
    pub reason: Option<String>,
    pub received_ms: u64,
}

/// What an event's `m.relates_to` says: how it relates to which event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub rel_type: String,
    pub parent_event_id: String,
}

/// A thread: its root event, its replies' count, the newest reply's
/// position, and whether a given user wrote the root or a reply.
#[derive(Clone, Debug)]
pub struct ThreadRecord {
    pub root: StoredEvent,
    pub count: u64,
    pub latest_position: i64,
    pub participated: bool,
}

/// Where `/search` looks (`keys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchKey {
    Body,
    Name,
    Topic,
}

/// A notification row to add: the push rules of `user_id` say the event
/// notifies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNotification {
    pub user_id: String,
    pub room_id: String,
    pub event_id: String,
    /// The event's stream position.
    pub event_position: i64,
    /// `main`, or the thread root's event ID; `""` for an invite of the
    /// user (not counted as unread).
    pub thread_id: String,
    /// The push rule's actions, as JSON.
    pub actions_json: String,
    pub highlight: bool,
    /// When the event was sent (ms since the epoch).
    pub ts: u64,
}

/// A stored notification row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationRecord {
    /// Its own stream position.
    pub position: i64,
    pub user_id: String,
    pub room_id: String,
    pub event_id: String,
    pub event_position: i64,
    pub thread_id: String,
    pub actions_json: String,
    pub highlight: bool,
    pub ts: u64,
    /// Whether the user has read receipts at or after the event (for its
    /// thread, or unthreaded).
    pub read: bool,
}

/// Unread notifications of one thread (`main` for the main timeline) of a
/// room: rows after the user's newest `m.read`/`m.read.private` receipt
/// that applies (unthreaded, or of that thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadCount {
    pub room_id: String,
    pub thread_id: String,
    pub notifications: u64,
    pub highlights: u64,
}

/// An HTTP pusher of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PusherRecord {
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
    /// The spec's Pusher object as the client set it.
    pub pusher_json: String,
    /// When the pushkey was set (ms since the epoch).
    pub pushkey_ts: u64,
    /// The last notification row position delivered (or given up on).
    pub last_sent: i64,
    /// The stream position when the pusher was added (set by the store):
    /// notifications of events up to it are not for this pusher.
    pub from_event: i64,
}
