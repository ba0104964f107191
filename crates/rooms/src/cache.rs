//! The pipeline's view of one room: what building and checking its next
//! event reads (current state, forward extremities, the current state's
//! group), kept under the room's lock and reloaded from the store after a
//! failed write.

use std::collections::HashMap;
use std::sync::Arc;

use ruma::{OwnedEventId, OwnedRoomId, RoomVersionId, room_version_rules::RoomVersionRules};
use weft_store::NewEvent;

use crate::{Pdu, StateKey};

/// In-memory view of a room the pipeline builds on.
pub(crate) struct RoomCache {
    pub(crate) version: RoomVersionId,
    pub(crate) rules: RoomVersionRules,
    pub(crate) room_id: OwnedRoomId,
    /// The current state (resolved at the forward extremities).
    pub(crate) state: HashMap<StateKey, Arc<Pdu>>,
    pub(crate) by_id: HashMap<OwnedEventId, Arc<Pdu>>,
    /// The forward extremities with their depths, deepest first.
    pub(crate) extremities: Vec<(OwnedEventId, u64)>,
    /// The state group of `state`, and its chain of deltas.
    pub(crate) group: Option<i64>,
    pub(crate) chain: i64,
    /// How many joined members each server has in the room now.
    pub(crate) joined_servers: HashMap<ruma::OwnedServerName, i64>,
    /// Which reading of the room this is (unique in the process): events
    /// built on one reading fail together when it was stale.
    pub(crate) view: u64,
}

/// The last [`RoomCache::view`] handed out.
static VIEWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl RoomCache {
    /// A room with nothing known yet (before its create event, or before
    /// a join's state is taken in).
    pub(crate) fn empty(version: RoomVersionId, rules: RoomVersionRules, room_id: OwnedRoomId) -> Self {
        Self {
            version,
            rules,
            room_id,
            state: HashMap::new(),
            by_id: HashMap::new(),
            extremities: Vec::new(),
            group: None,
            chain: 0,
            joined_servers: HashMap::new(),
            view: VIEWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        }
    }

    pub(crate) fn power_levels(&self) -> Option<serde_json::Value> {
        let pl = self.state.get(&("m.room.power_levels".to_owned(), String::new()))?;
        serde_json::from_str(pl.content.get()).ok()
    }

    pub(crate) fn is_creator(&self, user: &str) -> bool {
        let Some(create) = self.state.get(&("m.room.create".to_owned(), String::new())) else {
            return false;
        };
        if create.sender.as_str() == user {
            return true;
        }
        self.rules.authorization.additional_room_creators
            && serde_json::from_str::<serde_json::Value>(create.content.get())
                .ok()
                .and_then(|c| c.get("additional_creators").cloned())
                .and_then(|a| a.as_array().map(|a| a.iter().any(|u| u.as_str() == Some(user))))
                .unwrap_or(false)
    }

    /// A user's power level (creators are all-powerful from room v12).
    pub(crate) fn power_of(&self, user: &str) -> i64 {
        if self.rules.authorization.explicitly_privilege_room_creators && self.is_creator(user) {
            return i64::MAX;
        }
        match self.power_levels() {
            Some(pl) => pl["users"][user]
                .as_i64()
                .or_else(|| pl["users_default"].as_i64())
                .unwrap_or(0),
            // Without power levels the creator has 100, everyone else 0.
            None => {
                if self.is_creator(user) {
                    100
                } else {
                    0
                }
            }
        }
    }

    /// The level a top-level power-levels key requires.
    pub(crate) fn power_for(&self, key: &str, default: i64) -> i64 {
        self.power_levels().and_then(|pl| pl[key].as_i64()).unwrap_or(default)
    }

    /// Puts a current state event into `state`.
    pub(crate) fn apply_state(&mut self, pdu: Arc<Pdu>) {
        if let Some(key) = &pdu.state_key {
            let member = pdu.event_type.to_string() == "m.room.member";
            let k = (pdu.event_type.to_string(), key.clone());
            if let Some(old) = self.state.insert(k, pdu.clone()) {
                self.by_id.remove(&old.event_id);
                if member && crate::query::membership_of(&old).as_deref() == Some("join") {
                    self.count_server(key, -1);
                }
            }
            if member && crate::query::membership_of(&pdu).as_deref() == Some("join") {
                self.count_server(key, 1);
            }
            self.by_id.insert(pdu.event_id.clone(), pdu.clone());
        }
    }

    /// Keeps `joined_servers` as members join and leave.
    fn count_server(&mut self, user: &str, by: i64) {
        let Ok(user) = ruma::UserId::parse(user) else { return };
        let n = self.joined_servers.entry(user.server_name().to_owned()).or_default();
        *n += by;
        if *n <= 0 {
            self.joined_servers.remove(user.server_name());
        }
    }

    /// Moves the room on past a new local event: its state, its forward
    /// extremities (the event replaces those it was built on), its group.
    pub(crate) fn advance(&mut self, pdu: Arc<Pdu>, ev: &NewEvent) {
        self.extremities.retain(|(id, _)| !pdu.prev_events.contains(id));
        self.extremities.insert(0, (pdu.event_id.clone(), pdu.depth));
        if let Some(g) = ev.new_groups.last() {
            self.group = Some(g.id);
            self.chain = g.chain;
        }
        self.apply_state(pdu);
    }

    /// The newest forward extremity (an upgrade's `predecessor`).
    pub(crate) fn latest(&self) -> Option<OwnedEventId> {
        self.extremities.first().map(|(id, _)| id.clone())
    }
}
