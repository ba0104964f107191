//! A NUL character (U+0000) in a string that would be stored as text (IDs,
//! display names, device names and IDs, aliases, transaction IDs, state
//! keys, presence and report texts, pusher keys, file names) is refused
//! with `400 M_INVALID_PARAM` on every backend: PostgreSQL cannot store it,
//! SQLite could, and the rule is one (crates/services/src/text.rs). Event
//! content is JSON and keeps `\u0000` as an escape: accepted.

mod common;

use common::*;
use serde_json::json;

const NUL_PATH: &str = "a%00b";

#[tokio::test]
async fn nul_characters_in_stored_text_are_invalid_params_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let ev = alice.send_text(&room, "ok-1", "hello").await;
    let uid = enc(&alice.user_id);
    let r = enc(&room);

    // Profile fields; the old value stays.
    alice
        .put(&format!("profile/{uid}/displayname"), json!({"displayname": "Alice"}))
        .await;
    let got = alice
        .put(&format!("profile/{uid}/displayname"), json!({"displayname": "a\u{0}b"}))
        .await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    assert!(got.1["error"].as_str().unwrap().contains("NUL"), "{}", got.1);
    let (_, profile) = alice.get(&format!("profile/{uid}")).await;
    assert_eq!(profile["displayname"], "Alice");
    assert_err(
        &alice
            .put(
                &format!("profile/{uid}/avatar_url"),
                json!({"avatar_url": "mxc://x/\u{0}"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );

    // Devices: renaming, and a login naming its device or display name.
    assert_err(
        &alice
            .put(
                &format!("devices/{}", enc(&alice.device_id)),
                json!({"display_name": "x\u{0}"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let password = TestServer::default_password("alice");
    for extra in [
        json!({"device_id": "D\u{0}"}),
        json!({"initial_device_display_name": "n\u{0}"}),
    ] {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"},
            "password": password,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        assert_err(&server.anon().post("login", body).await, 400, "M_INVALID_PARAM");
    }
    let (_, devices) = alice.get("devices").await;
    assert_eq!(
        devices["devices"].as_array().unwrap().len(),
        1,
        "no device was made: {devices}"
    );

    // Sending: transaction ID and state key; the content keeps its NUL.
    assert_err(
        &alice
            .put(
                &format!("rooms/{r}/send/m.room.message/{NUL_PATH}"),
                json!({"msgtype": "m.text", "body": "x"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .put(
                &format!("rooms/{r}/state/m.room.topic/{NUL_PATH}"),
                json!({"topic": "t"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let with_nul = alice
        .send(
            &room,
            "m.room.message",
            "ok-2",
            json!({"msgtype": "m.text", "body": "a\u{0}b"}),
        )
        .await;
    let (status, stored) = alice.get(&format!("rooms/{r}/event/{}", enc(&with_nul))).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["content"]["body"], "a\u{0}b");

    // Rooms by ID or alias, aliases, invites.
    assert_err(
        &bob.post(&format!("join/{}", enc("!a\u{0}b:localhost:8008")), json!({}))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .put(
                &format!("directory/room/{}", enc("#a\u{0}b:localhost:8008")),
                json!({"room_id": room}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice.post("createRoom", json!({"room_alias_name": "a\u{0}b"})).await,
        400,
        "M_INVALID_PARAM",
    );
    // (A user ID in a body is parsed with the request: not a user ID.)
    assert_err(
        &alice
            .post(
                &format!("rooms/{r}/invite"),
                json!({"user_id": "@a\u{0}b:localhost:8008"}),
            )
            .await,
        400,
        "M_BAD_JSON",
    );

    // Account data, presence, receipts, reports, to-device, pushers, files.
    assert_err(
        &alice
            .put(&format!("user/{uid}/account_data/{NUL_PATH}"), json!({"x": 1}))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .put(
                &format!("presence/{uid}/status"),
                json!({"presence": "online", "status_msg": "a\u{0}b"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .post(
                &format!("rooms/{r}/receipt/m.read/{}", enc(&ev)),
                json!({"thread_id": "a\u{0}b"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &bob.post(&format!("rooms/{r}/report/{}", enc(&ev)), json!({"reason": "a\u{0}b"}))
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .put(
                &format!("sendToDevice/m.test/{NUL_PATH}"),
                json!({"messages": {bob.user_id.clone(): {"*": {"x": 1}}}}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .post(
                "pushers/set",
                json!({
                    "kind": "http", "app_id": "a\u{0}b", "pushkey": "k", "app_display_name": "A",
                    "device_display_name": "D", "lang": "en",
                    "data": {"url": "https://push.example.org/_matrix/push/v1/notify"}
                }),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    // Keys: one-time key IDs, backed-up sessions; sliding sync connections.
    assert_err(
        &alice
            .post(
                "keys/upload",
                json!({"one_time_keys": {"signed_curve25519:A\u{0}": {"key": "k"}}}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let (status, version) = alice
        .post(
            "room_keys/version",
            json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "x"}}),
        )
        .await;
    assert_eq!(status, 200, "{version}");
    let version = version["version"].as_str().unwrap().to_owned();
    assert_err(
        &alice
            .put(
                &format!("room_keys/keys/{r}/{NUL_PATH}?version={version}"),
                json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": false, "session_data": {}}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice
            .post(
                "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
                json!({"conn_id": "a\u{0}b"}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let (status, up) = alice
        .request_raw(
            reqwest::Method::POST,
            &format!("/_matrix/media/v3/upload?filename={NUL_PATH}"),
            "text/plain",
            b"hi".to_vec(),
        )
        .await;
    assert_eq!((status, up["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{up}");
}

/// A lookup whose path names a NUL (an event, a room, a user, a state key,
/// an alias, a media ID) names nothing that can be stored: `400
/// M_INVALID_PARAM` on every backend (SQLite would find nothing and answer
/// `404`, PostgreSQL refuse the text), for client and federation paths.
#[tokio::test]
async fn lookups_naming_a_nul_are_invalid_params_on_every_backend() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let (uid, r) = (enc(&alice.user_id), enc(&room));
    let nul_room = enc("!a\u{0}b:localhost:8008");
    for path in [
        format!("rooms/{r}/event/{NUL_PATH}"),
        format!("rooms/{r}/context/{NUL_PATH}"),
        format!("rooms/{r}/state/m.room.topic/{NUL_PATH}"),
        format!("rooms/{r}/state/{NUL_PATH}/"),
        format!("rooms/{nul_room}/state"),
        format!("rooms/{nul_room}/messages"),
        format!("profile/{}", enc("@a\u{0}b:localhost:8008")),
        format!("user/{uid}/account_data/{NUL_PATH}"),
        format!("user/{uid}/rooms/{r}/account_data/{NUL_PATH}"),
        format!("directory/room/{}", enc("#a\u{0}b:localhost:8008")),
        format!("devices/{NUL_PATH}"),
        "/_matrix/client/v1/media/download/localhost:8008/a%00b".to_owned(),
        format!("/_matrix/client/v1/rooms/{r}/relations/{NUL_PATH}"),
    ] {
        let got = alice.get(&path).await;
        assert_eq!(
            (got.0, got.1["errcode"].as_str()),
            (400, Some("M_INVALID_PARAM")),
            "GET {path}: {}",
            got.1
        );
    }
}
