//! `GET /rooms/{id}/hierarchy`: the rooms below a space, breadth first,
//! only those the caller may see, with `children_state`, depth limits,
//! `suggested_only` and pages.

mod common;

use common::*;
use serde_json::{Value, json};

fn room_ids(r: &Value) -> Vec<String> {
    r["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("rooms: {r}"))
        .iter()
        .map(|x| x["room_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn add_child(c: &Client, space: &str, child: &str, suggested: bool) {
    let (st, v) = c
        .put(
            &format!("rooms/{}/state/m.space.child/{}", enc(space), enc(child)),
            json!({"via": ["localhost:8008"], "suggested": suggested}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hierarchy_walks_children_the_caller_may_see() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let space = alice
        .create_room(json!({"preset": "public_chat", "name": "Lab", "creation_content": {"type": "m.space"}}))
        .await;
    let sensors = alice
        .create_room(json!({"preset": "public_chat", "name": "Sensors"}))
        .await;
    let private = alice
        .create_room(json!({"preset": "private_chat", "name": "Admin"}))
        .await;
    let sub = alice
        .create_room(json!({"preset": "public_chat", "name": "Floor 2", "creation_content": {"type": "m.space"}}))
        .await;
    let deep = alice
        .create_room(json!({"preset": "public_chat", "name": "Room 201"}))
        .await;
    add_child(&alice, &space, &sensors, true).await;
    add_child(&alice, &space, &private, false).await;
    add_child(&alice, &space, &sub, false).await;
    add_child(&alice, &sub, &deep, false).await;
    // A removed child (no `via`) is no child.
    let (st, _) = alice
        .put(
            &format!("rooms/{}/state/m.space.child/{}", enc(&space), enc("!gone:localhost")),
            json!({}),
        )
        .await;
    assert_eq!(st, 200);
    let path = format!("/_matrix/client/v1/rooms/{}/hierarchy", enc(&space));

    let (st, r) = alice.get(&path).await;
    assert_eq!(st, 200, "{r}");
    let mut want_alice = vec![
        space.clone(),
        sensors.clone(),
        private.clone(),
        sub.clone(),
        deep.clone(),
    ];
    want_alice[1..4].sort();
    let mut got = room_ids(&r);
    got[1..4].sort();
    assert_eq!(
        got, want_alice,
        "breadth first: the space, its children, then grandchildren"
    );
    let top = &r["rooms"][0];
    assert_eq!(top["name"], "Lab");
    assert_eq!(top["room_type"], "m.space");
    assert_eq!(top["num_joined_members"], 1);
    assert_eq!(top["children_state"].as_array().map(Vec::len), Some(3), "{top}");
    assert!(top["children_state"][0]["origin_server_ts"].is_u64(), "{top}");

    // bob is in none of them: the invite-only room is hidden from him.
    let (st, r) = bob.get(&path).await;
    assert_eq!(st, 200, "{r}");
    assert!(!room_ids(&r).contains(&private), "{r}");
    assert_eq!(room_ids(&r).len(), 4);

    let (_, r) = alice.get(&format!("{path}?max_depth=1")).await;
    assert!(!room_ids(&r).contains(&deep), "{r}");
    let (_, r) = alice.get(&format!("{path}?suggested_only=true")).await;
    assert_eq!(room_ids(&r), vec![space.clone(), sensors.clone()]);

    // Pages of two cover everything once.
    let mut all = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..5 {
        let q = match &from {
            Some(f) => format!("{path}?limit=2&from={f}"),
            None => format!("{path}?limit=2"),
        };
        let (st, page) = alice.get(&q).await;
        assert_eq!(st, 200, "{page}");
        all.extend(room_ids(&page));
        match page["next_batch"].as_str() {
            Some(n) => from = Some(n.to_owned()),
            None => break,
        }
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(all.len(), 5);
    assert_eq!(sorted.len(), 5);

    // A private space bob is not in: forbidden.
    assert_err(
        &bob.get(&format!("/_matrix/client/v1/rooms/{}/hierarchy", enc(&private)))
            .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(&alice.get(&format!("{path}?from=x")).await, 400, "M_INVALID_PARAM");
}

/// A room whose join rule is `restricted` to a space lets the space's
/// members in without an invite: their join carries
/// `join_authorised_via_users_server`, a member of ours who may invite
/// (spec: "Restricted rooms"). Anyone else gets `M_FORBIDDEN`, and so
/// does a member of the space once they left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_room_lets_members_of_the_allowed_room_join() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let space = alice
        .create_room(json!({"preset": "public_chat", "name": "Lab", "creation_content": {"type": "m.space"}}))
        .await;
    let room = alice
        .create_room(json!({
            "preset": "private_chat",
            "room_version": "10",
            "initial_state": [{
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]},
            }],
        }))
        .await;
    add_child(&alice, &space, &room, false).await;
    alice.send_text(&room, "t1", "inside").await;

    // carol is in no allowed room: refused, and her join left no event.
    assert_err(
        &carol.post(&format!("join/{}", enc(&room)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let (st, _) = alice.state(&room, "m.room.member", &carol.user_id).await;
    assert_eq!(st, 404, "carol has no membership in the restricted room");

    // bob joins the space, then the room, uninvited.
    bob.join(&space).await;
    let (st, r) = bob.post(&format!("join/{}", enc(&room)), json!({})).await;
    assert_eq!((st, r["room_id"].as_str()), (200, Some(room.as_str())), "{r}");
    let (st, member) = alice.state(&room, "m.room.member", &bob.user_id).await;
    assert_eq!(st, 200, "{member}");
    assert_eq!(member["membership"], "join");
    assert_eq!(
        member["join_authorised_via_users_server"],
        alice.user_id.as_str(),
        "alice (the only member of ours, with the power to invite) signs for it"
    );
    let texts: Vec<String> = bob
        .all_messages(&room)
        .await
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(texts, ["inside"], "bob reads the room");

    // A member who left the space is no longer let in.
    let (st, _) = bob.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(st, 200);
    let (st, _) = bob.post(&format!("rooms/{}/leave", enc(&space)), json!({})).await;
    assert_eq!(st, 200);
    assert_err(
        &bob.post(&format!("join/{}", enc(&room)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );

    // An invited user needs no allowed room (and no authorising user).
    alice.invite(&room, &carol.user_id).await;
    carol.join(&room).await;
    let (_, member) = alice.state(&room, "m.room.member", &carol.user_id).await;
    assert_eq!(member["membership"], "join");
    assert!(member.get("join_authorised_via_users_server").is_none(), "{member}");
}
