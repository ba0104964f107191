//! Receiving transactions (`PUT /_matrix/federation/v1/send/{txnId}`,
//! docs/federation.md "Receiving transactions"): the PDUs go through the
//! room pipeline, room by room in the order sent (rooms concurrently),
//! after their missing prev events were asked of the origin
//! (`/get_missing_events`); the EDUs (typing, receipts, presence, and the
//! end-to-end-encryption ones) are stored after them. The answer (a result
//! per PDU) is stored with the transaction's ID for a day: the same
//! transaction again is answered the same without being processed again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ruma::api::federation::event::get_missing_events;
use ruma::{
    CanonicalJsonObject, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, RoomVersionId, ServerName, UInt, UserId,
};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::watch;
use weft_core::{Error, ErrorKind, Result};
use weft_rooms::{Arrival, Outcome};
use weft_store::{PresenceRecord, ReceiptRecord};

use crate::Services;
use crate::federation_queue::{MAX_EDUS, MAX_PDUS};
use crate::federation_remote::Network;

/// One PDU's result, as the answer carries it.
pub type PduResults = BTreeMap<OwnedEventId, std::result::Result<(), String>>;

/// How long the answer to `/send` waits for the processing: under the
/// senders' usual request timeout (ours is 30 s). Past it the PDUs whose
/// processing has not ended are left out of the answer (they are still
/// processed), and the full answer is what a repeat gets.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);
/// How long a received transaction's answer is kept.
const KEEP_TXN_MS: u64 = 24 * 3600 * 1000;
/// Missing events asked of the origin for one gap.
const MISSING_LIMIT: u32 = 10;
/// How far below our shallowest forward extremity missing events are asked.
const MISSING_DEPTH_MARGIN: i64 = 20;
/// How long a remote user's `m.typing` lasts without a renewal.
const REMOTE_TYPING_MS: u64 = 30_000;

/// Transactions being processed in this process: (origin, txn ID) → the
/// results so far (complete when `done`).
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<(String, String), watch::Receiver<Progress>>>);

#[derive(Clone, Default)]
pub struct Progress {
    results: PduResults,
    done: bool,
}

impl Services {
    /// Takes in transaction `txn_id` of `origin`. More than 50 PDUs or 100
    /// EDUs: `400 M_BAD_JSON`. A PDU for a room this server does not know,
    /// or one `origin` is not in, fails alone (its result says why).
    pub async fn receive_transaction(
        self: &Arc<Self>,
        origin: &ServerName,
        txn_id: &str,
        pdus: Vec<Box<RawValue>>,
        edus: Vec<Box<RawValue>>,
    ) -> Result<PduResults> {
        if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
            return Err(Error::bad_json(format!(
                "A transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs ({} and {} sent)",
                pdus.len(),
                edus.len()
            )));
        }
        if let Some(stored) = self.store.received_txn(origin.as_str(), txn_id).await? {
            tracing::debug!("federation: transaction {txn_id} of {origin} again: answered as before");
            return Ok(parse_results(&stored));
        }
        self.destination_is_back(origin).await;
        let key = (origin.to_string(), txn_id.to_owned());
        let mut rx = {
            let mut inflight = self.fed_txns.0.lock();
            match inflight.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(Progress::default());
                    inflight.insert(key.clone(), rx.clone());
                    tokio::spawn(process_transaction(self.clone(), key, pdus, edus, tx));
                    rx
                }
            }
        };
        let done = tokio::time::timeout(ANSWER_WITHIN, rx.wait_for(|p| p.done))
            .await
            .is_ok();
        if !done {
            tracing::info!(
                "federation: transaction {txn_id} of {origin} still being processed: answered with what is done"
            );
        }
        Ok(rx.borrow().results.clone())
    }

    /// One PDU of a transaction: its room must be known here and have
    /// `origin` in it; missing prev events are asked of `origin` first.
    async fn receive_pdu(&self, origin: &ServerName, room_id: &RoomId, object: CanonicalJsonObject) -> Result<()> {
        let network = Network(&self.federation);
        if !self.rooms.server_in_room(room_id, origin).await? {
            return Err(Error::forbidden(format!("{origin} is not in {room_id}")));
        }
        self.acl_allows(room_id, origin).await?;
        let prevs: Vec<String> = object
            .get("prev_events")
            .and_then(|p| p.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let mut missing = false;
        for p in &prevs {
            if self.store.event_place(p).await?.is_none() {
                missing = true;
                break;
            }
        }
        if missing && let Some(event_id) = event_id_of(&object, &self.rooms.room_version(room_id).await?) {
            self.fetch_missing(origin, room_id, event_id, &network).await;
        }
        match self
            .rooms
            .input_pdu(room_id, object, origin, Arrival::New, &network)
            .await?
        {
            Outcome::Accepted(_) | Outcome::Known => Ok(()),
            Outcome::SoftFailed(why) => Err(Error::forbidden(format!("soft-failed: {why}"))),
            Outcome::Rejected(why) => Err(Error::forbidden(format!("rejected: {why}"))),
        }
    }

    /// Asks `origin` for the events between our forward extremities and
    /// `latest` and takes them in, oldest first. A failure leaves the gap
    /// to the pipeline (which asks for the state there).
    async fn fetch_missing(&self, origin: &ServerName, room_id: &RoomId, latest: OwnedEventId, network: &Network<'_>) {
        let extremities = match self.store.extremities(room_id.as_str()).await {
            Ok(e) => e,
            Err(_) => return,
        };
        let min_depth = extremities.iter().map(|(_, d)| *d).min().unwrap_or(0);
        let earliest = extremities
            .into_iter()
            .filter_map(|(id, _)| OwnedEventId::try_from(id).ok())
            .collect();
        let mut request = get_missing_events::v1::Request::new(room_id.to_owned(), earliest, vec![latest]);
        request.limit = UInt::from(MISSING_LIMIT);
        request.min_depth = UInt::try_from((min_depth - MISSING_DEPTH_MARGIN).max(0)).unwrap_or_default();
        let events = match self.federation.client.send(origin, request).await {
            Ok(r) => r.events,
            Err(e) => {
                tracing::info!(
                    "federation: missing events of {room_id} not had from {origin}: {}",
                    e.message
                );
                return;
            }
        };
        let mut objects: Vec<CanonicalJsonObject> = events
            .iter()
            .filter_map(|raw| serde_json::from_str(raw.get()).ok())
            .collect();
        objects.sort_by_key(|o| o.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap_or(0));
        for object in objects {
            if let Err(e) = self
                .rooms
                .input_pdu(room_id, object, origin, Arrival::New, network)
                .await
            {
                tracing::info!(
                    "federation: a missing event of {room_id} from {origin} not taken: {}",
                    e.message
                );
            }
        }
    }

    /// One EDU of a transaction; unknown types are ignored, and so are
    /// EDUs about users not of `origin` or not in the room.
    async fn receive_edu(&self, origin: &ServerName, edu: &Value) -> Result<()> {
        let Some(edu_type) = edu.get("edu_type").and_then(|t| t.as_str()) else {
            return Ok(());
        };
        let content = edu.get("content").cloned().unwrap_or(Value::Null);
        match edu_type {
            "m.typing" => self.receive_typing(origin, &content).await,
            "m.receipt" => self.receive_receipts(origin, &content).await,
            "m.presence" => self.receive_presence(origin, &content).await,
            "m.device_list_update" | "m.signing_key_update" | "m.direct_to_device" => {
                self.receive_e2ee_edu(origin, edu_type, content).await
            }
            _ => Ok(()),
        }
    }

    /// A user of `origin` joined to the room, or `None`.
    async fn remote_member(&self, origin: &ServerName, room: &str, user: &str) -> Option<(OwnedRoomId, String)> {
        let user_id = UserId::parse(user).ok()?;
        if user_id.server_name() != origin {
            return None;
        }
        let room_id = OwnedRoomId::try_from(room).ok()?;
        match self.rooms.membership(&room_id, &user_id).await {
            Ok(Some(m)) if m == "join" => Some((room_id, user_id.to_string())),
            _ => None,
        }
    }

    async fn receive_typing(&self, origin: &ServerName, content: &Value) -> Result<()> {
        let (Some(room), Some(user)) = (
            content.get("room_id").and_then(|r| r.as_str()),
            content.get("user_id").and_then(|u| u.as_str()),
        ) else {
            return Ok(());
        };
        let Some((room_id, user)) = self.remote_member(origin, room, user).await else {
            return Ok(());
        };
        let typing = content.get("typing").and_then(|t| t.as_bool()).unwrap_or(false);
        let expires = typing.then(|| weft_core::now_ms() + REMOTE_TYPING_MS);
        self.store
            .set_typing(room_id.as_str(), &user, expires)
            .await
            .map_err(|_| Error::internal("typing not stored"))??;
        if typing {
            self.ephemeral_wake.notify_one();
        }
        Ok(())
    }

    /// `{room_id: {"m.read": {user_id: {"event_ids": [...], "data": {...}}}}}`
    async fn receive_receipts(&self, origin: &ServerName, content: &Value) -> Result<()> {
        let Some(rooms) = content.as_object() else {
            return Ok(());
        };
        for (room, types) in rooms {
            let Some(read) = types.get(crate::ephemeral::RECEIPT_READ).and_then(|r| r.as_object()) else {
                continue;
            };
            for (user, receipt) in read {
                let Some((room_id, user)) = self.remote_member(origin, room, user).await else {
                    continue;
                };
                let Some(event_id) = receipt
                    .get("event_ids")
                    .and_then(|e| e.as_array())
                    .and_then(|e| e.last())
                    .and_then(|e| e.as_str())
                else {
                    continue;
                };
                // Only for an event of that room we have.
                match self.store.get_event(event_id).await? {
                    Some(ev) if ev.room_id == room_id.as_str() => {}
                    _ => continue,
                }
                let data = receipt.get("data");
                let record = ReceiptRecord {
                    room_id: room_id.to_string(),
                    receipt_type: crate::ephemeral::RECEIPT_READ.to_owned(),
                    user_id: user,
                    thread_id: data
                        .and_then(|d| d.get("thread_id"))
                        .and_then(|t| t.as_str())
                        .unwrap_or("")
                        .to_owned(),
                    event_id: event_id.to_owned(),
                    ts: data
                        .and_then(|d| d.get("ts"))
                        .and_then(|t| t.as_u64())
                        .unwrap_or_else(weft_core::now_ms),
                    position: 0,
                };
                self.store
                    .put_receipt(record)
                    .await
                    .map_err(|_| Error::internal("receipt not stored"))??;
            }
        }
        Ok(())
    }

    /// `{"push": [{"user_id", "presence", "status_msg"?, "last_active_ago"?, ...}]}`:
    /// kept for users of `origin` sharing a room with this server.
    async fn receive_presence(&self, origin: &ServerName, content: &Value) -> Result<()> {
        if !self.config.presence.enabled {
            return Ok(());
        }
        let Some(push) = content.get("push").and_then(|p| p.as_array()) else {
            return Ok(());
        };
        for p in push {
            let Some(user) = p.get("user_id").and_then(|u| u.as_str()) else {
                continue;
            };
            let Ok(user_id) = UserId::parse(user) else { continue };
            if user_id.server_name() != origin {
                continue;
            }
            let presence = match p.get("presence").and_then(|s| s.as_str()) {
                Some(s @ (crate::ephemeral::ONLINE | crate::ephemeral::UNAVAILABLE | crate::ephemeral::OFFLINE)) => {
                    s.to_owned()
                }
                _ => continue,
            };
            if !self
                .store
                .user_memberships(user)
                .await?
                .iter()
                .any(|m| m.membership == "join")
            {
                continue;
            }
            let status_msg = p.get("status_msg").and_then(|s| s.as_str()).map(str::to_owned);
            let ago = p.get("last_active_ago").and_then(|a| a.as_u64()).unwrap_or(0);
            let last_active_ms = weft_core::now_ms().saturating_sub(ago);
            let user = user_id.to_string();
            let edit = Box::new(move |old: Option<PresenceRecord>| {
                let changed = old
                    .as_ref()
                    .is_none_or(|o| o.presence != presence || o.status_msg != status_msg);
                let record = PresenceRecord {
                    user_id: user,
                    presence,
                    status_msg,
                    last_active_ms,
                    // The user's own server says when they go offline.
                    online_until_ms: 0,
                    position: 0,
                };
                Some((record, changed))
            });
            self.store
                .edit_presence(user_id.as_str(), edit)
                .await
                .map_err(|_| Error::internal("presence not stored"))??;
        }
        Ok(())
    }
}

/// Processes a transaction: rooms concurrently, each room's PDUs in order,
/// then the EDUs; stores the answer, then publishes it as done.
async fn process_transaction(
    s: Arc<Services>,
    key: (String, String),
    pdus: Vec<Box<RawValue>>,
    edus: Vec<Box<RawValue>>,
    tx: watch::Sender<Progress>,
) {
    let Ok(origin) = OwnedServerName::try_from(key.0.as_str()) else {
        return;
    };
    let (pdu_count, edu_count) = (pdus.len(), edus.len());
    // Grouped by room, in the order sent.
    let mut rooms: Vec<(String, Vec<CanonicalJsonObject>)> = Vec::new();
    for raw in pdus {
        let Ok(object) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else {
            tracing::info!("federation: an unreadable PDU from {origin} ignored");
            continue;
        };
        let room = object
            .get("room_id")
            .and_then(|r| r.as_str())
            .unwrap_or_default()
            .to_owned();
        match rooms.iter_mut().find(|(r, _)| *r == room) {
            Some((_, list)) => list.push(object),
            None => rooms.push((room, vec![object])),
        }
    }
    let tx = Arc::new(tx);
    let mut tasks = tokio::task::JoinSet::new();
    for (room, objects) in rooms {
        tasks.spawn(receive_room_pdus(s.clone(), origin.clone(), room, objects, tx.clone()));
    }
    while tasks.join_next().await.is_some() {}
    for edu in &edus {
        let Ok(edu) = serde_json::from_str::<Value>(edu.get()) else {
            continue;
        };
        if let Err(e) = s.receive_edu(&origin, &edu).await {
            tracing::info!("federation: an EDU from {origin} not taken: {}", e.message);
        }
    }
    let results = tx.borrow().results.clone();
    let now = weft_core::now_ms();
    if let Err(e) = s
        .store
        .put_received_txn(
            &key.0,
            &key.1,
            &results_json(&results),
            now,
            now.saturating_sub(KEEP_TXN_MS),
        )
        .await
    {
        tracing::warn!(
            "federation: the answer to transaction {} of {origin} not stored: {}",
            key.1,
            e.message
        );
    }
    tracing::info!(
        "federation: received transaction {} from {origin}: {pdu_count} PDUs, {edu_count} EDUs",
        key.1
    );
    tx.send_modify(|p| p.done = true);
    s.fed_txns.0.lock().remove(&key);
}

/// The PDUs of one room of a transaction, in order.
async fn receive_room_pdus(
    s: Arc<Services>,
    origin: OwnedServerName,
    room: String,
    objects: Vec<CanonicalJsonObject>,
    tx: Arc<watch::Sender<Progress>>,
) {
    let room_id = OwnedRoomId::try_from(room.as_str()).ok();
    let version = match &room_id {
        Some(r) => s.rooms.room_version(r).await,
        None => Err(Error::not_found("no room ID")),
    };
    for object in objects {
        let id_version = version.as_ref().unwrap_or(s.rooms.default_version());
        let Some(event_id) = event_id_of(&object, id_version) else {
            tracing::info!("federation: a PDU from {origin} without a computable event ID ignored");
            continue;
        };
        let result = match (&room_id, &version) {
            (Some(room_id), Ok(_)) => s.receive_pdu(&origin, room_id, object).await,
            (_, Err(e)) if e.kind == ErrorKind::NotFound => Err(Error::not_found(format!("Unknown room {room}"))),
            (_, Err(e)) => Err(e.clone()),
            (None, Ok(_)) => Err(Error::not_found(format!("Unknown room {room}"))),
        };
        if let Err(e) = &result {
            tracing::debug!("federation: {event_id} from {origin} not taken: {}", e.message);
        }
        tx.send_modify(|p| {
            p.results.insert(event_id, result.map_err(|e| e.message));
        });
    }
}

/// A PDU's event ID in a room of `version` (from its reference hash).
fn event_id_of(object: &CanonicalJsonObject, version: &RoomVersionId) -> Option<OwnedEventId> {
    let rules = version.rules()?;
    let mut object = object.clone();
    object.remove("unsigned");
    let hash = ruma::signatures::reference_hash(&object, &rules).ok()?;
    OwnedEventId::try_from(format!("${hash}")).ok()
}

/// The answer's `pdus` as stored: `{event_id: {} | {"error": why}}`.
fn results_json(results: &PduResults) -> String {
    let map: serde_json::Map<String, Value> = results
        .iter()
        .map(|(id, r)| {
            let v = match r {
                Ok(()) => serde_json::json!({}),
                Err(why) => serde_json::json!({ "error": why }),
            };
            (id.to_string(), v)
        })
        .collect();
    Value::Object(map).to_string()
}

fn parse_results(stored: &str) -> PduResults {
    let v: Value = serde_json::from_str(stored).unwrap_or_default();
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(id, r)| {
                    let id = OwnedEventId::try_from(id.as_str()).ok()?;
                    let r = match r.get("error").and_then(|e| e.as_str()) {
                        Some(why) => Err(why.to_owned()),
                        None => Ok(()),
                    };
                    Some((id, r))
                })
                .collect()
        })
        .unwrap_or_default()
}
