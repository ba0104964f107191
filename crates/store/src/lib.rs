//! Storage for Weft: the [`Store`] interface every other crate uses, and its
//! backends (SQLite, embedded, the default). No SQL exists outside this
//! crate. See `README.md` beside this file for the tables and why.
//!
//! Contract of the write path: writes are queued to one writer which commits
//! them in batches (group commit: many events, one transaction, one fsync).
//! Writes enqueued in order are committed in that order, and each persisted
//! event and account-data change gets the next position of one server-wide
//! stream. A position is only published to readers once every write up to it
//! is durable.

mod appservice;
mod e2ee;
mod federation;
mod federation_queue;
mod graph;
mod media;
pub mod migrate;
mod pg;
mod sqlite;
mod stream;
mod types;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;
pub use weft_core::Result;

/// A new [`Store::process_tag`]: 16 hex digits from the process's random
/// hash seed, its ID and the time (a name, not a secret).
pub fn process_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(weft_core::now_ms());
    format!("{:016x}", h.finish())
}

pub use appservice::*;
pub use e2ee::*;
pub use federation::*;
pub use federation_queue::*;
pub use graph::*;
pub use media::*;
pub use pg::testing as pg_testing;
pub use pg::{PgStore, pg_schema_version};
pub use sqlite::SqliteStore;
pub(crate) use stream::{RecentChanges, WriterCtx};
pub use types::*;

/// A queued write, resolved once it is durable.
pub type Pending<T> = oneshot::Receiver<Result<T>>;

/// See [`Store::on_foreign_room_writes`].
pub type ForeignRoomsHook = Box<dyn Fn(&[&str]) + Send + Sync>;

/// What [`Store::edit_account_data`] makes of stored account data: the new
/// content (JSON text) from the old one. It runs on the writer, so it must
/// be quick and must not wait for anything.
/// What [`Store::edit_presence`] makes of a user's stored presence: the
/// record to store and whether it is a change others are told of (a new
/// stream position), or `None` to leave it. Runs on the writer: quick, no
/// waiting.
pub type PresenceEdit = Box<dyn FnOnce(Option<PresenceRecord>) -> Option<(PresenceRecord, bool)> + Send>;

pub type AccountDataEdit = Box<dyn FnOnce(Option<String>) -> Result<String> + Send>;

/// The storage interface. Positions (`i64`) are positions in the one
/// server-wide stream.
#[async_trait]
pub trait Store:
    MediaStore
    + FederationStore
    + FederationQueueStore
    + E2eeFederationStore
    + RoomGraphStore
    + AppserviceStore
    + Send
    + Sync
    + 'static
{
    // ---- stream ----
    /// Highest durable stream position.
    fn current_position(&self) -> i64;
    /// A name of this process's store, unique among the processes on one
    /// database ([`process_tag`]): on PostgreSQL every connection of the
    /// store carries it (`application_name` `weft TAG`), so another
    /// process can tell whether this one is still there.
    fn process_tag(&self) -> &str;
    /// A receiver that changes whenever the durable stream position advances.
    fn subscribe_position(&self) -> tokio::sync::watch::Receiver<i64>;
    /// What the stream carried after `since`, from memory: which rooms and
    /// users each position touched. `None` when `since` is older than what
    /// is kept (callers then treat everything as changed).
    fn changes_since(&self, since: i64) -> Option<Vec<(i64, StreamKey)>>;
    /// Whether a position in (`since`, `upto`] touched something `pred`
    /// accepts, looked up in the same record as [`Store::changes_since`]
    /// without copying it; `None` if the record does not reach back to
    /// `since`.
    fn any_change(&self, since: i64, upto: i64, pred: &mut dyn FnMut(&StreamKey) -> bool) -> Option<bool>;
    /// This process's turn at building state events for `room_id`, held
    /// until the answer is dropped. With several processes on one
    /// database their state events for one room are built one process at
    /// a time, each on the state the previous one left, so none is
    /// refused because another changed the room's state meanwhile
    /// ([`weft_core::ErrorKind::RoomMoved`]) again and again. `None` where
    /// one process writes the database (SQLite), whose room pipeline
    /// takes turns in memory. PostgreSQL: a session advisory lock on a
    /// connection of its own, released by a process that dies with it; an
    /// error after waiting 5 s for it (the caller goes on without a turn).
    async fn room_turn(&self, room_id: &str) -> Result<Option<RoomTurn>> {
        let _ = room_id;
        Ok(None)
    }
    /// Calls `hook` with the rooms other processes wrote events to,
    /// before the positions of those events are published (so whatever
    /// a woken reader asks of a room's view, the view was invalidated
    /// first). Never called on SQLite, which one process writes.
    fn on_foreign_room_writes(&self, hook: ForeignRoomsHook) {
        let _ = hook;
    }
    /// Whether this process leads the deployment: runs the background
    /// workers of which exactly one may run per database (push, the
    /// outgoing federation queue, application-service delivery, typing and
    /// presence timeouts). True at once on SQLite (one process per
    /// database). On PostgreSQL the first call starts competing for a
    /// session advisory lock held on a connection of its own for as long
    /// as the process lives (docs/scale-out.md, "One leader"): false until
    /// this process holds it, false again as soon as that connection
    /// fails, before another process can take over.
    fn leadership(&self) -> tokio::sync::watch::Receiver<bool>;

    // ---- accounts ----
    async fn create_user(&self, user: NewUser) -> Result<()>;
    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>>;
    async fn list_users(&self) -> Result<Vec<UserRecord>>;
    /// Active users whose ID or display name contains `term` (any case)
    /// and who share a room with `requester` (both joined) or are joined to
    /// a room published in the directory; at most `limit`, by user ID.
    async fn search_users(&self, requester: &str, term: &str, limit: usize) -> Result<Vec<UserRecord>>;
    /// Stores a report of an event or a user; answers its ID.
    async fn add_report(&self, report: Report) -> Result<i64>;
    /// The newest reports first, at most `limit`.
    async fn reports(&self, limit: usize) -> Result<Vec<Report>>;
    async fn set_password_hash(&self, user_id: &str, hash: &str) -> Result<()>;
    /// Marks the user deactivated and removes all their devices and tokens
    /// (with their keys and pending to-device messages) and their
    /// cross-signing keys.
    async fn deactivate_user(&self, user_id: &str) -> Result<()>;
    async fn set_profile_field(&self, user_id: &str, field: ProfileField, value: Option<String>) -> Result<()>;

    // ---- devices and tokens ----
    /// Creates (or replaces the token of) a device; `token_hash` is the
    /// SHA-256 of the access token.
    async fn upsert_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &[u8],
    ) -> Result<bool>;
    async fn lookup_token(&self, token_hash: &[u8]) -> Result<Option<TokenOwner>>;
    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>>;
    /// Records when (and, if known, from which address) a device was last
    /// seen. Does nothing for a device that does not exist.
    async fn touch_device(&self, user_id: &str, device_id: &str, ip: Option<&str>, ts_ms: u64) -> Result<()>;
    /// Sets a device's display name (`None` clears it); `false` if the user
    /// has no such device. If the device has keys, the user's device list
    /// change gets a stream position (others see the name in `/keys/query`).
    async fn set_device_display_name(&self, user_id: &str, device_id: &str, display_name: Option<&str>)
    -> Result<bool>;
    /// Deletes a device with its keys and pending to-device messages. If it
    /// had device keys, the user's device list change gets a stream position.
    async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<()>;
    /// Deletes all devices of `user_id` except `keep` (if given), like
    /// [`Store::delete_device`] for each.
    async fn delete_devices_except(&self, user_id: &str, keep: Option<&str>) -> Result<()>;
    /// Gives a device a DTLS pre-shared key (replacing its previous one),
    /// creating the device (without an access token) if it does not exist.
    /// `identity` is unique server-wide. Fails with `M_NOT_FOUND` unless the
    /// user exists and is active. Deleting the device deletes the key.
    async fn set_device_psk(&self, user_id: &str, device_id: &str, identity: &str, psk: &[u8]) -> Result<()>;
    /// The device holding the pre-shared key named `identity`, with the
    /// key; `None` if there is none, or its user is deactivated.
    async fn lookup_psk(&self, identity: &str) -> Result<Option<PskOwner>>;

    // ---- key backup ----
    /// Makes a new backup version, which becomes the current one.
    async fn create_backup_version(&self, user_id: &str, algorithm_json: &str) -> Result<i64>;
    /// The version named, or the current one; `None` if it does not exist
    /// or was deleted.
    async fn backup_version(&self, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>>;
    /// Replaces a version's algorithm data; `false` if it does not exist.
    async fn update_backup_version(&self, user_id: &str, version: i64, algorithm_json: &str) -> Result<bool>;
    /// Deletes a version with its keys; `false` if it does not exist.
    async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool>;
    /// Stores keys in the current version `version`, each replacing the
    /// stored copy of its session only if it is better (verified, then a
    /// lower first message index, then fewer forwards).
    async fn put_backup_keys(&self, user_id: &str, version: i64, keys: Vec<BackupKey>) -> Result<BackupWrite>;
    /// The keys of a version, all or one room's or one session's.
    async fn backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<Vec<BackupKey>>;
    /// Deletes keys of the current version `version`, all or one room's
    /// or one session's.
    async fn delete_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<BackupWrite>;

    // ---- end-to-end encryption ----
    /// Stores what one `/keys/upload` carries, in one write. Device keys are
    /// kept verbatim; when they differ from the stored ones the user's device
    /// list change gets a stream position (`StreamKey::DeviceKeys`). A
    /// one-time key ID already stored with other content is refused
    /// (`M_INVALID_PARAM`), with the same content ignored. A fallback key
    /// replaces the device's one for its algorithm (unused again unless it is
    /// the same key). Returns the device's one-time key counts afterwards.
    async fn upload_keys(
        &self,
        user_id: &str,
        device_id: &str,
        upload: KeyUpload,
    ) -> Result<std::collections::BTreeMap<String, u64>>;
    /// Device keys of `user_id`'s devices, all of them when `device_ids` is
    /// empty, ordered by device ID.
    async fn get_device_keys(&self, user_id: &str, device_ids: &[String]) -> Result<Vec<DeviceKeysRecord>>;
    /// Unclaimed one-time keys of a device per algorithm.
    async fn one_time_key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>>;
    /// Algorithms for which the device has a fallback key not yet handed out.
    async fn unused_fallback_key_types(&self, user_id: &str, device_id: &str) -> Result<Vec<String>>;
    /// Claims one key for each (user, device, algorithm), in one write: a
    /// one-time key is removed and returned; with none left, the fallback
    /// key is returned, marked used and kept. Devices with neither are left
    /// out of the result.
    async fn claim_keys(&self, wanted: Vec<(String, String, String)>) -> Result<Vec<ClaimedKey>>;
    /// Users whose device list changed in (since, upto] who are `user_id`
    /// or share a joined room with them, plus users who joined a room
    /// `user_id` is in (or all members of a room `user_id` joined) in that
    /// window. Sorted, without duplicates.
    async fn device_list_changes(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>>;
    /// Users who shared a joined room with `user_id` at some point in
    /// (since, upto] — by a membership change in that window — and share
    /// none now: their devices need no tracking any more. Sorted.
    async fn device_list_left(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>>;
    /// Stores to-device messages from `sender` (device `sender_device`),
    /// each recipient device's copy at its own stream position
    /// (`StreamKey::User(recipient)`). Devices that do not exist get nothing.
    /// Idempotent per (sender, sender_device, event_type, txn_id): returns
    /// false, storing nothing, when that transaction was seen before.
    async fn send_to_device(
        &self,
        sender: &str,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: Vec<NewToDevice>,
    ) -> Result<bool>;
    /// Pending to-device messages of a device with positions in
    /// (after, upto], oldest first, at most `limit`.
    async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<ToDeviceMessage>>;
    /// Deletes a device's to-device messages at positions <= `upto` (the
    /// device has acknowledged them by syncing from `upto`).
    async fn ack_to_device(&self, user_id: &str, device_id: &str, upto: i64) -> Result<()>;

    /// Stores cross-signing keys of `user_id`: (key type "master",
    /// "self_signing" or "user_signing", key JSON verbatim), replacing the
    /// ones of those types. A change gets a stream position
    /// (`StreamKey::DeviceKeys`) like a device-key change.
    async fn put_cross_signing_keys(&self, user_id: &str, keys: Vec<(String, String)>) -> Result<()>;
    /// Cross-signing keys of `user_id`: (key type, key JSON).
    async fn get_cross_signing_keys(&self, user_id: &str) -> Result<Vec<(String, String)>>;
    /// Adds (or replaces) signatures for keys, in one write. Every target
    /// user's device list change gets a stream position.
    async fn add_key_signatures(&self, signatures: Vec<KeySignature>) -> Result<()>;
    /// Signatures uploaded for keys of `user_id`.
    async fn key_signatures(&self, user_id: &str) -> Result<Vec<KeySignature>>;

    // ---- filters ----
    async fn put_filter(&self, user_id: &str, filter_json: &str) -> Result<String>;
    async fn get_filter(&self, user_id: &str, filter_id: &str) -> Result<Option<String>>;

    // ---- account data ----
    /// Stores account data (global when `room_id` is None). Gets a stream position.
    fn put_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content_json: &str,
    ) -> Pending<i64>;
    /// Replaces account data with what `edit` makes of the stored content
    /// (`None`: none stored yet). The read and the write are one write of
    /// the writer, so edits of the same data never overlap and none is
    /// lost, whichever process makes them. When `edit` fails nothing is
    /// stored and its error is the answer. Gets a stream position.
    fn edit_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        edit: AccountDataEdit,
    ) -> Pending<i64>;
    async fn get_account_data(&self, user_id: &str, room_id: Option<&str>, data_type: &str) -> Result<Option<String>>;
    /// Account data of `user_id` changed in (since, upto].
    async fn account_data_since(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<AccountDataRecord>>;

    // ---- receipts ----
    /// Stores a receipt, replacing the one of the same (room, type, user,
    /// thread), at the next stream position (`StreamKey::Receipt(room)`).
    fn put_receipt(&self, receipt: ReceiptRecord) -> Pending<i64>;
    /// Receipts in `room_id` set in (since, upto], oldest first.
    async fn receipts_since(&self, room_id: &str, since: i64, upto: i64) -> Result<Vec<ReceiptRecord>>;

    // ---- push ----
    /// Adds notification rows, each at the next stream position
    /// (`StreamKey::Notification(user, room)`), and records in the same
    /// transaction that events up to `evaluated` have been evaluated
    /// (`meta` key `push_evaluated`).
    fn add_notifications(&self, rows: Vec<NewNotification>, evaluated: i64) -> Pending<()>;
    /// Unread notification counts of `user_id` per room and thread, in
    /// `room_id` or in every room they have notifications in.
    async fn unread_counts(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<UnreadCount>>;
    /// Notification rows of `user_id` at positions below `before` (all
    /// when `None`), newest first, at most `limit`; only highlights when
    /// `only_highlight`.
    async fn notifications(
        &self,
        user_id: &str,
        before: Option<i64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<Vec<NotificationRecord>>;
    /// Notification rows of `user_id` at positions after `after`, oldest
    /// first, at most `limit` (`read` is not computed: false).
    async fn notifications_after(&self, user_id: &str, after: i64, limit: usize) -> Result<Vec<NotificationRecord>>;
    /// Adds or replaces the pusher (`user_id`, `app_id`, `pushkey`); a new
    /// one starts after the newest notification row. Unless `append`,
    /// pushers of other users with the same `app_id` and `pushkey` are
    /// deleted.
    async fn set_pusher(&self, pusher: PusherRecord, append: bool) -> Result<()>;
    /// Deletes a pusher; `false` if there was none.
    async fn delete_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool>;
    /// The pushers of `user_id`, or of everyone.
    async fn pushers(&self, user_id: Option<&str>) -> Result<Vec<PusherRecord>>;
    /// Records that the pusher has delivered (or given up on) the rows up
    /// to `position`. Nothing happens if it no longer exists.
    async fn pusher_sent(&self, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<()>;
    /// Every event (of every room) at positions in (after, upto], oldest
    /// first, at most `limit`.
    async fn events_after(&self, after: i64, upto: i64, limit: usize) -> Result<Vec<StoredEvent>>;
    // ---- typing ----
    /// Marks `user_id` typing in `room_id` until `expires_ms` (`None`:
    /// stops). A start or a stop takes the next stream position
    /// (`StreamKey::Typing(room)`), answered; renewing the timeout of one
    /// already typing, or stopping one who was not, takes none (`None`).
    fn set_typing(&self, room_id: &str, user_id: &str, expires_ms: Option<u64>) -> Pending<Option<i64>>;
    /// Who types in `room_id` at `now_ms` (in the order they started), and
    /// the stream position of the last change of the room's typers (0:
    /// none ever).
    async fn typing(&self, room_id: &str, now_ms: u64) -> Result<(Vec<String>, i64)>;
    /// Deletes the typing entries expired at `now_ms`; each room losing
    /// typers changes at a new stream position. Answers those rooms.
    fn expire_typing(&self, now_ms: u64) -> Pending<Vec<String>>;

    // ---- presence ----
    async fn presence(&self, user_id: &str) -> Result<Option<PresenceRecord>>;
    /// Edits a user's presence on the writer (read and write in one
    /// transaction); answers the new stream position if the edit asked for
    /// one (`StreamKey::Presence(user)`).
    fn edit_presence(&self, user_id: &str, edit: PresenceEdit) -> Pending<Option<i64>>;
    /// Presence changed in (since, upto] of `viewer` and of the users who
    /// share a joined room with them.
    async fn presence_since(&self, viewer: &str, since: i64, upto: i64) -> Result<Vec<PresenceRecord>>;
    /// Whether the two users are both joined to some room.
    async fn share_room(&self, a: &str, b: &str) -> Result<bool>;
    /// Applies the presence timeouts due at `now_ms`: a user past
    /// `online_until_ms` goes offline; an online one inactive for
    /// `idle_ms` goes unavailable. Each change takes a stream position.
    /// Answers the users changed.
    fn expire_presence(&self, now_ms: u64, idle_ms: u64) -> Pending<Vec<String>>;
    /// The earliest moment (ms since the epoch) a typing entry or, with
    /// `idle_ms` given, a presence timeout (as in
    /// [`Store::expire_presence`]) falls due.
    async fn next_ephemeral_deadline(&self, idle_ms: Option<u64>) -> Result<Option<u64>>;

    // ---- rooms and events ----
    /// Queues one event to be persisted with its effects on state and
    /// membership. Returns at once; the receiver resolves when durable.
    fn persist_event(&self, event: NewEvent) -> Pending<i64>;
    async fn room_info(&self, room_id: &str) -> Result<Option<RoomRecord>>;
    async fn get_event(&self, event_id: &str) -> Result<Option<StoredEvent>>;
    /// Current state of a room.
    async fn current_state(&self, room_id: &str) -> Result<Vec<StoredEvent>>;
    /// State of a room after every event at positions <= `pos`.
    async fn state_at(&self, room_id: &str, pos: i64) -> Result<Vec<StoredEvent>>;
    /// State events of a room with positions in (after, upto].
    async fn state_changes(&self, room_id: &str, after: i64, upto: i64) -> Result<Vec<StoredEvent>>;
    /// Events of a room with positions strictly between `from` and `to`,
    /// walking forward (oldest first) or backward (newest first), at most `limit`.
    async fn room_events(
        &self,
        room_id: &str,
        from: i64,
        to: i64,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>>;
    /// Events of `room_id` relating to `parent` (with that `rel_type` and
    /// event type where given) with positions strictly between `from` and
    /// `to`, walking as `dir` says, at most `limit`.
    #[allow(clippy::too_many_arguments)]
    async fn relations(
        &self,
        room_id: &str,
        parent: &str,
        rel_type: Option<&str>,
        event_type: Option<&str>,
        from: i64,
        to: i64,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>>;
    /// The threads of a room whose newest reply is before position
    /// `before`, newest reply first, at most `limit`; only those `user`
    /// wrote the root of or replied to when `only_participated`.
    async fn threads(
        &self,
        room_id: &str,
        user: &str,
        only_participated: bool,
        before: i64,
        limit: usize,
    ) -> Result<Vec<ThreadRecord>>;
    /// Events of `rooms` whose text under `keys` matches the FTS5 `query`
    /// (built by the caller from the user's words), best first (`by_rank`)
    /// or newest first, skipping `offset`, at most `limit`; with the number
    /// of all matches. The rank is FTS5's (lower is better).
    #[allow(clippy::too_many_arguments)]
    async fn search_events(
        &self,
        rooms: &[String],
        query: &str,
        keys: &[SearchKey],
        by_rank: bool,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<(StoredEvent, f64)>, u64)>;
    /// Rooms with at least one event in (since, upto], with their newest position.
    async fn rooms_changed(&self, since: i64, upto: i64) -> Result<Vec<(String, i64)>>;
    /// Memberships of a local user, current.
    async fn user_memberships(&self, user_id: &str) -> Result<Vec<MembershipRecord>>;
    /// History of one user's membership in a room: (position, membership), oldest first.
    async fn membership_history(&self, room_id: &str, user_id: &str) -> Result<Vec<(i64, String)>>;
    /// History of `m.room.history_visibility` in a room: (position, visibility), oldest first.
    async fn visibility_history(&self, room_id: &str) -> Result<Vec<(i64, String)>>;
    /// The event a (user, device, txn_id) created in a room with a type, if any.
    async fn txn_event(
        &self,
        user_id: &str,
        device_id: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
    ) -> Result<Option<String>>;
    async fn forget_room(&self, user_id: &str, room_id: &str) -> Result<()>;
    async fn is_forgotten(&self, user_id: &str, room_id: &str) -> Result<bool>;
    async fn public_rooms(&self) -> Result<Vec<String>>;
    async fn set_room_public(&self, room_id: &str, public: bool) -> Result<()>;

    // ---- aliases ----
    /// Returns false if the alias exists already.
    async fn create_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<bool>;
    async fn resolve_alias(&self, alias: &str) -> Result<Option<AliasRecord>>;
    async fn delete_alias(&self, alias: &str) -> Result<bool>;
    async fn room_aliases(&self, room_id: &str) -> Result<Vec<String>>;

    // ---- sliding sync ----
    /// The state of a simplified sliding sync connection (JSON the
    /// services wrote), if there is one.
    async fn sliding_connection(&self, user_id: &str, device_id: &str, conn_id: &str) -> Result<Option<String>>;
    /// Stores (replaces) the state of a sliding sync connection.
    async fn put_sliding_connection(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        state_json: &str,
    ) -> Result<()>;

    // ---- user-interactive auth ----
    /// Stores a new UIA session made at `now_ms`; sessions made before
    /// `prune_before_ms` are deleted in the same write.
    async fn create_uia_session(&self, session_id: &str, now_ms: u64, prune_before_ms: u64) -> Result<()>;
    /// The stages completed in a session made at or after
    /// `not_before_ms`, or `None` if there is no such session.
    async fn uia_session(&self, session_id: &str, not_before_ms: u64) -> Result<Option<Vec<String>>>;
    /// Records `stage` as completed in the session (if it exists); answers
    /// the stages completed.
    async fn uia_complete_stage(&self, session_id: &str, stage: &str) -> Result<Vec<String>>;
    /// Deletes the session (the flow it guarded is done).
    async fn delete_uia_session(&self, session_id: &str) -> Result<()>;

    // ---- rate limits shared by processes (migration 0022) ----
    /// Takes one request from the rate-limit bucket `bucket`, a generic
    /// cell rate algorithm kept in one row: at the sustained rate one
    /// request per `interval_us`, and a burst of `tolerance_us /
    /// interval_us + 1`. Answers `None` when the request is let through,
    /// or the microseconds until it would be. The clock is the database's
    /// (PostgreSQL's, so processes with skewed clocks agree).
    async fn take_rate_token(&self, bucket: &str, interval_us: i64, tolerance_us: i64) -> Result<Option<u64>>;
    /// Gives back a request [`Store::take_rate_token`] let through.
    async fn refund_rate_token(&self, bucket: &str, interval_us: i64) -> Result<()>;
    /// Deletes the buckets that are full again (as good as no row);
    /// answers how many.
    async fn prune_rate_buckets(&self) -> Result<u64>;

    // ---- MQTT client IDs (session takeover across processes) ----
    /// Claims the MQTT client `key` (`USER\nCLIENT_ID`) for the connection
    /// `owner` (`PROCESS-TAG/CONNECTION`, the tag of the claiming
    /// process's store: [`Store::process_tag`]); answers the owner it had,
    /// unless that owner's process is gone (it crashed). The
    /// write carries [`StreamKey::MqttClient`]`(key, "+owner")`: every
    /// other connection for `key`, on any process, ends.
    fn claim_mqtt_client(&self, key: &str, owner: &str) -> Pending<Option<String>>;
    /// The connection `owner` of `key` ended, its session saved: the row
    /// goes if it still owns it, and the stream says so
    /// ([`StreamKey::MqttClient`]`(key, "-owner")`) to a successor waiting
    /// for it.
    fn release_mqtt_client(&self, key: &str, owner: &str) -> Pending<()>;

    // ---- server ----
    /// A key-value slot for server metadata (e.g. the signing key name).
    async fn get_meta(&self, key: &str) -> Result<Option<String>>;
    async fn set_meta(&self, key: &str, value: &str) -> Result<()>;
    /// Sets `key` to `value` unless it has a value already (whoever set
    /// it, on any process); answers whether this call set it.
    async fn init_meta(&self, key: &str, value: &str) -> Result<bool>;
}

/// Opens the store configured in `config` inside `data_dir`.
pub fn open(config: &weft_core::Config, data_dir: &std::path::Path) -> Result<Arc<dyn Store>> {
    match config.database.backend.as_str() {
        "sqlite" => Ok(Arc::new(SqliteStore::open(
            &config.sqlite_file(data_dir),
            config.database.synchronous == "full",
        )?)),
        "postgres" => {
            let url = config.database.url.as_deref().ok_or_else(|| {
                weft_core::Error::internal("database.backend = \"postgres\" needs database.url (WEFT_DATABASE__URL)")
            })?;
            Ok(Arc::new(PgStore::open(url)?))
        }
        other => Err(weft_core::Error::internal(format!(
            "unknown database backend {other:?}"
        ))),
    }
}
