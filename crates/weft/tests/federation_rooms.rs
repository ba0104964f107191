//! Rooms across two real Weft servers over their TLS federation listeners:
//! a user of one joins the other's room (make_join/send_join), reads its
//! history from before the join (backfill through /messages), is invited
//! across servers (invite v2, with the room's stripped state in /sync),
//! refuses an invite (make_leave/send_leave); and what the endpoints
//! refuse.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

async fn pair() -> (TestServer, TestServer) {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    (a, b)
}

/// Syncs `client` until `pred` holds for the answer (30 s at most).
async fn sync_until(client: &Client, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since: Option<String> = None;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let s = client.sync(since.as_deref(), 1000).await;
        if pred(&s) {
            return s;
        }
        since = s["next_batch"].as_str().map(str::to_owned);
        last = s;
    }
    panic!("{what}: not seen in 30 s; last sync {last}");
}

fn join_path(room: &str, via: &str) -> String {
    format!("join/{}?via={}", enc(room), enc(via))
}

#[tokio::test]
async fn a_user_joins_a_room_of_another_server_and_reads_its_history() {
    let (a, b) = pair().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room = alice
        .create_room(json!({"preset": "public_chat", "name": "Across", "topic": "federation"}))
        .await;
    for n in 0..30 {
        alice.send_text(&room, &format!("t{n}"), &format!("before {n}")).await;
    }
    let (status, body) = bob.post(&join_path(&room, a.server_name()), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["room_id"], room.as_str());
    // Bob's server now holds the room's state.
    let (status, name) = bob.state(&room, "m.room.name", "").await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Across")), "{name}");
    let (_, members) = bob.get(&format!("rooms/{}/joined_members", enc(&room))).await;
    let joined: Vec<&String> = members["joined"].as_object().unwrap().keys().collect();
    assert_eq!(joined.len(), 2, "{members}");
    // Alice's server took the join in.
    let bob_id = b.user_id("bob");
    let (status, m) = alice.state(&room, "m.room.member", &bob_id).await;
    assert_eq!((status, m["membership"].as_str()), (200, Some("join")), "{m}");
    // History from before the join, fetched from alice's server as bob
    // pages back, in order, each message once.
    let bodies = bob.message_bodies(&room).await;
    let expect: Vec<String> = (0..30).map(|n| format!("before {n}")).collect();
    assert_eq!(bodies, expect);
    // The whole timeline, the room's creation and first state included
    // (held as outliers since the join, until backfill reached them), as
    // alice's server has it.
    let timeline = |events: Vec<Value>| -> Vec<(String, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["event_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let on_b = timeline(bob.all_messages(&room).await);
    let on_a = timeline(alice.all_messages(&room).await);
    assert_eq!(on_b.first().map(|e| e.0.as_str()), Some("m.room.create"), "{on_b:?}");
    assert_eq!(on_b, on_a);
    // The current state still reads the events that moved onto the timeline.
    let (status, name) = bob.state(&room, "m.room.name", "").await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Across")), "{name}");
    let (status, m) = bob.state(&room, "m.room.member", &alice.user_id).await;
    assert_eq!((status, m["membership"].as_str()), (200, Some("join")), "{m}");
    // Joining again is a no-op.
    let (status, _) = bob.post(&join_path(&room, a.server_name()), json!({})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn invites_cross_servers_and_can_be_refused() {
    let (a, b) = pair().await;
    let alice = a.register("alice").await;
    let carol = b.register("carol").await;
    let dave = b.register("dave").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "name": "Invite only"}))
        .await;
    let carol_id = b.user_id("carol");
    alice.invite(&room, &carol_id).await;
    // Carol sees the invite with the room's name.
    let s = sync_until(&carol, "carol's invite", |s| !s["rooms"]["invite"][&room].is_null()).await;
    let events = s["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Invite only"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == carol_id.as_str())
    );
    // Alice's room has carol invited, signed by both servers.
    let (_, m) = alice.state(&room, "m.room.member", &carol_id).await;
    assert_eq!(m["membership"], "invite", "{m}");
    // Dave refuses his (through alice's server: his own is not in the
    // room yet).
    let dave_id = b.user_id("dave");
    alice.invite(&room, &dave_id).await;
    sync_until(&dave, "dave's invite", |s| !s["rooms"]["invite"][&room].is_null()).await;
    let (status, body) = dave.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, m) = alice.state(&room, "m.room.member", &dave_id).await;
    assert_eq!(m["membership"], "leave", "{m}");
    // Gone from dave's invites.
    let s = dave.sync(None, 0).await;
    assert!(s["rooms"]["invite"][&room].is_null(), "{s}");
    // Carol accepts: joined on both sides.
    let (status, body) = carol.post(&format!("join/{}", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, m) = alice.state(&room, "m.room.member", &carol_id).await;
    assert_eq!(m["membership"], "join", "{m}");
    // A user that does not exist cannot be invited.
    let (status, body) = alice
        .post(
            &format!("rooms/{}/invite", enc(&room)),
            json!({"user_id": b.user_id("nobody")}),
        )
        .await;
    assert!(status >= 400, "{status} {body}");
}

/// `createRoom`'s `invite` list with a user of another server goes
/// through that server's `/invite` (an invite only sent into the room
/// never reached a server not yet in it); the room is direct when asked.
#[tokio::test]
async fn create_room_invites_users_of_other_servers() {
    let (a, b) = pair().await;
    let alice = a.register("alice").await;
    let carol = b.register("carol").await;
    let carol_id = b.user_id("carol");
    let room = alice
        .create_room(json!({"preset": "trusted_private_chat", "name": "Made with an invite", "invite": [carol_id], "is_direct": true}))
        .await;
    let s = sync_until(&carol, "carol's invite", |s| !s["rooms"]["invite"][&room].is_null()).await;
    let events = s["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .unwrap()
        .clone();
    let own = events
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == carol_id.as_str())
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(own["content"]["membership"], "invite", "{own}");
    assert_eq!(own["content"]["is_direct"], true, "{own}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Made with an invite"),
        "{events:?}"
    );
    let (_, m) = alice.state(&room, "m.room.member", &carol_id).await;
    assert_eq!(m["membership"], "invite", "{m}");
    // trusted_private_chat: invitees of other servers are as powerful as
    // the creator too.
    let (_, power) = alice.state(&room, "m.room.power_levels", "").await;
    assert_eq!(power["users"][&carol_id], 100, "{power}");
    let (status, body) = carol.post(&format!("join/{}", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, m) = alice.state(&room, "m.room.member", &carol_id).await;
    assert_eq!(m["membership"], "join", "{m}");
}

#[tokio::test]
async fn joins_are_refused_where_the_room_says_so() {
    let (a, b) = pair().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    // Not invited: alice's server refuses the join template.
    let (status, body) = bob.post(&join_path(&room, a.server_name()), json!({})).await;
    assert_eq!(status, 403, "{body}");
    // An unknown room on a reachable server: 404.
    let (status, body) = bob
        .post(
            &join_path(&format!("!nothing:{}", a.server_name()), a.server_name()),
            json!({}),
        )
        .await;
    assert!(status == 404 || status == 403, "{status} {body}");
    // Through a server that is not there: an error, not a hang.
    let (status, body) = bob.post(&join_path(&room, "localhost:1"), json!({})).await;
    assert!(status >= 400, "{status} {body}");
}

#[tokio::test]
async fn room_endpoints_refuse_unsigned_requests_and_servers_not_in_the_room() {
    let (a, b) = pair().await;
    let alice = a.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let fed = a.federation_addr().unwrap();
    for path in [
        format!("/_matrix/federation/v1/state_ids/{}?event_id=%24x", enc(&room)),
        format!(
            "/_matrix/federation/v1/make_join/{}/{}",
            enc(&room),
            enc(&b.user_id("bob"))
        ),
        format!("/_matrix/federation/v1/backfill/{}?v=%24x&limit=10", enc(&room)),
    ] {
        let resp = http.get(format!("https://{fed}{path}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["errcode"], "M_UNAUTHORIZED");
    }
    let _ = b;
}

/// The bodies of the room's `m.room.message` events as `client` pages
/// back through them, oldest first.
async fn bodies(client: &Client, room: &str) -> Vec<String> {
    client
        .all_messages(room)
        .await
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until `client` holds `n` messages in `room` (60 s at most).
async fn wait_bodies(client: &Client, room: &str, n: usize, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = bodies(client, room).await;
        if got.len() >= n || Instant::now() > deadline {
            assert_eq!(got.len(), n, "{what}: {got:?}");
            return got;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn five_hundred_messages_cross_both_ways_once_and_in_the_same_order() {
    let (a, b) = pair().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let (status, body) = bob.post(&join_path(&room, a.server_name()), json!({})).await;
    assert_eq!(status, 200, "{body}");
    for n in 0..250 {
        alice.send_text(&room, &format!("a{n}"), &format!("a{n}")).await;
    }
    wait_bodies(&bob, &room, 250, "alice's 250 on B").await;
    for n in 0..250 {
        bob.send_text(&room, &format!("b{n}"), &format!("b{n}")).await;
    }
    let on_a = wait_bodies(&alice, &room, 500, "all 500 on A").await;
    let on_b = wait_bodies(&bob, &room, 500, "all 500 on B").await;
    let expect: Vec<String> = (0..250)
        .map(|n| format!("a{n}"))
        .chain((0..250).map(|n| format!("b{n}")))
        .collect();
    assert_eq!(on_a, expect);
    assert_eq!(on_b, expect);
}

/// The room's state as `client` reads it: (type, state_key, content), sorted.
async fn state_of(client: &Client, room: &str) -> Vec<(String, String, Value)> {
    let (status, state) = client.get(&format!("rooms/{}/state", enc(room))).await;
    assert_eq!(status, 200, "{state}");
    let mut out: Vec<(String, String, Value)> = state
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["state_key"].as_str().unwrap_or_default().to_owned(),
                e["content"].clone(),
            )
        })
        .collect();
    out.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    out
}

#[tokio::test]
async fn a_partition_heals_to_the_same_state_on_both_servers() {
    let quick = |builder: TestServerBuilder| builder.federating().env("WEFT_FEDERATION__RETRY_MAX_MS", "1000");
    let mut a = quick(TestServer::builder()).start().await;
    let mut b = quick(TestServer::builder()).start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let bob_id = b.user_id("bob");
    let alice_id = a.user_id("alice");
    let room = alice
        .create_room(json!({
            "preset": "public_chat",
            "power_level_content_override": {"users": {alice_id.clone(): 100, bob_id.clone(): 100}},
        }))
        .await;
    let (status, body) = bob.post(&join_path(&room, a.server_name()), json!({})).await;
    assert_eq!(status, 200, "{body}");
    // B goes away; A changes the topic and the power levels.
    b.terminate(Duration::from_secs(10)).await;
    alice
        .put_state(&room, "m.room.topic", "", json!({"topic": "set on A"}))
        .await;
    alice
        .put_state(
            &room,
            "m.room.power_levels",
            "",
            json!({"users": {alice_id.clone(): 100, bob_id.clone(): 100, "@carol:a.example": 10}}),
        )
        .await;
    // A goes away with its changes unsent; B comes back and changes both.
    a.terminate(Duration::from_secs(10)).await;
    b.restart().await;
    let bob = b.with_token(&bob.access_token);
    bob.put_state(&room, "m.room.topic", "", json!({"topic": "set on B"}))
        .await;
    bob.put_state(
        &room,
        "m.room.power_levels",
        "",
        json!({"users": {alice_id.clone(): 100, bob_id.clone(): 100, "@dave:b.example": 20}}),
    )
    .await;
    // Both up: each queue delivers the other's branch.
    a.restart().await;
    let alice = a.with_token(&alice.access_token);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (sa, sb) = (state_of(&alice, &room).await, state_of(&bob, &room).await);
        if sa == sb {
            let topic = sa.iter().find(|s| s.0 == "m.room.topic").unwrap();
            assert!(
                topic.2["topic"] == "set on A" || topic.2["topic"] == "set on B",
                "{topic:?}"
            );
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "the servers' states differ after healing:\nA: {sa:?}\nB: {sb:?}\nA's log: {}\nB's log: {}",
                a.log_tail(40),
                b.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And both keep talking in the healed room.
    alice.send_text(&room, "after", "healed").await;
    wait_bodies(&bob, &room, 1, "the message after healing").await;
}
