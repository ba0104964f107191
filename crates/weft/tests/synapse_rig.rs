//! The Synapse rig (weft_testkit::synapse) that federation tests run Weft
//! against: a live Synapse from the virtualenv `.ci/run` installs, on free
//! ports, with a TLS federation listener. These tests check the rig itself:
//! users registered through the shared-secret admin API can use a room on
//! it, its federation listener speaks TLS and serves its keys under its
//! server name, and a Synapse that cannot start says why.
//!
//! Without Synapse they fail under `CI` and skip with a note elsewhere.

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Syncs `client` (incrementally, from an initial sync) until `room`'s
/// timeline has shown at least one `m.room.message` or `within` passed;
/// returns every message seen, duplicates included.
async fn messages_seen(client: &Client, room: &str, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut since: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let sync = client.sync_full(since.as_deref(), 1000).await;
        seen.extend(of_type(&timeline(&sync, room), "m.room.message"));
        since = sync["next_batch"].as_str().map(str::to_owned);
        if !seen.is_empty() || Instant::now() > deadline {
            return seen;
        }
    }
}

#[tokio::test]
async fn synapse_room_between_two_registered_users() {
    let Some(synapse) = synapse_or_skip().await else { return };
    eprintln!(
        "Synapse {} healthy after {:?}",
        synapse.server_name(),
        synapse.started_in()
    );
    assert_eq!(
        synapse.server_name(),
        format!("localhost:{}", synapse.federation_addr().port()),
        "the server name carries the federation port"
    );

    // register() gives (user_id, access_token) that work on the client API.
    let (admin_id, admin_token) = synapse.register("root", "pw-root-synapse", true).await.unwrap();
    assert_eq!(admin_id, synapse.user_id("root"));
    let mut admin = synapse.anon();
    admin.access_token = admin_token;
    let (status, me) = admin.whoami().await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user_id"], admin_id.as_str());
    // ...and `admin: true` made an admin (the admin API answers it).
    let (status, info) = admin.get(&format!("/_synapse/admin/v2/users/{}", enc(&admin_id))).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["admin"], true, "{info}");

    let alice = synapse.register_client("alice").await;
    let bob = synapse.register_client("bob").await;
    assert_eq!(alice.user_id, synapse.user_id("alice"));
    assert_eq!(bob.user_id, synapse.user_id("bob"));
    // A non-admin: the admin API refuses it.
    let (status, _) = alice
        .get(&format!("/_synapse/admin/v2/users/{}", enc(&alice.user_id)))
        .await;
    assert_eq!(status, 403);

    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    // Synapse's default room version is 12: room IDs are `!` + the create
    // event's hash, without a server name.
    assert!(room.starts_with('!'), "{room}");
    let (status, create) = alice.state(&room, "m.room.create", "").await;
    assert_eq!(status, 200, "{create}");
    assert_eq!(create["room_version"], "12", "{create}");
    alice.invite(&room, &bob.user_id).await;
    assert_eq!(bob.join(&room).await, room);
    let sent = alice.send_text(&room, "t1", "hello from synapse").await;

    // Bob's sync: the room is joined and holds exactly that one message.
    let messages = messages_seen(&bob, &room, Duration::from_secs(20)).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["event_id"], sent.as_str());
    assert_eq!(messages[0]["sender"], alice.user_id.as_str());
    assert_eq!(messages[0]["content"]["body"], "hello from synapse");
    let (status, members) = bob.get(&format!("rooms/{}/joined_members", enc(&room))).await;
    assert_eq!(status, 200, "{members}");
    let mut joined: Vec<&String> = members["joined"].as_object().unwrap().keys().collect();
    joined.sort();
    assert_eq!(joined, [&alice.user_id, &bob.user_id]);

    // Registration is closed except through the shared secret.
    let (status, resp) = synapse
        .anon()
        .post("register", json!({"username": "mallory", "password": "pw-mallory-x"}))
        .await;
    assert_eq!(status, 403, "{resp}");
}

#[tokio::test]
async fn synapse_federation_listener_speaks_tls_and_serves_its_keys() {
    let Some(synapse) = synapse_or_skip().await else { return };
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let get = |path: &str| {
        let url = format!("{}{path}", synapse.federation_url());
        let req = http.get(url.clone());
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert_eq!(resp.status(), 200, "GET {url}");
            resp.json::<Value>().await.unwrap()
        }
    };
    assert!(synapse.federation_url().starts_with("https://127.0.0.1:"));

    let keys = get("/_matrix/key/v2/server").await;
    assert_eq!(keys["server_name"], synapse.server_name(), "{keys}");
    let verify_keys = keys["verify_keys"].as_object().unwrap();
    assert_eq!(verify_keys.len(), 1, "{keys}");
    assert!(verify_keys.contains_key("ed25519:a_weft"), "{keys}");
    assert!(
        keys["signatures"][synapse.server_name()]["ed25519:a_weft"].is_string(),
        "self-signed with its key: {keys}"
    );
    let version = get("/_matrix/federation/v1/version").await;
    assert_eq!(version["server"]["name"], "Synapse", "{version}");

    // The federation port is TLS only: plain HTTP gets no answer.
    let plain = format!("http://{}/_matrix/key/v2/server", synapse.federation_addr());
    if let Ok(resp) = http.get(&plain).send().await {
        assert_ne!(resp.status(), 200, "plain HTTP answered on the TLS port");
    }
    // The client listener does not serve federation.
    let (status, _) = synapse.anon().get("/_matrix/federation/v1/version").await;
    assert_ne!(status, 200);
}

#[tokio::test]
async fn synapse_that_cannot_start_says_why() {
    let err = match Synapse::builder().python("/nonexistent/bin/python").start().await {
        Ok(_) => panic!("started with a missing python"),
        Err(e) => e,
    };
    assert!(err.contains("/nonexistent/bin/python"), "{err}");

    if synapse_python().is_err() {
        weft_testkit::tool_missing("Synapse", "see .ci/run");
        return;
    }
    // A configuration Synapse rejects: the error carries its log's tail.
    let started = Instant::now();
    let err = match Synapse::builder()
        .extra_yaml("database: {name: no_such_engine}")
        .start()
        .await
    {
        Ok(_) => panic!("Synapse started with a bogus database engine"),
        Err(e) => e,
    };
    assert!(err.contains("Synapse exited"), "{err}");
    assert!(err.contains("no_such_engine"), "the log tail names the problem: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "noticed the exit, did not wait out the timeout"
    );
}

/// Two rigs federate with each other: the configuration Weft relies on
/// (server names `localhost:<port>`, self-signed TLS with verification off,
/// keys fetched from the origin without trusted key servers, loopback
/// allowed as a destination) lets a remote user be invited, join and read
/// a message.
#[tokio::test]
async fn two_synapses_federate_over_loopback_tls() {
    let Some(a) = synapse_or_skip().await else { return };
    let Some(b) = synapse_or_skip().await else { return };
    assert_ne!(a.server_name(), b.server_name());
    let alice = a.register_client("alice").await;
    let bob = b.register_client("bob").await;
    assert_eq!(bob.user_id, format!("@bob:{}", b.server_name()));

    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    alice.invite(&room, &bob.user_id).await;

    // The invite reaches B over federation; bob joins through A.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since: Option<String> = None;
    loop {
        let sync = bob.sync(since.as_deref(), 1000).await;
        if sync["rooms"]["invite"].get(&room).is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the invite never reached {}: {sync}",
            b.server_name()
        );
        since = sync["next_batch"].as_str().map(str::to_owned);
    }
    assert_eq!(bob.join(&room).await, room);
    let sent = alice.send_text(&room, "t1", "hello across servers").await;

    // Over federation into B: exactly that one message.
    let messages = messages_seen(&bob, &room, Duration::from_secs(30)).await;
    assert_eq!(messages.len(), 1, "{} got {messages:?}", b.server_name());
    assert_eq!(messages[0]["event_id"], sent.as_str());
    assert_eq!(messages[0]["sender"], alice.user_id.as_str());
    assert_eq!(messages[0]["content"]["body"], "hello across servers");

    // A sees bob joined from B.
    let (status, members) = alice.get(&format!("rooms/{}/joined_members", enc(&room))).await;
    assert_eq!(status, 200, "{members}");
    assert!(members["joined"].get(&bob.user_id).is_some(), "{members}");
}
