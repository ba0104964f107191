//! The other doors: bytes on the wire (HTTP+JSON vs CoAP+CBOR) and MQTT
//! QoS 1 throughput and latency (weft's MQTT door vs Mosquitto).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as MqttPacket, QoS};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Mutex, Semaphore};

use crate::api::{Api, encode_segment};
use crate::scenarios::EVENT_TYPE;
use crate::stats::{r2, summarize};
use crate::{Bench, now_us};

/// The telemetry reading both doors send.
fn telemetry() -> Value {
    json!({ "sensor": "greenhouse-1", "temperature": "21.5", "humidity": 61 })
}

// ---------------------------------------------------------------- wire --

/// Bytes of one telemetry send over HTTP+JSON and over CoAP+CBOR.
pub async fn wire(bench: &Bench) -> Result<Value> {
    if bench.opts.url.is_some() {
        bail!("wire needs a spawned server (its CoAP address)");
    }
    let target = bench.target_with(1, "w", true).await?;
    let res = wire_run(&target).await;
    target.stop().await;
    res
}

async fn wire_run(target: &crate::Target) -> Result<Value> {
    let token = target.session(0).token.clone();
    let api = Api::new(&target.url, 1)?;
    let room = api
        .create_room(&token, &json!({ "preset": "private_chat", "name": "bench wire" }))
        .await?;
    let body = telemetry().to_string();

    // HTTP/1.1 over a raw TCP socket: exactly these bytes go out, and every
    // byte read until the response is complete comes back.
    let host = target.url.trim_start_matches("http://").trim_end_matches('/');
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/{}/wire1",
        encode_segment(&room),
        encode_segment(EVENT_TYPE)
    );
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, response) = http_exchange(host, request.as_bytes()).await?;
    if !(200..300).contains(&status) {
        bail!("HTTP send: {status} {}", String::from_utf8_lossy(&response));
    }
    let http_req = request.len();
    let http_resp = response.len();
    let http_total = http_req + http_resp;

    // CoAP: the datagrams of a confirmable request and its piggybacked ACK.
    let coap = target.coap.context("server printed no CoAP address")?;
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let payload = {
        let mut out = Vec::new();
        ciborium::into_writer(&telemetry(), &mut out)?;
        out
    };
    let compact_path = format!("_m/c/a/v1/r/{room}/s/{EVENT_TYPE}");
    let compact = coap_packet(
        1,
        RequestType::Post,
        &compact_path,
        Some(format!("a={token}")),
        None,
        &payload,
    )?;
    let (code, compact_resp) = coap_exchange(&sock, coap, &compact).await?;
    if code != "2.01" {
        bail!("CoAP compact send: {code}");
    }
    // MSC3079: path enum 9 (PUT send with txn), token in option 256.
    let short_path = format!("9/{room}/{EVENT_TYPE}/wire2");
    let short = coap_packet(2, RequestType::Put, &short_path, None, Some(&token), &payload)?;
    let (code, short_resp) = coap_exchange(&sock, coap, &short).await?;
    if code != "2.04" {
        bail!("CoAP MSC3079 send: {code}");
    }
    // Same socket again: the door remembers the peer's token (MSC3079).
    let sticky_path = format!("9/{room}/{EVENT_TYPE}/wire3");
    let sticky = coap_packet(3, RequestType::Put, &sticky_path, None, None, &payload)?;
    let (code, sticky_resp) = coap_exchange(&sock, coap, &sticky).await?;
    if code != "2.04" {
        bail!("CoAP MSC3079 send without token: {code}");
    }

    let variant = |name: &str, req: usize, resp: usize| {
        json!({
            "form": name,
            "request_bytes": req,
            "response_bytes": resp,
            "total_bytes": req + resp,
            "http_over_coap": r2(http_total as f64 / (req + resp) as f64),
        })
    };
    Ok(json!({
        "content": telemetry(),
        "event_type": EVENT_TYPE,
        "token_chars": token.len(),
        "room_id_chars": room.len(),
        "note": "application-layer bytes only: TCP payload for HTTP (one request with the usual headers and the whole response), UDP payload for CoAP; IP/TCP/UDP headers, the TCP handshake and ACKs are not counted",
        "http_json": {
            "request": format!("PUT /_matrix/client/v3/rooms/{{room}}/send/{EVENT_TYPE}/{{txn}} with Host, Authorization: Bearer, Content-Type, Content-Length"),
            "request_bytes": http_req,
            "request_body_bytes": body.len(),
            "response_bytes": http_resp,
            "response_status": status,
            "total_bytes": http_total,
        },
        "coap_cbor": [
            variant(&format!("CON POST /_m/c/a/v1/r/{{room}}/s/{EVENT_TYPE}?a=TOKEN"), compact.len(), compact_resp),
            variant(&format!("CON PUT /9/{{room}}/{EVENT_TYPE}/{{txn}}, token in option 256 (MSC3079)"), short.len(), short_resp),
            variant("MSC3079 form, token remembered for the socket (later requests)", sticky.len(), sticky_resp),
        ],
        "cbor_body_bytes": payload.len(),
    }))
}

/// Writes `request` on a new connection to `host` and reads one complete
/// HTTP/1.1 response (Content-Length or chunked). Returns the status and
/// every byte read.
async fn http_exchange(host: &str, request: &[u8]) -> Result<(u16, Vec<u8>)> {
    let fut = async {
        let mut conn = TcpStream::connect(host).await?;
        conn.set_nodelay(true)?;
        conn.write_all(request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed mid-response");
            }
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("bad status line")?;
            let body = &buf[end + 4..];
            let done = if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                body.len() >= len
            } else if head.contains("transfer-encoding: chunked") {
                body.ends_with(b"0\r\n\r\n")
            } else {
                bail!("response without length");
            };
            if done {
                return Ok((status, buf));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("HTTP exchange timed out")?
}

/// A confirmable CoAP request with a 2-byte token.
fn coap_packet(
    mid: u16,
    method: RequestType,
    path: &str,
    query: Option<String>,
    auth_option: Option<&str>,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in path.split('/') {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.add_option(CoapOption::ContentFormat, vec![60]);
    if let Some(q) = query {
        p.add_option(CoapOption::UriQuery, q.into_bytes());
    }
    if let Some(t) = auth_option {
        p.add_option(CoapOption::Unknown(256), t.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    Ok(p.to_bytes()?)
}

/// Sends `datagram` and waits for the piggybacked ACK of the same message
/// ID; returns its code ("2.01", …) and size in bytes.
async fn coap_exchange(sock: &UdpSocket, server: SocketAddr, datagram: &[u8]) -> Result<(String, usize)> {
    let mid = Packet::from_bytes(datagram)?.header.message_id;
    sock.send_to(datagram, server).await?;
    let mut buf = vec![0u8; 65_536];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (n, from) = tokio::time::timeout(left, sock.recv_from(&mut buf))
            .await
            .context("no CoAP answer within 10 s")??;
        if from != server {
            continue;
        }
        let p = Packet::from_bytes(&buf[..n])?;
        if p.header.message_id != mid || p.header.get_type() != MessageType::Acknowledgement {
            continue;
        }
        let code = match p.header.code {
            MessageClass::Response(r) => {
                let n = u8::from(MessageClass::Response(r));
                format!("{}.{:02}", n >> 5, n & 0x1f)
            }
            MessageClass::Empty => bail!("empty ACK (separate response) for a send"),
            other => format!("{other:?}"),
        };
        return Ok((code, n));
    }
}

// ---------------------------------------------------------------- mqtt --

/// Where an MQTT run publishes and subscribes.
struct MqttSetup {
    addr: SocketAddr,
    /// (username, password, topic) per publisher.
    publishers: Vec<(String, String, String)>,
    /// (username, password, filter) of the subscriber.
    subscriber: (String, String, String),
    /// Subscriber messages carry the payload inside a Matrix event.
    matrix_events: bool,
}

/// MQTT QoS 1 publishes/s and publish-to-subscriber latency, on weft's MQTT
/// door and (if installed) Mosquitto.
pub async fn mqtt(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    if bench.opts.url.is_some() {
        bail!("mqtt needs a spawned server (its MQTT address)");
    }
    if o.mqtt_publishers == 0 || o.mqtt_messages == 0 {
        bail!("--mqtt-publishers and --mqtt-messages must be positive");
    }
    let pubs = o.mqtt_publishers.min(256);
    let target = bench.target_with(pubs + 1, "m", true).await?;
    let weft = async {
        let addr = target.mqtt.context("server printed no MQTT address")?;
        let api = Api::new(&target.url, 4)?;
        let sub = target.session(pubs);
        let mut publishers = Vec::new();
        for p in 0..pubs {
            let s = target.session(p);
            let room = api
                .create_room(
                    &s.token,
                    &json!({ "preset": "public_chat", "name": format!("bench mqtt {p}") }),
                )
                .await?;
            api.join(&sub.token, &room).await?;
            publishers.push((
                s.user_id.clone(),
                s.token.clone(),
                format!("weft/r/{room}/e/{EVENT_TYPE}"),
            ));
        }
        let setup = MqttSetup {
            addr,
            publishers,
            subscriber: (sub.user_id.clone(), sub.token.clone(), "weft/r/+/e/#".to_owned()),
            matrix_events: true,
        };
        mqtt_run(bench, &setup).await
    }
    .await;
    target.stop().await;
    let weft = weft?;

    let (mosquitto, mosquitto_lossless) = if o.mosquitto_bin.is_file() {
        let run = |lossless| async move {
            match mosquitto(bench, pubs, lossless).await {
                Ok(v) => v,
                Err(e) => json!({ "error": format!("{e:#}") }),
            }
        };
        (run(false).await, run(true).await)
    } else {
        (json!("not installed"), json!("not installed"))
    };
    Ok(json!({
        "publishers": pubs,
        "inflight_per_publisher": o.mqtt_inflight.clamp(1, 1024),
        "qos": 1,
        "subscribers": 1,
        "payload": "the telemetry reading plus publisher, seq and sent_us (µs since bench start)",
        "durability": "weft stores each QoS 1 publish durably (SQLite, synchronous = full, fsync) as a Matrix event before its PUBACK; Mosquitto acknowledges from memory (persistence off by default)",
        "weft": weft,
        "mosquitto": mosquitto,
        "mosquitto_lossless": mosquitto_lossless,
    }))
}

/// Starts Mosquitto on a free loopback port (config: that listener only,
/// anonymous clients, defaults otherwise) and runs the same load on it.
/// `lossless` lifts its per-client queue limit (`max_queued_messages 0`),
/// so that, like weft, it drops nothing for a subscriber that falls behind.
async fn mosquitto(bench: &Bench, pubs: usize, lossless: bool) -> Result<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = tempfile::Builder::new().prefix("weft-bench-mosquitto-").tempdir()?;
    let conf = dir.path().join("mosquitto.conf");
    let mut config = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
    if lossless {
        config.push_str("max_queued_messages 0\n");
    }
    std::fs::write(&conf, config)?;
    let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
    let mut child = tokio::process::Command::new(&bench.opts.mosquitto_bin)
        .arg("-c")
        .arg(&conf)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bench.opts.mosquitto_bin.display()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() >= deadline {
            let _ = child.kill().await;
            bail!("mosquitto did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let version = std::process::Command::new(&bench.opts.mosquitto_bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned));
    let setup = MqttSetup {
        addr,
        publishers: (0..pubs)
            .map(|p| (String::new(), String::new(), format!("bench/{p}/{EVENT_TYPE}")))
            .collect(),
        subscriber: (String::new(), String::new(), "bench/#".to_owned()),
        matrix_events: false,
    };
    let res = mqtt_run(bench, &setup).await;
    let _ = child.kill().await;
    let mut v = res?;
    v["version"] = json!(version);
    v["persistence"] = json!("off (default)");
    v["max_queued_messages"] = json!(if lossless { "0 (unlimited)" } else { "1000 (default)" });
    Ok(v)
}

fn mqtt_options(id: &str, addr: SocketAddr, user: &str, pass: &str, inflight: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_inflight(inflight);
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    if !user.is_empty() {
        opts.set_credentials(user, pass);
    }
    opts
}

async fn mqtt_run(bench: &Bench, setup: &MqttSetup) -> Result<Value> {
    let o = &bench.opts;
    let inflight = o.mqtt_inflight.clamp(1, 1024);
    let tag = format!("{:x}", now_us());

    // The subscriber, subscribed before anyone publishes.
    let (suser, spass, filter) = &setup.subscriber;
    let (sub, mut sub_loop) = AsyncClient::new(mqtt_options(&format!("sub{tag}"), setup.addr, suser, spass, 64), 64);
    sub.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
    let received = Arc::new(Mutex::new(Vec::<u64>::new()));
    // When the subscriber got its last message (µs since bench start).
    let last_received_us = Arc::new(AtomicU64::new(0));
    let sub_errors = Arc::new(Mutex::new(None::<String>));
    // Errors after our own DISCONNECT (the peer closing) are not failures.
    let stopping = Arc::new(AtomicBool::new(false));
    let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel::<()>();
    let matrix = setup.matrix_events;
    let sub_task = {
        let (received, sub_errors) = (received.clone(), sub_errors.clone());
        let last_received_us = last_received_us.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let mut subacked = Some(subacked_tx);
            loop {
                match sub_loop.poll().await {
                    Ok(Event::Incoming(MqttPacket::SubAck(_))) => {
                        if let Some(tx) = subacked.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(MqttPacket::Publish(p))) => {
                        let at = now_us();
                        let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                            continue;
                        };
                        let content = if matrix { &v["content"] } else { &v };
                        if let Some(sent) = content["sent_us"].as_u64() {
                            received.lock().await.push(at.saturating_sub(sent));
                            last_received_us.store(at, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !stopping.load(Ordering::Relaxed) {
                            *sub_errors.lock().await = Some(format!("{e}"));
                        }
                        return;
                    }
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), subacked_rx)
        .await
        .context("no SUBACK within 10 s")?
        .ok()
        .context("subscriber failed before SUBACK")?;

    // Publishers: each keeps up to `inflight` unacknowledged QoS 1 publishes.
    let remaining = Arc::new(std::sync::atomic::AtomicI64::new(o.mqtt_messages as i64));
    let started = Instant::now();
    let started_us = now_us();
    let deadline = started + Duration::from_secs(o.mqtt_max_secs);
    let mut workers = Vec::new();
    for (p, (user, pass, topic)) in setup.publishers.iter().enumerate() {
        let opts = mqtt_options(&format!("pub{tag}-{p}"), setup.addr, user, pass, inflight as u16 + 4);
        let (client, mut ev) = AsyncClient::new(opts, inflight + 4);
        let sem = Arc::new(Semaphore::new(inflight));
        let acked = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None::<String>));
        let stopping = Arc::new(AtomicBool::new(false));
        let loop_task = {
            let (sem, acked, failure) = (sem.clone(), acked.clone(), failure.clone());
            let stopping = stopping.clone();
            tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(MqttPacket::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                            sem.add_permits(1);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if !stopping.load(Ordering::Relaxed) {
                                *failure.lock().await = Some(format!("{e}"));
                            }
                            sem.close();
                            return;
                        }
                    }
                }
            })
        };
        let (remaining, topic, stopping) = (remaining.clone(), topic.clone(), stopping.clone());
        workers.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline && remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
                let Ok(permit) = tokio::time::timeout_at(deadline.into(), sem.acquire()).await else {
                    break;
                };
                let Ok(permit) = permit else { break };
                permit.forget();
                sent += 1;
                let mut body = telemetry();
                body["publisher"] = json!(p);
                body["seq"] = json!(sent);
                body["sent_us"] = json!(now_us());
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, body.to_string())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // Wait for the outstanding PUBACKs (bounded).
            let until = Instant::now().max(deadline) + Duration::from_secs(10);
            while acked.load(Ordering::Relaxed) < sent && Instant::now() < until && !sem.is_closed() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let done_at = Instant::now();
            stopping.store(true, Ordering::Relaxed);
            let _ = client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            loop_task.abort();
            let failure = failure.lock().await.clone();
            (sent, acked.load(Ordering::Relaxed), done_at, failure)
        }));
    }
    let (mut sent, mut acked, mut first_error) = (0u64, 0u64, None);
    let mut finished = started;
    for w in workers {
        let (s, a, at, f) = w.await?;
        sent += s;
        acked += a;
        finished = finished.max(at);
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = finished.duration_since(started).as_secs_f64();

    // Let the subscriber drain (bounded), then stop it.
    let grace_end = Instant::now() + Duration::from_secs(o.mqtt_grace_secs);
    loop {
        let got = received.lock().await.len() as u64;
        if got >= acked || Instant::now() >= grace_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stopping.store(true, Ordering::Relaxed);
    let _ = sub.disconnect().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    sub_task.abort();
    let lat = std::mem::take(&mut *received.lock().await);
    let got = lat.len() as u64;
    Ok(json!({
        "published": sent,
        "acked": acked,
        "first_error": first_error,
        "timed_out": acked < o.mqtt_messages,
        "elapsed_s": r2(elapsed),
        "acked_publishes_per_s": r2(acked as f64 / elapsed),
        "subscriber_received": got,
        // Messages the subscriber got per second, from the first publish to
        // the last message it received.
        "delivered_per_s": r2(got as f64 / ((last_received_us.load(Ordering::Relaxed).saturating_sub(started_us)).max(1) as f64 / 1e6)),
        "subscriber_missing": acked.saturating_sub(got),
        "subscriber_error": sub_errors.lock().await.clone(),
        "publish_to_subscriber_ms": summarize(lat),
    }))
}
