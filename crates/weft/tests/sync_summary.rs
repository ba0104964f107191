//! The room `summary` in `/sync` (member counts, `m.heroes`), rooms a user
//! was kicked or banned from in an initial sync, per-room account data in
//! `/sync`, the devices' `last_seen_ip`, and who may set typing, presence,
//! receipts and read markers; invite events carry the invitee's profile.

mod common;

use common::*;
use serde_json::{Value, json};

fn summary<'a>(sync: &'a Value, room: &str) -> &'a Value {
    &sync["rooms"]["join"][room]["summary"]
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

// After bob joins, alice's next incremental sync carries the new member
// count and bob as the hero of the unnamed room; later syncs that change
// no membership may leave the summary out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_sync_updates_summary_and_heroes() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    let s0 = alice.sync(None, 0).await;
    let sum = summary(&s0, &room);
    assert_eq!(sum["m.joined_member_count"], 1, "{s0}");
    assert_eq!(sum["m.invited_member_count"], 0, "{s0}");
    assert_eq!(sum["m.heroes"], json!([]), "alone in an unnamed room: {s0}");

    alice.invite(&room, &bob.user_id).await;
    let s1 = alice.sync(Some(&next_batch(&s0)), 5000).await;
    let sum = summary(&s1, &room);
    assert_eq!(sum["m.joined_member_count"], 1, "{s1}");
    assert_eq!(sum["m.invited_member_count"], 1, "{s1}");
    assert_eq!(sum["m.heroes"], json!([bob.user_id]), "{s1}");

    bob.join(&room).await;
    let s2 = alice.sync(Some(&next_batch(&s1)), 5000).await;
    let sum = summary(&s2, &room);
    assert_eq!(sum["m.joined_member_count"], 2, "{s2}");
    assert_eq!(sum["m.invited_member_count"], 0, "{s2}");
    assert_eq!(sum["m.heroes"], json!([bob.user_id]), "{s2}");

    // Bob sees alice as the hero; his own ID is never in the list.
    let b0 = bob.sync(None, 0).await;
    let sum = summary(&b0, &room);
    assert_eq!(sum["m.joined_member_count"], 2, "{b0}");
    assert_eq!(sum["m.heroes"], json!([alice.user_id]), "{b0}");

    // Heroes in the order the members joined or were invited.
    alice.invite(&room, &carol.user_id).await;
    carol.join(&room).await;
    let s3 = alice.sync(Some(&next_batch(&s2)), 5000).await;
    let sum = summary(&s3, &room);
    assert_eq!(sum["m.joined_member_count"], 3, "{s3}");
    assert_eq!(sum["m.heroes"], json!([bob.user_id, carol.user_id]), "{s3}");

    // A message changes no membership: no summary needed.
    alice.send_text(&room, "t1", "hello").await;
    let s4 = alice.sync(Some(&next_batch(&s3)), 5000).await;
    assert_eq!(timeline(&s4, &room).len(), 1, "{s4}");
    assert!(summary(&s4, &room).is_null(), "summary without a change: {s4}");

    // A named room needs no heroes; the counts still follow memberships.
    let (st, _) = alice
        .put(
            &format!("rooms/{}/state/m.room.name", enc(&room)),
            json!({"name": "Sensors"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = carol.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(st, 200);
    let s5 = alice.sync(Some(&next_batch(&s4)), 5000).await;
    let sum = summary(&s5, &room);
    assert_eq!(sum["m.joined_member_count"], 2, "{s5}");
    assert!(sum.get("m.heroes").is_none(), "heroes in a named room: {s5}");
}

// A kicked or banned user's initial sync lists the room under `leave`,
// with the kick or ban in it, even without `include_leave`; a room the
// user left by themselves stays out unless the filter asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_lists_rooms_kicked_or_banned_from() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let kicked = room_with(&alice, &bob, "private_chat").await;
    let banned = room_with(&alice, &bob, "private_chat").await;
    let left = room_with(&alice, &bob, "private_chat").await;
    let (st, _) = alice
        .post(
            &format!("rooms/{}/kick", enc(&kicked)),
            json!({"user_id": bob.user_id, "reason": "out"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = alice
        .post(&format!("rooms/{}/ban", enc(&banned)), json!({"user_id": bob.user_id}))
        .await;
    assert_eq!(st, 200);
    let (st, _) = bob.post(&format!("rooms/{}/leave", enc(&left)), json!({})).await;
    assert_eq!(st, 200);

    let s = bob.sync(None, 0).await;
    let leave = s["rooms"]["leave"].as_object().expect("rooms.leave");
    for (room, membership) in [(&kicked, "leave"), (&banned, "ban")] {
        let section = leave
            .get(room.as_str())
            .unwrap_or_else(|| panic!("room bob was removed from ({membership}) not in rooms.leave: {s}"));
        let tl = section["timeline"]["events"].as_array().expect("timeline");
        let last = tl.last().expect("the removal in the timeline");
        assert_eq!(last["type"], "m.room.member", "{section}");
        assert_eq!(last["state_key"], bob.user_id.as_str(), "{section}");
        assert_eq!(last["sender"], alice.user_id.as_str(), "{section}");
        assert_eq!(last["content"]["membership"], membership, "{section}");
    }
    assert!(!leave.contains_key(&left), "room bob left himself listed: {s}");
    assert_eq!(leave.len(), 2, "{s}");
    assert!(s["rooms"]["join"].as_object().is_some_and(|j| j.is_empty()), "{s}");

    let (st, s) = bob
        .sync_params(&[("timeout", "0"), ("filter", r#"{"room":{"include_leave":true}}"#)])
        .await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(s["rooms"]["leave"].as_object().map(|o| o.len()), Some(3), "{s}");
}

// Per-room account data reaches the room's `account_data` in an initial
// sync and, when it changes, in an incremental one (the room itself being
// otherwise quiet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_account_data_reaches_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let quiet = alice.create_room(json!({"preset": "private_chat"})).await;
    let path = |ty: &str| format!("user/{}/rooms/{}/account_data/{ty}", enc(&alice.user_id), enc(&room));
    let (st, _) = alice.put(&path("m.tag.test"), json!({"colour": "blue"})).await;
    assert_eq!(st, 200);

    let s0 = alice.sync(None, 0).await;
    let ad = s0["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        ad,
        vec![json!({"type": "m.tag.test", "content": {"colour": "blue"}})],
        "{s0}"
    );
    assert_eq!(s0["rooms"]["join"][&quiet]["account_data"]["events"], json!([]), "{s0}");
    assert!(
        s0["account_data"]["events"]
            .as_array()
            .is_some_and(|a| a.iter().all(|e| e["type"] != "m.tag.test")),
        "room account data among the global ones: {s0}"
    );

    let (st, _) = alice.put(&path("m.tag.test"), json!({"colour": "red"})).await;
    assert_eq!(st, 200);
    let (st, _) = alice.put(&path("m.other"), json!({"n": 1})).await;
    assert_eq!(st, 200);
    let s1 = alice.sync(Some(&next_batch(&s0)), 5000).await;
    let section = &s1["rooms"]["join"][&room];
    assert!(section.is_object(), "room with new account data missing: {s1}");
    assert_eq!(
        section["account_data"]["events"],
        json!([
            {"type": "m.tag.test", "content": {"colour": "red"}},
            {"type": "m.other", "content": {"n": 1}},
        ]),
        "{s1}"
    );
    assert_eq!(section["timeline"]["events"], json!([]), "{s1}");
    assert!(s1["rooms"]["join"][&quiet].is_null(), "unchanged room listed: {s1}");

    // Nothing new: the next incremental sync does not repeat it.
    let s2 = alice.sync(Some(&next_batch(&s1)), 300).await;
    assert!(s2["rooms"]["join"][&room].is_null(), "{s2}");
}

// `GET /devices` and `GET /devices/{deviceId}` show when and from which
// address each device was last seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_show_last_seen_ip() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let (st, body) = alice.get("devices").await;
    assert_eq!(st, 200, "{body}");
    let devices = body["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{body}");
    let d = &devices[0];
    assert_eq!(d["device_id"], alice.device_id.as_str(), "{body}");
    assert_eq!(d["last_seen_ip"], "127.0.0.1", "{body}");
    assert!(d["last_seen_ts"].as_u64().is_some_and(|t| t > 0), "{body}");

    let (st, one) = alice.get(&format!("devices/{}", enc(&alice.device_id))).await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(one["device_id"], alice.device_id.as_str());
    assert_eq!(one["last_seen_ip"], "127.0.0.1", "{one}");

    // Someone else's device, like a missing one, is not found.
    assert_err(
        &alice.get(&format!("devices/{}", enc(&bob.device_id))).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(&alice.get("devices/NOSUCHDEVICE").await, 404, "M_NOT_FOUND");
}

// Typing and presence only for oneself; typing, receipts and read markers
// only in a room one is joined to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_endpoints_refuse_other_users_and_rooms() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let mallory = server.register("mallory").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let r = enc(&room);
    let event = alice.send_text(&room, "t1", "hi").await;

    // Own typing and presence: fine.
    let (st, body) = alice
        .put(
            &format!("rooms/{r}/typing/{}", enc(&alice.user_id)),
            json!({"typing": true, "timeout": 3000}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = alice
        .put(
            &format!("presence/{}/status", enc(&alice.user_id)),
            json!({"presence": "online"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");

    // For someone else: forbidden.
    let got = alice
        .put(
            &format!("rooms/{r}/typing/{}", enc(&bob.user_id)),
            json!({"typing": true, "timeout": 3000}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = alice
        .put(
            &format!("presence/{}/status", enc(&bob.user_id)),
            json!({"presence": "offline"}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // Outside the room: typing, receipts and read markers are forbidden.
    let got = mallory
        .put(
            &format!("rooms/{r}/typing/{}", enc(&mallory.user_id)),
            json!({"typing": true, "timeout": 3000}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let receipt = format!("rooms/{r}/receipt/m.read/{}", enc(&event));
    assert_err(&mallory.post(&receipt, json!({})).await, 403, "M_FORBIDDEN");
    let markers = format!("rooms/{r}/read_markers");
    let body = json!({"m.fully_read": event, "m.read": event});
    assert_err(&mallory.post(&markers, body.clone()).await, 403, "M_FORBIDDEN");

    // Members may.
    let (st, got) = bob.post(&receipt, json!({})).await;
    assert_eq!(st, 200, "{got}");
    let (st, got) = bob.post(&markers, body).await;
    assert_eq!(st, 200, "{got}");
}

// Push rules: the spec's server-default rule set for the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rules_are_the_server_defaults() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (st, rules) = alice.get("pushrules/").await;
    assert_eq!(st, 200, "{rules}");
    let global = &rules["global"];
    let ids = |kind: &str| -> Vec<String> {
        global[kind]
            .as_array()
            .unwrap_or_else(|| panic!("no {kind} rules: {rules}"))
            .iter()
            .map(|r| r["rule_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let over = ids("override");
    assert_eq!(over.first().map(String::as_str), Some(".m.rule.master"), "{rules}");
    for id in [
        ".m.rule.suppress_notices",
        ".m.rule.invite_for_me",
        ".m.rule.is_user_mention",
    ] {
        assert!(over.iter().any(|r| r == id), "{id} missing: {rules}");
    }
    let under = ids("underride");
    for id in [
        ".m.rule.call",
        ".m.rule.room_one_to_one",
        ".m.rule.message",
        ".m.rule.encrypted",
    ] {
        assert!(under.iter().any(|r| r == id), "{id} missing: {rules}");
    }
    let master = &global["override"][0];
    assert_eq!(master["enabled"], false, "{master}");
    assert_eq!(master["default"], true, "{master}");
    // The rules that name the user name this one.
    let invite = global["override"]
        .as_array()
        .and_then(|o| o.iter().find(|r| r["rule_id"] == ".m.rule.invite_for_me"))
        .unwrap_or_else(|| panic!("{rules}"));
    assert!(invite.to_string().contains(&alice.user_id), "{invite}");
    let (st, r0) = alice.get("/_matrix/client/r0/pushrules/").await;
    assert_eq!((st, &r0), (200, &rules));
    assert_err(&server.anon().get("pushrules/").await, 401, "M_MISSING_TOKEN");
}

// An invite event carries the invitee's display name and avatar (from
// /invite and from createRoom's `invite`), so clients can name invited
// members, and unnamed rooms after them, before they join (matrix-js-sdk
// showed an invited hero by user ID before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_events_carry_the_invitees_profile() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let dave = server.register("dave").await;
    for (user, name) in [(&bob, "Bob Builder"), (&carol, "Carol Singer")] {
        let (st, body) = user
            .put(
                &format!("profile/{}/displayname", enc(&user.user_id)),
                json!({"displayname": name}),
            )
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let (st, body) = bob
        .put(
            &format!("profile/{}/avatar_url", enc(&bob.user_id)),
            json!({"avatar_url": "mxc://localhost/bob"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");

    // By /invite.
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    alice.invite(&room, &bob.user_id).await;
    let (st, member) = alice.state(&room, "m.room.member", &bob.user_id).await;
    assert_eq!(st, 200, "{member}");
    assert_eq!(
        member,
        json!({"membership": "invite", "displayname": "Bob Builder", "avatar_url": "mxc://localhost/bob"})
    );
    // No profile: only the membership.
    alice.invite(&room, &dave.user_id).await;
    let (_, member) = alice.state(&room, "m.room.member", &dave.user_id).await;
    assert_eq!(member, json!({"membership": "invite"}));

    // By createRoom; the invitee's own sync shows it too.
    let room2 = alice
        .create_room(json!({"preset": "private_chat", "invite": [carol.user_id]}))
        .await;
    let (_, member) = alice.state(&room2, "m.room.member", &carol.user_id).await;
    assert_eq!(member, json!({"membership": "invite", "displayname": "Carol Singer"}));
    let sync = carol.sync(None, 0).await;
    let invite_state = sync["rooms"]["invite"][room2.as_str()]["invite_state"]["events"]
        .as_array()
        .expect("invite_state events")
        .clone();
    let own = invite_state
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == carol.user_id.as_str())
        .unwrap_or_else(|| panic!("carol's invite in her invite_state: {invite_state:?}"));
    assert_eq!(own["content"]["displayname"], "Carol Singer");
}
