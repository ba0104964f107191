//! Read receipts and read markers: stored, and sent to the room's members
//! in `/sync` (`rooms.join.{room}.ephemeral`) as one `m.receipt` event.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

/// The `m.receipt` events of `room` in a sync response.
fn receipts(sync: &Value, room: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == "m.receipt").cloned().collect())
        .unwrap_or_default()
}

/// Syncs from `since` until the room's ephemeral holds an `m.receipt` (or
/// `tries` responses came back without one).
async fn sync_for_receipt(c: &Client, since: &str, room: &str, tries: usize) -> (Value, Vec<Value>) {
    let mut since = since.to_owned();
    for _ in 0..tries {
        let s = c.sync(Some(&since), 3000).await;
        let r = receipts(&s, room);
        if !r.is_empty() {
            return (s, r);
        }
        since = next_batch(&s);
    }
    panic!("no m.receipt in {tries} syncs");
}

// Bob's long-poll wakes within a second of alice's receipt (no new event
// in the room) and carries it in the room's ephemeral, in the spec's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_receipt_reaches_other_members_by_long_poll() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let event = bob.send_text(&room, "t1", "hello").await;
    let b0 = bob.sync(None, 0).await;
    assert!(receipts(&b0, &room).is_empty(), "no receipt yet: {b0}");

    let since = next_batch(&b0);
    let poll = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let s = bob.sync(Some(&since), 20_000).await;
            (s, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    let (st, body) = alice
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (b1, woke) = poll.await.expect("poll task");
    assert!(
        woke.duration_since(sent) < Duration::from_secs(1),
        "long-poll took {:?}",
        woke.duration_since(sent)
    );
    let r = receipts(&b1, &room);
    assert_eq!(r.len(), 1, "one m.receipt: {b1}");
    let by_user = &r[0]["content"][&event]["m.read"];
    assert_eq!(by_user.as_object().map(|o| o.len()), Some(1), "{b1}");
    assert!(by_user[&alice.user_id]["ts"].as_u64().is_some_and(|t| t > 0), "{b1}");
    assert!(by_user[&alice.user_id].get("thread_id").is_none(), "unthreaded: {b1}");
    assert!(timeline(&b1, &room).is_empty(), "no new event, only the receipt: {b1}");

    // The next incremental sync does not repeat it.
    let b2 = bob.sync(Some(&next_batch(&b1)), 0).await;
    assert!(receipts(&b2, &room).is_empty(), "{b2}");
}

// A private receipt goes to the user's other devices, never to others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_receipt_only_for_its_owner() {
    let server = TestServer::start().await;
    let alice = server.register_with_password("alice", "pw-alice-1").await;
    let alice2 = server.login("alice", "pw-alice-1").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let event = bob.send_text(&room, "t1", "hello").await;
    let b0 = bob.sync(None, 0).await;
    let a0 = alice2.sync(None, 0).await;

    let (st, body) = alice
        .post(
            &format!("rooms/{}/receipt/m.read.private/{}", enc(&room), enc(&event)),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (_, r) = sync_for_receipt(&alice2, &next_batch(&a0), &room, 3).await;
    assert!(
        r[0]["content"][&event]["m.read.private"][&alice.user_id]["ts"].is_u64(),
        "{r:?}"
    );
    assert!(r[0]["content"][&event].get("m.read").is_none(), "{r:?}");

    // Bob: neither incrementally nor in an initial sync.
    let b1 = bob.sync(Some(&next_batch(&b0)), 1000).await;
    assert!(receipts(&b1, &room).is_empty(), "{b1}");
    let b_init = bob.sync(None, 0).await;
    assert!(receipts(&b_init, &room).is_empty(), "{b_init}");
}

// A threaded receipt carries its thread_id; `main` and a thread root both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threaded_receipt_carries_thread_id() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let root = bob.send_text(&room, "t1", "root").await;
    let reply = bob
        .send(
            &room,
            "m.room.message",
            "t2",
            json!({"msgtype": "m.text", "body": "in thread",
                   "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
        )
        .await;
    let b0 = bob.sync(None, 0).await;
    let r = enc(&room);
    let (st, body) = alice
        .post(
            &format!("rooms/{r}/receipt/m.read/{}", enc(&reply)),
            json!({"thread_id": root}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = alice
        .post(
            &format!("rooms/{r}/receipt/m.read/{}", enc(&root)),
            json!({"thread_id": "main"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let b1 = bob.sync(Some(&next_batch(&b0)), 1000).await;
    let rs = receipts(&b1, &room);
    assert_eq!(rs.len(), 1, "{b1}");
    let c = &rs[0]["content"];
    assert_eq!(c[&reply]["m.read"][&alice.user_id]["thread_id"], root, "{b1}");
    assert_eq!(c[&root]["m.read"][&alice.user_id]["thread_id"], "main", "{b1}");

    // A thread root that is not an event of the room: 404.
    let got = alice
        .post(
            &format!("rooms/{r}/receipt/m.read/{}", enc(&reply)),
            json!({"thread_id": "$nosuchroot:test"}),
        )
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
}

// /read_markers sets m.fully_read room account data and an m.read receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_set_fully_read_and_receipt() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let e1 = bob.send_text(&room, "t1", "one").await;
    let e2 = bob.send_text(&room, "t2", "two").await;
    let a0 = alice.sync(None, 0).await;
    let b0 = bob.sync(None, 0).await;
    let (st, body) = alice
        .post(
            &format!("rooms/{}/read_markers", enc(&room)),
            json!({"m.fully_read": e1, "m.read": e2}),
        )
        .await;
    assert_eq!(st, 200, "{body}");

    let (st, fr) = alice
        .get(&format!(
            "user/{}/rooms/{}/account_data/m.fully_read",
            enc(&alice.user_id),
            enc(&room)
        ))
        .await;
    assert_eq!(st, 200, "{fr}");
    assert_eq!(fr, json!({"event_id": e1}));
    // Only /read_markers moves it (the spec's 405 on the account-data path).
    let fr_path = format!(
        "user/{}/rooms/{}/account_data/m.fully_read",
        enc(&alice.user_id),
        enc(&room)
    );
    assert_err(&alice.put(&fr_path, json!({"event_id": e2})).await, 405, "M_BAD_JSON");
    assert_eq!(alice.get(&fr_path).await.1, json!({"event_id": e1}));

    let a1 = alice.sync(Some(&next_batch(&a0)), 1000).await;
    let ad = &a1["rooms"]["join"][&room]["account_data"]["events"];
    assert!(
        ad.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["type"] == "m.fully_read" && e["content"]["event_id"] == e1)),
        "{a1}"
    );
    let (_, r) = sync_for_receipt(&bob, &next_batch(&b0), &room, 3).await;
    assert!(r[0]["content"][&e2]["m.read"][&alice.user_id]["ts"].is_u64(), "{r:?}");
    assert!(r[0]["content"].get(&e1).is_none(), "fully_read is no receipt: {r:?}");
}

// A receipt or marker for an event not in the room is 404 M_NOT_FOUND;
// an unknown receipt type is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_for_unknown_event_is_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let other = alice.create_room(json!({"preset": "private_chat"})).await;
    let elsewhere = alice.send_text(&other, "t1", "elsewhere").await;
    let r = enc(&room);
    let b0 = bob.sync(None, 0).await;

    for ev in ["$nosuchevent:test", elsewhere.as_str()] {
        let got = alice
            .post(&format!("rooms/{r}/receipt/m.read/{}", enc(ev)), json!({}))
            .await;
        assert_err(&got, 404, "M_NOT_FOUND");
        let got = alice
            .post(&format!("rooms/{r}/read_markers"), json!({"m.fully_read": ev}))
            .await;
        assert_err(&got, 404, "M_NOT_FOUND");
    }
    let got = alice
        .post(&format!("rooms/{r}/receipt/m.unknown/{}", enc(&elsewhere)), json!({}))
        .await;
    assert_eq!(got.0, 400, "{got:?}");
    // Nothing was stored.
    let b1 = bob.sync(Some(&next_batch(&b0)), 500).await;
    assert!(receipts(&b1, &room).is_empty(), "{b1}");
}

// An initial sync carries every current receipt of the room, the newest
// per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_carries_current_receipts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let e1 = bob.send_text(&room, "t1", "one").await;
    let e2 = bob.send_text(&room, "t2", "two").await;
    let r = enc(&room);
    for ev in [&e1, &e2] {
        let (st, body) = alice
            .post(&format!("rooms/{r}/receipt/m.read/{}", enc(ev)), json!({}))
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let (st, body) = bob
        .post(&format!("rooms/{r}/receipt/m.read/{}", enc(&e2)), json!({}))
        .await;
    assert_eq!(st, 200, "{body}");

    let b = bob.sync(None, 0).await;
    let rs = receipts(&b, &room);
    assert_eq!(rs.len(), 1, "{b}");
    let c = rs[0]["content"].as_object().expect("content");
    assert_eq!(c.keys().collect::<Vec<_>>(), vec![&e2], "only the newest per user: {b}");
    let readers = c[&e2]["m.read"].as_object().expect("m.read");
    let mut users: Vec<&String> = readers.keys().collect();
    users.sort();
    let mut want = vec![&alice.user_id, &bob.user_id];
    want.sort();
    assert_eq!(users, want, "{b}");
}
