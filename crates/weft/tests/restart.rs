//! Graceful restart on the same data directory keeps accounts and history.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TELEMETRY: &str = "org.weft.telemetry";

fn telemetry(i: usize) -> Value {
    json!({"seq": i, "value": "21.5", "unit": "C"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_keeps_accounts_tokens_and_history() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let (st, _) = alice
        .put(
            &format!("rooms/{}/state/m.room.name", enc(&room)),
            json!({"name": "Before restart"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .put(
            &format!("profile/{}/displayname", enc(&alice.user_id)),
            json!({"displayname": "Alice"}),
        )
        .await;
    assert_eq!(st, 200);

    let mut sent = Vec::new();
    for i in 0..100 {
        sent.push(alice.send(&room, TELEMETRY, &format!("r-{i}"), telemetry(i)).await);
    }
    let before = alice.all_messages(&room).await;
    let before_ids = event_ids(&before);
    let first_url = server.base_url();

    let status = server.terminate(Duration::from_secs(10)).await;
    let status = status.expect("server did not exit within 10 s of SIGTERM");
    assert!(
        status.success(),
        "graceful shutdown on SIGTERM should exit 0, got {status:?}"
    );

    server.restart().await;
    assert_ne!(server.base_url(), "", "no address after restart");
    let _ = first_url;

    // Password login, with `identifier` and with the legacy `user` field.
    let (st, r) = server.login_raw("alice", &alice.password).await;
    assert_eq!(st, 200, "login with identifier after restart: {r}");
    assert_eq!(r["user_id"], alice.user_id.as_str());
    let (st, r) = server
        .anon()
        .post(
            "login",
            json!({"type": "m.login.password", "user": "alice", "password": alice.password}),
        )
        .await;
    assert_eq!(st, 200, "login with legacy `user` after restart: {r}");
    assert_eq!(r["user_id"], alice.user_id.as_str());
    // Full user ID as identifier works as well.
    let (st, r) = server
        .anon()
        .post(
            "login",
            json!({"type": "m.login.password",
                   "identifier": {"type": "m.id.user", "user": alice.user_id},
                   "password": alice.password}),
        )
        .await;
    assert_eq!(st, 200, "login with full user ID after restart: {r}");
    let (st, r) = server.login_raw("alice", "wrong-password").await;
    assert_err(&(st, r), 403, "M_FORBIDDEN");

    // Existing access tokens survive a restart.
    let (st, who) = alice.whoami().await;
    assert_eq!(st, 200, "alice's pre-restart token rejected after restart: {who}");
    assert_eq!(who["user_id"], alice.user_id.as_str());
    assert_eq!(who["device_id"], alice.device_id.as_str());

    // All history is still there, identical.
    let after = bob.all_messages(&room).await;
    assert_eq!(event_ids(&after), before_ids, "history differs after restart");
    let tele = of_type(&after, TELEMETRY);
    assert_eq!(event_ids(&tele), sent);
    for (i, e) in tele.iter().enumerate() {
        assert_eq!(e["content"], telemetry(i));
    }

    // Initial sync from scratch: room joined, state intact, latest event last.
    let s = bob.sync_full(None, 0).await;
    let jr = &s["rooms"]["join"][&room];
    assert!(jr.is_object(), "room missing from initial sync after restart: {s}");
    let tl = timeline(&s, &room);
    let tele_tl = of_type(&tl, TELEMETRY);
    assert_eq!(
        tele_tl.last().map(|e| e["event_id"].clone()),
        Some(json!(sent[99])),
        "last timeline event"
    );
    if jr["timeline"]["limited"] != json!(true) {
        assert_eq!(
            event_ids(&tele_tl),
            sent,
            "unlimited initial sync must hold all 100 events"
        );
    }
    let mut all_state = jr["state"]["events"].as_array().cloned().unwrap_or_default();
    all_state.extend(tl.iter().filter(|e| e.get("state_key").is_some()).cloned());
    let name_ev = all_state
        .iter()
        .rev()
        .find(|e| e["type"] == "m.room.name")
        .unwrap_or_else(|| panic!("m.room.name missing from initial sync state+timeline: {jr}"));
    assert_eq!(name_ev["content"]["name"], "Before restart");

    let (st, name) = bob.get(&format!("rooms/{}/state/m.room.name", enc(&room))).await;
    assert_eq!((st, name), (200, json!({"name": "Before restart"})));
    let (st, dn) = bob.get(&format!("profile/{}/displayname", enc(&alice.user_id))).await;
    assert_eq!((st, dn), (200, json!({"displayname": "Alice"})));
    let (st, jm) = alice.get(&format!("rooms/{}/joined_members", enc(&room))).await;
    assert_eq!(st, 200);
    assert_eq!(jm["joined"].as_object().map(|o| o.len()), Some(2), "{jm}");

    // The stream continues after the restart: new events after old ones,
    // and a sync from a pre-restart token is still valid.
    let since = s["next_batch"].as_str().unwrap().to_string();
    let new_id = alice.send(&room, TELEMETRY, "after-restart", telemetry(100)).await;
    assert!(!sent.contains(&new_id));
    let s2 = bob.sync_full(Some(&since), 5000).await;
    let got = of_type(&timeline(&s2, &room), TELEMETRY);
    assert_eq!(event_ids(&got), vec![new_id.clone()], "incremental sync after restart");
    let all = alice.all_messages(&room).await;
    assert_eq!(
        all.last().unwrap()["event_id"],
        new_id.as_str(),
        "new event must come after old history"
    );

    // Txn IDs used before the restart are still idempotent for the same device.
    let again = alice.send(&room, TELEMETRY, "r-5", telemetry(5)).await;
    assert_eq!(again, sent[5], "retrying a pre-restart txnId created a new event");

    // Second restart, this time straight after writes.
    let status = server
        .terminate(Duration::from_secs(10))
        .await
        .expect("no exit after second SIGTERM");
    assert!(status.success(), "{status:?}");
    server.restart().await;
    let all2 = bob.all_messages(&room).await;
    assert_eq!(
        event_ids(&all2),
        event_ids(&all),
        "history changed across second restart"
    );
}
