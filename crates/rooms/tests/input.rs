//! Remote events through the room pipeline's input, against a real store:
//! a "remote server" here is a signing key and the events it knows, as
//! another homeserver would present them over federation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, ServerName,
    UserId,
    serde::Base64,
    signatures::{Ed25519KeyPair, PublicKeyMap},
};
use serde_json::json;
use weft_core::Result;
use weft_rooms::{Arrival, CreateRoom, EventSpec, Outcome, Preset, Remote, Rooms};
use weft_store::{Direction, SqliteStore, Store};

struct RemoteServer {
    name: OwnedServerName,
    key: Ed25519KeyPair,
    /// What it would answer to `/event`.
    events: Mutex<HashMap<OwnedEventId, CanonicalJsonObject>>,
    /// What it would answer to `/state_ids`.
    state_ids: Mutex<(Vec<OwnedEventId>, Vec<OwnedEventId>)>,
}

impl RemoteServer {
    fn new(name: &str) -> Self {
        let der = Ed25519KeyPair::generate();
        Self {
            name: name.try_into().unwrap(),
            key: Ed25519KeyPair::from_der(&der, "r1".into()).unwrap(),
            events: Mutex::default(),
            state_ids: Mutex::default(),
        }
    }

    /// Builds and signs a PDU of this server (room version 11).
    #[allow(clippy::too_many_arguments)]
    fn pdu(
        &self,
        room: &RoomId,
        sender: &str,
        event_type: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
        prevs: &[&EventId],
        auths: &[&EventId],
        depth: u64,
    ) -> (OwnedEventId, CanonicalJsonObject) {
        let mut v = json!({
            "room_id": room,
            "sender": sender,
            "type": event_type,
            "content": content,
            "prev_events": prevs,
            "auth_events": auths,
            "depth": depth,
            "origin_server_ts": 1_700_000_000_000u64 + depth,
        });
        if let Some(k) = state_key {
            v["state_key"] = json!(k);
        }
        let CanonicalJsonValue::Object(mut obj) = CanonicalJsonValue::try_from(v).unwrap() else {
            unreachable!()
        };
        let rules = ruma::RoomVersionId::V11.rules().unwrap();
        ruma::signatures::hash_and_sign_event(self.name.as_str(), &self.key, &mut obj, &rules.redaction).unwrap();
        let id: OwnedEventId = format!("${}", ruma::signatures::reference_hash(&obj, &rules).unwrap())
            .try_into()
            .unwrap();
        self.events.lock().insert(id.clone(), obj.clone());
        (id, obj)
    }
}

#[async_trait]
impl Remote for RemoteServer {
    async fn public_keys(&self, servers: BTreeSet<OwnedServerName>) -> PublicKeyMap {
        let mut map = BTreeMap::new();
        if servers.contains(&self.name) {
            let mut keys = BTreeMap::new();
            keys.insert("ed25519:r1".to_owned(), Base64::new(self.key.public_key().to_vec()));
            map.insert(self.name.to_string(), keys);
        }
        map
    }

    async fn fetch_event(&self, _: &ServerName, _: &RoomId, id: &EventId) -> Result<CanonicalJsonObject> {
        self.events
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| weft_core::Error::not_found("no such event"))
    }

    async fn state_ids(
        &self,
        _: &ServerName,
        _: &RoomId,
        _: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        Ok(self.state_ids.lock().clone())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    rooms: Rooms,
    room: OwnedRoomId,
    remote: RemoteServer,
}

const ALICE: &str = "@alice:local.test";
const BOB: &str = "@bob:remote.test";

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("weft.db"), false).unwrap());
    let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "l1".into()).unwrap();
    let rooms = Rooms::new(store.clone(), "local.test".try_into().unwrap(), key, "11").unwrap();
    let alice = UserId::parse(ALICE).unwrap();
    let room = rooms
        .create_room(
            &alice,
            CreateRoom {
                version: None,
                preset: Preset::PublicChat,
                name: None,
                topic: None,
                invite: Vec::new(),
                invite_profiles: Default::default(),
                is_direct: false,
                alias: None,
                initial_state: Vec::new(),
                creation_content: None,
                power_level_content_override: None,
                creator_profile: Default::default(),
            },
        )
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        store,
        rooms,
        room,
        remote: RemoteServer::new("remote.test"),
    }
}

impl Fixture {
    async fn state_id(&self, t: &str, k: &str) -> OwnedEventId {
        self.rooms
            .state_event(&self.room, t, k)
            .await
            .unwrap()
            .unwrap()
            .event_id
            .clone()
    }

    async fn extremities(&self) -> Vec<(OwnedEventId, u64)> {
        self.store
            .extremities(self.room.as_str())
            .await
            .unwrap()
            .into_iter()
            .map(|(id, d)| (id.try_into().unwrap(), d as u64))
            .collect()
    }

    async fn input(&self, obj: CanonicalJsonObject) -> Result<Outcome> {
        self.rooms
            .input_pdu(&self.room, obj, &self.remote.name, Arrival::New, &self.remote)
            .await
    }

    async fn bob_joins(&self) -> OwnedEventId {
        let ext = self.extremities().await;
        let (create, pl, jr) = (
            self.state_id("m.room.create", "").await,
            self.state_id("m.room.power_levels", "").await,
            self.state_id("m.room.join_rules", "").await,
        );
        let (id, obj) = self.remote.pdu(
            &self.room,
            BOB,
            "m.room.member",
            Some(BOB),
            json!({"membership": "join"}),
            &[&ext[0].0],
            &[&create, &pl, &jr],
            ext[0].1 + 1,
        );
        assert!(matches!(self.input(obj).await.unwrap(), Outcome::Accepted(p) if p > 0));
        id
    }

    /// Bob's event with the usual auth events (create, power levels, his
    /// membership).
    async fn bob_event(
        &self,
        t: &str,
        k: Option<&str>,
        content: serde_json::Value,
        prevs: &[&EventId],
        depth: u64,
    ) -> (OwnedEventId, CanonicalJsonObject) {
        let (create, pl, me) = (
            self.state_id("m.room.create", "").await,
            self.state_id("m.room.power_levels", "").await,
            self.state_id("m.room.member", BOB).await,
        );
        self.remote
            .pdu(&self.room, BOB, t, k, content, prevs, &[&create, &pl, &me], depth)
    }

    async fn served(&self) -> Vec<OwnedEventId> {
        self.store
            .room_events(self.room.as_str(), i64::MAX, i64::MIN, Direction::Backward, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_id.try_into().unwrap())
            .collect()
    }
}

fn spec(t: &str, k: Option<&str>, content: serde_json::Value) -> EventSpec {
    let CanonicalJsonValue::Object(c) = CanonicalJsonValue::try_from(content).unwrap() else {
        unreachable!()
    };
    EventSpec::new(t, k.map(str::to_owned), c)
}

#[tokio::test]
async fn a_remote_join_and_message_are_accepted_and_become_state_and_timeline() {
    let f = fixture().await;
    let join = f.bob_joins().await;
    assert_eq!(
        f.rooms
            .membership(&f.room, BOB.try_into().unwrap())
            .await
            .unwrap()
            .as_deref(),
        Some("join")
    );
    let (msg, obj) = f
        .bob_event(
            "m.room.message",
            None,
            json!({"body": "hi", "msgtype": "m.text"}),
            &[&join],
            7,
        )
        .await;
    assert!(matches!(f.input(obj.clone()).await.unwrap(), Outcome::Accepted(_)));
    // Idempotent: the same PDU again is known.
    assert_eq!(f.input(obj).await.unwrap(), Outcome::Known);
    assert_eq!(f.extremities().await[0].0, msg);
    assert_eq!(f.served().await[..2], [msg.clone(), join]);
    // Alice's next event is built on it.
    let sent = f
        .rooms
        .send(
            &f.room,
            ALICE.try_into().unwrap(),
            spec("m.room.message", None, json!({"body": "hello bob"})),
        )
        .await
        .unwrap();
    let prevs = f.store.prev_events(sent.event_id.as_str()).await.unwrap();
    assert_eq!(prevs, [msg.to_string()]);
    // The member list in the store follows.
    let members = f.store.user_memberships(BOB).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].membership, "join");
}

#[tokio::test]
async fn unauthorized_remote_events_are_stored_rejected_and_never_served() {
    let f = fixture().await;
    let join = f.bob_joins().await;
    let pl = f.state_id("m.room.power_levels", "").await;
    // Bob (power 0) makes himself admin.
    let (bad, obj) = f
        .bob_event(
            "m.room.power_levels",
            Some(""),
            json!({"users": {BOB: 100, ALICE: 100}}),
            &[&join],
            7,
        )
        .await;
    let Outcome::Rejected(why) = f.input(obj).await.unwrap() else {
        panic!("accepted")
    };
    assert!(!why.is_empty());
    assert!(
        f.store
            .event_place(bad.as_str())
            .await
            .unwrap()
            .unwrap()
            .rejected
            .is_some()
    );
    assert!(!f.served().await.contains(&bad));
    assert_eq!(
        f.state_id("m.room.power_levels", "").await,
        pl,
        "a rejected event became state"
    );
    assert_eq!(f.extremities().await[0].0, join);
    // An event citing the rejected one as an auth event is rejected too.
    let create = f.state_id("m.room.create", "").await;
    let me = f.state_id("m.room.member", BOB).await;
    let (_, obj) = f.remote.pdu(
        &f.room,
        BOB,
        "m.room.message",
        None,
        json!({"body": "x"}),
        &[&join],
        &[&create, &bad, &me],
        8,
    );
    assert!(matches!(f.input(obj).await.unwrap(), Outcome::Rejected(_)));
}

#[tokio::test]
async fn bad_signatures_are_refused_and_a_bad_content_hash_is_stored_redacted() {
    let f = fixture().await;
    let join = f.bob_joins().await;
    let (_, mut obj) = f
        .bob_event("m.room.message", None, json!({"body": "signed"}), &[&join], 7)
        .await;
    // Content changed after signing: the signature (over the redacted
    // form) holds, the hash does not: kept, redacted.
    let mut tampered = obj.clone();
    tampered.insert(
        "content".into(),
        CanonicalJsonValue::try_from(json!({"body": "forged"})).unwrap(),
    );
    assert!(matches!(f.input(tampered.clone()).await.unwrap(), Outcome::Accepted(_)));
    let hash = ruma::signatures::reference_hash(&tampered, &ruma::RoomVersionId::V11.rules().unwrap()).unwrap();
    let stored = f.store.get_event(&format!("${hash}")).await.unwrap().unwrap();
    assert!(!stored.pdu_json.contains("forged"), "{}", stored.pdu_json);
    // The envelope changed: the signature fails, nothing stored.
    obj.insert("depth".into(), CanonicalJsonValue::Integer(99u32.into()));
    let err = f.input(obj.clone()).await.unwrap_err();
    assert_eq!(err.kind, weft_core::ErrorKind::Forbidden, "{err:?}");
    let hash = ruma::signatures::reference_hash(&obj, &ruma::RoomVersionId::V11.rules().unwrap()).unwrap();
    assert!(f.store.get_event(&format!("${hash}")).await.unwrap().is_none());
    // An event for another room is refused.
    let other: OwnedRoomId = "!other:local.test".try_into().unwrap();
    let (_, obj) = f
        .remote
        .pdu(&other, BOB, "m.room.message", None, json!({}), &[&join], &[&join], 9);
    assert!(f.input(obj).await.is_err());
}

#[tokio::test]
async fn an_event_authorized_before_a_concurrent_ban_is_soft_failed() {
    let f = fixture().await;
    let join = f.bob_joins().await;
    // Alice bans bob; bob, not having seen it, sends on his join.
    f.rooms
        .send(
            &f.room,
            ALICE.try_into().unwrap(),
            spec("m.room.member", Some(BOB), json!({"membership": "ban"})),
        )
        .await
        .unwrap();
    let (create, pl) = (
        f.state_id("m.room.create", "").await,
        f.state_id("m.room.power_levels", "").await,
    );
    let (late, obj) = f.remote.pdu(
        &f.room,
        BOB,
        "m.room.message",
        None,
        json!({"body": "too late"}),
        &[&join],
        &[&create, &pl, &join],
        7,
    );
    let Outcome::SoftFailed(_) = f.input(obj).await.unwrap() else {
        panic!("not soft-failed")
    };
    assert!(f.store.event_place(late.as_str()).await.unwrap().unwrap().soft_failed);
    assert!(!f.served().await.contains(&late));
    assert_ne!(f.extremities().await[0].0, late);
    assert_eq!(
        f.rooms
            .membership(&f.room, BOB.try_into().unwrap())
            .await
            .unwrap()
            .as_deref(),
        Some("ban")
    );
}

#[tokio::test]
async fn concurrent_state_is_resolved_and_the_next_local_event_merges_the_branches() {
    let f = fixture().await;
    let join = f.bob_joins().await;
    // Alice lets bob set the topic.
    let mut users = serde_json::Map::new();
    users.insert(ALICE.into(), json!(100));
    users.insert(BOB.into(), json!(50));
    f.rooms
        .send(
            &f.room,
            ALICE.try_into().unwrap(),
            spec("m.room.power_levels", Some(""), json!({"users": users})),
        )
        .await
        .unwrap();
    let after_pl = f.extremities().await[0].clone();
    // Both set the topic at once: alice here, bob on the same parent.
    f.rooms
        .send(
            &f.room,
            ALICE.try_into().unwrap(),
            spec("m.room.topic", Some(""), json!({"topic": "alice's"})),
        )
        .await
        .unwrap();
    let (bob_topic, obj) = f
        .bob_event(
            "m.room.topic",
            Some(""),
            json!({"topic": "bob's"}),
            &[&after_pl.0],
            after_pl.1 + 1,
        )
        .await;
    assert!(matches!(f.input(obj).await.unwrap(), Outcome::Accepted(_)));
    // Two forward extremities now.
    assert_eq!(f.extremities().await.len(), 2);
    let topic = f.state_id("m.room.topic", "").await;
    let stored: Vec<String> = f
        .store
        .current_state(f.room.as_str())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "m.room.topic")
        .map(|e| e.event_id)
        .collect();
    assert_eq!(stored, [topic.to_string()], "the store and the pipeline disagree");
    // The resolution is stable: the same answer after a reload.
    drop(f.rooms);
    let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "l1".into()).unwrap();
    let rooms = Rooms::new(f.store.clone(), "local.test".try_into().unwrap(), key, "11").unwrap();
    let reloaded = rooms.state_event(&f.room, "m.room.topic", "").await.unwrap().unwrap();
    assert_eq!(reloaded.event_id, topic);
    // Alice's next event follows both branches.
    let sent = rooms
        .send(
            &f.room,
            ALICE.try_into().unwrap(),
            spec("m.room.message", None, json!({"body": "merged"})),
        )
        .await
        .unwrap();
    let mut prevs = f.store.prev_events(sent.event_id.as_str()).await.unwrap();
    prevs.sort();
    assert_eq!(prevs.len(), 2);
    assert!(prevs.contains(&bob_topic.to_string()));
    let ext = f.store.extremities(f.room.as_str()).await.unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].0, sent.event_id.to_string());
    // The state before the merge event is the resolved one.
    let place = f.store.event_place(sent.event_id.as_str()).await.unwrap().unwrap();
    let before = f.store.state_group(place.state_before.unwrap()).await.unwrap();
    assert_eq!(
        before.get(&("m.room.topic".into(), String::new())),
        Some(&topic.to_string())
    );
    let _ = join;
}

#[tokio::test]
async fn missing_auth_events_are_fetched_as_outliers_and_a_gap_takes_the_origins_state() {
    let f = fixture().await;
    let join = f.bob_joins().await;
    // Bob changes his display name in an event we never got, then talks
    // on top of it: its auth events cite the unseen member event.
    let (create, pl) = (
        f.state_id("m.room.create", "").await,
        f.state_id("m.room.power_levels", "").await,
    );
    let jr = f.state_id("m.room.join_rules", "").await;
    let depth = f.extremities().await[0].1;
    let (rename, _) = f.remote.pdu(
        &f.room,
        BOB,
        "m.room.member",
        Some(BOB),
        json!({"membership": "join", "displayname": "Bob B."}),
        &[&join],
        &[&create, &pl, &jr, &join],
        depth + 1,
    );
    let (talk, obj) = f.remote.pdu(
        &f.room,
        BOB,
        "m.room.message",
        None,
        json!({"body": "after the gap"}),
        &[&rename],
        &[&create, &pl, &rename],
        depth + 2,
    );
    // The origin's state before `talk`: ours with the rename.
    let mut state: Vec<OwnedEventId> = f
        .store
        .current_state(f.room.as_str())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_id != join.as_str())
        .map(|e| e.event_id.try_into().unwrap())
        .collect();
    state.push(rename.clone());
    *f.remote.state_ids.lock() = (state, vec![create.clone(), pl.clone(), jr.clone(), join.clone()]);
    assert!(matches!(f.input(obj).await.unwrap(), Outcome::Accepted(p) if p > 0));
    let place = f.store.event_place(rename.as_str()).await.unwrap().unwrap();
    assert!(place.outlier, "the missing auth event was not stored as an outlier");
    assert!(!f.served().await.contains(&rename));
    assert!(f.served().await.contains(&talk));
    // The room's state took the rename.
    assert_eq!(f.state_id("m.room.member", BOB).await, rename);
    let ext: Vec<OwnedEventId> = f.extremities().await.into_iter().map(|e| e.0).collect();
    assert!(ext.contains(&talk));
}
