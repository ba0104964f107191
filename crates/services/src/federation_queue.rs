//! The outgoing federation queue (docs/federation.md "Sending: the
//! outgoing queue"): what other servers must hear of, kept in the database
//! until they accept it.
//!
//! - The **queue reader** follows the one ordered stream after its durable
//!   position (the `meta` key `federation_queued`), like the push
//!   evaluator: a local user's event goes, as its stored PDU, to every
//!   other server in the room (and, for a membership event, to the target
//!   user's server: a kicked or leaving server hears of it); typing,
//!   receipt and presence changes of local users become `m.typing`,
//!   `m.receipt` and `m.presence` EDUs for the servers sharing the room;
//!   a local user's device list change asks
//!   [`Services::device_list_update_edus`]. The rows of a batch and the new
//!   position are one write, so a restart resumes exactly there.
//! - A **sender task per destination** sends its rows in order, in
//!   transactions of at most 50 PDUs and 100 EDUs, and deletes them once
//!   the destination accepted the transaction (per-PDU errors in its answer
//!   do not make it send them again). A failure waits
//!   `[federation] retry_initial_ms`, doubling up to `retry_max_ms`
//!   (stored in `destinations`, so a restart keeps the wait); a success
//!   clears it. Transaction IDs are the first and last row IDs of the
//!   transaction: row IDs are never reused, so they are unique per
//!   destination across restarts, and a transaction sent again after a
//!   lost answer keeps its ID (the receiver answers it without processing
//!   it again).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ruma::api::federation::transactions::send_transaction_message;
use ruma::serde::Raw;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedServerName, OwnedTransactionId, OwnedUserId, ServerName};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use weft_core::{Error, Result};
use weft_store::{DestinationRecord, NewOutboxRow, OutboxKind, StoredEvent, StreamKey};

use crate::Services;

/// `meta` key: the last stream position the queue reader has queued.
const FEDERATION_QUEUED: &str = "federation_queued";
/// Events read per batch (one write each).
const READ_BATCH: usize = 256;
/// Most PDUs and EDUs in one transaction (the spec's limits).
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;
/// Most bytes of PDUs and EDUs in one transaction (a single larger row
/// still goes alone).
const MAX_TXN_BYTES: usize = 900 * 1024;
/// How often an idle sender task looks at its queue anyway (rows queued
/// by another process sharing the database).
const RESCAN: Duration = Duration::from_secs(30);

/// The queue's state in this process's memory: a wake-up per sender task
/// (reached through the manager task's channel), and the local typers last
/// announced per room (to send `typing: false` for those who stopped).
pub struct QueueRuntime {
    wake_tx: mpsc::UnboundedSender<OwnedServerName>,
    /// Held by the sender manager while it runs (this process leads).
    wake_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<OwnedServerName>>,
    typing_sent: Mutex<HashMap<String, BTreeSet<String>>>,
    /// The reader's position last written to the database, and when.
    position_written: Mutex<(i64, std::time::Instant)>,
}

impl QueueRuntime {
    pub(crate) fn new() -> Self {
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Self {
            wake_tx,
            wake_rx: tokio::sync::Mutex::new(wake_rx),
            typing_sent: Mutex::new(HashMap::new()),
            position_written: Mutex::new((0, std::time::Instant::now())),
        }
    }
}

impl Services {
    /// Starts the queue reader and a sender task for every destination
    /// with queued rows, while this process leads (docs/scale-out.md).
    /// The first start with federation stores the reader's position (from
    /// now on, not history) before anything is served, so what is sent
    /// before a leader's reader runs is queued too. Nothing runs with
    /// federation off.
    pub async fn start_federation_queue(self: &Arc<Self>) -> Result<()> {
        if !self.config.federation.enabled {
            return Ok(());
        }
        let now = self.store.current_position().to_string();
        self.store.init_meta(FEDERATION_QUEUED, &now).await?;
        self.run_led("federation queue reader", queue_reader);
        self.run_led("federation senders", sender_manager);
        Ok(())
    }

    /// Queues an EDU for `destination`, durably: it is sent in a later
    /// transaction to that server, retried until it is accepted.
    pub async fn queue_edu(&self, destination: &ServerName, edu_type: &str, content: Value) -> Result<()> {
        if !self.config.federation.enabled {
            return Err(Error::forbidden(
                "Federation is disabled on this server ([federation] enabled)",
            ));
        }
        if destination == self.server_name {
            return Err(Error::invalid_param("An EDU for this server itself"));
        }
        let row = edu_row(destination, edu_type, content)?;
        self.store
            .queue_federation(vec![row], None)
            .await
            .map_err(|_| Error::internal("EDU not queued"))??;
        self.wake_destination(destination);
        Ok(())
    }

    /// Queues a remote server's event for every other server in its room
    /// (not ours, not `origin`): a join or leave taken in by `send_join` /
    /// `send_leave`, which only we can pass on.
    pub async fn forward_pdu(
        &self,
        room_id: &ruma::RoomId,
        event_id: &ruma::EventId,
        origin: &ServerName,
    ) -> Result<()> {
        let Some(ev) = self.store.get_event(event_id.as_str()).await? else {
            return Ok(());
        };
        let rows: Vec<NewOutboxRow> = self
            .rooms
            .servers_in_room(room_id)
            .await?
            .into_iter()
            .filter(|s| *s != self.server_name && s != origin)
            .map(|dest| NewOutboxRow {
                destination: dest.to_string(),
                kind: OutboxKind::Pdu,
                json: ev.pdu_json.clone(),
            })
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let destinations: Vec<String> = rows.iter().map(|r| r.destination.clone()).collect();
        self.store
            .queue_federation(rows, None)
            .await
            .map_err(|_| Error::internal("PDU not queued"))??;
        for d in destinations {
            if let Ok(d) = ruma::OwnedServerName::try_from(d) {
                self.wake_destination(&d);
            }
        }
        Ok(())
    }

    /// Every destination tried or with queued rows (`weft federation
    /// destinations`).
    pub async fn federation_destinations(&self) -> Result<Vec<DestinationRecord>> {
        self.store.destinations().await
    }

    /// Wakes the sender task of `destination`, starting it if it has none,
    /// when this process leads. (Rows queued on another process wake it
    /// through the stream: [`weft_store::StreamKey::Outbox`].)
    pub(crate) fn wake_destination(&self, destination: &ServerName) {
        if self.is_leader() {
            let _ = self.fed_queue.wake_tx.send(destination.to_owned());
        }
    }

    /// A destination we had given up on for a while sent us something: it
    /// is back, so its queue is tried now instead of after its backoff.
    pub(crate) async fn destination_is_back(&self, destination: &ServerName) {
        if let Ok(Some(d)) = self.store.destination(destination.as_str()).await
            && d.retry_at_ms > weft_core::now_ms()
        {
            let _ = self
                .store
                .destination_failed(
                    destination.as_str(),
                    d.last_error.as_deref().unwrap_or(""),
                    d.backoff_ms,
                    0,
                )
                .await;
            if self.is_leader() {
                self.wake_destination(destination);
            } else {
                // The leading process's sender waits out the old backoff:
                // it is told through the stream.
                let _ = self.store.announce_destination(destination.as_str()).await;
            }
        }
    }

    /// The rows for the events in (after, upto] (at most [`READ_BATCH`]
    /// events) and the ephemeral changes there; queued with the new reader
    /// position in one write. Answers that position and the destinations
    /// to wake.
    async fn queue_batch(&self, after: i64, upto: i64) -> Result<(i64, BTreeSet<OwnedServerName>)> {
        let StreamWindow { changes, events, next } = self.stream_window(after, upto, READ_BATCH).await?;
        let mut rows = Vec::new();
        let mut rooms: HashMap<String, BTreeSet<OwnedServerName>> = HashMap::new();
        for ev in &events {
            self.queue_event(ev, &mut rooms, &mut rows).await?;
        }
        // Ephemeral changes are known only from this process's recent
        // changes: after a restart the ones before it are not sent (they
        // time out or are superseded anyway).
        let mut seen = std::collections::HashSet::new();
        for (p, key) in changes.unwrap_or_default() {
            if p > next || !seen.insert(format!("{key:?}")) {
                continue;
            }
            match key {
                StreamKey::Typing(room) => self.queue_typing(&room, &mut rows).await?,
                StreamKey::Receipt(room) => self.queue_receipts(&room, after, next, &mut rows).await?,
                StreamKey::Presence(user) => self.queue_presence(&user, &mut rows).await?,
                StreamKey::DeviceKeys(user) if self.is_local(&user) => {
                    if let Ok(user_id) = OwnedUserId::try_from(user.as_str()) {
                        for (dest, content) in self.device_list_update_edus(&user_id, p).await? {
                            rows.push(edu_row(&dest, "m.device_list_update", content)?);
                        }
                    }
                }
                _ => {}
            }
        }
        let wake: BTreeSet<OwnedServerName> = rows
            .iter()
            .filter_map(|r| OwnedServerName::try_from(r.destination.as_str()).ok())
            .collect();
        // With nothing to queue, the position is written only now and then
        // (not a write per batch on the hot path): after a restart the
        // reader looks again at what it had already found nothing in.
        let persist = !rows.is_empty() || {
            let mut last = self.fed_queue.position_written.lock();
            let due = next - last.0 >= 10_000 || last.1.elapsed() >= Duration::from_secs(5);
            if due {
                *last = (next, std::time::Instant::now());
            }
            due
        };
        if persist {
            self.store
                .queue_federation(rows, Some(next))
                .await
                .map_err(|_| Error::internal("federation queue not stored"))??;
        }
        Ok((next, wake))
    }

    /// What a durable reader of the stream (this queue, the application
    /// services' delivery) looks at next after `after`: the events in
    /// (after, upto], at most `limit` (none read when this process's
    /// record of recent changes shows none), that record, and the position
    /// the window ends at.
    pub(crate) async fn stream_window(&self, after: i64, upto: i64, limit: usize) -> Result<StreamWindow> {
        let changes = self.store.changes_since(after);
        let has_events = changes
            .as_ref()
            .is_none_or(|c| c.iter().any(|(p, k)| *p <= upto && matches!(k, StreamKey::Room(_))));
        let events = if has_events {
            self.store.events_after(after, upto, limit).await?
        } else {
            Vec::new()
        };
        let next = match events.last() {
            Some(last) if events.len() == limit => last.position,
            _ => upto,
        };
        Ok(StreamWindow { changes, events, next })
    }

    fn is_local(&self, user_id: &str) -> bool {
        ruma::UserId::parse(user_id).is_ok_and(|u| u.server_name() == self.server_name)
    }

    /// The other servers in a room now (kept per batch, dropped at each
    /// membership event).
    async fn room_servers<'a>(
        &self,
        room: &str,
        cache: &'a mut HashMap<String, BTreeSet<OwnedServerName>>,
    ) -> Result<&'a BTreeSet<OwnedServerName>> {
        if !cache.contains_key(room) {
            let servers = match OwnedRoomId::try_from(room) {
                Ok(room_id) => match self.rooms.servers_in_room(&room_id).await {
                    Ok(s) => s,
                    Err(e) if e.kind == weft_core::ErrorKind::NotFound => BTreeSet::new(),
                    Err(e) => return Err(e),
                },
                Err(_) => BTreeSet::new(),
            };
            let others = servers.into_iter().filter(|s| *s != self.server_name).collect();
            cache.insert(room.to_owned(), others);
        }
        cache.get(room).ok_or_else(|| Error::internal("room servers missing"))
    }

    async fn queue_event(
        &self,
        ev: &StoredEvent,
        rooms: &mut HashMap<String, BTreeSet<OwnedServerName>>,
        rows: &mut Vec<NewOutboxRow>,
    ) -> Result<()> {
        if ev.event_type == "m.room.member" {
            rooms.remove(&ev.room_id);
        }
        if !self.is_local(&ev.sender) {
            return Ok(());
        }
        let mut destinations = self.room_servers(&ev.room_id, rooms).await?.clone();
        if ev.event_type == "m.room.member"
            && let Some(target) = ev.state_key.as_deref().and_then(|k| ruma::UserId::parse(k).ok())
            && target.server_name() != self.server_name
        {
            destinations.insert(target.server_name().to_owned());
        }
        for dest in destinations {
            rows.push(NewOutboxRow {
                destination: dest.to_string(),
                kind: OutboxKind::Pdu,
                json: ev.pdu_json.clone(),
            });
        }
        Ok(())
    }

    /// `m.typing` EDUs for the local users who started or stopped typing
    /// in `room` since the last ones sent.
    async fn queue_typing(&self, room: &str, rows: &mut Vec<NewOutboxRow>) -> Result<()> {
        let (users, _) = self.store.typing(room, weft_core::now_ms()).await?;
        let now: BTreeSet<String> = users.into_iter().filter(|u| self.is_local(u)).collect();
        let before = {
            let mut sent = self.fed_queue.typing_sent.lock();
            if now.is_empty() {
                sent.remove(room).unwrap_or_default()
            } else {
                sent.insert(room.to_owned(), now.clone()).unwrap_or_default()
            }
        };
        let changes: Vec<(&String, bool)> = now
            .iter()
            .filter(|u| !before.contains(*u))
            .map(|u| (u, true))
            .chain(before.iter().filter(|u| !now.contains(*u)).map(|u| (u, false)))
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let servers = self.room_servers(room, &mut HashMap::new()).await?.clone();
        for dest in &servers {
            for (user, typing) in &changes {
                let content = json!({ "room_id": room, "user_id": user, "typing": typing });
                rows.push(edu_row(dest, "m.typing", content)?);
            }
        }
        Ok(())
    }

    /// One `m.receipt` EDU per server in the room for the public receipts
    /// local users set in (after, upto].
    async fn queue_receipts(&self, room: &str, after: i64, upto: i64, rows: &mut Vec<NewOutboxRow>) -> Result<()> {
        let mut read = serde_json::Map::new();
        for r in self.store.receipts_since(room, after, upto).await? {
            if r.receipt_type != crate::ephemeral::RECEIPT_READ || !self.is_local(&r.user_id) {
                continue;
            }
            let mut data = json!({ "ts": r.ts });
            if !r.thread_id.is_empty() {
                data["thread_id"] = json!(r.thread_id);
            }
            read.insert(r.user_id.clone(), json!({ "event_ids": [r.event_id], "data": data }));
        }
        if read.is_empty() {
            return Ok(());
        }
        let content = json!({ room: { "m.read": read } });
        for dest in self.room_servers(room, &mut HashMap::new()).await?.clone() {
            rows.push(edu_row(&dest, "m.receipt", content.clone())?);
        }
        Ok(())
    }

    /// An `m.presence` EDU for a local user's presence, to every server
    /// sharing a room with them.
    async fn queue_presence(&self, user: &str, rows: &mut Vec<NewOutboxRow>) -> Result<()> {
        if !self.is_local(user) || !self.config.presence.enabled {
            return Ok(());
        }
        let Some(r) = self.store.presence(user).await? else {
            return Ok(());
        };
        let mut servers = BTreeSet::new();
        let mut cache = HashMap::new();
        for m in self.store.user_memberships(user).await? {
            if m.membership == "join" {
                servers.extend(self.room_servers(&m.room_id, &mut cache).await?.iter().cloned());
            }
        }
        if servers.is_empty() {
            return Ok(());
        }
        let now = weft_core::now_ms();
        let ago = now.saturating_sub(r.last_active_ms);
        let mut push = json!({
            "user_id": r.user_id,
            "presence": r.presence,
            "last_active_ago": ago,
            "currently_active": r.presence == crate::ephemeral::ONLINE && ago < crate::ephemeral::CURRENTLY_ACTIVE_MS,
        });
        if let Some(msg) = &r.status_msg {
            push["status_msg"] = json!(msg);
        }
        let content = json!({ "push": [push] });
        for dest in servers {
            rows.push(edu_row(&dest, "m.presence", content.clone())?);
        }
        Ok(())
    }

    /// Sends a transaction built by the operator (`weft federation
    /// send-transaction`): `body` is `{"pdus": [...], "edus": [...]}`;
    /// answers the destination's response as JSON.
    pub async fn send_transaction_now(&self, destination: &ServerName, txn_id: &str, body: &str) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            pdus: Vec<Box<serde_json::value::RawValue>>,
            #[serde(default)]
            edus: Vec<Box<serde_json::value::RawValue>>,
        }
        let body: Body =
            serde_json::from_str(body).map_err(|e| Error::bad_json(format!("Invalid transaction: {e}")))?;
        let mut request = send_transaction_message::v1::Request::new(
            OwnedTransactionId::from(txn_id),
            self.server_name.clone(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        request.pdus = body.pdus;
        request.edus = body.edus.into_iter().map(Raw::from_json).collect();
        let response = self.federation.client.send(destination, request).await?;
        let pdus: serde_json::Map<String, Value> = response
            .pdus
            .into_iter()
            .map(|(id, r)| {
                let v = match r {
                    Ok(()) => json!({}),
                    Err(why) => json!({ "error": why }),
                };
                (id.to_string(), v)
            })
            .collect();
        Ok(json!({ "pdus": pdus }).to_string())
    }

    /// Sends one transaction of `destination`'s oldest rows. `Ok(false)`:
    /// nothing was queued.
    async fn send_one_transaction(&self, destination: &ServerName) -> Result<bool> {
        let mut rows = self.store.outbox(destination.as_str(), MAX_PDUS, MAX_EDUS).await?;
        // Under the usual request body limit (ours is 1 MiB): the oldest
        // rows up to it, at least one.
        let mut size = 0;
        let fits = rows
            .iter()
            .take_while(|r| {
                size += r.json.len() + 1;
                size <= MAX_TXN_BYTES
            })
            .count();
        rows.truncate(fits.max(1));
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(false);
        };
        let txn_id = OwnedTransactionId::from(format!("{}-{}", first.id, last.id));
        let mut request = send_transaction_message::v1::Request::new(
            txn_id.clone(),
            self.server_name.clone(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        for row in &rows {
            let raw = serde_json::value::RawValue::from_string(row.json.clone()).map_err(Error::internal)?;
            match row.kind {
                OutboxKind::Pdu => request.pdus.push(raw),
                OutboxKind::Edu => request.edus.push(Raw::from_json(raw)),
            }
        }
        let (pdus, edus) = (request.pdus.len(), request.edus.len());
        let response = self.federation.client.send(destination, request).await?;
        for (event_id, result) in &response.pdus {
            if let Err(why) = result {
                tracing::info!("federation: {destination} refused {event_id} (transaction {txn_id}): {why}");
            }
        }
        tracing::debug!("federation: {destination} accepted transaction {txn_id} ({pdus} PDUs, {edus} EDUs)");
        let ids = rows.iter().map(|r| r.id).collect();
        self.store
            .outbox_sent(destination.as_str(), ids, weft_core::now_ms())
            .await?;
        Ok(true)
    }
}

/// A window of the stream as [`Services::stream_window`] reads it.
pub(crate) struct StreamWindow {
    /// The recent changes after the window's start (`None`: older than
    /// what this process keeps).
    pub changes: Option<Vec<(i64, StreamKey)>>,
    pub events: Vec<StoredEvent>,
    /// Every event up to here has been read.
    pub next: i64,
}

/// An EDU row for the queue.
fn edu_row(destination: &ServerName, edu_type: &str, content: Value) -> Result<NewOutboxRow> {
    Ok(NewOutboxRow {
        destination: destination.to_string(),
        kind: OutboxKind::Edu,
        json: serde_json::to_string(&json!({ "edu_type": edu_type, "content": content })).map_err(Error::internal)?,
    })
}

/// The queue reader: follows the stream, one batch at a time.
async fn queue_reader(s: Arc<Services>) {
    let mut rx = s.store.subscribe_position();
    let mut pos = loop {
        match s.store.get_meta(FEDERATION_QUEUED).await {
            // The first start with federation: from now on, not history.
            Ok(v) => break v.and_then(|v| v.parse::<i64>().ok()).unwrap_or_else(|| *rx.borrow()),
            Err(e) => {
                tracing::warn!("federation: cannot read the queue position: {}", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        let upto = *rx.borrow_and_update();
        if upto > pos {
            match s.queue_batch(pos, upto).await {
                Ok((next, wake)) => {
                    pos = next;
                    for d in wake {
                        s.wake_destination(&d);
                    }
                }
                Err(e) => {
                    tracing::warn!("federation: queueing failed, retrying: {}", e.message);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps one sender task per destination: starts one for every destination
/// with queued rows, then for each destination woken that has none.
/// Destinations are woken by this process (its own queue reader, rows it
/// queued) and, through the stream, by rows another process queued
/// ([`StreamKey::Outbox`]). Runs while this process leads; its sender
/// tasks end with it.
async fn sender_manager(s: Arc<Services>) {
    let mut wake = s.fed_queue.wake_rx.lock().await;
    // Wake-ups from an earlier time this process led: every destination
    // with rows is started below anyway.
    while wake.try_recv().is_ok() {}
    let mut rx = s.store.subscribe_position();
    let mut seen = *rx.borrow_and_update();
    let mut tasks: HashMap<OwnedServerName, Arc<Notify>> = HashMap::new();
    let start = |tasks: &mut HashMap<OwnedServerName, Arc<Notify>>, d: OwnedServerName| match tasks.get(&d) {
        Some(n) => n.notify_one(),
        None => {
            let notify = Arc::new(Notify::new());
            tasks.insert(d.clone(), notify.clone());
            s.spawn_led(sender_task(s.clone(), d, notify));
        }
    };
    let start_queued = |tasks: &mut HashMap<OwnedServerName, Arc<Notify>>, list: Vec<String>| {
        for d in list {
            if let Ok(d) = OwnedServerName::try_from(d) {
                start(tasks, d);
            }
        }
    };
    match s.store.outbox_destinations().await {
        Ok(list) => start_queued(&mut tasks, list),
        Err(e) => tracing::warn!("federation: cannot list queued destinations: {}", e.message),
    }
    loop {
        tokio::select! {
            d = wake.recv() => match d {
                Some(d) => start(&mut tasks, d),
                None => return,
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let upto = *rx.borrow_and_update();
                let woken = s.stream_keys(seen, upto, |k| match k {
                    StreamKey::Outbox(d) => OwnedServerName::try_from(d).ok(),
                    _ => None,
                });
                match woken {
                    Some(destinations) => {
                        for d in destinations {
                            start(&mut tasks, d);
                        }
                    }
                    // Past what this process remembers: ask the database.
                    None => {
                        if let Ok(list) = s.store.outbox_destinations().await {
                            start_queued(&mut tasks, list);
                        }
                    }
                }
                seen = upto;
            }
        }
    }
}

/// Sends one destination's queue in order, waiting out its backoff after
/// a failure. Runs for the life of the process.
async fn sender_task(s: Arc<Services>, destination: OwnedServerName, notify: Arc<Notify>) {
    let initial = s.config.federation.retry_initial_ms.max(1);
    let max = s.config.federation.retry_max_ms.max(initial);
    loop {
        // A wait left by a failure (of this process or one before it).
        let state = s.store.destination(destination.as_str()).await.ok().flatten();
        let now = weft_core::now_ms();
        if let Some(d) = &state
            && d.retry_at_ms > now
        {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(d.retry_at_ms - now)) => {}
                // Woken: maybe it came back (it sent us something).
                _ = notify.notified() => {}
            }
            continue;
        }
        match s.send_one_transaction(&destination).await {
            Ok(true) => continue,
            Ok(false) => {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(RESCAN) => {}
                }
            }
            Err(e) => {
                let backoff = state
                    .map(|d| d.backoff_ms.saturating_mul(2))
                    .unwrap_or(0)
                    .clamp(initial, max);
                let queued = s
                    .store
                    .destination(destination.as_str())
                    .await
                    .ok()
                    .flatten()
                    .map(|d| (d.queued_pdus, d.queued_edus))
                    .unwrap_or_default();
                tracing::warn!(
                    "federation: sending to {destination} failed ({} PDUs, {} EDUs queued), retrying in {} ms: {}",
                    queued.0,
                    queued.1,
                    backoff,
                    e.message
                );
                if let Err(e) = s
                    .store
                    .destination_failed(destination.as_str(), &e.message, backoff, weft_core::now_ms() + backoff)
                    .await
                {
                    tracing::warn!("federation: cannot store the state of {destination}: {}", e.message);
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
            }
        }
    }
}

/// For the admin view: how long ago, as text.
pub fn describe_ms_from_now(ts: u64, now: u64) -> String {
    if ts == 0 {
        return "-".into();
    }
    if ts >= now {
        format!("in {} s", (ts - now).div_ceil(1000))
    } else {
        format!("{} s ago", (now - ts) / 1000)
    }
}
