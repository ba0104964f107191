//! End-to-end tests of the MQTT door against the real `weft` binary, with
//! rumqttc (MQTT 3.1.1 and 5), raw sockets, and mosquitto's clients.

mod common;

use std::time::Duration;

use common::client::{Mqtt as C4, WAIT, body, closed, room_for, spawn};
use common::{SERVER_NAME, Server, User, enc};
use rumqttc::v5;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

fn c4(srv: &Server, id: &str, user: &str, pass: &str, clean: bool) -> C4 {
    c4_with(srv, id, user, pass, clean, None)
}

fn c4_with(srv: &Server, id: &str, user: &str, pass: &str, clean: bool, will: Option<rumqttc::LastWill>) -> C4 {
    let mut o = rumqttc::MqttOptions::new(id, &srv.mqtt_host, srv.mqtt_port);
    o.set_credentials(user, pass)
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(clean);
    if let Some(w) = will {
        o.set_last_will(w);
    }
    spawn(o)
}

struct C5 {
    client: v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<v5::mqttbytes::v5::Packet, v5::ConnectionError>>,
}

fn c5(srv: &Server, id: &str, user: &str, pass: &str) -> C5 {
    c5_with(srv, id, user, pass, |_| {})
}

fn c5_with(srv: &Server, id: &str, user: &str, pass: &str, f: impl FnOnce(&mut v5::MqttOptions)) -> C5 {
    let mut o = v5::MqttOptions::new(id, &srv.mqtt_host, srv.mqtt_port);
    o.set_credentials(user, pass).set_keep_alive(Duration::from_secs(5));
    f(&mut o);
    let (client, mut el) = v5::AsyncClient::new(o, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(v5::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    C5 { client, rx }
}

impl C5 {
    async fn next(&mut self) -> Result<v5::mqttbytes::v5::Packet, v5::ConnectionError> {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("no MQTT packet in time")
            .expect("event loop ended")
    }

    async fn packet(&mut self) -> v5::mqttbytes::v5::Packet {
        loop {
            match self.next().await {
                Ok(v5::mqttbytes::v5::Packet::PingResp(_)) => {}
                Ok(p) => return p,
                Err(e) => panic!("connection error: {e:?}"),
            }
        }
    }
}

fn q1() -> rumqttc::QoS {
    rumqttc::QoS::AtLeastOnce
}

#[tokio::test]
async fn publish_qos1_becomes_event_over_http() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "room_alias_name": "lab"}))
        .await;
    // Password login (device = client ID).
    let mut m = c4(&srv, "sensor-a", "alice", &alice.password, true);
    assert_eq!(m.connack().await.code, rumqttc::ConnectReturnCode::Success);
    m.client
        .publish(
            format!("weft/r/{room}/e/org.weft.telemetry"),
            q1(),
            false,
            r#"{"temp": 21.50, "n": 3, "big": 0.1000000000000000055}"#,
        )
        .await
        .unwrap();
    assert!(matches!(m.packet().await, rumqttc::Packet::PubAck(_)));
    // PUBACK came after the event was stored: it is there now.
    let evs = alice.last_events(&room, 1).await;
    assert_eq!(evs[0]["type"], "org.weft.telemetry");
    assert_eq!(evs[0]["sender"], alice.user_id);
    assert_eq!(
        evs[0]["content"],
        json!({"temp": "21.50", "n": 3, "big": "0.1000000000000000055"})
    );
    // The MQTT device is seen, as a device over HTTP is.
    let (st, dev) = alice.get("devices/sensor-a").await;
    assert_eq!(st, 200, "{dev}");
    assert_eq!(dev["last_seen_ip"], "127.0.0.1", "{dev}");
    assert!(dev["last_seen_ts"].as_u64().is_some_and(|t| t > 0), "{dev}");

    // Alias topic, plain-text payload, token login with the full user ID.
    let mut t = c4(&srv, "sensor-b", &alice.user_id, &alice.access_token, true);
    assert_eq!(t.connack().await.code, rumqttc::ConnectReturnCode::Success);
    t.client
        .publish(
            format!("weft/a/lab:{SERVER_NAME}/e/org.weft.note"),
            q1(),
            false,
            "hello",
        )
        .await
        .unwrap();
    assert!(matches!(t.packet().await, rumqttc::Packet::PubAck(_)));
    // State, with the empty state key.
    t.client
        .publish(
            format!("weft/r/{room}/s/m.room.topic/"),
            q1(),
            false,
            r#"{"topic": "bench 3"}"#,
        )
        .await
        .unwrap();
    assert!(matches!(t.packet().await, rumqttc::Packet::PubAck(_)));
    let evs = alice.last_events(&room, 2).await;
    assert_eq!(evs[0]["type"], "org.weft.note");
    assert_eq!(evs[0]["content"], json!({"msgtype": "org.weft.raw", "body": "hello"}));
    assert_eq!(evs[1]["type"], "m.room.topic");
    assert_eq!(evs[1]["state_key"], "");
    let (s, topic) = alice.state(&room, "m.room.topic", "").await;
    assert_eq!((s, topic), (200, json!({"topic": "bench 3"})));
}

#[tokio::test]
async fn http_events_reach_subscribers_once_in_order() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let other = room_for(&alice).await;
    // 3.1.1 on one room, 5 on all joined rooms.
    let mut a = c4(&srv, "sub-a", "alice", &alice.access_token, true);
    a.connack().await;
    a.client.subscribe(format!("weft/r/{room}/e/#"), q1()).await.unwrap();
    match a.packet().await {
        rumqttc::Packet::SubAck(s) => {
            assert_eq!(s.return_codes, vec![rumqttc::SubscribeReasonCode::Success(q1())])
        }
        p => panic!("{p:?}"),
    }
    let mut b = c5(&srv, "sub-b", &alice.user_id, &alice.access_token);
    assert!(matches!(b.packet().await, v5::mqttbytes::v5::Packet::ConnAck(_)));
    b.client
        .subscribe("weft/r/+/e/#", v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(b.packet().await, v5::mqttbytes::v5::Packet::SubAck(_)));

    for i in 0..50 {
        alice
            .send(
                &room,
                "m.room.message",
                &format!("t{i}"),
                json!({"msgtype": "m.text", "body": format!("m{i}")}),
            )
            .await;
    }
    alice.send(&other, "org.weft.ping", "o1", json!({"x": 1})).await;

    let got = a.publishes(50).await;
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.topic, format!("weft/r/{room}/e/m.room.message"));
        let ev = body(&p.payload);
        assert_eq!(ev["content"]["body"], format!("m{i}"), "order");
        assert_eq!(ev["room_id"], room);
        assert!(ev["event_id"].is_string());
    }
    a.quiet(Duration::from_millis(400)).await;

    let mut bodies = Vec::new();
    while bodies.len() < 51 {
        if let v5::mqttbytes::v5::Packet::Publish(p) = b.packet().await {
            bodies.push((String::from_utf8(p.topic.to_vec()).unwrap(), body(&p.payload)));
        }
    }
    for (i, (topic, ev)) in bodies.iter().take(50).enumerate() {
        assert_eq!(topic, &format!("weft/r/{room}/e/m.room.message"));
        assert_eq!(ev["content"]["body"], format!("m{i}"));
    }
    assert_eq!(bodies[50].0, format!("weft/r/{other}/e/org.weft.ping"));
}

#[tokio::test]
async fn refusals_wrong_password_foreign_room_publish_and_subscribe() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let bob = srv.register("bob").await;
    let room = room_for(&alice).await;

    // Wrong password: 3.1.1 and 5.
    let mut w = c4(&srv, "w4", "alice", "not-the-password", true);
    match w.next().await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    let mut w5 = c5(&srv, "w5", "alice", "not-the-password");
    match w5.next().await {
        Err(v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected refusal, got {other:?}"),
    }

    // Bob is not in alice's room. MQTT 5: PUBACK 0x87 and SUBACK 0x87.
    let mut b5 = c5(&srv, "b5", "bob", &bob.access_token);
    assert!(matches!(b5.packet().await, v5::mqttbytes::v5::Packet::ConnAck(_)));
    b5.client
        .publish(
            format!("weft/r/{room}/e/org.weft.x"),
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    match b5.packet().await {
        v5::mqttbytes::v5::Packet::PubAck(a) => {
            assert_eq!(a.reason, v5::mqttbytes::v5::PubAckReason::NotAuthorized)
        }
        p => panic!("{p:?}"),
    }
    b5.client
        .subscribe(format!("weft/r/{room}/e/#"), v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    match b5.packet().await {
        v5::mqttbytes::v5::Packet::SubAck(s) => assert_eq!(
            s.return_codes,
            vec![v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]
        ),
        p => panic!("{p:?}"),
    }

    // MQTT 3.1.1: SUBACK 0x80; a refused PUBLISH closes the connection.
    let mut b4 = c4(&srv, "b4", "bob", &bob.access_token, true);
    b4.connack().await;
    b4.client.subscribe(format!("weft/r/{room}/s/#"), q1()).await.unwrap();
    match b4.packet().await {
        rumqttc::Packet::SubAck(s) => assert_eq!(s.return_codes, vec![rumqttc::SubscribeReasonCode::Failure]),
        p => panic!("{p:?}"),
    }
    b4.client
        .publish(format!("weft/r/{room}/e/org.weft.x"), q1(), false, "{}")
        .await
        .unwrap();
    loop {
        match b4.next().await {
            Ok(rumqttc::Packet::PubAck(_)) => panic!("refused publish was acknowledged"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Nothing was written to the room.
    let evs = alice.last_events(&room, 50).await;
    assert!(evs.iter().all(|e| e["type"] != "org.weft.x"));
}

#[tokio::test]
async fn state_is_retained_on_subscribe_then_changes_follow() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let mut m = c4(&srv, "st", "alice", &alice.access_token, true);
    m.connack().await;
    m.client.subscribe(format!("weft/r/{room}/s/#"), q1()).await.unwrap();
    let mut state = Vec::new();
    // SUBACK, then the current state as retained messages.
    match m.packet().await {
        rumqttc::Packet::SubAck(_) => {}
        p => panic!("{p:?}"),
    }
    while let Ok(Some(Ok(p))) = timeout(Duration::from_millis(500), m.rx.recv()).await {
        if let rumqttc::Packet::Publish(p) = p {
            assert!(p.retain, "state on subscribe is retained");
            state.push(p);
        }
    }
    let name = state
        .iter()
        .find(|p| p.topic == format!("weft/r/{room}/s/m.room.name/"))
        .expect("m.room.name retained");
    assert_eq!(body(&name.payload)["content"]["name"], "Lab");
    let member = format!("weft/r/{room}/s/m.room.member/{}", alice.user_id);
    assert!(state.iter().any(|p| p.topic == member));
    assert!(
        state
            .iter()
            .any(|p| p.topic == format!("weft/r/{room}/s/m.room.create/"))
    );
    let topics: std::collections::HashSet<_> = state.iter().map(|p| p.topic.clone()).collect();
    assert_eq!(topics.len(), state.len(), "each state event once");

    // A change arrives live, not retained; messages do not.
    alice
        .send(&room, "m.room.message", "x", json!({"msgtype": "m.text", "body": "no"}))
        .await;
    alice
        .put_state(&room, "m.room.name", "", json!({"name": "Lab 2"}))
        .await;
    let p = &m.publishes(1).await[0];
    assert_eq!(p.topic, format!("weft/r/{room}/s/m.room.name/"));
    assert!(!p.retain);
    assert_eq!(body(&p.payload)["content"]["name"], "Lab 2");
    m.quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn persistent_session_delivers_missed_events_once_in_order() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let mut m = c4(&srv, "persist-1", "alice", &alice.password, false);
    assert!(!m.connack().await.session_present);
    m.client.subscribe(format!("weft/r/{room}/e/+"), q1()).await.unwrap();
    assert!(matches!(m.packet().await, rumqttc::Packet::SubAck(_)));
    alice
        .send(&room, "m.room.message", "before", json!({"body": "before"}))
        .await;
    assert_eq!(body(&m.publishes(1).await[0].payload)["content"]["body"], "before");
    m.client.disconnect().await.unwrap();
    while let Ok(Some(r)) = timeout(WAIT, m.rx.recv()).await {
        if r.is_err() {
            break;
        }
    }
    drop(m);

    for i in 0..10 {
        alice
            .send(
                &room,
                "m.room.message",
                &format!("p{i}"),
                json!({"body": format!("missed {i}")}),
            )
            .await;
    }
    let mut m = c4(&srv, "persist-1", "alice", &alice.password, false);
    assert!(m.connack().await.session_present);
    let got = m.publishes(10).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|p| body(&p.payload)["content"]["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies, (0..10).map(|i| format!("missed {i}")).collect::<Vec<_>>());
    m.quiet(Duration::from_millis(500)).await;

    // Clean session forgets it.
    m.client.disconnect().await.unwrap();
    drop(m);
    let mut c = c4(&srv, "persist-1", "alice", &alice.password, true);
    assert!(!c.connack().await.session_present);
}

/// A valid 3.1.1 CONNECT, encoded by rumqttc.
fn raw_connect(id: &str, user: &str, pass: &str, keep_alive: u16) -> Vec<u8> {
    let mut c = rumqttc::Connect::new(id);
    c.keep_alive = keep_alive;
    c.set_login(user, pass);
    let mut buf = bytes::BytesMut::new();
    rumqttc::Packet::Connect(c).write(&mut buf, 1 << 20).unwrap();
    buf.to_vec()
}

#[tokio::test]
async fn garbage_truncated_oversized_and_silent_clients_are_dropped() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let addr = srv.mqtt_addr();

    // Garbage instead of CONNECT.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(closed(&mut s).await.is_empty());

    // A CONNECT cut short inside its own length.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0x10, 0x04, 0x00, 0x04, b'M', b'Q']).await.unwrap();
    assert!(closed(&mut s).await.is_empty());

    // Half a CONNECT, then the client hangs up.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let connect = raw_connect("raw", "alice", &alice.access_token, 30);
    s.write_all(&connect[..connect.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(closed(&mut s).await.is_empty());

    // Oversized PUBLISH after a good CONNECT: the header alone is refused.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&raw_connect("raw2", "alice", &alice.access_token, 30))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    // Remaining length 200 MB (varint 0x80 0x80 0xE8 0x5F).
    s.write_all(&[0x30, 0x80, 0x80, 0xE8, 0x5F, 0x00, 0x01]).await.unwrap();
    assert!(closed(&mut s).await.is_empty());

    // Malformed packet after CONNECT (reserved packet type 15).
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&raw_connect("raw3", "alice", &alice.access_token, 30))
        .await
        .unwrap();
    s.read_exact(&mut connack).await.unwrap();
    s.write_all(&[0xF0, 0x00]).await.unwrap();
    closed(&mut s).await;

    // Keepalive 1 s and silence: dropped after 1.5 s.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&raw_connect("raw4", "alice", &alice.access_token, 1))
        .await
        .unwrap();
    s.read_exact(&mut connack).await.unwrap();
    let t0 = std::time::Instant::now();
    closed(&mut s).await;
    assert!(t0.elapsed() >= Duration::from_millis(1200), "{:?}", t0.elapsed());

    // The server still serves a well-behaved client.
    let mut m = c4(&srv, "good", "alice", &alice.access_token, true);
    assert_eq!(m.connack().await.code, rumqttc::ConnectReturnCode::Success);
    m.client
        .publish(format!("weft/r/{room}/e/org.weft.ok"), q1(), false, "{\"ok\": true}")
        .await
        .unwrap();
    assert!(matches!(m.packet().await, rumqttc::Packet::PubAck(_)));
    assert_eq!(alice.last_events(&room, 1).await[0]["content"], json!({"ok": true}));
}

#[tokio::test]
async fn mosquitto_clients_publish_and_subscribe() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    if !weft_testkit::tools_installed(
        &["mosquitto_pub", "mosquitto_sub", "stdbuf"],
        "apt-get install mosquitto-clients (stdbuf: coreutils)",
    ) {
        return;
    }
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let port = srv.mqtt_port.to_string();
    let common = [
        "-h",
        srv.mqtt_host.as_str(),
        "-p",
        port.as_str(),
        "-u",
        alice.user_id.as_str(),
        "-P",
        alice.password.as_str(),
    ];
    let sub_topic = format!("weft/r/{room}/e/#");
    // Line-buffered, so its debug lines (SUBACK) come out as they happen.
    let mut sub = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(common)
        .args([
            "-i", "mosq-sub", "-q", "1", "-v", "-d", "-C", "3", "-W", "9", "-t", &sub_topic,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = sub.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait until the subscription stands.
    loop {
        let line = rx.recv_timeout(Duration::from_secs(5)).expect("mosquitto_sub SUBACK");
        if line.contains("SUBACK") {
            break;
        }
    }
    for i in 0..3 {
        let topic = format!("weft/r/{room}/e/org.weft.telemetry");
        let msg = format!("{{\"seq\": {i}, \"temp\": 20.{i}5}}");
        let out = Command::new("mosquitto_pub")
            .args(common)
            .args(["-i", &format!("mosq-pub-{i}"), "-q", "1", "-t", &topic, "-m", &msg])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = tokio::task::spawn_blocking(move || sub.wait()).await.unwrap().unwrap();
    assert!(status.success(), "mosquitto_sub exited with {status}");
    // All of its output: the reader thread ends at EOF, dropping the sender.
    let messages: Vec<Value> = rx
        .iter()
        .filter_map(|l| {
            l.strip_prefix(&format!("weft/r/{room}/e/org.weft.telemetry "))
                .map(|j| serde_json::from_str(j).unwrap())
        })
        .collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    for (i, ev) in messages.iter().enumerate() {
        assert_eq!(ev["content"], json!({"seq": i, "temp": format!("20.{i}5")}));
        assert_eq!(ev["sender"], alice.user_id);
    }
    // And over HTTP, the same three.
    let evs = alice.last_events(&room, 3).await;
    assert_eq!(
        evs.iter().map(|e| e["content"]["seq"].clone()).collect::<Vec<_>>(),
        vec![json!(0), json!(1), json!(2)]
    );
}

#[tokio::test]
async fn will_qos2_alias_subscription_and_takeover() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "room_alias_name": "lab"}))
        .await;
    let alias_topic = format!("weft/a/lab:{SERVER_NAME}/e");

    // Subscribing by alias: messages come on the alias form of the topic.
    let mut sub = c4(&srv, "watcher", "alice", &alice.access_token, true);
    sub.connack().await;
    sub.client.subscribe(format!("{alias_topic}/#"), q1()).await.unwrap();
    assert!(matches!(sub.packet().await, rumqttc::Packet::SubAck(_)));

    // QoS 2 in: PUBREC after storing, PUBCOMP after PUBREL, one event.
    let mut dev = c4(&srv, "dev-q2", "alice", &alice.access_token, true);
    dev.connack().await;
    dev.client
        .publish(
            format!("{alias_topic}/org.weft.q2"),
            rumqttc::QoS::ExactlyOnce,
            false,
            r#"{"n": 1}"#,
        )
        .await
        .unwrap();
    assert!(matches!(dev.packet().await, rumqttc::Packet::PubRec(_)));
    assert!(matches!(dev.packet().await, rumqttc::Packet::PubComp(_)));
    let p = &sub.publishes(1).await[0];
    assert_eq!(p.topic, format!("{alias_topic}/org.weft.q2"));
    assert_eq!(body(&p.payload)["content"], json!({"n": 1}));

    // A will, published when the device vanishes without DISCONNECT.
    let will = rumqttc::LastWill::new(
        format!("weft/r/{room}/e/org.weft.status"),
        r#"{"online": false}"#,
        q1(),
        false,
    );
    let mut w = c4_with(&srv, "dev-will", "alice", &alice.access_token, true, Some(will));
    w.connack().await;
    w.task.abort();
    let p = &sub.publishes(1).await[0];
    assert_eq!(p.topic, format!("{alias_topic}/org.weft.status"));
    assert_eq!(body(&p.payload)["content"], json!({"online": false}));

    // No will after a clean DISCONNECT.
    let will = rumqttc::LastWill::new(format!("weft/r/{room}/e/org.weft.status"), "{}", q1(), false);
    let mut w = c4_with(&srv, "dev-will2", "alice", &alice.access_token, true, Some(will));
    w.connack().await;
    w.client.disconnect().await.unwrap();
    while let Ok(Some(Ok(_))) = timeout(WAIT, w.rx.recv()).await {}

    // A second connection with the same client ID takes over.
    let mut first = c4(&srv, "twin", "alice", &alice.access_token, true);
    first.connack().await;
    let mut second = c4(&srv, "twin", "alice", &alice.access_token, true);
    second.connack().await;
    // The first one is closed.
    while first.next().await.is_ok() {}
    second
        .client
        .publish(format!("weft/r/{room}/e/org.weft.twin"), q1(), false, "{}")
        .await
        .unwrap();
    assert!(matches!(second.packet().await, rumqttc::Packet::PubAck(_)));
    let p = &sub.publishes(1).await[0];
    assert_eq!(p.topic, format!("{alias_topic}/org.weft.twin"));
    sub.quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn mqtt5_session_persists_only_with_an_expiry_interval() {
    use v5::mqttbytes::v5::Packet as P5;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let keep = |o: &mut v5::MqttOptions| {
        o.set_clean_start(false).set_session_expiry_interval(Some(3600));
    };
    let mut m = c5_with(&srv, "v5-keep", "alice", &alice.access_token, keep);
    match m.packet().await {
        P5::ConnAck(c) => assert!(!c.session_present),
        p => panic!("{p:?}"),
    }
    m.client
        .subscribe(
            format!("weft/r/{room}/e/m.room.message"),
            v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    assert!(matches!(m.packet().await, P5::SubAck(_)));
    m.client.disconnect().await.unwrap();
    while let Ok(Some(Ok(_))) = timeout(WAIT, m.rx.recv()).await {}
    drop(m);

    for i in 0..5 {
        alice
            .send(
                &room,
                "m.room.message",
                &format!("k{i}"),
                json!({"body": format!("k{i}")}),
            )
            .await;
    }
    // Resumed without expiry: the missed events come, but the session ends
    // with this connection.
    let mut m = c5_with(&srv, "v5-keep", "alice", &alice.access_token, |o| {
        o.set_clean_start(false);
    });
    match m.packet().await {
        P5::ConnAck(c) => assert!(c.session_present),
        p => panic!("{p:?}"),
    }
    let mut bodies = Vec::new();
    while bodies.len() < 5 {
        if let P5::Publish(p) = m.packet().await {
            bodies.push(body(&p.payload)["content"]["body"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(bodies, (0..5).map(|i| format!("k{i}")).collect::<Vec<_>>());
    m.client.disconnect().await.unwrap();
    while let Ok(Some(Ok(_))) = timeout(WAIT, m.rx.recv()).await {}
    drop(m);
    let mut m = c5_with(&srv, "v5-keep", "alice", &alice.access_token, keep);
    match m.packet().await {
        P5::ConnAck(c) => assert!(!c.session_present),
        p => panic!("{p:?}"),
    }
}

/// Many QoS 1 publishes written at once are pipelined: each PUBACK comes
/// after its event is stored, in the order the publishes arrived; a refused
/// publish after them closes the connection only once those are answered.
#[tokio::test]
async fn pipelined_publishes_are_acknowledged_in_order_after_storing() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let bob = srv.register("bob").await;
    let room = room_for(&alice).await;
    let foreign = room_for(&bob).await;
    const N: u16 = 300;

    let mut s = TcpStream::connect(srv.mqtt_addr()).await.unwrap();
    s.write_all(&raw_connect("pipe", "alice", &alice.access_token, 30))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    let mut burst = bytes::BytesMut::new();
    for seq in 1..=N + 1 {
        // One QoS 0 publish among them, shortly before the refused one (so
        // still in the pipeline then): it gets no acknowledgement, and must
        // not stop the ones after it from getting theirs.
        let qos0 = seq == N - 10;
        let mut p = rumqttc::Publish::new(
            format!("weft/r/{room}/e/org.weft.seq"),
            if qos0 { rumqttc::QoS::AtMostOnce } else { q1() },
            format!("{{\"seq\": {seq}}}"),
        );
        p.pkid = if qos0 { 0 } else { seq };
        rumqttc::Packet::Publish(p).write(&mut burst, 1 << 20).unwrap();
    }
    // Then one the room's power levels refuse (alice is not in bob's room).
    let mut p = rumqttc::Publish::new(format!("weft/r/{foreign}/e/org.weft.seq"), q1(), "{}");
    p.pkid = N + 2;
    rumqttc::Packet::Publish(p).write(&mut burst, 1 << 20).unwrap();
    s.write_all(&burst).await.unwrap();

    let got = closed(&mut s).await;
    let expected: Vec<u8> = (1..=N + 1)
        .filter(|i| *i != N - 10)
        .flat_map(|i| [0x40, 0x02, (i >> 8) as u8, i as u8])
        .collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "PUBACKs for the {N} accepted publishes, then close"
    );
    assert_eq!(got, expected, "PUBACKs in publish order");

    let evs = alice.last_events(&room, 1000).await;
    let seqs: Vec<u64> = evs
        .iter()
        .filter(|e| e["type"] == "org.weft.seq")
        .map(|e| e["content"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=u64::from(N) + 1).collect::<Vec<_>>(),
        "stored once each, in order"
    );
    let evs = bob.last_events(&foreign, 1000).await;
    assert!(
        evs.iter().all(|e| e["type"] != "org.weft.seq"),
        "nothing stored in the foreign room"
    );
}

/// A raw MQTT 5 connection: CONNECT with a session expiry interval, then
/// the CONNACK's session-present flag.
async fn raw5_connect(srv: &Server, id: &str, user: &User, expiry: u32) -> (TcpStream, bool) {
    use v5::mqttbytes::v5 as m5;
    let mut props = m5::ConnectProperties::new();
    props.session_expiry_interval = Some(expiry);
    let connect = m5::Connect {
        keep_alive: 30,
        client_id: id.to_owned(),
        clean_start: false,
        properties: Some(props),
    };
    let mut buf = bytes::BytesMut::new();
    m5::Packet::Connect(
        connect,
        None,
        Some(m5::Login::new(user.user_id.as_str(), user.access_token.as_str())),
    )
    .write(&mut buf, None)
    .unwrap();
    let mut s = TcpStream::connect(srv.mqtt_addr()).await.unwrap();
    s.write_all(&buf).await.unwrap();
    let mut rd = bytes::BytesMut::new();
    loop {
        match m5::Packet::read(&mut rd, None) {
            Ok(m5::Packet::ConnAck(c)) => {
                assert_eq!(c.code, m5::ConnectReturnCode::Success);
                return (s, c.session_present);
            }
            Ok(p) => panic!("expected CONNACK, got {p:?}"),
            Err(_) => {
                let n = timeout(WAIT, s.read_buf(&mut rd)).await.unwrap().unwrap();
                assert!(n > 0, "closed before CONNACK");
            }
        }
    }
}

/// DISCONNECT, optionally with a new session expiry interval; waits for
/// the server to close the connection.
async fn raw5_disconnect(mut s: TcpStream, expiry: Option<u32>) -> Vec<u8> {
    use v5::mqttbytes::v5 as m5;
    let mut d = m5::Disconnect::new(m5::DisconnectReasonCode::NormalDisconnection);
    d.properties = expiry.map(|e| m5::DisconnectProperties {
        session_expiry_interval: Some(e),
        reason_string: None,
        user_properties: vec![],
        server_reference: None,
    });
    let mut buf = bytes::BytesMut::new();
    m5::Packet::Disconnect(d).write(&mut buf, None).unwrap();
    s.write_all(&buf).await.unwrap();
    closed(&mut s).await
}

#[tokio::test]
async fn mqtt5_session_expiry_interval_is_enforced() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let subscribe = |id: &'static str, expiry: u32| {
        let srv = &srv;
        let alice = &alice;
        let room = &room;
        async move {
            let mut m = c5_with(srv, id, "alice", &alice.access_token, |o| {
                o.set_clean_start(false).set_session_expiry_interval(Some(expiry));
            });
            assert!(matches!(m.packet().await, v5::mqttbytes::v5::Packet::ConnAck(_)));
            m.client
                .subscribe(format!("weft/r/{room}/e/#"), v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .unwrap();
            assert!(matches!(m.packet().await, v5::mqttbytes::v5::Packet::SubAck(_)));
            m.client.disconnect().await.unwrap();
            while let Ok(Some(Ok(_))) = timeout(WAIT, m.rx.recv()).await {}
        }
    };
    // One session that expires 1 s after its connection ends, one that lasts.
    subscribe("short", 1).await;
    subscribe("long", 3600).await;
    // Expiry is about time passing: nothing to await but the clock.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, present) = raw5_connect(&srv, "short", &alice, 60).await;
    assert!(!present, "the 1 s session outlived its interval");
    raw5_disconnect(s, None).await;
    let (s, present) = raw5_connect(&srv, "long", &alice, 3600).await;
    assert!(present, "the 3600 s session expired early");

    // DISCONNECT with expiry 0 ends the session at once.
    raw5_disconnect(s, Some(0)).await;
    let (s, present) = raw5_connect(&srv, "long", &alice, 3600).await;
    assert!(!present, "DISCONNECT with session expiry 0 kept the session");
    raw5_disconnect(s, None).await;

    // No expiry at CONNECT, then one at DISCONNECT: a protocol error
    // (DISCONNECT 0x82), and no session is kept.
    let (s, _) = raw5_connect(&srv, "none", &alice, 0).await;
    let reply = raw5_disconnect(s, Some(60)).await;
    assert_eq!(reply.first(), Some(&0xE0), "expected a DISCONNECT, got {reply:?}");
    assert!(
        reply.contains(&0x82),
        "expected reason 0x82 protocol error, got {reply:?}"
    );
    let (_s, present) = raw5_connect(&srv, "none", &alice, 60).await;
    assert!(!present);
}

/// An event over the spec's 64 KiB limit is refused with a reason, never
/// as an unspecified (internal) error: MQTT 5 PUBACK `0x83` (PUBACK has
/// no "packet too large"), MQTT 5 QoS 0 DISCONNECT `0x95`; MQTT 3.1.1
/// closes the connection after acknowledging what came before. Nothing
/// is stored.
#[tokio::test]
async fn events_over_64k_are_refused_as_too_large() {
    use v5::mqttbytes::v5 as m5;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let topic = format!("weft/r/{room}/e/org.weft.big");
    let big = json!({"body": "x".repeat(65 * 1024)}).to_string();
    let fits = json!({"body": "x".repeat(65_300)}).to_string();

    let mut m = c5_with(&srv, "big5", "alice", &alice.access_token, |o| {
        o.set_max_packet_size(Some(256 * 1024));
    });
    assert!(matches!(m.packet().await, m5::Packet::ConnAck(_)));
    // 65 KiB of content; and content under 64 KiB whose event is not.
    for payload in [&big, &fits] {
        m.client
            .publish(&topic, v5::mqttbytes::QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        match m.packet().await {
            m5::Packet::PubAck(a) => assert_eq!(a.reason, m5::PubAckReason::ImplementationSpecificError),
            p => panic!("expected PUBACK, got {p:?}"),
        }
    }
    // The connection goes on.
    m.client
        .publish(&topic, v5::mqttbytes::QoS::AtLeastOnce, false, "{\"small\": 1}")
        .await
        .unwrap();
    match m.packet().await {
        m5::Packet::PubAck(a) => assert_eq!(a.reason, m5::PubAckReason::Success),
        p => panic!("expected PUBACK, got {p:?}"),
    }
    // QoS 0 has no PUBACK: DISCONNECT 0x95.
    m.client
        .publish(&topic, v5::mqttbytes::QoS::AtMostOnce, false, big.clone())
        .await
        .unwrap();
    loop {
        match m.next().await {
            Ok(m5::Packet::PingResp(_)) => {}
            Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect { reason_code, .. })) => {
                assert_eq!(reason_code, m5::DisconnectReasonCode::PacketTooLarge);
                break;
            }
            other => panic!("expected DISCONNECT 0x95, got {other:?}"),
        }
    }

    // MQTT 3.1.1: the publish before is acknowledged, then the connection
    // closes. Read as raw bytes: rumqttc drops packets that arrive in the
    // same read as the end of the connection.
    let mut stream = TcpStream::connect(srv.mqtt_addr()).await.unwrap();
    let mut out = raw_connect("big4", "alice", &alice.access_token, 5);
    for (pkid, payload) in [(1u16, "{\"small\": 2}".to_owned()), (2, big.clone())] {
        let mut p = rumqttc::Publish::new(&topic, q1(), payload);
        p.pkid = pkid;
        let mut buf = bytes::BytesMut::new();
        rumqttc::Packet::Publish(p).write(&mut buf, 1 << 20).unwrap();
        out.extend_from_slice(&buf);
    }
    stream.write_all(&out).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .expect("the connection closes")
        .unwrap_or_default();
    // CONNACK (accepted), then PUBACK of packet 1, and nothing for packet 2.
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x01], "{got:02x?}");

    let stored: Vec<Value> = alice
        .last_events(&room, 50)
        .await
        .into_iter()
        .filter(|e| e["type"] == "org.weft.big")
        .map(|e| e["content"].clone())
        .collect();
    assert_eq!(stored, vec![json!({"small": 1}), json!({"small": 2})]);
}

/// Event types and state keys holding `+`, `#`, `/` (allowed by the spec)
/// reach subscribers on legal topics, escaped (`%XX`); types with control
/// characters are refused at the API (HTTP and MQTT); and the subscriber
/// keeps receiving what follows. rumqttc here; mosquitto_sub below.
#[tokio::test]
async fn odd_types_and_state_keys_get_legal_topics() {
    use v5::mqttbytes::v5 as m5;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let mut sub = c4(&srv, "odd-sub", "alice", &alice.access_token, true);
    sub.connack().await;
    sub.client.subscribe(format!("weft/r/{room}/#"), q1()).await.unwrap();
    sub.suback().await;
    // Current state first (retained).
    let n_state = alice
        .get(&format!("rooms/{}/state", common::enc(&room)))
        .await
        .1
        .as_array()
        .unwrap()
        .len();
    let retained = sub.publishes(n_state).await;
    assert!(retained.iter().all(|p| p.retain));

    // Refused at the API: NUL and other control characters.
    let (st, v) = alice
        .put(
            &format!("rooms/{}/send/{}/t1", common::enc(&room), common::enc("org.x\u{0}y")),
            json!({}),
        )
        .await;
    assert_eq!((st, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
    let mut m = c5(&srv, "odd-pub", "alice", &alice.access_token);
    assert!(matches!(m.packet().await, m5::Packet::ConnAck(_)));
    m.client
        .publish(
            format!("weft/r/{room}/e/org.x%00y"),
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    match m.packet().await {
        m5::Packet::PubAck(a) => assert_eq!(a.reason, m5::PubAckReason::TopicNameInvalid),
        p => panic!("expected PUBACK, got {p:?}"),
    }

    // Allowed, and escaped on the way out.
    alice.send(&room, "org.x+y#z/w", "t2", json!({"n": 1})).await;
    alice.put_state(&room, "org.weft.k", "k:1/+#%", json!({"n": 2})).await;
    // Published back to the escaped topic: the same state key.
    m.client
        .publish(
            format!("weft/r/{room}/s/org.weft.k/k:1/%2B%23%25"),
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "{\"n\": 3}",
        )
        .await
        .unwrap();
    match m.packet().await {
        m5::Packet::PubAck(a) => assert_eq!(a.reason, m5::PubAckReason::Success),
        p => panic!("expected PUBACK, got {p:?}"),
    }
    alice.send(&room, "org.weft.after", "t3", json!({"n": 4})).await;

    let got: Vec<(String, Value)> = sub
        .publishes(6)
        .await
        .iter()
        .map(|p| (p.topic.clone(), body(&p.payload)["content"]["n"].clone()))
        .collect();
    let r = format!("weft/r/{room}");
    assert_eq!(
        got,
        vec![
            (format!("{r}/e/org.x%2By%23z%2Fw"), json!(1)),
            (format!("{r}/e/org.weft.k"), json!(2)),
            (format!("{r}/s/org.weft.k/k:1/%2B%23%25"), json!(2)),
            (format!("{r}/e/org.weft.k"), json!(3)),
            (format!("{r}/s/org.weft.k/k:1/%2B%23%25"), json!(3)),
            (format!("{r}/e/org.weft.after"), json!(4)),
        ]
    );
    let (st, v) = alice.state(&room, "org.weft.k", "k:1/+#%").await;
    assert_eq!((st, v), (200, json!({"n": 3})));
}

/// libmosquitto refuses a PUBLISH whose topic MQTT forbids (and then
/// reconnects forever): after events with `+`, `#` and `/` in their type
/// and state key, mosquitto_sub still gets every event, on legal topics.
#[tokio::test]
async fn mosquitto_sub_survives_odd_types_and_state_keys() {
    use std::process::{Command, Stdio};
    if !weft_testkit::tools_installed(&["mosquitto_sub"], "apt-get install mosquitto-clients") {
        return;
    }
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let port = srv.mqtt_port.to_string();
    let topic = format!("weft/r/{room}/e/#");
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            srv.mqtt_host.as_str(),
            "-p",
            port.as_str(),
            "-u",
            "alice",
            "-P",
            alice.access_token.as_str(),
        ])
        .args(["-i", "mosq-odd", "-q", "1", "-v", "-C", "3", "-W", "15", "-t", &topic])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it subscribe (nothing retained on e/ topics to wait for).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice.send(&room, "org.x+y#z/w", "t1", json!({"n": 1})).await;
    alice.put_state(&room, "org.x+#", "k:1/+#", json!({"n": 2})).await;
    alice.send(&room, "org.weft.after", "t3", json!({"n": 3})).await;
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mosquitto_sub: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<(&str, Value)> = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, j)| (t, serde_json::from_str::<Value>(j).unwrap()["content"]["n"].clone()))
        .collect();
    let r = format!("weft/r/{room}");
    assert_eq!(
        got,
        vec![
            (format!("{r}/e/org.x%2By%23z%2Fw").as_str(), json!(1)),
            (format!("{r}/e/org.x%2B%23").as_str(), json!(2)),
            (format!("{r}/e/org.weft.after").as_str(), json!(3)),
        ]
    );
}

/// MQTT 3.1.1 and 5: an unacknowledged QoS 1 message is sent again after a
/// reconnect of the persistent session with its packet ID and DUP set
/// (MQTT 4.4); a message PUBACK'd out of order is not sent again.
#[tokio::test]
async fn unacked_qos1_is_resent_with_its_packet_id_and_dup() {
    use v5::mqttbytes::v5 as m5;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let room = room_for(&alice).await;
    let topic = format!("weft/r/{room}/e/org.weft.seq");

    // MQTT 3.1.1.
    let c4m = |id: &str| {
        let mut o = rumqttc::MqttOptions::new(id, &srv.mqtt_host, srv.mqtt_port);
        o.set_credentials("alice", &alice.access_token)
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(false)
            .set_manual_acks(true);
        spawn(o)
    };
    let mut c = c4m("dup4");
    c.connack().await;
    c.client.subscribe(&topic, q1()).await.unwrap();
    c.suback().await;
    for i in 0..3 {
        alice
            .send(&room, "org.weft.seq", &format!("a{i}"), json!({"i": i}))
            .await;
    }
    let first = c.publishes(3).await;
    assert!(first.iter().all(|p| !p.dup && p.qos == q1()));
    // Only the last is acknowledged (out of order); the connection drops.
    c.client.ack(&first[2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.task.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = c4m("dup4");
    assert!(c.connack().await.session_present);
    let again = c.publishes(2).await;
    let ids = |ps: &[rumqttc::Publish]| ps.iter().map(|p| p.pkid).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&first[..2]), "same packet IDs");
    assert!(again.iter().all(|p| p.dup), "DUP set: {again:?}");
    assert_eq!(
        again
            .iter()
            .map(|p| body(&p.payload)["content"]["i"].clone())
            .collect::<Vec<_>>(),
        vec![json!(0), json!(1)]
    );
    for p in &again {
        c.client.ack(p).await.unwrap();
    }
    c.quiet(Duration::from_millis(800)).await;
    // A new event gets a new packet ID, without DUP.
    alice.send(&room, "org.weft.seq", "a3", json!({"i": 3})).await;
    let next = c.publishes(1).await;
    assert!(!next[0].dup);
    assert_eq!(body(&next[0].payload)["content"]["i"], 3);
    c.client.ack(&next[0]).await.unwrap();
    c.disconnect().await;

    // MQTT 5, the same.
    let c5m = |srv: &Server, alice: &User| {
        c5_with(srv, "dup5", "alice", &alice.access_token, |o| {
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(3600))
                .set_manual_acks(true);
        })
    };
    let mut m = c5m(&srv, &alice);
    assert!(matches!(m.packet().await, m5::Packet::ConnAck(_)));
    m.client
        .subscribe(&topic, v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(m.packet().await, m5::Packet::SubAck(_)));
    for i in 10..12 {
        alice
            .send(&room, "org.weft.seq", &format!("b{i}"), json!({"i": i}))
            .await;
    }
    let mut first = Vec::new();
    while first.len() < 2 {
        if let m5::Packet::Publish(p) = m.packet().await {
            assert!(!p.dup);
            first.push(p);
        }
    }
    drop(m);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut m = c5m(&srv, &alice);
    match m.packet().await {
        m5::Packet::ConnAck(a) => assert!(a.session_present),
        p => panic!("expected CONNACK, got {p:?}"),
    }
    let mut again = Vec::new();
    while again.len() < 2 {
        if let m5::Packet::Publish(p) = m.packet().await {
            again.push(p);
        }
    }
    assert_eq!(
        again.iter().map(|p| (p.pkid, p.dup)).collect::<Vec<_>>(),
        first.iter().map(|p| (p.pkid, true)).collect::<Vec<_>>()
    );
}

/// A second access token of `user`, for device `device`.
async fn login(srv: &Server, user: &User, device: &str) -> String {
    srv.login_device(&user.localpart, &user.password, device)
        .await
        .access_token
}

/// Waits for an MQTT 5 connection to be closed with DISCONNECT `reason`
/// (skipping PUBLISHes if `publishes`).
async fn disconnected5(m: &mut C5, reason: v5::mqttbytes::v5::DisconnectReasonCode, publishes: bool) {
    loop {
        match m.next().await {
            Ok(v5::mqttbytes::v5::Packet::PingResp(_)) => {}
            Ok(v5::mqttbytes::v5::Packet::Publish(_)) if publishes => {}
            Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect { reason_code, .. })) => {
                assert_eq!(reason_code, reason);
                return;
            }
            other => panic!("expected DISCONNECT {reason:?}, got {other:?}"),
        }
    }
}

/// Waits for a 3.1.1 connection to be closed; no PUBLISH or PUBACK first.
async fn closed4(c: &mut C4) {
    loop {
        match c.next().await {
            Ok(rumqttc::Packet::PingResp) => {}
            Ok(p) => panic!("expected the connection to close, got {p:?}"),
            Err(_) => return,
        }
    }
}

/// Revoking a credential ends the open MQTT connections made with it, at
/// once when this server revokes it (logout, password change with logout,
/// deactivation), and before anything more is delivered or accepted when
/// another process does (`weft user revoke`). MQTT 5 is told why
/// (DISCONNECT `0x87` not authorized); 3.1.1 is closed.
#[tokio::test]
async fn revoked_credentials_end_open_connections() {
    use v5::mqttbytes::v5 as m5;
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let bob = srv.register("bob").await;
    let room = room_for(&alice).await;
    alice.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    let topic = format!("weft/r/{room}/e/#");
    let sub5 = |id: &'static str, user: &'static str, token: String| {
        let (srv, topic) = (&srv, topic.clone());
        async move {
            let mut m = c5(srv, id, user, &token);
            assert!(matches!(m.packet().await, m5::Packet::ConnAck(_)));
            m.client
                .subscribe(topic, v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .unwrap();
            assert!(matches!(m.packet().await, m5::Packet::SubAck(_)));
            m
        }
    };

    // Logout of the token it connected with.
    let token = login(&srv, &alice, "TOKDEV").await;
    let mut m = sub5("rev-token", "alice", token.clone()).await;
    let (st, v) = srv.with_token(&token).post("logout", json!({})).await;
    assert_eq!(st, 200, "{v}");
    disconnected5(&mut m, m5::DisconnectReasonCode::NotAuthorized, false).await;

    // A password change that logs out the other devices (a password login:
    // the client ID is the device).
    let mut m = sub5("PWDEV", "alice", alice.password.clone()).await;
    let new_password = "a-new-long-password-for-alice";
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
    disconnected5(&mut m, m5::DisconnectReasonCode::NotAuthorized, false).await;
    let mut alice = alice.clone();
    alice.password = new_password.to_owned();

    // `weft user revoke` (it goes through the running server's admin
    // socket): the next event is not delivered; the connection closes.
    let mut c = c4(&srv, "CLIDEV", "alice", &alice.password, true);
    c.connack().await;
    c.client.subscribe(&topic, q1()).await.unwrap();
    c.suback().await;
    let (ok, out, err) = srv.cli("user", "revoke", &["alice", "CLIDEV"]);
    assert!(ok, "{out}{err}");
    // A connection in use re-checks at most 1 s after its last check.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    bob.send(&room, "org.weft.after", "b1", json!({"n": 1})).await;
    closed4(&mut c).await;

    // The same for publishing: not stored, closed without PUBACK.
    let mut c = c4(&srv, "CLIPUB", "alice", &alice.password, true);
    c.connack().await;
    let (ok, out, err) = srv.cli("user", "revoke", &["alice", "CLIPUB"]);
    assert!(ok, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The revocation went through the running server, so the connection
    // may be gone already and the client refuse to queue the publish.
    let _ = c
        .client
        .publish(format!("weft/r/{room}/e/org.weft.revoked"), q1(), false, "{}")
        .await;
    closed4(&mut c).await;

    // Deactivation.
    let mut m = sub5("rev-deact", "bob", bob.access_token.clone()).await;
    let (st, v) = bob
        .post(
            "account/deactivate",
            json!({"auth": {"type": "m.login.password", "user": "bob", "password": bob.password}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // (Leaving the room comes first, and is delivered.)
    disconnected5(&mut m, m5::DisconnectReasonCode::NotAuthorized, true).await;

    let v = srv
        .with_token(&login(&srv, &alice, "CHECK").await)
        .messages(&room, None, "b", 50)
        .await;
    assert!(
        v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["type"] != "org.weft.revoked"),
        "a publish after revocation was stored: {v}"
    );
}

/// A device publishes a binary file to `weft/r/{room}/f/{name}`: it is
/// stored as media and shared as an `m.image` message, which HTTP
/// downloads byte-identical; a non-member's file is refused and nothing
/// is kept.
#[tokio::test]
async fn a_file_published_over_mqtt_becomes_media_and_an_m_file_message() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let mallory = srv.register("mallory").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();

    // A client allowed packets up to the door's own limit (128 KiB).
    let mut o = rumqttc::MqttOptions::new("camera-1", &srv.mqtt_host, srv.mqtt_port);
    o.set_credentials("alice", &alice.password)
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(128 * 1024, 128 * 1024);
    let mut m = spawn(o);
    assert_eq!(m.connack().await.code, rumqttc::ConnectReturnCode::Success);
    m.client
        .publish(format!("weft/r/{room}/f/snap%20001.jpg"), q1(), false, data.clone())
        .await
        .unwrap();
    assert!(matches!(m.packet().await, rumqttc::Packet::PubAck(_)));
    let ev = &alice.last_events(&room, 1).await[0];
    assert_eq!(ev["type"], "m.room.message");
    assert_eq!(ev["sender"], alice.user_id);
    let c = &ev["content"];
    assert_eq!(c["msgtype"], "m.image", "{ev}");
    assert_eq!(c["body"], "snap 001.jpg");
    assert_eq!(c["info"], json!({"mimetype": "image/jpeg", "size": 100_000}));
    let mxc = c["url"].as_str().expect("url").to_owned();
    let id = mxc.strip_prefix("mxc://").expect("mxc");
    let resp = reqwest::Client::new()
        .get(format!(
            "http://{}/_matrix/client/v1/media/download/{id}",
            srv.http_addr()
        ))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "image/jpeg");
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());

    // Not a member: refused, and no media kept for it.
    let mut x = c4(&srv, "intruder", "mallory", &mallory.password, true);
    assert_eq!(x.connack().await.code, rumqttc::ConnectReturnCode::Success);
    x.client
        .publish(format!("weft/r/{room}/f/x.bin"), q1(), false, vec![1u8; 10])
        .await
        .unwrap();
    // MQTT 3.1.1 has no negative PUBACK: the connection is closed.
    loop {
        match x.next().await {
            Ok(rumqttc::Packet::PubAck(_)) => panic!("a non-member's file was acknowledged"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let (st, v) = mallory.get("/_matrix/client/unstable/org.weft.files/uploads").await;
    assert_eq!((st, v["chunk"].as_array().map(Vec::len)), (200, Some(0)), "{v}");
}

// Typing and receipts reach MQTT subscribers of the room's `x/` topics
// (`weft/r/{room}/x/m.typing`, `…/x/m.receipt`), in stream order, as the
// Client-Server events with `room_id`; a private receipt reaches only its
// own user, and a user not in the room cannot subscribe.
#[tokio::test]
async fn typing_and_receipts_reach_ephemeral_topics() {
    let srv = Server::start().await;
    let alice = srv.register("alice").await;
    let bob = srv.register("bob").await;
    let carol = srv.register("carol").await;
    let room = weft_testkit::client::room_with(&alice, &bob, "private_chat").await;
    let event = bob.send_text(&room, "t1", "hello").await;

    let mut b = c4(&srv, "bob-x", "bob", &bob.access_token, true);
    b.connack().await;
    b.client.subscribe(format!("weft/r/{room}/x/#"), q1()).await.unwrap();
    assert_eq!(b.suback().await, vec![rumqttc::SubscribeReasonCode::Success(q1())]);
    let mut all = c4(&srv, "bob-all", "bob", &bob.access_token, true);
    all.connack().await;
    all.client.subscribe("weft/r/+/x/m.typing", q1()).await.unwrap();
    assert_eq!(all.suback().await, vec![rumqttc::SubscribeReasonCode::Success(q1())]);
    let mut c = c4(&srv, "carol-x", "carol", &carol.access_token, true);
    c.connack().await;
    c.client.subscribe(format!("weft/r/{room}/x/#"), q1()).await.unwrap();
    assert_eq!(c.suback().await, vec![rumqttc::SubscribeReasonCode::Failure]);

    let typing = |on: bool| {
        let alice = alice.clone();
        let room = room.clone();
        async move {
            let body = if on {
                json!({"typing": true, "timeout": 30000})
            } else {
                json!({"typing": false})
            };
            let (st, b) = alice
                .put(&format!("rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)), body)
                .await;
            assert_eq!(st, 200, "{b}");
        }
    };
    let receipt = |kind: &'static str| {
        let alice = alice.clone();
        let room = room.clone();
        let event = event.clone();
        async move {
            let (st, b) = alice
                .post(
                    &format!("rooms/{}/receipt/{kind}/{}", enc(&room), enc(&event)),
                    json!({}),
                )
                .await;
            assert_eq!(st, 200, "{b}");
        }
    };
    typing(true).await;
    receipt("m.read.private").await;
    receipt("m.read").await;
    typing(false).await;

    let got = b.publishes(3).await;
    let topics: Vec<String> = got.iter().map(|p| p.topic.clone()).collect();
    assert_eq!(
        topics,
        vec![
            format!("weft/r/{room}/x/m.typing"),
            format!("weft/r/{room}/x/m.receipt"),
            format!("weft/r/{room}/x/m.typing"),
        ]
    );
    let t0 = body(&got[0].payload);
    assert_eq!(t0["type"], "m.typing");
    assert_eq!(t0["room_id"], room);
    assert_eq!(t0["content"]["user_ids"], json!([alice.user_id]));
    let r = body(&got[1].payload);
    assert_eq!(r["type"], "m.receipt");
    assert_eq!(r["room_id"], room);
    let by_user = r["content"][&event]["m.read"].as_object().expect("m.read receipt");
    assert_eq!(by_user.len(), 1, "{r}");
    assert!(by_user[&alice.user_id]["ts"].as_u64().is_some_and(|t| t > 0), "{r}");
    assert!(r["content"][&event].get("m.read.private").is_none(), "{r}");
    assert_eq!(body(&got[2].payload)["content"]["user_ids"], json!([]));
    b.quiet(Duration::from_millis(700)).await;

    let got = all.publishes(2).await;
    assert!(got.iter().all(|p| p.topic == format!("weft/r/{room}/x/m.typing")));
    assert_eq!(body(&got[0].payload)["content"]["user_ids"], json!([alice.user_id]));
    assert_eq!(body(&got[1].payload)["content"]["user_ids"], json!([]));
    all.quiet(Duration::from_millis(300)).await;
}

/// An application service's token as the password authenticates as over
/// HTTP (docs/appservices.md): as its sender, or as the user of its
/// namespace the username names; another user is refused as a wrong
/// password is.
#[tokio::test]
async fn an_appservice_token_connects_as_its_users() {
    const AS_TOKEN: &str = "mqtt-as-token";
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("bridge.yaml");
    std::fs::write(
        &reg,
        format!(
            "id: mqttbridge\nurl: null\nas_token: {AS_TOKEN}\nhs_token: mqtt-hs-token\n\
             sender_localpart: bridgebot\nnamespaces:\n  users:\n    - exclusive: true\n      regex: \"@_bridge_.*\"\n"
        ),
    )
    .unwrap();
    let files = format!("[{:?}]", reg.display().to_string());
    let srv = Server::start_with(&[("WEFT_APPSERVICE__REGISTRATION_FILES", &files)]).await;
    let asc = srv.with_token(AS_TOKEN);
    let (status, body) = asc
        .post(
            "register",
            json!({"type": "m.login.application_service", "username": "_bridge_bob", "inhibit_login": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let bob = format!("@_bridge_bob:{SERVER_NAME}");
    let alice = srv.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let (status, body) = asc
        .post(&format!("join/{}?user_id={}", enc(&room), enc(&bob)), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");

    let mut m = c4(&srv, "bridge-bob", &bob, AS_TOKEN, true);
    assert_eq!(m.connack().await.code, rumqttc::ConnectReturnCode::Success);
    m.client
        .publish(format!("weft/r/{room}/e/org.weft.note"), q1(), false, r#"{"n": 1}"#)
        .await
        .unwrap();
    assert!(matches!(m.packet().await, rumqttc::Packet::PubAck(_)));
    let evs = alice.last_events(&room, 1).await;
    assert_eq!(evs[0]["type"], "org.weft.note");
    assert_eq!(evs[0]["sender"], bob.as_str());
    let mut s = c4(&srv, "bridge-self", "bridgebot", AS_TOKEN, true);
    assert_eq!(s.connack().await.code, rumqttc::ConnectReturnCode::Success);
    let mut w = c4(&srv, "bridge-alice", "alice", AS_TOKEN, true);
    match w.next().await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected refusal, got {other:?}"),
    }
}

// Two processes on one PostgreSQL database: a client ID connected to the
// first (persistent session, one subscription) connects to the second.
// The first connection is closed ([MQTT-3.1.4-2] across processes), and
// the second resumes the session the first saved when it ended: session
// present, the subscription delivering without a new SUBSCRIBE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_processes_moves_the_persistent_session() {
    let Some(servers) = Server::cluster(2).await else {
        return;
    };
    let (a, b) = (&servers[0], &servers[1]);
    let alice = a.register("alice").await;
    let room = room_for(&alice).await;
    let topic = format!("weft/r/{room}/e/m.room.message");

    let mut first = c4(a, "twin", "alice", &alice.access_token, false);
    first.connack().await;
    first.client.subscribe(&topic, q1()).await.unwrap();
    assert!(matches!(first.packet().await, rumqttc::Packet::SubAck(_)));

    let mut second = c4(b, "twin", "alice", &alice.access_token, false);
    let ack = second.connack().await;
    // The first one is closed (its keep-alive pings would go on forever).
    timeout(Duration::from_secs(15), async { while first.next().await.is_ok() {} })
        .await
        .expect("the connection on the other process was not closed");
    assert!(ack.session_present, "the session saved by the first process is resumed");
    // Room writes through one process (the room pipeline's cache is per
    // process): the one that created it.
    alice
        .send(
            &room,
            "m.room.message",
            "t1",
            json!({"msgtype": "m.text", "body": "moved"}),
        )
        .await;
    let p = &second.publishes(1).await[0];
    assert_eq!(p.topic, topic);
    assert_eq!(body(&p.payload)["content"]["body"], "moved");
}

// Two processes on one PostgreSQL database: the process holding a
// client's connection is killed (SIGKILL), so it never releases its claim
// of the client ID. The client reconnecting through the other process is
// not kept waiting for that release (the claim's process has no
// connection to the database left): its CONNACK comes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_killed_process_reconnects_through_another_at_once() {
    let Some(mut servers) = Server::cluster(2).await else {
        return;
    };
    let alice = servers[0].register("alice").await;
    let room = room_for(&alice).await;
    let topic = format!("weft/r/{room}/e/m.room.message");
    let mut first = c4(&servers[0], "phoenix", "alice", &alice.access_token, false);
    first.connack().await;
    first.client.subscribe(&topic, q1()).await.unwrap();
    assert!(matches!(first.packet().await, rumqttc::Packet::SubAck(_)));
    servers[0].kill();
    let started = std::time::Instant::now();
    let mut second = c4(&servers[1], "phoenix", "alice", &alice.access_token, false);
    let ack = second.connack().await;
    let took = started.elapsed();
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    // A wait for the dead process's release would run 5 s.
    assert!(took < Duration::from_secs(2), "CONNACK after {took:?}");
}
