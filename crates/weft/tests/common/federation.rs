//! Helpers for tests with two federating Weft servers
//! ([`TestServerBuilder::federating`]): the admin commands of the outgoing
//! queue, and a room shared by a user of each server.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

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
