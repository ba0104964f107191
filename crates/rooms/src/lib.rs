//! The event pipeline: every event, from any door, is built, hashed and
//! signed here, checked against its room version's authorization rules at
//! the room's current state (ruma `state-res`), persisted through the store
//! (which gives it its stream position), and only then acknowledged.
//! Authorization of events is decided here and nowhere else.
//!
//! Depends on `weft-store` for persistence; knows nothing of HTTP or other
//! doors. Rooms are linear (one forward extremity) while Weft has no
//! federation: each event's `prev_events` is the room's previous event.

mod cache;
mod client_event;
mod create;
mod input;
pub mod keys;
mod pdu;
mod perform;
mod query;
mod turn;
mod visibility;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    signatures::Ed25519KeyPair,
};
use weft_core::{Error, ErrorKind, Result};
use weft_store::{CurrentStateChange, EventKind, NewEvent, NewRoom, NewStateGroup, Store, StoredEvent};

use cache::RoomCache;
pub use client_event::{client_event, strip_state};
pub use create::{CreateRoom, Preset};
pub use input::{Arrival, Outcome, Remote};
pub use pdu::Pdu;
pub use perform::room_id_of;
pub use query::MAX_HISTORY_EVENTS;
pub use visibility::Visibility;

/// What a caller asks to send.
#[derive(Debug, Clone)]
pub struct EventSpec {
    pub event_type: String,
    pub state_key: Option<String>,
    pub content: CanonicalJsonObject,
    /// For `m.room.redaction`: the event to redact.
    pub redacts: Option<OwnedEventId>,
    /// (device_id, txn_id) for idempotent client sends.
    pub txn: Option<(String, String)>,
    /// `origin_server_ts` instead of now: an application service's `?ts=`
    /// (timestamp massaging).
    pub origin_server_ts: Option<u64>,
}

impl EventSpec {
    pub fn new(event_type: impl Into<String>, state_key: Option<String>, content: CanonicalJsonObject) -> Self {
        Self {
            event_type: event_type.into(),
            state_key,
            content,
            redacts: None,
            txn: None,
            origin_server_ts: None,
        }
    }
}

/// Result of a successful send.
#[derive(Debug, Clone)]
pub struct Sent {
    pub event_id: OwnedEventId,
    pub position: i64,
}

pub(crate) type StateKey = (String, String);

/// A new local event is built on at most this many forward extremities
/// (the deepest), as Synapse does.
pub(crate) const MAX_PREV_EVENTS: usize = 10;
/// State group IDs reserved from the store at once.
const GROUP_IDS_AT_ONCE: i64 = 32;
/// A new state group past this many deltas is a full snapshot.
pub(crate) const MAX_CHAIN: i64 = 100;

/// How often a local event is built again on a room another process
/// wrote to meanwhile (each time after reading the room again) before the
/// send fails with `503`. Only events on a room whose state changed
/// meanwhile (and a few others: see [`weft_store::NewEvent::rebaseable`])
/// come back here: the store's writer builds the rest again itself
/// ([`LocalRebase`]).
const MAX_REBUILDS: u32 = 30;

/// One room: the pipeline's view of it, under the room's lock, and the
/// local events built on that view that are not known durable yet.
///
/// With several processes on one database (docs/scale-out.md) the view
/// can go stale: the store then refuses an event built on it
/// ([`ErrorKind::RoomMoved`]) and the event is built again on the room as
/// stored, with every event built after it on the same view (they are
/// refused too, since they follow it), in the order they were first
/// built. Other processes' writes also mark the view stale
/// ([`Store::on_foreign_room_writes`]), so reads of it do not lag.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) cache: tokio::sync::Mutex<Option<RoomCache>>,
    inflight: parking_lot::Mutex<std::collections::BTreeMap<u64, Inflight>>,
    next_ticket: std::sync::atomic::AtomicU64,
    /// Another process wrote to the room since the view was read.
    pub(crate) stale: std::sync::atomic::AtomicBool,
}

/// A local event handed to the store and not known durable yet: what is
/// needed to build it again.
struct Inflight {
    sender: ruma::OwnedUserId,
    spec: EventSpec,
    event_id: OwnedEventId,
    /// The view ([`RoomCache::view`]) its current attempt was built on.
    view: u64,
    /// A new attempt an earlier event's rebuild made, for this event's
    /// waiter to take.
    replaced: Option<(OwnedEventId, weft_store::Pending<i64>)>,
}

type RoomSlot = Arc<Slot>;

/// An in-flight event's place in its room's slot; leaves it when dropped.
struct Ticket {
    slot: RoomSlot,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.slot.inflight.lock().remove(&self.id);
    }
}

/// An event accepted by [`Rooms::submit`] and queued for the store.
#[must_use = "an event is only acknowledged once `durable` returns"]
pub struct Submitted {
    /// Its ID as first built (a rebuilt event has another: take the one
    /// [`Submitted::durable`] answers).
    pub event_id: OwnedEventId,
    pending: weft_store::Pending<i64>,
    rooms: Arc<Rooms>,
    room_id: OwnedRoomId,
    ticket: Ticket,
}

impl Submitted {
    /// Waits until the event is committed and returns its stream position
    /// (building it again if another process wrote to the room first).
    pub async fn durable(self) -> Result<Sent> {
        let Submitted {
            event_id,
            pending,
            rooms,
            room_id,
            ticket,
        } = self;
        rooms.settle(&room_id, &ticket, event_id, pending).await
    }
}

/// The room service: the one write path for events, and room reads.
pub struct Rooms {
    store: Arc<dyn Store>,
    server_name: OwnedServerName,
    key: Arc<Ed25519KeyPair>,
    slots: Arc<parking_lot::Mutex<HashMap<OwnedRoomId, RoomSlot>>>,
    default_version: RoomVersionId,
    /// State group IDs reserved from the store and not used yet.
    groups: parking_lot::Mutex<std::collections::VecDeque<i64>>,
    /// Queued events the store's writer built again (see
    /// [`LocalRebase`]).
    rebased: RebasedIds,
    /// This process's turns at rooms' state ([`turn`]).
    turns: Arc<turn::Turns>,
}

/// Room versions this server creates and serves.
pub const SUPPORTED_VERSIONS: &[&str] = &["10", "11", "12"];

pub fn parse_room_version(v: &str) -> Result<RoomVersionId> {
    if !SUPPORTED_VERSIONS.contains(&v) {
        return Err(Error::new(
            ErrorKind::UnsupportedRoomVersion,
            format!("Room version {v} is not supported"),
        ));
    }
    RoomVersionId::try_from(v).map_err(|_| Error::new(ErrorKind::UnsupportedRoomVersion, "bad room version"))
}

fn rules_of(version: &RoomVersionId) -> Result<RoomVersionRules> {
    version
        .rules()
        .ok_or_else(|| Error::new(ErrorKind::UnsupportedRoomVersion, "unknown room version"))
}

impl Rooms {
    pub fn new(
        store: Arc<dyn Store>,
        server_name: OwnedServerName,
        key: Ed25519KeyPair,
        default_version: &str,
    ) -> Result<Self> {
        let slots: Arc<parking_lot::Mutex<HashMap<OwnedRoomId, RoomSlot>>> = Default::default();
        // Other processes' writes make this one's views of their rooms stale.
        let weak = Arc::downgrade(&slots);
        store.on_foreign_room_writes(Box::new(move |rooms| {
            let Some(slots) = weak.upgrade() else { return };
            let slots = slots.lock();
            for room in rooms {
                if let Some(slot) = RoomId::parse(*room).ok().and_then(|r| slots.get(&r)) {
                    slot.stale.store(true, Ordering::Release);
                }
            }
        }));
        Ok(Self {
            store,
            server_name,
            key: Arc::new(key),
            slots,
            default_version: parse_room_version(default_version)?,
            groups: Default::default(),
            rebased: Default::default(),
            turns: Default::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.server_name
    }

    /// The server's signing key, shared with federation (request
    /// signatures, the key server): loaded once.
    pub fn signing_key(&self) -> Arc<Ed25519KeyPair> {
        self.key.clone()
    }

    pub(crate) fn slot(&self, room_id: &RoomId) -> RoomSlot {
        self.slots.lock().entry(room_id.to_owned()).or_default().clone()
    }

    async fn load(&self, room_id: &RoomId) -> Result<RoomCache> {
        let info = self
            .store
            .room_info(room_id.as_str())
            .await?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let version = RoomVersionId::try_from(info.room_version.as_str()).map_err(Error::internal)?;
        let rules = rules_of(&version)?;
        let mut cache = RoomCache::empty(version, rules, room_id.to_owned());
        // The group first: these are separate reads, and a state change
        // committed between them (another process's, or one of this
        // process's in flight) must leave the view with the older group,
        // so that what is built on it is refused, rather than a newer
        // group over an older state, which the store would take (a
        // snapshot group built from that state would lose the change).
        if let Some((group, chain)) = self.store.room_state_group(room_id.as_str()).await? {
            cache.group = Some(group);
            cache.chain = chain;
        }
        for ev in self.store.current_state(room_id.as_str()).await? {
            let pdu = Arc::new(parse_stored(&ev)?);
            cache.apply_state(pdu);
        }
        for (id, depth) in self.store.extremities(room_id.as_str()).await? {
            let id = OwnedEventId::try_from(id).map_err(Error::internal)?;
            cache.extremities.push((id, depth.try_into().unwrap_or(0)));
        }
        Ok(cache)
    }

    /// Makes the slot's view usable: loaded if missing, read again if
    /// another process wrote to the room, unless events of this process
    /// built on the view are in flight (their outcome tells: refused, they
    /// are rebuilt on the room read again; committed, the other write came
    /// after them and the next event built on the view is refused).
    async fn fresh(
        &self,
        room_id: &RoomId,
        slot: &Slot,
        guard: &mut tokio::sync::MutexGuard<'_, Option<RoomCache>>,
    ) -> Result<()> {
        let reread = guard.is_none() || (slot.stale.load(Ordering::Acquire) && slot.inflight.lock().is_empty());
        if reread {
            slot.stale.store(false, Ordering::Release);
            **guard = None;
            **guard = Some(self.load_or_forget(room_id).await?);
        }
        Ok(())
    }

    /// Loads a room into its slot; an unknown room's slot is dropped again
    /// so that probing random room IDs cannot grow memory.
    async fn load_or_forget(&self, room_id: &RoomId) -> Result<RoomCache> {
        match self.load(room_id).await {
            Ok(c) => Ok(c),
            Err(e) => {
                self.slots.lock().remove(room_id);
                Err(e)
            }
        }
    }

    /// The one write path: builds, signs, authorizes and persists an event,
    /// returning once it is durable.
    pub async fn send(&self, room_id: &RoomId, sender: &UserId, spec: EventSpec) -> Result<Sent> {
        let (ticket, event_id, pending) = self.queue(room_id, sender, spec).await?;
        self.settle(room_id, &ticket, event_id, pending).await
    }

    /// The first half of [`Rooms::send`]: builds, signs and authorizes the
    /// event and hands it to the store's writer, returning as soon as it is
    /// queued. The room's next event may then be built on top of it while
    /// this one is being committed, so a door can pipeline many sends per
    /// connection; [`Submitted::durable`] waits for the commit.
    pub async fn submit(self: &Arc<Self>, room_id: &RoomId, sender: &UserId, spec: EventSpec) -> Result<Submitted> {
        let (ticket, event_id, pending) = self.queue(room_id, sender, spec).await?;
        Ok(Submitted {
            event_id,
            pending,
            rooms: self.clone(),
            room_id: room_id.to_owned(),
            ticket,
        })
    }

    /// Builds the event on the room's view and hands it to the store,
    /// keeping what rebuilding it would take.
    async fn queue(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        spec: EventSpec,
    ) -> Result<(Ticket, OwnedEventId, weft_store::Pending<i64>)> {
        let slot = self.slot(room_id);
        // A state event is built in this process's turn at the room's
        // state (taken before the view's lock: see `rebuild`).
        let (share, taken) = match spec.state_key {
            Some(_) => self.take_turn(room_id, &slot).await,
            None => (None, false),
        };
        let mut guard = slot.cache.lock().await;
        if taken {
            // The process that had the turn likely changed the state: an
            // event built on the view would be refused for sure, even with
            // events of this process in flight on it (those are refused
            // too, or built again by the writer on top of messages).
            *guard = None;
        }
        self.fresh(room_id, &slot, &mut guard).await?;
        let Some(cache) = guard.as_mut() else {
            return Err(Error::internal("room cache missing"));
        };
        let (mut new_event, pdu) = self.build(cache, sender, spec.clone()).await?;
        new_event.rebase = self.rebaser(cache, &new_event);
        let event_id = pdu.event_id.clone();
        cache.advance(Arc::new(pdu), &new_event);
        let view = cache.view;
        let pending = turn::give_back_on_answer(self.store.persist_event(new_event), share);
        let id = slot.next_ticket.fetch_add(1, Ordering::Relaxed);
        slot.inflight.lock().insert(
            id,
            Inflight {
                sender: sender.to_owned(),
                spec,
                event_id: event_id.clone(),
                view,
                replaced: None,
            },
        );
        drop(guard);
        Ok((Ticket { slot, id }, event_id, pending))
    }

    /// A share of this process's turn at the room's state ([`turn`]).
    /// A turn just taken from the store makes the view stale: the process
    /// that had it may have written to the room.
    /// Without one (the store could not give it, say another process
    /// holding it stopped answering), the event is built all the same: the
    /// database still refuses it if the room moved meanwhile.
    /// Answers whether the turn was taken from the store just now.
    async fn take_turn(&self, room_id: &RoomId, slot: &Slot) -> (Option<Arc<turn::TurnShare>>, bool) {
        match self.turns.share(&*self.store, room_id).await {
            Ok(Some((share, taken))) => {
                if taken {
                    slot.stale.store(true, Ordering::Release);
                }
                (Some(share), taken)
            }
            Ok(None) => (None, false),
            Err(e) => {
                tracing::warn!("room {room_id}: no state turn ({}); building without one", e.message);
                (None, false)
            }
        }
    }

    /// How the store's writer may build a queued event again
    /// ([`LocalRebase`]); it does only while the room's state is the one
    /// the event was authorized against ([`NewEvent::rebaseable`]).
    fn rebaser(&self, cache: &RoomCache, ev: &NewEvent) -> Option<weft_store::Rebaser> {
        (ev.kind == EventKind::Timeline && ev.new_room.is_none()).then(|| {
            weft_store::Rebaser(Arc::new(LocalRebase {
                server_name: self.server_name.clone(),
                key: self.key.clone(),
                rules: cache.rules.clone(),
                ids: self.rebased.clone(),
            }))
        })
    }

    /// Waits for a queued event's commit, building it again while the
    /// store refuses it because another process wrote to the room.
    async fn settle(
        &self,
        room_id: &RoomId,
        ticket: &Ticket,
        mut event_id: OwnedEventId,
        mut pending: weft_store::Pending<i64>,
    ) -> Result<Sent> {
        let mut rebuilds = 0;
        loop {
            let result = pending.await;
            let rebased = self.rebased.lock().remove(event_id.as_str());
            match result {
                Ok(Ok(position)) => {
                    if let Some(again) = rebased {
                        // Stored on top of another process's messages: the
                        // view this process built it on is not the room's.
                        ticket.slot.stale.store(true, Ordering::Release);
                        event_id = again;
                    }
                    return Ok(Sent { event_id, position });
                }
                Ok(Err(e)) if e.kind == ErrorKind::RoomMoved && rebuilds < MAX_REBUILDS => {
                    rebuilds += 1;
                    tracing::debug!(
                        "room {room_id}: {event_id} refused, the room moved: building it again ({rebuilds})"
                    );
                    // Several processes racing for one room: let one win.
                    if rebuilds > 2 {
                        let ms = rand::Rng::gen_range(&mut rand::thread_rng(), 1..=u64::from(rebuilds) * 2);
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    (event_id, pending) = self.rebuild(room_id, ticket).await?;
                }
                failed => {
                    // The cache ran ahead of the store: rebuild it from disk.
                    *ticket.slot.cache.lock().await = None;
                    return match failed {
                        Ok(Err(e)) => Err(e),
                        _ => Err(Error::internal("event was not persisted")),
                    };
                }
            }
        }
    }

    /// A new attempt at the in-flight event `ticket` after the store
    /// refused it: the one an earlier event's rebuild made, or one built
    /// now on the room read again, with every later event of the same
    /// view (in their order).
    async fn rebuild(&self, room_id: &RoomId, ticket: &Ticket) -> Result<(OwnedEventId, weft_store::Pending<i64>)> {
        let slot = &ticket.slot;
        // Most refused events were built again already, by the rebuild of
        // the first refused one: no turn to wait for then.
        if let Ok(again) = replaced_or_view(slot, ticket.id)? {
            return Ok(again);
        }
        // What comes back here was refused because the room's state
        // changed (on messages only, the writer builds it again itself):
        // built again in this process's turn at the room's state, taken
        // before the view's lock (as `queue` does: the turn waits for
        // shares that a holder of the lock would hold), and held until
        // the writer answered for it, so no other process's state event
        // can come between again. Without it, messages in a room that
        // other processes set state in at full speed lose the race 30
        // times in a row.
        let (share, taken) = self.take_turn(room_id, slot).await;
        let mut guard = slot.cache.lock().await;
        let failed_view = match replaced_or_view(slot, ticket.id)? {
            Ok(again) => return Ok(again),
            Err(view) => view,
        };
        // The room is read again when the refused attempt was built on the
        // view (which the refusal proves stale), or another process just
        // had the turn. A view read since (by the rebuild of an event of
        // an older view) is built on instead, after the events in flight
        // on it: read again under them, it would refuse them in turn (they
        // commit, unknown to it), and so on, the process's own events
        // refusing each other.
        let mut cache = match guard.take() {
            Some(current) if current.view != failed_view && !taken => current,
            _ => {
                slot.stale.store(false, Ordering::Release);
                self.load_or_forget(room_id).await?
            }
        };
        let todo: Vec<(u64, ruma::OwnedUserId, EventSpec, OwnedEventId)> = slot
            .inflight
            .lock()
            .range(ticket.id..)
            .filter(|(_, e)| e.view == failed_view)
            .map(|(k, e)| (*k, e.sender.clone(), e.spec.clone(), e.event_id.clone()))
            .collect();
        let mut mine = None;
        for (k, sender, spec, old_id) in todo {
            let attempt = match self.build(&cache, &sender, spec).await {
                Ok((mut ev, pdu)) => {
                    ev.rebase = self.rebaser(&cache, &ev);
                    let id = pdu.event_id.clone();
                    cache.advance(Arc::new(pdu), &ev);
                    (
                        id,
                        turn::give_back_on_answer(self.store.persist_event(ev), share.clone()),
                    )
                }
                // No longer allowed (say, the sender was kicked meanwhile).
                Err(e) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let _ = tx.send(Err(e));
                    (old_id, rx)
                }
            };
            let mut inflight = slot.inflight.lock();
            if let Some(entry) = inflight.get_mut(&k) {
                entry.view = cache.view;
                entry.event_id = attempt.0.clone();
                if k != ticket.id {
                    entry.replaced = Some(attempt);
                    continue;
                }
            }
            if k == ticket.id {
                mine = Some(attempt);
            }
        }
        *guard = Some(cache);
        mine.ok_or_else(|| Error::internal("in-flight event lost"))
    }

    /// Builds the PDU for `spec` on top of `cache` and checks it against
    /// the authorization rules at the current state.
    /// The unsigned event `sender` would send now: its auth events from the
    /// current state, built on the room's forward extremities. Answers the
    /// event and its depth.
    pub(crate) fn proto(
        &self,
        cache: &RoomCache,
        sender: &UserId,
        event_type: &str,
        state_key: Option<&str>,
        mut content: CanonicalJsonObject,
        redacts: Option<&OwnedEventId>,
    ) -> Result<(CanonicalJsonObject, u64)> {
        let rules = &cache.rules;
        let is_create = event_type == "m.room.create";
        let timeline_type = TimelineEventType::from(event_type);
        let content_raw = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;

        let auth_types = ruma::state_res::auth_types_for_event(
            &timeline_type,
            sender,
            state_key,
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let auth_events: Vec<CanonicalJsonValue> = auth_types
            .iter()
            .filter_map(|(t, k)| cache.state.get(&(t.to_string(), k.clone())))
            .map(|p| CanonicalJsonValue::String(p.event_id.to_string()))
            .collect();
        let prevs = &cache.extremities[..cache.extremities.len().min(MAX_PREV_EVENTS)];
        let prev_events: Vec<CanonicalJsonValue> = prevs
            .iter()
            .map(|(id, _)| CanonicalJsonValue::String(id.to_string()))
            .collect();
        let depth = prevs.iter().map(|(_, d)| *d).max().unwrap_or(0) + 1;

        if let Some(target) = redacts
            && rules.redaction.keep_room_redaction_redacts
        {
            content.insert("redacts".into(), CanonicalJsonValue::String(target.to_string()));
        }

        let mut obj = CanonicalJsonObject::new();
        obj.insert("auth_events".into(), CanonicalJsonValue::Array(auth_events));
        obj.insert("content".into(), CanonicalJsonValue::Object(content));
        obj.insert(
            "depth".into(),
            CanonicalJsonValue::Integer(depth.try_into().map_err(Error::internal)?),
        );
        obj.insert(
            "origin_server_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(weft_core::now_ms()).map_err(Error::internal)?),
        );
        obj.insert("prev_events".into(), CanonicalJsonValue::Array(prev_events));
        if !(is_create && rules.authorization.room_create_event_id_as_room_id) {
            obj.insert("room_id".into(), CanonicalJsonValue::String(cache.room_id.to_string()));
        }
        obj.insert("sender".into(), CanonicalJsonValue::String(sender.to_string()));
        if let Some(k) = state_key {
            obj.insert("state_key".into(), CanonicalJsonValue::String(k.to_owned()));
        }
        obj.insert("type".into(), CanonicalJsonValue::String(event_type.to_owned()));
        if let Some(target) = redacts
            && !rules.redaction.keep_room_redaction_redacts
        {
            obj.insert("redacts".into(), CanonicalJsonValue::String(target.to_string()));
        }
        Ok((obj, depth))
    }

    /// Hashes and signs an event with this server's key and checks its
    /// format; answers its event ID and reference hash.
    pub(crate) fn sign(
        &self,
        rules: &RoomVersionRules,
        obj: &mut CanonicalJsonObject,
    ) -> Result<(OwnedEventId, String)> {
        sign_event(&self.server_name, &self.key, rules, obj)
    }

    pub(crate) async fn build(&self, cache: &RoomCache, sender: &UserId, spec: EventSpec) -> Result<(NewEvent, Pdu)> {
        let EventSpec {
            event_type,
            state_key,
            content,
            redacts,
            txn,
            origin_server_ts,
        } = spec;
        let rules = &cache.rules;
        let is_create = event_type == "m.room.create";
        let (mut obj, depth) = self.proto(
            cache,
            sender,
            &event_type,
            state_key.as_deref(),
            content,
            redacts.as_ref(),
        )?;
        if let Some(ts) = origin_server_ts {
            obj.insert(
                "origin_server_ts".into(),
                CanonicalJsonValue::Integer(ruma::Int::try_from(ts).map_err(|_| Error::invalid_param("Invalid ts"))?),
            );
        }
        let (event_id, hash) = self.sign(rules, &mut obj)?;
        let redaction = redacts;
        let pdu_json = serde_json::to_string(&obj).map_err(Error::internal)?;
        let pdu = Pdu::parse(event_id.clone(), &pdu_json).map_err(|e| Error::bad_json(e.to_string()))?;

        self.authorize(cache, &pdu)?;

        let room_id = if is_create && rules.authorization.room_create_event_id_as_room_id {
            format!("!{hash}")
        } else {
            cache.room_id.to_string()
        };
        let Derived {
            membership,
            history_visibility,
            relation,
            search_text,
        } = derived_fields(&event_type, &pdu.content);
        let redaction = match redaction {
            Some(target) => self.redacted_target(cache, &target, &obj).await?,
            None => None,
        };
        let new_event = NewEvent {
            event_id: event_id.to_string(),
            room_id,
            event_type,
            state_key,
            sender: sender.to_string(),
            origin_server_ts: pdu.origin_server_ts.get().into(),
            pdu_json,
            new_room: is_create.then(|| NewRoom {
                room_version: cache.version.to_string(),
                creator: sender.to_string(),
            }),
            membership,
            history_visibility,
            txn,
            redaction,
            relation,
            search_text,
            prev_events: pdu.prev_events.iter().map(|id| id.to_string()).collect(),
            auth_events: pdu.auth_events.iter().map(|id| id.to_string()).collect(),
            depth: depth.try_into().map_err(Error::internal)?,
            kind: EventKind::Timeline,
            state_before: cache.group,
            state_after: cache.group,
            new_groups: Vec::new(),
            current_state: None,
            expect_extremities: Some(cache.extremities.iter().map(|(id, _)| id.to_string()).collect()),
            rebase: None,
        };
        let new_event = match &pdu.state_key {
            Some(key) => self.with_new_state(cache, new_event, key.clone()).await?,
            None => new_event,
        };
        Ok((new_event, pdu))
    }

    fn authorize(&self, cache: &RoomCache, pdu: &Pdu) -> Result<()> {
        let rules = &cache.rules.authorization;
        let forbidden = |e: String| Error::forbidden(format!("Event not allowed: {e}"));
        ruma::state_res::check_state_independent_auth_rules(rules, pdu, |id| cache.by_id.get(id).cloned().map(ArcPdu))
            .map_err(forbidden)?;
        ruma::state_res::check_state_dependent_auth_rules(rules, pdu, |t: &StateEventType, k: &str| {
            cache.state.get(&(t.to_string(), k.to_owned())).cloned().map(ArcPdu)
        })
        .map_err(forbidden)
    }

    /// A local state event's new state group (a delta on the room's
    /// current group, or a snapshot past [`MAX_CHAIN`] deltas) and the
    /// change of the room's current state it makes.
    async fn with_new_state(&self, cache: &RoomCache, mut ev: NewEvent, state_key: String) -> Result<NewEvent> {
        let id = self.next_group().await?;
        let entry = (ev.event_type.clone(), state_key, ev.event_id.clone());
        let group = match cache.group {
            Some(prev) if cache.chain < MAX_CHAIN => NewStateGroup {
                id,
                prev_group: Some(prev),
                chain: cache.chain + 1,
                entries: vec![entry.clone()],
            },
            _ => {
                let mut entries: Vec<_> = cache
                    .state
                    .iter()
                    .filter(|(k, _)| (&k.0, &k.1) != (&entry.0, &entry.1))
                    .map(|((t, k), p)| (t.clone(), k.clone(), p.event_id.to_string()))
                    .collect();
                entries.push(entry.clone());
                NewStateGroup {
                    id,
                    prev_group: None,
                    chain: 0,
                    entries,
                }
            }
        };
        ev.state_after = Some(id);
        ev.new_groups.push(group);
        ev.current_state = Some(CurrentStateChange {
            group: id,
            changes: vec![entry],
        });
        Ok(ev)
    }

    /// A new state group ID, unique across every process on the database:
    /// reserved from the store [`GROUP_IDS_AT_ONCE`] at a time (so not a
    /// query per state event). IDs reserved and not used are skipped.
    async fn next_group(&self) -> Result<i64> {
        if let Some(id) = self.groups.lock().pop_front() {
            return Ok(id);
        }
        let mut ids: std::collections::VecDeque<i64> = self.store.reserve_state_groups(GROUP_IDS_AT_ONCE).await?.into();
        let id = ids
            .pop_front()
            .ok_or_else(|| Error::internal("no state group ID reserved"))?;
        self.groups.lock().extend(ids);
        Ok(id)
    }

    /// For a redaction: the target's redacted JSON, if the target is in this room.
    async fn redacted_target(
        &self,
        cache: &RoomCache,
        target: &OwnedEventId,
        redaction: &CanonicalJsonObject,
    ) -> Result<Option<(String, String)>> {
        let Some(ev) = self.store.get_event(target.as_str()).await? else {
            return Ok(None);
        };
        if ev.room_id != cache.room_id.as_str() || ev.redacted_by.is_some() {
            return Ok(None);
        }
        // Since room v3 the auth rules leave this check to the server: only
        // the original sender, or someone with the `redact` power, redacts.
        let sender = redaction.get("sender").and_then(|s| s.as_str()).unwrap_or_default();
        if ev.sender != sender && cache.power_of(sender) < cache.power_for("redact", 50) {
            return Err(Error::forbidden(
                "You don't have permission to redact other users' events",
            ));
        }
        let obj: CanonicalJsonObject = serde_json::from_str(&ev.pdu_json).map_err(Error::internal)?;
        let mut because = redaction.clone();
        because.remove("signatures");
        let redacted = ruma::canonical_json::redact(
            obj,
            &cache.rules.redaction,
            Some(ruma::canonical_json::RedactedBecause::from_json(because)),
        )
        .map_err(Error::internal)?;
        Ok(Some((
            target.to_string(),
            serde_json::to_string(&redacted).map_err(Error::internal)?,
        )))
    }

    /// Current state event of a room, from the pipeline's cache.
    pub async fn state_event(&self, room_id: &RoomId, event_type: &str, state_key: &str) -> Result<Option<Arc<Pdu>>> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        Ok(guard
            .as_ref()
            .and_then(|c| c.state.get(&(event_type.to_owned(), state_key.to_owned())).cloned()))
    }

    /// Reads the pipeline's view of a room (loaded if needed).
    pub(crate) async fn with_view<T>(&self, room_id: &RoomId, f: impl FnOnce(&RoomCache) -> T) -> Result<T> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        guard.as_ref().map(f).ok_or_else(|| Error::not_found("Unknown room"))
    }

    /// The room's current state events, from the pipeline's view.
    pub async fn current_state(&self, room_id: &RoomId) -> Result<Vec<Arc<Pdu>>> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        Ok(guard
            .as_ref()
            .map(|c| c.state.values().cloned().collect())
            .unwrap_or_default())
    }

    /// Current membership of `user_id` in a room (`None` if never a member).
    pub async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<String>> {
        let ev = self.state_event(room_id, "m.room.member", user_id.as_str()).await?;
        Ok(ev.and_then(|p| {
            serde_json::from_str::<serde_json::Value>(p.content.get())
                .ok()
                .and_then(|c| c.get("membership").and_then(|m| m.as_str()).map(str::to_owned))
        }))
    }

    /// The room's version, if the room exists.
    pub async fn room_version(&self, room_id: &RoomId) -> Result<RoomVersionId> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        guard
            .as_ref()
            .map(|c| c.version.clone())
            .ok_or_else(|| Error::not_found("Unknown room"))
    }

    /// Whether `user` currently has the power to send a state event of
    /// `event_type` in the room (its level from `events`, else
    /// `state_default`); the room's latest event ID too, for an upgrade's
    /// `predecessor`. `M_NOT_FOUND` for an unknown room.
    pub async fn state_power(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_type: &str,
    ) -> Result<(bool, Option<OwnedEventId>)> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        let c = guard.as_ref().ok_or_else(|| Error::not_found("Unknown room"))?;
        let needed = match c.power_levels() {
            Some(pl) => pl["events"][event_type]
                .as_i64()
                .or_else(|| pl["state_default"].as_i64())
                .unwrap_or(50),
            None => 0,
        };
        Ok((c.power_of(user.as_str()) >= needed, c.latest()))
    }

    /// For a join to a room with a `restricted` (or `knock_restricted`)
    /// join rule: the rule's `allow` room IDs (`m.room_membership` entries)
    /// and a joined member of `server` with the power to invite, who can
    /// sign for the join (`join_authorised_via_users_server`; the most
    /// powerful, then the smallest ID). `None` when the room's join rule is
    /// not one of those or its version has no restricted joins.
    pub async fn restricted_join(
        &self,
        room_id: &RoomId,
        server: &ruma::ServerName,
    ) -> Result<Option<(Vec<OwnedRoomId>, Option<ruma::OwnedUserId>)>> {
        self.with_view(room_id, |c| {
            let auth = &c.rules.authorization;
            let rule: serde_json::Value = c
                .state
                .get(&("m.room.join_rules".to_owned(), String::new()))
                .and_then(|p| serde_json::from_str(p.content.get()).ok())
                .unwrap_or_default();
            let restricted = match rule["join_rule"].as_str() {
                Some("restricted") => auth.restricted_join_rule,
                Some("knock_restricted") => auth.knock_restricted_join_rule,
                _ => false,
            };
            if !restricted {
                return None;
            }
            let allow = rule["allow"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["type"] == "m.room_membership")
                .filter_map(|a| a["room_id"].as_str().and_then(|r| OwnedRoomId::try_from(r).ok()))
                .collect();
            let needed = c.power_for("invite", 0);
            let authoriser = c
                .state
                .iter()
                .filter(|((t, _), p)| t == "m.room.member" && query::membership_of(p).as_deref() == Some("join"))
                .filter_map(|((_, k), _)| UserId::parse(k.as_str()).ok())
                .filter(|u| u.server_name() == server)
                .map(|u| (c.power_of(u.as_str()), u))
                .filter(|(p, _)| *p >= needed)
                .max_by(|(pa, ua), (pb, ub)| pa.cmp(pb).then_with(|| ub.cmp(ua)))
                .map(|(_, u)| u);
            Some((allow, authoriser))
        })
        .await
    }

    pub fn default_version(&self) -> &RoomVersionId {
        &self.default_version
    }
}

/// `Arc<Pdu>` as a ruma `Event` (ruma wants owned values from its fetchers).
#[derive(Clone)]
pub(crate) struct ArcPdu(pub(crate) Arc<Pdu>);

impl ruma::state_res::Event for ArcPdu {
    type Id = OwnedEventId;
    fn event_id(&self) -> &Self::Id {
        &self.0.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.0.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.0.sender
    }
    fn origin_server_ts(&self) -> ruma::MilliSecondsSinceUnixEpoch {
        self.0.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.0.event_type
    }
    fn content(&self) -> &serde_json::value::RawValue {
        &self.0.content
    }
    fn state_key(&self) -> Option<&str> {
        self.0.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.0.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.0.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.0.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// What the store keeps beside an event's JSON, read from its content.
#[derive(Debug, Clone, Default)]
pub(crate) struct Derived {
    pub membership: Option<String>,
    pub history_visibility: Option<String>,
    pub relation: Option<weft_store::Relation>,
    pub search_text: Option<String>,
}

pub(crate) fn derived_fields(event_type: &str, content: &serde_json::value::RawValue) -> Derived {
    let content: serde_json::Value = serde_json::from_str(content.get()).unwrap_or_default();
    // Stored as text, which on PostgreSQL cannot hold NUL (another
    // server's event may have one in its content): a value with one is no
    // valid membership, visibility or event ID, and search text does
    // without it.
    let clean = |s: &str| (!s.contains('\0')).then(|| s.to_owned());
    let text = |key: &str| content.get(key).and_then(|m| m.as_str()).and_then(clean);
    let search = |key: &str| content.get(key).and_then(|m| m.as_str()).map(|s| s.replace('\0', " "));
    let search_key = match event_type {
        "m.room.message" => Some("body"),
        "m.room.name" => Some("name"),
        "m.room.topic" => Some("topic"),
        _ => None,
    };
    Derived {
        membership: (event_type == "m.room.member").then(|| text("membership")).flatten(),
        history_visibility: (event_type == "m.room.history_visibility")
            .then(|| text("history_visibility"))
            .flatten(),
        relation: content.get("m.relates_to").and_then(|r| {
            Some(weft_store::Relation {
                rel_type: clean(r.get("rel_type")?.as_str()?)?,
                parent_event_id: clean(r.get("event_id")?.as_str()?)?,
            })
        }),
        search_text: search_key.and_then(search).filter(|t| !t.is_empty()),
    }
}

/// Parses a stored event's PDU.
pub fn parse_stored(ev: &StoredEvent) -> Result<Pdu> {
    let id = OwnedEventId::try_from(ev.event_id.as_str()).map_err(Error::internal)?;
    Pdu::parse(id, &ev.pdu_json).map_err(Error::internal)
}

/// Hashes and signs an event with `server`'s key and checks its format;
/// answers its event ID and reference hash.
fn sign_event(
    server: &OwnedServerName,
    key: &Ed25519KeyPair,
    rules: &RoomVersionRules,
    obj: &mut CanonicalJsonObject,
) -> Result<(OwnedEventId, String)> {
    ruma::signatures::hash_and_sign_event(server.as_str(), key, obj, &rules.redaction).map_err(|e| match e {
        // Content that fits on its own, but not with the envelope.
        ruma::signatures::JsonError::PduTooLarge => Error::new(ErrorKind::TooLarge, "Event is too large"),
        other => Error::internal(other),
    })?;
    ruma::state_res::check_pdu_format(obj, &rules.event_format).map_err(|e| {
        if e.contains("larger than") {
            Error::new(ErrorKind::TooLarge, "Event is too large")
        } else {
            Error::bad_json(e)
        }
    })?;
    let hash = ruma::signatures::reference_hash(obj, rules).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => Error::new(ErrorKind::TooLarge, "Event is too large"),
        other => Error::internal(other),
    })?;
    let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?;
    Ok((event_id, hash.to_string()))
}

/// The new attempt an earlier event's rebuild made for the in-flight event
/// `id` (taken), or else the view its last attempt was built on.
fn replaced_or_view(
    slot: &Slot,
    id: u64,
) -> Result<std::result::Result<(OwnedEventId, weft_store::Pending<i64>), u64>> {
    let mut inflight = slot.inflight.lock();
    let entry = inflight
        .get_mut(&id)
        .ok_or_else(|| Error::internal("in-flight event lost"))?;
    Ok(entry.replaced.take().ok_or(entry.view))
}

/// Old event ID → the ID of the same event built again by the store's
/// writer on the room as stored ([`weft_store::Rebase`]), until the
/// event's sender takes it ([`Rooms::settle`]).
type RebasedIds = Arc<parking_lot::Mutex<HashMap<String, OwnedEventId>>>;

/// How a queued local event is built again on other `prev_events`
/// ([`weft_store::Rebase`]): the same content, sender, auth events and
/// timestamp, the new prev events and depth, hashed and signed again with
/// this server's key (so a new event ID). The writer asks only when the
/// room's state is the one the event was authorized against, so the same
/// auth events still allow it; a state event's new state group is renamed
/// to its new ID by the store ([`NewEvent::rebased_on`]).
struct LocalRebase {
    server_name: OwnedServerName,
    key: Arc<Ed25519KeyPair>,
    rules: RoomVersionRules,
    ids: RebasedIds,
}

impl weft_store::Rebase for LocalRebase {
    fn rebase(&self, ev: &NewEvent, extremities: &[String], max_depth: i64) -> Option<NewEvent> {
        let mut obj: CanonicalJsonObject = serde_json::from_str(&ev.pdu_json).ok()?;
        for field in ["hashes", "signatures", "unsigned"] {
            obj.remove(field);
        }
        let prevs = &extremities[..extremities.len().min(MAX_PREV_EVENTS)];
        obj.insert(
            "prev_events".into(),
            CanonicalJsonValue::Array(prevs.iter().map(|id| CanonicalJsonValue::String(id.clone())).collect()),
        );
        let depth = max_depth.checked_add(1)?;
        obj.insert(
            "depth".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(depth).ok()?),
        );
        let (event_id, _) = sign_event(&self.server_name, &self.key, &self.rules, &mut obj).ok()?;
        let mut again = ev.clone();
        again.event_id = event_id.to_string();
        again.pdu_json = serde_json::to_string(&obj).ok()?;
        again.prev_events = prevs.to_vec();
        again.depth = depth;
        again.expect_extremities = Some(extremities.to_vec());
        let mut ids = self.ids.lock();
        // Each entry is taken by its sender's settle; should one never
        // be (its sender gone), the map does not grow without bound.
        if ids.len() >= 100_000 {
            ids.clear();
        }
        ids.insert(ev.event_id.clone(), event_id);
        Some(again)
    }
}
