//! Rooms, membership, /sync, /messages, power levels and transaction IDs.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TELEMETRY: &str = "org.weft.telemetry";

fn telemetry(i: usize) -> Value {
    json!({"seq": i, "value": format!("{}.5", 20 + i % 7), "unit": "C", "nested": {"ok": true, "n": [i, -1]}})
}

/// Sends `n` telemetry events with txn ids `{prefix}-{i}`; returns their IDs.
async fn send_telemetry(c: &Client, room: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(c.send(room, TELEMETRY, &format!("{prefix}-{i}"), telemetry(i)).await);
    }
    ids
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["content"]["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {e}")))
        .collect()
}

#[track_caller]
fn assert_no_dup(events: &[Value], what: &str) {
    let ids = event_ids(events);
    let set: HashSet<&String> = ids.iter().collect();
    assert_eq!(set.len(), ids.len(), "{what}: duplicate event IDs in {ids:?}");
}

// 1. Invite, see the invite in /sync, join, members lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_join_and_member_lists() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    assert_eq!(alice.user_id, server.user_id("alice"));
    assert_eq!(bob.user_id, server.user_id("bob"));

    let room = alice
        .create_room(json!({"preset": "private_chat", "name": "Greenhouse"}))
        .await;

    // Bob's sync before the invite: the room is nowhere.
    let s0 = bob.sync(None, 0).await;
    let since0 = s0["next_batch"].as_str().expect("next_batch").to_string();
    assert!(
        s0["rooms"]["invite"][&room].is_null(),
        "room visible to bob before invite: {s0}"
    );
    assert!(
        s0["rooms"]["join"][&room].is_null(),
        "room joined by bob before invite: {s0}"
    );

    alice.invite(&room, &bob.user_id).await;

    // Incremental sync shows the invite with stripped state.
    let s1 = bob.sync(Some(&since0), 5000).await;
    let inv = &s1["rooms"]["invite"][&room];
    assert!(inv.is_object(), "invite missing from bob's /sync rooms.invite: {s1}");
    let stripped = inv["invite_state"]["events"]
        .as_array()
        .expect("invite_state.events array")
        .clone();
    let my_member = stripped
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
        .unwrap_or_else(|| panic!("no m.room.member for bob in invite_state: {inv}"));
    assert_eq!(my_member["content"]["membership"], "invite", "{my_member}");
    assert_eq!(my_member["sender"], alice.user_id.as_str(), "{my_member}");
    assert!(
        s1["rooms"]["join"][&room].is_null(),
        "invited room must not be in rooms.join: {s1}"
    );

    // Initial sync also shows the invite.
    let s_init = bob.sync(None, 0).await;
    assert!(
        s_init["rooms"]["invite"][&room].is_object(),
        "invite missing from initial sync: {s_init}"
    );

    let since1 = s1["next_batch"].as_str().expect("next_batch").to_string();
    let joined = bob.join(&room).await;
    assert_eq!(joined, room);

    let s2 = bob.sync(Some(&since1), 5000).await;
    assert!(
        s2["rooms"]["join"][&room].is_object(),
        "joined room missing from rooms.join: {s2}"
    );
    assert!(
        s2["rooms"]["invite"][&room].is_null(),
        "room still listed as invite after join: {s2}"
    );
    // Bob's own join must be visible in the timeline or state of the room.
    let jr = &s2["rooms"]["join"][&room];
    let mut evs = timeline(&s2, &room);
    evs.extend(jr["state"]["events"].as_array().cloned().unwrap_or_default());
    assert!(
        evs.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob.user_id.as_str()
            && e["content"]["membership"] == "join"),
        "bob's join event not in his sync: {jr}"
    );

    // joined_rooms
    let (st, jrooms) = bob.get("joined_rooms").await;
    assert_eq!(st, 200, "{jrooms}");
    assert_eq!(jrooms["joined_rooms"], json!([room]), "{jrooms}");

    // joined_members: exactly alice and bob.
    for who in [&alice, &bob] {
        let (st, jm) = who.get(&format!("rooms/{}/joined_members", enc(&room))).await;
        assert_eq!(st, 200, "{jm}");
        let joined = jm["joined"]
            .as_object()
            .unwrap_or_else(|| panic!("joined not an object: {jm}"));
        let mut keys: Vec<&String> = joined.keys().collect();
        keys.sort();
        let mut want = vec![&alice.user_id, &bob.user_id];
        want.sort();
        assert_eq!(keys, want, "joined_members: {jm}");
    }

    // /members: one current m.room.member per user, both joined.
    let (st, members) = alice.get(&format!("rooms/{}/members", enc(&room))).await;
    assert_eq!(st, 200, "{members}");
    let chunk = members["chunk"]
        .as_array()
        .unwrap_or_else(|| panic!("no chunk: {members}"));
    assert_eq!(chunk.len(), 2, "expected exactly 2 member events: {members}");
    for u in [&alice.user_id, &bob.user_id] {
        let ev = chunk
            .iter()
            .find(|e| e["state_key"] == u.as_str())
            .unwrap_or_else(|| panic!("{u} missing from /members: {members}"));
        assert_eq!(ev["type"], "m.room.member");
        assert_eq!(ev["content"]["membership"], "join", "{ev}");
        assert_eq!(ev["room_id"], room.as_str(), "{ev}");
    }

    // /members?membership=join filter and /members?membership=invite
    let (st, inv_members) = alice
        .get(&format!("rooms/{}/members?membership=invite", enc(&room)))
        .await;
    assert_eq!(st, 200, "{inv_members}");
    assert_eq!(
        inv_members["chunk"].as_array().map(|a| a.len()),
        Some(0),
        "{inv_members}"
    );

    // Alice sees bob's join in her sync too.
    let sa = alice.sync_full(None, 0).await;
    let a_tl = timeline(&sa, &room);
    let mut a_evs = a_tl.clone();
    a_evs.extend(
        sa["rooms"]["join"][&room]["state"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    assert!(
        a_evs.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob.user_id.as_str()
            && e["content"]["membership"] == "join"),
        "alice does not see bob's join: {}",
        sa["rooms"]["join"][&room]
    );
}

// 2. 100 telemetry events arrive via long-poll /sync in order, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_stream_via_long_poll_sync_in_order_once() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;

    let s0 = bob.sync_full(None, 0).await;
    let mut since = s0["next_batch"].as_str().expect("next_batch").to_string();
    assert!(of_type(&timeline(&s0, &room), TELEMETRY).is_empty());

    let sender = alice.clone();
    let r = room.clone();
    let send_task = tokio::spawn(async move { send_telemetry(&sender, &r, "tele", 100).await });

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got: Vec<Value> = Vec::new();
    let mut polls = 0;
    while got.len() < 100 && Instant::now() < deadline {
        let s = bob.sync_full(Some(&since), 10_000).await;
        polls += 1;
        let jr = &s["rooms"]["join"][&room];
        if jr.is_object() {
            assert_ne!(
                jr["timeline"]["limited"],
                json!(true),
                "timeline limited although filter limit (500) exceeds events sent: events were skipped"
            );
        }
        got.extend(of_type(&timeline(&s, &room), TELEMETRY));
        since = s["next_batch"]
            .as_str()
            .unwrap_or_else(|| panic!("no next_batch: {s}"))
            .to_string();
    }
    let sent_ids = send_task.await.expect("sender task");
    assert_eq!(
        got.len(),
        100,
        "bob received {} of 100 telemetry events in {polls} polls",
        got.len()
    );
    assert_no_dup(&got, "sync stream");
    assert_eq!(
        event_ids(&got),
        sent_ids,
        "events arrived out of order or with different IDs"
    );
    for (i, ev) in got.iter().enumerate() {
        assert_eq!(ev["content"], telemetry(i), "content of seq {i} changed in transit");
        assert_eq!(ev["type"], TELEMETRY);
        assert_eq!(ev["sender"], alice.user_id.as_str());
        assert!(ev["origin_server_ts"].is_u64(), "origin_server_ts missing: {ev}");
    }

    // Nothing more arrives: no duplicates later.
    let s = bob.sync_full(Some(&since), 0).await;
    let extra = of_type(&timeline(&s, &room), TELEMETRY);
    assert!(extra.is_empty(), "events delivered again after next_batch: {extra:?}");

    // Re-using an old token gives the same events again (tokens are positions).
    let replay = bob.sync_full(Some(s0["next_batch"].as_str().unwrap()), 0).await;
    let replay_ev = of_type(&timeline(&replay, &room), TELEMETRY);
    assert_eq!(
        event_ids(&replay_ev),
        sent_ids,
        "sync from the first token does not replay the 100 events in order"
    );
}

// 2b. A long-poll started before a send returns promptly with the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_promptly_on_send() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;

    let s0 = bob.sync_full(None, 0).await;
    let s1 = bob.sync_full(s0["next_batch"].as_str(), 0).await;
    let mut since = s1["next_batch"].as_str().expect("next_batch").to_string();

    for round in 0..3 {
        let b = bob.clone();
        let since_c = since.clone();
        let poll = tokio::spawn(async move {
            let r = b.sync_full(Some(&since_c), 10_000).await;
            (r, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !poll.is_finished(),
            "round {round}: long-poll with timeout=10000 returned before anything was sent (not long-polling)"
        );
        let t_send = Instant::now();
        let eid = alice
            .send(&room, TELEMETRY, &format!("lp-{round}"), telemetry(round))
            .await;
        let (resp, t_done) = poll.await.expect("poll task");
        let latency = t_done.saturating_duration_since(t_send);
        assert!(
            latency < Duration::from_secs(2),
            "round {round}: long-poll returned {latency:?} after the send"
        );
        let evs = of_type(&timeline(&resp, &room), TELEMETRY);
        assert_eq!(
            event_ids(&evs),
            vec![eid.clone()],
            "round {round}: woken sync should carry exactly the new event: {resp}"
        );
        assert_eq!(evs[0]["content"], telemetry(round));
        since = resp["next_batch"].as_str().expect("next_batch").to_string();
    }

    // A long-poll with nothing to deliver waits for (about) its timeout.
    let t0 = Instant::now();
    let r = bob.sync_full(Some(&since), 1500).await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1300),
        "empty long-poll returned after only {waited:?}: {r}"
    );
    assert!(
        waited < Duration::from_secs(6),
        "empty long-poll of 1500ms took {waited:?}"
    );
    assert!(of_type(&timeline(&r, &room), TELEMETRY).is_empty(), "{r}");
}

async fn paginate(c: &Client, room: &str, from: Option<&str>, dir: &str, limit: u32) -> (Vec<Value>, Vec<Value>) {
    // Returns (all events in the order received, the pages).
    let mut all = Vec::new();
    let mut pages = Vec::new();
    let mut from = from.map(str::to_string);
    for _ in 0..200 {
        let page = c.messages(room, from.as_deref(), dir, limit).await;
        assert!(page["start"].is_string(), "/messages response without `start`: {page}");
        let chunk = page["chunk"]
            .as_array()
            .unwrap_or_else(|| panic!("/messages without chunk: {page}"))
            .clone();
        assert!(
            chunk.len() <= limit as usize,
            "chunk of {} exceeds limit {limit}",
            chunk.len()
        );
        if let Some(f) = &from {
            // `start` echoes the `from` token.
            assert_eq!(page["start"].as_str(), Some(f.as_str()), "start should equal from");
        }
        let empty = chunk.is_empty();
        all.extend(chunk);
        pages.push(page.clone());
        match page["end"].as_str() {
            Some(e) if !empty => from = Some(e.to_string()),
            _ => return (all, pages),
        }
    }
    panic!("/messages dir={dir} did not reach the end of history in 200 pages");
}

// 3. /messages pagination backwards and forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_paginate_backwards_and_forwards() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let sent = send_telemetry(&alice, &room, "m", 100).await;

    // (a) From a sync with timeline limit 5: the timeline holds seq 95..99
    // and paginating back from prev_batch yields 94..0 with no overlap.
    let (st, s) = bob
        .sync_params(&[("timeout", "0"), ("filter", r#"{"room":{"timeline":{"limit":5}}}"#)])
        .await;
    assert_eq!(st, 200, "{s}");
    let tl = timeline(&s, &room);
    assert_eq!(
        tl.len(),
        5,
        "timeline limit 5 not honoured: {}",
        s["rooms"]["join"][&room]
    );
    assert_eq!(seqs(&of_type(&tl, TELEMETRY)), vec![95, 96, 97, 98, 99]);
    assert_eq!(
        s["rooms"]["join"][&room]["timeline"]["limited"],
        json!(true),
        "timeline should be limited"
    );
    let prev_batch = s["rooms"]["join"][&room]["timeline"]["prev_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("no prev_batch in limited timeline: {}", s["rooms"]["join"][&room]))
        .to_string();
    let (back_a, _) = paginate(&bob, &room, Some(&prev_batch), "b", 10).await;
    let mut combined = tl.clone();
    combined.extend(back_a.iter().cloned());
    assert_no_dup(&combined, "sync timeline + backwards pagination from prev_batch");
    let tele_a = of_type(&back_a, TELEMETRY);
    assert_eq!(
        seqs(&tele_a),
        (0..95).rev().collect::<Vec<u64>>(),
        "backwards from prev_batch"
    );
    assert_eq!(
        back_a.last().unwrap()["type"],
        "m.room.create",
        "history should end at m.room.create"
    );

    // (b) Backwards from a sync next_batch, limit 10: all 100, reverse order.
    let s2 = bob.sync(None, 0).await;
    let nb = s2["next_batch"].as_str().unwrap().to_string();
    let (back, back_pages) = paginate(&bob, &room, Some(&nb), "b", 10).await;
    assert_no_dup(&back, "backwards pagination");
    let tele_b = of_type(&back, TELEMETRY);
    assert_eq!(seqs(&tele_b), (0..100).rev().collect::<Vec<u64>>());
    let mut rev_sent = sent.clone();
    rev_sent.reverse();
    assert_eq!(event_ids(&tele_b), rev_sent);
    for (i, ev) in tele_b.iter().enumerate() {
        assert_eq!(ev["content"], telemetry(99 - i));
    }
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
    assert!(
        back_pages.len() >= 11,
        "100+ events with limit 10 need at least 11 pages, got {}",
        back_pages.len()
    );
    let last = back_pages.last().unwrap();
    assert!(
        last["end"].is_null() || last["chunk"].as_array().is_some_and(|c| c.is_empty()),
        "end of history must omit `end` or return an empty chunk: {last}"
    );
    // Once at the start, asking again must return nothing new.
    if let Some(end) = back_pages.iter().rev().find_map(|p| p["end"].as_str()) {
        let again = bob.messages(&room, Some(end), "b", 10).await;
        let again_chunk = again["chunk"].as_array().cloned().unwrap_or_default();
        let again_ids: HashSet<String> = event_ids(&again_chunk).into_iter().collect();
        let seen_tail: HashSet<String> = event_ids(&back[back.len().saturating_sub(10)..]).into_iter().collect();
        assert!(
            again_ids.is_subset(&seen_tail),
            "paginating past the end returned new events: {again}"
        );
    }

    // (c) Forwards from the start of the room (no `from`): chronological.
    let (fwd, fwd_pages) = paginate(&bob, &room, None, "f", 10).await;
    assert_no_dup(&fwd, "forward pagination");
    assert_eq!(
        fwd.first().unwrap()["type"],
        "m.room.create",
        "forward pagination must begin at m.room.create"
    );
    let tele_f = of_type(&fwd, TELEMETRY);
    assert_eq!(event_ids(&tele_f), sent, "forward pagination order");
    let mut back_rev = event_ids(&back);
    back_rev.reverse();
    assert_eq!(
        event_ids(&fwd),
        back_rev,
        "forward and backward pagination disagree on history"
    );
    let lastf = fwd_pages.last().unwrap();
    assert!(
        lastf["end"].is_null() || lastf["chunk"].as_array().is_some_and(|c| c.is_empty()),
        "end of forward history must omit `end` or return an empty chunk: {lastf}"
    );

    // (d) Tokens are positions: forward from the `end` of backward page 3
    // returns that page's events again, in chronological order.
    let p3 = &back_pages[2];
    let p3_end = p3["end"].as_str().expect("page 3 has end");
    let mut p3_ids = event_ids(p3["chunk"].as_array().unwrap());
    p3_ids.reverse();
    let fw = bob.messages(&room, Some(p3_end), "f", 10).await;
    let fw_ids = event_ids(fw["chunk"].as_array().unwrap());
    assert_eq!(
        fw_ids, p3_ids,
        "forward from a backward `end` token should replay that page in chronological order"
    );

    // (e) Forward from a sync next_batch: nothing after the present.
    let at_end = bob.messages(&room, Some(&nb), "f", 10).await;
    assert_eq!(
        at_end["chunk"].as_array().map(|c| c.len()),
        Some(0),
        "forward from next_batch: {at_end}"
    );
}

// 3b. /event/{eventId} and /context/{eventId}.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_and_context_endpoints() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let ids = send_telemetry(&alice, &room, "c", 20).await;

    let (st, ev) = bob.get(&format!("rooms/{}/event/{}", enc(&room), enc(&ids[10]))).await;
    assert_eq!(st, 200, "{ev}");
    assert_eq!(ev["event_id"], ids[10].as_str());
    assert_eq!(ev["type"], TELEMETRY);
    assert_eq!(ev["content"], telemetry(10));
    assert_eq!(ev["sender"], alice.user_id.as_str());
    assert_eq!(ev["room_id"], room.as_str());
    assert!(ev["origin_server_ts"].is_u64(), "{ev}");

    let (st, missing) = bob
        .get(&format!("rooms/{}/event/{}", enc(&room), enc("$doesnotexist")))
        .await;
    assert_err(&(st, missing), 404, "M_NOT_FOUND");

    let (st, ctx) = bob
        .get(&format!("rooms/{}/context/{}?limit=4", enc(&room), enc(&ids[10])))
        .await;
    assert_eq!(st, 200, "{ctx}");
    assert_eq!(ctx["event"]["event_id"], ids[10].as_str(), "{ctx}");
    assert_eq!(ctx["event"]["content"], telemetry(10));
    let before = ctx["events_before"]
        .as_array()
        .unwrap_or_else(|| panic!("no events_before: {ctx}"));
    let after = ctx["events_after"]
        .as_array()
        .unwrap_or_else(|| panic!("no events_after: {ctx}"));
    assert!(
        before.len() + after.len() <= 4,
        "limit=4 applies to before+after: {ctx}"
    );
    assert!(
        !before.is_empty() && !after.is_empty(),
        "expected context on both sides: {ctx}"
    );
    // events_before is reverse-chronological, events_after chronological.
    for (k, e) in before.iter().enumerate() {
        assert_eq!(e["event_id"], ids[9 - k].as_str(), "events_before[{k}]");
    }
    for (k, e) in after.iter().enumerate() {
        assert_eq!(e["event_id"], ids[11 + k].as_str(), "events_after[{k}]");
    }
    assert!(
        ctx["start"].is_string() && ctx["end"].is_string(),
        "context needs start/end tokens: {ctx}"
    );

    // Paginating backwards from the context `start` continues before events_before.
    let page = bob.messages(&room, ctx["start"].as_str(), "b", 3).await;
    let next_before = 9 - before.len();
    assert_eq!(
        page["chunk"][0]["event_id"],
        ids[next_before].as_str(),
        "backwards from context.start should continue right before events_before: {page}"
    );
    // And forwards from `end` continues after events_after.
    let page = bob.messages(&room, ctx["end"].as_str(), "f", 3).await;
    let next_after = 11 + after.len();
    assert_eq!(
        page["chunk"][0]["event_id"],
        ids[next_after].as_str(),
        "forwards from context.end: {page}"
    );
}

// 3c. `dir` may be left out of /messages and means backwards (the talk's
// CoAP examples and CoAP Observe on /messages send none); without `limit`
// the filter's limit applies; /context at the newest event still lists
// `events_after` (empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_dir_reads_backwards() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let ids = send_telemetry(&alice, &room, "nd", 6).await;
    let r = enc(&room);

    let (st, page) = alice.get(&format!("rooms/{r}/messages?limit=3")).await;
    assert_eq!(st, 200, "{page}");
    let chunk = page["chunk"].as_array().unwrap_or_else(|| panic!("no chunk: {page}"));
    assert_eq!(
        event_ids(chunk),
        vec![ids[5].clone(), ids[4].clone(), ids[3].clone()],
        "no dir: the newest events, newest first: {page}"
    );
    assert_eq!(seqs(chunk), vec![5, 4, 3]);
    assert!(page["start"].is_string() && page["end"].is_string(), "{page}");
    // The next page without `dir` continues backwards from `end`.
    let end = page["end"].as_str().unwrap_or_default();
    let (st, next) = alice
        .get(&format!("rooms/{r}/messages?limit=2&from={}", enc(end)))
        .await;
    assert_eq!(st, 200, "{next}");
    assert_eq!(
        event_ids(next["chunk"].as_array().unwrap_or(&vec![])),
        vec![ids[2].clone(), ids[1].clone()],
        "{next}"
    );
    // Explicit `dir=b` answers the same as none.
    let (_, explicit) = alice.get(&format!("rooms/{r}/messages?limit=3&dir=b")).await;
    assert_eq!(
        event_ids(explicit["chunk"].as_array().unwrap_or(&vec![])),
        event_ids(chunk),
        "{explicit}"
    );

    // No `limit`: the filter's limit (2) applies; its types too.
    let filter = enc(&json!({"limit": 2, "types": [TELEMETRY]}).to_string());
    let (st, page) = alice.get(&format!("rooms/{r}/messages?filter={filter}")).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(seqs(page["chunk"].as_array().unwrap_or(&vec![])), vec![5, 4], "{page}");
    // A `limit` in the query wins over the filter's.
    let (st, page) = alice.get(&format!("rooms/{r}/messages?filter={filter}&limit=4")).await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(
        seqs(page["chunk"].as_array().unwrap_or(&vec![])),
        vec![5, 4, 3, 2],
        "{page}"
    );

    // /context at the newest event: `events_after` is there, empty.
    let (st, ctx) = alice.get(&format!("rooms/{r}/context/{}?limit=2", enc(&ids[5]))).await;
    assert_eq!(st, 200, "{ctx}");
    assert_eq!(ctx["event"]["event_id"], ids[5].as_str(), "{ctx}");
    assert_eq!(ctx["events_after"], json!([]), "{ctx}");
    assert_eq!(
        event_ids(ctx["events_before"].as_array().unwrap_or(&vec![])),
        vec![ids[4].clone()],
        "{ctx}"
    );
    assert!(ctx["state"].as_array().is_some_and(|s| !s.is_empty()), "{ctx}");
}

// 5. Power levels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_levels_gate_state_changes() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let name_path = format!("rooms/{}/state/m.room.name", enc(&room));
    let pl_path = format!("rooms/{}/state/m.room.power_levels", enc(&room));

    let (st, pl) = bob.get(&pl_path).await;
    assert_eq!(st, 200, "{pl}");
    assert_eq!(pl["users"][&alice.user_id], 100, "creator should have PL 100: {pl}");
    assert!(
        pl["users"][&bob.user_id].is_null() || pl["users"][&bob.user_id] == 0,
        "{pl}"
    );

    // No name yet.
    let got = bob.get(&name_path).await;
    assert_err(&got, 404, "M_NOT_FOUND");

    let got = bob.put(&name_path, json!({"name": "bob was here"})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = bob.get(&name_path).await;
    assert_eq!(got.0, 404, "forbidden state change must not take effect: {}", got.1);

    let (st, r) = alice.put(&name_path, json!({"name": "Sensor lab"})).await;
    assert_eq!(st, 200, "{r}");
    assert!(r["event_id"].is_string(), "{r}");
    let (st, name) = bob.get(&name_path).await;
    assert_eq!(st, 200, "{name}");
    assert_eq!(name, json!({"name": "Sensor lab"}));

    // Bob may still talk.
    let eid = bob.send_text(&room, "b1", "still allowed to talk").await;
    let all = alice.all_messages(&room).await;
    let msgs = of_type(&all, "m.room.message");
    assert_eq!(event_ids(&msgs), vec![eid], "{msgs:?}");

    // Bob cannot raise himself.
    let mut pl2 = pl.clone();
    pl2["users"][&bob.user_id] = json!(100);
    let got = bob.put(&pl_path, pl2).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Nor kick alice.
    let got = bob
        .post(&format!("rooms/{}/kick", enc(&room)), json!({"user_id": alice.user_id}))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // Alice raises bob to 50 (state_default of private_chat): now he can rename.
    let mut pl3 = pl.clone();
    pl3["users"][&bob.user_id] = json!(50);
    let (st, r) = alice.put(&pl_path, pl3).await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = bob.put(&name_path, json!({"name": "Bob's lab"})).await;
    assert_eq!(st, 200, "bob at PL 50 should be able to set the name: {r}");
    let (_, name) = alice.get(&name_path).await;
    assert_eq!(name["name"], "Bob's lab");
    // ...but still not touch power levels (100 needed).
    let mut pl4 = pl.clone();
    pl4["users"][&bob.user_id] = json!(100);
    let got = bob.put(&pl_path, pl4).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // Custom state with an empty state key: the trailing slash is optional.
    let (st, r) = alice
        .put(
            &format!("rooms/{}/state/org.weft.config/", enc(&room)),
            json!({"threshold": 5}),
        )
        .await;
    assert_eq!(st, 200, "PUT state with trailing slash: {r}");
    let (st, cfg) = bob.get(&format!("rooms/{}/state/org.weft.config", enc(&room))).await;
    assert_eq!((st, cfg), (200, json!({"threshold": 5})));
    let (st, cfg) = bob.get(&format!("rooms/{}/state/org.weft.config/", enc(&room))).await;
    assert_eq!((st, cfg), (200, json!({"threshold": 5})));
    // The full state lists it once, with the latest name.
    let (st, state) = bob.get(&format!("rooms/{}/state", enc(&room))).await;
    assert_eq!(st, 200, "{state}");
    let state = state
        .as_array()
        .unwrap_or_else(|| panic!("/state must be an array: {state}"))
        .clone();
    let names: Vec<&Value> = state.iter().filter(|e| e["type"] == "m.room.name").collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(names[0]["content"]["name"], "Bob's lab");
    assert_eq!(state.iter().filter(|e| e["type"] == "org.weft.config").count(), 1);
    assert_eq!(state.iter().filter(|e| e["type"] == "m.room.create").count(), 1);
}

// 6. Transaction IDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_ids_are_idempotent_per_device() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    let content = json!({"msgtype": "m.text", "body": "exactly once"});
    let e1 = alice.send(&room, "m.room.message", "txn-1", content.clone()).await;
    let e2 = alice.send(&room, "m.room.message", "txn-1", content.clone()).await;
    assert_eq!(e1, e2, "retrying a txnId must return the original event_id");

    let msgs = of_type(&alice.all_messages(&room).await, "m.room.message");
    assert_eq!(
        event_ids(&msgs),
        vec![e1.clone()],
        "a retried txnId created a second event"
    );

    // A different txnId is a different event.
    let e3 = alice.send(&room, "m.room.message", "txn-2", content.clone()).await;
    assert_ne!(e3, e1);

    // The same txnId from another device (second login) is a new event.
    let alice2 = server.login("alice", &alice.password).await;
    assert_ne!(
        alice2.device_id, alice.device_id,
        "second login should create a new device"
    );
    let e4 = alice2.send(&room, "m.room.message", "txn-1", content.clone()).await;
    assert_ne!(e4, e1, "txnId scope is per device: another device must get a new event");
    let e5 = alice2.send(&room, "m.room.message", "txn-1", content.clone()).await;
    assert_eq!(e5, e4, "retry on the second device must be idempotent too");
    // And the first device's txn still maps to its own event.
    let e6 = alice.send(&room, "m.room.message", "txn-1", content.clone()).await;
    assert_eq!(e6, e1);

    let msgs = of_type(&alice.all_messages(&room).await, "m.room.message");
    assert_eq!(
        event_ids(&msgs),
        vec![e1.clone(), e3.clone(), e4.clone()],
        "exactly three events expected"
    );

    // unsigned.transaction_id is shown only to the device that sent it.
    let s = alice.sync_full(None, 0).await;
    let tl = of_type(&timeline(&s, &room), "m.room.message");
    let find = |tl: &[Value], id: &str| {
        tl.iter()
            .find(|e| e["event_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in sync"))
    };
    assert_eq!(
        find(&tl, &e1)["unsigned"]["transaction_id"],
        "txn-1",
        "sending device should see unsigned.transaction_id"
    );
    assert!(
        find(&tl, &e4)["unsigned"]["transaction_id"].is_null(),
        "another device's txn id leaked to alice's first device"
    );
    let s2 = alice2.sync_full(None, 0).await;
    let tl2 = of_type(&timeline(&s2, &room), "m.room.message");
    assert_eq!(find(&tl2, &e4)["unsigned"]["transaction_id"], "txn-1");
    assert!(
        find(&tl2, &e1)["unsigned"]["transaction_id"].is_null(),
        "device 1's txn id leaked to device 2"
    );
}

// Concurrent senders while a client long-polls: no event is skipped or
// duplicated across next_batch boundaries, and sync order matches /messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_no_event_skipped_by_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "public_chat").await;
    let mut senders = Vec::new();
    for name in ["s0", "s1", "s2", "s3"] {
        let c = server.register(name).await;
        c.join(&room).await;
        senders.push(c);
    }
    let s0 = bob.sync_full(None, 0).await;
    let mut since = s0["next_batch"].as_str().unwrap().to_string();

    const PER: usize = 50;
    let handles: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let c = c.clone();
            let room = room.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER {
                    ids.push(
                        c.send(&room, TELEMETRY, &format!("c{k}-{i}"), json!({"k": k, "seq": i}))
                            .await,
                    );
                }
                ids
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got: Vec<Value> = Vec::new();
    while got.len() < 4 * PER && Instant::now() < deadline {
        let s = bob.sync_full(Some(&since), 2000).await;
        assert_ne!(
            s["rooms"]["join"][&room]["timeline"]["limited"],
            json!(true),
            "unexpected gap"
        );
        got.extend(of_type(&timeline(&s, &room), TELEMETRY));
        since = s["next_batch"].as_str().unwrap().to_string();
    }
    let mut acked: Vec<String> = Vec::new();
    let mut per_sender: Vec<Vec<String>> = Vec::new();
    for h in handles {
        let ids = h.await.unwrap();
        acked.extend(ids.iter().cloned());
        per_sender.push(ids);
    }
    // One more sync to catch stragglers (and prove nothing arrives twice).
    let s = bob.sync_full(Some(&since), 500).await;
    got.extend(of_type(&timeline(&s, &room), TELEMETRY));

    assert_no_dup(&got, "concurrent sync stream");
    let got_ids: HashSet<String> = event_ids(&got).into_iter().collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !got_ids.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events never reached bob's sync: {missing:?}",
        missing.len()
    );
    assert_eq!(got.len(), 4 * PER);

    // Per sender, events arrive in send order.
    for (k, ids) in per_sender.iter().enumerate() {
        let order: Vec<String> = event_ids(&got).into_iter().filter(|id| ids.contains(id)).collect();
        assert_eq!(&order, ids, "sender {k}: sync order differs from send order");
    }
    // The sync stream and /messages agree on the room's order.
    let hist: Vec<String> = event_ids(&of_type(&bob.all_messages(&room).await, TELEMETRY));
    assert_eq!(event_ids(&got), hist, "sync order and /messages order disagree");
}

// 8. State with the empty state key at both path forms (with and without
// the trailing slash), `?format=event`, every version prefix; and the
// `api/v1` send without a transaction ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_state_key_paths_and_send_without_txn() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let r = enc(&room);
    let bare = format!("rooms/{r}/state/org.weft.config");
    let slash = format!("{bare}/");

    let (st, first) = alice.put(&bare, json!({"v": 1})).await;
    assert_eq!(st, 200, "PUT without the trailing slash: {first}");
    let (st, got) = alice.get(&slash).await;
    assert_eq!((st, got), (200, json!({"v": 1})));
    let (st, second) = alice.put(&slash, json!({"v": 2})).await;
    assert_eq!(st, 200, "PUT with the trailing slash: {second}");
    assert_ne!(first["event_id"], second["event_id"]);
    // A non-empty key is another state entry.
    let (st, r3) = alice.put(&format!("{bare}/k"), json!({"v": 3})).await;
    assert_eq!(st, 200, "{r3}");
    for path in [&bare, &slash] {
        let (st, got) = alice.get(path).await;
        assert_eq!((st, got), (200, json!({"v": 2})), "{path}");
        let (st, ev) = alice.get(&format!("{path}?format=event")).await;
        assert_eq!(st, 200, "{ev}");
        assert_eq!(ev["type"], "org.weft.config", "{ev}");
        assert_eq!(ev["state_key"], "", "{ev}");
        assert_eq!(ev["event_id"], second["event_id"], "{ev}");
        assert_eq!(ev["sender"], alice.user_id.as_str(), "{ev}");
        assert_eq!(ev["room_id"], room.as_str(), "{ev}");
        assert_eq!(ev["content"], json!({"v": 2}), "{ev}");
        assert!(ev.get("signatures").is_none() && ev.get("hashes").is_none(), "{ev}");
    }
    let (st, got) = alice.get(&format!("{bare}/k")).await;
    assert_eq!((st, got), (200, json!({"v": 3})));
    // Under the r0 and api/v1 prefixes too.
    for prefix in ["/_matrix/client/r0", "/_matrix/client/api/v1"] {
        let (st, got) = alice.get(&format!("{prefix}/{bare}")).await;
        assert_eq!((st, got), (200, json!({"v": 2})), "{prefix}");
        let (st, got) = alice.get(&format!("{prefix}/{slash}")).await;
        assert_eq!((st, got), (200, json!({"v": 2})), "{prefix} with slash");
    }
    // Not in the room: no state.
    assert_err(&bob.get(&bare).await, 403, "M_FORBIDDEN");
    assert_err(&bob.put(&slash, json!({"v": 9})).await, 403, "M_FORBIDDEN");
    // Bad content.
    let got = alice
        .request_raw(reqwest::Method::PUT, &bare, "application/json", b"[1]".to_vec())
        .await;
    assert_err(&got, 400, "M_BAD_JSON");

    // The send without a transaction ID: each request is a new event.
    let send = format!("/_matrix/client/api/v1/rooms/{r}/send/{TELEMETRY}");
    let (st, a) = alice.post(&send, json!({"seq": 1})).await;
    assert_eq!(st, 200, "{a}");
    let (st, b) = alice.post(&send, json!({"seq": 1})).await;
    assert_eq!(st, 200, "{b}");
    assert_ne!(a["event_id"], b["event_id"]);
    let (st, c) = alice
        .post(&format!("rooms/{r}/send/{TELEMETRY}"), json!({"seq": 2}))
        .await;
    assert_eq!(st, 200, "the same under v3: {c}");
    let sent = of_type(&alice.all_messages(&room).await, TELEMETRY);
    assert_eq!(seqs(&sent), vec![1, 1, 2]);
    assert_eq!(
        event_ids(&sent),
        vec![
            a["event_id"].as_str().unwrap(),
            b["event_id"].as_str().unwrap(),
            c["event_id"].as_str().unwrap()
        ]
    );
    assert_err(&bob.post(&send, json!({"seq": 3})).await, 403, "M_FORBIDDEN");
    assert_err(
        &server.anon().post(&send, json!({"seq": 3})).await,
        401,
        "M_MISSING_TOKEN",
    );
    let got = alice
        .request_raw(reqwest::Method::POST, &send, "application/json", b"\"text\"".to_vec())
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    assert_err(&alice.get(&send).await, 405, "M_UNRECOGNIZED");
}

// 9. Every /createRoom option, and the public room directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room_options_and_public_rooms() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice
        .create_room(json!({
            "visibility": "public",
            "name": "Lab",
            "topic": "Sensors",
            "room_alias_name": "lab",
            "room_version": "11",
            "invite": [bob.user_id],
            "is_direct": true,
            "creation_content": {"org.weft.kind": "lab"},
            "power_level_content_override": {"events_default": 50},
            "initial_state": [{"type": "org.weft.config", "content": {"x": 1}}],
        }))
        .await;
    let r = enc(&room);
    let state = |t: &str, k: &str| format!("rooms/{r}/state/{t}/{}", enc(k));
    let (_, create) = alice.get(&state("m.room.create", "")).await;
    assert_eq!(create["room_version"], "11", "{create}");
    assert_eq!(create["org.weft.kind"], "lab", "{create}");
    let (_, name) = alice.get(&state("m.room.name", "")).await;
    assert_eq!(name, json!({"name": "Lab"}));
    let (_, topic) = alice.get(&state("m.room.topic", "")).await;
    assert_eq!(topic["topic"], "Sensors", "{topic}");
    let alias = format!("#lab:{}", server.server_name);
    let (_, ca) = alice.get(&state("m.room.canonical_alias", "")).await;
    assert_eq!(ca["alias"], alias.as_str(), "{ca}");
    let (_, pl) = alice.get(&state("m.room.power_levels", "")).await;
    assert_eq!(pl["events_default"], 50, "{pl}");
    assert_eq!(pl["users"][&alice.user_id], 100, "{pl}");
    // No preset: a public room gets public_chat's join rule.
    let (_, jr) = alice.get(&state("m.room.join_rules", "")).await;
    assert_eq!(jr["join_rule"], "public", "{jr}");
    let (_, cfg) = alice.get(&state("org.weft.config", "")).await;
    assert_eq!(cfg, json!({"x": 1}));
    let (_, member) = alice.get(&state("m.room.member", &bob.user_id)).await;
    assert_eq!(member["membership"], "invite", "{member}");
    assert_eq!(member["is_direct"], true, "{member}");

    // Only the public room is in the directory; anyone may read it.
    alice
        .create_room(json!({"preset": "private_chat", "name": "Hidden"}))
        .await;
    let (st, dir) = server.anon().get("publicRooms").await;
    assert_eq!(st, 200, "{dir}");
    let chunk = dir["chunk"].as_array().unwrap_or_else(|| panic!("{dir}"));
    assert_eq!(chunk.len(), 1, "{dir}");
    assert_eq!(dir["total_room_count_estimate"], 1, "{dir}");
    let entry = &chunk[0];
    assert_eq!(entry["room_id"], room.as_str(), "{dir}");
    assert_eq!(entry["name"], "Lab", "{dir}");
    assert_eq!(entry["topic"], "Sensors", "{dir}");
    assert_eq!(entry["canonical_alias"], alias.as_str(), "{dir}");
    assert_eq!(entry["num_joined_members"], 1, "{dir}");
    assert_eq!(entry["world_readable"], false, "{dir}");
    assert_eq!(entry["guest_can_join"], false, "{dir}");
    // "public" is the default the spec lets servers leave out.
    assert!(entry["join_rule"].is_null() || entry["join_rule"] == "public", "{dir}");
    bob.join(&room).await;
    let (_, dir) = alice.get("/_matrix/client/r0/publicRooms").await;
    assert_eq!(dir["chunk"][0]["num_joined_members"], 2, "{dir}");
}
