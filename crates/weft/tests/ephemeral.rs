//! Typing notifications and presence: stored with stream positions and
//! carried in `/sync` (`rooms.join.{room}.ephemeral` `m.typing`, top-level
//! `presence`), with their timeouts, access rules and filters.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

/// The ephemeral events of `event_type` in `room` of a sync response.
fn ephemeral(sync: &Value, room: &str, event_type: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == event_type).cloned().collect())
        .unwrap_or_default()
}

/// The `user_ids` of the one `m.typing` event of `room`, `None` if there is none.
fn typers(sync: &Value, room: &str) -> Option<Vec<String>> {
    let t = ephemeral(sync, room, "m.typing");
    assert!(t.len() <= 1, "at most one m.typing per room: {sync}");
    t.first().map(|e| {
        e["content"]["user_ids"]
            .as_array()
            .expect("user_ids")
            .iter()
            .map(|u| u.as_str().expect("user ID").to_owned())
            .collect()
    })
}

/// The `m.presence` events of `sender` in a sync response.
fn presence_of(sync: &Value, sender: &str) -> Vec<Value> {
    sync["presence"]["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["sender"] == sender).cloned().collect())
        .unwrap_or_default()
}

async fn typing(c: &Client, room: &str, body: Value) -> (u16, Value) {
    c.put(&format!("rooms/{}/typing/{}", enc(room), enc(&c.user_id)), body)
        .await
}

/// Syncs (with `params`) from `since` until `done` holds for a response,
/// at most `tries` responses; answers it.
async fn sync_until(
    c: &Client,
    since: &str,
    params: &[(&str, &str)],
    tries: usize,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let mut since = since.to_owned();
    for _ in 0..tries {
        let mut p = vec![("since", since.as_str()), ("timeout", "3000")];
        p.extend_from_slice(params);
        let (st, s) = c.sync_params(&p).await;
        assert_eq!(st, 200, "{s}");
        if done(&s) {
            return s;
        }
        since = next_batch(&s);
    }
    panic!("condition not met in {tries} syncs");
}

// Bob's long-poll wakes within a second of alice starting to type (no
// event in the room) and carries one m.typing with exactly alice; the next
// sync does not repeat it; stopping sends the (now empty) list; a user not
// in the room sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_members_by_long_poll_and_stops() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync(None, 0).await;
    assert_eq!(typers(&b0, &room), None, "nobody types yet: {b0}");

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
    let (st, body) = typing(&alice, &room, json!({ "typing": true, "timeout": 30_000 })).await;
    assert_eq!(st, 200, "{body}");
    let (b1, woke) = poll.await.expect("poll task");
    assert!(
        woke.duration_since(sent) < Duration::from_secs(1),
        "long-poll took {:?}",
        woke.duration_since(sent)
    );
    assert_eq!(typers(&b1, &room), Some(vec![alice.user_id.clone()]), "{b1}");
    assert!(timeline(&b1, &room).is_empty(), "no event, only typing: {b1}");
    assert!(
        b1["rooms"]["join"][&room]["ephemeral"]["events"][0]
            .get("room_id")
            .is_none()
    );

    // Renewing the timeout is no change: nothing new for bob.
    let (st, _) = typing(&alice, &room, json!({ "typing": true, "timeout": 30_000 })).await;
    assert_eq!(st, 200);
    let b2 = bob.sync(Some(&next_batch(&b1)), 500).await;
    assert_eq!(typers(&b2, &room), None, "not repeated: {b2}");

    // Bob types too: both are listed, in the order they started.
    let (st, _) = typing(&bob, &room, json!({ "typing": true, "timeout": 30_000 })).await;
    assert_eq!(st, 200);
    let b3 = sync_until(&bob, &next_batch(&b2), &[], 3, |s| typers(s, &room).is_some()).await;
    assert_eq!(
        typers(&b3, &room),
        Some(vec![alice.user_id.clone(), bob.user_id.clone()]),
        "{b3}"
    );
    // A fresh initial sync shows the current typers.
    let a0 = alice.sync(None, 0).await;
    assert_eq!(
        typers(&a0, &room),
        Some(vec![alice.user_id.clone(), bob.user_id.clone()]),
        "{a0}"
    );

    // Alice stops: bob gets the full list without her.
    let (st, body) = typing(&alice, &room, json!({ "typing": false })).await;
    assert_eq!(st, 200, "{body}");
    let b4 = sync_until(&bob, &next_batch(&b3), &[], 3, |s| typers(s, &room).is_some()).await;
    assert_eq!(typers(&b4, &room), Some(vec![bob.user_id.clone()]), "{b4}");
    let (st, _) = typing(&bob, &room, json!({ "typing": false })).await;
    assert_eq!(st, 200);
    let b5 = sync_until(&bob, &next_batch(&b4), &[], 3, |s| typers(s, &room).is_some()).await;
    assert_eq!(typers(&b5, &room), Some(vec![]), "empty list once nobody types: {b5}");

    // Carol, not in the room, sees nothing of it.
    let c0 = carol.sync(None, 0).await;
    assert!(c0["rooms"]["join"].get(&room).is_none(), "{c0}");
    let (st, body) = typing(&carol, &room, json!({ "typing": true, "timeout": 1000 })).await;
    assert_err(&(st, body), 403, "M_FORBIDDEN");
    // Nor may anyone type for someone else.
    let (st, body) = bob
        .put(
            &format!("rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
            json!({ "typing": true, "timeout": 1000 }),
        )
        .await;
    assert_err(&(st, body), 403, "M_FORBIDDEN");
}

// A typing notice with a 1.5 s timeout ends by itself: bob's long-poll is
// woken by the expiry (not before the timeout) with the empty list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_expires_after_its_timeout() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync(None, 0).await;
    let started = Instant::now();
    let (st, body) = typing(&alice, &room, json!({ "typing": true, "timeout": 1500 })).await;
    assert_eq!(st, 200, "{body}");
    let b1 = sync_until(&bob, &next_batch(&b0), &[], 3, |s| typers(s, &room).is_some()).await;
    assert_eq!(typers(&b1, &room), Some(vec![alice.user_id.clone()]), "{b1}");
    let b2 = sync_until(&bob, &next_batch(&b1), &[], 5, |s| typers(s, &room).is_some()).await;
    let took = started.elapsed();
    assert_eq!(typers(&b2, &room), Some(vec![]), "expired: {b2}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(6000),
        "expired after {took:?}"
    );
    // And stays expired for a new client.
    let a0 = alice.sync(None, 0).await;
    assert_eq!(typers(&a0, &room), None, "{a0}");
}

// Leaving the room stops one's typing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_stops_typing() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync(None, 0).await;
    let (st, _) = typing(&alice, &room, json!({ "typing": true, "timeout": 60_000 })).await;
    assert_eq!(st, 200);
    let b1 = sync_until(&bob, &next_batch(&b0), &[], 3, |s| typers(s, &room).is_some()).await;
    assert_eq!(typers(&b1, &room), Some(vec![alice.user_id.clone()]), "{b1}");
    let (st, body) = alice.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(st, 200, "{body}");
    let b2 = sync_until(&bob, &next_batch(&b1), &[], 3, |s| typers(s, &room).is_some()).await;
    assert_eq!(typers(&b2, &room), Some(vec![]), "{b2}");
}

// The sync filter's room.ephemeral decides which ephemeral events come:
// not_types m.typing keeps typing out (receipts still come), types
// [m.typing] keeps receipts out, not_rooms keeps the room's out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_filter_selects_typing_and_receipts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let event = bob.send_text(&room, "t1", "hi").await;
    let b0 = bob.sync(None, 0).await;
    let since = next_batch(&b0);
    let (st, _) = typing(&alice, &room, json!({ "typing": true, "timeout": 60_000 })).await;
    assert_eq!(st, 200);
    let (st, body) = alice
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let all = sync_until(&bob, &since, &[], 3, |s| {
        typers(s, &room).is_some() && !ephemeral(s, &room, "m.receipt").is_empty()
    })
    .await;
    assert_eq!(typers(&all, &room), Some(vec![alice.user_id.clone()]), "{all}");

    let no_typing = json!({ "room": { "ephemeral": { "not_types": ["m.typing"] } } }).to_string();
    let (st, s) = bob.sync_params(&[("since", &since), ("filter", &no_typing)]).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(typers(&s, &room), None, "filtered out: {s}");
    assert_eq!(ephemeral(&s, &room, "m.receipt").len(), 1, "{s}");

    let only_typing = json!({ "room": { "ephemeral": { "types": ["m.typing"] } } }).to_string();
    let (st, s) = bob.sync_params(&[("since", &since), ("filter", &only_typing)]).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(typers(&s, &room), Some(vec![alice.user_id.clone()]), "{s}");
    assert!(ephemeral(&s, &room, "m.receipt").is_empty(), "{s}");

    let not_room = json!({ "room": { "ephemeral": { "not_rooms": [room] } } }).to_string();
    let (st, s) = bob.sync_params(&[("since", &since), ("filter", &not_room)]).await;
    assert_eq!(st, 200, "{s}");
    assert!(
        ephemeral(&s, &room, "m.typing").is_empty() && ephemeral(&s, &room, "m.receipt").is_empty(),
        "{s}"
    );
}

// Presence set by PUT reaches a user sharing a room, in the spec's shape,
// and no stranger; GET follows the same rules (403 for a stranger, 404 for
// an unknown user, only one's own may be set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_room_sharers_only() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let _room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync(None, 0).await;
    let c0 = carol.sync(None, 0).await;

    let (st, body) = alice
        .put(
            &format!("presence/{}/status", enc(&alice.user_id)),
            json!({ "presence": "unavailable", "status_msg": "out for lunch" }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let b1 = sync_until(&bob, &next_batch(&b0), &[], 3, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    let p = presence_of(&b1, &alice.user_id);
    assert_eq!(p.len(), 1, "{b1}");
    assert_eq!(p[0]["type"], "m.presence");
    assert_eq!(p[0]["content"]["presence"], "unavailable", "{b1}");
    assert_eq!(p[0]["content"]["status_msg"], "out for lunch", "{b1}");
    // Bob's own presence comes too (his syncs made him online).
    let b_all = bob.sync(None, 0).await;
    assert_eq!(
        presence_of(&b_all, &bob.user_id)[0]["content"]["presence"],
        "online",
        "{b_all}"
    );
    assert_eq!(presence_of(&b_all, &alice.user_id).len(), 1, "{b_all}");

    // Carol shares no room with alice: nothing of hers, not even initially.
    let c1 = carol.sync(Some(&next_batch(&c0)), 1000).await;
    assert!(presence_of(&c1, &alice.user_id).is_empty(), "{c1}");
    let c2 = carol.sync(None, 0).await;
    assert!(presence_of(&c2, &alice.user_id).is_empty(), "{c2}");
    assert_eq!(presence_of(&c2, &carol.user_id).len(), 1, "her own: {c2}");

    // GET: bob sees alice's; carol may not; unknown users are 404.
    let (st, g) = bob.get(&format!("presence/{}/status", enc(&alice.user_id))).await;
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["presence"], "unavailable", "{g}");
    assert_eq!(g["status_msg"], "out for lunch", "{g}");
    assert_eq!(g["currently_active"], false, "{g}");
    let got = carol.get(&format!("presence/{}/status", enc(&alice.user_id))).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = bob
        .get(&format!("presence/{}/status", enc(&server.user_id("nobody"))))
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (st, g) = carol.get(&format!("presence/{}/status", enc(&carol.user_id))).await;
    assert_eq!(st, 200, "own: {g}");
    assert_eq!(g["presence"], "online", "{g}");
    assert!(g["last_active_ago"].as_u64().is_some(), "{g}");
    assert_eq!(g["currently_active"], true, "{g}");
    let got = bob
        .put(
            &format!("presence/{}/status", enc(&alice.user_id)),
            json!({ "presence": "online" }),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // Back online, status cleared: bob sees the change.
    let (st, _) = alice
        .put(
            &format!("presence/{}/status", enc(&alice.user_id)),
            json!({ "presence": "online" }),
        )
        .await;
    assert_eq!(st, 200);
    let b2 = sync_until(&bob, &next_batch(&b1), &[], 3, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    let p = presence_of(&b2, &alice.user_id);
    assert_eq!(p[0]["content"]["presence"], "online", "{b2}");
    assert_eq!(p[0]["content"]["currently_active"], true, "{b2}");
    assert!(p[0]["content"].get("status_msg").is_none(), "{b2}");
}

// set_presence on /sync: offline leaves presence alone, the default makes
// the user online, unavailable makes them unavailable; the presence
// filter keeps them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_presence_on_sync_and_presence_filter() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let _room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync(None, 0).await;

    let (st, a) = alice
        .sync_params(&[("set_presence", "offline"), ("timeout", "0")])
        .await;
    assert_eq!(st, 200, "{a}");
    assert!(presence_of(&a, &alice.user_id).is_empty(), "{a}");
    let (st, g) = bob.get(&format!("presence/{}/status", enc(&alice.user_id))).await;
    assert_eq!(st, 200);
    assert_eq!(g["presence"], "offline", "offline sync does not set online: {g}");
    let b1 = bob.sync(Some(&next_batch(&b0)), 500).await;
    assert!(presence_of(&b1, &alice.user_id).is_empty(), "{b1}");

    let (st, a) = alice
        .sync_params(&[("set_presence", "unavailable"), ("timeout", "0")])
        .await;
    assert_eq!(st, 200, "{a}");
    let (_, g) = bob.get(&format!("presence/{}/status", enc(&alice.user_id))).await;
    assert_eq!(g["presence"], "unavailable", "{g}");

    // The default: online (an unavailable user stays unavailable until
    // they set presence or act, so use a fresh user).
    let dave = server.register("dave").await;
    let room2 = room_with(&bob, &dave, "private_chat").await;
    let b1 = bob.sync(None, 0).await;
    assert!(b1["rooms"]["join"].get(&room2).is_some());
    let _ = dave.sync(None, 0).await;
    let b2 = sync_until(&bob, &next_batch(&b1), &[], 3, |s| {
        !presence_of(s, &dave.user_id).is_empty()
    })
    .await;
    assert_eq!(
        presence_of(&b2, &dave.user_id)[0]["content"]["presence"],
        "online",
        "{b2}"
    );

    let no_presence = json!({ "presence": { "not_types": ["m.presence"] } }).to_string();
    let (st, s) = bob.sync_params(&[("filter", &no_presence)]).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(s["presence"]["events"].as_array().map(|a| a.len()), Some(0), "{s}");
    let not_dave = json!({ "presence": { "not_senders": [dave.user_id] } }).to_string();
    let (st, s) = bob.sync_params(&[("filter", &not_dave)]).await;
    assert_eq!(st, 200, "{s}");
    assert!(presence_of(&s, &dave.user_id).is_empty(), "{s}");
    assert_eq!(presence_of(&s, &alice.user_id).len(), 1, "{s}");
}

// A user who stops syncing goes offline once `offline_after_ms` has passed
// (here 2 s), and the user sharing a room is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_goes_offline_without_sync() {
    let server = TestServer::builder()
        .env("WEFT_PRESENCE__OFFLINE_AFTER_MS", "2000")
        .start()
        .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let _room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync_params(&[("set_presence", "offline")]).await.1;
    let _ = alice.sync(None, 0).await;
    let b1 = sync_until(&bob, &next_batch(&b0), &[("set_presence", "offline")], 3, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    assert_eq!(
        presence_of(&b1, &alice.user_id)[0]["content"]["presence"],
        "online",
        "{b1}"
    );
    let b2 = sync_until(&bob, &next_batch(&b1), &[("set_presence", "offline")], 4, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    assert_eq!(
        presence_of(&b2, &alice.user_id)[0]["content"]["presence"],
        "offline",
        "{b2}"
    );
}

// With [presence] enabled = false, PUT is accepted, nothing is relayed and
// GET says offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_disabled_relays_nothing() {
    let server = TestServer::builder()
        .env("WEFT_PRESENCE__ENABLED", "false")
        .start()
        .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let _room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync(None, 0).await;
    let (st, body) = alice
        .put(
            &format!("presence/{}/status", enc(&alice.user_id)),
            json!({ "presence": "online", "status_msg": "here" }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let b1 = bob.sync(Some(&next_batch(&b0)), 1000).await;
    assert_eq!(b1["presence"]["events"].as_array().map(|a| a.len()), Some(0), "{b1}");
    let b2 = bob.sync(None, 0).await;
    assert_eq!(b2["presence"]["events"].as_array().map(|a| a.len()), Some(0), "{b2}");
    let (st, g) = bob.get(&format!("presence/{}/status", enc(&alice.user_id))).await;
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["presence"], "offline", "{g}");
    assert!(g.get("status_msg").is_none(), "{g}");
}

// An online user who does nothing for `idle_after_ms` (here 1 s) becomes
// unavailable (syncing does not count as doing something); sending an
// event makes them online again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_user_becomes_unavailable_and_sending_brings_them_back() {
    let server = TestServer::builder()
        .env("WEFT_PRESENCE__IDLE_AFTER_MS", "1000")
        .start()
        .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let b0 = bob.sync_params(&[("set_presence", "offline")]).await.1;
    let _ = alice.sync(None, 0).await;
    let state_of = |s: &Value| presence_of(s, &alice.user_id)[0]["content"]["presence"].clone();
    let offline = [("set_presence", "offline")];
    let b1 = sync_until(&bob, &next_batch(&b0), &offline, 3, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    assert_eq!(state_of(&b1), "online", "{b1}");
    let b2 = sync_until(&bob, &next_batch(&b1), &offline, 4, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    assert_eq!(state_of(&b2), "unavailable", "{b2}");
    // Still syncing: still unavailable.
    let _ = alice.sync(None, 0).await;
    let (_, g) = bob.get(&format!("presence/{}/status", enc(&alice.user_id))).await;
    assert_eq!(g["presence"], "unavailable", "{g}");
    alice.send_text(&room, "t1", "back").await;
    let b3 = sync_until(&bob, &next_batch(&b2), &offline, 3, |s| {
        !presence_of(s, &alice.user_id).is_empty()
    })
    .await;
    assert_eq!(state_of(&b3), "online", "{b3}");
    assert_eq!(
        presence_of(&b3, &alice.user_id)[0]["content"]["currently_active"],
        true,
        "{b3}"
    );
}
