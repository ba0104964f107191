//! Server-side key backup over HTTP: versions (create, get, update,
//! delete), keys at all three levels with `etag` and `count`, which copy of
//! a session is kept, and the errors clients act on.

mod common;

use common::*;
use serde_json::{Value, json};

const ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";
const ROOM: &str = "!room1:localhost";
const ROOM2: &str = "!room2:localhost";

fn auth_data(public_key: &str) -> Value {
    json!({"public_key": public_key, "signatures": {}})
}

/// A session's backup data; `tag` marks which copy the server kept.
fn key(first_message_index: u64, forwarded_count: u64, is_verified: bool, tag: &str) -> Value {
    json!({
        "first_message_index": first_message_index,
        "forwarded_count": forwarded_count,
        "is_verified": is_verified,
        "session_data": {"ephemeral": tag, "ciphertext": "c", "mac": "m"},
    })
}

fn etag(v: &Value) -> String {
    v["etag"].as_str().expect("etag is a string").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_created_read_updated_and_deleted() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    assert_err(&alice.get("room_keys/version").await, 404, "M_NOT_FOUND");
    let (st, v) = alice
        .post(
            "room_keys/version",
            json!({"algorithm": ALGORITHM, "auth_data": auth_data("pk1")}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let v1 = v["version"].as_str().expect("version").to_owned();

    let (st, info) = alice.get("room_keys/version").await;
    assert_eq!(st, 200, "{info}");
    assert_eq!(info["algorithm"], ALGORITHM);
    assert_eq!(info["auth_data"], auth_data("pk1"));
    assert_eq!(info["count"], 0);
    assert_eq!(info["version"], v1.as_str());
    assert!(info["etag"].is_string(), "{info}");
    let (st, same) = alice.get(&format!("room_keys/version/{v1}")).await;
    assert_eq!((st, &same), (200, &info));
    // Another user has no backup, and cannot see alice's.
    assert_err(&bob.get("room_keys/version").await, 404, "M_NOT_FOUND");
    assert_err(&bob.get(&format!("room_keys/version/{v1}")).await, 404, "M_NOT_FOUND");

    // auth_data may change; the algorithm may not.
    let (st, v) = alice
        .put(
            &format!("room_keys/version/{v1}"),
            json!({"algorithm": ALGORITHM, "auth_data": auth_data("pk1-signed"), "version": v1}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        alice.get("room_keys/version").await.1["auth_data"],
        auth_data("pk1-signed")
    );
    assert_err(
        &alice
            .put(
                &format!("room_keys/version/{v1}"),
                json!({"algorithm": "org.example.other", "auth_data": {}}),
            )
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &alice.post("room_keys/version", json!({"algorithm": ALGORITHM})).await,
        400,
        "M_BAD_JSON",
    );

    // A second version becomes the current one; deleting it brings back
    // the first, and deleted versions are gone for good.
    let v2 = alice
        .post(
            "room_keys/version",
            json!({"algorithm": ALGORITHM, "auth_data": auth_data("pk2")}),
        )
        .await
        .1["version"]
        .as_str()
        .expect("version")
        .to_owned();
    assert_ne!(v1, v2);
    assert_eq!(alice.get("room_keys/version").await.1["version"], v2.as_str());
    assert_eq!(alice.delete(&format!("room_keys/version/{v2}")).await.0, 200);
    assert_eq!(alice.get("room_keys/version").await.1["version"], v1.as_str());
    assert_err(&alice.get(&format!("room_keys/version/{v2}")).await, 404, "M_NOT_FOUND");
    assert_err(
        &alice.delete(&format!("room_keys/version/{v2}")).await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(&alice.get("room_keys/version/not-a-version").await, 404, "M_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_at_three_levels_keep_the_better_copy() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let v = alice
        .post(
            "room_keys/version",
            json!({"algorithm": ALGORITHM, "auth_data": auth_data("pk")}),
        )
        .await
        .1["version"]
        .as_str()
        .expect("version")
        .to_owned();
    let e0 = etag(&alice.get("room_keys/version").await.1);

    // All rooms at once.
    let (st, r) = alice
        .put(
            &format!("room_keys/keys?version={v}"),
            json!({"rooms": {
                ROOM: {"sessions": {"s1": key(5, 1, false, "s1-a"), "s2": key(0, 0, true, "s2-a")}},
                ROOM2: {"sessions": {"s3": key(0, 0, false, "s3-a")}},
            }}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["count"], 3);
    let e1 = etag(&r);
    assert_ne!(e1, e0);

    // One room; one session. A worse copy (higher index) changes nothing,
    // not even the etag; a better one (lower index) replaces it.
    let (st, r) = alice
        .put(
            &format!("room_keys/keys/{}?version={v}", enc(ROOM)),
            json!({"sessions": {"s1": key(9, 0, false, "s1-worse")}}),
        )
        .await;
    assert_eq!((st, r["count"].clone(), etag(&r)), (200, json!(3), e1.clone()));
    let (st, r) = alice
        .put(
            &format!("room_keys/keys/{}/s1?version={v}", enc(ROOM)),
            key(2, 3, false, "s1-better"),
        )
        .await;
    assert_eq!((st, r["count"].clone()), (200, json!(3)), "{r}");
    let e2 = etag(&r);
    assert_ne!(e2, e1);
    // Verified beats unverified whatever the index.
    alice
        .put(
            &format!("room_keys/keys/{}/s2?version={v}", enc(ROOM)),
            key(0, 0, false, "s2-unverified"),
        )
        .await;
    // A new session in a new room, through the session level.
    let (_, r) = alice
        .put(
            &format!("room_keys/keys/{}/s4?version={v}", enc(ROOM2)),
            key(0, 0, false, "s4"),
        )
        .await;
    assert_eq!(r["count"], 4);

    let (st, all) = alice.get(&format!("room_keys/keys?version={v}")).await;
    assert_eq!(st, 200, "{all}");
    let tags = |sessions: &Value| -> Vec<(String, String)> {
        sessions
            .as_object()
            .expect("sessions")
            .iter()
            .map(|(k, d)| {
                (
                    k.clone(),
                    d["session_data"]["ephemeral"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        tags(&all["rooms"][ROOM]["sessions"]),
        vec![("s1".into(), "s1-better".into()), ("s2".into(), "s2-a".into())]
    );
    assert_eq!(
        tags(&all["rooms"][ROOM2]["sessions"]),
        vec![("s3".into(), "s3-a".into()), ("s4".into(), "s4".into())]
    );
    assert_eq!(all["rooms"][ROOM]["sessions"]["s1"], key(2, 3, false, "s1-better"));
    let (st, room) = alice.get(&format!("room_keys/keys/{}?version={v}", enc(ROOM2))).await;
    assert_eq!(st, 200);
    assert_eq!(room["sessions"], all["rooms"][ROOM2]["sessions"]);
    let (st, one) = alice.get(&format!("room_keys/keys/{}/s2?version={v}", enc(ROOM))).await;
    assert_eq!((st, one), (200, key(0, 0, true, "s2-a")));
    assert_err(
        &alice
            .get(&format!("room_keys/keys/{}/nope?version={v}", enc(ROOM)))
            .await,
        404,
        "M_NOT_FOUND",
    );
    let (st, empty) = alice
        .get(&format!("room_keys/keys/{}?version={v}", enc("!none:localhost")))
        .await;
    assert_eq!((st, empty), (200, json!({"sessions": {}})));
    let (_, info) = alice.get("room_keys/version").await;
    assert_eq!(info["count"], 4);

    // Deleting: one session, one room, then everything.
    let (st, r) = alice
        .delete(&format!("room_keys/keys/{}/s1?version={v}", enc(ROOM)))
        .await;
    assert_eq!((st, r["count"].clone()), (200, json!(3)), "{r}");
    let (_, r) = alice
        .delete(&format!("room_keys/keys/{}?version={v}", enc(ROOM2)))
        .await;
    assert_eq!(r["count"], 1);
    let (_, r) = alice.delete(&format!("room_keys/keys?version={v}")).await;
    assert_eq!(r["count"], 0);
    assert_eq!(
        alice.get(&format!("room_keys/keys?version={v}")).await.1,
        json!({"rooms": {}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_versions_and_bad_keys_are_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let body = json!({"sessions": {"s1": key(0, 0, false, "x")}});
    let path = |v: &str| format!("room_keys/keys/{}?version={v}", enc(ROOM));

    // No backup at all.
    assert_err(&alice.put(&path("1"), body.clone()).await, 404, "M_NOT_FOUND");
    let new = |pk: &'static str| {
        let alice = &alice;
        async move {
            alice
                .post(
                    "room_keys/version",
                    json!({"algorithm": ALGORITHM, "auth_data": auth_data(pk)}),
                )
                .await
                .1["version"]
                .as_str()
                .expect("version")
                .to_owned()
        }
    };
    let v1 = new("pk1").await;
    let v2 = new("pk2").await;
    // An old version: 403 with the current one, so the client can move on.
    let got = alice.put(&path(&v1), body.clone()).await;
    assert_err(&got, 403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(got.1["current_version"], v2.as_str());
    assert_err(
        &alice.put(&path("junk"), body.clone()).await,
        403,
        "M_WRONG_ROOM_KEYS_VERSION",
    );
    assert_err(&alice.get(&path("99")).await, 404, "M_NOT_FOUND");
    // A missing version parameter, and malformed key data.
    assert_err(
        &alice.put(&format!("room_keys/keys/{}", enc(ROOM)), body.clone()).await,
        400,
        "M_MISSING_PARAM",
    );
    for bad in [
        json!({"first_message_index": -1, "forwarded_count": 0, "is_verified": false, "session_data": {}}),
        json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": "yes", "session_data": {}}),
        json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": false}),
    ] {
        let got = alice.put(&path(&v2), json!({"sessions": {"s1": bad}})).await;
        assert_err(&got, 400, "M_BAD_JSON");
    }
    // Nothing was stored by the refused requests.
    assert_eq!(alice.get("room_keys/version").await.1["count"], 0);
    assert_eq!(alice.put(&path(&v2), body).await.1["count"], 1);
}
