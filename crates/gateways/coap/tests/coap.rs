//! End-to-end tests of the CoAP door: the real `weft` binary, real UDP.

mod common;

use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType as M, ResponseType as R};
use common::{Client, Request, Server, cbor, coap_client, create_room, enc, register, uint_opt, uncbor};
use serde_json::{Value, json};

fn send_path(room: &str) -> String {
    format!("/_m/c/a/v1/r/{room}/s/m.room.message")
}

/// The talk's example, exactly: POST /_m/c/a/v1/r/ROOM/s/m.room.message?a=TOKEN
/// with a CBOR body, read back over HTTP.
#[tokio::test]
async fn talk_compact_post_creates_message() {
    let s = Server::start().await;
    let (token, user) = register(&s, "alice").await;
    let room = create_room(&s, &token).await;
    let mut c = Client::new(s.coap).await;
    let content = json!({"msgtype": "m.text", "body": "hello"});
    let path = send_path(&room);
    let (code, v) = c
        .call_cbor(Request::new(M::Post, &path).q("a", &token).cbor(&content))
        .await;
    assert_eq!(code, R::Created, "{v}");
    let event_id = v["event_id"].as_str().expect("event_id in CBOR response").to_owned();
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["event_id"], event_id.as_str());
    assert_eq!(msgs[0]["content"], content);
    assert_eq!(msgs[0]["sender"], user.as_str());

    // What the talk's `perl -MCBOR::XS` pipeline sends: byte strings.
    let mut r = Request::new(M::Post, &path).q("a", &token);
    r.payload = b"\xa2\x47msgtype\x46m.text\x44body\x45hello".to_vec();
    let (code, v) = c.call_cbor(r).await;
    assert_eq!(code, R::Created, "{v}");
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1]["event_id"], v["event_id"]);
    assert_eq!(msgs[1]["content"], content);

    // An empty payload is refused, as an empty HTTP body is.
    let (code, v) = c.call_cbor(Request::new(M::Post, &path).q("a", &token)).await;
    assert_eq!(code, R::BadRequest);
    assert_eq!(v["errcode"], "M_NOT_JSON");
}

/// The same with libcoap's `coap-client`, the CBOR piped on stdin.
#[tokio::test]
async fn talk_compact_post_with_libcoap_client() {
    let Some(bin) = coap_client() else { return };
    let (s, token, room) = Server::with_alice_and_room().await;
    let content = json!({"msgtype": "m.text", "body": "hello"});
    let uri = format!(
        "coap://{}/_m/c/a/v1/r/{}/s/m.room.message?a={}",
        s.coap,
        enc(&room),
        token
    );
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(bin)
            .args(["-m", "post", "-t", "60", "-f", "-", "-B", "5", &uri])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run coap-client");
        child.stdin.take().unwrap().write_all(&cbor(&content)).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "coap-client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = uncbor(&out.stdout);
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(
        msgs.len(),
        1,
        "coap-client stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(msgs[0]["content"], json!({"msgtype": "m.text", "body": "hello"}));
    assert_eq!(reply["event_id"], msgs[0]["event_id"]);
}

/// 20 telemetry readings with floats via PUT (full path, CBOR), then
/// `/messages` over HTTP; an HTTP event read back over CoAP `/sync`.
#[tokio::test]
async fn telemetry_in_order_with_exact_floats_and_sync_reads_http_event() {
    let s = Server::start().await;
    let (token, _) = register(&s, "sensor").await;
    let room = create_room(&s, &token).await;
    let mut c = Client::new(s.coap).await;
    // Token by MSC3079 option 256 on the first request; remembered after.
    let (code, v) = c
        .call_cbor(
            Request::new(M::Get, "/_matrix/client/v3/account/whoami")
                .opt(CoapOption::Unknown(256), token.as_bytes().to_vec()),
        )
        .await;
    assert_eq!(code, R::Content, "{v}");
    let mut ids = Vec::new();
    for i in 0..20 {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/org.weft.telemetry/t{i}");
        let reading = json!({"seq": i, "temp": 20.0 + i as f64 * 0.25 + 0.1});
        let (code, v) = c.call_cbor(Request::new(M::Put, &path).cbor(&reading)).await;
        assert_eq!(code, R::Changed, "{v}");
        ids.push(v["event_id"].as_str().unwrap().to_owned());
    }
    let msgs = s.http_messages(&token, &room, "org.weft.telemetry").await;
    assert_eq!(msgs.len(), 20);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["event_id"], ids[i].as_str());
        assert_eq!(m["content"]["seq"], i);
        let expect = format!("{}", 20.0 + i as f64 * 0.25 + 0.1);
        assert_eq!(m["content"]["temp"], expect.as_str(), "float kept as exact string");
    }

    // Sync position now, then an HTTP event, then CoAP /sync since then.
    let (code, first) = c.call_cbor(Request::new(M::Get, "/_matrix/client/v3/sync")).await;
    assert_eq!(code, R::Content);
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let (st, sent) = s
        .with_token(&token)
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/h1", enc(&room)),
            json!({"msgtype": "m.text", "body": "from http"}),
        )
        .await;
    assert_eq!(st, 200);
    let (code, v) = c
        .call_cbor(
            Request::new(M::Get, "/_matrix/client/v3/sync")
                .q("since", &since)
                .q("timeout", "5000"),
        )
        .await;
    assert_eq!(code, R::Content);
    let tl = v["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .expect("timeline");
    assert_eq!(tl.len(), 1, "{v}");
    assert_eq!(tl[0]["event_id"], sent["event_id"]);
    assert_eq!(tl[0]["content"], json!({"msgtype": "m.text", "body": "from http"}));
}

/// A resent CON (same message ID) is answered from the cache: one event.
#[tokio::test]
async fn duplicate_con_stores_one_event_and_replays_response() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let mut c = Client::new(s.coap).await;
    let path = send_path(&room);
    let p = c.packet(
        &Request::new(M::Post, &path)
            .q("a", &token)
            .cbor(&json!({"msgtype": "m.text", "body": "once"})),
    );
    let first = c.send_packet(&p).await;
    let second = c.send_packet(&p).await;
    let third = c.send_packet(&p).await;
    assert_eq!(first.header.code, MessageClass::Response(R::Created));
    assert_eq!(first, second);
    assert_eq!(first, third);
    assert_eq!(first.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(first.header.message_id, p.header.message_id);
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(uncbor(&first.payload)["event_id"], msgs[0]["event_id"]);

    // NON requests get NON responses.
    let mut q = c.packet(&Request::new(M::Get, "/_matrix/client/versions"));
    q.header.set_type(MessageType::NonConfirmable);
    let r = c
        .raw(&q.to_bytes().unwrap(), Duration::from_secs(5))
        .await
        .expect("NON response");
    assert_eq!(r.header.get_type(), MessageType::NonConfirmable);
    assert!(uncbor(&r.payload)["versions"].is_array());
}

/// Errors carry the Matrix body in CBOR; bad datagrams don't hurt.
#[tokio::test]
async fn errors_and_garbage() {
    let s = Server::start_with(&[("WEFT_LIMITS__MAX_BODY_BYTES", "16384")]).await;
    let (token, _) = register(&s, "alice").await;
    let (other, _) = register(&s, "mallory").await;
    let room = create_room(&s, &token).await;
    let mut c = Client::new(s.coap).await;
    let path = send_path(&room);
    let body = json!({"msgtype": "m.text", "body": "x"});

    let (code, v) = c.call_cbor(Request::new(M::Post, &path).cbor(&body)).await;
    assert_eq!(code, R::Unauthorized);
    assert_eq!(v["errcode"], "M_MISSING_TOKEN");

    let (code, v) = c
        .call_cbor(Request::new(M::Post, &path).q("a", "nonsense").cbor(&body))
        .await;
    assert_eq!(code, R::Unauthorized);
    assert_eq!(v["errcode"], "M_UNKNOWN_TOKEN");

    let (code, v) = c
        .call_cbor(Request::new(M::Post, &path).q("a", &other).cbor(&body))
        .await;
    assert_eq!(code, R::Forbidden, "{v}");
    assert_eq!(v["errcode"], "M_FORBIDDEN");

    let (code, v) = c
        .call_cbor(Request::new(M::Get, &format!("/_matrix/client/v3/rooms/{room}/messages")).q("a", &other))
        .await;
    assert_eq!(code, R::Forbidden, "{v}");

    let (code, v) = c
        .call_cbor(Request::new(M::Get, "/_matrix/client/v3/nope").q("a", &token))
        .await;
    assert_eq!(code, R::NotFound);
    assert_eq!(v["errcode"], "M_UNRECOGNIZED");
    let (code, _) = c
        .call_cbor(Request::new(M::Delete, "/_matrix/client/v3/sync").q("a", &token))
        .await;
    assert_eq!(code, R::MethodNotAllowed);

    // Bad CBOR body.
    let mut r = Request::new(M::Post, &path).q("a", &token);
    r.payload = vec![0xa1, 0x61];
    r.content_format = Some(60);
    let (code, v) = c.call_cbor(r).await;
    assert_eq!(code, R::BadRequest);
    assert_eq!(v["errcode"], "M_NOT_JSON");

    // Garbage, truncated header, a CON with garbage options, oversized.
    let quiet = Duration::from_millis(300);
    assert!(c.raw(b"\xff\xff", quiet).await.is_none());
    assert!(c.raw(b"hello world, not coap", quiet).await.is_none());
    assert!(c.raw(&[0x40], quiet).await.is_none());
    // CON, token length 8 but no token bytes: answered with RST.
    let rst = c
        .raw(&[0x48, 0x01, 0x12, 0x34], quiet)
        .await
        .expect("RST for a broken CON");
    assert_eq!(rst.header.get_type(), MessageType::Reset);
    assert_eq!(rst.header.message_id, 0x1234);
    // CoAP ping.
    let rst = c.raw(&[0x40, 0x00, 0x22, 0x22], quiet).await.expect("pong");
    assert_eq!(rst.header.get_type(), MessageType::Reset);
    // An oversized request body: 4.13 with M_TOO_LARGE.
    let mut big = c.packet(&Request::new(M::Post, &path).q("a", &token));
    big.add_option(CoapOption::ContentFormat, vec![60]);
    big.payload = vec![0x60; 20_000];
    let resp = c.send_packet(&big).await;
    assert_eq!(resp.header.code, MessageClass::Response(R::RequestEntityTooLarge));
    assert_eq!(uncbor(&resp.payload)["errcode"], "M_TOO_LARGE");
    // Random junk of every length does not stop the door.
    for n in 0..64u8 {
        let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
        c.sock.send_to(&junk, s.coap).await.unwrap();
    }
    // Still serving.
    let (code, v) = c
        .call_cbor(Request::new(M::Post, &path).q("a", &token).cbor(&body))
        .await;
    assert_eq!(code, R::Created, "{v}");
    let (code, v) = c.call_cbor(Request::new(M::Get, "/_matrix/client/versions")).await;
    assert_eq!(code, R::Content);
    assert!(v["versions"].is_array());
}

/// The other routes: createRoom, join, state, whoami; JSON accepted (cf 50).
#[tokio::test]
async fn rooms_state_and_json_bodies() {
    let s = Server::start().await;
    let (alice, alice_id) = register(&s, "alice").await;
    let (bob, _) = register(&s, "bob").await;
    let mut a = Client::new(s.coap).await;
    let mut b = Client::new(s.coap).await;
    let (code, v) = a
        .call_cbor(
            Request::new(M::Post, "/_matrix/client/v3/createRoom")
                .q("a", &alice)
                .cbor(&json!({"preset": "public_chat", "name": "sensors"})),
        )
        .await;
    assert_eq!(code, R::Created, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (code, v) = b
        .call_cbor(Request::new(M::Post, &format!("/_matrix/client/v3/join/{room}")).q("access_token", &bob))
        .await;
    assert_eq!(code, R::Changed, "{v}");
    assert_eq!(v["room_id"], room.as_str());
    // State with a JSON body (Content-Format 50): floats kept exactly.
    let state_path = format!("/_matrix/client/v3/rooms/{room}/state/org.weft.device/KITCHEN");
    let mut r = Request::new(M::Put, &state_path).q("a", &alice);
    r.payload = br#"{"temp": 21.50, "unit": "C"}"#.to_vec();
    r.content_format = Some(50);
    let (code, v) = a.call_cbor(r).await;
    assert_eq!(code, R::Changed, "{v}");
    let (code, v) = b
        .call_cbor(Request::new(
            M::Get,
            &format!("/_matrix/client/v3/rooms/{room}/state/org.weft.device/KITCHEN"),
        ))
        .await;
    assert_eq!(code, R::Content, "{v}");
    assert_eq!(v, json!({"temp": "21.50", "unit": "C"}));
    let (code, v) = b
        .call_cbor(Request::new(M::Get, &format!("/_matrix/client/v3/rooms/{room}/state")))
        .await;
    assert_eq!(code, R::Content);
    let state = v.as_array().unwrap();
    assert!(
        state
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "sensors")
    );
    let (code, v) = a
        .call_cbor(Request::new(M::Get, "/_matrix/client/v3/account/whoami"))
        .await;
    assert_eq!(code, R::Content);
    assert_eq!(v["user_id"], alice_id.as_str());
    // Accept: JSON.
    let (code, body) = a
        .call(Request::new(M::Get, "/_matrix/client/v3/account/whoami").opt(CoapOption::Accept, vec![50]))
        .await;
    assert_eq!(code, R::Content);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["user_id"], alice_id.as_str());
}

/// A sync response larger than one block arrives in 1024-byte Block2 blocks.
#[tokio::test]
async fn large_sync_uses_block2() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let mut c = Client::new(s.coap).await;
    for i in 0..8 {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/b{i}");
        let body = json!({"msgtype": "m.text", "body": "x".repeat(300), "i": i});
        let (code, _) = c
            .call_cbor(Request::new(M::Put, &path).q("a", &token).cbor(&body))
            .await;
        assert_eq!(code, R::Changed);
    }
    let p =
        c.packet(&Request::new(M::Get, "/_matrix/client/v3/sync").q("filter", r#"{"room":{"timeline":{"limit":50}}}"#));
    let first = c.send_packet(&p).await;
    assert!(first.payload.len() <= 1024);
    assert!(
        first.get_first_option(CoapOption::Block2).is_some(),
        "first block carries Block2"
    );
    let (code, v) = c
        .call_cbor(Request::new(M::Get, "/_matrix/client/v3/sync").q("filter", r#"{"room":{"timeline":{"limit":50}}}"#))
        .await;
    assert_eq!(code, R::Content);
    let tl = v["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    let mine: Vec<&Value> = tl.iter().filter(|e| e["type"] == "m.room.message").collect();
    assert_eq!(mine.len(), 8);
    for (i, e) in mine.iter().enumerate() {
        assert_eq!(e["content"]["i"], i);
    }
}

/// Observe on /sync: a registration, then a notification per new batch.
#[tokio::test]
async fn observe_sync_pushes_new_events() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let mut c = Client::new(s.coap).await;
    let p = c.packet(
        &Request::new(M::Get, "/_matrix/client/v3/sync")
            .q("a", &token)
            .opt(CoapOption::Observe, vec![]),
    );
    let reg = c.send_packet(&p).await;
    assert_eq!(reg.header.code, MessageClass::Response(R::Content));
    assert!(
        reg.get_first_option(CoapOption::Observe).is_some(),
        "observe registered"
    );
    for i in 0..3 {
        let (st, sent) = s
            .with_token(&token)
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/o{i}", enc(&room)),
                json!({"msgtype": "m.text", "body": format!("n{i}")}),
            )
            .await;
        assert_eq!(st, 200);
        let n: Packet = c.recv(Duration::from_secs(5)).await.expect("notification");
        assert_eq!(n.header.get_type(), MessageType::Confirmable);
        assert_eq!(n.get_token(), p.get_token());
        assert!(n.get_first_option(CoapOption::Observe).is_some());
        c.ack(&n).await;
        let v = uncbor(&n.payload);
        let tl = v["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .expect("timeline");
        assert_eq!(tl.len(), 1, "{v}");
        assert_eq!(tl[0]["event_id"], sent["event_id"]);
    }
    // Answering a notification with RST ends the observation.
    let send = |i: u32| {
        let s = &s;
        let room = room.clone();
        let token = token.clone();
        async move {
            let (st, _) = s
                .with_token(&token)
                .put(
                    &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/r{i}", enc(&room)),
                    json!({"msgtype": "m.text", "body": "after"}),
                )
                .await;
            assert_eq!(st, 200);
        }
    };
    send(1).await;
    let n = c.recv(Duration::from_secs(5)).await.expect("notification");
    let mut rst = Packet::new();
    rst.header.set_type(MessageType::Reset);
    rst.header.code = MessageClass::Empty;
    rst.header.message_id = n.header.message_id;
    c.sock.send_to(&rst.to_bytes().unwrap(), s.coap).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    send(2).await;
    assert!(
        c.recv(Duration::from_millis(1500)).await.is_none(),
        "no notification after RST"
    );
}

/// Observe on /sync carries what /sync carries: a typing notice (no event
/// in the room) is notified with the room's `m.typing`.
#[tokio::test]
async fn observe_sync_pushes_typing() {
    let s = Server::start().await;
    let (alice, alice_id) = register(&s, "alice").await;
    let (bob, bob_id) = register(&s, "bob").await;
    let room = create_room(&s, &alice).await;
    let (st, body) = s
        .with_token(&alice)
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            json!({"user_id": bob_id}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = s
        .with_token(&bob)
        .post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({}))
        .await;
    assert_eq!(st, 200, "{body}");
    let mut c = Client::new(s.coap).await;
    let p = c.packet(
        &Request::new(M::Get, "/_matrix/client/v3/sync")
            .q("a", &bob)
            .opt(CoapOption::Observe, vec![]),
    );
    let reg = c.send_packet(&p).await;
    assert_eq!(reg.header.code, MessageClass::Response(R::Content));
    assert!(reg.get_first_option(CoapOption::Observe).is_some());
    let (st, body) = s
        .with_token(&alice)
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice_id)),
            json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // Alice's presence may come first; the typing notice within a few.
    for _ in 0..4 {
        let n: Packet = c.recv(Duration::from_secs(5)).await.expect("notification");
        c.ack(&n).await;
        let v = uncbor(&n.payload);
        let eph = &v["rooms"]["join"][&room]["ephemeral"]["events"];
        if let Some(t) = eph.as_array().and_then(|a| a.iter().find(|e| e["type"] == "m.typing")) {
            assert_eq!(t["content"]["user_ids"], json!([alice_id]), "{v}");
            return;
        }
    }
    panic!("no m.typing notified");
}

/// Logging out the token an observer registered with ends the observation
/// at once, with nothing new to deliver: the observer gets `4.01
/// M_UNKNOWN_TOKEN` without waiting for the next batch.
#[tokio::test]
async fn logout_ends_a_waiting_observer_at_once() {
    let (s, token, _room) = Server::with_alice_and_room().await;
    let mut c = Client::new(s.coap).await;
    let p = c.packet(
        &Request::new(M::Get, "/_matrix/client/v3/sync")
            .q("a", &token)
            .opt(CoapOption::Observe, vec![]),
    );
    let reg = c.send_packet(&p).await;
    assert_eq!(reg.header.code, MessageClass::Response(R::Content));
    assert!(
        reg.get_first_option(CoapOption::Observe).is_some(),
        "observe registered"
    );
    let (st, _) = s.with_token(&token).post("logout", json!({})).await;
    assert_eq!(st, 200);
    let n = c
        .recv(Duration::from_secs(3))
        .await
        .expect("a notification of the revocation");
    assert_eq!(n.get_token(), p.get_token());
    assert_eq!(n.header.code, MessageClass::Response(R::Unauthorized));
    assert_eq!(uncbor(&n.payload)["errcode"], "M_UNKNOWN_TOKEN");
    c.ack(&n).await;
    assert!(
        c.recv(Duration::from_millis(1500)).await.is_none(),
        "nothing after the end"
    );
}

/// An observer that never acknowledges gets each confirmable notification
/// retransmitted (same message ID, the waits roughly doubling) and is then
/// dropped: later events notify nobody.
#[tokio::test]
async fn unacknowledged_notifications_are_retransmitted_then_the_observer_dropped() {
    let s = Server::start_with(&[("WEFT_COAP__ACK_TIMEOUT_MS", "200"), ("WEFT_COAP__MAX_RETRANSMIT", "2")]).await;
    let (token, _) = register(&s, "alice").await;
    let room = create_room(&s, &token).await;
    let mut c = Client::new(s.coap).await;
    let p = c.packet(
        &Request::new(M::Get, "/_matrix/client/v3/sync")
            .q("a", &token)
            .opt(CoapOption::Observe, vec![]),
    );
    let reg = c.send_packet(&p).await;
    assert!(
        reg.get_first_option(CoapOption::Observe).is_some(),
        "observe registered"
    );
    let send = |txn: &'static str| {
        let (s, room, token) = (&s, room.clone(), token.clone());
        async move {
            let (st, v) = s
                .with_token(&token)
                .put(
                    &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room)),
                    json!({"msgtype": "m.text", "body": txn}),
                )
                .await;
            assert_eq!(st, 200, "{v}");
        }
    };
    send("first").await;
    let mut arrivals = Vec::new();
    while let Some(n) = c.recv(Duration::from_secs(3)).await {
        assert_eq!(n.header.get_type(), MessageType::Confirmable);
        assert_eq!(n.get_token(), p.get_token());
        arrivals.push((std::time::Instant::now(), n.header.message_id, n.payload.clone()));
    }
    // The first transmission and max_retransmit = 2 resends, all the same message.
    assert_eq!(arrivals.len(), 3, "one notification, resent twice");
    assert!(arrivals.iter().all(|a| a.1 == arrivals[0].1 && a.2 == arrivals[0].2));
    let gap1 = arrivals[1].0 - arrivals[0].0;
    let gap2 = arrivals[2].0 - arrivals[1].0;
    assert!(
        gap1 >= Duration::from_millis(180) && gap1 < Duration::from_millis(800),
        "{gap1:?}"
    );
    assert!(
        gap2 >= gap1 + Duration::from_millis(100),
        "back-off doubles: {gap1:?} then {gap2:?}"
    );
    // Given up on: the next event is not pushed.
    send("second").await;
    assert!(
        c.recv(Duration::from_millis(1500)).await.is_none(),
        "dropped observer notified"
    );
}

/// MSC3079 v1: path enums, integer keys (sticky per peer), option 256
/// with a "Bearer " prefix.
#[tokio::test]
async fn msc3079_path_enums_and_integer_keys() {
    use ciborium::Value as C;
    let s = Server::start().await;
    let (token, user) = register(&s, "alice").await;
    let room = create_room(&s, &token).await;
    let mut c = Client::new(s.coap).await;
    // /9/{roomId}/{eventType}/{txnId} with {27: body, 28: msgtype}.
    let body = C::Map(vec![
        (C::Integer(27.into()), C::Text("hi".into())),
        (C::Integer(28.into()), C::Text("m.text".into())),
    ]);
    let mut payload = Vec::new();
    ciborium::into_writer(&body, &mut payload).unwrap();
    let path = format!("/9/{room}/m.room.message/lb1");
    let mut r = Request::new(M::Put, &path).opt(CoapOption::Unknown(256), format!("Bearer {token}").into_bytes());
    r.payload = payload;
    r.content_format = Some(60);
    let (code, raw) = c.call(r).await;
    assert_eq!(code, R::Changed);
    // The reply uses integer keys: {1: event_id}.
    let reply: C = ciborium::from_reader(&raw[..]).unwrap();
    let map = reply.as_map().expect("map");
    assert_eq!(map[0].0, C::Integer(1.into()));
    let event_id = map[0].1.as_text().unwrap().to_owned();
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["event_id"], event_id.as_str());
    assert_eq!(msgs[0]["content"], json!({"body": "hi", "msgtype": "m.text"}));
    // /7 = sync; token remembered for this peer; integer keys decoded.
    let (code, raw) = c.call(Request::new(M::Get, "/7")).await;
    assert_eq!(code, R::Content);
    let v: C = ciborium::from_reader(&raw[..]).unwrap();
    let keys: Vec<&C> = v.as_map().unwrap().iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&&C::Integer(19.into())), "next_batch as 19: {keys:?}");
    // Our own decoder maps them back.
    let j = weft_coap::cbor::to_json(&raw).unwrap();
    let tl = j["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(
        tl.iter()
            .any(|e| e["event_id"] == event_id.as_str() && e["sender"] == user.as_str())
    );
    // /0 = versions, advertising MSC3079.
    let mut other = Client::new(s.coap).await;
    let (code, v) = other.call_cbor(Request::new(M::Get, "/0")).await;
    assert_eq!(code, R::Content);
    assert_eq!(v["org.matrix.msc3079.low_bandwidth"]["coap_enum_version"], 1);
}

/// A long-polling sync gets an empty ACK at once and a separate CON
/// response later, which the client acknowledges.
#[tokio::test]
async fn slow_request_gets_empty_ack_then_separate_response() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let mut c = Client::new(s.coap).await;
    let (_, first) = c
        .call_cbor(Request::new(M::Get, "/_matrix/client/v3/sync").q("a", &token))
        .await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let p = c.packet(
        &Request::new(M::Get, "/_matrix/client/v3/sync")
            .q("since", &since)
            .q("timeout", "3000"),
    );
    let ack = c
        .raw(&p.to_bytes().unwrap(), Duration::from_secs(3))
        .await
        .expect("empty ACK");
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(ack.header.code, MessageClass::Empty);
    assert_eq!(ack.header.message_id, p.header.message_id);
    // Meanwhile an event arrives; the separate response carries it.
    let (st, sent) = s
        .with_token(&token)
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/late", enc(&room)),
            json!({"msgtype": "m.text", "body": "late"}),
        )
        .await;
    assert_eq!(st, 200);
    let resp = c.recv(Duration::from_secs(5)).await.expect("separate response");
    assert_eq!(resp.header.get_type(), MessageType::Confirmable);
    assert_eq!(resp.get_token(), p.get_token());
    assert_eq!(resp.header.code, MessageClass::Response(R::Content));
    c.ack(&resp).await;
    let v = uncbor(&resp.payload);
    let tl = v["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .expect("timeline");
    assert_eq!(tl[0]["event_id"], sent["event_id"]);
    // The duplicate of the request replays the empty ACK, not a second run.
    let again = c
        .raw(&p.to_bytes().unwrap(), Duration::from_secs(2))
        .await
        .expect("replayed ACK");
    assert_eq!(again.header.code, MessageClass::Empty);
}

/// A request body larger than one block, sent with Block1 (RFC 7959).
#[tokio::test]
async fn block1_upload() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let mut c = Client::new(s.coap).await;
    let text = "y".repeat(2500);
    let body = cbor(&json!({"msgtype": "m.text", "body": text}));
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/big1");
    let mut r = Request::new(M::Put, &path).q("a", &token);
    r.content_format = Some(60);
    let last = c.send_block1(&r, &body).await;
    assert_eq!(last.header.code, MessageClass::Response(R::Changed));
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["content"]["body"], text.as_str());
    assert_eq!(uncbor(&last.payload)["event_id"], msgs[0]["event_id"]);

    // The same through libcoap's client, which splits the body itself.
    if let Some(bin) = coap_client() {
        let uri = format!(
            "coap://{}/_matrix/client/v3/rooms/{}/send/m.room.message/big2?a={}",
            s.coap,
            enc(&room),
            token
        );
        let out = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = std::process::Command::new(bin)
                .args(["-m", "put", "-t", "60", "-b", "256", "-f", "-", "-B", "5", &uri])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&body).unwrap();
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let msgs = s.http_messages(&token, &room, "m.room.message").await;
        assert_eq!(msgs.len(), 2, "coap-client: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(msgs[1]["content"]["body"], text.as_str());
    } else {
        eprintln!("NOTE: libcoap's coap-client is not installed; skipping its Block1 half");
    }
}

/// Over the rate limit: 4.29 with Max-Age and M_LIMIT_EXCEEDED.
#[tokio::test]
async fn rate_limited_gets_4_29_with_max_age() {
    let s = Server::start_with(&[
        ("WEFT_RATE_LIMIT__ENABLED", "true"),
        ("WEFT_RATE_LIMIT__PER_SECOND", "0.1"),
        ("WEFT_RATE_LIMIT__BURST", "5"),
    ])
    .await;
    let (token, _) = register(&s, "alice").await;
    let mut c = Client::new(s.coap).await;
    let mut limited = None;
    for _ in 0..20 {
        let p = c.packet(&Request::new(M::Get, "/_matrix/client/v3/account/whoami").q("a", &token));
        let r = c.send_packet(&p).await;
        if r.header.code == MessageClass::Response(R::TooManyRequests) {
            limited = Some(r);
            break;
        }
        assert_eq!(r.header.code, MessageClass::Response(R::Content));
    }
    let r = limited.expect("rate limit reached");
    let max_age = r.get_first_option(CoapOption::MaxAge).expect("Max-Age");
    let secs = max_age.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x));
    assert!((1..=20).contains(&secs), "Max-Age {secs}");
    let v = uncbor(&r.payload);
    assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED");
    assert!(v["retry_after_ms"].as_u64().unwrap() > 0);
}

/// Observe on a room's /messages: each new event of that room (and only
/// that room) is pushed as a forward page.
#[tokio::test]
async fn observe_room_messages() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let other = create_room(&s, &token).await;
    let mut c = Client::new(s.coap).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/messages");
    let p = c.packet(
        &Request::new(M::Get, &path)
            .q("a", &token)
            .opt(CoapOption::Observe, vec![]),
    );
    let reg = c.send_packet(&p).await;
    assert_eq!(reg.header.code, MessageClass::Response(R::Content));
    assert!(
        reg.get_first_option(CoapOption::Observe).is_some(),
        "observe registered"
    );
    let put = |r: String, txn: &'static str| {
        let s = &s;
        let token = token.clone();
        async move {
            let (st, v) = s
                .with_token(&token)
                .put(
                    &format!("/_matrix/client/v3/rooms/{}/send/org.weft.telemetry/{txn}", enc(&r)),
                    json!({"seq": txn}),
                )
                .await;
            assert_eq!(st, 200);
            v["event_id"].as_str().unwrap().to_owned()
        }
    };
    put(other.clone(), "elsewhere").await;
    for txn in ["m1", "m2", "m3"] {
        let id = put(room.clone(), txn).await;
        let n = c.recv(Duration::from_secs(5)).await.expect("notification");
        c.ack(&n).await;
        assert_eq!(n.get_token(), p.get_token());
        let v = uncbor(&n.payload);
        let chunk = v["chunk"].as_array().unwrap();
        assert_eq!(chunk.len(), 1, "{v}");
        assert_eq!(chunk[0]["event_id"], id.as_str());
        assert_eq!(chunk[0]["content"]["seq"], txn);
        assert_eq!(chunk[0]["room_id"], room.as_str());
    }
}

/// libcoap's client observing /sync (Block2 for the big first response,
/// then a notification for an event sent over HTTP).
#[tokio::test]
async fn libcoap_observes_sync() {
    let Some(bin) = coap_client() else { return };
    let (s, token, room) = Server::with_alice_and_room().await;
    // Enough history that the first sync needs several blocks.
    for i in 0..6 {
        let (st, _) = s
            .with_token(&token)
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/h{i}", enc(&room)),
                json!({"msgtype": "m.text", "body": "z".repeat(400)}),
            )
            .await;
        assert_eq!(st, 200);
    }
    let uri = format!("coap://{}/_matrix/client/v3/sync?a={}", s.coap, token);
    let child = std::process::Command::new(bin)
        .args(["-s", "4", "-B", "6", "-A", "50", "-w", &uri])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run coap-client");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (st, sent) = s
        .with_token(&token)
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/live", enc(&room)),
            json!({"msgtype": "m.text", "body": "pushed to the observer"}),
        )
        .await;
    assert_eq!(st, 200);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The whole first sync arrived (block-wise), then the notification.
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lines[0]["next_batch"].is_string());
    let tl = lines[1]["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap();
    assert_eq!(tl.len(), 1);
    assert_eq!(tl[0]["event_id"], sent["event_id"]);
    assert_eq!(tl[0]["content"]["body"], "pushed to the observer");
}

/// Runs libcoap's `coap-client` with `args`, `stdin` piped in; its stdout.
async fn run_coap_client(bin: String, args: Vec<String>, stdin: Vec<u8>) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(bin)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run coap-client");
        // coap-client may stop reading early; its stderr says why.
        let _ = child.stdin.take().unwrap().write_all(&stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "coap-client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    })
    .await
    .unwrap()
}

/// A device uploads a 200 KB file with Block1 and downloads it with
/// Block2 through the media repository; HTTP reads the same bytes, and
/// a file uploaded over HTTP comes back over CoAP block by block.
#[tokio::test]
async fn media_upload_block1_and_download_block2() {
    let s = Server::start().await;
    let (token, _) = register(&s, "camera").await;
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut c = Client::new(s.coap).await;

    // Block1: 1024-byte blocks, Content-Format 22 (image/jpeg).
    let path = "/_matrix/media/v3/upload";
    let mut r = Request::new(M::Post, path).q("a", &token).q("filename", "snap.jpg");
    r.content_format = Some(22);
    let last = c.send_block1(&r, &data).await;
    assert_eq!(last.header.code, MessageClass::Response(R::Created));
    let mxc = uncbor(&last.payload)["content_uri"]
        .as_str()
        .expect("content_uri")
        .to_owned();
    let id = mxc.strip_prefix("mxc://").expect("mxc").to_owned();

    // HTTP reads it byte-identical, with the type the Content-Format named.
    let resp = s
        .http
        .get(format!("{}/_matrix/client/v1/media/download/{id}", s.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "image/jpeg");
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());

    // Block2: block 0 tells the size (Size2); the harness follows the
    // blocks to the end.
    let dl = format!("/_matrix/client/v1/media/download/{id}");
    let r = Request::new(M::Get, &dl)
        .q("a", &token)
        .opt(CoapOption::Block2, uint_opt(6));
    let p = c.packet(&r);
    let first = c.send_packet(&p).await;
    assert_eq!(first.header.code, MessageClass::Response(R::Content));
    let size2 = first.get_first_option(CoapOption::Size2).expect("Size2 on block 0");
    assert_eq!(size2.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b)), 200_000);
    let (code, got) = c.call(Request::new(M::Get, &dl).q("a", &token)).await;
    assert_eq!(code, R::Content);
    assert!(got == data, "Block2 download differs: {} bytes", got.len());

    // libcoap's client both ways.
    if let Some(bin) = coap_client() {
        let up = format!("coap://{}/_matrix/media/v3/upload?a={token}&filename=fw.bin", s.coap);
        // From a file: libcoap reads a large stdin only in part.
        let file = s.root().join("fw.bin");
        std::fs::write(&file, &data).unwrap();
        let file = file.to_string_lossy().into_owned();
        let out = run_coap_client(
            bin.clone(),
            [
                "-m", "post", "-t", "42", "-A", "50", "-b", "512", "-f", &file, "-B", "10", &up,
            ]
            .map(String::from)
            .to_vec(),
            vec![],
        )
        .await;
        let reply: Value = serde_json::from_slice(&out).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out)));
        let id2 = reply["content_uri"]
            .as_str()
            .expect("content_uri")
            .strip_prefix("mxc://")
            .unwrap()
            .to_owned();
        let over_http = s
            .http
            .get(format!("{}/_matrix/client/v1/media/download/{id2}", s.base_url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            over_http.as_ref() == data.as_slice(),
            "libcoap upload differs: {} bytes",
            over_http.len()
        );
        let down = format!("coap://{}/_matrix/client/v1/media/download/{id2}?a={token}", s.coap);
        // To a file: on stdout coap-client adds a newline.
        let saved = s.root().join("fw.copy");
        let saved_arg = saved.to_string_lossy().into_owned();
        run_coap_client(
            bin,
            ["-m", "get", "-b", "1024", "-B", "10", "-o", &saved_arg, &down]
                .map(String::from)
                .to_vec(),
            vec![],
        )
        .await;
        let out = std::fs::read(&saved).expect("coap-client output file");
        assert!(out == data, "libcoap download differs: {} bytes", out.len());
    } else {
        eprintln!("NOTE: libcoap's coap-client is not installed; skipping its half");
    }

    // An unknown ID: 4.04.
    let path = format!("/_matrix/client/v1/media/download/{}/NoSuchMedia", s.server_name());
    let r = Request::new(M::Get, &path).q("a", &token);
    let p = c.packet(&r);
    let resp = c.send_packet(&p).await;
    assert_eq!(resp.header.code, MessageClass::Response(R::NotFound));
}

/// An application service's token authenticates on the CoAP door as over
/// HTTP (docs/appservices.md): as its sender, or as the user of its
/// namespace that `?user_id=` names; a user outside it is refused the
/// same way (4.03 `M_FORBIDDEN`).
#[tokio::test]
async fn an_appservice_token_acts_as_over_http() {
    const AS_TOKEN: &str = "coap-as-token";
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("bridge.yaml");
    std::fs::write(
        &reg,
        format!(
            "id: coapbridge\nurl: null\nas_token: {AS_TOKEN}\nhs_token: coap-hs-token\n\
             sender_localpart: bridgebot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: \"@_bridge_.*\"\n"
        ),
    )
    .unwrap();
    let files = format!("[{:?}]", reg.display().to_string());
    let s = Server::start_with(&[("WEFT_APPSERVICE__REGISTRATION_FILES", &files)]).await;
    let whoami = "/_matrix/client/v3/account/whoami";
    let mut c = Client::new(s.coap).await;
    let (code, v) = c.call_cbor(Request::new(M::Get, whoami).q("a", AS_TOKEN)).await;
    assert_eq!(code, R::Content, "{v}");
    let sender = v["user_id"].as_str().unwrap().to_owned();
    let server_name = sender.split_once(':').unwrap().1.to_owned();
    assert_eq!(sender, format!("@bridgebot:{server_name}"));

    let (status, body) = s
        .with_token(AS_TOKEN)
        .post(
            "register",
            json!({"type": "m.login.application_service", "username": "_bridge_bob", "inhibit_login": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let bob = format!("@_bridge_bob:{server_name}");
    let (code, v) = c
        .call_cbor(Request::new(M::Get, whoami).q("a", AS_TOKEN).q("user_id", &bob))
        .await;
    assert_eq!(code, R::Content, "{v}");
    assert_eq!(v["user_id"], bob.as_str());
    let (alice_token, alice) = register(&s, "alice").await;
    let (code, v) = c
        .call_cbor(Request::new(M::Get, whoami).q("a", AS_TOKEN).q("user_id", &alice))
        .await;
    assert_eq!(code, R::Forbidden, "{v}");
    assert_eq!(v["errcode"], "M_FORBIDDEN");

    // Bob, through the service, posts to alice's room over CoAP.
    let room = s
        .with_token(&alice_token)
        .create_room(json!({"preset": "public_chat"}))
        .await;
    let (status, body) = s
        .with_token(AS_TOKEN)
        .post(&format!("join/{}?user_id={}", enc(&room), enc(&bob)), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let content = json!({"msgtype": "m.text", "body": "bridged over coap"});
    let (code, v) = c
        .call_cbor(
            Request::new(M::Post, &send_path(&room))
                .q("a", AS_TOKEN)
                .q("user_id", &bob)
                .cbor(&content),
        )
        .await;
    assert_eq!(code, R::Created, "{v}");
    let msgs = s.http_messages(&alice_token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["sender"], bob.as_str());
    assert_eq!(msgs[0]["content"], content);
}
