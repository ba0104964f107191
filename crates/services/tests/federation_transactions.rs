//! The federation queue and incoming transactions at the services level,
//! with two servers' real services and stores in one process: bob of
//! `two.test` joins alice's room on `one.test` through the room pipelines'
//! federation calls (as crates/rooms/tests/two_servers.rs does), then
//! - `one`'s queue reader puts alice's message, typing and receipt in the
//!   outgoing queue for `two` (and not bob's message, which `two` made);
//! - `two` takes in a transaction of `one` holding that message and EDUs:
//!   the PDU is stored, and only the EDUs about joined users of `one` are.
//!
//! Between two real binaries this needs the join endpoints; until then
//! this is the shared-room coverage (the binaries' tests cover the
//! transport, limits, idempotency and the queue's durability).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ruma::signatures::PublicKeyMap;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, ServerName,
    UserId,
};
use serde_json::{Value, json};
use weft_core::Result;
use weft_rooms::{Arrival, CreateRoom, EventSpec, Outcome, Preset, Remote};
use weft_services::Services;
use weft_store::{OutboxKind, ReceiptRecord, ServerKeyRecord, ServerKeyResponse};

struct Server {
    _dir: tempfile::TempDir,
    s: Arc<Services>,
}

fn server(name: &str) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = weft_core::Config {
        server_name: name.into(),
        ..Default::default()
    };
    config.rate_limit.enabled = false;
    config.database.synchronous = "normal".into();
    // Sending to these made-up names fails: try again only much later.
    config.federation.retry_initial_ms = 600_000;
    let key = weft_rooms::keys::load_or_create(dir.path()).expect("signing key");
    let store = weft_store::open(&config, dir.path()).expect("store");
    let blobs = weft_services::media::open_blobs(&config, dir.path()).expect("media");
    let s = Services::new(config, store, key, blobs).expect("services");
    Server { _dir: dir, s }
}

/// A server as its peer sees it: its own key, its stored events.
struct Peer<'a>(&'a Services);

#[async_trait]
impl Remote for Peer<'_> {
    async fn public_keys(&self, servers: BTreeSet<OwnedServerName>) -> PublicKeyMap {
        let mut map = BTreeMap::new();
        if servers.contains(&self.0.server_name) {
            let keys = &self.0.federation.keys;
            map.insert(
                self.0.server_name.to_string(),
                BTreeMap::from([(keys.own_key_id(), keys.own_public_key())]),
            );
        }
        map
    }

    async fn fetch_event(&self, _: &ServerName, _: &RoomId, id: &EventId) -> Result<CanonicalJsonObject> {
        pdu(self.0, id.as_str()).await
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

async fn pdu(s: &Services, id: &str) -> Result<CanonicalJsonObject> {
    let ev = s
        .rooms
        .store()
        .get_event(id)
        .await?
        .ok_or_else(|| weft_core::Error::not_found("no event"))?;
    serde_json::from_str(&ev.pdu_json).map_err(weft_core::Error::internal)
}

async fn pdus(s: &Services, ids: &[OwnedEventId]) -> Vec<CanonicalJsonObject> {
    let mut out = Vec::new();
    for id in ids {
        out.push(pdu(s, id.as_str()).await.expect("event"));
    }
    out
}

const ALICE: &str = "@alice:one.test";
const BOB: &str = "@bob:two.test";

/// Alice's public room on `one`, joined by bob of `two`.
async fn shared_room(one: &Services, two: &Services) -> OwnedRoomId {
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
        .expect("room");
    let bob = UserId::parse(BOB).unwrap();
    let (version, template) = one
        .rooms
        .membership_template(&room, &bob, "join")
        .await
        .expect("template");
    let (join_id, join) = two.rooms.sign_template(&version, template).expect("signed");
    let outcome = one
        .rooms
        .input_pdu(&room, join.clone(), &two.server_name, Arrival::New, &Peer(two))
        .await
        .expect("join taken");
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let (state_ids, mut chain) = one.rooms.state_ids_at(&room, &join_id).await.expect("state");
    chain.extend(
        one.rooms
            .auth_chain_ids(std::slice::from_ref(&join_id))
            .await
            .expect("chain"),
    );
    chain.sort();
    chain.dedup();
    two.rooms
        .complete_remote_join(
            &room,
            &version,
            join,
            pdus(one, &state_ids).await,
            pdus(one, &chain).await,
            &one.server_name,
            &Peer(one),
        )
        .await
        .expect("join completed");
    room
}

fn message(body: &str) -> EventSpec {
    let CanonicalJsonValue::Object(c) =
        CanonicalJsonValue::try_from(json!({ "msgtype": "m.text", "body": body })).unwrap()
    else {
        unreachable!()
    };
    EventSpec::new("m.room.message", None, c)
}

#[tokio::test]
async fn local_events_typing_and_receipts_are_queued_for_the_other_server_in_the_room() {
    let (one, two) = (server("one.test"), server("two.test"));
    let (one, two) = (&one.s, &two.s);
    let room = shared_room(one, two).await;
    one.start_federation_queue().await.unwrap();
    // Let the reader take its starting position before anything new.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Bob's message, made by two and taken in by one: two's to send, not
    // one's.
    let bob = UserId::parse(BOB).unwrap();
    let from_two = two
        .rooms
        .send(&room, &bob, message("from two"))
        .await
        .expect("sent on two");
    let outcome = one
        .rooms
        .input_pdu(
            &room,
            pdu(two, from_two.event_id.as_str()).await.expect("pdu"),
            &two.server_name,
            Arrival::New,
            &Peer(two),
        )
        .await
        .expect("taken in by one");
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");

    let alice = UserId::parse(ALICE).unwrap();
    let sent = one.rooms.send(&room, &alice, message("hello two")).await.expect("sent");
    let store = one.rooms.store();
    store
        .set_typing(room.as_str(), ALICE, Some(weft_core::now_ms() + 20_000))
        .await
        .unwrap()
        .unwrap();
    store
        .put_receipt(ReceiptRecord {
            room_id: room.to_string(),
            receipt_type: "m.read".into(),
            user_id: ALICE.into(),
            thread_id: String::new(),
            event_id: sent.event_id.to_string(),
            ts: 1234,
            position: 0,
        })
        .await
        .unwrap()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = store.outbox("two.test", 50, 100).await.expect("outbox");
        if rows.len() >= 3 {
            break rows;
        }
        assert!(Instant::now() < deadline, "queued so far: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), 3, "{rows:?}");
    let pdu_rows: Vec<Value> = rows
        .iter()
        .filter(|r| r.kind == OutboxKind::Pdu)
        .map(|r| serde_json::from_str(&r.json).unwrap())
        .collect();
    assert_eq!(
        pdu_rows.len(),
        1,
        "only alice's message, not bob's (two made it): {rows:?}"
    );
    assert_eq!(pdu_rows[0]["content"]["body"], "hello two");
    let edus: Vec<Value> = rows
        .iter()
        .filter(|r| r.kind == OutboxKind::Edu)
        .map(|r| serde_json::from_str(&r.json).unwrap())
        .collect();
    assert_eq!(edus[0]["edu_type"], "m.typing", "{edus:?}");
    assert_eq!(
        edus[0]["content"],
        json!({ "room_id": room, "user_id": ALICE, "typing": true })
    );
    assert_eq!(edus[1]["edu_type"], "m.receipt", "{edus:?}");
    assert_eq!(
        edus[1]["content"][room.as_str()]["m.read"][ALICE]["event_ids"],
        json!([sent.event_id])
    );
    // Nothing for a server not in the room, nor for ourselves.
    assert!(store.outbox("one.test", 50, 100).await.unwrap().is_empty());
    assert!(
        one.federation_destinations()
            .await
            .unwrap()
            .iter()
            .all(|d| d.name == "two.test")
    );
    // Alice's presence goes to the servers sharing a room with her.
    store
        .edit_presence(
            ALICE,
            Box::new(|_| {
                Some((
                    weft_store::PresenceRecord {
                        user_id: ALICE.into(),
                        presence: "unavailable".into(),
                        status_msg: Some("away".into()),
                        last_active_ms: weft_core::now_ms(),
                        online_until_ms: 0,
                        position: 0,
                    },
                    true,
                ))
            }),
        )
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let presence = loop {
        let rows = store.outbox("two.test", 50, 100).await.expect("outbox");
        if let Some(row) = rows.iter().find(|r| r.json.contains("m.presence")) {
            break serde_json::from_str::<Value>(&row.json).unwrap();
        }
        assert!(Instant::now() < deadline, "no m.presence queued: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let push = &presence["content"]["push"][0];
    assert_eq!(
        (&push["user_id"], &push["presence"], &push["status_msg"]),
        (&json!(ALICE), &json!("unavailable"), &json!("away")),
        "{presence}"
    );
    // Alice stops typing: `typing: false` follows.
    store.set_typing(room.as_str(), ALICE, None).await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = store.outbox("two.test", 50, 100).await.expect("outbox");
        if let Some(last) = rows.iter().rev().find(|r| r.json.contains("m.typing")) {
            let v: Value = serde_json::from_str(&last.json).unwrap();
            if v["content"]["typing"] == false {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no typing: false queued: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_transaction_of_a_server_in_the_room_is_taken_in_with_its_edus() {
    let (one, two) = (server("one.test"), server("two.test"));
    let (one, two) = (&one.s, &two.s);
    let room = shared_room(one, two).await;
    // Two knows one's key (as its key ring would after fetching it).
    let now = weft_core::now_ms();
    let keys = &one.federation.keys;
    two.rooms
        .store()
        .put_server_keys(
            ServerKeyResponse {
                server_name: "one.test".into(),
                json: "{}".into(),
                valid_until_ts: now + 86_400_000,
                fetched_ts: now,
            },
            vec![ServerKeyRecord {
                server_name: "one.test".into(),
                key_id: keys.own_key_id(),
                public_key: keys.own_public_key().encode(),
                valid_until_ts: now + 86_400_000,
                expired_ts: None,
                fetched_ts: now,
            }],
        )
        .await
        .expect("keys stored");

    let alice = UserId::parse(ALICE).unwrap();
    let sent = one
        .rooms
        .send(&room, &alice, message("over federation"))
        .await
        .expect("sent");
    let raw = serde_json::value::RawValue::from_string(
        one.rooms
            .store()
            .get_event(sent.event_id.as_str())
            .await
            .unwrap()
            .unwrap()
            .pdu_json,
    )
    .unwrap();
    let edu = |t: &str, c: Value| {
        serde_json::value::RawValue::from_string(json!({ "edu_type": t, "content": c }).to_string()).unwrap()
    };
    let edus = vec![
        edu("m.typing", json!({ "room_id": room, "user_id": ALICE, "typing": true })),
        // Not a user of the sending server, and one not in the room: ignored.
        edu("m.typing", json!({ "room_id": room, "user_id": BOB, "typing": true })),
        edu(
            "m.typing",
            json!({ "room_id": room, "user_id": "@carol:one.test", "typing": true }),
        ),
        edu(
            "m.receipt",
            json!({ room.as_str(): { "m.read": { ALICE: { "event_ids": [sent.event_id], "data": { "ts": 42 } } } } }),
        ),
        edu(
            "m.presence",
            json!({ "push": [{ "user_id": ALICE, "presence": "online", "last_active_ago": 1000, "status_msg": "hi" }] }),
        ),
        edu("org.example.unknown", json!({})),
    ];
    let one_name: &ServerName = &one.server_name;
    let results = two
        .receive_transaction(one_name, "t1", vec![raw], edus)
        .await
        .expect("transaction taken");
    assert_eq!(results.len(), 1);
    assert_eq!(results.get(&sent.event_id), Some(&Ok(())), "{results:?}");

    let store = two.rooms.store();
    let stored = store
        .get_event(sent.event_id.as_str())
        .await
        .unwrap()
        .expect("the message is stored on two");
    assert!(stored.position > 0, "on the timeline");
    let (typing, _) = store.typing(room.as_str(), weft_core::now_ms()).await.unwrap();
    assert_eq!(typing, vec![ALICE.to_owned()], "only alice types");
    let receipts = store.receipts_since(room.as_str(), 0, i64::MAX).await.unwrap();
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert_eq!(
        (
            receipts[0].user_id.as_str(),
            receipts[0].event_id.as_str(),
            receipts[0].ts
        ),
        (ALICE, sent.event_id.as_str(), 42)
    );
    let presence = store.presence(ALICE).await.unwrap().expect("alice's presence");
    assert_eq!(
        (presence.presence.as_str(), presence.status_msg.as_deref()),
        ("online", Some("hi"))
    );

    // The same transaction again: the stored answer; a PDU of a room two
    // does not know fails alone.
    let again = two.receive_transaction(one_name, "t1", vec![], vec![]).await.unwrap();
    assert_eq!(again, results);
}
