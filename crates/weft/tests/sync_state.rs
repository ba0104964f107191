//! /sync state sections, gappy syncs, membership transitions, filters and
//! redactions.

mod common;

use common::*;
use serde_json::{Value, json};

fn state_events(sync: &Value, section: &str, room: &str) -> Vec<Value> {
    sync["rooms"][section][room]["state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn find_state<'a>(events: &'a [Value], ty: &str, key: &str) -> Option<&'a Value> {
    events.iter().rev().find(|e| e["type"] == ty && e["state_key"] == key)
}

fn bodies(events: &[Value]) -> Vec<String> {
    of_type(events, "m.room.message")
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or("").to_string())
        .collect()
}

const LIMIT5: &str = r#"{"room":{"timeline":{"limit":5}}}"#;

// Initial sync with a limited timeline: `state` is the state at the start of
// the timeline, so everything set earlier must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_state_covers_events_before_timeline() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let (st, _) = alice
        .put(
            &format!("rooms/{}/state/m.room.name", enc(&room)),
            json!({"name": "Early name"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .put(
            &format!("rooms/{}/state/m.room.topic", enc(&room)),
            json!({"topic": "sensors"}),
        )
        .await;
    assert_eq!(st, 200);
    for i in 0..20 {
        alice.send_text(&room, &format!("m{i}"), &format!("msg-{i}")).await;
    }

    let (st, s) = bob.sync_params(&[("timeout", "0"), ("filter", LIMIT5)]).await;
    assert_eq!(st, 200, "{s}");
    let tl = timeline(&s, &room);
    assert_eq!(bodies(&tl), vec!["msg-15", "msg-16", "msg-17", "msg-18", "msg-19"]);
    assert_eq!(s["rooms"]["join"][&room]["timeline"]["limited"], json!(true));
    let state = state_events(&s, "join", &room);
    for (ty, key) in [
        ("m.room.create", ""),
        ("m.room.power_levels", ""),
        ("m.room.join_rules", ""),
        ("m.room.history_visibility", ""),
        ("m.room.name", ""),
        ("m.room.topic", ""),
        ("m.room.member", alice.user_id.as_str()),
        ("m.room.member", bob.user_id.as_str()),
    ] {
        assert!(
            find_state(&state, ty, key).is_some(),
            "initial sync `state` lacks {ty}/{key} although it was set before the timeline: {state:?}"
        );
    }
    assert_eq!(
        find_state(&state, "m.room.name", "").unwrap()["content"]["name"],
        "Early name"
    );
    assert_eq!(
        find_state(&state, "m.room.member", &bob.user_id).unwrap()["content"]["membership"],
        "join"
    );
    // State events carry their identity.
    for e in &state {
        assert!(
            e["event_id"].is_string() && e["sender"].is_string() && e["state_key"].is_string(),
            "{e}"
        );
    }
}

// Incremental sync with more new events than the limit: state changes in the
// gap (before the timeline window) must be reported in `state`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gappy_incremental_sync_reports_state_changes_in_gap() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let (st, s0) = bob.sync_params(&[("timeout", "0"), ("filter", LIMIT5)]).await;
    assert_eq!(st, 200);
    let since = s0["next_batch"].as_str().unwrap().to_string();

    let (st, r) = alice
        .put(
            &format!("rooms/{}/state/m.room.name", enc(&room)),
            json!({"name": "Renamed in gap"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let name_id = r["event_id"].as_str().unwrap().to_string();
    for i in 0..10 {
        alice.send_text(&room, &format!("g{i}"), &format!("gap-{i}")).await;
    }

    let (st, s) = bob
        .sync_params(&[("timeout", "0"), ("filter", LIMIT5), ("since", &since)])
        .await;
    assert_eq!(st, 200, "{s}");
    let jr = &s["rooms"]["join"][&room];
    assert_eq!(
        bodies(&timeline(&s, &room)),
        vec!["gap-5", "gap-6", "gap-7", "gap-8", "gap-9"]
    );
    assert_eq!(
        jr["timeline"]["limited"],
        json!(true),
        "gappy timeline must be limited: {jr}"
    );
    let state = state_events(&s, "join", &room);
    let name = find_state(&state, "m.room.name", "")
        .unwrap_or_else(|| panic!("name change in the gap missing from incremental `state`: {jr}"));
    assert_eq!(name["event_id"], name_id.as_str());
    assert_eq!(name["content"]["name"], "Renamed in gap");

    // Filling the gap from prev_batch reaches exactly back to `since`.
    let pb = jr["timeline"]["prev_batch"].as_str().expect("prev_batch");
    let page = bob.messages(&room, Some(pb), "b", 20).await;
    let chunk = page["chunk"].as_array().unwrap().clone();
    let mut back_bodies = bodies(&chunk);
    back_bodies.truncate(5);
    assert_eq!(back_bodies, vec!["gap-4", "gap-3", "gap-2", "gap-1", "gap-0"]);
    let pos = chunk.iter().position(|e| e["event_id"] == name_id.as_str());
    assert_eq!(
        pos,
        Some(5),
        "the name change should come right before gap-0 when paginating back"
    );

    // full_state=true returns the complete state even without changes.
    let next = s["next_batch"].as_str().unwrap();
    let (st, full) = bob
        .sync_params(&[("timeout", "0"), ("since", next), ("full_state", "true")])
        .await;
    assert_eq!(st, 200);
    let st_full = state_events(&full, "join", &room);
    assert!(
        find_state(&st_full, "m.room.create", "").is_some(),
        "full_state=true without m.room.create: {full}"
    );
    assert!(find_state(&st_full, "m.room.name", "").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_kick_ban_membership_transitions() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let r = enc(&room);
    alice.send_text(&room, "m1", "while-bob-in").await;
    let s0 = bob.sync(None, 0).await;
    let mut since = s0["next_batch"].as_str().unwrap().to_string();

    // Leave.
    let (st, _) = bob.post(&format!("rooms/{r}/leave"), json!({})).await;
    assert_eq!(st, 200);
    let s = bob.sync(Some(&since), 5000).await;
    assert!(
        s["rooms"]["join"][&room].is_null(),
        "left room still in rooms.join: {s}"
    );
    let lv = &s["rooms"]["leave"][&room];
    assert!(lv.is_object(), "left room missing from rooms.leave: {s}");
    let mut evs = lv["timeline"]["events"].as_array().cloned().unwrap_or_default();
    evs.extend(lv["state"]["events"].as_array().cloned().unwrap_or_default());
    assert!(
        evs.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob.user_id.as_str()
            && e["content"]["membership"] == "leave"),
        "bob's leave event missing from rooms.leave: {lv}"
    );
    since = s["next_batch"].as_str().unwrap().to_string();
    let (_, jr) = bob.get("joined_rooms").await;
    assert_eq!(jr["joined_rooms"], json!([]));

    // After leaving: can't send, doesn't receive, can't read later history.
    let got = bob
        .send_raw(
            &room,
            "m.room.message",
            "x",
            json!({"msgtype": "m.text", "body": "ghost"}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    alice.send_text(&room, "m2", "after-bob-left").await;
    let s = bob.sync(Some(&since), 1000).await;
    let leaked: Vec<Value> = s["rooms"]["leave"][&room]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        bodies(&leaked).is_empty() && s["rooms"]["join"][&room].is_null(),
        "events after leave delivered: {s}"
    );
    since = s["next_batch"].as_str().unwrap().to_string();
    let (st, page) = bob.get(&format!("rooms/{r}/messages?dir=b&limit=50")).await;
    if st == 200 {
        let b = bodies(page["chunk"].as_array().unwrap());
        assert!(
            !b.contains(&"after-bob-left".to_string()),
            "history after leave visible: {b:?}"
        );
        assert!(
            b.contains(&"while-bob-in".to_string()),
            "history while joined should stay readable: {b:?}"
        );
    } else {
        assert_eq!(st, 403, "{page}");
    }

    // Re-invite and join, then kick.
    alice.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    let s = bob.sync(Some(&since), 0).await;
    since = s["next_batch"].as_str().unwrap().to_string();
    let (st, r2) = alice
        .post(
            &format!("rooms/{r}/kick"),
            json!({"user_id": bob.user_id, "reason": "test"}),
        )
        .await;
    assert_eq!(st, 200, "{r2}");
    let s = bob.sync(Some(&since), 5000).await;
    let lv = &s["rooms"]["leave"][&room];
    assert!(lv.is_object(), "kicked room missing from rooms.leave: {s}");
    let kick = lv["timeline"]["events"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("kick event missing: {lv}"));
    assert_eq!(kick["content"]["membership"], "leave");
    assert_eq!(kick["sender"], alice.user_id.as_str());
    assert_eq!(kick["content"]["reason"], "test");
    since = s["next_batch"].as_str().unwrap().to_string();

    // Ban: cannot rejoin, cannot be invited; unban allows a new invite.
    let (st, r3) = alice
        .post(&format!("rooms/{r}/ban"), json!({"user_id": bob.user_id}))
        .await;
    assert_eq!(st, 200, "{r3}");
    let s = bob.sync(Some(&since), 5000).await;
    let lv = &s["rooms"]["leave"][&room];
    let ban = lv["timeline"]["events"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("ban event missing from bob's rooms.leave: {s}"));
    assert_eq!(ban["content"]["membership"], "ban");
    let got = bob.post(&format!("join/{r}"), json!({})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = alice
        .post(&format!("rooms/{r}/invite"), json!({"user_id": bob.user_id}))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let (st, m) = alice
        .get(&format!("rooms/{r}/state/m.room.member/{}", enc(&bob.user_id)))
        .await;
    assert_eq!((st, m["membership"].clone()), (200, json!("ban")));
    let (st, _) = alice
        .post(&format!("rooms/{r}/unban"), json!({"user_id": bob.user_id}))
        .await;
    assert_eq!(st, 200);
    let (_, m) = alice
        .get(&format!("rooms/{r}/state/m.room.member/{}", enc(&bob.user_id)))
        .await;
    assert_eq!(m["membership"], "leave");
    alice.invite(&room, &bob.user_id).await;
    assert_eq!(bob.join(&room).await, room);
    let (_, jm) = alice.get(&format!("rooms/{r}/joined_members")).await;
    assert_eq!(jm["joined"].as_object().map(|o| o.len()), Some(2), "{jm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_filter_is_used_by_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    for i in 0..6 {
        alice
            .send(&room, "org.weft.telemetry", &format!("t{i}"), json!({"seq": i}))
            .await;
        alice.send_text(&room, &format!("m{i}"), &format!("msg-{i}")).await;
    }

    let filter = json!({"room": {"timeline": {"limit": 3, "types": ["org.weft.telemetry"]}}});
    let path = format!("user/{}/filter", enc(&alice.user_id));
    let (st, r) = alice.post(&path, filter.clone()).await;
    assert_eq!(st, 200, "{r}");
    let fid = r["filter_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no filter_id: {r}"))
        .to_string();
    let (st, got) = alice.get(&format!("{path}/{}", enc(&fid))).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(got["room"]["timeline"]["limit"], 3, "{got}");
    assert_eq!(got["room"]["timeline"]["types"], json!(["org.weft.telemetry"]), "{got}");
    let got = bob.get(&format!("{path}/{}", enc(&fid))).await;
    assert!(
        got.0 == 403 || got.0 == 404,
        "bob read alice's filter: {} {}",
        got.0,
        got.1
    );
    let got = alice.get(&format!("{path}/does-not-exist")).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    // Not a filter; someone else's user ID.
    let got = alice
        .post(&path, json!({"room": {"timeline": {"limit": "three"}}}))
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = alice.post(&path, json!({"event_fields": "content"})).await;
    assert_err(&got, 400, "M_BAD_JSON");
    assert_err(&bob.post(&path, filter.clone()).await, 403, "M_FORBIDDEN");

    for f in [fid.clone(), filter.to_string()] {
        let (st, s) = alice.sync_params(&[("timeout", "0"), ("filter", &f)]).await;
        assert_eq!(st, 200, "{s}");
        let tl = timeline(&s, &room);
        let seqs: Vec<Value> = tl.iter().map(|e| e["content"]["seq"].clone()).collect();
        assert!(
            tl.iter().all(|e| e["type"] == "org.weft.telemetry"),
            "types filter not applied ({f}): {tl:?}"
        );
        assert_eq!(seqs, vec![json!(3), json!(4), json!(5)], "filter {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_strips_content() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let r = enc(&room);
    let victim = alice.send_text(&room, "v", "oops, my password").await;
    let bobs = bob.send_text(&room, "b", "bob's words").await;

    // Bob (PL 0) cannot redact alice's event.
    let got = bob
        .put(&format!("rooms/{r}/redact/{}/t1", enc(&victim)), json!({}))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    let (st, red) = alice
        .put(
            &format!("rooms/{r}/redact/{}/t2", enc(&victim)),
            json!({"reason": "leak"}),
        )
        .await;
    assert_eq!(st, 200, "{red}");
    let red_id = red["event_id"].as_str().unwrap().to_string();
    // Idempotent txn.
    let (_, red2) = alice
        .put(
            &format!("rooms/{r}/redact/{}/t2", enc(&victim)),
            json!({"reason": "leak"}),
        )
        .await;
    assert_eq!(red2["event_id"], red_id.as_str());

    let (st, ev) = bob.get(&format!("rooms/{r}/event/{}", enc(&victim))).await;
    assert_eq!(st, 200, "{ev}");
    assert_eq!(ev["content"], json!({}), "redacted content must be stripped: {ev}");
    assert_eq!(ev["type"], "m.room.message");

    let all = bob.all_messages(&room).await;
    let v = all.iter().find(|e| e["event_id"] == victim.as_str()).unwrap();
    assert_eq!(v["content"], json!({}), "/messages still shows redacted content: {v}");
    let redaction = all
        .iter()
        .find(|e| e["event_id"] == red_id.as_str())
        .unwrap_or_else(|| panic!("redaction not in history"));
    assert_eq!(redaction["type"], "m.room.redaction");
    assert!(
        redaction["redacts"] == victim.as_str() || redaction["content"]["redacts"] == victim.as_str(),
        "redaction must name its target: {redaction}"
    );
    assert_eq!(redaction["content"]["reason"], "leak");
    let b = all.iter().find(|e| e["event_id"] == bobs.as_str()).unwrap();
    assert_eq!(b["content"]["body"], "bob's words", "unrelated event was changed");

    // Initial sync shows the redacted form too.
    let s = bob.sync_full(None, 0).await;
    let tl = timeline(&s, &room);
    let v = tl
        .iter()
        .find(|e| e["event_id"] == victim.as_str())
        .expect("victim in sync");
    assert_eq!(v["content"], json!({}), "sync shows redacted content: {v}");

    // A user may redact their own event.
    let (st, _) = bob.put(&format!("rooms/{r}/redact/{}/t3", enc(&bobs)), json!({})).await;
    assert_eq!(st, 200);

    // Redacted events carry the redaction in unsigned.redacted_because
    // (matrix-sdk/ruma need it to recognise an event as redacted).
    assert_eq!(
        ev["unsigned"]["redacted_because"]["event_id"],
        red_id.as_str(),
        "/event: unsigned.redacted_because: {ev}"
    );
    assert_eq!(
        v["unsigned"]["redacted_because"]["event_id"],
        red_id.as_str(),
        "/sync: unsigned.redacted_because: {v}"
    );
}
