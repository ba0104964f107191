//! Two servers' room pipelines joined through their federation-facing
//! calls (templates, signed joins, state and auth chains, backfill, missing
//! events), in one process: each server has its own store and key, and
//! learns about the other only through what the other answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
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

struct Server {
    _dir: tempfile::TempDir,
    name: OwnedServerName,
    public: [u8; 32],
    store: Arc<dyn Store>,
    rooms: Rooms,
}

impl Server {
    fn new(name: &str, version: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("weft.db"), false).unwrap());
        let der = Ed25519KeyPair::generate();
        let public = Ed25519KeyPair::from_der(&der, "k1".into()).unwrap().public_key();
        let key = Ed25519KeyPair::from_der(&der, "k1".into()).unwrap();
        let rooms = Rooms::new(store.clone(), name.try_into().unwrap(), key, version).unwrap();
        Self {
            _dir: dir,
            name: name.try_into().unwrap(),
            public,
            store,
            rooms,
        }
    }

    async fn pdu(&self, id: &str) -> CanonicalJsonObject {
        let ev = self.store.get_event(id).await.unwrap().unwrap();
        serde_json::from_str(&ev.pdu_json).unwrap()
    }

    async fn pdus(&self, ids: &[OwnedEventId]) -> Vec<CanonicalJsonObject> {
        let mut out = Vec::new();
        for id in ids {
            out.push(self.pdu(id.as_str()).await);
        }
        out
    }

    async fn send(&self, room: &RoomId, user: &str, body: &str) -> OwnedEventId {
        let CanonicalJsonValue::Object(c) =
            CanonicalJsonValue::try_from(json!({"body": body, "msgtype": "m.text"})).unwrap()
        else {
            unreachable!()
        };
        self.rooms
            .send(
                room,
                UserId::parse(user).unwrap().as_ref(),
                EventSpec::new("m.room.message", None, c),
            )
            .await
            .unwrap()
            .event_id
    }

    async fn bodies(&self, room: &RoomId) -> Vec<String> {
        let mut events = self
            .store
            .room_events(room.as_str(), i64::MIN, i64::MAX, Direction::Forward, 1000)
            .await
            .unwrap();
        events.retain(|e| e.event_type == "m.room.message");
        events
            .into_iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.pdu_json).unwrap();
                v["content"]["body"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }

    async fn state(&self, room: &RoomId) -> BTreeSet<String> {
        self.store
            .current_state(room.as_str())
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect()
    }
}

/// A server as its peer sees it: its keys and its answers.
struct Peer<'a>(&'a Server);

#[async_trait]
impl Remote for Peer<'_> {
    async fn public_keys(&self, servers: BTreeSet<OwnedServerName>) -> PublicKeyMap {
        let mut map = BTreeMap::new();
        if servers.contains(&self.0.name) {
            let mut keys = BTreeMap::new();
            keys.insert("ed25519:k1".to_owned(), Base64::new(self.0.public.to_vec()));
            map.insert(self.0.name.to_string(), keys);
        }
        map
    }

    async fn fetch_event(&self, _: &ServerName, _: &RoomId, id: &EventId) -> Result<CanonicalJsonObject> {
        match self.0.store.get_event(id.as_str()).await? {
            Some(ev) => Ok(serde_json::from_str(&ev.pdu_json).unwrap()),
            None => Err(weft_core::Error::not_found("no such event")),
        }
    }

    async fn state_ids(
        &self,
        _: &ServerName,
        room: &RoomId,
        id: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        self.0.rooms.state_ids_at(room, id).await
    }
}

const ALICE: &str = "@alice:one.test";
const BOB: &str = "@bob:two.test";

/// Alice on `one` makes a public room and talks; bob on `two` joins it.
async fn joined(version: &str, before: usize) -> (Server, Server, OwnedRoomId) {
    let one = Server::new("one.test", version);
    let two = Server::new("two.test", version);
    let room = one
        .rooms
        .create_room(
            UserId::parse(ALICE).unwrap().as_ref(),
            CreateRoom {
                version: None,
                preset: Preset::PublicChat,
                name: Some("shared".into()),
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
    for n in 0..before {
        one.send(&room, ALICE, &format!("before {n}")).await;
    }
    // make_join on one, signed on two, send_join on one, completed on two.
    let bob = UserId::parse(BOB).unwrap();
    let (version_id, template) = one.rooms.membership_template(&room, &bob, "join").await.unwrap();
    let (join_id, join) = two.rooms.sign_template(&version_id, template).unwrap();
    let outcome = one
        .rooms
        .input_pdu(&room, join.clone(), &two.name, Arrival::New, &Peer(&two))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let (state_ids, mut chain_ids) = one.rooms.state_ids_at(&room, &join_id).await.unwrap();
    chain_ids.extend(one.rooms.auth_chain_ids(std::slice::from_ref(&join_id)).await.unwrap());
    chain_ids.sort();
    chain_ids.dedup();
    let sent = two
        .rooms
        .complete_remote_join(
            &room,
            &version_id,
            join,
            one.pdus(&state_ids).await,
            one.pdus(&chain_ids).await,
            &one.name,
            &Peer(&one),
        )
        .await
        .unwrap();
    assert_eq!(sent.event_id, join_id);
    assert!(sent.position > 0);
    (one, two, room)
}

async fn deliver(from: &Server, to: &Server, room: &RoomId, id: &OwnedEventId) -> Outcome {
    to.rooms
        .input_pdu(room, from.pdu(id.as_str()).await, &from.name, Arrival::New, &Peer(from))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_remote_join_gives_both_servers_the_same_state_and_messages_flow_both_ways() {
    for version in ["11", "12"] {
        let (one, two, room) = joined(version, 3).await;
        assert_eq!(one.state(&room).await, two.state(&room).await, "room v{version}");
        let bob = UserId::parse(BOB).unwrap();
        assert_eq!(
            two.rooms.membership(&room, &bob).await.unwrap().as_deref(),
            Some("join")
        );
        let alice = UserId::parse(ALICE).unwrap();
        assert_eq!(
            two.rooms.membership(&room, &alice).await.unwrap().as_deref(),
            Some("join")
        );
        // Two knows the room's members as its own /sync would list them.
        assert_eq!(two.store.user_memberships(ALICE).await.unwrap().len(), 1);
        // Two sees only the join on its timeline: history comes by backfill.
        assert!(two.bodies(&room).await.is_empty());
        for n in 0..5 {
            let id = two.send(&room, BOB, &format!("from two {n}")).await;
            assert!(matches!(deliver(&two, &one, &room, &id).await, Outcome::Accepted(_)));
            let id = one.send(&room, ALICE, &format!("from one {n}")).await;
            assert!(matches!(deliver(&one, &two, &room, &id).await, Outcome::Accepted(_)));
        }
        let expect: Vec<String> = (0..5)
            .flat_map(|n| [format!("from two {n}"), format!("from one {n}")])
            .collect();
        assert_eq!(two.bodies(&room).await, expect);
        assert_eq!(one.bodies(&room).await[3..], expect[..]);
        assert_eq!(one.state(&room).await, two.state(&room).await);
        assert_eq!(
            one.store.extremities(room.as_str()).await.unwrap(),
            two.store.extremities(room.as_str()).await.unwrap()
        );
        // Each server sees the other in the room.
        assert!(one.rooms.server_in_room(&room, &two.name).await.unwrap());
        assert_eq!(two.rooms.servers_in_room(&room).await.unwrap().len(), 2);
    }
}

#[tokio::test]
async fn history_before_the_join_comes_by_backfill_in_order() {
    let (one, two, room) = joined("11", 30).await;
    // Two pages back from its join, ten at a time, as a client scrolls.
    let join = two.store.extremities(room.as_str()).await.unwrap()[0].0.clone();
    let mut from: Vec<OwnedEventId> = two
        .store
        .prev_events(&join)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.try_into().unwrap())
        .collect();
    let mut pages = 0;
    while !from.is_empty() && pages < 10 {
        pages += 1;
        let events = one.rooms.backfill(&room, &from, 10).await.unwrap();
        assert!(events.len() <= 10);
        let mut next = Vec::new();
        for ev in &events {
            let obj: CanonicalJsonObject = serde_json::from_str(&ev.pdu_json).unwrap();
            match two
                .rooms
                .input_pdu(&room, obj, &one.name, Arrival::Backfill, &Peer(&one))
                .await
                .unwrap()
            {
                Outcome::Accepted(p) => assert!(p < 0, "a backfilled event went on the stream"),
                Outcome::Known => {}
                other => panic!("{other:?}"),
            }
        }
        // Continue from the oldest events' parents not yet held.
        for ev in &events {
            for prev in one.store.prev_events(&ev.event_id).await.unwrap() {
                let known = two.store.event_place(&prev).await.unwrap();
                if known.map(|p| p.outlier).unwrap_or(true) {
                    next.push(prev.try_into().unwrap());
                }
            }
        }
        next.sort();
        next.dedup();
        from = next;
    }
    let bodies = two.bodies(&room).await;
    let expect: Vec<String> = (0..30).map(|n| format!("before {n}")).collect();
    assert_eq!(bodies, expect);
    // Nothing backfilled was announced on two's stream.
    assert_eq!(two.store.events_after(0, i64::MAX, 1000).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_gap_is_filled_with_missing_events_oldest_first() {
    let (one, two, room) = joined("11", 0).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(one.send(&room, ALICE, &format!("burst {n}")).await);
    }
    let ext: Vec<OwnedEventId> = two
        .store
        .extremities(room.as_str())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.0.try_into().unwrap())
        .collect();
    // Two hears only of the last one; it asks for what lies between.
    let missing = one
        .rooms
        .missing_events(&room, &ext, &[ids[5].clone()], 10, 0)
        .await
        .unwrap();
    let got: Vec<String> = missing.iter().map(|e| e.event_id.clone()).collect();
    let want: Vec<String> = ids[..5].iter().map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    for ev in missing {
        let obj: CanonicalJsonObject = serde_json::from_str(&ev.pdu_json).unwrap();
        assert!(matches!(
            two.rooms
                .input_pdu(&room, obj, &one.name, Arrival::New, &Peer(&one))
                .await
                .unwrap(),
            Outcome::Accepted(_)
        ));
    }
    assert!(matches!(
        deliver(&one, &two, &room, &ids[5]).await,
        Outcome::Accepted(_)
    ));
    let expect: Vec<String> = (0..6).map(|n| format!("burst {n}")).collect();
    assert_eq!(two.bodies(&room).await, expect);
    assert_eq!(two.store.extremities(room.as_str()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_join_template_is_refused_for_an_invite_only_room_and_a_server_sees_per_visibility() {
    let (one, two, room) = joined("11", 1).await;
    // Alice closes the room: a third user may not join.
    let CanonicalJsonValue::Object(c) = CanonicalJsonValue::try_from(json!({"join_rule": "invite"})).unwrap() else {
        unreachable!()
    };
    one.rooms
        .send(
            &room,
            UserId::parse(ALICE).unwrap().as_ref(),
            EventSpec::new("m.room.join_rules", Some(String::new()), c),
        )
        .await
        .unwrap();
    let carol = UserId::parse("@carol:three.test").unwrap();
    let err = one.rooms.membership_template(&room, &carol, "join").await.unwrap_err();
    assert_eq!(err.kind, weft_core::ErrorKind::Forbidden);
    // Shared history: a server in the room sees events from before it joined.
    let first = one
        .store
        .room_events(room.as_str(), 0, i64::MAX, Direction::Forward, 1)
        .await
        .unwrap();
    let first: OwnedEventId = first[0].event_id.clone().try_into().unwrap();
    assert!(one.rooms.server_can_see(&room, &first, &two.name).await.unwrap());
    let three: OwnedServerName = "three.test".try_into().unwrap();
    assert!(!one.rooms.server_in_room(&room, &three).await.unwrap());
}

async fn put_state(server: &Server, room: &RoomId, user: &str, t: &str, content: serde_json::Value) -> OwnedEventId {
    let CanonicalJsonValue::Object(c) = CanonicalJsonValue::try_from(content).unwrap() else {
        unreachable!()
    };
    server
        .rooms
        .send(
            room,
            UserId::parse(user).unwrap().as_ref(),
            EventSpec::new(t, Some(String::new()), c),
        )
        .await
        .unwrap()
        .event_id
}

#[tokio::test]
async fn branches_made_apart_resolve_to_the_same_state_on_both() {
    let (one, two, room) = joined("11", 0).await;
    // Bob gets power first (seen by both).
    let pl0 = put_state(
        &one,
        &room,
        ALICE,
        "m.room.power_levels",
        json!({"users": {ALICE: 100, BOB: 100}}),
    )
    .await;
    assert!(matches!(deliver(&one, &two, &room, &pl0).await, Outcome::Accepted(_)));
    // Apart: each changes the topic and the power levels.
    let t1 = put_state(&one, &room, ALICE, "m.room.topic", json!({"topic": "one"})).await;
    let p1 = put_state(
        &one,
        &room,
        ALICE,
        "m.room.power_levels",
        json!({"users": {ALICE: 100, BOB: 100, "@c:x": 10}}),
    )
    .await;
    let t2 = put_state(&two, &room, BOB, "m.room.topic", json!({"topic": "two"})).await;
    let p2 = put_state(
        &two,
        &room,
        BOB,
        "m.room.power_levels",
        json!({"users": {ALICE: 100, BOB: 100, "@d:x": 20}}),
    )
    .await;
    for id in [&t1, &p1] {
        let o = deliver(&one, &two, &room, id).await;
        assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    }
    for id in [&t2, &p2] {
        let o = deliver(&two, &one, &room, id).await;
        assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    }
    assert_eq!(one.state(&room).await, two.state(&room).await);
}
