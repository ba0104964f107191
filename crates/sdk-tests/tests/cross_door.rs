//! Interop across the four doors: one room, a subscriber on every door (MQTT,
//! CoAP `/sync`, the WebSocket sync loop, HTTP long-poll `/sync`) plus a
//! matrix-sdk client, then one `org.weft.telemetry` reading published through
//! each door in turn. Every subscriber must see all four readings, once each,
//! with the same event IDs and contents, in the server's stream order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use futures_util::{SinkExt, StreamExt};
use matrix_sdk::Client;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::RoomId;
use sdk_tests::PASSWORD;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use weft_testkit::{Client as MatrixClient, TestServer, enc, of_type, timeline};

const TYPE: &str = "org.weft.telemetry";
/// Long-poll timeout of the `/sync` readers.
const POLL_MS: u64 = 1000;
/// How long all subscribers together may take to see the four readings.
const WAIT: Duration = Duration::from_secs(8);

/// What one subscriber has seen: the telemetry events of the room, in order
/// of arrival.
type Seen = Arc<Mutex<Vec<Value>>>;

/// The running server (the workspace's [`TestServer`], which it
/// dereferences to) with its MQTT and CoAP addresses.
struct Server {
    tk: TestServer,
    http: String,
    mqtt: SocketAddr,
    coap: SocketAddr,
}

impl std::ops::Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.tk
    }
}

async fn start() -> Server {
    start_logging(&sdk_tests::log_filter()).await
}

/// A server with alice and bob (made with the admin CLI) whose log has
/// this `WEFT_LOG` filter.
async fn start_logging(filter: &str) -> Server {
    let tk = sdk_tests::weft_with_alice_and_bob()
        .env("WEFT_LOG", filter)
        .with_mqtt()
        .with_coap()
        .start()
        .await;
    Server {
        http: tk.base_url(),
        mqtt: tk.addrs().mqtt.expect("mqtt address"),
        coap: tk.addrs().coap.expect("coap address"),
        tk,
    }
}

/// `user` logged in as device `device`, over HTTP.
async fn login(srv: &Server, user: &str, device: &str) -> MatrixClient {
    srv.login_device(user, PASSWORD, device).await
}

/// The room's telemetry events in a `/sync` response.
fn telemetry_in_sync(sync: &Value, room: &str) -> Vec<Value> {
    of_type(&timeline(sync, room), TYPE)
}

fn push(seen: &Seen, evs: impl IntoIterator<Item = Value>) {
    seen.lock().unwrap().extend(evs);
}

// ---- CoAP: a minimal confirmable client over UDP (separate responses, Block2).

struct Coap {
    sock: UdpSocket,
    server: SocketAddr,
    mid: u16,
    token: u32,
}

impl Coap {
    async fn new(server: SocketAddr, first_token: u32) -> Coap {
        Coap {
            sock: UdpSocket::bind("127.0.0.1:0").await.expect("bind udp"),
            server,
            mid: (first_token as u16).wrapping_mul(1000),
            token: first_token,
        }
    }

    fn packet(&mut self, method: RequestType, path: &str, query: &[String], payload: Option<Vec<u8>>) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        self.mid = self.mid.wrapping_add(1);
        p.header.message_id = self.mid;
        self.token += 1;
        p.set_token(self.token.to_be_bytes().to_vec());
        for seg in path.trim_start_matches('/').split('/') {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        if payload.is_some() {
            p.add_option(CoapOption::ContentFormat, vec![60]); // application/cbor
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.payload = payload.unwrap_or_default();
        p
    }

    async fn recv(&self, wait: Duration) -> Option<Packet> {
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(wait, self.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(Packet::from_bytes(&buf[..n]).expect("valid CoAP message")),
            _ => None,
        }
    }

    async fn ack(&self, p: &Packet) {
        if p.header.get_type() == MessageType::Confirmable {
            let mut a = Packet::new();
            a.header.set_type(MessageType::Acknowledgement);
            a.header.code = MessageClass::Empty;
            a.header.message_id = p.header.message_id;
            self.sock.send_to(&a.to_bytes().unwrap(), self.server).await.unwrap();
        }
    }

    /// One confirmable exchange, following a separate response.
    async fn exchange(&self, p: &Packet) -> Packet {
        let bytes = p.to_bytes_unlimited().unwrap();
        let mut resp = None;
        for _ in 0..4 {
            self.sock.send_to(&bytes, self.server).await.unwrap();
            if let Some(r) = self.recv(Duration::from_secs(2)).await {
                resp = Some(r);
                break;
            }
        }
        let mut resp = resp.expect("no response from the CoAP door");
        if resp.header.code == MessageClass::Empty {
            resp = self.recv(Duration::from_secs(10)).await.expect("separate response");
            self.ack(&resp).await;
        }
        assert_eq!(resp.get_token(), p.get_token(), "response token matches request");
        resp
    }

    /// Request → (code, whole body as JSON), fetching further Block2 blocks.
    async fn call(
        &mut self,
        method: RequestType,
        path: &str,
        query: &[String],
        body: Option<&Value>,
    ) -> (ResponseType, Value) {
        let payload = body.map(|b| {
            let mut out = Vec::new();
            ciborium::into_writer(b, &mut out).unwrap();
            out
        });
        let p = self.packet(method, path, query, payload);
        let resp = self.exchange(&p).await;
        let MessageClass::Response(code) = resp.header.code else {
            panic!("not a response: {:?}", resp.header.code);
        };
        let mut bytes = resp.payload.clone();
        let mut block = resp.get_first_option(CoapOption::Block2).cloned();
        while let Some(b) = block {
            let v = b.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x));
            if v & 0x8 == 0 {
                break;
            }
            let val = (((v >> 4) + 1) << 4) | (v & 7);
            let mut next = self.packet(method, path, query, None);
            let vb = val.to_be_bytes();
            let skip = vb.iter().take_while(|x| **x == 0).count();
            next.add_option(CoapOption::Block2, vb[skip..].to_vec());
            let nr = self.exchange(&next).await;
            bytes.extend_from_slice(&nr.payload);
            block = nr.get_first_option(CoapOption::Block2).cloned();
        }
        let v: Value = ciborium::from_reader(&bytes[..]).unwrap_or_else(|e| panic!("not CBOR ({e}): {bytes:?}"));
        (code, v)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reading_published_through_each_door_reaches_every_other_door_and_matrix_sdk() {
    let started = Instant::now();
    let srv = start().await;

    // ---- One room, alice and bob joined.
    let alice = login(&srv, "alice", "ALICE_HTTP").await;
    let bob = login(&srv, "bob", "BOB_HTTP").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "name": "cross-door", "invite": [bob.user_id]}))
        .await;
    bob.join(&room).await;

    let mut tasks = Vec::new();

    // ---- Subscriber 1: MQTT (alice), QoS 1 on every event of the room.
    let mqtt_seen = Seen::default();
    {
        let mut o = rumqttc::MqttOptions::new("mqtt-sub", srv.mqtt.ip().to_string(), srv.mqtt.port());
        o.set_credentials("alice", PASSWORD)
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let (subacked_tx, mut subacked) = mpsc::unbounded_channel();
        let seen = mqtt_seen.clone();
        // The event loop ends once every client handle is gone: keep one in the task.
        let keep = client.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = keep;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) => {
                        let _ = subacked_tx.send(a);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let ev: Value = serde_json::from_slice(&p.payload).expect("MQTT payload is JSON");
                        assert_eq!(
                            p.topic,
                            format!(
                                "weft/r/{}/e/{}",
                                ev["room_id"].as_str().unwrap(),
                                ev["type"].as_str().unwrap()
                            )
                        );
                        if ev["type"] == TYPE {
                            push(&seen, [ev]);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("MQTT subscriber: {e:?}"),
                }
            }
        }));
        client
            .subscribe(format!("weft/r/{room}/e/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), subacked.recv())
            .await
            .expect("SUBACK in time")
            .expect("SUBACK");
        assert_eq!(
            ack.return_codes,
            vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]
        );
    }

    // ---- Subscriber 2: CoAP GET /sync long-poll loop (bob).
    let coap_seen = Seen::default();
    {
        let mut c = Coap::new(srv.coap, 1).await;
        let auth = format!("a={}", bob.access_token);
        // Room for several readings per poll: one poll may come after two
        // sends on a loaded machine, and a limit of 1 would leave one out.
        let filter = r#"filter={"room":{"timeline":{"limit":20}}}"#.to_owned();
        let (code, first) = c
            .call(
                RequestType::Get,
                "/_matrix/client/v3/sync",
                &[auth.clone(), filter.clone()],
                None,
            )
            .await;
        assert_eq!(code, ResponseType::Content, "CoAP initial sync: {first}");
        let mut since = first["next_batch"].as_str().expect("next_batch").to_owned();
        let seen = coap_seen.clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let q = [
                    auth.clone(),
                    format!("since={since}"),
                    format!("timeout={POLL_MS}"),
                    filter.clone(),
                ];
                let (code, v) = c.call(RequestType::Get, "/_matrix/client/v3/sync", &q, None).await;
                assert_eq!(code, ResponseType::Content, "CoAP sync: {v}");
                push(&seen, telemetry_in_sync(&v, &room));
                since = v["next_batch"].as_str().expect("next_batch").to_owned();
            }
        }));
    }

    // ---- Subscriber 3 (and the WebSocket publisher): a socket with a sync loop (bob).
    let ws_seen = Seen::default();
    let (ws_responses_tx, mut ws_responses) = mpsc::unbounded_channel::<Value>();
    let mut ws_sink = {
        let url = format!(
            "{}/_matrix/client/unstable/org.weft.ws?access_token={}",
            srv.http.replacen("http://", "ws://", 1),
            enc(&bob.access_token)
        );
        let (ws, resp) = tokio_tungstenite::connect_async(url).await.expect("ws connect");
        assert_eq!(resp.status().as_u16(), 101);
        let (mut sink, mut stream) = ws.split();
        let (first_tx, mut first) = mpsc::unbounded_channel::<()>();
        let seen = ws_seen.clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let msg = msg.expect("ws error");
                let Message::Text(t) = msg else { continue };
                let frame: Value = serde_json::from_str(t.as_str()).expect("frame is JSON");
                if frame["type"] == "sync" {
                    assert!(frame.get("status").is_none(), "sync loop failed: {frame}");
                    push(&seen, telemetry_in_sync(&frame["body"], &room));
                    let _ = first_tx.send(());
                } else {
                    let _ = ws_responses_tx.send(frame);
                }
            }
        }));
        sink.send(Message::Text(
            json!({"type": "sync", "filter": {"room": {"timeline": {"limit": 20}}}})
                .to_string()
                .into(),
        ))
        .await
        .expect("ws send");
        tokio::time::timeout(Duration::from_secs(5), first.recv())
            .await
            .expect("first ws sync frame in time")
            .expect("ws sync frame");
        sink
    };

    // ---- Subscriber 4: HTTP long-poll /sync (alice).
    let http_seen = Seen::default();
    {
        let (st, first) = alice
            .get(&format!("sync?filter={}", enc(r#"{"room":{"timeline":{"limit":1}}}"#)))
            .await;
        assert_eq!(st, 200, "initial sync: {first}");
        let mut since = first["next_batch"].as_str().expect("next_batch").to_owned();
        let seen = http_seen.clone();
        let room = room.clone();
        let alice = alice.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let (st, v) = alice
                    .get(&format!("sync?since={}&timeout={POLL_MS}", enc(&since)))
                    .await;
                assert_eq!(st, 200, "{v}");
                push(&seen, telemetry_in_sync(&v, &room));
                since = v["next_batch"].as_str().expect("next_batch").to_owned();
            }
        }));
    }

    // ---- Subscriber 5: matrix-sdk (bob, its own device), syncing.
    let sdk_seen = Seen::default();
    {
        let client = Client::builder()
            .homeserver_url(&srv.http)
            .build()
            .await
            .expect("matrix-sdk client");
        client
            .matrix_auth()
            .login_username("bob", PASSWORD)
            .initial_device_display_name("cross-door sdk")
            .send()
            .await
            .expect("sdk login");
        client
            .sync_once(SyncSettings::default())
            .await
            .expect("sdk initial sync");
        let room_id = RoomId::parse(&room).expect("room id");
        let seen = sdk_seen.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let resp = client
                    .sync_once(SyncSettings::default().timeout(Duration::from_millis(POLL_MS)))
                    .await
                    .expect("sdk sync");
                if let Some(update) = resp.rooms.joined.get(&room_id) {
                    push(
                        &seen,
                        update
                            .timeline
                            .events
                            .iter()
                            .map(|ev| serde_json::from_str::<Value>(ev.raw().json().get()).expect("event is JSON"))
                            .filter(|ev| ev["type"] == TYPE),
                    );
                }
            }
        }));
    }

    // ---- Publish one reading through each door in turn, each acknowledged
    // (stored) before the next.
    let readings: Vec<Value> = ["http", "mqtt", "coap", "websocket"]
        .iter()
        .enumerate()
        .map(|(i, door)| json!({"door": door, "seq": i + 1, "value": format!("2{i}.5")}))
        .collect();
    let mut sent_ids: Vec<Option<String>> = Vec::new();

    // 1. HTTP PUT (alice).
    let (st, v) = alice
        .put(
            &format!("rooms/{}/send/{TYPE}/xd-http-1", enc(&room)),
            readings[0].clone(),
        )
        .await;
    assert_eq!(st, 200, "HTTP send: {v}");
    sent_ids.push(Some(v["event_id"].as_str().expect("event_id").to_owned()));

    // 2. MQTT QoS 1 PUBLISH (bob): PUBACK once stored (no event ID in it).
    {
        let mut o = rumqttc::MqttOptions::new("mqtt-pub", srv.mqtt.ip().to_string(), srv.mqtt.port());
        o.set_credentials("bob", PASSWORD)
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
        client
            .publish(
                format!("weft/r/{room}/e/{TYPE}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                readings[1].to_string(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match el.poll().await.expect("MQTT publisher") {
                    rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => break,
                    rumqttc::Event::Incoming(p @ rumqttc::Packet::Disconnect) => panic!("publish refused: {p:?}"),
                    _ => {}
                }
            }
        })
        .await
        .expect("PUBACK in time");
        client.disconnect().await.unwrap();
        sent_ids.push(None);
    }

    // 3. CoAP PUT with a CBOR body (alice).
    {
        let mut c = Coap::new(srv.coap, 5000).await;
        let (code, v) = c
            .call(
                RequestType::Put,
                &format!("/_matrix/client/v3/rooms/{room}/send/{TYPE}/xd-coap-1"),
                &[format!("a={}", alice.access_token)],
                Some(&readings[2]),
            )
            .await;
        assert_eq!(code, ResponseType::Changed, "CoAP send: {v}");
        sent_ids.push(Some(v["event_id"].as_str().expect("event_id").to_owned()));
    }

    // 4. WebSocket request frame (bob), on the socket that also runs the sync loop.
    {
        let frame = json!({
            "id": "xd-ws-1",
            "method": "PUT",
            "path": format!("/_matrix/client/v3/rooms/{}/send/{TYPE}/xd-ws-1", enc(&room)),
            "body": readings[3],
        });
        ws_sink
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("ws send");
        let r = tokio::time::timeout(Duration::from_secs(5), ws_responses.recv())
            .await
            .expect("ws response in time")
            .expect("ws response");
        assert_eq!(r["id"], "xd-ws-1", "{r}");
        assert_eq!(r["status"], 200, "WebSocket send: {r}");
        sent_ids.push(Some(r["body"]["event_id"].as_str().expect("event_id").to_owned()));
    }

    // ---- The server's stream order, from /messages.
    let (st, v) = alice
        .get(&format!("rooms/{}/messages?dir=f&limit=100", enc(&room)))
        .await;
    assert_eq!(st, 200, "/messages: {v}");
    let stored: Vec<Value> = v["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|e| e["type"] == TYPE)
        .cloned()
        .collect();
    assert_eq!(stored.len(), 4, "four readings stored: {stored:#?}");
    let ids: Vec<String> = stored
        .iter()
        .map(|e| e["event_id"].as_str().expect("event_id").to_owned())
        .collect();
    for (i, (ev, reading)) in stored.iter().zip(&readings).enumerate() {
        assert_eq!(
            &ev["content"], reading,
            "reading {i} stored in publish order with its content"
        );
        if let Some(id) = &sent_ids[i] {
            assert_eq!(&ids[i], id, "event ID acknowledged to the publisher of reading {i}");
        }
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 4, "four distinct event IDs");

    // ---- Every subscriber sees the four, once each, same IDs and content, same order.
    let subscribers = [
        ("mqtt", &mqtt_seen),
        ("coap", &coap_seen),
        ("websocket", &ws_seen),
        ("http", &http_seen),
        ("matrix-sdk", &sdk_seen),
    ];
    let deadline = Instant::now() + WAIT;
    while subscribers.iter().any(|(_, s)| s.lock().unwrap().len() < 4) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Room for a duplicate to show up.
    tokio::time::sleep(Duration::from_millis(POLL_MS + 300)).await;
    for task in &tasks {
        assert!(!task.is_finished(), "a subscriber task ended early");
    }
    for task in &tasks {
        task.abort();
    }
    for (door, seen) in subscribers {
        let seen = seen.lock().unwrap().clone();
        let got: Vec<&str> = seen.iter().map(|e| e["event_id"].as_str().unwrap_or("?")).collect();
        assert_eq!(got, ids, "{door}: the four readings, once each, in stream order");
        for (ev, want) in seen.iter().zip(&stored) {
            assert_eq!(
                ev["content"], want["content"],
                "{door}: content of {}",
                want["event_id"]
            );
            assert_eq!(ev["type"], TYPE, "{door}");
            assert_eq!(ev["sender"], want["sender"], "{door}: sender of {}", want["event_id"]);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

// ---- One endpoint layer: the same request through HTTP, CoAP and the
// WebSocket door gets the same answer, for endpoints the CoAP door had no
// route of its own for (end-to-end-encryption keys, to-device messages).

/// A WebSocket door connection used for request frames only.
struct WsRequests {
    sink: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        Message,
    >,
    stream: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    >,
    next_id: u64,
}

impl WsRequests {
    async fn connect(srv: &Server, token: &str) -> WsRequests {
        let url = format!(
            "{}/_matrix/client/unstable/org.weft.ws?access_token={token}",
            srv.http.replacen("http://", "ws://", 1)
        );
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws connect");
        let (sink, stream) = ws.split();
        WsRequests {
            sink,
            stream,
            next_id: 0,
        }
    }

    /// One request frame → (status, body).
    async fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.next_id += 1;
        let mut frame = json!({ "id": self.next_id, "method": method, "path": path });
        if let Some(b) = body {
            frame["body"] = b.clone();
        }
        self.sink.send(Message::text(frame.to_string())).await.expect("ws send");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("ws answer in time")
                .expect("ws open")
                .expect("ws frame");
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t).expect("ws frame is JSON");
            if v["id"] == json!(self.next_id) {
                return (v["status"].as_u64().expect("status") as u16, v["body"].clone());
            }
        }
    }
}

/// The HTTP status a CoAP response code stands for.
fn http_status_of(code: ResponseType) -> u16 {
    match code {
        ResponseType::Content | ResponseType::Changed | ResponseType::Created => 200,
        ResponseType::BadRequest => 400,
        ResponseType::Unauthorized => 401,
        ResponseType::Forbidden => 403,
        ResponseType::NotFound => 404,
        ResponseType::MethodNotAllowed => 405,
        ResponseType::RequestEntityTooLarge => 413,
        ResponseType::TooManyRequests => 429,
        other => panic!("unexpected CoAP code {other:?}"),
    }
}

/// A device's keys as a client uploads them (not really signed: the server
/// never checks device signatures, it hands keys on as uploaded).
fn device_keys(user: &str, device: &str) -> Value {
    json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): format!("curve-{device}"),
            format!("ed25519:{device}"): format!("ed-{device}"),
        },
        "signatures": { user: { format!("ed25519:{device}"): format!("sig-{device}") } },
    })
}

fn one_time_keys(device: &str, n: usize) -> Value {
    let mut keys = serde_json::Map::new();
    for i in 0..n {
        keys.insert(
            format!("signed_curve25519:{device}{i}"),
            json!({ "key": format!("otk-{device}-{i}"), "signatures": {} }),
        );
    }
    Value::Object(keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2ee_endpoints_answer_the_same_through_http_coap_and_websocket() {
    let srv = start().await;
    // Alice has one device per door; bob one, on HTTP.
    let alice_http = login(&srv, "alice", "AHTTP").await;
    let alice_coap = login(&srv, "alice", "ACOAP").await;
    let alice_ws = login(&srv, "alice", "AWS").await;
    let bob = login(&srv, "bob", "BHTTP").await;
    let (_, who) = alice_http.get("account/whoami").await;
    let alice_id = who["user_id"].as_str().expect("user_id").to_owned();
    let (_, who) = bob.get("account/whoami").await;
    let bob_id = who["user_id"].as_str().expect("user_id").to_owned();
    let mut coap = Coap::new(srv.coap, 7000).await;
    let coap_auth = vec![format!("a={}", alice_coap.access_token)];
    let mut ws = WsRequests::connect(&srv, &alice_ws.access_token).await;

    // keys/upload: each device through its own door, the same answer.
    let upload = |device: &str| json!({ "device_keys": device_keys(&alice_id, device), "one_time_keys": one_time_keys(device, 3) });
    let (st, via_http) = alice_http.post("keys/upload", upload("AHTTP")).await;
    assert_eq!(st, 200, "{via_http}");
    let (code, via_coap) = coap
        .call(
            RequestType::Post,
            "/_matrix/client/v3/keys/upload",
            &coap_auth,
            Some(&upload("ACOAP")),
        )
        .await;
    assert_eq!(http_status_of(code), 200, "{via_coap}");
    let (st, via_ws) = ws
        .call("POST", "/_matrix/client/v3/keys/upload", Some(&upload("AWS")))
        .await;
    assert_eq!(st, 200, "{via_ws}");
    assert_eq!(via_http, json!({ "one_time_key_counts": { "signed_curve25519": 3 } }));
    assert_eq!(via_coap, via_http);
    assert_eq!(via_ws, via_http);

    // keys/query: all three devices, the same answer through every door.
    let query = json!({ "device_keys": { alice_id.clone(): [] } });
    let (st, via_http) = bob.post("keys/query", query.clone()).await;
    assert_eq!(st, 200, "{via_http}");
    let devices = via_http["device_keys"][&alice_id].as_object().expect("alice's devices");
    assert_eq!(devices.len(), 3, "{via_http}");
    for d in ["AHTTP", "ACOAP", "AWS"] {
        assert_eq!(
            devices[d]["keys"][format!("curve25519:{d}")],
            json!(format!("curve-{d}"))
        );
    }
    let (code, via_coap) = coap
        .call(
            RequestType::Post,
            "/_matrix/client/v3/keys/query",
            &coap_auth,
            Some(&query),
        )
        .await;
    assert_eq!(http_status_of(code), 200, "{via_coap}");
    let (st, via_ws) = ws.call("POST", "/_matrix/client/v3/keys/query", Some(&query)).await;
    assert_eq!(st, 200);
    assert_eq!(via_coap["device_keys"], via_http["device_keys"]);
    assert_eq!(via_ws["device_keys"], via_http["device_keys"]);

    // keys/claim: one key of each device, claimed through each door; each
    // answer has exactly the claimed device's next key, then the counts drop.
    let claim = |device: &str| json!({ "one_time_keys": { alice_id.clone(): { device: "signed_curve25519" } } });
    let (st, via_http) = bob.post("keys/claim", claim("AHTTP")).await;
    assert_eq!(st, 200, "{via_http}");
    let (code, via_coap) = coap
        .call(
            RequestType::Post,
            "/_matrix/client/v3/keys/claim",
            &coap_auth,
            Some(&claim("ACOAP")),
        )
        .await;
    assert_eq!(http_status_of(code), 200, "{via_coap}");
    let (st, via_ws) = ws
        .call("POST", "/_matrix/client/v3/keys/claim", Some(&claim("AWS")))
        .await;
    assert_eq!(st, 200, "{via_ws}");
    for (device, answer) in [("AHTTP", &via_http), ("ACOAP", &via_coap), ("AWS", &via_ws)] {
        let keys = answer["one_time_keys"][&alice_id][device]
            .as_object()
            .unwrap_or_else(|| panic!("{answer}"));
        assert_eq!(keys.len(), 1, "{answer}");
        let (id, key) = keys.iter().next().expect("one key");
        assert!(id.starts_with(&format!("signed_curve25519:{device}")), "{id}");
        assert!(
            key["key"].as_str().expect("key").starts_with(&format!("otk-{device}-")),
            "{key}"
        );
        assert_eq!(
            answer["one_time_keys"][&alice_id].as_object().map(|o| o.len()),
            Some(1),
            "{answer}"
        );
    }

    // sendToDevice: through each door to bob's device; each answers {} and
    // bob's device receives each message once, with sender and content.
    let msg = |n: u64| json!({ "messages": { bob_id.clone(): { "BHTTP": { "door": n } } } });
    let (st, via_http) = alice_http.put("sendToDevice/org.weft.test/t1", msg(1)).await;
    assert_eq!((st, &via_http), (200, &json!({})));
    let (code, via_coap) = coap
        .call(
            RequestType::Put,
            "/_matrix/client/v3/sendToDevice/org.weft.test/t2",
            &coap_auth,
            Some(&msg(2)),
        )
        .await;
    assert_eq!((http_status_of(code), &via_coap), (200, &json!({})));
    // The same transaction again is not delivered twice.
    let (code, again) = coap
        .call(
            RequestType::Put,
            "/_matrix/client/v3/sendToDevice/org.weft.test/t2",
            &coap_auth,
            Some(&msg(2)),
        )
        .await;
    assert_eq!((http_status_of(code), &again), (200, &json!({})));
    let (st, via_ws) = ws
        .call("PUT", "/_matrix/client/v3/sendToDevice/org.weft.test/t3", Some(&msg(3)))
        .await;
    assert_eq!((st, &via_ws), (200, &json!({})));
    let (st, sync) = bob.get("sync?timeout=0").await;
    assert_eq!(st, 200, "{sync}");
    let got: Vec<(Value, Value, Value)> = sync["to_device"]["events"]
        .as_array()
        .expect("to_device events")
        .iter()
        .filter(|e| e["type"] == "org.weft.test")
        .map(|e| (e["sender"].clone(), e["content"]["door"].clone(), e["type"].clone()))
        .collect();
    let want: Vec<(Value, Value, Value)> = (1..=3)
        .map(|n| (json!(alice_id), json!(n), json!("org.weft.test")))
        .collect();
    assert_eq!(got, want, "{sync}");

    // Errors are the same Matrix errors through every door.
    let bad = json!({ "one_time_keys": "not an object" });
    let (st, via_http) = bob.post("keys/claim", bad.clone()).await;
    let (code, via_coap) = coap
        .call(
            RequestType::Post,
            "/_matrix/client/v3/keys/claim",
            &coap_auth,
            Some(&bad),
        )
        .await;
    let (ws_st, via_ws) = ws.call("POST", "/_matrix/client/v3/keys/claim", Some(&bad)).await;
    assert_eq!(st, 400, "{via_http}");
    assert_eq!(via_http["errcode"], "M_BAD_JSON", "{via_http}");
    assert_eq!(
        (http_status_of(code), &via_coap["errcode"]),
        (400, &via_http["errcode"])
    );
    assert_eq!((ws_st, &via_ws["errcode"]), (400, &via_http["errcode"]));
    let (code, unknown) = coap
        .call(
            RequestType::Get,
            "/_matrix/client/v3/no/such/endpoint",
            &coap_auth,
            None,
        )
        .await;
    assert_eq!(
        (http_status_of(code), &unknown["errcode"]),
        (404, &json!("M_UNRECOGNIZED"))
    );
}

/// Access tokens never reach the log, at any level: not in the query of an
/// HTTP request, of a WebSocket upgrade, or of a CoAP request (`?a=`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_tokens_never_appear_in_the_log_even_at_trace_level() {
    let srv = start_logging("trace").await;
    let token = login(&srv, "alice", "LOGS").await.access_token;
    // HTTP, token in the query (deprecated, still served) and in the header.
    let (st, v) = srv.anon().get(&format!("account/whoami?access_token={token}")).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = srv.with_token(&token).get("joined_rooms").await;
    assert_eq!(st, 200);
    // A wrong token in the query is not logged either.
    let (st, _) = srv.anon().get("account/whoami?access_token=WRONGSECRETTOKEN").await;
    assert_eq!(st, 401);
    // The WebSocket door, token in the upgrade's query.
    let mut ws = WsRequests::connect(&srv, &token).await;
    let (st, v) = ws.call("GET", "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(st, 200, "{v}");
    // CoAP, the talk's `?a=TOKEN`.
    let mut coap = Coap::new(srv.coap, 9000).await;
    let (code, v) = coap
        .call(
            RequestType::Get,
            "/_matrix/client/v3/account/whoami",
            &[format!("a={token}")],
            None,
        )
        .await;
    assert_eq!(code, ResponseType::Content, "{v}");
    // Give the writer a moment to flush the last lines.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = srv.log_tail(1_000_000);
    assert!(
        log.contains("whoami"),
        "the trace log records requests:\n{}",
        &log[..log.len().min(2000)]
    );
    for secret in [token.as_str(), "WRONGSECRETTOKEN"] {
        let at = log.find(secret);
        assert!(
            at.is_none(),
            "a token is in the log: ...{}...",
            &log[at.unwrap_or(0).saturating_sub(300)..(at.unwrap_or(0) + 100).min(log.len())]
        );
    }
}
