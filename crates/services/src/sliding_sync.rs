//! Simplified sliding sync (MSC4186,
//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`): a
//! reader of the one ordered stream, as `/sync` is, built of the same
//! blocks (module `sync`). The client asks for windows (`ranges`) of lists
//! of its rooms sorted by recency, and for particular rooms
//! (`room_subscriptions`); the server answers the rooms in them that are
//! new to the connection (`initial`, with their required state and last
//! `timeline_limit` events) or changed since the client's `pos`.
//!
//! What a connection has been told is kept in the database (table
//! `sliding_sync_connections`, one row per user, device and `conn_id`), so
//! any process sharing it can answer the next request: for each room sent,
//! the stream position it was sent up to and which response sent it. `pos`
//! is `<generation>_<response number>_<stream position>`: the generation
//! changes each time the connection starts afresh (a request without
//! `pos`), so a `pos` of an earlier life, of another connection, or that
//! the server never gave answers 400 `M_UNKNOWN_POS`. A client repeating a
//! request (its answer lost) with an older `pos` gets the rooms sent after
//! that `pos` again as `initial`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use ruma::api::client::sync::sync_events::v5;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_rooms::client_event;
use weft_store::{Direction, MembershipRecord, StoredEvent, StreamKey};

use crate::accounts::random_string;
use crate::filter::SyncFilter;
use crate::sync::{account_data_json, content_str, wait_for_position};
use crate::tokens::{make_token, parse_stream_token};
use crate::{Services, Session};

/// Event types that move a room up the list (its `bump_stamp`), besides
/// the user's own membership.
const BUMP_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "m.beacon_info",
];
/// Most events looked at, walking back, for a room's latest bump event;
/// past that its latest event of any type bumps it.
const BUMP_SCAN: usize = 500;
/// Most timeline events one room carries.
const MAX_TIMELINE: u64 = 100;
/// Most to-device messages one response carries.
const TO_DEVICE_LIMIT: u64 = 100;
/// Longest `conn_id` accepted.
const MAX_CONN_ID: usize = 64;

/// What the server has told one connection (stored as JSON).
#[derive(Default, Serialize, Deserialize)]
struct Connection {
    /// Changes when the connection starts afresh.
    generation: String,
    /// Responses given so far.
    responses: u64,
    /// The rooms the client has: for each, what it was sent.
    rooms: BTreeMap<String, SentRoom>,
    /// The list counts of the last response.
    counts: BTreeMap<String, u64>,
}

#[derive(Clone, Serialize, Deserialize)]
struct SentRoom {
    /// The response that sent it.
    response: u64,
    /// The stream position it was sent up to.
    pos: i64,
    /// The user's membership it was sent with: when that changes (an
    /// invite accepted), the room is sent whole again.
    membership: String,
    /// The `required_state` it was sent with: when the client asks for
    /// more (opening a room subscribes to it with more state), the room is
    /// sent whole again.
    #[serde(default)]
    required_state: Vec<(String, String)>,
}

/// What the client asks to see of a room: the union over the lists it is
/// in range of and its subscription.
#[derive(Default, Clone)]
struct Details {
    required_state: Vec<(String, String)>,
    timeline_limit: u64,
}

impl Details {
    fn merge(&mut self, required_state: &[(ruma::events::StateEventType, String)], timeline_limit: u64) {
        for (t, k) in required_state {
            let pair = (t.to_string(), k.clone());
            if !self.required_state.contains(&pair) {
                self.required_state.push(pair);
            }
        }
        self.timeline_limit = self.timeline_limit.max(timeline_limit);
    }

    /// Whether a state event is asked for (`*` matches any type or key,
    /// `$ME` is the user; `$LAZY` members are added by the caller).
    fn wants(&self, user: &str, e: &StoredEvent) -> bool {
        let key = e.state_key.as_deref().unwrap_or_default();
        self.required_state
            .iter()
            .any(|(t, k)| (t == "*" || *t == e.event_type) && (k == "*" || k == key || (k == "$ME" && key == user)))
    }

    fn lazy_members(&self) -> bool {
        self.required_state
            .iter()
            .any(|(t, k)| (t == "m.room.member" || t == "*") && k == "$LAZY")
    }
}

/// One room the user is in (or invited to), as the lists see it.
struct Candidate {
    m: MembershipRecord,
    bump: i64,
    is_dm: bool,
    encrypted: bool,
    room_type: Option<String>,
}

impl Services {
    /// Answers one simplified sliding sync request, long-polling up to its
    /// `timeout` when the connection has nothing new.
    pub async fn sliding_sync(&self, session: &Session, req: &v5::Request) -> Result<Value> {
        let user = session.user_id.as_str();
        let device = session.device_id.as_str();
        let conn_id = req.conn_id.as_deref().unwrap_or_default();
        crate::text::check_text("conn_id", conn_id)?;
        if conn_id.len() > MAX_CONN_ID {
            return Err(Error::invalid_param("conn_id is too long"));
        }
        let stored = self.store.sliding_connection(user, device, conn_id).await?;
        let (mut conn, since) = match req.pos.as_deref() {
            None => (
                Connection {
                    generation: random_string(8),
                    ..Connection::default()
                },
                None,
            ),
            Some(pos) => {
                let conn: Connection = stored
                    .and_then(|j| serde_json::from_str(&j).ok())
                    .ok_or_else(unknown_pos)?;
                let (responses, stream) = parse_pos(pos, &conn.generation).ok_or_else(unknown_pos)?;
                if responses > conn.responses || stream > self.store.current_position() {
                    return Err(unknown_pos());
                }
                (conn, Some((responses, stream)))
            }
        };
        if let Some((responses, _)) = since {
            // A repeated request: what later responses sent is unknown to
            // the client.
            conn.rooms.retain(|_, r| r.response <= responses);
            if responses < conn.responses {
                conn.counts.clear();
            }
        }
        let since_stream = since.map(|(_, s)| s);
        let ext = &req.extensions;
        if ext.to_device.enabled == Some(true)
            && let Some(s) = ext.to_device.since.as_deref()
        {
            // Asking from `s` acknowledges the messages up to it.
            let acked = parse_stream_token(s)?.min(self.store.current_position());
            self.store.ack_to_device(user, device, acked).await?;
        }
        let mut rx = self.store.subscribe_position();
        let timeout = req
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
            .min(self.config.limits.max_sync_timeout_ms);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
        // The position looked at last: after the first build, a wake
        // rebuilds the response only when the stream touched this
        // connection since then.
        let mut checked_to: Option<i64> = None;
        let (resp, upto) = loop {
            let upto = *rx.borrow_and_update();
            let relevant = match checked_to {
                None => true,
                Some(b) => self.sliding_relevant(session, req, b, upto).await?,
            };
            if relevant {
                let resp = self.build_sliding(session, req, &conn, since_stream, upto).await?;
                if since.is_none() || !resp.is_empty(&conn) || tokio::time::Instant::now() >= deadline {
                    break (resp, upto);
                }
            }
            checked_to = Some(upto);
            if !wait_for_position(&mut rx, deadline).await? {
                let upto = *rx.borrow_and_update();
                let resp = self.build_sliding(session, req, &conn, since_stream, upto).await?;
                break (resp, upto);
            }
        };
        // Remember what this response tells the client.
        conn.responses += 1;
        let n = conn.responses;
        for (room, sent) in &resp.sent {
            let sent = SentRoom {
                response: n,
                pos: upto,
                ..sent.clone()
            };
            conn.rooms.insert(room.clone(), sent);
        }
        for room in &resp.gone {
            conn.rooms.remove(room);
        }
        for room in &resp.unchanged {
            if let Some(r) = conn.rooms.get_mut(room) {
                r.pos = upto;
            }
        }
        conn.counts = resp.counts.clone();
        self.store
            .put_sliding_connection(
                user,
                device,
                conn_id,
                &serde_json::to_string(&conn).map_err(Error::internal)?,
            )
            .await?;
        let mut body = json!({
            "pos": format!("{}_{}_{}", conn.generation, n, upto),
            "lists": resp.counts.iter().map(|(k, c)| (k.clone(), json!({ "count": c }))).collect::<Map<_, _>>(),
            "rooms": resp.rooms,
            "extensions": resp.extensions,
        });
        if let Some(t) = &req.txn_id {
            body["txn_id"] = json!(t);
        }
        Ok(body)
    }

    /// Whether the stream in (since, upto] touched anything of this user's
    /// connection: one of their rooms, themselves (account data,
    /// to-device messages, membership), device keys (with e2ee on). When
    /// the in-memory record does not reach back that far: yes.
    async fn sliding_relevant(&self, session: &Session, req: &v5::Request, since: i64, upto: i64) -> Result<bool> {
        let user = session.user_id.as_str();
        let Some(changes) = self.store.changes_since(since) else {
            return Ok(true);
        };
        if changes.iter().all(|(p, _)| *p > upto) {
            return Ok(false);
        }
        let rooms: HashSet<String> = self
            .store
            .user_memberships(user)
            .await?
            .into_iter()
            .map(|m| m.room_id)
            .collect();
        let e2ee = req.extensions.e2ee.enabled == Some(true);
        Ok(changes.iter().any(|(p, k)| {
            *p <= upto
                && match k {
                    StreamKey::User(u) => u == user,
                    StreamKey::DeviceKeys(_) => e2ee,
                    StreamKey::Notification(u, r) => u == user && rooms.contains(r),
                    k => key_room(k).is_some_and(|r| rooms.contains(r)),
                }
        }))
    }

    /// The response for (since, upto].
    async fn build_sliding(
        &self,
        session: &Session,
        req: &v5::Request,
        conn: &Connection,
        since: Option<i64>,
        upto: i64,
    ) -> Result<Built> {
        let user = session.user_id.as_str();
        let now = weft_core::now_ms();
        let memberships: Vec<MembershipRecord> = self
            .store
            .user_memberships(user)
            .await?
            .into_iter()
            .filter(|m| m.position <= upto)
            .collect();
        let direct = self.direct_rooms(user).await?;
        // Rooms whose unread counts may have changed in (since, upto]
        // without a new event: a notification row of this user, or a
        // receipt (the user's own may have read them).
        let mut counts_touched: HashSet<String> = HashSet::new();
        let mut receipt_rooms: HashSet<String> = HashSet::new();
        if let Some(s) = since {
            for (p, k) in self.store.changes_since(s).unwrap_or_default() {
                match k {
                    _ if p > upto => {}
                    StreamKey::Notification(u, r) if u == user => {
                        counts_touched.insert(r);
                    }
                    StreamKey::Receipt(r) => {
                        receipt_rooms.insert(r);
                    }
                    _ => {}
                }
            }
            // Only the user's own receipts move their counts.
            for r in receipt_rooms {
                let own = self
                    .store
                    .receipts_since(&r, s, upto)
                    .await?
                    .iter()
                    .any(|x| x.user_id == user);
                if own {
                    counts_touched.insert(r);
                }
            }
        }
        // The rooms lists are made of: joined and invited, by recency.
        let mut candidates = Vec::new();
        for m in memberships
            .iter()
            .filter(|m| matches!(m.membership.as_str(), "join" | "invite"))
        {
            candidates.push(self.candidate(m.clone(), &direct, upto).await?);
        }
        candidates.sort_by(|a, b| b.bump.cmp(&a.bump).then_with(|| a.m.room_id.cmp(&b.m.room_id)));
        let mut counts = BTreeMap::new();
        let mut wanted: BTreeMap<String, Details> = BTreeMap::new();
        let mut in_list: HashMap<&str, Vec<&str>> = HashMap::new();
        for (name, list) in &req.lists {
            let members: Vec<&Candidate> = candidates.iter().filter(|c| list_allows(list, c)).collect();
            counts.insert(name.clone(), members.len() as u64);
            for (from, to) in &list.ranges {
                let (from, to) = (u64::from(*from), u64::from(*to));
                for (i, c) in members.iter().enumerate() {
                    let i = i as u64;
                    if i < from || i > to {
                        continue;
                    }
                    wanted.entry(c.m.room_id.clone()).or_default().merge(
                        &list.room_details.required_state,
                        u64::from(list.room_details.timeline_limit),
                    );
                    in_list.entry(name.as_str()).or_default().push(c.m.room_id.as_str());
                }
            }
        }
        // Subscriptions: only rooms the user is in or invited to.
        for (room_id, sub) in &req.room_subscriptions {
            if candidates.iter().any(|c| c.m.room_id == room_id.as_str()) {
                wanted
                    .entry(room_id.to_string())
                    .or_default()
                    .merge(&sub.required_state, u64::from(sub.timeline_limit));
            }
        }
        let mut built = Built {
            counts,
            ..Built::default()
        };
        let default_limit = wanted.values().map(|d| d.timeline_limit).max().unwrap_or(1);
        for c in &candidates {
            let Some(details) = wanted.get(&c.m.room_id) else {
                continue;
            };
            let known = conn.rooms.get(&c.m.room_id).filter(|k| {
                k.membership == c.m.membership
                    && (c.m.membership == "invite"
                        || details.required_state.iter().all(|p| k.required_state.contains(p)))
            });
            let room = match c.m.membership.as_str() {
                "invite" if known.is_some() => None,
                "invite" => Some(self.invited_room(session.user_id.as_str(), c).await?),
                _ => {
                    let touched = counts_touched.contains(&c.m.room_id);
                    self.joined_room(session, c, details, known.map(|k| k.pos), touched, since, upto, now)
                        .await?
                }
            };
            match room {
                Some(r) => {
                    built.rooms.insert(c.m.room_id.clone(), r);
                    let sent = SentRoom {
                        response: 0,
                        pos: 0,
                        membership: c.m.membership.clone(),
                        required_state: details.required_state.clone(),
                    };
                    built.sent.push((c.m.room_id.clone(), sent));
                }
                None => built.unchanged.push(c.m.room_id.clone()),
            }
        }
        // Rooms the client has that the user left (or was removed from)
        // since: sent once, up to the leave, then forgotten.
        for m in memberships
            .iter()
            .filter(|m| matches!(m.membership.as_str(), "leave" | "ban"))
        {
            let Some(known) = conn.rooms.get(&m.room_id) else {
                continue;
            };
            if m.position <= known.pos {
                continue;
            }
            let details = Details {
                required_state: Vec::new(),
                timeline_limit: default_limit,
            };
            let c = Candidate {
                m: m.clone(),
                bump: m.position,
                is_dm: direct.contains(&m.room_id),
                encrypted: false,
                room_type: None,
            };
            if let Some(r) = self
                .joined_room(session, &c, &details, Some(known.pos), false, since, m.position, now)
                .await?
            {
                built.rooms.insert(m.room_id.clone(), r);
            }
            built.gone.push(m.room_id.clone());
        }
        // Extensions carry what only members see: joined rooms only.
        let joined: HashSet<&str> = candidates
            .iter()
            .filter(|c| c.m.membership == "join" && wanted.contains_key(&c.m.room_id))
            .map(|c| c.m.room_id.as_str())
            .collect();
        built.extensions = self
            .sliding_extensions(session, req, &built, &in_list, &joined, since, upto)
            .await?;
        Ok(built)
    }

    /// A room as the lists sort and filter it.
    async fn candidate(&self, m: MembershipRecord, direct: &HashSet<String>, upto: i64) -> Result<Candidate> {
        let state = self.store.current_state(&m.room_id).await?;
        let encrypted = state.iter().any(|e| e.event_type == "m.room.encryption");
        let room_type = state
            .iter()
            .find(|e| e.event_type == "m.room.create")
            .and_then(|e| content_str(e, "type"));
        let mut is_dm = direct.contains(&m.room_id);
        let bump = if m.membership == "invite" {
            if let Some(inv) = self.store.get_event(&m.event_id).await? {
                is_dm |= serde_json::from_str::<Value>(&inv.pdu_json)
                    .ok()
                    .and_then(|v| v["content"]["is_direct"].as_bool())
                    .unwrap_or(false);
            }
            m.position
        } else {
            self.bump_stamp(&m.room_id, upto).await?.max(m.position)
        };
        Ok(Candidate {
            m,
            bump,
            is_dm,
            encrypted,
            room_type,
        })
    }

    /// The stream position of the room's latest event of a bump type up
    /// to `upto` (past [`BUMP_SCAN`] events back: its latest event).
    async fn bump_stamp(&self, room_id: &str, upto: i64) -> Result<i64> {
        let mut cursor = upto + 1;
        let mut latest = 0;
        let mut seen = 0;
        while seen < BUMP_SCAN {
            let page = self
                .store
                .room_events(room_id, cursor, 0, Direction::Backward, 50)
                .await?;
            let Some(last) = page.last() else { break };
            cursor = last.position;
            if latest == 0 {
                latest = page[0].position;
            }
            if let Some(e) = page.iter().find(|e| BUMP_TYPES.contains(&e.event_type.as_str())) {
                return Ok(e.position);
            }
            seen += page.len();
            if page.len() < 50 {
                break;
            }
        }
        Ok(latest)
    }

    /// The rooms `m.direct` names (the user's DMs).
    async fn direct_rooms(&self, user: &str) -> Result<HashSet<String>> {
        let Some(json) = self.store.get_account_data(user, None, "m.direct").await? else {
            return Ok(HashSet::new());
        };
        let v: Value = serde_json::from_str(&json).unwrap_or_default();
        Ok(v.as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    /// An invited room: its stripped state, always whole.
    async fn invited_room(&self, user: &str, c: &Candidate) -> Result<Value> {
        let invite_state = self.invite_state(user, &c.m).await?;
        let mut room = json!({
            "initial": true,
            "invite_state": invite_state,
            "bump_stamp": c.bump,
            "is_dm": c.is_dm,
        });
        for e in &invite_state {
            match e["type"].as_str() {
                Some("m.room.name") => {
                    if let Some(n) = e["content"]["name"].as_str().filter(|n| !n.is_empty()) {
                        room["name"] = json!(n);
                    }
                }
                Some("m.room.avatar") => {
                    if let Some(u) = e["content"]["url"].as_str() {
                        room["avatar"] = json!(u);
                    }
                }
                _ => {}
            }
        }
        Ok(room)
    }

    /// A joined room (or one just left, with `upto` its leave): everything
    /// when the client does not have it (`known` is `None`), else what
    /// changed since `known`; `None` when nothing did.
    #[allow(clippy::too_many_arguments)]
    async fn joined_room(
        &self,
        session: &Session,
        c: &Candidate,
        details: &Details,
        known: Option<i64>,
        counts_touched: bool,
        since: Option<i64>,
        upto: i64,
        now: u64,
    ) -> Result<Option<Value>> {
        let user = session.user_id.as_str();
        let room_id = c.m.room_id.as_str();
        let viewer = Some((user, session.device_id.as_str()));
        if let Some(k) = known {
            let newer = self
                .store
                .room_events(room_id, upto + 1, k, Direction::Backward, 1)
                .await?;
            if newer.is_empty() {
                if !counts_touched {
                    return Ok(None);
                }
                // No new event, but the unread counts may have moved (read
                // elsewhere, or the push evaluator caught up): the counts
                // alone, as MSC4186 allows.
                let (notifications, highlights) = self.unread_counts(user, room_id).await?;
                return Ok(Some(json!({
                    "notification_count": notifications,
                    "highlight_count": highlights,
                    "bump_stamp": c.bump,
                })));
            }
        }
        let floor = known.unwrap_or(0);
        let all_visible = known.is_some_and(|k| c.m.position <= k) && c.m.membership == "join";
        let limit = usize::try_from(details.timeline_limit.min(MAX_TIMELINE)).unwrap_or(1);
        let (timeline, limited) = self
            .timeline_events(user, room_id, floor, upto, all_visible, limit, &SyncFilter::default())
            .await?;
        let current = self.store.current_state(room_id).await?;
        let state: Vec<StoredEvent> = match known {
            None => current.iter().filter(|e| e.position <= upto).cloned().collect(),
            Some(k) => self.store.state_changes(room_id, k, upto).await?,
        };
        let mut required: Vec<&StoredEvent> = state.iter().filter(|e| details.wants(user, e)).collect();
        if details.lazy_members() {
            let senders: HashSet<&str> = timeline.iter().map(|e| e.sender.as_str()).collect();
            for e in &current {
                let lazy = e.event_type == "m.room.member"
                    && e.state_key.as_deref().is_some_and(|k| senders.contains(k))
                    && e.position <= upto;
                if lazy && !required.iter().any(|r| r.event_id == e.event_id) {
                    required.push(e);
                }
            }
        }
        let summary = self.room_summary(user, room_id).await?;
        let (notifications, highlights) = self.unread_counts(user, room_id).await?;
        let mut room = json!({
            "timeline": timeline.iter().map(|e| client_event(e, viewer, now)).collect::<Vec<_>>(),
            "required_state": required.iter().map(|e| client_event(e, viewer, now)).collect::<Vec<_>>(),
            "limited": limited,
            "num_live": since.map_or(0, |s| timeline.iter().filter(|e| e.position > s).count()),
            "bump_stamp": c.bump,
            "joined_count": summary["m.joined_member_count"],
            "invited_count": summary["m.invited_member_count"],
            "notification_count": notifications,
            "highlight_count": highlights,
            "is_dm": c.is_dm,
        });
        if known.is_none() {
            room["initial"] = json!(true);
        }
        if let Some(first) = timeline.first() {
            room["prev_batch"] = json!(make_token(first.position - 1));
        }
        let find = |t: &str| {
            current
                .iter()
                .find(|e| e.event_type == t && e.state_key.as_deref() == Some(""))
        };
        match find("m.room.name")
            .and_then(|e| content_str(e, "name"))
            .filter(|n| !n.is_empty())
        {
            Some(name) => room["name"] = json!(name),
            None => {
                let heroes: Vec<Value> = summary["m.heroes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|h| {
                        let member = current
                            .iter()
                            .find(|e| e.event_type == "m.room.member" && e.state_key.as_deref() == Some(h));
                        let mut hero = json!({ "user_id": h });
                        if let Some(n) = member.and_then(|e| content_str(e, "displayname")) {
                            hero["displayname"] = json!(n);
                        }
                        if let Some(a) = member.and_then(|e| content_str(e, "avatar_url")) {
                            hero["avatar_url"] = json!(a);
                        }
                        hero
                    })
                    .collect();
                room["heroes"] = json!(heroes);
            }
        }
        if let Some(url) = find("m.room.avatar").and_then(|e| content_str(e, "url")) {
            room["avatar"] = json!(url);
        }
        Ok(Some(room))
    }

    /// The extensions the request enables, over the rooms each applies to.
    #[allow(clippy::too_many_arguments)]
    async fn sliding_extensions(
        &self,
        session: &Session,
        req: &v5::Request,
        built: &Built,
        in_list: &HashMap<&str, Vec<&str>>,
        joined: &HashSet<&str>,
        since: Option<i64>,
        upto: i64,
    ) -> Result<Value> {
        let user = session.user_id.as_str();
        let ext = &req.extensions;
        let mut out = Map::new();
        // A room is new to the client when this response sends it whole.
        let fresh = |room: &str| since.is_none() || built.rooms.get(room).is_some_and(|r| r.get("initial").is_some());
        if ext.to_device.enabled == Some(true) {
            let from = ext
                .to_device
                .since
                .as_deref()
                .map(parse_stream_token)
                .transpose()?
                .unwrap_or(0)
                .min(upto);
            let limit = ext.to_device.limit.map_or(TO_DEVICE_LIMIT, u64::from).min(1000);
            let (events, end) = self
                .to_device_batch(session, from, upto, usize::try_from(limit).unwrap_or(100))
                .await?;
            out.insert(
                "to_device".into(),
                json!({ "next_batch": make_token(end), "events": events }),
            );
        }
        if ext.e2ee.enabled == Some(true) {
            let (changed, left) = match since {
                Some(s) => (
                    self.store.device_list_changes(user, s, upto).await?,
                    self.store.device_list_left(user, s, upto).await?,
                ),
                None => (Vec::new(), Vec::new()),
            };
            let mut e2ee = json!({ "device_lists": { "changed": changed, "left": left } });
            self.add_device_fields(session, &mut e2ee).await?;
            out.insert("e2ee".into(), e2ee);
        }
        if ext.account_data.enabled == Some(true) {
            let scope = ext_scope(
                ext.account_data.lists.as_deref(),
                ext.account_data.rooms.as_deref(),
                in_list,
                req,
                joined,
            );
            let mut global = Vec::new();
            let mut rooms: Map<String, Value> = Map::new();
            for a in self.store.account_data_since(user, since.unwrap_or(0), upto).await? {
                match &a.room_id {
                    None => global.push(account_data_json(&a)),
                    Some(r) if scope.contains(&r.as_str()) && !fresh(r) => {
                        push_to(&mut rooms, r, account_data_json(&a));
                    }
                    Some(_) => {}
                }
            }
            for r in scope.iter().filter(|r| fresh(r)) {
                let all = self.room_account_data(user, r, upto).await?;
                if !all.is_empty() {
                    rooms.insert((*r).to_owned(), json!(all));
                }
            }
            out.insert("account_data".into(), json!({ "global": global, "rooms": rooms }));
        }
        // Rooms the stream touched in (since, upto] (`None`: not known,
        // any of them may have been).
        let touched: Option<HashSet<String>> = since.and_then(|s| {
            self.store.changes_since(s).map(|c| {
                c.iter()
                    .filter(|(p, _)| *p <= upto)
                    .filter_map(|(_, k)| key_room(k).map(str::to_owned))
                    .collect()
            })
        });
        if ext.receipts.enabled == Some(true) {
            let scope = ext_scope(
                ext.receipts.lists.as_deref(),
                ext.receipts.rooms.as_deref(),
                in_list,
                req,
                joined,
            );
            let mut rooms = Map::new();
            for r in scope {
                let from = if fresh(r) { 0 } else { since.unwrap_or(0) };
                if from > 0 && touched.as_ref().is_some_and(|t| !t.contains(r)) {
                    continue;
                }
                if let Some(ev) = self.receipt_event(user, r, from, upto).await? {
                    rooms.insert(r.to_owned(), ev);
                }
            }
            out.insert("receipts".into(), json!({ "rooms": rooms }));
        }
        if ext.typing.enabled == Some(true) {
            let scope = ext_scope(
                ext.typing.lists.as_deref(),
                ext.typing.rooms.as_deref(),
                in_list,
                req,
                joined,
            );
            let mut rooms = Map::new();
            for r in scope {
                if !fresh(r) && touched.as_ref().is_some_and(|t| !t.contains(r)) {
                    continue;
                }
                if let Some(ev) = self.typing_event(r).await? {
                    rooms.insert(r.to_owned(), ev);
                }
            }
            out.insert("typing".into(), json!({ "rooms": rooms }));
        }
        Ok(Value::Object(out))
    }
}

/// A built response, with what it tells the connection.
#[derive(Default)]
struct Built {
    counts: BTreeMap<String, u64>,
    rooms: Map<String, Value>,
    extensions: Value,
    /// Rooms sent (now up to date at the response's position), with the
    /// user's membership and the required state asked for (response and
    /// position are filled in once the response is given).
    sent: Vec<(String, SentRoom)>,
    /// Rooms the client has that had nothing new.
    unchanged: Vec<String>,
    /// Rooms the user left, sent for the last time.
    gone: Vec<String>,
}

impl Built {
    /// Whether the response tells the client nothing new.
    fn is_empty(&self, conn: &Connection) -> bool {
        let none = |v: &Value| match v {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => true,
        };
        let ext = &self.extensions;
        self.rooms.is_empty()
            && self.counts == conn.counts
            && none(&ext["to_device"]["events"])
            && none(&ext["e2ee"]["device_lists"]["changed"])
            && none(&ext["e2ee"]["device_lists"]["left"])
            && none(&ext["account_data"]["global"])
            && none(&ext["account_data"]["rooms"])
            && none(&ext["receipts"]["rooms"])
            && none(&ext["typing"]["rooms"])
    }
}

/// The room a stream entry is about, if any.
fn key_room(k: &StreamKey) -> Option<&str> {
    match k {
        StreamKey::Room(r) | StreamKey::State(r) | StreamKey::Receipt(r) | StreamKey::Typing(r) => Some(r),
        StreamKey::User(_)
        | StreamKey::DeviceKeys(_)
        | StreamKey::Notification(..)
        | StreamKey::Presence(_)
        | StreamKey::Outbox(_)
        | StreamKey::Revoked(_)
        | StreamKey::MqttClient(..) => None,
    }
}

/// The rooms an extension applies to: those in range of the named lists
/// (`*`, or no `lists`: all lists) and the subscriptions it names (`*`, or
/// no `rooms`: all of them).
fn ext_scope<'a>(
    lists: Option<&'a [String]>,
    rooms: Option<&'a [v5::request::ExtensionRoomConfig]>,
    in_list: &'a HashMap<&str, Vec<&'a str>>,
    req: &'a v5::Request,
    joined: &HashSet<&str>,
) -> Vec<&'a str> {
    use v5::request::ExtensionRoomConfig;
    let mut out: Vec<&str> = Vec::new();
    for (name, ids) in in_list {
        if lists.is_none_or(|l| l.iter().any(|n| n == "*" || n == name)) {
            out.extend(ids.iter().copied());
        }
    }
    for room_id in req.room_subscriptions.keys() {
        let named = rooms.is_none_or(|rs| {
            rs.iter().any(|r| match r {
                ExtensionRoomConfig::AllSubscribed => true,
                ExtensionRoomConfig::Room(id) => id == room_id,
                _ => false,
            })
        });
        if named {
            out.push(room_id.as_str());
        }
    }
    // Only rooms the user is in (a subscription to another room is
    // ignored).
    out.retain(|r| joined.contains(r));
    out.sort_unstable();
    out.dedup();
    out
}

fn push_to(map: &mut Map<String, Value>, key: &str, v: Value) {
    if let Value::Array(a) = map.entry(key.to_owned()).or_insert_with(|| json!([])) {
        a.push(v);
    }
}

/// Whether a list's filters keep a room.
fn list_allows(list: &v5::request::List, c: &Candidate) -> bool {
    let Some(f) = &list.filters else { return true };
    let type_of = |t: &ruma::directory::RoomTypeFilter| match serde_json::to_value(t) {
        Ok(Value::String(s)) => Some(s),
        _ => None,
    };
    f.is_dm.is_none_or(|d| d == c.is_dm)
        && f.is_encrypted.is_none_or(|e| e == c.encrypted)
        && f.is_invite.is_none_or(|i| i == (c.m.membership == "invite"))
        && (f.room_types.is_empty() || f.room_types.iter().any(|t| type_of(t) == c.room_type))
        && !f.not_room_types.iter().any(|t| type_of(t) == c.room_type)
}

fn unknown_pos() -> Error {
    Error::new(ErrorKind::UnknownPos, "Unknown position; start the connection again").with_status(400)
}

/// Reads `<generation>_<response>_<stream position>` of this generation.
fn parse_pos(pos: &str, generation: &str) -> Option<(u64, i64)> {
    let mut parts = pos.split('_');
    let (g, n, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || g != generation || g.is_empty() {
        return None;
    }
    Some((n.parse().ok()?, s.parse().ok().filter(|s: &i64| *s >= 0)?))
}
