//! Weft and a live Synapse in one room (issue #10): each joins the other's
//! room over TLS federation, with the server names carrying the federation
//! ports (`localhost:P`), certificate checks off on both sides.
//!
//! Without Synapse they fail under `CI` and skip with a note elsewhere.

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Polls `f` until it answers `Some`, for 30 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `client`'s newest 30 events of `room` (the `/messages` of
/// either server) hold an `m.room.message` with `body`; answers them.
async fn wait_message(what: &str, client: &Client, room: &str, body: &str) -> Vec<Value> {
    eventually(what, || async {
        let m = client.messages(room, None, "b", 30).await;
        m["chunk"]
            .as_array()
            .filter(|c| {
                c.iter()
                    .any(|e| e["type"] == "m.room.message" && e["content"]["body"] == body)
            })
            .cloned()
    })
    .await
}

async fn membership(client: &Client, room: &str, user: &str) -> Option<String> {
    let (status, m): (u16, Value) = client.state(room, "m.room.member", user).await;
    (status == 200).then(|| m["membership"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_synapse_user_joins_a_weft_room_and_a_weft_user_joins_a_synapse_room() {
    let Some(synapse) = synapse_or_skip().await else { return };
    let weft = TestServer::builder().federating().start().await;
    let alice = weft.register("alice").await;
    let bob = synapse.register_client("bob").await;
    let bob_id = synapse.user_id("bob");

    // Bob (Synapse) joins alice's (Weft) room.
    let room = alice
        .create_room(json!({"preset": "public_chat", "name": "Weft room"}))
        .await;
    alice.send_text(&room, "w1", "hello from weft").await;
    let (status, body) = bob
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?server_name={}",
                enc(&room),
                enc(weft.server_name())
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail(40));
    assert_eq!(membership(&alice, &room, &bob_id).await.as_deref(), Some("join"));
    // Synapse holds the room's state as Weft made it.
    let (status, name) = bob.state(&room, "m.room.name", "").await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Weft room")), "{name}");
    // ... and alice's message, from the join's history (backfill or state).
    let seen = wait_message("alice's message on synapse", &bob, &room, "hello from weft").await;
    assert_eq!(
        seen.iter()
            .filter(|e| e["content"]["body"] == "hello from weft")
            .count(),
        1
    );

    // Live messages both ways: Weft's queue to Synapse, Synapse's to Weft.
    alice.send_text(&room, "w2", "live from weft").await;
    let (status, _) = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s1", enc(&room)),
            json!({"msgtype": "m.text", "body": "live from synapse"}),
        )
        .await;
    assert_eq!(status, 200);
    wait_message("weft's live message on synapse", &bob, &room, "live from weft").await;
    wait_message("synapse's live message on weft", &alice, &room, "live from synapse").await;

    // Dave (Weft) joins carol's (Synapse) room.
    let carol = synapse.register_client("carol").await;
    let (status, created) = carol
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "public_chat", "name": "Synapse room", "room_alias_name": "synroom"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let room2 = created["room_id"].as_str().unwrap().to_owned();
    let carol_id = synapse.user_id("carol");
    let (status, _) = carol
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&carol_id)),
            json!({"displayname": "Carol on Synapse"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = carol
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/c1", enc(&room2)),
            json!({"msgtype": "m.text", "body": "hello from synapse"}),
        )
        .await;
    assert_eq!(status, 200);
    let dave = weft.register("dave").await;
    // Carol's profile, asked of Synapse through Weft.
    let (status, profile) = dave.get(&format!("profile/{}", enc(&carol_id))).await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(profile["displayname"], "Carol on Synapse", "{profile}");
    // Dave joins by the room's alias on Synapse (resolved over federation).
    let alias = format!("#synroom:{}", synapse.server_name());
    let (status, body) = dave.post(&format!("join/{}", enc(&alias)), json!({})).await;
    assert_eq!(status, 200, "{body}\n{}", weft.log_tail(40));
    assert_eq!(body["room_id"], room2.as_str(), "{body}");
    let (status, name) = dave.state(&room2, "m.room.name", "").await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Synapse room")), "{name}");
    let dave_id = weft.user_id("dave");
    eventually("dave joined on synapse", || async {
        (membership(&carol, &room2, &dave_id).await.as_deref() == Some("join")).then_some(())
    })
    .await;
    let (status, _) = carol
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/c2", enc(&room2)),
            json!({"msgtype": "m.text", "body": "after dave joined"}),
        )
        .await;
    assert_eq!(status, 200);
    wait_message("carol's live message on weft", &dave, &room2, "after dave joined").await;
    dave.send_text(&room2, "d1", "dave on weft").await;
    wait_message("dave's message on synapse", &carol, &room2, "dave on weft").await;
    // Carol's first message, backfilled from Synapse as dave pages back.
    let bodies = dave.message_bodies(&room2).await;
    assert_eq!(bodies, ["hello from synapse", "after dave joined", "dave on weft"]);
}

/// Every `m.room.message` body `client` (on Synapse) reaches by paging
/// back through `room`, oldest first (Synapse backfills as it goes).
async fn synapse_history(client: &Client, room: &str) -> Vec<String> {
    let mut from: Option<String> = None;
    let mut out = Vec::new();
    for _ in 0..200 {
        let page = client.messages(room, from.as_deref(), "b", 100).await;
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        for e in &chunk {
            if e["type"] == "m.room.message" {
                out.push(e["content"]["body"].as_str().unwrap_or_default().to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
            _ => break,
        }
    }
    out.reverse();
    out
}

#[tokio::test]
async fn synapse_backfills_three_hundred_older_messages_from_weft_after_a_late_join() {
    let Some(synapse) = synapse_or_skip().await else { return };
    let weft = TestServer::builder().federating().start().await;
    let alice = weft.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    for n in 0..300 {
        alice.send_text(&room, &format!("t{n}"), &format!("old {n}")).await;
    }
    let bob = synapse.register_client("bob").await;
    let (status, body) = bob
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?server_name={}",
                enc(&room),
                enc(weft.server_name())
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let expect: Vec<String> = (0..300).map(|n| format!("old {n}")).collect();
    // Synapse fetches history in pages as bob scrolls; a page it could not
    // fetch is tried again on a later scroll.
    let history = eventually("300 backfilled messages on synapse", || async {
        let h = synapse_history(&bob, &room).await;
        (h == expect).then_some(h)
    })
    .await;
    assert_eq!(history.len(), 300);
}

#[tokio::test]
async fn weft_backfills_three_hundred_older_messages_from_synapse_after_a_late_join() {
    let Some(synapse) = synapse_or_skip().await else { return };
    let weft = TestServer::builder().federating().start().await;
    let carol = synapse.register_client("carol").await;
    let (status, created) = carol
        .post("/_matrix/client/v3/createRoom", json!({"preset": "public_chat"}))
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    for n in 0..300 {
        let (status, body) = carol
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/o{n}", enc(&room)),
                json!({"msgtype": "m.text", "body": format!("old {n}")}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let dave = weft.register("dave").await;
    let (status, body) = dave
        .post(
            &format!("join/{}?via={}", enc(&room), enc(synapse.server_name())),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let bodies = dave.message_bodies(&room).await;
    let expect: Vec<String> = (0..300).map(|n| format!("old {n}")).collect();
    assert_eq!(bodies, expect);
}

/// Waits until `client` sees `user`'s membership in `room` as `want`.
async fn wait_membership(what: &str, client: &Client, room: &str, user: &str, want: &str) {
    eventually(what, || async {
        (membership(client, room, user).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn users_leave_and_rejoin_rooms_across_weft_and_synapse() {
    let Some(synapse) = synapse_or_skip().await else { return };
    let weft = TestServer::builder().federating().start().await;

    // --- bob (Synapse) leaves alice's (Weft) room and rejoins it. ---
    let alice = weft.register("alice").await;
    let bob = synapse.register_client("bob").await;
    let bob_id = synapse.user_id("bob");
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let join_weft_room = format!(
        "/_matrix/client/v3/join/{}?server_name={}",
        enc(&room),
        enc(weft.server_name())
    );
    let (status, body) = bob.post(&join_weft_room, json!({})).await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail(40));
    wait_membership("bob joined on weft", &alice, &room, &bob_id, "join").await;

    let (status, body) = bob
        .post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_membership("bob's leave on weft", &alice, &room, &bob_id, "leave").await;
    assert_ne!(membership(&bob, &room, &bob_id).await.as_deref(), Some("join"));
    alice.send_text(&room, "w-away", "while bob was away").await;

    let (status, body) = bob.post(&join_weft_room, json!({})).await;
    assert_eq!(status, 200, "rejoin: {body}\n{}", synapse.log_tail(40));
    wait_membership("bob rejoined on weft", &alice, &room, &bob_id, "join").await;
    assert_eq!(membership(&bob, &room, &bob_id).await.as_deref(), Some("join"));
    alice.send_text(&room, "w-back", "welcome back bob").await;
    let (status, _) = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s-back", enc(&room)),
            json!({"msgtype": "m.text", "body": "bob is back"}),
        )
        .await;
    assert_eq!(status, 200);
    wait_message(
        "weft's message after bob's rejoin, on synapse",
        &bob,
        &room,
        "welcome back bob",
    )
    .await;
    wait_message("bob's message after his rejoin, on weft", &alice, &room, "bob is back").await;
    // Weft's member list: alice and bob joined, nobody else.
    let (status, members) = alice.get(&format!("rooms/{}/joined_members", enc(&room))).await;
    assert_eq!(status, 200, "{members}");
    let mut joined: Vec<&String> = members["joined"].as_object().unwrap().keys().collect();
    joined.sort();
    assert_eq!(joined, [&weft.user_id("alice"), &bob_id]);

    // --- dave (Weft) leaves carol's (Synapse) room and rejoins it. ---
    let carol = synapse.register_client("carol").await;
    let (status, created) = carol
        .post("/_matrix/client/v3/createRoom", json!({"preset": "public_chat"}))
        .await;
    assert_eq!(status, 200, "{created}");
    let room2 = created["room_id"].as_str().unwrap().to_owned();
    let dave = weft.register("dave").await;
    let dave_id = weft.user_id("dave");
    let join_synapse_room = format!("join/{}?via={}", enc(&room2), enc(synapse.server_name()));
    let (status, body) = dave.post(&join_synapse_room, json!({})).await;
    assert_eq!(status, 200, "{body}\n{}", weft.log_tail(40));
    wait_membership("dave joined on synapse", &carol, &room2, &dave_id, "join").await;

    let (status, body) = dave.post(&format!("rooms/{}/leave", enc(&room2)), json!({})).await;
    assert_eq!(status, 200, "{body}\n{}", weft.log_tail(40));
    wait_membership("dave's leave on synapse", &carol, &room2, &dave_id, "leave").await;
    let (status, body) = carol
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/c-away", enc(&room2)),
            json!({"msgtype": "m.text", "body": "while dave was away"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = dave.post(&join_synapse_room, json!({})).await;
    assert_eq!(status, 200, "rejoin: {body}\n{}", weft.log_tail(40));
    assert_eq!(membership(&dave, &room2, &dave_id).await.as_deref(), Some("join"));
    wait_membership("dave rejoined on synapse", &carol, &room2, &dave_id, "join").await;
    let (status, _) = carol
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/c-back", enc(&room2)),
            json!({"msgtype": "m.text", "body": "welcome back dave"}),
        )
        .await;
    assert_eq!(status, 200);
    dave.send_text(&room2, "d-back", "dave is back").await;
    wait_message(
        "carol's message after dave's rejoin, on weft",
        &dave,
        &room2,
        "welcome back dave",
    )
    .await;
    wait_message(
        "dave's message after his rejoin, on synapse",
        &carol,
        &room2,
        "dave is back",
    )
    .await;
    let (status, members) = carol
        .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room2)))
        .await;
    assert_eq!(status, 200, "{members}");
    let mut joined: Vec<&String> = members["joined"].as_object().unwrap().keys().collect();
    joined.sort();
    let carol_id = synapse.user_id("carol");
    let mut want = vec![&carol_id, &dave_id];
    want.sort();
    assert_eq!(joined, want);
}
