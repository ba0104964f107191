//! Device management (rename, delete with user-interactive auth, and what
//! a deletion revokes and announces) and room upgrades, over HTTP.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

fn device_keys(c: &Client) -> Value {
    json!({
        "user_id": c.user_id,
        "device_id": c.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", c.device_id): "curve-key-of-the-device",
            format!("ed25519:{}", c.device_id): "ed-key-of-the-device",
        },
        "signatures": { c.user_id.as_str(): { format!("ed25519:{}", c.device_id): "the-device-signature" } },
    })
}

fn device_ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {list}"))
        .iter()
        .map(|d| d["device_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

fn password_auth(c: &Client, password: &str, session: &Value) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": c.user_id },
        "password": password,
        "session": session,
    })
}

/// Asserts a UIA 401 that offers `m.login.password`; returns its session.
#[track_caller]
fn asks_for_password(got: &(u16, Value)) -> Value {
    assert_eq!(got.0, 401, "expected the UIA 401: {}", got.1);
    let flows = got.1["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("no flows: {}", got.1));
    assert!(
        flows.iter().any(|f| f["stages"] == json!(["m.login.password"])),
        "m.login.password not offered: {}",
        got.1
    );
    assert!(got.1["session"].is_string(), "no UIA session: {}", got.1);
    got.1["session"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_device_shows_in_device_list_and_only_for_own_devices() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let path = format!("devices/{}", enc(&alice.device_id));

    let (st, r) = alice.put(&path, json!({ "display_name": "Kitchen sensor" })).await;
    assert_eq!((st, r.clone()), (200, json!({})), "{r}");
    let (st, list) = alice.get("devices").await;
    assert_eq!(st, 200, "{list}");
    let devices = list["devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), 1, "{list}");
    assert_eq!(devices[0]["device_id"], alice.device_id.as_str());
    assert_eq!(devices[0]["display_name"], "Kitchen sensor");
    let (_, one) = alice.get(&path).await;
    assert_eq!(one["display_name"], "Kitchen sensor", "{one}");

    // Without display_name the name stays.
    assert_eq!(alice.put(&path, json!({})).await.0, 200);
    assert_eq!(alice.get(&path).await.1["display_name"], "Kitchen sensor");

    // Another user's device, like a missing one, is not found, and keeps its name.
    let bobs = format!("devices/{}", enc(&bob.device_id));
    assert_err(
        &alice.put(&bobs, json!({ "display_name": "mine now" })).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &alice.put("devices/NOSUCHDEVICE", json!({ "display_name": "x" })).await,
        404,
        "M_NOT_FOUND",
    );
    assert_ne!(bob.get(&bobs).await.1["display_name"], "mine now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_device_needs_the_password_and_revokes_and_announces_it() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let _room = room_with(&alice, &bob, "private_chat").await;
    let phone = server.login("alice", &alice.password).await;
    let (st, r) = phone
        .post("keys/upload", json!({ "device_keys": device_keys(&phone) }))
        .await;
    assert_eq!(st, 200, "{r}");
    let since = bob.sync(None, 0).await["next_batch"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let path = format!("devices/{}", enc(&phone.device_id));

    // No auth: the UIA 401 (a DELETE without any body too).
    let first = alice.delete(&path).await;
    let session = asks_for_password(&first);
    assert_eq!(phone.whoami().await.0, 200, "deleted without auth");

    // The wrong password: the UIA 401 again, with M_FORBIDDEN.
    let wrong = alice
        .request(
            Method::DELETE,
            &path,
            Some(json!({ "auth": password_auth(&alice, "not-the-password", &session) })),
        )
        .await;
    asks_for_password(&wrong);
    assert_eq!(wrong.1["errcode"], "M_FORBIDDEN", "{}", wrong.1);
    assert_eq!(phone.whoami().await.0, 200, "deleted with the wrong password");

    // The right one.
    let (st, r) = alice
        .request(
            Method::DELETE,
            &path,
            Some(json!({ "auth": password_auth(&alice, &alice.password, &session) })),
        )
        .await;
    assert_eq!((st, r.clone()), (200, json!({})), "{r}");
    assert_err(&phone.whoami().await, 401, "M_UNKNOWN_TOKEN");
    let (_, list) = alice.get("devices").await;
    assert_eq!(device_ids(&list), vec![alice.device_id.clone()], "{list}");
    assert_eq!(alice.whoami().await.0, 200);

    // Bob, sharing a room, sees alice's device list change and no more keys.
    let s = bob.sync(Some(&since), 0).await;
    assert_eq!(s["device_lists"]["changed"], json!([alice.user_id]), "{s}");
    let to = s["next_batch"].as_str().unwrap_or_default().to_owned();
    let (st, ch) = bob
        .get(&format!("keys/changes{}", query(&[("from", &since), ("to", &to)])))
        .await;
    assert_eq!(st, 200, "{ch}");
    assert_eq!(ch["changed"], json!([alice.user_id]), "{ch}");
    let (_, q) = bob
        .post("keys/query", json!({ "device_keys": { alice.user_id.as_str(): [] } }))
        .await;
    assert_eq!(q["device_keys"][alice.user_id.as_str()], json!({}), "{q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_devices_deletes_every_listed_device() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let d1 = server.login("alice", &alice.password).await;
    let d2 = server.login("alice", &alice.password).await;
    let d3 = server.login("alice", &alice.password).await;
    let body = json!({ "devices": [d1.device_id, d2.device_id, "NOSUCHDEVICE"] });

    let first = alice.post("delete_devices", body.clone()).await;
    let session = asks_for_password(&first);
    let mut with_auth = body;
    with_auth["auth"] = password_auth(&alice, &alice.password, &session);
    let (st, r) = alice.post("delete_devices", with_auth).await;
    assert_eq!((st, r.clone()), (200, json!({})), "{r}");

    assert_err(&d1.whoami().await, 401, "M_UNKNOWN_TOKEN");
    assert_err(&d2.whoami().await, 401, "M_UNKNOWN_TOKEN");
    assert_eq!(d3.whoami().await.0, 200);
    let (_, list) = alice.get("devices").await;
    let mut want = vec![alice.device_id.clone(), d3.device_id.clone()];
    want.sort();
    assert_eq!(device_ids(&list), want, "{list}");
}

async fn upgrade(c: &Client, room: &str, version: &str) -> (u16, Value) {
    c.post(
        &format!("rooms/{}/upgrade", enc(room)),
        json!({ "new_version": version }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_room_replaces_it_and_tombstones_the_old_one() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let old = alice
        .create_room(json!({
            "preset": "public_chat",
            "room_version": "10",
            "name": "Greenhouse",
            "topic": "Humidity and such",
        }))
        .await;
    bob.join(&old).await;
    alice
        .put_state(
            &old,
            "m.room.encryption",
            "",
            json!({ "algorithm": "m.megolm.v1.aes-sha2" }),
        )
        .await;

    // A member without the power to send the tombstone may not.
    assert_err(&upgrade(&bob, &old, "11").await, 403, "M_FORBIDDEN");
    // Versions createRoom does not accept.
    assert_err(&upgrade(&alice, &old, "999").await, 400, "M_UNSUPPORTED_ROOM_VERSION");
    assert_err(&upgrade(&alice, &old, "1").await, 400, "M_UNSUPPORTED_ROOM_VERSION");
    // Nothing happened to the old room.
    assert_err(&alice.state(&old, "m.room.tombstone", "").await, 404, "M_NOT_FOUND");

    let (st, r) = upgrade(&alice, &old, "11").await;
    assert_eq!(st, 200, "{r}");
    let new = r["replacement_room"]
        .as_str()
        .unwrap_or_else(|| panic!("no replacement_room: {r}"))
        .to_owned();
    assert_ne!(new, old);

    let (_, create) = alice.state(&new, "m.room.create", "").await;
    assert_eq!(create["room_version"], "11", "{create}");
    assert_eq!(create["predecessor"]["room_id"], old.as_str(), "{create}");
    assert_eq!(alice.state(&new, "m.room.name", "").await.1["name"], "Greenhouse");
    assert_eq!(
        alice.state(&new, "m.room.topic", "").await.1["topic"],
        "Humidity and such"
    );
    assert_eq!(
        alice.state(&new, "m.room.join_rules", "").await.1["join_rule"],
        "public"
    );
    assert_eq!(
        alice.state(&new, "m.room.encryption", "").await.1["algorithm"],
        "m.megolm.v1.aes-sha2"
    );

    let (st, tomb) = alice.state(&old, "m.room.tombstone", "").await;
    assert_eq!(st, 200, "{tomb}");
    assert_eq!(tomb["replacement_room"], new.as_str(), "{tomb}");
    let (_, pl) = alice.state(&old, "m.room.power_levels", "").await;
    assert!(pl["events_default"].as_i64().unwrap_or(0) >= 50, "{pl}");
    assert!(pl["invite"].as_i64().unwrap_or(0) >= 50, "{pl}");
    // Ordinary members can no longer talk in the old room.
    assert_err(
        &bob.send_raw(
            &old,
            "m.room.message",
            "t1",
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    // Bob follows to the new room (public, as the old one was) and talks there.
    bob.join(&new).await;
    bob.send_text(&new, "t2", "hello again").await;

    // On to room version 12, where creators hold their power by creation.
    let (st, r) = upgrade(&alice, &new, "12").await;
    assert_eq!(st, 200, "{r}");
    let newest = r["replacement_room"].as_str().unwrap_or_default().to_owned();
    let (_, create) = alice.state(&newest, "m.room.create", "").await;
    assert_eq!(create["room_version"], "12", "{create}");
    assert_eq!(create["predecessor"]["room_id"], new.as_str(), "{create}");
    assert_eq!(alice.state(&newest, "m.room.name", "").await.1["name"], "Greenhouse");
    assert_eq!(
        alice.state(&new, "m.room.tombstone", "").await.1["replacement_room"],
        newest.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_by_a_moderator_keeps_the_power_levels_and_copies_all_state() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let old = alice
        .create_room(json!({
            "preset": "private_chat",
            "room_version": "11",
            "invite": [bob.user_id],
            "power_level_content_override": {
                "users": { alice.user_id.as_str(): 100, bob.user_id.as_str(): 50 },
                "events": {
                    "m.room.tombstone": 50,
                    "m.room.history_visibility": 100,
                    "m.room.power_levels": 100,
                },
            },
        }))
        .await;
    bob.join(&old).await;
    alice
        .put_state(
            &old,
            "m.room.history_visibility",
            "",
            json!({ "history_visibility": "joined" }),
        )
        .await;

    // Bob (50) may send the tombstone, so he may upgrade; the copied state
    // needs 100, which he holds only while it is sent.
    let (st, r) = upgrade(&bob, &old, "10").await;
    assert_eq!(st, 200, "{r}");
    let new = r["replacement_room"].as_str().unwrap_or_default().to_owned();
    let (_, create) = bob.state(&new, "m.room.create", "").await;
    assert_eq!(create["room_version"], "10", "{create}");
    assert_eq!(create["creator"], bob.user_id.as_str(), "{create}");
    assert_eq!(
        bob.state(&new, "m.room.history_visibility", "").await.1["history_visibility"],
        "joined"
    );
    assert_eq!(bob.state(&new, "m.room.join_rules", "").await.1["join_rule"], "invite");
    let (_, pl) = bob.state(&new, "m.room.power_levels", "").await;
    assert_eq!(pl["users"][bob.user_id.as_str()], 50, "{pl}");
    assert_eq!(pl["users"][alice.user_id.as_str()], 100, "{pl}");
    assert_eq!(pl["events"]["m.room.tombstone"], 50, "{pl}");

    // Bob may not change power levels in the old room: the tombstone is
    // there, the levels stay as they were.
    assert_eq!(
        alice.state(&old, "m.room.tombstone", "").await.1["replacement_room"],
        new.as_str()
    );
    let (_, old_pl) = alice.state(&old, "m.room.power_levels", "").await;
    assert_eq!(old_pl["events_default"], 0, "{old_pl}");
}
