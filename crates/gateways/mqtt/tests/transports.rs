//! End-to-end tests of MQTT over TLS and over WebSocket, and of QoS 2
//! towards subscribers, against the real `weft` binary: rumqttc (TLS with
//! a ring-based rustls config, WebSocket), mosquitto's clients with
//! `--cafile`, tokio-tungstenite and raw sockets.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::client::{WAIT, bodies_of, body, closed, room_for, spawn};
use common::{Server, User};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4;
use rumqttc::{MqttOptions, Packet, QoS, Transport};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_tungstenite::tungstenite;

fn options(id: &str, host: &str, port: u16, user: &User, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_credentials(user.user_id.as_str(), user.access_token.as_str())
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(clean);
    o
}

/// rustls client config trusting `cert` (with the ring provider, as the
/// server: the test build also links aws-lc-rs, so there is no default).
fn client_config(cert: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn tls_options(srv: &Server, id: &str, user: &User) -> MqttOptions {
    let mut o = options(id, "127.0.0.1", srv.mqtt_tls.port(), user, true);
    o.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
        client_config(&srv.tls_cert),
    )));
    o
}

fn ws_options(srv: &Server, id: &str, user: &User) -> MqttOptions {
    // For WebSocket, rumqttc takes host and port from the URL.
    let mut o = options(id, &format!("ws://{}/mqtt", srv.http_addr()), 0, user, true);
    o.set_transport(Transport::Ws);
    o
}

fn mosquitto_installed() -> bool {
    weft_testkit::tools_installed(
        &["mosquitto_pub", "mosquitto_sub", "stdbuf"],
        "apt-get install mosquitto-clients (stdbuf: coreutils)",
    )
}

#[tokio::test]
async fn tls_rumqttc_and_mosquitto_publish_and_subscribe() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let topic = format!("weft/r/{room}/e/org.weft.telemetry");

    let mut sub = spawn(tls_options(&srv, "tls-sub", &alice));
    sub.connack().await;
    sub.client
        .subscribe(format!("weft/r/{room}/e/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        sub.suback().await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let port = srv.mqtt_tls.port().to_string();
    let cafile = srv.tls_cert.to_str().unwrap().to_owned();
    let common = [
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "--cafile",
        cafile.as_str(),
        "-u",
        alice.user_id.as_str(),
        "-P",
        alice.password.as_str(),
    ];
    let mosquitto = mosquitto_installed();
    let mut mosq_sub = None;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    if mosquitto {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(common)
            .args([
                "-i",
                "mosq-tls-sub",
                "-q",
                "1",
                "-v",
                "-d",
                "-C",
                "4",
                "-W",
                "15",
                "-t",
                &format!("weft/r/{room}/e/#"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(5))
                .expect("mosquitto_sub over TLS: SUBACK");
            if line.contains("SUBACK") {
                break;
            }
        }
        mosq_sub = Some(child);
        // Two publishes by mosquitto_pub over TLS.
        for i in 0..2 {
            let out = Command::new("mosquitto_pub")
                .args(common)
                .args(["-i", &format!("mosq-tls-pub-{i}"), "-q", "1", "-t", &topic])
                .args(["-m", &format!("{{\"seq\": {i}}}")])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mosquitto_pub over TLS: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The rest by rumqttc over TLS.
    let first = if mosquitto { 2 } else { 0 };
    let mut publisher = spawn(tls_options(&srv, "tls-pub", &alice));
    publisher.connack().await;
    for i in first..4 {
        publisher
            .client
            .publish(&topic, QoS::AtLeastOnce, false, format!("{{\"seq\": {i}}}"))
            .await
            .unwrap();
        assert!(matches!(publisher.packet().await, Packet::PubAck(_)));
    }

    // rumqttc over TLS received all four, in order, once.
    let got = sub.publishes(4).await;
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.topic, topic);
        let ev = body(&p.payload);
        assert_eq!(ev["content"], json!({"seq": i}));
        assert_eq!(ev["sender"], alice.user_id);
    }
    sub.quiet(Duration::from_millis(300)).await;
    // So did mosquitto_sub.
    if let Some(child) = mosq_sub {
        let status = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap()
            .status;
        assert!(status.success(), "mosquitto_sub over TLS exited with {status}");
        // All of its output: the reader thread ends at EOF, dropping the sender.
        let seqs: Vec<Value> = lines
            .iter()
            .filter_map(|l| {
                l.strip_prefix(&format!("{topic} "))
                    .map(|j| body(j.as_bytes())["content"]["seq"].clone())
            })
            .collect();
        assert_eq!(seqs, vec![json!(0), json!(1), json!(2), json!(3)]);
    }
    // And HTTP sees the same four.
    let evs = alice.last_events(&room, 4).await;
    assert_eq!(
        evs.iter().map(|e| e["content"]["seq"].clone()).collect::<Vec<_>>(),
        vec![json!(0), json!(1), json!(2), json!(3)]
    );
}

/// A valid 3.1.1 CONNECT, encoded by rumqttc.
fn raw_connect(id: &str, user: &User, clean: bool) -> Vec<u8> {
    let mut c = v4::Connect::new(id);
    c.keep_alive = 30;
    c.clean_session = clean;
    c.set_login(user.user_id.as_str(), user.access_token.as_str());
    encode(v4::Packet::Connect(c))
}

fn encode(p: v4::Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    p.write(&mut buf, 1 << 20).unwrap();
    buf.to_vec()
}

#[tokio::test]
async fn tls_port_refuses_plain_clients_cleanly_and_keeps_serving() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;

    // A client that connects and never says anything: its handshake waits
    // in its own task, holding up nobody.
    let _idle = TcpStream::connect(srv.mqtt_tls).await.unwrap();

    // Plain MQTT on the TLS port: no CONNACK, the connection is closed.
    let mut s = TcpStream::connect(srv.mqtt_tls).await.unwrap();
    s.write_all(&raw_connect("plain", &alice, true)).await.unwrap();
    let got = closed(&mut s).await;
    assert_ne!(got.first(), Some(&0x20), "an MQTT CONNACK over a TLS port");

    // A ClientHello cut short, then hang-up.
    let mut s = TcpStream::connect(srv.mqtt_tls).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).await.unwrap();
    s.shutdown().await.unwrap();
    closed(&mut s).await;

    // rumqttc without TLS against the TLS port fails, it does not hang.
    let mut plain = spawn(options("plain-rumqttc", "127.0.0.1", srv.mqtt_tls.port(), &alice, true));
    assert!(plain.next().await.is_err(), "plain MQTT to the TLS port must fail");

    // A TLS client that does not trust the certificate fails its handshake.
    let untrusting = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut o = options("untrusting", "127.0.0.1", srv.mqtt_tls.port(), &alice, true);
    o.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
        untrusting,
    ))));
    let mut untrusting = spawn(o);
    assert!(untrusting.next().await.is_err());

    // The server still serves TLS (while the idle connection is open)...
    let mut good = spawn(tls_options(&srv, "good", &alice));
    assert_eq!(good.connack().await.code, rumqttc::ConnectReturnCode::Success);
    good.client
        .publish(
            format!("weft/r/{room}/e/org.weft.ok"),
            QoS::AtLeastOnce,
            false,
            r#"{"ok": 1}"#,
        )
        .await
        .unwrap();
    assert!(matches!(good.packet().await, Packet::PubAck(_)));
    // ...and plain TCP on its own port.
    let mut tcp = spawn(options("tcp", &srv.mqtt_host, srv.mqtt_port, &alice, true));
    tcp.connack().await;
    tcp.client
        .publish(
            format!("weft/r/{room}/e/org.weft.ok"),
            QoS::AtLeastOnce,
            false,
            r#"{"ok": 2}"#,
        )
        .await
        .unwrap();
    assert!(matches!(tcp.packet().await, Packet::PubAck(_)));
    let evs = alice.last_events(&room, 2).await;
    assert_eq!(evs[0]["content"], json!({"ok": 1}));
    assert_eq!(evs[1]["content"], json!({"ok": 2}));
}

#[tokio::test]
async fn websocket_publish_subscribe_and_http_sees_the_events() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let topic = format!("weft/r/{room}/e/org.weft.telemetry");

    let mut sub = spawn(ws_options(&srv, "ws-sub", &alice));
    assert_eq!(sub.connack().await.code, rumqttc::ConnectReturnCode::Success);
    sub.client
        .subscribe(format!("weft/r/{room}/e/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        sub.suback().await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut publisher = spawn(ws_options(&srv, "ws-pub", &alice));
    publisher.connack().await;
    for i in 0..5 {
        publisher
            .client
            .publish(&topic, QoS::AtLeastOnce, false, format!("{{\"seq\": {i}}}"))
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < 5 {
        if let Packet::PubAck(_) = publisher.packet().await {
            acks += 1;
        }
    }
    let got = sub.publishes(5).await;
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.topic, topic);
        assert_eq!(body(&p.payload)["content"], json!({"seq": i}));
    }
    sub.quiet(Duration::from_millis(300)).await;
    let evs = alice.last_events(&room, 5).await;
    assert_eq!(
        evs.iter().map(|e| e["content"]["seq"].clone()).collect::<Vec<_>>(),
        (0..5).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert!(evs.iter().all(|e| e["sender"] == alice.user_id));
}

/// Reads MQTT packets from binary WebSocket messages, however they are cut.
struct WsPackets {
    buf: BytesMut,
}

impl WsPackets {
    async fn next<S>(&mut self, ws: &mut S) -> v4::Packet
    where
        S: futures_util::Stream<Item = Result<tungstenite::Message, tungstenite::Error>> + Unpin,
    {
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the server: {e:?}"),
            }
            match timeout(WAIT, ws.next()).await.expect("no WebSocket message in time") {
                Some(Ok(tungstenite::Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_))) => {}
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn websocket_needs_the_mqtt_subprotocol_and_reframes_packets() {
    use tungstenite::client::IntoClientRequest;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let url = format!("ws://{}/mqtt", srv.http_addr());

    // No subprotocol: refused before upgrading, saying why.
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let text = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(text.contains("subprotocol `mqtt`"), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another subprotocol: the same.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-ws".parse().unwrap());
    assert!(matches!(
        tokio_tungstenite::connect_async(req).await,
        Err(tungstenite::Error::Http(r)) if r.status() == 400
    ));
    // Plain GET (no upgrade): an HTTP error, not a hang.
    let resp = reqwest::get(format!("http://{}/mqtt", srv.http_addr())).await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());

    // `mqttv3.1` is accepted and echoed.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqttv3.1".parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqttv3.1");
    drop(ws);

    // `mqtt`, with packets cut across messages and several in one message.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    let connect = raw_connect("ws-raw", &alice, true);
    let (a, b) = connect.split_at(5);
    ws.send(tungstenite::Message::binary(a.to_vec())).await.unwrap();
    ws.send(tungstenite::Message::binary(b.to_vec())).await.unwrap();
    let mut rd = WsPackets { buf: BytesMut::new() };
    match rd.next(&mut ws).await {
        v4::Packet::ConnAck(c) => assert_eq!(c.code, v4::ConnectReturnCode::Success),
        p => panic!("{p:?}"),
    }
    let topic = format!("weft/r/{room}/e/org.weft.ws");
    let mut many = encode(v4::Packet::Subscribe(v4::Subscribe::new(
        format!("weft/r/{room}/e/#"),
        QoS::AtLeastOnce,
    )));
    let mut publish = v4::Publish::new(&topic, QoS::AtLeastOnce, r#"{"n": 1}"#);
    publish.pkid = 7;
    many.extend(encode(v4::Packet::Publish(publish)));
    // SUBSCRIBE, PUBLISH and the first half of a PINGREQ in one message.
    many.push(0xC0);
    ws.send(tungstenite::Message::binary(many)).await.unwrap();
    ws.send(tungstenite::Message::binary(vec![0x00])).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match rd.next(&mut ws).await {
            v4::Packet::SubAck(_) => seen.push("suback"),
            v4::Packet::PubAck(a) => {
                assert_eq!(a.pkid, 7);
                seen.push("puback")
            }
            v4::Packet::PingResp => seen.push("pingresp"),
            // Our own publish may come back through the subscription too.
            v4::Packet::Publish(p) => assert_eq!(p.topic, topic),
            p => panic!("{p:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, vec!["pingresp", "puback", "suback"]);
    assert_eq!(alice.last_events(&room, 1).await[0]["content"], json!({"n": 1}));

    // A text message is a protocol error: the connection is closed.
    ws.send(tungstenite::Message::text("hello")).await.unwrap();
    loop {
        match timeout(WAIT, ws.next()).await.expect("server did not close") {
            Some(Ok(tungstenite::Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn qos2_subscribers_get_each_event_exactly_once_in_order() {
    use rumqttc::v5;
    use v5::mqttbytes::v5::Packet as P5;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;

    // MQTT 3.1.1 subscriber over TCP, granted QoS 2.
    let mut a = spawn(options("q2-a", &srv.mqtt_host, srv.mqtt_port, &alice, true));
    a.connack().await;
    a.client
        .subscribe(format!("weft/r/{room}/e/#"), QoS::ExactlyOnce)
        .await
        .unwrap();
    assert_eq!(
        a.suback().await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    // MQTT 5 subscriber over TLS, granted QoS 2.
    let mut o = v5::MqttOptions::new("q2-b", "127.0.0.1", srv.mqtt_tls.port());
    o.set_credentials(alice.user_id.as_str(), alice.access_token.as_str())
        .set_keep_alive(Duration::from_secs(5))
        .set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            client_config(&srv.tls_cert),
        )));
    let (b_client, mut b_el) = v5::AsyncClient::new(o, 100);
    let (b_tx, mut b_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = b_el.poll().await {
            if let v5::Event::Incoming(p) = ev
                && b_tx.send(p).is_err()
            {
                return;
            }
        }
    });
    let mut b_next = async || {
        timeout(WAIT, b_rx.recv())
            .await
            .expect("no packet")
            .expect("loop ended")
    };
    assert!(matches!(b_next().await, P5::ConnAck(_)));
    b_client
        .subscribe(format!("weft/r/{room}/e/#"), v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .unwrap();
    match b_next().await {
        P5::SubAck(s) => assert_eq!(
            s.return_codes,
            vec![v5::mqttbytes::v5::SubscribeReasonCode::Success(
                v5::mqttbytes::QoS::ExactlyOnce
            )]
        ),
        p => panic!("{p:?}"),
    }

    const N: usize = 30;
    for i in 0..N {
        alice
            .send(
                &room,
                "m.room.message",
                &format!("q{i}"),
                json!({"body": format!("m{i}")}),
            )
            .await;
    }
    // Each event once, in order, at QoS 2, and each flow completed by a PUBREL.
    let got = a.qos2_publishes(N).await;
    assert!(got.iter().all(|p| !p.dup));
    let bodies = bodies_of(&got);
    assert_eq!(bodies, (0..N).map(|i| format!("m{i}")).collect::<Vec<_>>());
    a.quiet(Duration::from_millis(400)).await;

    let (mut bodies, mut pubrels) = (Vec::new(), 0);
    while bodies.len() < N || pubrels < N {
        match b_next().await {
            P5::Publish(p) => {
                assert_eq!(p.qos, v5::mqttbytes::QoS::ExactlyOnce);
                bodies.push(body(&p.payload)["content"]["body"].as_str().unwrap().to_owned());
            }
            P5::PubRel(_) => pubrels += 1,
            P5::PingResp(_) => {}
            p => panic!("unexpected {p:?}"),
        }
    }
    assert_eq!(bodies, (0..N).map(|i| format!("m{i}")).collect::<Vec<_>>());
    if let Ok(Some(p)) = timeout(Duration::from_millis(400), b_rx.recv()).await {
        assert!(matches!(p, P5::PingResp(_)), "unexpected extra packet {p:?}");
    }
}

#[tokio::test]
async fn qos2_persistent_subscriber_gets_the_rest_after_reconnecting_without_duplicates() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    // Manual acks: the client confirms (PUBREC) only what it has processed.
    let mut o = options("q2-persist", &srv.mqtt_host, srv.mqtt_port, &alice, false);
    o.set_manual_acks(true);
    let mut m = spawn(o);
    assert!(!m.connack().await.session_present);
    m.client
        .subscribe(format!("weft/r/{room}/e/+"), QoS::ExactlyOnce)
        .await
        .unwrap();
    m.suback().await;
    send_bodies(&alice, &room, "a", 0..20).await;
    // Process the first 8, mid-flow: the server has sent more.
    let first = m.publishes(12).await;
    for p in &first[..8] {
        m.client.ack(p).await.unwrap();
    }
    // Received, unprocessed ones by packet ID: the server must send them
    // again with the same ID and DUP.
    let mut unacked: std::collections::HashMap<String, u16> = first[8..]
        .iter()
        .map(|p| (body(&p.payload)["content"]["body"].as_str().unwrap().to_owned(), p.pkid))
        .collect();
    let mut pubrels = 0;
    while pubrels < 8 {
        match m.packet().await {
            Packet::PubRel(_) => pubrels += 1,
            Packet::Publish(p) => {
                unacked.insert(body(&p.payload)["content"]["body"].as_str().unwrap().to_owned(), p.pkid);
            }
            p => panic!("unexpected {p:?}"),
        }
    }
    m.disconnect().await;

    send_bodies(&alice, &room, "a", 20..25).await;
    let mut m = spawn(options("q2-persist", &srv.mqtt_host, srv.mqtt_port, &alice, false));
    assert!(m.connack().await.session_present);
    let rest = m.qos2_publishes(17).await;
    let bodies = bodies_of(&rest);
    assert_eq!(bodies, (8..25).map(|i| format!("e{i}")).collect::<Vec<_>>());
    for (p, b) in rest.iter().zip(&bodies) {
        assert_eq!(p.qos, QoS::ExactlyOnce);
        // (Others may have been sent too, unseen by this test: DUP either way.)
        if let Some(pkid) = unacked.get(b) {
            assert_eq!((p.pkid, p.dup), (*pkid, true), "{b} resent with its packet ID and DUP");
        }
        if bodies_after_disconnect(b) {
            assert!(!p.dup, "{b} was never sent before");
        }
    }
    m.quiet(Duration::from_millis(500)).await;
}

/// Events sent while the persistent subscriber was away.
fn bodies_after_disconnect(b: &str) -> bool {
    b.strip_prefix('e')
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n >= 20)
}

/// Reads the next MQTT 3.1.1 packet from a raw stream.
async fn read_packet<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> v4::Packet {
    loop {
        match v4::Packet::read(buf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("bad packet from the server: {e:?}"),
        }
        let n = timeout(WAIT, s.read_buf(buf))
            .await
            .expect("no packet in time")
            .unwrap();
        assert!(n > 0, "server closed the connection");
    }
}

async fn raw_session<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut BytesMut, id: &str, user: &User) -> bool {
    s.write_all(&raw_connect(id, user, false)).await.unwrap();
    match read_packet(s, buf).await {
        v4::Packet::ConnAck(c) => {
            assert_eq!(c.code, v4::ConnectReturnCode::Success);
            c.session_present
        }
        p => panic!("{p:?}"),
    }
}

#[tokio::test]
async fn qos2_outstanding_pubrel_and_unacknowledged_publishes_are_resent_on_reconnect() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let addr = srv.mqtt_addr();

    let mut buf = BytesMut::new();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    assert!(!raw_session(&mut s, &mut buf, "raw-q2", &alice).await);
    s.write_all(&encode(v4::Packet::Subscribe(v4::Subscribe::new(
        format!("weft/r/{room}/e/#"),
        QoS::ExactlyOnce,
    ))))
    .await
    .unwrap();
    match read_packet(&mut s, &mut buf).await {
        v4::Packet::SubAck(a) => assert_eq!(a.return_codes, vec![v4::SubscribeReasonCode::Success(QoS::ExactlyOnce)]),
        p => panic!("{p:?}"),
    }
    for i in 0..3 {
        alice.send(&room, "org.weft.n", &format!("n{i}"), json!({"n": i})).await;
    }
    let mut sent = Vec::new();
    while sent.len() < 3 {
        match read_packet(&mut s, &mut buf).await {
            v4::Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::ExactlyOnce);
                sent.push((p.pkid, body(&p.payload)["content"]["n"].clone()));
            }
            p => panic!("{p:?}"),
        }
    }
    assert_eq!(
        sent.iter().map(|s| s.1.clone()).collect::<Vec<_>>(),
        vec![json!(0), json!(1), json!(2)]
    );
    let (a, b, c) = (sent[0].0, sent[1].0, sent[2].0);
    // The first is received (PUBREC); its PUBREL comes, is never completed.
    s.write_all(&encode(v4::Packet::PubRec(v4::PubRec::new(a))))
        .await
        .unwrap();
    match read_packet(&mut s, &mut buf).await {
        v4::Packet::PubRel(r) => assert_eq!(r.pkid, a),
        p => panic!("{p:?}"),
    }
    drop(s);

    // Reconnect: first the PUBREL again, then the two unacknowledged
    // messages with their packet IDs and DUP; not the first one.
    let mut buf = BytesMut::new();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    assert!(raw_session(&mut s, &mut buf, "raw-q2", &alice).await);
    match read_packet(&mut s, &mut buf).await {
        v4::Packet::PubRel(r) => assert_eq!(r.pkid, a),
        p => panic!("expected PUBREL {a}, got {p:?}"),
    }
    for (pkid, n) in [(b, 1), (c, 2)] {
        match read_packet(&mut s, &mut buf).await {
            v4::Packet::Publish(p) => {
                assert_eq!((p.pkid, p.dup, p.qos), (pkid, true, QoS::ExactlyOnce));
                assert_eq!(body(&p.payload)["content"]["n"], json!(n));
            }
            p => panic!("{p:?}"),
        }
    }
    // Complete everything.
    s.write_all(&encode(v4::Packet::PubComp(v4::PubComp::new(a))))
        .await
        .unwrap();
    for pkid in [b, c] {
        s.write_all(&encode(v4::Packet::PubRec(v4::PubRec::new(pkid))))
            .await
            .unwrap();
        match read_packet(&mut s, &mut buf).await {
            v4::Packet::PubRel(r) => assert_eq!(r.pkid, pkid),
            p => panic!("{p:?}"),
        }
        s.write_all(&encode(v4::Packet::PubComp(v4::PubComp::new(pkid))))
            .await
            .unwrap();
    }
    s.write_all(&encode(v4::Packet::Disconnect)).await.unwrap();
    closed(&mut s).await;

    // Nothing is owed any more: a new event comes fresh, and alone.
    let mut buf = BytesMut::new();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    assert!(raw_session(&mut s, &mut buf, "raw-q2", &alice).await);
    alice.send(&room, "org.weft.n", "n3", json!({"n": 3})).await;
    match read_packet(&mut s, &mut buf).await {
        v4::Packet::Publish(p) => {
            assert!(!p.dup);
            assert_eq!(body(&p.payload)["content"]["n"], json!(3));
        }
        p => panic!("expected only the new event, got {p:?}"),
    }
}

#[tokio::test]
async fn qos2_message_pubrecd_out_of_order_is_not_resent_after_reconnect() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let addr = srv.mqtt_addr();

    let mut buf = BytesMut::new();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    raw_session(&mut s, &mut buf, "raw-q2-ooo", &alice).await;
    s.write_all(&encode(v4::Packet::Subscribe(v4::Subscribe::new(
        format!("weft/r/{room}/e/#"),
        QoS::ExactlyOnce,
    ))))
    .await
    .unwrap();
    assert!(matches!(read_packet(&mut s, &mut buf).await, v4::Packet::SubAck(_)));
    for i in 0..3 {
        alice.send(&room, "org.weft.n", &format!("n{i}"), json!({"n": i})).await;
    }
    let mut pkids = Vec::new();
    while pkids.len() < 3 {
        if let v4::Packet::Publish(p) = read_packet(&mut s, &mut buf).await {
            pkids.push(p.pkid);
        }
    }
    // Only the last one is received and completed; the first two are not.
    let last = pkids[2];
    s.write_all(&encode(v4::Packet::PubRec(v4::PubRec::new(last))))
        .await
        .unwrap();
    assert!(matches!(read_packet(&mut s, &mut buf).await, v4::Packet::PubRel(r) if r.pkid == last));
    s.write_all(&encode(v4::Packet::PubComp(v4::PubComp::new(last))))
        .await
        .unwrap();
    // DISCONNECT after the PUBCOMP: the server has read it when the session is saved.
    s.write_all(&encode(v4::Packet::Disconnect)).await.unwrap();
    closed(&mut s).await;

    // Reconnect: the first two again (same IDs, DUP), the third not.
    let mut buf = BytesMut::new();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    assert!(raw_session(&mut s, &mut buf, "raw-q2-ooo", &alice).await);
    for (i, pkid) in pkids[..2].iter().enumerate() {
        match read_packet(&mut s, &mut buf).await {
            v4::Packet::Publish(p) => {
                assert_eq!((p.pkid, p.dup), (*pkid, true));
                assert_eq!(body(&p.payload)["content"]["n"], json!(i));
            }
            p => panic!("{p:?}"),
        }
    }
    for pkid in &pkids[..2] {
        s.write_all(&encode(v4::Packet::PubRec(v4::PubRec::new(*pkid))))
            .await
            .unwrap();
    }
    // Their PUBRELs, then a new event: the third old one never comes back.
    // (The new event is sent once both PUBRELs are in: MQTT does not order
    // a PUBREL against a new PUBLISH.)
    let mut rest = Vec::new();
    while rest.len() < 3 {
        if rest.len() == 2 {
            alice.send(&room, "org.weft.n", "n3", json!({"n": 3})).await;
        }
        match read_packet(&mut s, &mut buf).await {
            v4::Packet::PubRel(r) => rest.push(format!("pubrel {}", r.pkid)),
            v4::Packet::Publish(p) => rest.push(format!("n{}", body(&p.payload)["content"]["n"])),
            p => panic!("{p:?}"),
        }
    }
    assert_eq!(
        rest,
        vec![
            format!("pubrel {}", pkids[0]),
            format!("pubrel {}", pkids[1]),
            "n3".into()
        ]
    );
}

#[tokio::test]
async fn graceful_restart_stores_sessions_so_qos2_stays_exactly_once() {
    use rumqttc::v5;
    let mut srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let mut m = spawn(options("restart-q2", &srv.mqtt_host, srv.mqtt_port, &alice, false));
    assert!(!m.connack().await.session_present);
    let filter = format!("weft/r/{room}/e/#");
    m.client.subscribe(&filter, QoS::ExactlyOnce).await.unwrap();
    m.suback().await;
    send_bodies(&alice, &room, "r", 0..5).await;
    m.qos2_publishes(5).await;
    // A round trip after the PUBCOMPs: the server has read them.
    m.client.subscribe(&filter, QoS::ExactlyOnce).await.unwrap();
    m.suback().await;
    // An MQTT 5 client is told why the connection ends.
    let mut o = v5::MqttOptions::new("restart-v5", &srv.mqtt_host, srv.mqtt_port);
    o.set_credentials(alice.user_id.as_str(), alice.access_token.as_str());
    let (_c5, mut el5) = v5::AsyncClient::new(o, 10);
    let (tx5, mut rx5) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el5.poll().await {
                Ok(v5::Event::Incoming(p)) => {
                    if tx5.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx5.send(Err(e));
                    return;
                }
            }
        }
    });
    let first = timeout(WAIT, rx5.recv()).await.unwrap().unwrap();
    assert!(matches!(first, Ok(v5::mqttbytes::v5::Packet::ConnAck(_))), "{first:?}");

    // SIGTERM: well within the 5 s between periodic saves.
    srv.restart().await;
    // (rumqttc reports a server's DISCONNECT as the error ending its loop.)
    loop {
        match timeout(WAIT, rx5.recv()).await.expect("no DISCONNECT from the server") {
            Some(Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect { reason_code, .. }))) => {
                assert_eq!(reason_code, v5::mqttbytes::v5::DisconnectReasonCode::ServerShuttingDown);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended without DISCONNECT: {other:?}"),
        }
    }
    m.task.abort();

    send_bodies(&alice, &room, "r", 5..8).await;
    let mut m = spawn(options("restart-q2", &srv.mqtt_host, srv.mqtt_port, &alice, false));
    assert!(m.connack().await.session_present);
    let got = m.qos2_publishes(3).await;
    let bodies = bodies_of(&got);
    assert_eq!(bodies, vec!["e5", "e6", "e7"], "only what was missed, once");
    m.quiet(Duration::from_millis(500)).await;
}

/// Sends `m.room.message` events with bodies `e{i}` (txn `{txn}{i}`) for `range`.
async fn send_bodies(alice: &User, room: &str, txn: &str, range: std::ops::Range<i32>) {
    for i in range {
        alice
            .send(
                room,
                "m.room.message",
                &format!("{txn}{i}"),
                json!({"body": format!("e{i}")}),
            )
            .await;
    }
}
