//! `/sync`: a reader of the one ordered stream. A sync token is a stream
//! position; an incremental sync returns what changed for the user between
//! the client's token and the newest durable position, and a long-poll
//! waits on the store's position watch, checking the in-memory record of
//! which rooms and users each new position touched before reading anything.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value, json};
use weft_core::{Error, Result};
use weft_rooms::{Visibility, client_event, strip_state};
use weft_store::{AccountDataRecord, Direction, MembershipRecord, StoredEvent, StreamKey};

use crate::ephemeral::RECEIPT_READ_PRIVATE;
use crate::events::membership_of;
use crate::filter::SyncFilter;
use crate::keys::counts_json;
use crate::memo::{PositionedMemo, Throttle};
use crate::tokens::{make_token, parse_stream_token};
use crate::{Services, Session};

pub struct SyncRequest {
    pub since: Option<String>,
    pub timeout_ms: u64,
    pub full_state: bool,
    pub filter: SyncFilter,
    /// `set_presence`: `online` (`None` means this too), `unavailable`,
    /// or `offline` (leaves presence alone).
    pub set_presence: Option<String>,
}

const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// How long a device's key counts are kept without reading them again.
pub(crate) const MEMO_MS: u64 = 1_000;
/// Past this many entries a memo starts over.
const MEMO_MAX: usize = 100_000;

type MembershipList = std::sync::Arc<Vec<MembershipRecord>>;
pub(crate) type UnreadList = std::sync::Arc<Vec<weft_store::UnreadCount>>;
/// (user, device).
type DeviceKey = (String, String);

/// What `/sync` keeps in this process's memory between one sync and the
/// next (docs/operations.md), so a long-polling client's steady loop does
/// not read the same rows every time:
/// - each user's memberships, with the position they were read at: valid
///   while the stream record shows no position keyed to the user since
///   (every membership change makes one, on every process);
/// - each device's key counts, for at most [`MEMO_MS`] and only while no
///   keys were uploaded or claimed through this process (a claim through
///   another process shows at most that much later);
/// - the position each device's to-device messages were acknowledged up
///   to (a new message is a position keyed to its recipient);
/// - each user's unread counts per room, valid while no notification row of
///   the user in the room and no receipt in the room came since.
#[derive(Default)]
pub(crate) struct SyncMemo {
    /// User → the list.
    memberships: PositionedMemo<String, MembershipList>,
    /// (user, device) → (when read, key generation, counts, fallback types).
    device_keys: parking_lot::Mutex<HashMap<DeviceKey, (u64, u64, Value, Value)>>,
    /// Bumped by every key upload and claim through this process.
    pub(crate) keys_generation: std::sync::atomic::AtomicU64,
    acked: parking_lot::Mutex<HashMap<DeviceKey, i64>>,
    /// (user, room) → the counts.
    unread: PositionedMemo<(String, String), UnreadList>,
    /// When each user's sync last looked at their presence, and with which
    /// `set_presence` (see `Services::presence_from_sync`).
    pub(crate) presence_seen: Throttle<&'static str>,
}

/// How many members `m.heroes` names at most.
const MAX_HEROES: usize = 5;
/// State event types the room summary depends on.
const SUMMARY_TYPES: &[&str] = &["m.room.member", "m.room.name", "m.room.canonical_alias"];
/// Most to-device messages one sync response carries.
const TO_DEVICE_LIMIT: usize = 100;

/// The state event types an invited user is shown of a room (with the
/// invite itself): over federation too, as an invite's room state.
pub(crate) const STRIPPED_STATE_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.canonical_alias",
    "m.room.encryption",
];

impl Services {
    /// Resolves the `filter` query parameter: inline JSON or a stored ID.
    pub async fn sync_filter(&self, session: &Session, filter: Option<&str>) -> Result<SyncFilter> {
        match filter {
            None => Ok(SyncFilter::default()),
            Some(f) if f.trim_start().starts_with('{') => {
                let v: Value = serde_json::from_str(f).map_err(|_| Error::bad_json("filter is not valid JSON"))?;
                SyncFilter::parse(v)
            }
            Some(id) => {
                let json = self
                    .store
                    .get_filter(session.user_id.as_str(), id)
                    .await?
                    .ok_or_else(|| Error::invalid_param("Unknown filter"))?;
                SyncFilter::parse(serde_json::from_str(&json).map_err(Error::internal)?)
            }
        }
    }

    /// Runs a sync, long-polling up to `timeout_ms` when nothing is new.
    pub async fn sync(&self, session: &Session, req: SyncRequest) -> Result<Value> {
        let user = session.user_id.as_str();
        let mut since = req.since.as_deref().map(parse_stream_token).transpose()?;
        let timeout = req.timeout_ms.min(self.config.limits.max_sync_timeout_ms);
        // Syncing keeps the user online (before the position is read, so
        // the change shows in this very response).
        self.presence_from_sync(session, req.set_presence.as_deref().unwrap_or("online"), timeout)
            .await?;
        let mut rx = self.store.subscribe_position();
        if let Some(s) = since {
            // Syncing from `s` acknowledges the to-device messages up to it.
            let acked = s.min(self.store.current_position());
            self.ack_to_device(session, acked).await?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
        let memberships = self.user_memberships(user).await?;
        let my_rooms: HashSet<String> = memberships.iter().map(|m| m.room_id.clone()).collect();
        let presence_on = self.config.presence.enabled;
        loop {
            let upto = *rx.borrow_and_update();
            match since {
                None => return self.build_sync(session, None, upto, &req, None).await,
                Some(s) if req.full_state => return self.build_sync(session, Some(s), upto, &req, None).await,
                Some(s) if upto > s => {
                    let relevant = self
                        .store
                        .any_change(s, upto, &mut |k| match k {
                            StreamKey::Room(r) => my_rooms.contains(r),
                            StreamKey::User(u) => u == user,
                            // Whether the user shares a room with
                            // them is for the built response to say.
                            StreamKey::DeviceKeys(_) => true,
                            StreamKey::Receipt(r) | StreamKey::Typing(r) | StreamKey::State(r) => my_rooms.contains(r),
                            StreamKey::Notification(u, _) => u == user,
                            // Whether they share a room: as above.
                            StreamKey::Presence(_) => presence_on,
                            StreamKey::Outbox(_) | StreamKey::Revoked(_) | StreamKey::MqttClient(..) => false,
                        })
                        .unwrap_or(true);
                    if relevant {
                        let resp = self
                            .build_sync(session, Some(s), upto, &req, Some(&memberships))
                            .await?;
                        if !is_empty(&resp) {
                            return Ok(resp);
                        }
                    }
                    // Nothing for this user in (s, upto]: wait from upto.
                    since = Some(upto);
                }
                Some(_) => {}
            }
            if !wait_for_position(&mut rx, deadline).await? {
                let upto = *rx.borrow_and_update();
                let s = since.unwrap_or(upto);
                if upto > s {
                    return self.build_sync(session, Some(s), upto, &req, Some(&memberships)).await;
                }
                let mut resp = empty_sync(upto);
                self.add_device_fields(session, &mut resp).await?;
                return Ok(resp);
            }
        }
    }

    /// The syncing device's one-time key counts and unused fallback key
    /// types: read at most once a second per device unless keys were
    /// uploaded or claimed through this process since (see [`SyncMemo`]).
    pub(crate) async fn add_device_fields(&self, session: &Session, resp: &mut Value) -> Result<()> {
        let (user, device) = (session.user_id.as_str(), session.device_id.as_str());
        let key = (user.to_owned(), device.to_owned());
        let generation = self.sync_memo.keys_generation.load(Ordering::Acquire);
        let now = weft_core::now_ms();
        let memo = self.sync_memo.device_keys.lock().get(&key).cloned();
        let (counts, fallback) = match memo {
            Some((at, g, counts, fallback)) if g == generation && now.saturating_sub(at) < MEMO_MS => {
                (counts, fallback)
            }
            _ => {
                let counts = counts_json(self.store.one_time_key_counts(user, device).await?);
                let fallback = json!(self.store.unused_fallback_key_types(user, device).await?);
                let mut memo = self.sync_memo.device_keys.lock();
                if memo.len() >= MEMO_MAX {
                    memo.clear();
                }
                memo.insert(key, (now, generation, counts.clone(), fallback.clone()));
                (counts, fallback)
            }
        };
        resp["device_one_time_keys_count"] = counts;
        resp["device_unused_fallback_key_types"] = fallback;
        Ok(())
    }

    /// The rooms `user` is a member of (any membership): from memory when
    /// no position since it was read touched the user (see [`SyncMemo`]).
    pub(crate) async fn user_memberships(&self, user: &str) -> Result<Vec<MembershipRecord>> {
        let list = self
            .sync_memo
            .memberships
            .get_or_read(
                self.store.as_ref(),
                &user.to_owned(),
                |k| matches!(k, StreamKey::User(u) if u == user),
                || async { Ok(std::sync::Arc::new(self.store.user_memberships(user).await?)) },
            )
            .await?;
        Ok(list.as_ref().clone())
    }

    /// The user's unread counts in one room: from memory when no position
    /// since they were read added a notification row of the user there or
    /// set a receipt in the room (nothing else changes them), else read.
    pub(crate) async fn room_unread_counts(&self, user: &str, room_id: &str) -> Result<UnreadList> {
        self.sync_memo
            .unread
            .get_or_read(
                self.store.as_ref(),
                &(user.to_owned(), room_id.to_owned()),
                |k| match k {
                    StreamKey::Notification(u, r) => u == user && r == room_id,
                    StreamKey::Receipt(r) => r == room_id,
                    _ => false,
                },
                || async {
                    Ok(std::sync::Arc::new(
                        self.store.unread_counts(user, Some(room_id)).await?,
                    ))
                },
            )
            .await
    }

    /// Acknowledges the session's device's to-device messages up to
    /// `upto`, unless it acknowledged up to there before, or no message
    /// for the user came since its last acknowledgement (every one is a
    /// stream position keyed to its recipient).
    async fn ack_to_device(&self, session: &Session, upto: i64) -> Result<()> {
        let user = session.user_id.as_str();
        let key = (user.to_owned(), session.device_id.clone());
        let last = self.sync_memo.acked.lock().get(&key).copied();
        if let Some(last) = last {
            if last >= upto {
                return Ok(());
            }
            let touched = self
                .store
                .any_change(last, upto, &mut |k| matches!(k, StreamKey::User(u) if u == user));
            if touched == Some(false) {
                // Nothing to acknowledge in (last, upto] either.
                if let Some(entry) = self.sync_memo.acked.lock().get_mut(&key) {
                    *entry = (*entry).max(upto);
                }
                return Ok(());
            }
        }
        self.store.ack_to_device(user, &session.device_id, upto).await?;
        let mut acked = self.sync_memo.acked.lock();
        if acked.len() >= MEMO_MAX {
            acked.clear();
        }
        let entry = acked.entry(key).or_insert(upto);
        *entry = (*entry).max(upto);
        Ok(())
    }

    /// The to-device messages of the session's device in (since, upto], at
    /// most `limit`, and the position the batch ends at: `upto`, or the
    /// last message's when more are pending than one batch carries (so the
    /// next batch picks up the rest, and only what was sent is acknowledged).
    pub(crate) async fn to_device_batch(
        &self,
        session: &Session,
        since: i64,
        upto: i64,
        limit: usize,
    ) -> Result<(Vec<Value>, i64)> {
        let mut upto = upto;
        let mut msgs = self
            .store
            .to_device_messages(session.user_id.as_str(), &session.device_id, since, upto, limit + 1)
            .await?;
        if msgs.len() > limit {
            msgs.truncate(limit);
            if let Some(last) = msgs.last() {
                upto = last.position;
            }
        }
        let events = msgs
            .into_iter()
            .map(|m| {
                json!({
                    "sender": m.sender,
                    "type": m.event_type,
                    "content": serde_json::from_str::<Value>(&m.content_json).unwrap_or_default(),
                })
            })
            .collect();
        Ok((events, upto))
    }

    /// Builds the response for (since, upto]. `known` are the user's
    /// memberships if already read; they are re-read when the window holds
    /// a change keyed to the user (their own membership among them).
    async fn build_sync(
        &self,
        session: &Session,
        since: Option<i64>,
        upto: i64,
        req: &SyncRequest,
        known: Option<&[MembershipRecord]>,
    ) -> Result<Value> {
        let user = session.user_id.as_str();
        let now = weft_core::now_ms();
        let viewer = Some((user, session.device_id.as_str()));
        let filter = &req.filter;
        let limit = filter.room.timeline.limit.unwrap_or(DEFAULT_TIMELINE_LIMIT).min(1000);
        let recent = since.and_then(|s| self.store.changes_since(s));
        // To-device messages first: when more are pending than one response
        // carries, the response ends at the last one delivered, so the next
        // token picks up the rest (and acknowledges only what was sent).
        let mut upto = upto;
        let to_device_new = match (&recent, since) {
            (Some(changes), Some(_)) => changes
                .iter()
                .any(|(p, k)| *p <= upto && matches!(k, StreamKey::User(u) if u == user)),
            _ => true,
        };
        let mut to_device = Vec::new();
        if to_device_new {
            (to_device, upto) = self
                .to_device_batch(session, since.unwrap_or(0), upto, TO_DEVICE_LIMIT)
                .await?;
        }
        // Which rooms changed, and whether anything keyed to this user did
        // (account data, own membership) or any device list did: from the
        // in-memory stream record when it reaches back far enough, else
        // from the database.
        // `members_touched`: some user-keyed entry (every membership change
        // makes one) is in the window, so room membership may have changed.
        // `receipt_rooms`: rooms with a receipt set in the window (`None`:
        // not known, look at every joined room); `typing_rooms` the same
        // for typing; `presence_touched`: some user's presence changed.
        // `notified_rooms`: rooms where the user got a notification row
        // (unread counts changed).
        type Window = (
            HashSet<String>,
            bool,
            bool,
            bool,
            Option<HashSet<String>>,
            Option<HashSet<String>>,
            bool,
            HashSet<String>,
        );
        let (
            changed,
            user_touched,
            devices_touched,
            members_touched,
            receipt_rooms,
            typing_rooms,
            presence_touched,
            notified_rooms,
        ): Window = match since {
            None => (HashSet::new(), true, false, true, None, None, true, HashSet::new()),
            Some(s) => match recent {
                Some(changes) => {
                    let mut rooms = HashSet::new();
                    let mut receipts = HashSet::new();
                    let mut typing = HashSet::new();
                    let mut notified = HashSet::new();
                    let mut touched = false;
                    let mut devices = false;
                    let mut members = false;
                    let mut presence = false;
                    for (_, k) in changes.into_iter().filter(|(p, _)| *p <= upto) {
                        match k {
                            StreamKey::Room(r) => {
                                rooms.insert(r);
                            }
                            StreamKey::User(u) => {
                                members = true;
                                touched |= u == user;
                            }
                            StreamKey::DeviceKeys(_) => devices = true,
                            StreamKey::Receipt(r) => {
                                receipts.insert(r);
                            }
                            StreamKey::Notification(u, r) => {
                                if u == user {
                                    notified.insert(r);
                                }
                            }
                            StreamKey::Typing(r) => {
                                typing.insert(r);
                            }
                            StreamKey::Presence(_) => presence = true,
                            // The event's own `Room` key counts it.
                            StreamKey::State(_)
                            | StreamKey::Outbox(_)
                            | StreamKey::Revoked(_)
                            | StreamKey::MqttClient(..) => {}
                        }
                    }
                    (
                        rooms,
                        touched,
                        devices,
                        members,
                        Some(receipts),
                        Some(typing),
                        presence,
                        notified,
                    )
                }
                None => (
                    self.store
                        .rooms_changed(s, upto)
                        .await?
                        .into_iter()
                        .map(|(r, _)| r)
                        .collect(),
                    true,
                    true,
                    true,
                    None,
                    None,
                    true,
                    HashSet::new(),
                ),
            },
        };
        let memberships = match known {
            Some(m) if !user_touched => m.to_vec(),
            _ => self.user_memberships(user).await?,
        };
        // Device lists: changed keys of users sharing a room, and members
        // who joined a shared room (their devices are now to be tracked).
        let my_room_changed = members_touched && memberships.iter().any(|m| changed.contains(&m.room_id));
        let device_lists_changed = match since {
            Some(s) if devices_touched || my_room_changed => self.store.device_list_changes(user, s, upto).await?,
            _ => Vec::new(),
        };
        // ... and users who no longer share any room.
        let device_lists_left = match since {
            Some(s) if my_room_changed => self.store.device_list_left(user, s, upto).await?,
            _ => Vec::new(),
        };
        // Account data changed in the window (all of it for an initial
        // sync): the global kind, and per room.
        let mut account_data: Vec<Value> = Vec::new();
        let mut room_ad: HashMap<String, Vec<Value>> = HashMap::new();
        if user_touched {
            for a in self.store.account_data_since(user, since.unwrap_or(0), upto).await? {
                let ev = account_data_json(&a);
                match a.room_id {
                    Some(r) => room_ad.entry(r).or_default().push(ev),
                    None => account_data.push(ev),
                }
            }
        }
        let mut join = Map::new();
        let mut invite = Map::new();
        let mut leave = Map::new();
        for m in memberships {
            if m.position > upto || !filter.room_allowed(&m.room_id) {
                continue;
            }
            let membership_new = since.is_none_or(|s| m.position > s);
            let room_changed = since.is_none() || changed.contains(&m.room_id);
            match m.membership.as_str() {
                "join" => {
                    let fresh = membership_new || req.full_state;
                    // Receipts set in the window (all current ones for a
                    // room new to the client).
                    let receipts_due = fresh || receipt_rooms.as_ref().is_none_or(|r| r.contains(&m.room_id));
                    let ephemeral_filter = &filter.room.ephemeral;
                    let receipts =
                        if receipts_due && ephemeral_filter.matches_parts("m.receipt", None, Some(&m.room_id)) {
                            let from = if fresh { 0 } else { since.unwrap_or(0) };
                            self.receipt_event(user, &m.room_id, from, upto).await?
                        } else {
                            None
                        };
                    // Who types: the full current list when it changed in
                    // the window (the current typers for a new room).
                    let typing_due = fresh || typing_rooms.as_ref().is_none_or(|r| r.contains(&m.room_id));
                    let typing = if typing_due && ephemeral_filter.matches_parts("m.typing", None, Some(&m.room_id)) {
                        self.typing_since(&m.room_id, if fresh { None } else { since }).await?
                    } else {
                        None
                    };
                    let mut ephemeral: Vec<Value> = typing.into_iter().chain(receipts).collect();
                    if let Some(limit) = ephemeral_filter.limit {
                        ephemeral.truncate(limit);
                    }
                    if !(membership_new
                        || room_changed
                        || req.full_state
                        || room_ad.contains_key(&m.room_id)
                        || !ephemeral.is_empty()
                        || notified_rooms.contains(&m.room_id))
                    {
                        continue;
                    }
                    // Joined before the window and still joined: every event
                    // in it is visible, no need to load visibility history.
                    let all_visible = !fresh && since.is_some_and(|s| m.position <= s);
                    let mut section = self
                        .room_section(
                            user,
                            viewer,
                            &m.room_id,
                            since,
                            upto,
                            fresh,
                            all_visible,
                            limit,
                            filter,
                            now,
                        )
                        .await?;
                    // A room new to the client gets all its account data;
                    // otherwise what changed in the window.
                    let ad = if fresh && since.is_some() {
                        self.room_account_data(user, &m.room_id, upto).await?
                    } else {
                        room_ad.remove(&m.room_id).unwrap_or_default()
                    };
                    section.insert("account_data".into(), json!({ "events": ad }));
                    let summary_due = match since {
                        Some(s) if !fresh => room_changed && self.summary_changed(&m.room_id, s, upto).await?,
                        _ => true,
                    };
                    if summary_due {
                        section.insert("summary".into(), self.room_summary(user, &m.room_id).await?);
                    }
                    section.insert("ephemeral".into(), json!({ "events": ephemeral }));
                    let by_thread = filter.room.timeline.unread_thread_notifications;
                    let (unread, by_threads) = self.unread_sections(user, &m.room_id, by_thread).await?;
                    section.insert("unread_notifications".into(), unread);
                    if let Some(t) = by_threads {
                        section.insert("unread_thread_notifications".into(), t);
                    }
                    join.insert(m.room_id.clone(), Value::Object(section));
                }
                "invite" if membership_new => {
                    let events = self.invite_state(user, &m).await?;
                    invite.insert(m.room_id.clone(), json!({ "invite_state": { "events": events } }));
                }
                "leave" | "ban" if membership_new => {
                    // An initial sync lists left rooms only when the filter
                    // asks (`include_leave`), except rooms the user was
                    // banned or kicked from: those are always sent, so the
                    // client learns it is out.
                    if since.is_none() && !filter.room.include_leave && !self.removed_by_other(user, &m).await? {
                        continue;
                    }
                    if self.store.is_forgotten(user, &m.room_id).await? {
                        continue;
                    }
                    let section = self
                        .room_section(
                            user, viewer, &m.room_id, since, m.position, true, false, limit, filter, now,
                        )
                        .await?;
                    leave.insert(m.room_id.clone(), Value::Object(section));
                }
                _ => {}
            }
        }
        // Presence of the user and of those sharing a room with them,
        // changed in the window.
        let presence = if presence_touched {
            let events = self.presence_events(user, since.unwrap_or(0), upto).await?;
            filter.presence.apply(events, None)
        } else {
            Vec::new()
        };
        let mut resp = json!({
            "next_batch": make_token(upto),
            "rooms": { "join": join, "invite": invite, "leave": leave, "knock": {} },
            "account_data": { "events": account_data },
            "presence": { "events": presence },
            "to_device": { "events": to_device },
            "device_lists": { "changed": device_lists_changed, "left": device_lists_left },
        });
        self.add_device_fields(session, &mut resp).await?;
        Ok(resp)
    }

    /// The stripped state an invited user sees of the room (MSC: the
    /// create event, join rules, name, avatar, topic, canonical alias,
    /// encryption) and the invite itself.
    pub(crate) async fn invite_state(&self, user: &str, m: &MembershipRecord) -> Result<Vec<Value>> {
        // An invite to a room this server is not in: what the inviting
        // server showed of it.
        if let Some(state) = self.store.remote_invite_state(&m.room_id, user).await? {
            return serde_json::from_str(&state).map_err(Error::internal);
        }
        let mut events: Vec<Value> = self
            .store
            .current_state(&m.room_id)
            .await?
            .iter()
            .filter(|e| STRIPPED_STATE_TYPES.contains(&e.event_type.as_str()))
            .map(strip_state)
            .collect();
        if let Some(inv) = self.store.get_event(&m.event_id).await? {
            events.push(strip_state(&inv));
        }
        Ok(events)
    }

    /// One `m.receipt` event with the receipts of `room_id` set in
    /// (since, upto] that `user` may see (private ones only their own);
    /// `None` when there are none.
    pub(crate) async fn receipt_event(
        &self,
        user: &str,
        room_id: &str,
        since: i64,
        upto: i64,
    ) -> Result<Option<Value>> {
        let mut content = Map::new();
        for r in self.store.receipts_since(room_id, since, upto).await? {
            if r.receipt_type == RECEIPT_READ_PRIVATE && r.user_id != user {
                continue;
            }
            let mut receipt = json!({ "ts": r.ts });
            if !r.thread_id.is_empty() {
                receipt["thread_id"] = json!(r.thread_id);
            }
            let by_type = content.entry(r.event_id).or_insert_with(|| json!({}));
            by_type[r.receipt_type.as_str()][r.user_id.as_str()] = receipt;
        }
        Ok((!content.is_empty()).then(|| json!({ "type": "m.receipt", "content": content })))
    }

    /// All of a user's account data for one room, up to `upto`.
    pub(crate) async fn room_account_data(&self, user: &str, room_id: &str, upto: i64) -> Result<Vec<Value>> {
        Ok(self
            .store
            .account_data_since(user, 0, upto)
            .await?
            .iter()
            .filter(|a| a.room_id.as_deref() == Some(room_id))
            .map(account_data_json)
            .collect())
    }

    /// Whether a user's `leave` or `ban` membership was set by someone else
    /// (a kick or a ban) rather than by leaving.
    async fn removed_by_other(&self, user: &str, m: &MembershipRecord) -> Result<bool> {
        if m.membership == "ban" {
            return Ok(true);
        }
        Ok(self
            .store
            .get_event(&m.event_id)
            .await?
            .is_some_and(|e| e.sender != user))
    }

    /// Whether anything the room summary is made of (memberships, the
    /// room's name or canonical alias, which decide whether heroes are
    /// needed) changed in (since, upto].
    async fn summary_changed(&self, room_id: &str, since: i64, upto: i64) -> Result<bool> {
        // No change of the room's state at all in the window: none of those.
        if self
            .store
            .any_change(since, upto, &mut |k| matches!(k, StreamKey::State(r) if r == room_id))
            == Some(false)
        {
            return Ok(false);
        }
        Ok(self
            .store
            .state_changes(room_id, since, upto)
            .await?
            .iter()
            .any(|e| SUMMARY_TYPES.contains(&e.event_type.as_str())))
    }

    /// The room `summary` of a joined room as `user` sees it: joined and
    /// invited member counts and, when the room has neither a name nor a
    /// canonical alias, `m.heroes`: up to five other members, joined or
    /// invited, in the order they became so (stream order); when there are
    /// none, those who left or were banned.
    pub(crate) async fn room_summary(&self, user: &str, room_id: &str) -> Result<Value> {
        let state = self.store.current_state(room_id).await?;
        let (mut joined, mut invited) = (0u64, 0u64);
        let mut present: Vec<(i64, &str)> = Vec::new();
        let mut gone: Vec<(i64, &str)> = Vec::new();
        let mut named = false;
        for e in &state {
            match e.event_type.as_str() {
                "m.room.member" => {
                    let Some(member) = e.state_key.as_deref() else { continue };
                    let m = membership_of(e);
                    match m.as_deref() {
                        Some("join") => joined += 1,
                        Some("invite") => invited += 1,
                        _ => {}
                    }
                    if member == user {
                        continue;
                    }
                    match m.as_deref() {
                        Some("join" | "invite") => present.push((e.position, member)),
                        Some("leave" | "ban") => gone.push((e.position, member)),
                        _ => {}
                    }
                }
                "m.room.name" => named |= content_str(e, "name").is_some_and(|n| !n.is_empty()),
                "m.room.canonical_alias" => named |= content_str(e, "alias").is_some_and(|a| !a.is_empty()),
                _ => {}
            }
        }
        let mut summary = json!({ "m.joined_member_count": joined, "m.invited_member_count": invited });
        if !named {
            let mut heroes = if present.is_empty() { gone } else { present };
            heroes.sort_unstable();
            let heroes: Vec<&str> = heroes.into_iter().take(MAX_HEROES).map(|(_, u)| u).collect();
            summary["m.heroes"] = json!(heroes);
        }
        Ok(summary)
    }

    /// The last `limit` events of `room_id` in (floor, upto] that `user`
    /// may see and the filter keeps, oldest first, and whether there were
    /// more (the timeline is `limited`). `all_visible`: the user was joined
    /// throughout, no need to load the visibility history.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn timeline_events(
        &self,
        user: &str,
        room_id: &str,
        floor: i64,
        upto: i64,
        all_visible: bool,
        limit: usize,
        filter: &SyncFilter,
    ) -> Result<(Vec<StoredEvent>, bool)> {
        let visibility = if all_visible {
            None
        } else {
            Some(Visibility::load(&*self.store, room_id, user).await?)
        };
        let keep = |e: &StoredEvent| {
            (visibility.as_ref().is_none_or(|v| v.can_see(e.position))
                || (e.event_type == "m.room.member" && e.state_key.as_deref() == Some(user)))
                && filter.room.timeline.matches(e)
        };
        // Walk back from `upto` until `limit + 1` events pass the filter and
        // visibility (the extra one tells whether the timeline is limited).
        let mut picked: Vec<StoredEvent> = Vec::new();
        let mut cursor = upto + 1;
        let batch = (limit + 1).max(50);
        loop {
            let page = self
                .store
                .room_events(room_id, cursor, floor, Direction::Backward, batch)
                .await?;
            let exhausted = page.len() < batch;
            for e in page {
                cursor = e.position;
                if keep(&e) {
                    picked.push(e);
                    if picked.len() > limit {
                        break;
                    }
                }
            }
            if picked.len() > limit || exhausted {
                break;
            }
        }
        let limited = picked.len() > limit;
        picked.truncate(limit);
        picked.reverse();
        Ok((picked, limited))
    }

    /// Timeline and state of one room for (since, upto]. `fresh` means the
    /// client knows nothing of this room yet: send the full state.
    #[allow(clippy::too_many_arguments)]
    async fn room_section(
        &self,
        user: &str,
        viewer: Option<(&str, &str)>,
        room_id: &str,
        since: Option<i64>,
        upto: i64,
        fresh: bool,
        all_visible: bool,
        limit: usize,
        filter: &SyncFilter,
        now: u64,
    ) -> Result<Map<String, Value>> {
        let floor = since.unwrap_or(0);
        let (picked, limited) = self
            .timeline_events(user, room_id, floor, upto, all_visible, limit, filter)
            .await?;
        // Events skipped by the filter before the first one returned are
        // covered by prev_batch, so the timeline starts at the oldest returned.
        let timeline_start = picked.first().map(|e| e.position).unwrap_or(upto + 1);
        let timeline: Vec<Value> = picked.iter().map(|e| client_event(e, viewer, now)).collect();
        let state_events: Vec<StoredEvent> = if fresh || since.is_none() {
            self.store.state_at(room_id, timeline_start - 1).await?
        } else if limited {
            let mut latest: HashMap<(String, String), StoredEvent> = HashMap::new();
            for e in self.store.state_changes(room_id, floor, timeline_start - 1).await? {
                latest.insert((e.event_type.clone(), e.state_key.clone().unwrap_or_default()), e);
            }
            let mut v: Vec<_> = latest.into_values().collect();
            v.sort_by_key(|e| e.position);
            v
        } else {
            Vec::new()
        };
        let state: Vec<Value> = state_events
            .iter()
            .filter(|e| filter.room.state.matches(e))
            .map(|e| client_event(e, viewer, now))
            .collect();
        let mut section = Map::new();
        section.insert(
            "timeline".into(),
            json!({ "events": timeline, "limited": limited, "prev_batch": make_token(timeline_start - 1) }),
        );
        section.insert("state".into(), json!({ "events": state }));
        Ok(section)
    }
}

/// Waits until the stream position moves (`true`) or the deadline passes
/// (`false`): the long-poll of `/sync` and sliding sync.
pub(crate) async fn wait_for_position(
    rx: &mut tokio::sync::watch::Receiver<i64>,
    deadline: tokio::time::Instant,
) -> Result<bool> {
    tokio::select! {
        changed = rx.changed() => changed.map(|_| true).map_err(|_| Error::internal("stream closed")),
        _ = tokio::time::sleep_until(deadline) => Ok(false),
    }
}

pub(crate) fn account_data_json(a: &AccountDataRecord) -> Value {
    json!({ "type": a.data_type, "content": serde_json::from_str::<Value>(&a.content_json).unwrap_or_default() })
}

/// A string field of a state event's content.
pub(crate) fn content_str(e: &StoredEvent, field: &str) -> Option<String> {
    let v: Value = serde_json::from_str(&e.pdu_json).ok()?;
    v.get("content")?.get(field)?.as_str().map(str::to_owned)
}

/// Whether a sync response carries nothing for the client (a long-poll
/// that timed out, or woke for another user's change).
pub fn is_empty(resp: &Value) -> bool {
    let rooms_empty = ["join", "invite", "leave"]
        .iter()
        .all(|k| resp["rooms"][k].as_object().is_none_or(|o| o.is_empty()));
    let none = |v: &Value| v.as_array().is_none_or(|a| a.is_empty());
    rooms_empty
        && none(&resp["account_data"]["events"])
        && none(&resp["presence"]["events"])
        && none(&resp["to_device"]["events"])
        && none(&resp["device_lists"]["changed"])
        && none(&resp["device_lists"]["left"])
}

fn empty_sync(upto: i64) -> Value {
    json!({
        "next_batch": make_token(upto),
        "rooms": { "join": {}, "invite": {}, "leave": {}, "knock": {} },
        "account_data": { "events": [] },
        "presence": { "events": [] },
        "to_device": { "events": [] },
        "device_lists": { "changed": [], "left": [] },
    })
}
