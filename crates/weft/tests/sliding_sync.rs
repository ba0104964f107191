//! Simplified sliding sync (MSC4186,
//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`) over
//! HTTP: lists by recency with ranges and counts, required state (with
//! wildcards and `$LAZY` members), timeline limits, initial and incremental
//! responses, the long-poll, room subscriptions, the extensions, invites,
//! unknown positions, and that a room the user is not in never shows.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// One sliding sync request; panics unless it answers 200.
async fn ss(c: &Client, pos: Option<&str>, timeout_ms: u64, body: Value) -> Value {
    let (st, resp) = ss_raw(c, pos, timeout_ms, body).await;
    assert_eq!(st, 200, "{resp}");
    resp
}

async fn ss_raw(c: &Client, pos: Option<&str>, timeout_ms: u64, body: Value) -> (u16, Value) {
    let mut path = format!("{PATH}?timeout={timeout_ms}");
    if let Some(p) = pos {
        path.push_str(&format!("&pos={}", enc(p)));
    }
    c.post(&path, body).await
}

fn pos(resp: &Value) -> String {
    resp["pos"].as_str().expect("pos").to_owned()
}

fn room_ids(resp: &Value) -> BTreeSet<String> {
    resp["rooms"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn state_keys(room: &Value, event_type: &str) -> BTreeSet<String> {
    room["required_state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == event_type)
        .map(|e| e["state_key"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Waits until `/sync` shows `c` `n` unread notifications in `room`: the
/// push evaluator counts a message a moment after it is stored, and a
/// count that moves later is itself a room change in sliding sync.
async fn counted(c: &Client, room: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.sync(None, 0).await;
        if s["rooms"]["join"][room]["unread_notifications"]["notification_count"] == json!(n) {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} unread in {room}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn named_room(c: &Client, name: &str) -> String {
    c.create_room(json!({ "name": name, "preset": "private_chat" })).await
}

// Rooms are ranked by their latest message (or creation): a range picks a
// window of that order, `count` is the whole list, and each room in range
// comes `initial` with its required state and last `timeline_limit` events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_rank_rooms_by_recency_with_ranges_and_count() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let a = named_room(&alice, "A").await;
    let b = named_room(&alice, "B").await;
    let c = named_room(&alice, "C").await;
    alice.send_text(&a, "a1", "old in A").await;
    alice.send_text(&a, "a2", "new in A").await;
    // Latest first: A (message), C (created after B), B.
    let details = json!({ "required_state": [["m.room.name", ""]], "timeline_limit": 1 });
    let mut top = details.clone();
    top["ranges"] = json!([[0, 1]]);
    let mut third = details.clone();
    third["ranges"] = json!([[2, 2]]);
    let r = ss(&alice, None, 0, json!({ "lists": { "top": top, "third": third } })).await;
    assert_eq!(r["lists"]["top"]["count"], 3, "{r}");
    assert_eq!(r["lists"]["third"]["count"], 3, "{r}");
    assert_eq!(room_ids(&r), set(&[&a, &b, &c]), "{r}");
    let (ra, rb, rc) = (&r["rooms"][&a], &r["rooms"][&b], &r["rooms"][&c]);
    assert!(
        ra["bump_stamp"].as_i64() > rc["bump_stamp"].as_i64() && rc["bump_stamp"].as_i64() > rb["bump_stamp"].as_i64(),
        "A bumped by its message, then C, then B: {r}"
    );
    for (room, name) in [(ra, "A"), (rb, "B"), (rc, "C")] {
        assert_eq!(room["initial"], true, "{r}");
        assert_eq!(room["name"], name, "{r}");
        assert_eq!(state_keys(room, "m.room.name"), set(&[""]), "{r}");
        assert_eq!(room["required_state"].as_array().map(Vec::len), Some(1), "{r}");
        assert_eq!(room["timeline"].as_array().map(Vec::len), Some(1), "{r}");
        assert_eq!(room["limited"], true, "{r}");
        assert_eq!(room["joined_count"], 1, "{r}");
    }
    assert_eq!(bodies(ra), vec!["new in A"], "{r}");

    // Only the top two with the small window, and B moves up when it gets
    // a message.
    let only_top = json!({ "lists": { "top": top } });
    let r = ss(&alice, None, 0, only_top.clone()).await;
    assert_eq!(room_ids(&r), set(&[&a, &c]), "{r}");
    alice.send_text(&b, "b1", "B is back").await;
    let r = ss(&alice, None, 0, only_top).await;
    assert_eq!(room_ids(&r), set(&[&b, &a]), "{r}");
    assert_eq!(bodies(&r["rooms"][&b]), vec!["B is back"], "{r}");
}

// `["*", "*"]` is the whole state; `$LAZY` members are those who sent the
// timeline's events; a state key `*` takes every key of one type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_state_wildcards_and_lazy_members() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = room_with(&alice, &bob, "public_chat").await;
    carol.join(&room).await;
    alice.put_state(&room, "org.example.tag", "one", json!({})).await;
    alice.put_state(&room, "org.example.tag", "two", json!({})).await;
    carol.send_text(&room, "c1", "from carol").await;
    bob.send_text(&room, "b1", "from bob 1").await;
    bob.send_text(&room, "b2", "from bob 2").await;

    let list = |required: Value, limit: u32| json!({ "lists": { "l": { "ranges": [[0, 9]], "required_state": required, "timeline_limit": limit } } });
    let r = ss(
        &alice,
        None,
        0,
        list(json!([["m.room.member", "$LAZY"], ["org.example.tag", "*"]]), 2),
    )
    .await;
    let got = &r["rooms"][&room];
    assert_eq!(bodies(got), vec!["from bob 1", "from bob 2"], "{r}");
    assert_eq!(got["limited"], true, "{r}");
    assert!(got["prev_batch"].is_string(), "{r}");
    assert_eq!(
        state_keys(got, "m.room.member"),
        set(&[&bob.user_id]),
        "only bob sent: {r}"
    );
    assert_eq!(state_keys(got, "org.example.tag"), set(&["one", "two"]), "{r}");
    assert_eq!(got["required_state"].as_array().map(Vec::len), Some(3), "{r}");
    assert_eq!(got["joined_count"], 3, "{r}");

    // Three events: carol's message too, so carol's membership.
    let r = ss(&alice, None, 0, list(json!([["m.room.member", "$LAZY"]]), 3)).await;
    assert_eq!(
        state_keys(&r["rooms"][&room], "m.room.member"),
        set(&[&bob.user_id, &carol.user_id]),
        "{r}"
    );

    // Everything, and `$ME`.
    let r = ss(&alice, None, 0, list(json!([["*", "*"]]), 1)).await;
    let got = &r["rooms"][&room];
    for t in ["m.room.create", "m.room.power_levels", "m.room.join_rules"] {
        assert_eq!(state_keys(got, t), set(&[""]), "{t}: {r}");
    }
    assert_eq!(
        state_keys(got, "m.room.member"),
        set(&[&alice.user_id, &bob.user_id, &carol.user_id]),
        "{r}"
    );
    let r = ss(&alice, None, 0, list(json!([["m.room.member", "$ME"]]), 1)).await;
    assert_eq!(
        state_keys(&r["rooms"][&room], "m.room.member"),
        set(&[&alice.user_id]),
        "{r}"
    );
}

// After the first response, a request with its `pos` long-polls and is
// woken by a new message, and carries only the room that changed, not
// `initial`, with only the new event. A poll with nothing new times out
// empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_long_poll_wakes_and_carries_only_the_changed_room() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let quiet = named_room(&alice, "quiet").await;
    let busy = room_with(&alice, &bob, "private_chat").await;
    bob.send_text(&busy, "b0", "first").await;
    counted(&alice, &busy, 1).await;
    let body = json!({
        "conn_id": "main",
        "txn_id": "t-1",
        "lists": { "all": { "ranges": [[0, 9]], "required_state": [], "timeline_limit": 5 } },
    });
    let r0 = ss(&alice, None, 0, body.clone()).await;
    assert_eq!(r0["txn_id"], "t-1", "{r0}");
    assert_eq!(room_ids(&r0), set(&[&quiet, &busy]), "{r0}");

    let p0 = pos(&r0);
    let poll = {
        let (alice, body, p0) = (alice.clone(), body.clone(), p0.clone());
        tokio::spawn(async move {
            let r = ss(&alice, Some(&p0), 20_000, body).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent = Instant::now();
    bob.send_text(&busy, "b1", "second").await;
    let (r1, woke) = poll.await.expect("poll");
    assert!(
        woke.duration_since(sent) < Duration::from_secs(2),
        "took {:?}",
        woke.duration_since(sent)
    );
    assert_eq!(room_ids(&r1), set(&[&busy]), "{r1}");
    let got = &r1["rooms"][&busy];
    assert!(got.get("initial").is_none(), "{r1}");
    assert_eq!(bodies(got), vec!["second"], "{r1}");
    assert_eq!(got["num_live"], 1, "{r1}");
    assert_eq!(got["limited"], false, "{r1}");
    assert_eq!(r1["lists"]["all"]["count"], 2, "{r1}");

    // The count of "second" may follow its event in a response of its own.
    counted(&alice, &busy, 2).await;
    let settled = ss(&alice, Some(&pos(&r1)), 0, body.clone()).await;

    // Nothing new: the poll waits out its timeout and answers no rooms.
    let start = Instant::now();
    let r2 = ss(&alice, Some(&pos(&settled)), 800, body.clone()).await;
    assert!(start.elapsed() >= Duration::from_millis(700), "{:?}", start.elapsed());
    assert!(room_ids(&r2).is_empty(), "{r2}");

    // Repeating the second request (as if its answer was lost) sends the
    // room that answer sent again, whole; the quiet room stays known.
    let again = ss(&alice, Some(&p0), 0, body).await;
    assert_eq!(room_ids(&again), set(&[&busy]), "{again}");
    assert_eq!(again["rooms"][&busy]["initial"], true, "{again}");
    assert_eq!(bodies(&again["rooms"][&busy]), vec!["first", "second"], "{again}");
}

// A room subscription brings a room outside every range, with its own
// details; a subscription to a room the user is not in brings nothing,
// neither at first nor when that room changes. A room the user leaves is
// sent once more (with the leave) and then no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_subscriptions_and_membership() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let old = named_room(&alice, "old").await;
    alice.send_text(&old, "o1", "old news").await;
    let newer = named_room(&alice, "newer").await;
    let secret = bob.create_room(json!({ "preset": "private_chat" })).await;
    bob.send_text(&secret, "s1", "not for alice").await;
    let public = bob.create_room(json!({ "preset": "public_chat" })).await;

    let body = json!({
        "lists": { "l": { "ranges": [[0, 0]], "required_state": [], "timeline_limit": 1 } },
        "room_subscriptions": {
            old.as_str(): { "required_state": [["m.room.name", ""]], "timeline_limit": 5 },
            secret.as_str(): { "required_state": [["*", "*"]], "timeline_limit": 5 },
            public.as_str(): { "required_state": [["*", "*"]], "timeline_limit": 5 },
            "!nowhere:localhost": { "required_state": [], "timeline_limit": 5 },
        },
        "extensions": { "receipts": { "enabled": true }, "account_data": { "enabled": true } },
    });
    let r0 = ss(&alice, None, 0, body.clone()).await;
    assert_eq!(room_ids(&r0), set(&[&newer, &old]), "{r0}");
    assert_eq!(state_keys(&r0["rooms"][&old], "m.room.name"), set(&[""]), "{r0}");
    assert_eq!(bodies(&r0["rooms"][&old]), vec!["old news"], "{r0}");

    // Changes in rooms alice is not in do not show (nor wake her).
    bob.send_text(&secret, "s2", "still not for alice").await;
    bob.post(
        &format!("rooms/{}/receipt/m.read/{}", enc(&secret), enc("$x")),
        json!({}),
    )
    .await;
    let r1 = ss(&alice, Some(&pos(&r0)), 600, body.clone()).await;
    assert!(room_ids(&r1).is_empty(), "{r1}");
    let text = r1.to_string();
    assert!(!text.contains(&secret) && !text.contains(&public), "{r1}");

    // Alice leaves `old`: sent once with her leave, then not again.
    let (st, _) = alice.post(&format!("rooms/{}/leave", enc(&old)), json!({})).await;
    assert_eq!(st, 200);
    let r2 = ss(&alice, Some(&pos(&r1)), 5000, body.clone()).await;
    assert_eq!(room_ids(&r2), set(&[&old]), "{r2}");
    let last = r2["rooms"][&old]["timeline"].as_array().and_then(|t| t.last()).cloned();
    assert_eq!(
        last.as_ref().map(|e| e["content"]["membership"].clone()),
        Some(json!("leave")),
        "{r2}"
    );
    assert_eq!(r2["lists"]["l"]["count"], 1, "{r2}");
    let r3 = ss(&alice, Some(&pos(&r2)), 600, body.clone()).await;
    assert!(room_ids(&r3).is_empty(), "{r3}");
    let fresh = ss(&alice, None, 0, body).await;
    assert_eq!(room_ids(&fresh), set(&[&newer]), "{fresh}");
}

// Asking for more state of a room the connection has (a client opening a
// room subscribes to it with more required state) sends the room whole
// again at once, with that state; asking again for the same sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_required_state_resends_the_room() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = named_room(&alice, "Topical").await;
    alice.send_text(&room, "m1", "hi").await;
    let list = json!({ "l": { "ranges": [[0, 9]], "required_state": [], "timeline_limit": 1 } });
    let r0 = ss(&alice, None, 0, json!({ "lists": list })).await;
    assert!(
        r0["rooms"][&room]["required_state"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{r0}"
    );
    let with_sub = json!({
        "lists": list,
        "room_subscriptions": { room.as_str(): { "required_state": [["m.room.name", ""]], "timeline_limit": 1 } },
    });
    let start = Instant::now();
    let r1 = ss(&alice, Some(&pos(&r0)), 10_000, with_sub.clone()).await;
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(r1["rooms"][&room]["initial"], true, "{r1}");
    assert_eq!(state_keys(&r1["rooms"][&room], "m.room.name"), set(&[""]), "{r1}");
    assert_eq!(bodies(&r1["rooms"][&room]), vec!["hi"], "{r1}");
    let r2 = ss(&alice, Some(&pos(&r1)), 500, with_sub).await;
    assert!(room_ids(&r2).is_empty(), "{r2}");
    // Asking for less again: nothing to send.
    let r3 = ss(&alice, Some(&pos(&r2)), 500, json!({ "lists": list })).await;
    assert!(room_ids(&r3).is_empty(), "{r3}");
}

// An invited room comes with its stripped state (the invite among it) and
// no timeline; `is_invite` filters lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invited_room_has_invite_state() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let joined = named_room(&alice, "mine").await;
    let room = bob
        .create_room(json!({ "name": "Bob's place", "preset": "private_chat" }))
        .await;
    bob.send_text(&room, "m1", "before alice").await;
    bob.invite(&room, &alice.user_id).await;
    let r = ss(
        &alice,
        None,
        0,
        json!({ "lists": {
            "invites": { "ranges": [[0, 9]], "required_state": [], "timeline_limit": 5, "filters": { "is_invite": true } },
            "rest": { "ranges": [[0, 9]], "required_state": [], "timeline_limit": 5, "filters": { "is_invite": false } },
        } }),
    )
    .await;
    assert_eq!(r["lists"]["invites"]["count"], 1, "{r}");
    assert_eq!(r["lists"]["rest"]["count"], 1, "{r}");
    assert_eq!(room_ids(&r), set(&[&room, &joined]), "{r}");
    let inv = &r["rooms"][&room];
    assert_eq!(inv["initial"], true, "{r}");
    assert_eq!(inv["name"], "Bob's place", "{r}");
    assert!(
        inv.get("timeline")
            .is_none_or(|t| t.as_array().is_some_and(Vec::is_empty)),
        "{r}"
    );
    let stripped = inv["invite_state"].as_array().cloned().unwrap_or_default();
    assert!(
        stripped
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Bob's place"),
        "{r}"
    );
    assert!(
        stripped.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == alice.user_id.as_str()
            && e["content"]["membership"] == "invite"),
        "{r}"
    );
    assert!(!r.to_string().contains("before alice"), "{r}");

    // Accepting the invite sends the room whole again, now joined.
    let p = pos(&r);
    alice.join(&room).await;
    let body = json!({ "lists": { "all": { "ranges": [[0, 9]], "required_state": [], "timeline_limit": 5 } } });
    let r = ss(&alice, Some(&p), 5000, body).await;
    assert_eq!(room_ids(&r), set(&[&room]), "{r}");
    assert_eq!(r["rooms"][&room]["initial"], true, "{r}");
    assert!(r["rooms"][&room].get("invite_state").is_none(), "{r}");
    assert_eq!(r["rooms"][&room]["joined_count"], 2, "{r}");
}

// A `pos` the server did not give this connection, or gave to an earlier
// life of it, answers 400 M_UNKNOWN_POS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pos_is_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let body = |conn: &str| json!({ "conn_id": conn, "lists": {} });
    for bad in ["garbage", "x_1_1", "a_b_c_d"] {
        assert_err(&ss_raw(&alice, Some(bad), 0, body("one")).await, 400, "M_UNKNOWN_POS");
    }
    let r = ss(&alice, None, 0, body("one")).await;
    let p = pos(&r);
    assert_eq!(ss_raw(&alice, Some(&p), 0, body("one")).await.0, 200);
    // Another connection, another user: unknown there.
    assert_err(&ss_raw(&alice, Some(&p), 0, body("two")).await, 400, "M_UNKNOWN_POS");
    assert_err(&ss_raw(&bob, Some(&p), 0, body("one")).await, 400, "M_UNKNOWN_POS");
    // A response number or stream position never given.
    let parts: Vec<&str> = p.split('_').collect();
    let ahead = format!("{}_{}_{}", parts[0], 99, parts[2]);
    assert_err(
        &ss_raw(&alice, Some(&ahead), 0, body("one")).await,
        400,
        "M_UNKNOWN_POS",
    );
    let future = format!("{}_{}_{}", parts[0], parts[1], 999_999);
    assert_err(
        &ss_raw(&alice, Some(&future), 0, body("one")).await,
        400,
        "M_UNKNOWN_POS",
    );
    // Restarting the connection forgets its earlier positions.
    ss(&alice, None, 0, body("one")).await;
    assert_err(&ss_raw(&alice, Some(&p), 0, body("one")).await, 400, "M_UNKNOWN_POS");
}

// The extensions: to-device messages (with `next_batch`, consumed once
// acknowledged by `since`), e2ee (one-time key counts, device list
// changes), account data (global and per room), receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_carry_to_device_e2ee_account_data_and_receipts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let event = bob.send_text(&room, "m1", "read me").await;
    counted(&alice, &room, 1).await;
    let (st, _) = alice
        .put(
            &format!("user/{}/account_data/org.example.global", enc(&alice.user_id)),
            json!({ "g": 1 }),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .put(
            &format!(
                "user/{}/rooms/{}/account_data/org.example.room",
                enc(&alice.user_id),
                enc(&room)
            ),
            json!({ "r": 1 }),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .post(
            "keys/upload",
            json!({ "one_time_keys": { "signed_curve25519:AAAA": { "key": "k", "signatures": { "@x:y": { "ed25519:D": "s" } } } } }),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = bob
        .put(
            "sendToDevice/m.test/t1",
            json!({ "messages": { alice.user_id.as_str(): { alice.device_id.as_str(): { "n": 1 } } } }),
        )
        .await;
    assert_eq!(st, 200);

    let body = |since: Option<&str>| {
        let mut to_device = json!({ "enabled": true });
        if let Some(s) = since {
            to_device["since"] = json!(s);
        }
        json!({
            "lists": { "l": { "ranges": [[0, 9]], "required_state": [], "timeline_limit": 1 } },
            "extensions": {
                "to_device": to_device,
                "e2ee": { "enabled": true },
                "account_data": { "enabled": true },
                "receipts": { "enabled": true },
                "typing": { "enabled": true },
            },
        })
    };
    let r0 = ss(&alice, None, 0, body(None)).await;
    let ext = &r0["extensions"];
    assert_eq!(
        ext["to_device"]["events"],
        json!([{ "sender": bob.user_id, "type": "m.test", "content": { "n": 1 } }]),
        "{r0}"
    );
    let next = ext["to_device"]["next_batch"].as_str().expect("next_batch").to_owned();
    assert_eq!(
        ext["e2ee"]["device_one_time_keys_count"]["signed_curve25519"], 1,
        "{r0}"
    );
    let global = ext["account_data"]["global"].as_array().cloned().unwrap_or_default();
    assert!(
        global
            .iter()
            .any(|e| e["type"] == "org.example.global" && e["content"] == json!({ "g": 1 })),
        "{r0}"
    );
    assert_eq!(
        ext["account_data"]["rooms"][&room],
        json!([{ "type": "org.example.room", "content": { "r": 1 } }]),
        "{r0}"
    );
    assert!(ext["typing"]["rooms"].as_object().is_some(), "{r0}");

    // Bob reads the message and uploads device keys; a message to alice's
    // device is acknowledged by `since` and not sent again.
    let (st, _) = bob
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)),
            json!({}),
        )
        .await;
    assert_eq!(st, 200);
    let r1 = ss(&alice, Some(&pos(&r0)), 5000, body(Some(&next))).await;
    let ext = &r1["extensions"];
    assert!(ext["to_device"]["events"].as_array().is_some_and(Vec::is_empty), "{r1}");
    let receipt = &ext["receipts"]["rooms"][&room];
    assert_eq!(receipt["type"], "m.receipt", "{r1}");
    assert!(
        receipt["content"][&event]["m.read"][&bob.user_id]["ts"].is_u64(),
        "{r1}"
    );
    assert!(room_ids(&r1).is_empty(), "a receipt is no room change: {r1}");

    let keys = json!({
        "user_id": bob.user_id,
        "device_id": bob.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", bob.device_id): "curve",
            format!("ed25519:{}", bob.device_id): "ed",
        },
        "signatures": { bob.user_id.as_str(): { format!("ed25519:{}", bob.device_id): "sig" } },
    });
    let (st, _) = bob.post("keys/upload", json!({ "device_keys": keys })).await;
    assert_eq!(st, 200);
    let r2 = ss(&alice, Some(&pos(&r1)), 5000, body(Some(&next))).await;
    assert_eq!(
        r2["extensions"]["e2ee"]["device_lists"]["changed"],
        json!([bob.user_id]),
        "{r2}"
    );
    assert!(
        r2["extensions"]["receipts"]["rooms"]
            .as_object()
            .is_some_and(|o| o.is_empty()),
        "{r2}"
    );
    assert!(
        r2["extensions"]["account_data"]["global"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{r2}"
    );

    // The acknowledged message is gone for good: a new connection does not
    // get it either.
    let r3 = ss(&alice, None, 0, body(None)).await;
    assert!(
        r3["extensions"]["to_device"]["events"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{r3}"
    );
}

// `/versions` advertises it as matrix-sdk looks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_advertise_simplified_sliding_sync() {
    let server = TestServer::start().await;
    let (st, v) = server.anon().get("/_matrix/client/versions").await;
    assert_eq!(st, 200);
    assert_eq!(v["unstable_features"]["org.matrix.simplified_msc3575"], true, "{v}");
}

// Unread counts: a message makes bob's count rise (the push evaluator may
// come a moment after the event: the count then follows on its own), and
// his read receipt brings it back to 0 in a response carrying the room
// with no new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_follow_messages_and_read_receipts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let body = json!({ "lists": { "all": { "ranges": [[0, 9]], "timeline_limit": 1 } } });
    let first = ss(&bob, None, 0, body.clone()).await;
    let mut at = pos(&first);
    let ev = alice.send_text(&room, "t1", "hello bob").await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut count = 0;
    while count != 1 {
        assert!(Instant::now() < deadline, "the count never reached 1");
        let r = ss(&bob, Some(&at), 2000, body.clone()).await;
        at = pos(&r);
        if let Some(n) = r["rooms"][&room]["notification_count"].as_u64() {
            count = n;
        }
    }
    let (st, v) = bob
        .post(&format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&ev)), json!({}))
        .await;
    assert_eq!(st, 200, "{v}");
    let r = ss(&bob, Some(&at), 5000, body.clone()).await;
    let entry = &r["rooms"][&room];
    assert_eq!(entry["notification_count"], json!(0), "{r}");
    assert!(bodies(entry).is_empty(), "no new event, no timeline: {entry}");
}
