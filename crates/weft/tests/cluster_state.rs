//! Several `weft serve` processes on one PostgreSQL database
//! (docs/scale-out.md): what used to live in one process's memory works
//! across them. A user-interactive auth flow may continue on another
//! process; a logout or deactivation on one process (or by the admin CLI
//! writing to the database itself) ends the open connections of that
//! token on the others at once, not after their idle re-check.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How soon a connection on one process must end after its token was
/// revoked on another (the idle re-check alone takes 30 s).
const PROMPT: Duration = Duration::from_secs(5);

async fn cluster() -> Option<Vec<TestServer>> {
    TestServer::builder().start_cluster(2).await
}

/// An idle WebSocket connection (no sync loop) with `token`.
async fn ws(server: &TestServer, token: &str) -> Ws {
    let url = format!(
        "{}/_matrix/client/unstable/org.weft.ws",
        server.base_url().replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("ws connect");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Waits for the socket to be closed with a close frame; answers its
/// code and how long it took. Panics after `within`.
async fn closed_within(ws: &mut Ws, within: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_)))) => {}
            Err(_) => panic!("the socket was not closed within {within:?}"),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

// Registration's dummy stage: the first request (no auth) on one process
// starts the session, the completing one on the other finishes it. Then
// /delete_devices: asked on the second, answered with the password on
// the first. A session nobody issued is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uia_flows_continue_on_another_process() {
    let Some(servers) = cluster().await else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let password = "a-long-password-for-carol";
    let (st, first) = a
        .anon()
        .post("register", json!({"username": "carol", "password": password}))
        .await;
    assert_eq!(st, 401, "{first}");
    let session = first["session"].as_str().expect("a UIA session").to_owned();
    let (st, done) = b
        .anon()
        .post(
            "register",
            json!({"username": "carol", "password": password,
                   "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await;
    assert_eq!(st, 200, "the session started on the other process: {done}");
    assert_eq!(done["user_id"], b.user_id("carol"));
    // Finished: the same session cannot register again, on either process.
    let (st, again) = a
        .anon()
        .post(
            "register",
            json!({"username": "carol2", "password": password,
                   "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await;
    assert_eq!(st, 400, "a finished session is gone: {again}");
    let (st, unknown) = b
        .anon()
        .post(
            "register",
            json!({"username": "carol3", "password": password,
                   "auth": {"type": "m.login.dummy", "session": "never-issued"}}),
        )
        .await;
    assert_eq!(st, 400, "{unknown}");

    let carol = a.login("carol", password).await;
    let phone = a.login("carol", password).await;
    let (st, ask) = b
        .with_token(&carol.access_token)
        .post("delete_devices", json!({"devices": [phone.device_id]}))
        .await;
    assert_eq!(st, 401, "{ask}");
    let session = ask["session"].as_str().expect("a UIA session").to_owned();
    let (st, ok) = a
        .with_token(&carol.access_token)
        .post(
            "delete_devices",
            json!({"devices": [phone.device_id],
                   "auth": {"type": "m.login.password", "session": session,
                            "identifier": {"type": "m.id.user", "user": "carol"}, "password": password}}),
        )
        .await;
    assert_eq!(st, 200, "{ok}");
    let (st, devices) = b.with_token(&carol.access_token).get("devices").await;
    assert_eq!(st, 200, "{devices}");
    let ids: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    // The device made by registering and carol's stay; the phone is gone.
    assert_eq!(ids.len(), 2, "{devices}");
    assert!(ids.contains(&carol.device_id.as_str()), "{devices}");
    assert!(!ids.contains(&phone.device_id.as_str()), "{devices}");
}

// A logout on one process closes an idle WebSocket connection of that
// token on the other within seconds (through the stream, not the 30 s
// idle re-check); another device's connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_one_process_ends_connections_on_the_other() {
    let Some(servers) = cluster().await else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let alice = a.register("alice").await;
    let other = a.login("alice", &alice.password).await;
    let mut doomed = ws(a, &alice.access_token).await;
    let mut kept = ws(a, &other.access_token).await;
    // Idle long enough that the first check is behind it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let (st, v) = b.with_token(&alice.access_token).post("logout", json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(closed_within(&mut doomed, PROMPT).await, 1008);
    eprintln!("closed {:?} after the logout on the other process", started.elapsed());
    // The other device's connection is not touched.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), kept.next())
            .await
            .is_err(),
        "the other device's connection must stay open and quiet"
    );
    let (st, _) = a.with_token(&other.access_token).get("account/whoami").await;
    assert_eq!(st, 200);
}

// The admin CLI on PostgreSQL writes to the database as one more process
// (docs/scale-out.md): with one server stopped, `weft user deactivate`
// run on its data directory opens the database itself while the other
// server runs, and that server's clients see it at once: an open
// connection of the user ends, the token no longer works, the user list
// shows the deactivation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_on_the_database_is_seen_by_running_servers_at_once() {
    let Some(mut servers) = cluster().await else {
        return;
    };
    let alice = servers[0].register("alice").await;
    let mut conn = ws(&servers[0], &alice.access_token).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // No server runs on the second data directory: the CLI opens the
    // database there (it would go through the admin socket otherwise).
    servers[1].terminate(Duration::from_secs(15)).await;
    let started = Instant::now();
    let (ok, out, err) = servers[1].cli("user", "deactivate", &["alice"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("deactivated"), "{out}");
    assert_eq!(closed_within(&mut conn, PROMPT).await, 1008);
    eprintln!("closed {:?} after the CLI started", started.elapsed());
    let (st, v) = servers[0].with_token(&alice.access_token).get("account/whoami").await;
    assert_err(&(st, v), 401, "M_UNKNOWN_TOKEN");
    let (ok, out, err) = servers[0].cli("user", "list", &[]);
    assert!(ok, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&alice.user_id))
        .unwrap_or_else(|| panic!("alice listed: {out}"));
    assert!(line.contains("deactivated"), "{out}");
}

/// Polls `whoami` on `server` with `token` until it answers `status`;
/// panics after [`PROMPT`]. Answers how long it took.
async fn whoami_becomes(server: &TestServer, token: &str, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        let (st, v) = server.with_token(token).get("account/whoami").await;
        if st == status {
            if status == 401 {
                assert_eq!(v["errcode"], "M_UNKNOWN_TOKEN", "{v}");
            }
            return started.elapsed();
        }
        assert!(started.elapsed() < PROMPT, "whoami still {st} after {PROMPT:?}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Each process keeps the access tokens it resolved in memory; a token
// ended on another process stops working here at once: by a logout, and
// by a new login on the same device ID (which replaces the device's
// token). Tokens of other devices keep working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_ended_on_one_process_stop_on_the_other() {
    let Some(servers) = cluster().await else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let alice = a.register("alice").await;
    let phone = a.login_device("alice", &alice.password, "PHONE").await;
    let laptop = a.login("alice", &alice.password).await;
    // Resolved (and so cached) on A.
    for token in [&alice.access_token, &phone.access_token, &laptop.access_token] {
        whoami_becomes(a, token, 200).await;
    }

    // A new login on B with PHONE's device ID replaces PHONE's token.
    let phone2 = b.login_device("alice", &alice.password, "PHONE").await;
    let took = whoami_becomes(a, &phone.access_token, 401).await;
    eprintln!("the replaced token failed on the other process after {took:?}");
    let (st, v) = a.with_token(&phone2.access_token).get("account/whoami").await;
    assert_eq!((st, v["device_id"].as_str()), (200, Some("PHONE")), "{v}");

    // A logout on B (the token used on A again just before).
    whoami_becomes(a, &alice.access_token, 200).await;
    let (st, v) = b.with_token(&alice.access_token).post("logout", json!({})).await;
    assert_eq!(st, 200, "{v}");
    let took = whoami_becomes(a, &alice.access_token, 401).await;
    eprintln!("the logged-out token failed on the other process after {took:?}");

    // The other device was never touched.
    let (st, v) = a.with_token(&laptop.access_token).get("account/whoami").await;
    assert_eq!(st, 200, "{v}");
}

// A client's retry may reach another process: the same transaction ID
// answers the first event's ID on every process, before and after
// messages in between, and the room holds the event once. A transaction
// ID reused in another room is a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_through_another_process_answers_the_first_event() {
    let Some(servers) = cluster().await else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let alice = a.register("alice").await;
    let on_b = b.with_token(&alice.access_token);
    let room = alice.create_room(json!({})).await;
    let first = alice.send_text(&room, "t1", "once").await;
    assert_eq!(on_b.send_text(&room, "t1", "once").await, first);
    let between = on_b.send_text(&room, "t2", "between").await;
    assert_ne!(between, first);
    assert_eq!(alice.send_text(&room, "t1", "once").await, first);
    assert_eq!(on_b.send_text(&room, "t1", "once").await, first);
    let other_room = alice.create_room(json!({})).await;
    assert_ne!(on_b.send_text(&other_room, "t1", "once").await, first);
    let bodies = alice.message_bodies(&room).await;
    assert_eq!(bodies, ["once", "between"]);
}
