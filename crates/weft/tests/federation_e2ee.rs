//! End-to-end encryption across two real Weft servers, and the simple
//! federation queries: keys of another server's users asked through our
//! server (`/keys/query`, `/keys/claim`), a user's device list
//! (`/user/devices`), another server's room directory and aliases, OpenID
//! tokens. To-device messages and device-list updates travel as EDUs and
//! need the outgoing queue and shared rooms (see the ignored tests).

mod common;

use std::time::Duration;

use common::federation::*;
use common::*;
use serde_json::{Value, json};

fn device_keys(c: &Client) -> Value {
    json!({
        "user_id": c.user_id,
        "device_id": c.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", c.device_id): format!("curve-key-of-{}", c.device_id),
            format!("ed25519:{}", c.device_id): format!("ed-key-of-{}", c.device_id),
        },
        "signatures": { c.user_id.as_str(): { format!("ed25519:{}", c.device_id): "the-device-signature" } },
    })
}

fn cross_signing_key(c: &Client, usage: &str, public: &str) -> Value {
    json!({
        "user_id": c.user_id,
        "usage": [usage],
        "keys": { format!("ed25519:{public}"): public },
    })
}

/// Bob uploads device keys and master and self-signing keys.
async fn upload_all_keys(bob: &Client) {
    let (status, body) = bob
        .post("keys/upload", json!({ "device_keys": device_keys(bob) }))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = bob
        .post(
            "keys/device_signing/upload",
            json!({
                "master_key": cross_signing_key(bob, "master", "bobmaster"),
                "self_signing_key": cross_signing_key(bob, "self_signing", "bobselfsigning"),
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_another_servers_user_are_asked_of_it() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let bob2 = b.login_device("bob", &bob.password, "BOBPHONE").await;
    upload_all_keys(&bob).await;
    let (status, _) = bob2
        .post("keys/upload", json!({ "device_keys": device_keys(&bob2) }))
        .await;
    assert_eq!(status, 200);

    // What B itself answers for bob (to a local user who is not bob).
    let carol = b.register("carol").await;
    let (status, on_b) = carol
        .post("keys/query", json!({ "device_keys": { bob.user_id.as_str(): [] } }))
        .await;
    assert_eq!(status, 200, "{on_b}");
    assert_eq!(on_b["device_keys"][bob.user_id.as_str()].as_object().unwrap().len(), 2);

    let nobody = "@nobody:localhost:1";
    let (status, on_a) = alice
        .post(
            "keys/query",
            json!({ "device_keys": { bob.user_id.as_str(): [], nobody: [] }, "timeout": 5000 }),
        )
        .await;
    assert_eq!(status, 200, "{on_a}");
    // Exactly bob's keys as B holds them (display names included).
    assert_eq!(
        on_a["device_keys"][bob.user_id.as_str()],
        on_b["device_keys"][bob.user_id.as_str()],
        "{on_a}"
    );
    assert_eq!(
        on_a["device_keys"][bob.user_id.as_str()][bob.device_id.as_str()]["keys"],
        device_keys(&bob)["keys"]
    );
    assert_eq!(
        on_a["master_keys"][bob.user_id.as_str()],
        cross_signing_key(&bob, "master", "bobmaster")
    );
    assert_eq!(
        on_a["self_signing_keys"][bob.user_id.as_str()],
        cross_signing_key(&bob, "self_signing", "bobselfsigning")
    );
    assert_eq!(on_a["user_signing_keys"], json!({}));
    // The server that is down is a failure, and only it.
    let failures = on_a["failures"].as_object().unwrap();
    assert_eq!(failures.keys().collect::<Vec<_>>(), vec!["localhost:1"], "{on_a}");
    assert!(on_a["device_keys"].get(nobody).is_none(), "{on_a}");

    // One device asked for: only it.
    let (_, one) = alice
        .post(
            "keys/query",
            json!({ "device_keys": { bob.user_id.as_str(): ["BOBPHONE"] } }),
        )
        .await;
    let devices = one["device_keys"][bob.user_id.as_str()].as_object().unwrap();
    assert_eq!(devices.keys().collect::<Vec<_>>(), vec!["BOBPHONE"], "{one}");
    assert_eq!(one["failures"], json!({}));

    // Over federation directly: B answers for its users (never their
    // user-signing keys), refuses users that are not its own, and
    // unsigned requests.
    let path = "/_matrix/federation/v1/user/keys/query";
    let (status, direct) = signed(
        &a,
        &b,
        "POST",
        path,
        Some(json!({ "device_keys": { bob.user_id.as_str(): [] } })),
    )
    .await;
    assert_eq!(status, 200, "{direct}");
    assert_eq!(
        direct["device_keys"],
        json!({ bob.user_id.as_str(): on_a["device_keys"][bob.user_id.as_str()] }),
        "{direct}"
    );
    assert_eq!(
        direct["master_keys"][bob.user_id.as_str()],
        on_a["master_keys"][bob.user_id.as_str()]
    );
    assert!(direct.get("user_signing_keys").is_none(), "{direct}");
    let body = json!({ "device_keys": { alice.user_id.as_str(): [] } });
    assert_err(
        &signed(&a, &b, "POST", path, Some(body.clone())).await,
        400,
        "M_INVALID_PARAM",
    );
    let resp = https().post(fed_url(&b, path)).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "unsigned request accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_keys_of_another_servers_user_are_claimed_once() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let otks = json!({
        "signed_curve25519:AAA": { "key": "otk-AAA", "signatures": {} },
        "signed_curve25519:BBB": { "key": "otk-BBB", "signatures": {} },
    });
    let (status, body) = bob
        .post(
            "keys/upload",
            json!({ "device_keys": device_keys(&bob), "one_time_keys": otks }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["one_time_key_counts"]["signed_curve25519"], 2);

    let claim = json!({ "one_time_keys": { bob.user_id.as_str(): { bob.device_id.as_str(): "signed_curve25519" } } });
    let mut got = Vec::new();
    for _ in 0..2 {
        let (status, resp) = alice.post("keys/claim", claim.clone()).await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["failures"], json!({}), "{resp}");
        let keys = resp["one_time_keys"][bob.user_id.as_str()][bob.device_id.as_str()]
            .as_object()
            .unwrap_or_else(|| panic!("no key claimed: {resp}"))
            .clone();
        assert_eq!(keys.len(), 1, "{resp}");
        let (id, key) = keys.into_iter().next().unwrap();
        assert_eq!(key, otks[&id], "{resp}");
        got.push(id);
    }
    got.sort();
    assert_eq!(
        got,
        vec!["signed_curve25519:AAA", "signed_curve25519:BBB"],
        "a key was claimed twice"
    );
    // None left (and no fallback key): nothing for the device.
    let (_, resp) = alice.post("keys/claim", claim.clone()).await;
    assert!(
        resp["one_time_keys"][bob.user_id.as_str()][bob.device_id.as_str()].is_null(),
        "{resp}"
    );
    let (_, counts) = bob.post("keys/upload", json!({})).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 0);

    // B claims only for its own users.
    let (status, resp) = signed(
        &a,
        &b,
        "POST",
        "/_matrix/federation/v1/user/keys/claim",
        Some(json!({ "one_time_keys": { alice.user_id.as_str(): { "D": "signed_curve25519" } } })),
    )
    .await;
    assert_err(&(status, resp), 400, "M_INVALID_PARAM");

    // A server that is down: a failure.
    let (status, resp) = alice
        .post(
            "keys/claim",
            json!({ "one_time_keys": { "@x:localhost:1": { "D": "signed_curve25519" } }, "timeout": 5000 }),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    assert!(resp["failures"].get("localhost:1").is_some(), "{resp}");
    assert_eq!(resp["one_time_keys"], json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_devices_answers_the_stream_id_and_keys() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    upload_all_keys(&bob).await;
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc(&bob.user_id));
    let (status, first) = signed_get(&a, &b, &path).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["user_id"], bob.user_id.as_str());
    let stream_id = first["stream_id"].as_u64().expect("stream_id");
    assert!(stream_id > 0, "{first}");
    let devices = first["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{first}");
    assert_eq!(devices[0]["device_id"], bob.device_id.as_str());
    assert_eq!(devices[0]["keys"], device_keys(&bob), "{first}");
    assert_eq!(first["master_key"], cross_signing_key(&bob, "master", "bobmaster"));
    assert_eq!(
        first["self_signing_key"],
        cross_signing_key(&bob, "self_signing", "bobselfsigning")
    );

    // Renaming the device changes the list: a later stream ID, the name.
    let (status, _) = bob
        .put(
            &format!("devices/{}", bob.device_id),
            json!({ "display_name": "Bob's laptop" }),
        )
        .await;
    assert_eq!(status, 200);
    let (_, second) = signed_get(&a, &b, &path).await;
    assert!(second["stream_id"].as_u64().unwrap() > stream_id, "{second}");
    assert_eq!(second["devices"][0]["device_display_name"], "Bob's laptop", "{second}");
    assert_eq!(second["devices"][0]["keys"], device_keys(&bob));

    // Not B's user: refused. Unknown user: 404. Unsigned: 401.
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc(&alice.user_id));
    assert_err(&signed_get(&a, &b, &path).await, 400, "M_INVALID_PARAM");
    let nobody = format!("@nobody:{}", b.server_name());
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc(&nobody));
    assert_err(&signed_get(&a, &b, &path).await, 404, "M_NOT_FOUND");
    let resp = https()
        .get(fed_url(
            &b,
            &format!("/_matrix/federation/v1/user/devices/{}", enc(&bob.user_id)),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_directory_and_aliases_of_another_server() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let public = bob
        .create_room(json!({ "visibility": "public", "name": "Lobby", "room_alias_name": "lobby" }))
        .await;
    let private = bob
        .create_room(json!({ "name": "Secret", "room_alias_name": "secret" }))
        .await;

    // A's client asks B's directory.
    let (status, dir) = alice.get(&format!("publicRooms?server={}", enc(b.server_name()))).await;
    assert_eq!(status, 200, "{dir}");
    let chunk = dir["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{dir}");
    assert_eq!(chunk[0]["room_id"], public.as_str());
    assert_eq!(chunk[0]["name"], "Lobby");
    assert_eq!(chunk[0]["num_joined_members"], 1);
    assert_eq!(dir["total_room_count_estimate"], 1);
    // A's own directory is empty.
    let (_, own) = alice.get("publicRooms").await;
    assert_eq!(own["chunk"], json!([]), "{own}");
    // A server that is down: an error, not a hang or a 500.
    let (status, _) = alice.get("publicRooms?server=localhost%3A1").await;
    assert_eq!(status, 502);

    // B's aliases, resolved through A (private rooms' aliases too: an
    // alias is not a secret).
    for (alias, room) in [("lobby", &public), ("secret", &private)] {
        let alias = format!("#{alias}:{}", b.server_name());
        let (status, resp) = alice.get(&format!("directory/room/{}", enc(&alias))).await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["room_id"], room.as_str());
        assert_eq!(resp["servers"][0], b.server_name(), "{resp}");
    }
    let missing = format!("#nothing:{}", b.server_name());
    assert_err(
        &alice.get(&format!("directory/room/{}", enc(&missing))).await,
        404,
        "M_NOT_FOUND",
    );
    // B answers only for its own aliases.
    let path = format!(
        "/_matrix/federation/v1/query/directory?room_alias={}",
        enc(&format!("#lobby:{}", a.server_name()))
    );
    assert_err(&signed_get(&a, &b, &path).await, 400, "M_INVALID_PARAM");
    // And over federation directly, with paging.
    let (status, page) = signed_get(&a, &b, "/_matrix/federation/v1/publicRooms?limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
    assert!(page.get("next_batch").is_none(), "{page}");
    // Filtered (POST): by a search term in the name, topic or alias.
    let path = "/_matrix/federation/v1/publicRooms";
    for (term, count) in [("lob", 1), ("LOBBY", 1), ("nothing-like-it", 0)] {
        let (status, page) = signed(
            &a,
            &b,
            "POST",
            path,
            Some(json!({ "filter": { "generic_search_term": term } })),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["chunk"].as_array().unwrap().len(), count, "{term}: {page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openid_tokens_are_checked_over_federation() {
    let a = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = a.register("bob").await;
    let (status, token) = alice
        .post(&format!("user/{}/openid/request_token", enc(&alice.user_id)), json!({}))
        .await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["matrix_server_name"], a.server_name());
    assert_eq!(token["expires_in"], 3600);
    let access = token["access_token"].as_str().unwrap();
    assert!(access.len() >= 32);

    let userinfo = |t: String| {
        let url = fed_url(
            &a,
            &format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(&t)),
        );
        async move {
            let resp = https().get(url).send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, info) = userinfo(access.to_owned()).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info, json!({ "sub": alice.user_id }));
    assert_err(&userinfo("not-a-token".into()).await, 401, "M_UNKNOWN_TOKEN");
    // The client access token is not an OpenID token.
    assert_err(&userinfo(alice.access_token.clone()).await, 401, "M_UNKNOWN_TOKEN");
    // Only for oneself.
    assert_err(
        &alice
            .post(&format!("user/{}/openid/request_token", enc(&bob.user_id)), json!({}))
            .await,
        403,
        "M_FORBIDDEN",
    );
}

/// Alice on A and bob on B in one room (the lead's joins across servers).
async fn shared_room(alice: &Client, bob: &Client) -> String {
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let (status, body) = bob.post(&format!("join/{}", enc(&room)), json!({})).await;
    assert_eq!(status, 200, "join across servers: {body}");
    room
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_messages_reach_another_server() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let body = json!({ "messages": { bob.user_id.as_str(): { bob.device_id.as_str(): { "secret": "hello" } } } });
    let (status, _) = alice.put("sendToDevice/m.test/txn1", body.clone()).await;
    assert_eq!(status, 200);
    // A retry of the same transaction is not sent again.
    let (status, _) = alice.put("sendToDevice/m.test/txn1", body).await;
    assert_eq!(status, 200);
    let mut got = Vec::new();
    for _ in 0..20 {
        let sync = bob.sync(Some(&since), 1000).await;
        got.extend(sync["to_device"]["events"].as_array().cloned().unwrap_or_default());
        if !got.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let more = bob.sync(Some(sync["next_batch"].as_str().unwrap()), 0).await;
            got.extend(more["to_device"]["events"].as_array().cloned().unwrap_or_default());
            break;
        }
    }
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["sender"], alice.user_id.as_str());
    assert_eq!(got[0]["type"], "m.test");
    assert_eq!(got[0]["content"], json!({ "secret": "hello" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_changes_reach_another_server() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    upload_all_keys(&bob).await;
    shared_room(&alice, &bob).await;
    // Alice's server caches bob's list once asked.
    let query = json!({ "device_keys": { bob.user_id.as_str(): [] } });
    let (_, first) = alice.post("keys/query", query.clone()).await;
    assert_eq!(first["device_keys"][bob.user_id.as_str()].as_object().unwrap().len(), 1);
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // Bob adds a device: A hears of it (m.device_list_update), alice's
    // sync names bob in device_lists.changed, and her next query has it.
    let phone = b.login_device("bob", &bob.password, "BOBPHONE").await;
    let (status, _) = phone
        .post("keys/upload", json!({ "device_keys": device_keys(&phone) }))
        .await;
    assert_eq!(status, 200);
    let mut changed = false;
    let mut token = since;
    for _ in 0..20 {
        let sync = alice.sync(Some(&token), 1000).await;
        token = sync["next_batch"].as_str().unwrap().to_owned();
        if sync["device_lists"]["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == bob.user_id.as_str()))
        {
            changed = true;
            break;
        }
    }
    assert!(changed, "alice never saw bob's device list change");
    let (_, second) = alice.post("keys/query", query.clone()).await;
    let devices = second["device_keys"][bob.user_id.as_str()].as_object().unwrap();
    assert_eq!(devices.len(), 2, "{second}");
    assert_eq!(devices["BOBPHONE"]["keys"], device_keys(&phone)["keys"]);

    // Bob deletes the phone: gone on A too.
    let (status, _) = bob
        .post(
            "delete_devices",
            json!({ "devices": ["BOBPHONE"], "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": bob.password } }),
        )
        .await;
    assert_eq!(status, 200);
    let mut gone = false;
    for _ in 0..20 {
        let (_, q) = alice.post("keys/query", query.clone()).await;
        if q["device_keys"][bob.user_id.as_str()].as_object().map(|d| d.len()) == Some(1) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(gone, "bob's deleted device is still served by A");

    // A new master key reaches A (m.signing_key_update).
    let (status, _) = bob
        .post(
            "keys/device_signing/upload",
            json!({
                "self_signing_key": cross_signing_key(&bob, "self_signing", "bobselfsigning2"),
                "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": bob.password },
            }),
        )
        .await;
    assert_eq!(status, 200);
    let mut updated = false;
    for _ in 0..20 {
        let (_, q) = alice.post("keys/query", query.clone()).await;
        if q["self_signing_keys"][bob.user_id.as_str()] == cross_signing_key(&bob, "self_signing", "bobselfsigning2") {
            updated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(updated, "bob's new self-signing key is not served by A");
}
