//! Helpers for tests with two federating Weft servers
//! ([`TestServerBuilder::federating`]): the admin commands of the outgoing
//! queue, and a room shared by a user of each server.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use base64::Engine;
use ruma::OwnedServerName;
use ruma::api::federation::authentication::{ServerSignaturesInput, XMatrix};
use ruma::signatures::Ed25519KeyPair;
use serde_json::Value;

use super::*;

/// An HTTPS client for the federation listeners (self-signed certificates).
pub fn https() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTPS client")
}

/// `path` on `server`'s federation listener.
pub fn fed_url(server: &TestServer, path: &str) -> String {
    format!(
        "https://{}{path}",
        server.federation_addr().expect("a federation listener")
    )
}

/// The server's signing key, read from its data directory as the server
/// keeps it (`ed25519 <version> <base64 PKCS#8>`).
pub fn signing_key(server: &TestServer) -> Ed25519KeyPair {
    let text = std::fs::read_to_string(server.data_dir.join("signing.key")).expect("signing.key");
    let parts: Vec<&str> = text.split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(parts[2])
        .expect("base64 key");
    Ed25519KeyPair::from_der(&der, parts[1].to_owned()).expect("an ed25519 key")
}

/// An `Authorization: X-Matrix` value for `method uri` (with `body`, JSON)
/// from `origin` to `destination`, signed with `key`.
pub fn x_matrix(method: &str, uri: &str, body: &[u8], origin: &str, destination: &str, key: &Ed25519KeyPair) -> String {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(body.to_vec())
        .expect("a request");
    let input = ServerSignaturesInput::new(
        OwnedServerName::try_from(origin).expect("origin"),
        OwnedServerName::try_from(destination).expect("destination"),
        key,
    );
    let header = XMatrix::try_from_http_request(&req, input).expect("a signature");
    http::HeaderValue::from(&header).to_str().expect("ascii").to_owned()
}

/// `method path` with the raw `body` on `to`'s federation listener, signed
/// as `from` with its key over `signed_body` (the JSON the signature
/// covers; `body` itself when it is JSON).
pub async fn signed_raw(
    from: &TestServer,
    to: &TestServer,
    method: &str,
    path: &str,
    signed_body: &[u8],
    body: Vec<u8>,
) -> reqwest::Response {
    let auth = x_matrix(
        method,
        path,
        signed_body,
        from.server_name(),
        to.server_name(),
        &signing_key(from),
    );
    let mut out = https()
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
            fed_url(to, path),
        )
        .header("Authorization", auth);
    if !body.is_empty() {
        out = out.header("Content-Type", "application/json").body(body);
    }
    out.send().await.expect(path)
}

/// `method path` (with a JSON body) on `to`'s federation listener, signed
/// as `from` with its key: the status and the JSON answer (null when not
/// JSON).
pub async fn signed(from: &TestServer, to: &TestServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| serde_json::to_vec(&b).expect("JSON")).unwrap_or_default();
    let resp = signed_raw(from, to, method, path, &bytes, bytes.clone()).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `GET path` on `to`'s federation listener, signed as `from`.
pub async fn signed_get(from: &TestServer, to: &TestServer, path: &str) -> (u16, Value) {
    signed(from, to, "GET", path, None).await
}

/// Two federating servers, A and B.
pub async fn two_servers() -> (TestServer, TestServer) {
    two_servers_with(&[]).await
}

/// Two federating servers with the same extra environment (e.g. a short
/// `WEFT_FEDERATION__RETRY_MAX_MS`).
pub async fn two_servers_with(env: &[(&str, &str)]) -> (TestServer, TestServer) {
    let mut a = TestServer::builder().federating();
    let mut b = TestServer::builder().federating();
    for (k, v) in env {
        a = a.env(k, v);
        b = b.env(k, v);
    }
    (a.start().await, b.start().await)
}

/// One row of `weft federation destinations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRow {
    pub name: String,
    pub pdus: u64,
    pub edus: u64,
    pub backoff_ms: u64,
    pub retry: String,
    pub last_success: String,
    pub last_error: String,
}

/// `weft federation destinations` of a running server, parsed.
pub fn destinations(server: &TestServer) -> Vec<DestinationRow> {
    let (ok, out, err) = server.cli("federation", "destinations", &[]);
    assert!(ok, "weft federation destinations: {out}{err}");
    out.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 7, "a destinations row has 7 columns: {line:?}");
            DestinationRow {
                name: f[0].into(),
                pdus: f[1].parse().expect("pdus"),
                edus: f[2].parse().expect("edus"),
                backoff_ms: f[3].parse().expect("backoff"),
                retry: f[4].into(),
                last_success: f[5].into(),
                last_error: f[6].into(),
            }
        })
        .collect()
}

/// The destinations row of `name` once `pred` holds for it (panics after
/// `within`, showing the last rows seen).
pub async fn wait_destination(
    server: &TestServer,
    name: &str,
    within: Duration,
    pred: impl Fn(&DestinationRow) -> bool,
) -> DestinationRow {
    let deadline = Instant::now() + within;
    loop {
        let rows = destinations(server);
        if let Some(row) = rows.iter().find(|r| r.name == name && pred(r)) {
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "destination {name} never as expected; rows: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `weft federation queue-edu` on `from`: an EDU for `to`, sent by the
/// queue.
pub fn queue_edu(from: &TestServer, to: &str, edu_type: &str, content: &Value) {
    let (ok, out, err) = from.cli("federation", "queue-edu", &[to, edu_type, &content.to_string()]);
    assert!(ok, "weft federation queue-edu: {out}{err}");
}

/// `weft federation send-transaction` on `from`: a signed `PUT
/// /send/{txn_id}` to `to` now. Ok: the answer's JSON; Err: the CLI's
/// error output.
pub fn send_transaction(from: &TestServer, to: &str, txn_id: &str, body: &Value) -> Result<Value, String> {
    let (ok, out, err) = from.cli("federation", "send-transaction", &[to, txn_id, &body.to_string()]);
    if !ok {
        return Err(format!("{out}{err}"));
    }
    serde_json::from_str(out.trim()).map_err(|e| format!("not JSON ({e}): {out}"))
}

/// A room of `a_user` (on server A) that `b_user` (on server B) joined
/// over federation; its ID. Uses the client API's remote join
/// (`POST /join/{roomId}?server_name=A`), which needs the join endpoints
/// (`/make_join`, `/send_join`) on A: until they exist this fails.
pub async fn make_shared_room(a: &TestServer, a_user: &Client, b_user: &Client) -> String {
    let room = a_user.create_room(serde_json::json!({ "preset": "public_chat" })).await;
    let path = format!("join/{}?server_name={}", enc(&room), enc(a.server_name()));
    let (status, body) = b_user.post(&path, serde_json::json!({})).await;
    assert_eq!(status, 200, "remote join of {room}: {body}");
    room
}

/// Lines of `server`'s log (all its runs) containing every one of `parts`.
pub fn log_lines(server: &TestServer, parts: &[&str]) -> Vec<String> {
    std::fs::read_to_string(server.stderr_log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}
