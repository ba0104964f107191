//! The federation transport between two real Weft servers: keys served,
//! fetched through the notary endpoint and kept across restarts; requests
//! signed with `X-Matrix` (by the real outgoing client, and by hand with a
//! server's own key to tamper with them); delegation; the TLS listener.

mod common;

use std::time::Duration;

use common::federation::*;
use common::*;
use ruma::CanonicalJsonObject;
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap};
use serde_json::{Value, json};

async fn get_json(client: &reqwest::Client, url: &str, auth: Option<&str>) -> (u16, Value) {
    let mut req = client.get(url);
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `server_keys[i]` verified as signed by every `(server, key response)`
/// given.
fn assert_signed_by(object: &Value, signers: &[(&str, &Value)]) {
    let object: CanonicalJsonObject = serde_json::from_value(object.clone()).unwrap();
    let mut map = PublicKeyMap::new();
    for (name, keys) in signers {
        let set = keys["verify_keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, k)| (id.clone(), Base64::parse(k["key"].as_str().unwrap()).unwrap()))
            .collect();
        map.insert(name.to_string(), set);
        assert!(
            object["signatures"].as_object().is_some_and(|s| s.contains_key(*name)),
            "not signed by {name}: {object:?}"
        );
    }
    ruma::signatures::verify_json(&map, &object).unwrap_or_else(|e| panic!("signatures of {object:?}: {e}"));
}

#[tokio::test]
async fn notary_fetches_and_keeps_remote_keys() {
    let mut a = TestServer::builder().federating().start().await;
    let mut b = TestServer::builder().federating().start().await;
    assert!(
        a.log_tail(200).contains("verify_certificates = false"),
        "no warning about unchecked certificates"
    );
    let client = https();
    let (status, b_keys) = get_json(&client, &fed_url(&b, "/_matrix/key/v2/server"), None).await;
    assert_eq!(status, 200, "{b_keys}");
    assert_eq!(b_keys["server_name"], b.server_name());
    assert_eq!(b_keys["verify_keys"].as_object().unwrap().len(), 1);
    assert_signed_by(&b_keys, &[(b.server_name(), &b_keys)]);
    // The deprecated form with a key ID answers the same keys.
    let (status, by_id) = get_json(&client, &fed_url(&b, "/_matrix/key/v2/server/ed25519%3Aany"), None).await;
    assert_eq!(status, 200, "{by_id}");
    assert_eq!(by_id["verify_keys"], b_keys["verify_keys"]);
    let (_, a_keys) = get_json(&client, &fed_url(&a, "/_matrix/key/v2/server"), None).await;
    assert_signed_by(&a_keys, &[(a.server_name(), &a_keys)]);

    // A, as a notary, fetches B's keys from B and signs them too.
    let ask = json!({ "server_keys": { b.server_name(): {} } });
    let resp = client
        .post(fed_url(&a, "/_matrix/key/v2/query"))
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let list = answer["server_keys"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{answer}");
    assert_eq!(list[0]["server_name"], b.server_name());
    assert_eq!(list[0]["verify_keys"], b_keys["verify_keys"]);
    assert_signed_by(&list[0], &[(b.server_name(), &b_keys), (a.server_name(), &a_keys)]);

    // B stops; A restarts and answers from its database.
    b.terminate(Duration::from_secs(10)).await;
    a.terminate(Duration::from_secs(10)).await;
    a.restart().await;
    let resp = client
        .post(fed_url(&a, "/_matrix/key/v2/query"))
        .json(&ask)
        .send()
        .await
        .unwrap();
    let answer: Value = resp.json().await.unwrap();
    let list = answer["server_keys"].as_array().unwrap();
    assert_eq!(list.len(), 1, "A lost B's keys over its restart: {answer}");
    assert_eq!(list[0]["verify_keys"], b_keys["verify_keys"]);
    assert_signed_by(&list[0], &[(b.server_name(), &b_keys), (a.server_name(), &a_keys)]);
    // The one-server form too.
    let (status, one) = get_json(
        &client,
        &fed_url(&a, &format!("/_matrix/key/v2/query/{}", enc(b.server_name()))),
        None,
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["server_keys"][0]["verify_keys"], b_keys["verify_keys"]);
    // A server nobody can reach is left out, not an error.
    let resp = client
        .post(fed_url(&a, "/_matrix/key/v2/query"))
        .json(&json!({ "server_keys": { "localhost:1": {} } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["server_keys"], json!([]));
}

/// `POST /_matrix/key/v2/query` for `server` on `notary`: its answer.
async fn ask_notary(client: &reqwest::Client, notary: &TestServer, server: &str) -> Value {
    let resp = client
        .post(fed_url(notary, "/_matrix/key/v2/query"))
        .json(&json!({ "server_keys": { server: {} } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn keys_of_a_server_down_come_from_a_trusted_notary() {
    let mut b = TestServer::builder().federating().start().await;
    let c = TestServer::builder().federating().start().await;
    let client = https();
    let (_, b_keys) = get_json(&client, &fed_url(&b, "/_matrix/key/v2/server"), None).await;
    // C learns B's keys, then B goes away.
    let primed = ask_notary(&client, &c, b.server_name()).await;
    assert_eq!(primed["server_keys"].as_array().unwrap().len(), 1, "{primed}");
    b.terminate(Duration::from_secs(10)).await;

    // A cannot ask B; without a notary it finds nothing.
    let lonely = TestServer::builder().federating().start().await;
    let answer = ask_notary(&client, &lonely, b.server_name()).await;
    assert_eq!(answer["server_keys"], json!([]), "{answer}");
    // With C as its trusted notary, it gets B's keys through C, checks
    // them (signed by B and by C) and serves them signed by B and itself.
    let a = TestServer::builder()
        .federating()
        .env(
            "WEFT_FEDERATION__TRUSTED_KEY_SERVERS",
            &format!("[\"{}\"]", c.server_name()),
        )
        .start()
        .await;
    let (_, a_keys) = get_json(&client, &fed_url(&a, "/_matrix/key/v2/server"), None).await;
    let answer = ask_notary(&client, &a, b.server_name()).await;
    let list = answer["server_keys"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{answer}\n{}", a.log_tail(50));
    assert_eq!(list[0]["verify_keys"], b_keys["verify_keys"]);
    assert_signed_by(&list[0], &[(b.server_name(), &b_keys), (a.server_name(), &a_keys)]);
    // C's signature is C's to give: A passes on only B's and its own.
    let signers: Vec<&String> = list[0]["signatures"].as_object().unwrap().keys().collect();
    assert_eq!(signers.len(), 2, "{signers:?}");
    assert!(!signers.contains(&&c.server_name().to_owned()));
}

#[tokio::test]
async fn profiles_over_signed_requests() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let (status, body) = bob
        .put(
            &format!("profile/{}/displayname", enc(&bob.user_id)),
            json!({"displayname": "Bob B"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // alice on A reads bob's profile on B: A asks B, signed.
    let (status, profile) = alice.get(&format!("profile/{}", enc(&bob.user_id))).await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(profile, json!({"displayname": "Bob B"}));
    let (status, field) = alice.get(&format!("profile/{}/displayname", enc(&bob.user_id))).await;
    assert_eq!(status, 200, "{field}");
    assert_eq!(field, json!({"displayname": "Bob B"}));
    // An unknown user of B: B's 404 reaches alice.
    let nobody = format!("@nobody:{}", b.server_name());
    assert_err(
        &alice.get(&format!("profile/{}", enc(&nobody))).await,
        404,
        "M_NOT_FOUND",
    );
    // A server that cannot be reached: a 502 naming it.
    let (status, body) = alice.get(&format!("profile/{}", enc("@x:localhost:1"))).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("localhost:1"), "{body}");

    // Straight to B's federation listener.
    let client = https();
    let uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&bob.user_id));
    let url = fed_url(&b, &uri);
    let a_key = signing_key(&a);
    // Signed by A's own key, for B: accepted (B fetches A's key).
    let good = x_matrix("GET", &uri, b"", a.server_name(), b.server_name(), &a_key);
    let (status, body) = get_json(&client, &url, Some(&good)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"displayname": "Bob B"}));
    // `field` names one.
    let field_uri = format!("{uri}&field=avatar_url");
    let signed = x_matrix("GET", &field_uri, b"", a.server_name(), b.server_name(), &a_key);
    let (status, body) = get_json(&client, &fed_url(&b, &field_uri), Some(&signed)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({}));
    // A user B does not have.
    let nobody_uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&nobody));
    let signed = x_matrix("GET", &nobody_uri, b"", a.server_name(), b.server_name(), &a_key);
    assert_err(
        &get_json(&client, &fed_url(&b, &nobody_uri), Some(&signed)).await,
        404,
        "M_NOT_FOUND",
    );

    // No signature.
    assert_err(&get_json(&client, &url, None).await, 401, "M_UNAUTHORIZED");
    // A bearer token is no signature either.
    assert_err(
        &get_json(&client, &url, Some(&format!("Bearer {}", bob.access_token))).await,
        401,
        "M_UNAUTHORIZED",
    );
    // A valid header on another request (the URI is signed).
    let other_uri = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&alice.user_id));
    assert_err(
        &get_json(&client, &fed_url(&b, &other_uri), Some(&good)).await,
        401,
        "M_UNAUTHORIZED",
    );
    // A changed signature.
    // (The value is quoted only when it needs to be.)
    let sig_at = good.find("sig=").unwrap() + 4;
    let sig_at = if good.as_bytes()[sig_at] == b'"' {
        sig_at + 1
    } else {
        sig_at
    };
    let mut tampered = good.clone().into_bytes();
    tampered[sig_at] = if tampered[sig_at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_ne!(tampered, good);
    assert_err(&get_json(&client, &url, Some(&tampered)).await, 401, "M_UNAUTHORIZED");
    // Malformed.
    assert_err(
        &get_json(&client, &url, Some("X-Matrix origin=\"x\"")).await,
        401,
        "M_UNAUTHORIZED",
    );
    // Correctly signed, but for another destination.
    let elsewhere = x_matrix("GET", &uri, b"", a.server_name(), "other.example", &a_key);
    assert_err(&get_json(&client, &url, Some(&elsewhere)).await, 401, "M_UNAUTHORIZED");
    // Signed as a server whose keys cannot be fetched.
    let stranger = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "x".into()).unwrap();
    let unknown = x_matrix("GET", &uri, b"", "localhost:1", b.server_name(), &stranger);
    assert_err(&get_json(&client, &url, Some(&unknown)).await, 401, "M_UNAUTHORIZED");
    // Signed as A, but with another key under A's key ID.
    let impostor = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), a_key.version().to_owned()).unwrap();
    let forged = x_matrix("GET", &uri, b"", a.server_name(), b.server_name(), &impostor);
    assert_err(&get_json(&client, &url, Some(&forged)).await, 401, "M_UNAUTHORIZED");
    // The server keeps serving.
    let (status, _) = get_json(&client, &url, Some(&good)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn well_known_server_delegation() {
    let delegated = TestServer::builder()
        .env("WEFT_FEDERATION__WELL_KNOWN_SERVER", "fed.example.org:443")
        .start()
        .await;
    let (status, body) = delegated.anon().get("/.well-known/matrix/server").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"m.server": "fed.example.org:443"}));
    let plain = TestServer::start().await;
    assert_err(
        &plain.anon().get("/.well-known/matrix/server").await,
        404,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn federation_listener_speaks_tls() {
    let server = TestServer::start().await;
    let addr = server
        .federation_addr()
        .expect("the federation listener's address is printed");
    assert!(
        server
            .log_tail(100)
            .contains(&format!("weft: federation listening on https://{addr}"))
    );
    // Plain HTTP gets no answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{addr}/_matrix/federation/v1/version"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // HTTPS (the certificate is self-signed) does.
    let (status, body) = get_json(&https(), &format!("https://{addr}/_matrix/federation/v1/version"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server"]["name"], "Weft");
    assert_eq!(body["server"]["version"], env!("CARGO_PKG_VERSION"));
    // Federation endpoints are not on the client listener, nor client ones
    // on the federation listener.
    assert_err(
        &server.anon().get("/_matrix/federation/v1/version").await,
        404,
        "M_UNRECOGNIZED",
    );
    assert_err(
        &get_json(&https(), &format!("https://{addr}/_matrix/client/versions"), None).await,
        404,
        "M_UNRECOGNIZED",
    );
    // No listener with `listen = ""`.
    let none = TestServer::builder().env("WEFT_FEDERATION__LISTEN", "").start().await;
    assert_eq!(none.federation_addr(), None);
}
