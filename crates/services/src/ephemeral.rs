//! Typing notifications, receipts, read markers and presence: who may set
//! them, and how they are kept. All of them are stored in the database and
//! every change takes a position in the one ordered stream, so `/sync` (and
//! every door reading it) carries them, whichever process wrote them:
//! receipts and typing go to the room's members in `/sync`'s `ephemeral`,
//! presence to the users sharing a room with its user in `presence`.
//!
//! Typing and presence time out: [`Services::run_ephemeral_expiry`] is a
//! background task that wakes at the next deadline (a typing timeout, a
//! user to be marked unavailable or offline) and writes the change, which
//! then reaches `/sync` like any other.

use std::sync::Arc;
use std::time::Duration;

use ruma::{OwnedRoomId, UserId};
use serde_json::{Value, json};
use weft_core::{Error, Result};
use weft_store::{PresenceRecord, ReceiptRecord, StreamKey};

use crate::{Services, Session};

/// The longest typing timeout honoured: a client asking for more types for
/// this long unless it renews or stops.
pub const MAX_TYPING_TIMEOUT_MS: u64 = 120_000;
/// A user is `currently_active` while online and active within this.
pub const CURRENTLY_ACTIVE_MS: u64 = 60_000;
/// The expiry task looks at the database at least this often, for
/// deadlines another process sharing it wrote.
const EXPIRY_POLL: Duration = Duration::from_secs(5);
/// A sync extends a user's `online_until_ms` in the database only when it
/// moves it by more than this (saves a write per sync for fast syncers).
const ONLINE_SLACK_MS: u64 = 5_000;
/// Activity (an event sent) is written at most this often per user.
const ACTIVE_SLACK_MS: u64 = 30_000;
/// How often a sender's presence is read to note its activity (see
/// [`crate::Services::note_active`]): sends come far more often.
const ACTIVITY_CHECK_MS: u64 = 1_000;

/// `online`, `unavailable` or `offline`.
pub const ONLINE: &str = "online";
pub const UNAVAILABLE: &str = "unavailable";
pub const OFFLINE: &str = "offline";

/// A user's presence as `GET /presence/{userId}/status` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceView {
    pub presence: String,
    pub status_msg: Option<String>,
    pub currently_active: Option<bool>,
    /// Milliseconds since the user was last active.
    pub last_active_ago: Option<u64>,
}

impl PresenceView {
    fn of(r: &PresenceRecord, now: u64) -> Self {
        let ago = now.saturating_sub(r.last_active_ms);
        Self {
            presence: r.presence.clone(),
            status_msg: r.status_msg.clone(),
            currently_active: Some(r.presence == ONLINE && ago < CURRENTLY_ACTIVE_MS),
            last_active_ago: (r.last_active_ms > 0).then_some(ago),
        }
    }

    /// The content of an `m.presence` event.
    pub fn content(&self) -> Value {
        let mut c = json!({ "presence": self.presence });
        if let Some(m) = &self.status_msg {
            c["status_msg"] = json!(m);
        }
        if let Some(a) = self.currently_active {
            c["currently_active"] = json!(a);
        }
        if let Some(a) = self.last_active_ago {
            c["last_active_ago"] = json!(a);
        }
        c
    }
}

/// An `m.presence` event of a stored presence.
pub(crate) fn presence_event(r: &PresenceRecord, now: u64) -> Value {
    json!({ "type": "m.presence", "sender": r.user_id, "content": PresenceView::of(r, now).content() })
}

fn typing_json(users: Vec<String>) -> Value {
    json!({ "type": "m.typing", "content": { "user_ids": users } })
}

fn check_presence_state(presence: &str) -> Result<()> {
    match presence {
        ONLINE | UNAVAILABLE | OFFLINE => Ok(()),
        _ => Err(Error::invalid_param("presence must be online, unavailable or offline")),
    }
}

impl Services {
    /// `PUT /rooms/{roomId}/typing/{userId}`: only for oneself, in a room
    /// one is joined to (otherwise `403 M_FORBIDDEN`). `timeout_ms`:
    /// `Some` starts (or renews) typing for that long, at most
    /// [`MAX_TYPING_TIMEOUT_MS`]; `None` stops. Starting and stopping (and
    /// the timeout running out) are changes the room's members see.
    pub async fn set_typing(
        &self,
        session: &Session,
        room: &str,
        user_id: &str,
        timeout_ms: Option<u64>,
    ) -> Result<()> {
        own_user(session, user_id, "Cannot set another user's typing state")?;
        self.require_joined(session, room).await?;
        let expires = timeout_ms.map(|t| weft_core::now_ms() + t.min(MAX_TYPING_TIMEOUT_MS));
        self.store
            .set_typing(room, user_id, expires)
            .await
            .map_err(|_| Error::internal("typing not stored"))??;
        if expires.is_some() {
            self.ephemeral_wake.notify_one();
        }
        Ok(())
    }

    /// The `m.typing` event of a room (`{"type": "m.typing", "content":
    /// {"user_ids": [...]}}`, no `room_id`), `None` if nobody types.
    pub async fn typing_event(&self, room_id: &str) -> Result<Option<Value>> {
        let (users, _) = self.store.typing(room_id, weft_core::now_ms()).await?;
        Ok((!users.is_empty()).then(|| typing_json(users)))
    }

    /// The `m.typing` event `/sync` carries for a room: for a room new to
    /// the client (`since` `None`) the current typers, if any; otherwise
    /// the full current list (possibly empty) if it changed after `since`.
    pub(crate) async fn typing_since(&self, room_id: &str, since: Option<i64>) -> Result<Option<Value>> {
        let (users, position) = self.store.typing(room_id, weft_core::now_ms()).await?;
        Ok(match since {
            None => (!users.is_empty()).then(|| typing_json(users)),
            Some(s) => (position > s).then(|| typing_json(users)),
        })
    }

    /// `PUT /presence/{userId}/status`: only one's own (`403
    /// M_FORBIDDEN`); `presence` is `online`, `unavailable` or `offline`
    /// (else `400 M_INVALID_PARAM`); `status_msg` replaces the old one
    /// (none given: none). With `[presence] enabled = false` it is
    /// accepted and nothing is stored.
    pub async fn set_presence(
        &self,
        session: &Session,
        user_id: &str,
        presence: &str,
        status_msg: Option<String>,
    ) -> Result<()> {
        own_user(session, user_id, "Cannot set another user's presence")?;
        check_presence_state(presence)?;
        crate::text::check_opt_text("status_msg", status_msg.as_deref())?;
        if !self.config.presence.enabled {
            return Ok(());
        }
        let now = weft_core::now_ms();
        let offline_after = self.config.presence.offline_after_ms;
        let presence = presence.to_owned();
        let user = user_id.to_owned();
        let edit = Box::new(move |old: Option<PresenceRecord>| {
            let mut r = old.clone().unwrap_or_else(|| PresenceRecord {
                user_id: user,
                presence: OFFLINE.into(),
                status_msg: None,
                last_active_ms: 0,
                online_until_ms: 0,
                position: 0,
            });
            let was_active = r.presence == ONLINE && now.saturating_sub(r.last_active_ms) < CURRENTLY_ACTIVE_MS;
            let changed = r.presence != presence || r.status_msg != status_msg || (presence == ONLINE && !was_active);
            if presence == ONLINE {
                r.last_active_ms = now;
            }
            r.online_until_ms = if presence == OFFLINE {
                0
            } else {
                r.online_until_ms.max(now + offline_after)
            };
            r.presence = presence;
            r.status_msg = status_msg;
            Some((r, changed || old.is_none()))
        });
        self.store
            .edit_presence(user_id, edit)
            .await
            .map_err(|_| Error::internal("presence not stored"))??;
        self.activity_checked.forget(user_id);
        self.sync_memo.presence_seen.forget(user_id);
        self.ephemeral_wake.notify_one();
        Ok(())
    }

    /// `GET /presence/{userId}/status`: one's own, or that of a user one
    /// shares a joined room with (else `403 M_FORBIDDEN`); an unknown user
    /// is `404 M_NOT_FOUND`. Never set: `offline`. With presence disabled:
    /// `offline` for everyone.
    pub async fn get_presence(&self, session: &Session, user_id: &str) -> Result<PresenceView> {
        let offline = PresenceView {
            presence: OFFLINE.into(),
            status_msg: None,
            currently_active: None,
            last_active_ago: None,
        };
        if session.user_id.as_str() != user_id {
            if self.store.get_user(user_id).await?.is_none() {
                return Err(Error::not_found("Unknown user"));
            }
            if !self.store.share_room(session.user_id.as_str(), user_id).await? {
                return Err(Error::forbidden("You are not allowed to see their presence"));
            }
        }
        if !self.config.presence.enabled {
            return Ok(offline);
        }
        Ok(match self.store.presence(user_id).await? {
            Some(r) => PresenceView::of(&r, weft_core::now_ms()),
            None => offline,
        })
    }

    /// What a `/sync` call says of its user's presence (`set_presence`:
    /// `online` by default, `unavailable`, or `offline`, which changes
    /// nothing). A syncing user counts as online until their long-poll
    /// (`timeout_ms`) ends plus `[presence] offline_after_ms`; syncing
    /// brings an offline user online (an unavailable one stays so) or,
    /// with `unavailable`, makes them unavailable.
    pub(crate) async fn presence_from_sync(
        &self,
        session: &Session,
        set_presence: &str,
        timeout_ms: u64,
    ) -> Result<()> {
        if !self.config.presence.enabled || set_presence == OFFLINE {
            return Ok(());
        }
        check_presence_state(set_presence)?;
        let user = session.user_id.as_str();
        let now = weft_core::now_ms();
        // A long-polling client syncs many times a second under load: its
        // presence is looked at once a second at most (its deadline moves
        // on by less than the slack meanwhile), unless set since.
        let within = self.config.presence.offline_after_ms / 4;
        let how = if set_presence == UNAVAILABLE {
            UNAVAILABLE
        } else {
            ONLINE
        };
        if self
            .sync_memo
            .presence_seen
            .seen_lately(user, how, now, within.min(crate::sync::MEMO_MS))
        {
            return Ok(());
        }
        let until = now + timeout_ms + self.config.presence.offline_after_ms;
        let away = set_presence == UNAVAILABLE;
        let target = move |old: &Option<PresenceRecord>| -> &'static str {
            if away || old.as_ref().is_some_and(|r| r.presence == UNAVAILABLE) {
                UNAVAILABLE
            } else {
                ONLINE
            }
        };
        // Most syncs change nothing: check before queueing a write.
        let old = self.store.presence(user).await?;
        if old
            .as_ref()
            .is_some_and(|r| r.presence == target(&old) && r.online_until_ms + ONLINE_SLACK_MS >= until)
        {
            return Ok(());
        }
        let user_id = user.to_owned();
        let edit = Box::new(move |old: Option<PresenceRecord>| {
            let state = target(&old);
            let mut r = old.clone().unwrap_or_else(|| PresenceRecord {
                user_id,
                presence: OFFLINE.into(),
                status_msg: None,
                last_active_ms: 0,
                online_until_ms: 0,
                position: 0,
            });
            let changed = r.presence != state;
            if changed && state == ONLINE {
                r.last_active_ms = now;
            }
            r.presence = state.into();
            r.online_until_ms = r.online_until_ms.max(until);
            Some((r, changed || old.is_none()))
        });
        self.store
            .edit_presence(user, edit)
            .await
            .map_err(|_| Error::internal("presence not stored"))??;
        self.activity_checked.forget(user);
        self.ephemeral_wake.notify_one();
        Ok(())
    }

    /// Notes that `user` did something (sent an event): a user who is
    /// online or unavailable (that is, syncing or having set presence) is
    /// active now, and online again if unavailable. An offline user (or
    /// one who never synced nor set presence) stays offline: sending alone
    /// does not make one online. Written at most every
    /// [`ACTIVE_SLACK_MS`] while nothing else changes, and not waited for.
    /// The presence is read at most every [`ACTIVITY_CHECK_MS`] per user,
    /// unless this process changed it since (another process's change is
    /// seen that much later).
    pub(crate) async fn note_active(&self, user: &UserId) {
        if !self.config.presence.enabled {
            return;
        }
        let now = weft_core::now_ms();
        if self
            .activity_checked
            .seen_lately(user.as_str(), (), now, ACTIVITY_CHECK_MS)
        {
            return;
        }
        let Ok(Some(old)) = self.store.presence(user.as_str()).await else {
            return;
        };
        if old.presence == OFFLINE || (old.presence == ONLINE && old.last_active_ms + ACTIVE_SLACK_MS > now) {
            return;
        }
        let edit = Box::new(move |old: Option<PresenceRecord>| {
            let mut r = old.filter(|r| r.presence != OFFLINE)?;
            let was_active = r.presence == ONLINE && now.saturating_sub(r.last_active_ms) < CURRENTLY_ACTIVE_MS;
            r.presence = ONLINE.into();
            r.last_active_ms = now;
            Some((r, !was_active))
        });
        // Queued, not awaited: the send does not wait for this write.
        drop(self.store.edit_presence(user.as_str(), edit));
        self.ephemeral_wake.notify_one();
    }

    /// The `m.presence` events `/sync` carries for `user`: their own and
    /// those of users sharing a joined room with them, changed in
    /// (since, upto].
    pub(crate) async fn presence_events(&self, user: &str, since: i64, upto: i64) -> Result<Vec<Value>> {
        if !self.config.presence.enabled {
            return Ok(Vec::new());
        }
        let now = weft_core::now_ms();
        Ok(self
            .store
            .presence_since(user, since, upto)
            .await?
            .iter()
            .map(|r| presence_event(r, now))
            .collect())
    }

    /// Starts [`Self::run_ephemeral_expiry`], which runs while this
    /// process leads (docs/scale-out.md).
    pub fn start_ephemeral_expiry(self: &Arc<Self>) {
        self.run_led("typing and presence timeouts", Self::run_ephemeral_expiry);
    }

    /// The background task that applies typing and presence timeouts: it
    /// sleeps until the next deadline in the database (at most
    /// [`EXPIRY_POLL`], or until a new deadline is set: by this process,
    /// or by any other as a typing or presence change on the stream), then
    /// writes what fell due.
    pub async fn run_ephemeral_expiry(self: Arc<Self>) {
        let presence = self.config.presence.enabled;
        let idle = self.config.presence.idle_after_ms;
        let mut rx = self.store.subscribe_position();
        let mut seen = *rx.borrow_and_update();
        loop {
            let now = weft_core::now_ms();
            let next = self
                .store
                .next_ephemeral_deadline(presence.then_some(idle))
                .await
                .ok()
                .flatten();
            if next.is_some_and(|t| t <= now) {
                if let Ok(Err(e)) = self.store.expire_typing(now).await {
                    tracing::warn!("typing expiry failed: {}", e.message);
                }
                if presence && let Ok(Err(e)) = self.store.expire_presence(now, idle).await {
                    tracing::warn!("presence expiry failed: {}", e.message);
                }
                continue;
            }
            let wait = next.map_or(EXPIRY_POLL, |t| Duration::from_millis(t - now).min(EXPIRY_POLL));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.ephemeral_wake.notified() => {}
                // A deadline set by another process (or any new one).
                changed = async {
                    loop {
                        if rx.changed().await.is_err() {
                            return false;
                        }
                        let upto = *rx.borrow_and_update();
                        let new_deadline = self.stream_touched(seen, upto, |k| {
                            matches!(k, StreamKey::Typing(_) | StreamKey::Presence(_))
                        });
                        seen = upto;
                        if new_deadline {
                            return true;
                        }
                    }
                } => if !changed { return },
            }
        }
    }

    /// `POST /rooms/{roomId}/receipt/{type}/{eventId}`: `m.read` and
    /// `m.read.private` store a receipt (`thread_id`: `None` unthreaded,
    /// else `main` or a thread root's ID); `m.fully_read` sets the read
    /// marker (room account data) and takes no thread. Only in a room one
    /// is joined to (`403 M_FORBIDDEN`), for an event one may see
    /// (`404 M_NOT_FOUND`).
    pub async fn set_receipt(
        &self,
        session: &Session,
        room: &str,
        receipt_type: &str,
        event_id: &str,
        thread_id: Option<&str>,
    ) -> Result<()> {
        crate::text::check_text("Event ID", event_id)?;
        crate::text::check_opt_text("thread_id", thread_id)?;
        self.require_joined(session, room).await?;
        match receipt_type {
            RECEIPT_READ | RECEIPT_READ_PRIVATE => {}
            FULLY_READ => {
                if thread_id.is_some() {
                    return Err(Error::invalid_param("m.fully_read does not take a thread_id"));
                }
                return self.set_read_markers(session, room, Some(event_id), None, None).await;
            }
            _ => return Err(Error::invalid_param("Unknown receipt type")),
        }
        self.receipt_target(&session.user_id, room, event_id).await?;
        if let Some(t) = thread_id
            && t != "main"
        {
            // A thread root is an event of the room one may see.
            self.receipt_target(&session.user_id, room, t).await?;
        }
        self.store_receipt(session, room, receipt_type, event_id, thread_id.unwrap_or(""))
            .await
    }

    /// `POST /rooms/{roomId}/read_markers`: `m.fully_read` is stored as
    /// room account data of that type; `m.read` and `m.read.private` as
    /// unthreaded receipts. Every event must be one the user may see.
    pub async fn set_read_markers(
        &self,
        session: &Session,
        room: &str,
        fully_read: Option<&str>,
        read: Option<&str>,
        read_private: Option<&str>,
    ) -> Result<()> {
        self.require_joined(session, room).await?;
        for e in [fully_read, read, read_private].into_iter().flatten() {
            self.receipt_target(&session.user_id, room, e).await?;
        }
        if let Some(e) = fully_read {
            let content = serde_json::to_string(&json!({ "event_id": e })).map_err(Error::internal)?;
            self.store
                .put_account_data(session.user_id.as_str(), Some(room), FULLY_READ, &content)
                .await
                .map_err(|_| Error::internal("read marker not stored"))??;
        }
        if let Some(e) = read {
            self.store_receipt(session, room, RECEIPT_READ, e, "").await?;
        }
        if let Some(e) = read_private {
            self.store_receipt(session, room, RECEIPT_READ_PRIVATE, e, "").await?;
        }
        Ok(())
    }

    /// The event a receipt or marker points at must be in the room and
    /// visible to the user; otherwise `404 M_NOT_FOUND`.
    async fn receipt_target(&self, user_id: &UserId, room: &str, event_id: &str) -> Result<()> {
        self.visible_event(user_id, room, event_id).await.map(|_| ())
    }

    async fn store_receipt(
        &self,
        session: &Session,
        room: &str,
        receipt_type: &str,
        event_id: &str,
        thread_id: &str,
    ) -> Result<()> {
        let record = ReceiptRecord {
            room_id: room.to_owned(),
            receipt_type: receipt_type.to_owned(),
            user_id: session.user_id.to_string(),
            thread_id: thread_id.to_owned(),
            event_id: event_id.to_owned(),
            ts: weft_core::now_ms(),
            position: 0,
        };
        self.store
            .put_receipt(record)
            .await
            .map_err(|_| Error::internal("receipt not stored"))??;
        Ok(())
    }

    async fn require_joined(&self, session: &Session, room: &str) -> Result<()> {
        let room_id = OwnedRoomId::try_from(room).map_err(|_| Error::invalid_param("Invalid room ID"))?;
        match self.rooms.membership(&room_id, &session.user_id).await {
            Ok(Some(m)) if m == "join" => Ok(()),
            Ok(_) => Err(Error::forbidden("You are not in this room")),
            // An unknown room reads as one you are not in.
            Err(e) if e.kind == weft_core::ErrorKind::NotFound => Err(Error::forbidden("You are not in this room")),
            Err(e) => Err(e),
        }
    }
}

/// The public read receipt.
pub const RECEIPT_READ: &str = "m.read";
/// A read receipt only its own user sees.
pub const RECEIPT_READ_PRIVATE: &str = "m.read.private";
/// The read marker: room account data of this type.
pub const FULLY_READ: &str = "m.fully_read";

fn own_user(session: &Session, user_id: &str, message: &str) -> Result<()> {
    if session.user_id.as_str() == user_id {
        Ok(())
    } else {
        Err(Error::forbidden(message))
    }
}
