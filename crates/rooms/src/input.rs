//! Input: remote events enter a room here, whatever brought them (a
//! `/send` transaction, a join's response, backfill, a fetch). Each goes
//! through the spec's checks in order (format, signatures, content hash,
//! auth at its auth events, auth at the state before it, soft-fail at the
//! current state), gets its state groups, and is stored with the change of
//! the room's current state and extremities in one write. Local events take
//! the same write path from [`Rooms::submit`], their checks known to pass.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, OwnedServerName, RoomId, ServerName,
    events::StateEventType,
    signatures::{PublicKeyMap, Verified},
    state_res::{self, StateMap as RumaStateMap},
};
use weft_core::{Error, ErrorKind, Result};
use weft_store::{CurrentStateChange, EventKind, NewEvent, NewStateGroup};

use crate::cache::RoomCache;
use crate::{ArcPdu, MAX_CHAIN, Pdu, Rooms, StateKey, derived_fields};

/// What taking in remote events needs of the network: servers' public
/// keys, and events this server lacks. The federation service implements
/// it; the pipeline knows nothing of HTTP.
#[async_trait]
pub trait Remote: Send + Sync {
    /// The public keys of `servers` (those that could be found).
    async fn public_keys(&self, servers: BTreeSet<OwnedServerName>) -> PublicKeyMap;
    /// A PDU by ID, asked of `origin`.
    async fn fetch_event(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<CanonicalJsonObject>;
    /// The IDs of the state before `event_id` and of its auth chain, asked
    /// of `origin`.
    async fn state_ids(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)>;
}

/// How a remote event was taken in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored; on the timeline at this stream position (negative for an
    /// outlier or a backfilled event).
    Accepted(i64),
    /// Stored, but it failed authorization at the room's current state: not
    /// served (its sender was banned meanwhile, say).
    SoftFailed(String),
    /// Stored as rejected, with the reason: never served, never state.
    Rejected(String),
    /// Already stored.
    Known,
}

/// What brought the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New to the room (`/send`, a join): the timeline.
    New,
    /// Older history (`/backfill`).
    Backfill,
    /// Needed for its own sake (an auth event, a state event of a join):
    /// stored without the state before it.
    Outlier,
}

/// A state as event IDs.
pub(crate) type StateIds = HashMap<StateKey, OwnedEventId>;

/// How many missing auth events one input fetches at most, in total.
const MAX_FETCHES: usize = 200;

/// The outcome of the spec's first checks: the event's ID and its JSON
/// (redacted if its content hash did not match).
pub(crate) struct Checked {
    pub event_id: OwnedEventId,
    pub object: CanonicalJsonObject,
}

impl Rooms {
    /// Takes in a PDU received from `origin` for `room_id`, which this
    /// server must know. A PDU that fails its format or signature checks
    /// is an error (it is not stored); one that fails authorization is
    /// stored as rejected.
    pub async fn input_pdu(
        &self,
        room_id: &RoomId,
        object: CanonicalJsonObject,
        origin: &ServerName,
        arrival: Arrival,
        remote: &dyn Remote,
    ) -> Result<Outcome> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        let mut attempts = 0;
        loop {
            let Some(cache) = guard.as_mut() else {
                return Err(Error::internal("room cache missing"));
            };
            let mut fetches = 0;
            let result = self
                .input_locked(cache, object.clone(), origin, arrival, remote, &mut fetches, None)
                .await;
            match result {
                // Another process wrote to the room since its view was
                // read: decided again on the room as stored.
                Err(e) if e.kind == weft_core::ErrorKind::RoomMoved && attempts < 10 => {
                    attempts += 1;
                    *guard = None;
                    slot.stale.store(false, std::sync::atomic::Ordering::Release);
                    *guard = Some(self.load_or_forget(room_id).await?);
                }
                Err(e) => {
                    // A failed write leaves the view ahead of the store.
                    *guard = None;
                    return Err(e);
                }
                Ok(outcome) => return Ok(outcome),
            }
        }
    }

    /// Format, signatures and content hash (the spec's checks 1 to 3).
    pub(crate) async fn verify_pdu(
        &self,
        cache: &RoomCache,
        mut object: CanonicalJsonObject,
        remote: &dyn Remote,
    ) -> Result<Checked> {
        let rules = &cache.rules;
        let bad = |e: String| Error::bad_json(format!("Invalid PDU: {e}"));
        state_res::check_pdu_format(&object, &rules.event_format).map_err(bad)?;
        // These are stored as text, which on PostgreSQL cannot hold NUL:
        // refused on every backend alike. (Content is JSON, which keeps a
        // NUL escaped; what is derived from it is cleaned.)
        let nul = |v: &ruma::CanonicalJsonValue| match v {
            ruma::CanonicalJsonValue::String(s) => s.contains('\0'),
            ruma::CanonicalJsonValue::Array(a) => a.iter().any(|e| e.as_str().is_some_and(|s| s.contains('\0'))),
            _ => false,
        };
        for field in [
            "type",
            "state_key",
            "sender",
            "room_id",
            "redacts",
            "prev_events",
            "auth_events",
        ] {
            if object.get(field).is_some_and(nul) {
                return Err(bad(format!("its {field} holds a NUL character")));
            }
        }
        // Fields of another server's making that are not the event's.
        object.remove("unsigned");
        let hash = ruma::signatures::reference_hash(&object, rules).map_err(|e| bad(e.to_string()))?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(|e| bad(e.to_string()))?;
        match object.get("room_id").and_then(|r| r.as_str()) {
            Some(r) if r == cache.room_id.as_str() => {}
            // From room v12 the create event has no room ID.
            None if object.get("type").and_then(|t| t.as_str()) == Some("m.room.create") => {}
            _ => return Err(bad("wrong room".into())),
        }
        let servers = ruma::signatures::required_server_signatures_to_verify_event(&object, &rules.signatures)
            .map_err(|e| bad(e.to_string()))?;
        // Our own events (our join, coming back in a room's state) are
        // checked against our own key.
        let ours = servers.contains(&self.server_name);
        let mut keys = remote.public_keys(servers).await;
        if ours {
            keys.entry(self.server_name.to_string()).or_default().insert(
                format!("ed25519:{}", self.key.version()),
                ruma::serde::Base64::new(self.key.public_key().to_vec()),
            );
        }
        match ruma::signatures::verify_event(&keys, &object, rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => {
                // Signed, but the content is not what was hashed: keep the
                // event, redacted.
                tracing::info!(%event_id, "content hash mismatch: storing the event redacted");
                object =
                    ruma::canonical_json::redact(object, &rules.redaction, None).map_err(|e| bad(e.to_string()))?;
            }
            Err(e) => {
                return Err(Error::forbidden(format!(
                    "Event {event_id} failed its signature check: {e}"
                )));
            }
        }
        Ok(Checked { event_id, object })
    }

    /// [`Rooms::input_pdu`] under the room's lock. `given`: the state
    /// before the event, as another server told it (a join's response).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn input_locked<'a>(
        &'a self,
        cache: &'a mut RoomCache,
        object: CanonicalJsonObject,
        origin: &'a ServerName,
        arrival: Arrival,
        remote: &'a dyn Remote,
        fetches: &'a mut usize,
        given: Option<StateIds>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Outcome>> + Send + 'a>> {
        Box::pin(async move {
            let Checked { event_id, object } = self.verify_pdu(cache, object, remote).await?;
            // An outlier (a join's state, an auth event) reached by
            // backfill takes its place in the timeline; anything else
            // stored is known (an outlier coming again as a new event
            // stays an outlier, see docs/design-federation.md).
            let promote = match self.store.event_place(event_id.as_str()).await? {
                None => false,
                Some(p) if arrival == Arrival::Backfill && p.outlier && p.rejected.is_none() => true,
                Some(_) => return Ok(Outcome::Known),
            };
            let json = serde_json::to_string(&object).map_err(Error::internal)?;
            let pdu = Pdu::parse(event_id.clone(), &json).map_err(|e| Error::bad_json(e.to_string()))?;

            // Check 4: authorization at its own auth events, fetched (as
            // outliers) when missing.
            let mut auth = HashMap::new();
            // From room v12 the create event is named by the room ID, not
            // listed among the auth events.
            let mut auth_ids = pdu.auth_events.clone();
            if cache.rules.authorization.room_create_event_id_as_room_id
                && pdu.event_type.to_string() != "m.room.create"
                && let Some(opaque) = cache.room_id.as_str().strip_prefix('!')
                && let Ok(create) = OwnedEventId::try_from(format!("${opaque}"))
            {
                auth_ids.push(create);
            }
            for id in &auth_ids {
                if let Some(p) = self.load_pdu(cache, id).await? {
                    auth.insert(id.clone(), p);
                    continue;
                }
                self.fetch_outlier(cache, id, origin, remote, fetches).await?;
                if let Some(p) = self.load_pdu(cache, id).await? {
                    auth.insert(id.clone(), p);
                }
            }
            let rejected_auth = self.rejected_among(&pdu.auth_events).await?;
            let rules = cache.rules.clone();
            let independent = match rejected_auth {
                Some(bad) => Err(format!("auth event {bad} was rejected")),
                None => state_res::check_state_independent_auth_rules(&rules.authorization, &pdu, |id| {
                    auth.get(id).cloned().map(ArcPdu)
                }),
            };
            let derived = derived_fields(pdu.event_type.to_string().as_str(), &pdu.content);
            let room_id = cache.room_id.to_string();
            // The create event of a room new to this server makes its row.
            let new_room =
                if pdu.event_type.to_string() == "m.room.create" && self.store.room_info(&room_id).await?.is_none() {
                    Some(weft_store::NewRoom {
                        room_version: cache.version.to_string(),
                        creator: pdu.sender.to_string(),
                    })
                } else {
                    None
                };
            let base = |kind: EventKind| NewEvent {
                event_id: event_id.to_string(),
                room_id: room_id.clone(),
                event_type: pdu.event_type.to_string(),
                state_key: pdu.state_key.clone(),
                sender: pdu.sender.to_string(),
                origin_server_ts: pdu.origin_server_ts.get().into(),
                pdu_json: json.clone(),
                new_room: new_room.clone(),
                membership: derived.membership.clone(),
                history_visibility: derived.history_visibility.clone(),
                txn: None,
                redaction: None,
                relation: derived.relation.clone(),
                search_text: derived.search_text.clone(),
                prev_events: pdu.prev_events.iter().map(|p| p.to_string()).collect(),
                auth_events: pdu.auth_events.iter().map(|p| p.to_string()).collect(),
                depth: i64::try_from(pdu.depth).unwrap_or(i64::MAX),
                kind,
                state_before: None,
                state_after: None,
                new_groups: Vec::new(),
                current_state: None,
                expect_extremities: None,
                rebase: None,
            };
            if let Err(why) = independent {
                tracing::info!(%event_id, %origin, "rejected: {why}");
                if !promote {
                    self.store_event(base(EventKind::Rejected(why.clone()))).await?;
                }
                return Ok(Outcome::Rejected(why));
            }
            if arrival == Arrival::Outlier {
                let p = self.store_event(base(EventKind::Outlier)).await?;
                return Ok(Outcome::Accepted(p));
            }

            // Check 5: authorization at the state before the event.
            let (before, before_group) = match given {
                Some(state) => (state, None),
                None => self.state_before(cache, &pdu, origin, remote, fetches).await?,
            };
            let before_pdus = self.load_state(cache, &before).await?;
            if let Err(why) = check_at(&rules, &pdu, &before_pdus) {
                tracing::info!(%event_id, %origin, "rejected at the state before it: {why}");
                // An outlier failing here stays an outlier (it passed its
                // own auth events).
                if !promote {
                    self.store_event(base(EventKind::Rejected(why.clone()))).await?;
                }
                return Ok(Outcome::Rejected(why));
            }
            // The state after it, and its groups.
            let mut new_groups = Vec::new();
            let before_group = match before_group {
                Some(g) => g,
                None => {
                    let g = self.group_for(&before, None, None, &mut new_groups).await?;
                    g.0
                }
            };
            let mut after = before.clone();
            let mut after_group = before_group;
            if let Some(key) = &pdu.state_key {
                let (event_type, key) = (pdu.event_type.to_string(), key.clone());
                after.insert((event_type.clone(), key.clone()), event_id.clone());
                // The one change is known: no diff of the whole state.
                let change = (event_type, key, event_id.to_string());
                after_group = self
                    .group_for(&after, Some((before_group, &before)), Some(change), &mut new_groups)
                    .await?
                    .0;
            }
            let mut ev = base(EventKind::TimelineAfterGap);
            ev.state_before = Some(before_group);
            ev.state_after = Some(after_group);
            if arrival == Arrival::Backfill {
                ev.kind = EventKind::Backfilled;
                ev.new_groups = new_groups;
                let p = self.store_event(ev).await?;
                return Ok(Outcome::Accepted(p));
            }

            // Decided at the room's view from here on: the store refuses it
            // if another process wrote to the room since the view was read.
            ev.expect_extremities = Some(cache.extremities.iter().map(|(id, _)| id.to_string()).collect());

            // Check 6: soft-fail at the current state (none yet when this
            // is our join of a room new to this server).
            if !cache.state.is_empty()
                && let Err(why) = check_at(&rules, &pdu, &cache.state)
            {
                tracing::info!(%event_id, %origin, "soft-failed at the current state: {why}");
                ev.kind = EventKind::SoftFailed;
                ev.new_groups = new_groups;
                self.store_event(ev).await?;
                return Ok(Outcome::SoftFailed(why));
            }

            // The room's new current state: the state after this event if
            // it follows every extremity, else the resolution of the
            // current state and this event's.
            let follows_all = cache.extremities.iter().all(|(id, _)| pdu.prev_events.contains(id));
            let current_ids: StateIds = cache
                .state
                .iter()
                .map(|(k, p)| (k.clone(), p.event_id.clone()))
                .collect();
            let (new_current, new_group, chain) = if follows_all {
                let chain = new_groups
                    .iter()
                    .find(|g| g.id == after_group)
                    .map(|g| g.chain)
                    .unwrap_or(MAX_CHAIN);
                (after.clone(), after_group, chain)
            } else {
                // The state at the room's forward extremities once this
                // event joins them: each remaining extremity's state after
                // it, and this event's.
                let mut states = vec![after.clone()];
                for (id, _) in cache.extremities.iter().filter(|(id, _)| !pdu.prev_events.contains(id)) {
                    match self.store.event_place(id.as_str()).await?.and_then(|p| p.state_after) {
                        Some(g) => states.push(self.group_ids(g).await?),
                        None => states.push(current_ids.clone()),
                    }
                }
                let mut distinct: Vec<StateIds> = Vec::new();
                for st in states {
                    if !distinct.contains(&st) {
                        distinct.push(st);
                    }
                }
                let mut states = distinct;
                let resolved = if states.len() == 1 {
                    states.swap_remove(0)
                } else {
                    self.resolve(cache, states, Some(&pdu)).await?
                };
                if resolved == after {
                    (after.clone(), after_group, MAX_CHAIN)
                } else if resolved == current_ids && cache.group.is_some() {
                    (resolved, cache.group.unwrap_or_default(), cache.chain)
                } else {
                    // A delta on the current group when there is one.
                    let base = cache.group.map(|g| (g, &current_ids));
                    let (g, chain) = self.group_for(&resolved, base, None, &mut new_groups).await?;
                    (resolved, g, chain)
                }
            };
            let changes: Vec<(String, String, String)> = new_current
                .iter()
                .filter(|(k, id)| current_ids.get(*k) != Some(*id))
                .map(|((t, k), id)| (t.clone(), k.clone(), id.to_string()))
                .collect();
            if !changes.is_empty() || cache.group != Some(new_group) {
                ev.current_state = Some(CurrentStateChange {
                    group: new_group,
                    changes: changes.clone(),
                });
            }
            if let Some(target) = &pdu.redacts {
                ev.redaction = self.redacted_target(cache, target, &object).await.unwrap_or(None);
            }
            ev.new_groups = new_groups;
            let p = self.store_event(ev).await?;
            // Move the room's view on.
            cache.extremities.retain(|(id, _)| !pdu.prev_events.contains(id));
            cache.extremities.push((event_id.clone(), pdu.depth));
            cache.extremities.sort_by_key(|e| std::cmp::Reverse(e.1));
            let pdu = Arc::new(pdu);
            for (_, _, id) in &changes {
                let id = OwnedEventId::try_from(id.as_str()).map_err(Error::internal)?;
                let p = if id == event_id {
                    pdu.clone()
                } else {
                    self.load_pdu(cache, &id)
                        .await?
                        .ok_or_else(|| Error::internal("state event missing"))?
                };
                cache.apply_state(p);
            }
            cache.group = Some(new_group);
            cache.chain = chain;
            Ok(Outcome::Accepted(p))
        })
    }

    /// Fetches a missing event from `origin` and takes it in as an
    /// outlier; at most [`MAX_FETCHES`] per input.
    async fn fetch_outlier(
        &self,
        cache: &mut RoomCache,
        id: &EventId,
        origin: &ServerName,
        remote: &dyn Remote,
        fetches: &mut usize,
    ) -> Result<()> {
        if *fetches >= MAX_FETCHES {
            return Err(Error::forbidden("too many missing events"));
        }
        *fetches += 1;
        let fetched = remote.fetch_event(origin, &cache.room_id.clone(), id).await?;
        self.input_locked(cache, fetched, origin, Arrival::Outlier, remote, fetches, None)
            .await?;
        Ok(())
    }

    /// Stores an event through the writer; answers its position.
    async fn store_event(&self, ev: NewEvent) -> Result<i64> {
        self.store
            .persist_event(ev)
            .await
            .map_err(|_| Error::internal("event was not persisted"))?
    }

    /// Whether any of `ids` is stored as rejected (the first such).
    async fn rejected_among(&self, ids: &[OwnedEventId]) -> Result<Option<OwnedEventId>> {
        for id in ids {
            if let Some(place) = self.store.event_place(id.as_str()).await?
                && place.rejected.is_some()
            {
                return Ok(Some(id.clone()));
            }
        }
        Ok(None)
    }

    /// The state before `pdu` and its group if stored: the state after its
    /// one prev event, or the resolution of the states after its prev
    /// events; when a prev event is missing, the state `origin` says was
    /// before it (its events fetched as outliers).
    async fn state_before(
        &self,
        cache: &mut RoomCache,
        pdu: &Pdu,
        origin: &ServerName,
        remote: &dyn Remote,
        fetches: &mut usize,
    ) -> Result<(StateIds, Option<i64>)> {
        // The common case: it follows exactly the room's extremities.
        let prevs: HashSet<&OwnedEventId> = pdu.prev_events.iter().collect();
        let extremities: HashSet<&OwnedEventId> = cache.extremities.iter().map(|(id, _)| id).collect();
        if prevs == extremities && cache.group.is_some() {
            let ids = cache
                .state
                .iter()
                .map(|(k, p)| (k.clone(), p.event_id.clone()))
                .collect();
            return Ok((ids, cache.group));
        }
        let mut groups = Vec::new();
        let mut missing = false;
        for prev in &pdu.prev_events {
            match self.store.event_place(prev.as_str()).await? {
                Some(place) if place.rejected.is_none() && place.state_after.is_some() => {
                    groups.extend(place.state_after);
                }
                _ => missing = true,
            }
        }
        if !missing && !groups.is_empty() {
            let mut states = Vec::new();
            for g in &groups {
                states.push(self.group_ids(*g).await?);
            }
            if states.len() == 1 || states.windows(2).all(|w| w[0] == w[1]) {
                let s = states.swap_remove(0);
                return Ok((s, Some(groups[0])));
            }
            return Ok((self.resolve(cache, states, None).await?, None));
        }
        // A gap: ask the origin for the state before the event.
        let (state_ids, auth_ids) = remote.state_ids(origin, &cache.room_id.clone(), &pdu.event_id).await?;
        for id in auth_ids.iter().chain(&state_ids) {
            if self.store.event_place(id.as_str()).await?.is_some() {
                continue;
            }
            self.fetch_outlier(cache, id, origin, remote, fetches).await?;
        }
        let mut state = StateIds::new();
        for id in &state_ids {
            if let Some(p) = self.load_pdu(cache, id).await?
                && let Some(k) = &p.state_key
            {
                state.insert((p.event_type.to_string(), k.clone()), id.clone());
            }
        }
        Ok((state, None))
    }

    /// The state a stored group holds, as event IDs.
    pub(crate) async fn group_ids(&self, group: i64) -> Result<StateIds> {
        let mut out = StateIds::new();
        for (k, id) in self.store.state_group(group).await? {
            out.insert(k, OwnedEventId::try_from(id).map_err(Error::internal)?);
        }
        Ok(out)
    }

    /// A new group holding `state`: a delta on `base` (group and its
    /// state) when given and its chain allows, else a snapshot. `change`:
    /// the one entry `state` adds to or changes in `base`'s state, when the
    /// caller knows it (a state event on the state before it), so the
    /// delta needs no comparison of the two whole states. Answers the group
    /// and its chain.
    async fn group_for(
        &self,
        state: &StateIds,
        base: Option<(i64, &StateIds)>,
        change: Option<(String, String, String)>,
        new_groups: &mut Vec<NewStateGroup>,
    ) -> Result<(i64, i64)> {
        let id = self.next_group().await?;
        let base_chain = match base {
            Some((g, _)) => match new_groups.iter().find(|n| n.id == g) {
                Some(n) => Some(n.chain),
                None => self.store.state_group_chain(g).await?,
            },
            None => None,
        };
        let group = match (base, base_chain) {
            (Some((g, _)), Some(chain)) if chain < MAX_CHAIN && change.is_some() => NewStateGroup {
                id,
                prev_group: Some(g),
                chain: chain + 1,
                entries: change.into_iter().collect(),
            },
            (Some((g, base_state)), Some(chain)) if chain < MAX_CHAIN && removed_none(base_state, state) => {
                NewStateGroup {
                    id,
                    prev_group: Some(g),
                    chain: chain + 1,
                    entries: diff(base_state, state),
                }
            }
            _ => NewStateGroup {
                id,
                prev_group: None,
                chain: 0,
                entries: state
                    .iter()
                    .map(|((t, k), e)| (t.clone(), k.clone(), e.to_string()))
                    .collect(),
            },
        };
        let chain = group.chain;
        new_groups.push(group);
        Ok((id, chain))
    }

    /// State resolution (v2) of `states`, loading the events it reads.
    /// `pending`: the event being taken in, not stored yet, when a state
    /// holds it.
    pub(crate) async fn resolve(
        &self,
        cache: &RoomCache,
        states: Vec<StateIds>,
        pending: Option<&Pdu>,
    ) -> Result<StateIds> {
        let rules = &cache.rules;
        let Some(res_rules) = rules.state_res.v2_rules() else {
            return Err(Error::new(ErrorKind::UnsupportedRoomVersion, "no state resolution v2"));
        };
        // Every event of the states and their auth chains, in memory.
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for s in &states {
            ids.extend(s.values().map(|e| e.to_string()));
        }
        // The pending event's auth chain: its auth events and theirs.
        let pending_chain: Vec<String> = match pending {
            Some(p) => {
                let mut chain = self
                    .store
                    .auth_chain(p.auth_events.iter().map(|e| e.to_string()).collect())
                    .await?;
                chain.extend(p.auth_events.iter().map(|e| e.to_string()));
                chain
            }
            None => Vec::new(),
        };
        let mut chains = Vec::new();
        for s in &states {
            let mut chain = self
                .store
                .auth_chain(s.values().map(|e| e.to_string()).collect())
                .await?;
            if let Some(p) = pending
                && s.values().any(|id| *id == p.event_id)
            {
                chain.extend(pending_chain.iter().cloned());
            }
            ids.extend(chain.iter().cloned());
            chains.push(
                chain
                    .into_iter()
                    .filter_map(|id| OwnedEventId::try_from(id).ok())
                    .collect::<state_res::utils::event_id_set::EventIdSet<OwnedEventId>>(),
            );
        }
        let mut events: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        for ev in self.store.events_by_id(ids.into_iter().collect()).await? {
            let p = crate::parse_stored(&ev)?;
            events.insert(p.event_id.clone(), Arc::new(p));
        }
        if let Some(p) = pending {
            events.insert(p.event_id.clone(), Arc::new(p.clone()));
        }
        let maps: Vec<RumaStateMap<OwnedEventId>> = states
            .iter()
            .map(|s| {
                s.iter()
                    .map(|((t, k), id)| ((StateEventType::from(t.as_str()), k.clone()), id.clone()))
                    .collect()
            })
            .collect();
        let resolved = state_res::resolve(
            &rules.authorization,
            res_rules,
            maps.iter(),
            chains,
            |id| events.get(id).cloned().map(ArcPdu),
            |conflicted| Some(conflicted_subgraph(conflicted, &events)),
        )
        .map_err(|e| Error::internal(format!("state resolution failed: {e}")))?;
        Ok(resolved
            .into_iter()
            .map(|((t, k), id)| ((t.to_string(), k), id))
            .collect())
    }

    /// The events of a state, parsed.
    pub(crate) async fn load_state(&self, cache: &RoomCache, state: &StateIds) -> Result<HashMap<StateKey, Arc<Pdu>>> {
        let mut out = HashMap::new();
        let mut wanted = Vec::new();
        for (k, id) in state {
            match cache.by_id.get(id) {
                Some(p) => {
                    out.insert(k.clone(), p.clone());
                }
                None => wanted.push(id.to_string()),
            }
        }
        for ev in self.store.events_by_id(wanted).await? {
            let p = Arc::new(crate::parse_stored(&ev)?);
            if let Some(key) = &p.state_key {
                out.insert((p.event_type.to_string(), key.clone()), p);
            }
        }
        Ok(out)
    }

    /// A stored event, parsed (from the room's view when it is state).
    pub(crate) async fn load_pdu(&self, cache: &RoomCache, id: &EventId) -> Result<Option<Arc<Pdu>>> {
        if let Some(p) = cache.by_id.get(id) {
            return Ok(Some(p.clone()));
        }
        match self.store.get_event(id.as_str()).await? {
            Some(ev) => Ok(Some(Arc::new(crate::parse_stored(&ev)?))),
            None => Ok(None),
        }
    }
}

/// Authorization of `pdu` at `state` (state-dependent rules).
fn check_at(
    rules: &ruma::room_version_rules::RoomVersionRules,
    pdu: &Pdu,
    state: &HashMap<StateKey, Arc<Pdu>>,
) -> std::result::Result<(), String> {
    state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t: &StateEventType, k: &str| {
        state.get(&(t.to_string(), k.to_owned())).cloned().map(ArcPdu)
    })
}

/// Whether `to` keeps every key of `from` (a delta can only add and
/// change keys).
fn removed_none(from: &StateIds, to: &StateIds) -> bool {
    from.keys().all(|k| to.contains_key(k))
}

/// The entries of `to` that differ from `from`.
fn diff(from: &StateIds, to: &StateIds) -> Vec<(String, String, String)> {
    to.iter()
        .filter(|(k, id)| from.get(*k) != Some(*id))
        .map(|((t, k), id)| (t.clone(), k.clone(), id.to_string()))
        .collect()
}

/// The conflicted state subgraph (room v12): the events that are reached
/// by following auth events from one conflicted event and themselves reach
/// another, among the loaded events.
fn conflicted_subgraph(
    conflicted: &RumaStateMap<Vec<OwnedEventId>>,
    events: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> state_res::utils::event_id_set::EventIdSet<OwnedEventId> {
    let starts: HashSet<&OwnedEventId> = conflicted.values().flatten().collect();
    // Reached from a conflicted event (its auth chain).
    let mut down: HashSet<&OwnedEventId> = HashSet::new();
    let mut stack: Vec<&OwnedEventId> = starts.iter().copied().collect();
    while let Some(id) = stack.pop() {
        if let Some(p) = events.get(id) {
            for a in &p.auth_events {
                if down.insert(a) {
                    stack.push(a);
                }
            }
        }
    }
    // Reaching a conflicted event: walk the auth edges backwards.
    let mut children: HashMap<&OwnedEventId, Vec<&OwnedEventId>> = HashMap::new();
    for (id, p) in events {
        for a in &p.auth_events {
            children.entry(a).or_default().push(id);
        }
    }
    let mut up: HashSet<&OwnedEventId> = HashSet::new();
    let mut stack: Vec<&OwnedEventId> = starts.iter().copied().collect();
    while let Some(id) = stack.pop() {
        for c in children.get(id).into_iter().flatten() {
            if up.insert(c) {
                stack.push(c);
            }
        }
    }
    let mut out = state_res::utils::event_id_set::EventIdSet::new();
    for id in down.intersection(&up).chain(starts.iter()) {
        out.insert((*id).clone());
    }
    out
}
