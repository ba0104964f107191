//! Delivery of events to application services (docs/appservices.md
//! "Delivery"): one task per registered service with a `url`, a reader of
//! the one ordered stream as the outgoing federation queue is.
//!
//! - The reader follows the stream after the service's durable position
//!   (table `appservice_state`) and picks the events the service is
//!   interested in: sent by a user of its users namespace (or its sender),
//!   a membership of such a user, or in a room with such a member (at the
//!   event's position), with
//!   an alias in its aliases namespace, or whose ID is in its rooms
//!   namespace. With `receive_ephemeral` (MSC2409), typing and receipts
//!   of those rooms and presence of its users come along; with MSC3202,
//!   device list changes (`changed`, `left`) and its users' one-time key
//!   counts and unused fallback key types.
//! - A batch of at most [`MAX_EVENTS`] events becomes a transaction: its
//!   body, the position it covers and its ID (the service's counter) are
//!   stored before it is sent, so it is sent again as it is, with the same
//!   ID, until the service accepts it (`PUT
//!   /_matrix/app/v1/transactions/{txnId}`, `Authorization: Bearer
//!   hs_token`), even after a restart. Then the position moves past it and
//!   the counter on, in one write. Transactions go one at a time, in
//!   stream order.
//! - A failure waits `[appservice] retry_initial_ms`, doubling up to
//!   `retry_max_ms` (stored too).
//! - Ephemeral events are known only from this process's recent stream
//!   changes: those from before a restart are not sent (as for
//!   federation).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_core::{Error, Result};
use weft_store::{AppserviceState, StoredEvent, StreamKey};

use crate::Services;
use crate::appservice::AppService;

/// Most events (and, separately, ephemeral events) in one transaction.
pub const MAX_EVENTS: usize = 100;
/// Events read from the stream at once.
const READ_BATCH: usize = 256;
/// How often a reader that finds nothing for its service writes its
/// position anyway.
const PERSIST_EVERY: Duration = Duration::from_secs(5);

impl Services {
    /// Gives every registered service its delivery state (at the current
    /// stream position, the first time: from then on, not history) and
    /// starts a delivery task for each that has a URL, which runs while
    /// this process leads (docs/scale-out.md) from the state stored then.
    pub async fn start_appservices(self: &Arc<Self>) -> Result<()> {
        let mut delivered = Vec::new();
        for service in self.appservices.all() {
            self.store
                .appservice_state_or_init(service.id(), self.store.current_position())
                .await?;
            if service.registration.url.is_some() {
                delivered.push(service.clone());
            }
        }
        if !delivered.is_empty() {
            self.run_led("application-service delivery", move |s| {
                let delivered = delivered.clone();
                async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for service in delivered {
                        tasks.spawn(delivery_task(s.clone(), service));
                    }
                    while tasks.join_next().await.is_some() {}
                }
            });
        }
        Ok(())
    }

    /// Sends one transaction to the service.
    async fn put_transaction(&self, service: &AppService, txn_id: u64, body: &str) -> Result<()> {
        let Some(url) = &service.registration.url else {
            return Err(Error::internal("no url"));
        };
        let resp = self
            .appservices
            .http
            .put(format!(
                "{}/_matrix/app/v1/transactions/{txn_id}",
                url.trim_end_matches('/')
            ))
            .bearer_auth(&service.registration.hs_token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| Error::internal(format!("cannot reach it: {e}")))?;
        if !resp.status().is_success() {
            return Err(Error::internal(format!("it answered {}", resp.status())));
        }
        Ok(())
    }

    /// The transaction body for the service's events in (after, upto] (at
    /// most [`READ_BATCH`] read, [`MAX_EVENTS`] taken) and the ephemeral
    /// changes there, and the position it covers up to. `None`: nothing
    /// there for the service.
    async fn appservice_batch(&self, service: &AppService, after: i64, upto: i64) -> Result<(i64, Option<String>)> {
        let crate::federation_queue::StreamWindow {
            changes,
            events,
            mut next,
        } = self.stream_window(after, upto, READ_BATCH).await?;
        let mut rooms = RoomCache::new();
        let mut out = Vec::new();
        let now = weft_core::now_ms();
        for ev in &events {
            if matches!(ev.event_type.as_str(), "m.room.member" | "m.room.canonical_alias") {
                rooms.remove(&ev.room_id);
            }
            if self.wants_event(service, ev, &mut rooms).await? {
                out.push(weft_rooms::client_event(ev, None, now));
                if out.len() == MAX_EVENTS {
                    next = ev.position;
                    break;
                }
            }
        }
        let mut ephemeral = Vec::new();
        let mut to_device = Vec::new();
        let mut device_lists: Vec<String> = Vec::new();
        let mut left: Vec<String> = Vec::new();
        if service.registration.msc3202 {
            let mut seen = HashSet::new();
            for (p, key) in changes.clone().unwrap_or_default() {
                if let StreamKey::DeviceKeys(user) = key
                    && p <= next
                    && seen.insert(user.clone())
                    && self.wants_presence_of(service, &user, &mut rooms).await?
                {
                    device_lists.push(user);
                }
            }
            left = self
                .appservice_left(service, &events, next, &device_lists, &mut rooms)
                .await?;
        }
        if service.wants_ephemeral() {
            let mut seen = HashSet::new();
            for (p, key) in changes.unwrap_or_default() {
                if p > next || ephemeral.len() >= MAX_EVENTS || !seen.insert(format!("{key:?}")) {
                    continue;
                }
                match key {
                    StreamKey::Typing(room) if self.wants_room(service, &room, &mut rooms).await? => {
                        let (users, _) = self.store.typing(&room, now).await?;
                        ephemeral.push(json!({
                            "type": "m.typing",
                            "room_id": room,
                            "content": { "user_ids": users },
                        }));
                    }
                    StreamKey::Receipt(room) if self.wants_room(service, &room, &mut rooms).await? => {
                        let mut content = serde_json::Map::new();
                        for r in self.store.receipts_since(&room, after, next).await? {
                            if r.receipt_type != crate::ephemeral::RECEIPT_READ {
                                continue;
                            }
                            let mut data = json!({ "ts": r.ts });
                            if !r.thread_id.is_empty() {
                                data["thread_id"] = json!(r.thread_id);
                            }
                            let entry = content.entry(r.event_id.clone()).or_insert_with(|| json!({}));
                            entry["m.read"][r.user_id.as_str()] = data;
                        }
                        if !content.is_empty() {
                            ephemeral.push(json!({ "type": "m.receipt", "room_id": room, "content": content }));
                        }
                    }
                    StreamKey::Presence(user) if self.config.presence.enabled => {
                        if !self.wants_presence_of(service, &user, &mut rooms).await? {
                            continue;
                        }
                        let Some(r) = self.store.presence(&user).await? else {
                            continue;
                        };
                        let ago = now.saturating_sub(r.last_active_ms);
                        let mut content = json!({
                            "presence": r.presence,
                            "last_active_ago": ago,
                            "currently_active": r.presence == crate::ephemeral::ONLINE
                                && ago < crate::ephemeral::CURRENTLY_ACTIVE_MS,
                        });
                        if let Some(msg) = &r.status_msg {
                            content["status_msg"] = json!(msg);
                        }
                        ephemeral.push(json!({ "type": "m.presence", "sender": user, "content": content }));
                    }
                    StreamKey::User(user) if service.is_interested_in_user(&user) && to_device.len() < MAX_EVENTS => {
                        self.appservice_to_device(&user, after, next, &mut to_device).await?;
                    }
                    _ => {}
                }
            }
        }
        if out.is_empty() && ephemeral.is_empty() && to_device.is_empty() && device_lists.is_empty() && left.is_empty()
        {
            return Ok((next, None));
        }
        let mut body = json!({ "events": out });
        if !ephemeral.is_empty() {
            body["de.sorunome.msc2409.ephemeral"] = json!(ephemeral);
            body["ephemeral"] = json!(ephemeral);
        }
        if !to_device.is_empty() {
            body["de.sorunome.msc2409.to_device"] = json!(to_device);
        }
        if !device_lists.is_empty() || !left.is_empty() {
            body["org.matrix.msc3202.device_lists"] = json!({ "changed": device_lists, "left": left });
        }
        if service.registration.msc3202 {
            let (counts, fallback) = self
                .appservice_key_counts(service, &out, &ephemeral, &to_device, &device_lists)
                .await?;
            if !counts.is_empty() {
                // Synapse sends both spellings (the first is its older one).
                body["org.matrix.msc3202.device_one_time_key_counts"] = json!(counts);
                body["org.matrix.msc3202.device_one_time_keys_count"] = json!(counts);
            }
            if !fallback.is_empty() {
                body["org.matrix.msc3202.device_unused_fallback_key_types"] = json!(fallback);
            }
        }
        Ok((next, Some(serde_json::to_string(&body).map_err(Error::internal)?)))
    }

    /// MSC3202's `device_lists.left` for the events up to `upto`: users
    /// who left (or were banned from, or kicked out of) a room the service
    /// was interested in, and the
    /// members of a room one of the service's users left, who now share
    /// no room with any of the service's users (and are not in `changed`).
    async fn appservice_left(
        &self,
        service: &AppService,
        events: &[StoredEvent],
        upto: i64,
        changed: &[String],
        rooms: &mut RoomCache,
    ) -> Result<Vec<String>> {
        let mut candidates: Vec<String> = Vec::new();
        for ev in events
            .iter()
            .filter(|e| e.position <= upto && e.event_type == "m.room.member")
        {
            let Some(target) = ev.state_key.as_deref() else {
                continue;
            };
            if matches!(crate::events::membership_of(ev).as_deref(), Some("join" | "invite")) {
                continue;
            }
            if service.is_interested_in_user(target) {
                candidates.extend(self.joined_members(&ev.room_id).await?);
            } else if self.wants_room_at(service, &ev.room_id, ev.position - 1, rooms).await? {
                candidates.push(target.to_owned());
            }
        }
        let mut left = Vec::new();
        for user in candidates {
            if service.is_interested_in_user(&user) || changed.contains(&user) || left.contains(&user) {
                continue;
            }
            if !self.wants_presence_of(service, &user, rooms).await? {
                left.push(user);
            }
        }
        Ok(left)
    }

    /// The users joined to a room now.
    async fn joined_members(&self, room: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .current_state(room)
            .await?
            .into_iter()
            .filter(|ev| ev.event_type == "m.room.member")
            .filter(|ev| crate::events::membership_of(ev).as_deref() == Some("join"))
            .filter_map(|ev| ev.state_key)
            .collect())
    }

    /// MSC3202's one-time key counts and unused fallback key types (user
    /// → device → …) of every device of the service's users a transaction
    /// concerns, as Synapse picks them: its sender, its users joined to
    /// the rooms of the transaction's events and ephemeral events, the
    /// recipients of its to-device messages and its users whose device
    /// list changed.
    async fn appservice_key_counts(
        &self,
        service: &AppService,
        events: &[Value],
        ephemeral: &[Value],
        to_device: &[Value],
        changed: &[String],
    ) -> Result<(KeyCounts, FallbackTypes)> {
        let mut users: BTreeSet<String> = BTreeSet::new();
        users.insert(service.sender.to_string());
        let rooms: BTreeSet<&str> = events
            .iter()
            .chain(ephemeral)
            .filter_map(|e| e["room_id"].as_str())
            .collect();
        for room in rooms {
            for user in self.joined_members(room).await? {
                if service.is_interested_in_user(&user) {
                    users.insert(user);
                }
            }
        }
        users.extend(
            to_device
                .iter()
                .filter_map(|m| m["to_user_id"].as_str().map(str::to_owned)),
        );
        users.extend(changed.iter().filter(|u| service.is_interested_in_user(u)).cloned());
        let mut counts = KeyCounts::new();
        let mut fallback = FallbackTypes::new();
        for user in users {
            for device in self.store.list_devices(&user).await? {
                let c = self.store.one_time_key_counts(&user, &device.device_id).await?;
                let f = self.store.unused_fallback_key_types(&user, &device.device_id).await?;
                counts
                    .entry(user.clone())
                    .or_default()
                    .insert(device.device_id.clone(), c);
                fallback.entry(user.clone()).or_default().insert(device.device_id, f);
            }
        }
        Ok((counts, fallback))
    }

    /// The to-device messages for `user`'s devices at positions in
    /// (after, upto], as MSC2409/MSC4203 put them in a transaction.
    async fn appservice_to_device(&self, user: &str, after: i64, upto: i64, out: &mut Vec<Value>) -> Result<()> {
        for device in self.store.list_devices(user).await? {
            let messages = self
                .store
                .to_device_messages(user, &device.device_id, after, upto, MAX_EVENTS)
                .await?;
            for m in messages {
                let content: Value = serde_json::from_str(&m.content_json).unwrap_or_default();
                out.push(json!({
                    "type": m.event_type,
                    "sender": m.sender,
                    "content": content,
                    "to_user_id": user,
                    "to_device_id": device.device_id,
                }));
            }
        }
        Ok(())
    }

    /// Whether the service is interested in the event: its sender, the
    /// user a membership is about, or its room as it was at the event.
    async fn wants_event(&self, service: &AppService, ev: &StoredEvent, rooms: &mut RoomCache) -> Result<bool> {
        if service.is_interested_in_user(&ev.sender) {
            return Ok(true);
        }
        if ev.event_type == "m.room.member"
            && ev
                .state_key
                .as_deref()
                .is_some_and(|u| service.is_interested_in_user(u))
        {
            return Ok(true);
        }
        self.wants_room_at(service, &ev.room_id, ev.position, rooms).await
    }

    /// Whether the service is interested in a room now.
    async fn wants_room(&self, service: &AppService, room: &str, cache: &mut RoomCache) -> Result<bool> {
        self.wants_room_at(service, room, i64::MAX, cache).await
    }

    /// Whether the service is interested in a room at stream position
    /// `at`: its ID or one of its aliases (published, or in its
    /// `m.room.canonical_alias`) is in the service's namespaces, or a user
    /// of its users namespace was joined or invited there then (so an
    /// event sent just before such a user left is still delivered when the
    /// reader reads it after the leave). Kept in `cache` for the batch.
    async fn wants_room_at(&self, service: &AppService, room: &str, at: i64, cache: &mut RoomCache) -> Result<bool> {
        if !cache.contains_key(room) {
            let interest = self.room_interest(service, room).await?;
            cache.insert(room.to_owned(), interest);
        }
        let Some(interest) = cache.get(room) else {
            return Ok(false);
        };
        Ok(interest.always
            || interest.members.iter().any(|history| {
                history
                    .iter()
                    .rev()
                    .find(|(p, _)| *p <= at)
                    .is_some_and(|(_, m)| m == "join" || m == "invite")
            }))
    }

    async fn room_interest(&self, service: &AppService, room: &str) -> Result<RoomInterest> {
        let mut always = service.is_interested_in_room(room)
            || self
                .store
                .room_aliases(room)
                .await?
                .iter()
                .any(|a| service.is_interested_in_alias(a));
        let mut members = Vec::new();
        if !always {
            for ev in self.store.current_state(room).await? {
                match ev.event_type.as_str() {
                    "m.room.member" => {
                        if let Some(user) = ev.state_key.as_deref()
                            && service.is_interested_in_user(user)
                        {
                            members.push(self.store.membership_history(room, user).await?);
                        }
                    }
                    "m.room.canonical_alias"
                        if canonical_aliases(&ev).iter().any(|a| service.is_interested_in_alias(a)) =>
                    {
                        always = true;
                        break;
                    }
                    _ => {}
                }
            }
        }
        Ok(RoomInterest { always, members })
    }

    /// Presence goes to a service for its own users and for users joined
    /// to a room it is interested in.
    async fn wants_presence_of(&self, service: &AppService, user: &str, rooms: &mut RoomCache) -> Result<bool> {
        if service.is_interested_in_user(user) {
            return Ok(true);
        }
        for m in self.store.user_memberships(user).await? {
            if m.membership == "join" && self.wants_room(service, &m.room_id, rooms).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// What makes a service interested in a room: always (its ID or an
/// alias), or while one of its users is joined or invited (each such
/// user's membership history: position, membership).
struct RoomInterest {
    always: bool,
    members: Vec<Vec<(i64, String)>>,
}

type RoomCache = HashMap<String, RoomInterest>;

/// User → device → algorithm → count of unused one-time keys.
type KeyCounts = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;
/// User → device → algorithms with an unused fallback key.
type FallbackTypes = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// The aliases an `m.room.canonical_alias` event names.
fn canonical_aliases(ev: &StoredEvent) -> Vec<String> {
    let v: Value = serde_json::from_str(&ev.pdu_json).unwrap_or_default();
    let content = &v["content"];
    let mut out: Vec<String> = content["alt_aliases"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if let Some(a) = content["alias"].as_str() {
        out.push(a.to_owned());
    }
    out
}

/// Delivers one service's transactions for the life of the process.
async fn delivery_task(s: Arc<Services>, service: Arc<AppService>) {
    let id = service.id().to_owned();
    // As stored (by whichever process led before).
    let mut state: AppserviceState = loop {
        match s.store.appservice_state_or_init(&id, s.store.current_position()).await {
            Ok(state) => break state,
            Err(e) => {
                tracing::warn!("appservice {id}: cannot read its state: {}", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let initial = s.config.appservice.retry_initial_ms.max(1);
    let max = s.config.appservice.retry_max_ms.max(initial);
    let mut rx = s.store.subscribe_position();
    // How far the reader has looked; ahead of the stored position while
    // it finds nothing for the service (written now and then).
    let mut pos = state.position;
    let mut persisted = Instant::now();
    loop {
        if let Some((upto, body)) = state.pending.clone() {
            let now = weft_core::now_ms();
            if state.retry_at_ms > now {
                tokio::time::sleep(Duration::from_millis(state.retry_at_ms - now)).await;
                continue;
            }
            let txn = state.next_txn;
            match s.put_transaction(&service, txn, &body).await {
                Ok(()) => {
                    tracing::debug!("appservice {id}: transaction {txn} accepted");
                    if let Err(e) = s.store.appservice_delivered(&id, weft_core::now_ms()).await {
                        tracing::warn!("appservice {id}: cannot store the delivery: {}", e.message);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    state.position = upto;
                    state.next_txn += 1;
                    state.pending = None;
                    state.backoff_ms = 0;
                    state.retry_at_ms = 0;
                    pos = pos.max(upto);
                    persisted = Instant::now();
                }
                Err(e) => {
                    let backoff = state.backoff_ms.saturating_mul(2).clamp(initial, max);
                    let retry_at = weft_core::now_ms() + backoff;
                    tracing::warn!(
                        "appservice {id}: transaction {txn} failed ({}), retrying in {backoff} ms",
                        e.message
                    );
                    if let Err(e) = s.store.appservice_failed(&id, &e.message, backoff, retry_at).await {
                        tracing::warn!("appservice {id}: cannot store its state: {}", e.message);
                    }
                    state.backoff_ms = backoff;
                    state.retry_at_ms = retry_at;
                }
            }
            continue;
        }
        let upto = *rx.borrow_and_update();
        if upto <= pos {
            if persisted.elapsed() >= PERSIST_EVERY && pos > state.position {
                if s.store.appservice_advance(&id, pos).await.is_ok() {
                    state.position = pos;
                }
                persisted = Instant::now();
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(PERSIST_EVERY) => {}
            }
            continue;
        }
        match s.appservice_batch(&service, pos, upto).await {
            Ok((next, Some(body))) => match s.store.appservice_begin(&id, next, body.clone()).await {
                Ok(()) => state.pending = Some((next, body)),
                Err(e) => {
                    tracing::warn!("appservice {id}: cannot store a transaction: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Ok((next, None)) => pos = next,
            Err(e) => {
                tracing::warn!("appservice {id}: reading the stream failed, retrying: {}", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
