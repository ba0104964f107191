//! End-to-end-encryption endpoints over HTTP: key upload, query, claim and
//! changes, to-device messages, and what /sync carries for them.

mod common;

use std::time::{Duration, Instant};

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

fn otk(id: &str) -> (String, Value) {
    (
        format!("signed_curve25519:{id}"),
        json!({ "key": format!("otk-{id}"), "signatures": { "@x:y": { "ed25519:D": "s" } } }),
    )
}

async fn upload(c: &Client, body: Value) -> Value {
    let (status, resp) = c.post("keys/upload", body).await;
    assert_eq!(status, 200, "keys/upload: {resp}");
    resp
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_query_roundtrip_keeps_signatures() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    let (id_a, key_a) = otk("AAAA");
    let resp = upload(
        &alice,
        json!({ "device_keys": device_keys(&alice), "one_time_keys": { id_a: key_a } }),
    )
    .await;
    assert_eq!(resp["one_time_key_counts"]["signed_curve25519"], 1, "{resp}");

    // Anyone may query; all devices for an empty list.
    let (status, q) = bob
        .post("keys/query", json!({ "device_keys": { alice.user_id.as_str(): [] } }))
        .await;
    assert_eq!(status, 200, "{q}");
    let got = &q["device_keys"][alice.user_id.as_str()][alice.device_id.as_str()];
    let mut expected = device_keys(&alice);
    for k in ["user_id", "device_id", "algorithms", "keys", "signatures"] {
        assert_eq!(got[k], expected[k], "{k} differs: {got}");
    }
    assert!(got["unsigned"]["device_display_name"].is_string() || got["unsigned"].is_null());
    for k in ["failures", "master_keys", "self_signing_keys", "user_signing_keys"] {
        assert!(q[k].is_object(), "{k} missing: {q}");
    }

    // Named devices only; unknown devices and users come back empty.
    let (_, q) = bob
        .post(
            "keys/query",
            json!({ "device_keys": { alice.user_id.as_str(): ["NOPE"], "@ghost:localhost:8008": [] } }),
        )
        .await;
    assert_eq!(q["device_keys"][alice.user_id.as_str()], json!({}), "{q}");
    assert_eq!(q["device_keys"]["@ghost:localhost:8008"], json!({}), "{q}");

    // Re-uploading changed keys replaces them.
    expected["keys"][format!("curve25519:{}", alice.device_id)] = json!("rotated");
    upload(&alice, json!({ "device_keys": expected })).await;
    let (_, q) = bob
        .post(
            "keys/query",
            json!({ "device_keys": { alice.user_id.as_str(): [alice.device_id] } }),
        )
        .await;
    assert_eq!(
        q["device_keys"][alice.user_id.as_str()][alice.device_id.as_str()]["keys"]
            [format!("curve25519:{}", alice.device_id)],
        "rotated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_consumes_one_time_keys_then_falls_back_and_sync_counts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let (a, ka) = otk("AAAA");
    let (b, kb) = otk("BBBB");
    let fallback = json!({ "key": "fallback", "fallback": true });
    upload(
        &alice,
        json!({
            "device_keys": device_keys(&alice),
            "one_time_keys": { a.clone(): ka.clone(), b.clone(): kb },
            "fallback_keys": { "signed_curve25519:FFFF": fallback },
        }),
    )
    .await;
    let s = alice.sync(None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 2, "{s}");
    assert_eq!(
        s["device_unused_fallback_key_types"],
        json!(["signed_curve25519"]),
        "{s}"
    );

    let claim =
        json!({ "one_time_keys": { alice.user_id.as_str(): { alice.device_id.as_str(): "signed_curve25519" } } });
    let mut claimed = Vec::new();
    for _ in 0..4 {
        let (status, r) = bob.post("keys/claim", claim.clone()).await;
        assert_eq!(status, 200, "{r}");
        assert!(r["failures"].is_object(), "{r}");
        let keys = r["one_time_keys"][alice.user_id.as_str()][alice.device_id.as_str()]
            .as_object()
            .unwrap_or_else(|| panic!("no key claimed: {r}"))
            .clone();
        assert_eq!(keys.len(), 1, "one key per device: {r}");
        claimed.push(keys.into_iter().next().expect("one key"));
    }
    let ids: Vec<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            a.as_str(),
            b.as_str(),
            "signed_curve25519:FFFF",
            "signed_curve25519:FFFF"
        ]
    );
    assert_eq!(claimed[0].1, ka, "claimed key is the uploaded object");

    // The owner's sync shows the one-time keys gone and the fallback used.
    let s2 = alice.sync(None, 0).await;
    assert_eq!(s2["device_one_time_keys_count"]["signed_curve25519"], 0, "{s2}");
    assert_eq!(s2["device_unused_fallback_key_types"], json!([]), "{s2}");
    // An upload response counts what is left.
    let (c, kc) = otk("CCCC");
    let r = upload(&alice, json!({ "one_time_keys": { c: kc } })).await;
    assert_eq!(r["one_time_key_counts"]["signed_curve25519"], 1, "{r}");

    // Unknown devices: nothing.
    let (_, r) = bob
        .post(
            "keys/claim",
            json!({ "one_time_keys": { alice.user_id.as_str(): { "NOPE": "signed_curve25519" } } }),
        )
        .await;
    assert!(r["one_time_keys"][alice.user_id.as_str()].is_null(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_changes_reach_room_members_in_sync_and_keys_changes() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    room_with(&alice, &bob, "private_chat").await;
    let a0 = next_batch(&alice.sync(None, 0).await);
    let c0 = next_batch(&carol.sync(None, 0).await);

    upload(&bob, json!({ "device_keys": device_keys(&bob) })).await;

    // alice shares a room with bob: her long-poll wakes with the change.
    let start = Instant::now();
    let s = alice.sync(Some(&a0), 10_000).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "long-poll not woken by the key change"
    );
    assert_eq!(s["device_lists"]["changed"], json!([bob.user_id]), "{s}");
    let a1 = next_batch(&s);
    let (status, ch) = alice
        .get(&format!("keys/changes{}", query(&[("from", &a0), ("to", &a1)])))
        .await;
    assert_eq!(status, 200, "{ch}");
    assert_eq!(ch["changed"], json!([bob.user_id]), "{ch}");
    // carol shares no room with bob: nothing for her.
    let s = carol.sync(Some(&c0), 300).await;
    assert_eq!(s["device_lists"]["changed"], json!([]), "{s}");

    // Logging out deletes the device's keys and is a change too.
    let (status, _) = bob.post("logout", json!({})).await;
    assert_eq!(status, 200);
    let s = alice.sync(Some(&a1), 5000).await;
    assert_eq!(s["device_lists"]["changed"], json!([bob.user_id]), "{s}");
    let (_, q) = alice
        .post("keys/query", json!({ "device_keys": { bob.user_id.as_str(): [] } }))
        .await;
    assert_eq!(q["device_keys"][bob.user_id.as_str()], json!({}), "{q}");

    let (status, _) = alice.get("keys/changes?from=s0").await;
    assert_eq!(status, 400, "`to` is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_delivered_once_then_deleted_after_ack() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let bob2 = server.login("bob", &bob.password).await;
    let b0 = next_batch(&bob.sync(None, 0).await);
    let b2_0 = next_batch(&bob2.sync(None, 0).await);

    let body = json!({ "messages": { bob.user_id.as_str(): { bob.device_id.as_str(): { "hello": "device" } } } });
    let (status, r) = alice.put("sendToDevice/m.test/txn1", body.clone()).await;
    assert_eq!((status, r), (200, json!({})));
    // A retry of the same transaction is not delivered twice.
    let (status, _) = alice.put("sendToDevice/m.test/txn1", body).await;
    assert_eq!(status, 200);

    let s1 = bob.sync(Some(&b0), 5000).await;
    assert_eq!(
        to_device_events(&s1),
        vec![json!({ "sender": alice.user_id, "type": "m.test", "content": { "hello": "device" } })],
        "{s1}"
    );
    let b1 = next_batch(&s1);
    // Not yet acknowledged: the same token gets it again.
    let again = bob.sync(Some(&b0), 0).await;
    assert_eq!(to_device_events(&again).len(), 1, "{again}");
    // Syncing from the new token acknowledges it: gone, even for the old token.
    let s2 = bob.sync(Some(&b1), 0).await;
    assert!(to_device_events(&s2).is_empty(), "{s2}");
    let old = bob.sync(Some(&b0), 0).await;
    assert!(to_device_events(&old).is_empty(), "deleted after ack: {old}");
    // The other device never saw it.
    let other = bob2.sync(Some(&b2_0), 0).await;
    assert!(to_device_events(&other).is_empty(), "{other}");

    // "*" reaches every device of the user.
    let (status, _) = alice
        .put(
            "sendToDevice/m.test/txn2",
            json!({ "messages": { bob.user_id.as_str(): { "*": { "n": 2 } } } }),
        )
        .await;
    assert_eq!(status, 200);
    for (c, since) in [(&bob, &b1), (&bob2, &b2_0)] {
        let s = c.sync(Some(since), 5000).await;
        let evs = to_device_events(&s);
        assert_eq!(evs.len(), 1, "{s}");
        assert_eq!(evs[0]["content"]["n"], 2);
    }
    // A new transaction ID is a new message.
    let (status, _) = alice
        .put(
            "sendToDevice/m.test/txn1b",
            json!({ "messages": { bob.user_id.as_str(): { bob.device_id.as_str(): { "n": 3 } } } }),
        )
        .await;
    assert_eq!(status, 200);
    let s = bob.sync(Some(&b1), 5000).await;
    assert_eq!(to_device_events(&s).len(), 2, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_batches_are_limited_and_the_token_continues() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let mut since = next_batch(&bob.sync(None, 0).await);
    for i in 0..130 {
        let (status, _) = alice
            .put(
                &format!("sendToDevice/m.test/t{i}"),
                json!({ "messages": { bob.user_id.as_str(): { bob.device_id.as_str(): { "i": i } } } }),
            )
            .await;
        assert_eq!(status, 200);
    }
    let mut got = Vec::new();
    let mut batches = 0;
    while got.len() < 130 && batches < 10 {
        let s = bob.sync(Some(&since), 2000).await;
        let evs = to_device_events(&s);
        assert!(evs.len() <= 100, "at most 100 per sync, got {}", evs.len());
        got.extend(evs.into_iter().map(|e| e["content"]["i"].as_u64().expect("i")));
        since = next_batch(&s);
        batches += 1;
    }
    assert_eq!(got, (0..130).collect::<Vec<u64>>(), "all, in order, once");
    assert!(batches >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_to_device_message() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let since = next_batch(&bob.sync(None, 0).await);
    let poller = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let s = bob.sync(Some(&since), 20_000).await;
            (start.elapsed(), s)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = alice
        .put(
            "sendToDevice/m.wake/1",
            json!({ "messages": { bob.user_id.as_str(): { bob.device_id.as_str(): { "wake": true } } } }),
        )
        .await;
    assert_eq!(status, 200);
    let (elapsed, s) = poller.await.expect("poller");
    assert!(
        elapsed < Duration::from_secs(10),
        "long-poll was not woken: {elapsed:?}"
    );
    assert_eq!(to_device_events(&s).len(), 1, "{s}");
    assert_eq!(to_device_events(&s)[0]["type"], "m.wake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_requests_are_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    // Device keys of another user or device.
    let mut keys = device_keys(&alice);
    keys["user_id"] = json!(bob.user_id);
    assert_err(
        &alice.post("keys/upload", json!({ "device_keys": keys })).await,
        400,
        "M_INVALID_PARAM",
    );
    let mut keys = device_keys(&alice);
    keys["device_id"] = json!("SOMEONEELSE");
    assert_err(
        &alice.post("keys/upload", json!({ "device_keys": keys })).await,
        400,
        "M_INVALID_PARAM",
    );
    // Nothing was stored by the refused uploads.
    let (_, q) = bob
        .post("keys/query", json!({ "device_keys": { alice.user_id.as_str(): [] } }))
        .await;
    assert_eq!(q["device_keys"][alice.user_id.as_str()], json!({}), "{q}");

    // A one-time key ID without an algorithm: the body does not have the
    // shape of the typed request.
    assert_err(
        &alice
            .post("keys/upload", json!({ "one_time_keys": { "nocolon": {} } }))
            .await,
        400,
        "M_BAD_JSON",
    );
    // Wrong shapes: M_BAD_JSON. Not JSON: M_NOT_JSON.
    assert_err(
        &alice.post("keys/upload", json!({ "one_time_keys": [1, 2] })).await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &alice
            .post("keys/query", json!({ "device_keys": { "@a:b": "all" } }))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &alice
            .post("keys/claim", json!({ "one_time_keys": { "@a:b": ["x"] } }))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &alice
            .put(
                "sendToDevice/m.test/bad1",
                json!({ "messages": { bob.user_id.as_str(): { "D": "text" } } }),
            )
            .await,
        400,
        "M_BAD_JSON",
    );
    for path in ["keys/upload", "keys/query", "keys/claim"] {
        assert_err(
            &alice
                .request_raw(Method::POST, path, "application/json", b"{not json".to_vec())
                .await,
            400,
            "M_NOT_JSON",
        );
    }
    assert_err(
        &alice
            .request_raw(
                Method::PUT,
                "sendToDevice/m.test/bad2",
                "application/json",
                b"}".to_vec(),
            )
            .await,
        400,
        "M_NOT_JSON",
    );
    // Authentication is required.
    assert_err(
        &server.anon().post("keys/query", json!({ "device_keys": {} })).await,
        401,
        "M_MISSING_TOKEN",
    );
    // A bad sync token for /keys/changes.
    assert_err(&alice.get("keys/changes?from=nope&to=s1").await, 400, "M_INVALID_PARAM");
}

fn cross_signing_key(c: &Client, usage: &str, public: &str) -> Value {
    json!({
        "user_id": c.user_id,
        "usage": [usage],
        "keys": { format!("ed25519:{public}"): public },
        "signatures": { c.user_id.as_str(): { "ed25519:SOMEKEY": "sig" } },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_signing_keys_and_signatures() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    room_with(&alice, &bob, "private_chat").await;
    upload(&alice, json!({ "device_keys": device_keys(&alice) })).await;
    let b0 = next_batch(&bob.sync(None, 0).await);

    // First upload: no re-authentication needed.
    let keys = json!({
        "master_key": cross_signing_key(&alice, "master", "MASTER1"),
        "self_signing_key": cross_signing_key(&alice, "self_signing", "SELF1"),
        "user_signing_key": cross_signing_key(&alice, "user_signing", "USER1"),
    });
    let (status, r) = alice.post("keys/device_signing/upload", keys.clone()).await;
    assert_eq!(status, 200, "{r}");
    // The same keys again: still fine.
    let (status, r) = alice.post("keys/device_signing/upload", keys).await;
    assert_eq!(status, 200, "{r}");

    // alice signs her device with the self-signing key; a key nobody has fails.
    let mut signed = device_keys(&alice);
    signed["signatures"] = json!({ alice.user_id.as_str(): { "ed25519:SELF1": "self-signature" } });
    let (status, r) = alice
        .post(
            "keys/signatures/upload",
            json!({ alice.user_id.as_str(): { alice.device_id.as_str(): signed, "NOKEY": {} } }),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(
        r["failures"][alice.user_id.as_str()]["NOKEY"]["errcode"].is_string(),
        "{r}"
    );
    assert!(
        r["failures"][alice.user_id.as_str()][alice.device_id.as_str()].is_null(),
        "{r}"
    );

    // bob sees master and self-signing keys, not alice's user-signing key,
    // and the device keys with both signatures.
    let (_, q) = bob
        .post("keys/query", json!({ "device_keys": { alice.user_id.as_str(): [] } }))
        .await;
    let a = alice.user_id.as_str();
    assert_eq!(q["master_keys"][a]["keys"]["ed25519:MASTER1"], "MASTER1", "{q}");
    assert_eq!(q["self_signing_keys"][a]["usage"], json!(["self_signing"]), "{q}");
    assert!(q["user_signing_keys"][a].is_null(), "{q}");
    let sigs = &q["device_keys"][a][alice.device_id.as_str()]["signatures"][a];
    assert_eq!(sigs["ed25519:SELF1"], "self-signature", "{q}");
    assert_eq!(
        sigs[format!("ed25519:{}", alice.device_id)],
        "the-device-signature",
        "{q}"
    );
    let (_, own) = alice
        .post("keys/query", json!({ "device_keys": { alice.user_id.as_str(): [] } }))
        .await;
    assert_eq!(own["user_signing_keys"][a]["keys"]["ed25519:USER1"], "USER1", "{own}");

    // The new signature is a device-list change for bob.
    let s = bob.sync(Some(&b0), 5000).await;
    assert!(
        s["device_lists"]["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == a)),
        "{s}"
    );

    // Replacing the master key needs the password.
    let new_keys = json!({ "master_key": cross_signing_key(&alice, "master", "MASTER2") });
    let got = alice.post("keys/device_signing/upload", new_keys.clone()).await;
    assert_eq!(got.0, 401, "{}", got.1);
    let session = got.1["session"].as_str().expect("UIA session").to_string();
    let mut with_auth = new_keys;
    with_auth["auth"] = json!({
        "type": "m.login.password",
        "session": session,
        "identifier": { "type": "m.id.user", "user": alice.user_id },
        "password": alice.password,
    });
    let (status, r) = alice.post("keys/device_signing/upload", with_auth).await;
    assert_eq!(status, 200, "{r}");
    let (_, q) = bob
        .post("keys/query", json!({ "device_keys": { alice.user_id.as_str(): [] } }))
        .await;
    assert_eq!(q["master_keys"][a]["keys"]["ed25519:MASTER2"], "MASTER2", "{q}");

    // Keys of someone else, or with the wrong usage, are refused.
    assert_err(
        &bob.post(
            "keys/device_signing/upload",
            json!({ "master_key": cross_signing_key(&alice, "master", "X") }),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &bob.post(
            "keys/device_signing/upload",
            json!({ "master_key": cross_signing_key(&bob, "self_signing", "X") }),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &bob.post("keys/device_signing/upload", json!({ "master_key": 1 })).await,
        400,
        "M_BAD_JSON",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_show_in_device_lists() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let a0 = next_batch(&alice.sync(None, 0).await);

    // bob joins: alice should start tracking his devices.
    bob.join(&room).await;
    let s = alice.sync(Some(&a0), 5000).await;
    assert_eq!(s["device_lists"]["changed"], json!([bob.user_id]), "{s}");
    let a1 = next_batch(&s);

    // bob leaves: no shared room any more.
    let (status, _) = bob.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(status, 200);
    let s = alice.sync(Some(&a1), 5000).await;
    assert_eq!(s["device_lists"]["left"], json!([bob.user_id]), "{s}");
    let a2 = next_batch(&s);
    let (_, ch) = alice
        .get(&format!("keys/changes{}", query(&[("from", &a1), ("to", &a2)])))
        .await;
    assert_eq!(ch["left"], json!([bob.user_id]), "{ch}");

    // Key changes of users sharing no room are not reported.
    upload(&bob, json!({ "device_keys": device_keys(&bob) })).await;
    let s = alice.sync(Some(&a2), 300).await;
    assert_eq!(s["device_lists"]["changed"], json!([]), "{s}");
}

/// Many concurrent claims of one device's keys, from several users and
/// devices at once, never hand out the same one-time key twice: each of
/// the 40 keys goes to exactly one claim, and the claims past them get the
/// fallback key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_share_a_one_time_key() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let keys: serde_json::Map<String, Value> = (0..40).map(|i| otk(&format!("K{i:03}"))).collect();
    upload(
        &alice,
        json!({
            "device_keys": device_keys(&alice),
            "one_time_keys": keys,
            "fallback_keys": { "signed_curve25519:FALLBACK": { "key": "fb", "fallback": true } },
        }),
    )
    .await;
    let mut claimers = Vec::new();
    for name in ["bob", "carol", "dave", "erin"] {
        let c = server.register(name).await;
        claimers.push(c.clone());
        claimers.push(server.login(name, &TestServer::default_password(name)).await);
    }
    let claim =
        json!({ "one_time_keys": { alice.user_id.as_str(): { alice.device_id.as_str(): "signed_curve25519" } } });
    let mut tasks = Vec::new();
    for c in &claimers {
        for _ in 0..6 {
            let (c, claim, user, device) = (c.clone(), claim.clone(), alice.user_id.clone(), alice.device_id.clone());
            tasks.push(tokio::spawn(async move {
                let (status, r) = c.post("keys/claim", claim).await;
                assert_eq!(status, 200, "{r}");
                let got = r["one_time_keys"][user.as_str()][device.as_str()]
                    .as_object()
                    .unwrap_or_else(|| panic!("no key claimed: {r}"))
                    .clone();
                assert_eq!(got.len(), 1, "{r}");
                got.into_iter().next().expect("one key").0
            }));
        }
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("claim task"));
    }
    assert_eq!(ids.len(), 48);
    let fallbacks = ids
        .iter()
        .filter(|id| id.as_str() == "signed_curve25519:FALLBACK")
        .count();
    let mut otks: Vec<&String> = ids
        .iter()
        .filter(|id| id.as_str() != "signed_curve25519:FALLBACK")
        .collect();
    otks.sort();
    let before = otks.len();
    otks.dedup();
    assert_eq!(otks.len(), before, "a one-time key was handed out twice: {ids:?}");
    assert_eq!((otks.len(), fallbacks), (40, 8), "{ids:?}");
    let s = alice.sync(None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 0, "{s}");
}
