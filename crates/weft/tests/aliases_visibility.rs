//! Room aliases and history visibility.

mod common;

use common::*;
use serde_json::{Value, json};

fn bodies(events: &[Value]) -> Vec<String> {
    of_type(events, "m.room.message")
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_aliases() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let alias = format!("#lobby:{}", server.server_name);
    let second = format!("#second:{}", server.server_name);

    let room = alice
        .create_room(json!({"preset": "public_chat", "room_alias_name": "lobby", "name": "Lobby"}))
        .await;

    // Resolve (no auth needed).
    let (st, res) = server.anon().get(&format!("directory/room/{}", enc(&alias))).await;
    assert_eq!(st, 200, "{res}");
    assert_eq!(res["room_id"], room.as_str(), "{res}");
    let servers = res["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("servers missing: {res}"));
    assert!(servers.iter().any(|s| s == server.server_name.as_str()), "{res}");

    // createRoom with room_alias_name sets the canonical alias.
    let (st, ca) = alice
        .get(&format!("rooms/{}/state/m.room.canonical_alias", enc(&room)))
        .await;
    assert_eq!(st, 200, "{ca}");
    assert_eq!(ca["alias"], alias.as_str(), "{ca}");

    // Taken alias.
    let (st, r) = alice
        .post(
            "createRoom",
            json!({"preset": "public_chat", "room_alias_name": "lobby"}),
        )
        .await;
    assert_err(&(st, r), 400, "M_ROOM_IN_USE");

    // Join by alias.
    let joined = bob.join(&alias).await;
    assert_eq!(joined, room);
    let (_, jm) = alice.get(&format!("rooms/{}/joined_members", enc(&room))).await;
    assert!(
        jm["joined"][&bob.user_id].is_object(),
        "bob not joined after join-by-alias: {jm}"
    );

    // A second alias by PUT, listed in /aliases.
    let (st, r) = alice
        .put(&format!("directory/room/{}", enc(&second)), json!({"room_id": room}))
        .await;
    assert_eq!(st, 200, "{r}");
    let (st, r) = alice
        .put(&format!("directory/room/{}", enc(&second)), json!({"room_id": room}))
        .await;
    assert_eq!(st, 409, "re-creating an existing alias: {r}");
    let (st, al) = bob.get(&format!("rooms/{}/aliases", enc(&room))).await;
    assert_eq!(st, 200, "{al}");
    let mut listed: Vec<String> = al["aliases"]
        .as_array()
        .unwrap_or_else(|| panic!("{al}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut want = vec![alias.clone(), second.clone()];
    want.sort();
    assert_eq!(listed, want);
    // Aliases on another server cannot be created here.
    let (st, r) = alice
        .put(
            &format!("directory/room/{}", enc("#x:elsewhere.example")),
            json!({"room_id": room}),
        )
        .await;
    assert_eq!(st, 400, "alias for a foreign server: {r}");

    // Delete.
    let (st, r) = alice.delete(&format!("directory/room/{}", enc(&second))).await;
    assert_eq!(st, 200, "{r}");
    let got = alice.get(&format!("directory/room/{}", enc(&second))).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (st, r) = alice.delete(&format!("directory/room/{}", enc(&alias))).await;
    assert_eq!(st, 200, "{r}");
    let got = bob.get(&format!("directory/room/{}", enc(&alias))).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = alice.delete(&format!("directory/room/{}", enc(&alias))).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let (st, r) = carol.post(&format!("join/{}", enc(&alias)), json!({})).await;
    assert_ne!(st, 200, "joined via a deleted alias: {r}");
    let (_, al) = bob.get(&format!("rooms/{}/aliases", enc(&room))).await;
    assert_eq!(al["aliases"], json!([]), "{al}");

    // The alias name is free again.
    let room2 = alice
        .create_room(json!({"preset": "public_chat", "room_alias_name": "lobby"}))
        .await;
    let (_, res) = bob.get(&format!("directory/room/{}", enc(&alias))).await;
    assert_eq!(res["room_id"], room2.as_str());
}

async fn room_with_visibility(alice: &Client, vis: &str) -> String {
    alice
        .create_room(json!({
            "preset": "public_chat",
            "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": vis}}],
        }))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_visibility_joined_hides_earlier_events() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    let room = room_with_visibility(&alice, "joined").await;
    let (_, hv) = alice
        .get(&format!("rooms/{}/state/m.room.history_visibility", enc(&room)))
        .await;
    assert_eq!(hv, json!({"history_visibility": "joined"}));

    let mut before_ids = Vec::new();
    for i in 0..5 {
        before_ids.push(alice.send_text(&room, &format!("b{i}"), &format!("before-{i}")).await);
    }
    bob.join(&room).await;
    let mut after_ids = Vec::new();
    for i in 0..3 {
        after_ids.push(alice.send_text(&room, &format!("a{i}"), &format!("after-{i}")).await);
    }

    // /messages: only what was sent while bob was joined.
    let bob_all = bob.all_messages(&room).await;
    assert_eq!(
        bodies(&bob_all),
        vec!["after-0", "after-1", "after-2"],
        "bob sees pre-join history"
    );
    // Alice still sees everything.
    let alice_all = alice.all_messages(&room).await;
    assert_eq!(bodies(&alice_all).len(), 8);

    // Initial /sync.
    let s = bob.sync_full(None, 0).await;
    let tl = timeline(&s, &room);
    assert_eq!(
        bodies(&tl),
        vec!["after-0", "after-1", "after-2"],
        "bob's initial sync leaks pre-join history"
    );
    // Paginating back from the sync's prev_batch does not reveal them either.
    if let Some(pb) = s["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str() {
        let page = bob.messages(&room, Some(pb), "b", 50).await;
        assert!(
            bodies(page["chunk"].as_array().unwrap()).is_empty(),
            "prev_batch pagination leaks: {page}"
        );
    }

    // By ID and by context.
    for id in &before_ids {
        let got = bob.get(&format!("rooms/{}/event/{}", enc(&room), enc(id))).await;
        assert_err(&got, 404, "M_NOT_FOUND");
    }
    let (st, ctx) = bob
        .get(&format!("rooms/{}/context/{}?limit=20", enc(&room), enc(&after_ids[0])))
        .await;
    assert_eq!(st, 200, "{ctx}");
    let before = ctx["events_before"].as_array().cloned().unwrap_or_default();
    assert!(bodies(&before).is_empty(), "context leaks pre-join events: {before:?}");
    let (st, ctx) = bob
        .get(&format!("rooms/{}/context/{}", enc(&room), enc(&before_ids[2])))
        .await;
    assert!(st == 404 || st == 403, "context of an invisible event: {st} {ctx}");

    // Leave, miss an event, rejoin: the gap stays invisible.
    let (st, _) = bob.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(st, 200);
    alice.send_text(&room, "gap", "while-away").await;
    bob.join(&room).await;
    alice.send_text(&room, "back", "welcome-back").await;
    let bob_all = bob.all_messages(&room).await;
    assert_eq!(
        bodies(&bob_all),
        vec!["after-0", "after-1", "after-2", "welcome-back"],
        "events sent while bob was away are visible"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_visibility_shared_shows_earlier_events() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    let room = room_with_visibility(&alice, "shared").await;
    for i in 0..5 {
        alice.send_text(&room, &format!("b{i}"), &format!("before-{i}")).await;
    }
    bob.join(&room).await;
    alice.send_text(&room, "a0", "after-0").await;
    let bob_all = bob.all_messages(&room).await;
    assert_eq!(
        bodies(&bob_all),
        vec!["before-0", "before-1", "before-2", "before-3", "before-4", "after-0"],
        "shared history should be visible to a new member"
    );
}
