//! The WebSocket door: Client-Server API requests over one socket, and
//! server-pushed sync frames.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WS_PATH: &str = "/_matrix/client/unstable/org.weft.ws";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_url(server: &TestServer, query: &str) -> String {
    format!("{}{WS_PATH}{query}", server.base_url().replacen("http://", "ws://", 1))
}

/// Connects, with the token as `Authorization: Bearer` when given.
async fn connect(server: &TestServer, token: Option<&str>) -> Ws {
    let mut req = ws_url(server, "").into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("ws connect");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.expect("ws send");
}

/// The next JSON text frame (pings and pongs skipped), within 40 s.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(40), ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("frame is JSON"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Sends a request frame and waits for its response (no other traffic expected).
async fn call(ws: &mut Ws, id: Value, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut frame = json!({"id": id, "method": method, "path": path});
    if let Some(b) = body {
        frame["body"] = b;
    }
    send_json(ws, frame).await;
    let resp = next_json(ws).await;
    assert_eq!(resp["id"], id, "id not echoed: {resp}");
    resp
}

#[tokio::test]
async fn ws_requests_reuse_http_handlers() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mut ws = connect(&server, Some(&alice.access_token)).await;

    let r = call(&mut ws, json!("w1"), "GET", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["user_id"], alice.user_id.as_str());
    assert_eq!(r["body"]["device_id"], alice.device_id.as_str());

    let r = call(
        &mut ws,
        json!(7),
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(json!({"name": "ws"})),
    )
    .await;
    assert_eq!(r["status"], 200, "{r}");
    let room = r["body"]["room_id"].as_str().expect("room_id").to_string();

    let content = json!({"msgtype": "m.text", "body": "over the socket", "n": [1, 2, {"x": true}]});
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/ws-txn-1", enc(&room));
    let r = call(&mut ws, json!({"k": [1, "two"]}), "PUT", &path, Some(content.clone())).await;
    assert_eq!(r["status"], 200, "{r}");
    let event_id = r["body"]["event_id"].as_str().expect("event_id").to_string();

    // Same txn id again: same event (the HTTP handler's idempotency).
    let r = call(&mut ws, json!(8), "PUT", &path, Some(content.clone())).await;
    assert_eq!(r["body"]["event_id"], event_id.as_str(), "{r}");

    // Visible via plain HTTP, same content.
    let msgs = alice.all_messages(&room).await;
    let ev = msgs
        .iter()
        .find(|e| e["event_id"] == event_id.as_str())
        .unwrap_or_else(|| panic!("event {event_id} not in /messages"));
    assert_eq!(ev["content"], content);
    assert_eq!(ev["sender"], alice.user_id.as_str());

    // Query strings pass through.
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room));
    let r = call(&mut ws, json!(9), "GET", &path, None).await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["chunk"][0]["event_id"], event_id.as_str(), "{r}");

    let r = call(
        &mut ws,
        json!("nope"),
        "GET",
        "/_matrix/client/v3/no/such/endpoint",
        None,
    )
    .await;
    assert_eq!(r["status"], 404, "{r}");
    assert_eq!(r["body"]["errcode"], "M_UNRECOGNIZED");

    ws.send(Message::Text("this is not json".into())).await.unwrap();
    let r = next_json(&mut ws).await;
    assert_eq!(r["id"], Value::Null, "{r}");
    assert_eq!(r["status"], 400, "{r}");
    assert_eq!(r["body"]["errcode"], "M_NOT_JSON");

    // Bad frame shape: the id is still echoed.
    let r = call(&mut ws, json!(10), "PATCH", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(r["status"], 400, "{r}");
    assert_eq!(r["body"]["errcode"], "M_BAD_JSON");

    // Still usable after the errors.
    let r = call(&mut ws, json!(11), "GET", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(r["status"], 200, "{r}");
}

#[tokio::test]
async fn ws_auth_header_query_and_frame() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    // No token: authenticated endpoints answer 401 M_MISSING_TOKEN.
    let mut ws = connect(&server, None).await;
    let r = call(&mut ws, json!(1), "GET", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(r["status"], 401, "{r}");
    assert_eq!(r["body"]["errcode"], "M_MISSING_TOKEN");
    // Unauthenticated endpoints work.
    let r = call(&mut ws, json!(2), "GET", "/_matrix/client/versions", None).await;
    assert_eq!(r["status"], 200, "{r}");
    // Sync needs a token too.
    send_json(&mut ws, json!({"type": "sync", "id": 3})).await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["body"]["errcode"], "M_MISSING_TOKEN", "{r}");

    // A wrong token in an auth frame is refused; the right one sticks.
    send_json(&mut ws, json!({"type": "auth", "id": 4, "access_token": "wrong"})).await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["status"], 401, "{r}");
    assert_eq!(r["body"]["errcode"], "M_UNKNOWN_TOKEN");
    send_json(
        &mut ws,
        json!({"type": "auth", "id": 5, "access_token": alice.access_token}),
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["user_id"], alice.user_id.as_str());
    let r = call(&mut ws, json!(6), "GET", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(r["body"]["user_id"], alice.user_id.as_str(), "{r}");

    // ?access_token= on the upgrade request.
    let url = ws_url(&server, &query(&[("access_token", &alice.access_token)]));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    let r = call(&mut ws, json!(1), "GET", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(r["body"]["user_id"], alice.user_id.as_str(), "{r}");

    // An invalid token on the upgrade request: plain HTTP 401, no socket.
    let mut req = ws_url(&server, "").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }

    // Logging out the token closes the socket (1008).
    let mut ws = connect(&server, Some(&alice.access_token)).await;
    let (status, _) = alice.post("logout", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(close_code(&mut ws, true).await, 1008);
}

#[tokio::test]
async fn ws_sync_pushes_every_event_once_in_order() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let mut ws = connect(&server, Some(&alice.access_token)).await;

    send_json(
        &mut ws,
        json!({"type": "sync", "filter": serde_json::from_str::<Value>(BIG_TIMELINE_FILTER).unwrap()}),
    )
    .await;
    // The initial sync comes first.
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "sync", "{first}");
    assert!(first["body"]["next_batch"].is_string(), "{first}");
    assert!(first["body"]["rooms"]["join"][&room].is_object(), "{first}");

    // A second sync loop on the same connection is refused.
    send_json(&mut ws, json!({"type": "sync", "id": "again"})).await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["id"], "again", "{r}");
    assert_eq!(r["status"], 400, "{r}");

    for i in 0..20u64 {
        alice
            .send(&room, "org.weft.telemetry", &format!("t{i}"), json!({"seq": i}))
            .await;
    }

    let mut seqs = Vec::new();
    let mut ids = HashSet::new();
    while seqs.len() < 20 {
        let f = next_json(&mut ws).await;
        assert_eq!(f["type"], "sync", "{f}");
        let tl = &f["body"]["rooms"]["join"][&room]["timeline"];
        assert_ne!(tl["limited"], true, "events lost: {f}");
        for ev in tl["events"].as_array().into_iter().flatten() {
            if ev["type"] == "org.weft.telemetry" {
                assert!(
                    ids.insert(ev["event_id"].as_str().unwrap().to_string()),
                    "duplicate {ev}"
                );
                seqs.push(ev["content"]["seq"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());

    // Nothing more arrives (no repeats); requests still work alongside the loop.
    let r = call(
        &mut ws,
        json!("after"),
        "GET",
        "/_matrix/client/v3/account/whoami",
        None,
    )
    .await;
    assert_eq!(r["status"], 200, "{r}");
    if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_millis(1500), ws.next()).await {
        panic!("unexpected frame after all events: {t}");
    }
}

// The sync push carries what /sync carries: bob's loop gets alice's
// typing notice (no event in the room) as the room's m.typing.
#[tokio::test]
async fn ws_sync_pushes_typing() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let mut ws = connect(&server, Some(&bob.access_token)).await;
    send_json(&mut ws, json!({"type": "sync"})).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "sync", "{first}");
    assert!(first["body"]["rooms"]["join"][&room].is_object(), "{first}");

    let (st, body) = alice
        .put(
            &format!("rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
            json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // Presence changes may come first; the typing notice within a few frames.
    for _ in 0..4 {
        let f = next_json(&mut ws).await;
        assert_eq!(f["type"], "sync", "{f}");
        let eph = &f["body"]["rooms"]["join"][&room]["ephemeral"]["events"];
        if let Some(t) = eph.as_array().and_then(|a| a.iter().find(|e| e["type"] == "m.typing")) {
            assert_eq!(t["content"]["user_ids"], json!([alice.user_id]), "{f}");
            return;
        }
    }
    panic!("no m.typing pushed");
}

#[tokio::test]
async fn ws_slow_consumer_is_closed_with_1008() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;

    // A client with a tiny receive buffer that stops reading.
    let addr: std::net::SocketAddr = server.base_url().trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let mut req = ws_url(&server, "").into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", alice.access_token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .expect("ws connect");
    send_json(&mut ws, json!({"type": "sync"})).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "sync", "{first}");

    // Each event becomes (about) one pushed frame; far more than the
    // 64-frame queue plus what the kernel buffers.
    let filler = "x".repeat(40_000);
    for i in 0..600 {
        let (status, body) = alice
            .send_raw(
                &room,
                "org.weft.telemetry",
                &format!("big{i}"),
                json!({"seq": i, "pad": filler}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // A consumer that stays away a while longer (as a loaded machine makes
    // this test's) still gets the close frame once it reads.
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Reading now: buffered frames, then a close frame with 1008.
    let mut code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                code = Some(u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    }
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn ws_oversized_frame_ends_the_connection() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mut ws = connect(&server, Some(&alice.access_token)).await;
    // Over the default 1 MiB `limits.max_body_bytes`.
    let big = json!({"id": 1, "method": "POST", "path": "/_matrix/client/v3/createRoom", "body": {"name": "x".repeat(2 << 20)}});
    let _ = ws.send(Message::Text(big.to_string().into())).await;
    // A 1009 close frame, or a reset when the rest of the frame was still
    // unread as the server dropped the socket; never a response.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 1009, "{f:?}");
                break;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(None | Some(Err(_))) => break,
            other => panic!("expected the connection to end, got {other:?}"),
        }
    }
    // The server is fine and no room was created.
    let mut ws = connect(&server, Some(&alice.access_token)).await;
    let r = call(&mut ws, json!(2), "GET", "/_matrix/client/v3/joined_rooms", None).await;
    assert_eq!(r["body"]["joined_rooms"], json!([]), "{r}");
}

/// Reads until a close frame; panics on an end without one, and (if
/// `strict`) on a sync frame with content. Returns the close code.
async fn close_code(ws: &mut Ws, strict: bool) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert!(
                    !strict || v["body"]["rooms"].is_null(),
                    "delivered after revocation: {v}"
                );
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// A socket whose token is revoked by this server (logout, a password
/// change logging out the other devices, deactivation) is closed at once
/// with 1008, its sync loop delivering nothing more; one revoked by
/// another process (`weft user revoke`) gets nothing more either: its sync
/// loop ends with M_UNKNOWN_TOKEN and the socket is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_revoked_token_closes_the_socket_and_stops_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    // Logout (token given on the upgrade), sync loop running.
    let dev = server.login("alice", &alice.password).await;
    let mut ws = connect(&server, Some(&dev.access_token)).await;
    send_json(&mut ws, json!({"type": "sync", "id": 1})).await;
    assert!(next_json(&mut ws).await["body"]["next_batch"].is_string());
    let (st, v) = dev.post("logout", json!({})).await;
    assert_eq!(st, 200, "{v}");
    alice.send_text(&room, "t1", "after logout").await;
    assert_eq!(close_code(&mut ws, true).await, 1008);

    // Password change with logout (token given in an auth frame).
    let dev = server.login("alice", &alice.password).await;
    let mut ws = connect(&server, None).await;
    send_json(
        &mut ws,
        json!({"type": "auth", "id": 1, "access_token": dev.access_token}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["status"], 200);
    let new_password = "another-long-password-for-alice";
    let (st, v) = alice
        .post(
            "account/password",
            json!({
                "new_password": new_password,
                "logout_devices": true,
                "auth": {"type": "m.login.password", "user": "alice", "password": alice.password},
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(close_code(&mut ws, true).await, 1008);

    // Another process revokes the device: nothing more is delivered.
    let dev = server.login("alice", new_password).await;
    let mut ws = connect(&server, Some(&dev.access_token)).await;
    send_json(&mut ws, json!({"type": "sync", "id": 2})).await;
    assert!(next_json(&mut ws).await["body"]["next_batch"].is_string());
    let (ok, out, err) = server.cli("user", "revoke", &["alice", &dev.device_id]);
    assert!(ok, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    alice.send_text(&room, "t2", "after revoke").await;
    // The sync loop finds out: its error frame (401 M_UNKNOWN_TOKEN), and
    // the socket is closed (1008); the event is never delivered.
    let mut saw = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(
                    (f["type"].as_str(), f["status"].as_u64()),
                    (Some("sync"), Some(401)),
                    "{f}"
                );
                assert_eq!(f["body"]["errcode"], "M_UNKNOWN_TOKEN", "{f}");
                saw.push("error frame".to_owned());
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                saw.push(format!("close {}", u16::from(f.code)));
                break;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(None | Some(Err(_))) => break,
            other => panic!("expected the socket to close, got {other:?}"),
        }
    }
    assert!(
        saw.iter().any(|s| s == "error frame" || s == "close 1008"),
        "neither an error frame nor a close: {saw:?}"
    );

    // Deactivation.
    let alice2 = server.login("alice", new_password).await;
    let mut ws = connect(&server, Some(&alice2.access_token)).await;
    send_json(&mut ws, json!({"type": "sync", "id": 4})).await;
    assert!(next_json(&mut ws).await["body"]["next_batch"].is_string());
    let (st, v) = alice2
        .post(
            "account/deactivate",
            json!({"auth": {"type": "m.login.password", "user": "alice", "password": new_password}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // (Leaving its rooms comes first, and may be delivered.)
    assert_eq!(close_code(&mut ws, false).await, 1008);
}
