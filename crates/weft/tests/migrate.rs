//! `weft migrate-from-sqlite` in a mixed run: a real server on SQLite
//! (users, HTTP devices, an MQTT device logging in with its token, a room
//! with history), stopped, migrated, and started again on PostgreSQL with
//! the same data directory (same signing key). The same tokens work, a
//! /sync from a token of the SQLite run returns exactly what came after it,
//! history and search are intact, old event IDs resolve, new sends work.
//! Also the refusals: a running server, a target that is not empty.
//! Skipped (with a note) when PostgreSQL is unreachable and `CI` is unset.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_store::pg_testing::PgTestDb;

/// An MQTT 3.1.1 remaining length.
fn remaining(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn mqtt_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Connects with MQTT 3.1.1 (clean session) and answers the CONNACK
/// return code, with the stream when accepted.
async fn mqtt_connect(addr: std::net::SocketAddr, client_id: &str, user: &str, pass: &str) -> (u8, TcpStream) {
    let mut body = Vec::new();
    mqtt_str("MQTT", &mut body);
    body.push(4); // protocol level 3.1.1
    body.push(0b1100_0010); // username, password, clean session
    body.extend_from_slice(&30u16.to_be_bytes());
    mqtt_str(client_id, &mut body);
    mqtt_str(user, &mut body);
    mqtt_str(pass, &mut body);
    let mut packet = vec![0x10];
    remaining(body.len(), &mut packet);
    packet.extend(body);
    let mut s = TcpStream::connect(addr).await.expect("mqtt connect");
    s.write_all(&packet).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(ack[0], 0x20, "CONNACK expected: {ack:?}");
    (ack[3], s)
}

/// PUBLISH at QoS 1 and wait for its PUBACK.
async fn mqtt_publish(s: &mut TcpStream, topic: &str, payload: &[u8]) {
    let mut body = Vec::new();
    mqtt_str(topic, &mut body);
    body.extend_from_slice(&7u16.to_be_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x32];
    remaining(body.len(), &mut packet);
    packet.extend(body);
    s.write_all(&packet).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .expect("PUBACK in time")
        .expect("PUBACK");
    assert_eq!(ack, [0x40, 2, 0, 7], "PUBACK of packet 7");
}

fn texts(events: &[Value]) -> Vec<String> {
    of_type(events, "m.room.message")
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn search(c: &Client, term: &str) -> Vec<String> {
    let (status, resp) = c
        .post(
            "search",
            json!({"search_categories": {"room_events": {"search_term": term, "order_by": "recent"}}}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    resp["search_categories"]["room_events"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| r["result"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_deployment_moves_to_postgres_with_its_tokens_and_history() {
    let Some(db) = PgTestDb::create() else { return };
    let mut server = TestServer::builder()
        .with_mqtt()
        // SQLite even when the suite runs with WEFT_TEST_BACKEND=postgres.
        .env("WEFT_DATABASE__BACKEND", "sqlite")
        .start()
        .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let sensor = server
        .login_device("alice", &TestServer::default_password("alice"), "SENSOR1")
        .await;
    let room = room_with(&alice, &bob, "public_chat").await;
    let m1 = alice.send_text(&room, "t1", "Grüße from the café").await;
    let m2 = alice.send_text(&room, "t2", "second message").await;
    // The MQTT device logs in with its access token and sends.
    let mqtt = server.addrs().mqtt.expect("mqtt listener");
    let (code, mut dev) = mqtt_connect(mqtt, "SENSOR1", "alice", &sensor.access_token).await;
    assert_eq!(code, 0, "token login accepted on SQLite");
    mqtt_publish(
        &mut dev,
        &format!("weft/r/{room}/e/m.room.message"),
        br#"{"msgtype":"m.text","body":"reading 21.5 C"}"#,
    )
    .await;
    drop(dev);
    // Bob's sync token from the SQLite run: it has seen everything so far.
    // (PUBACK came after the event was stored.)
    let seen = bob.sync_full(None, 0).await;
    assert_eq!(
        texts(&timeline(&seen, &room)),
        ["Grüße from the café", "second message", "reading 21.5 C"]
    );
    let since = seen["next_batch"].as_str().unwrap().to_owned();
    // One more after bob's token, still on SQLite.
    let m3 = alice.send_text(&room, "t3", "third, after bob's sync").await;
    let history_before = event_ids(&alice.all_messages(&room).await);
    assert!(history_before.last() == Some(&m3));
    let found_before = search(&alice, "cafe").await;
    assert_eq!(
        found_before,
        std::slice::from_ref(&m1),
        "search finds the folded word on SQLite"
    );

    // Refused while the server runs: its database is in use. Nothing
    // reaches PostgreSQL.
    let (ok, out, err) = server.cli_args(&["migrate-from-sqlite", "--to", &db.url]);
    assert!(!ok, "migrating under a running server must fail: {out}{err}");
    assert!(err.contains("running"), "{err}");
    let regclass = {
        let url = db.url.clone();
        move || {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                let meta: Option<String> = c.query_one("SELECT to_regclass('meta')::text", &[]).unwrap().get(0);
                let events: Option<i64> = if meta.is_some() {
                    c.query_one("SELECT COUNT(*) FROM events", &[]).unwrap().get(0)
                } else {
                    None
                };
                (meta, events)
            })
            .join()
            .unwrap()
        }
    };
    assert_eq!(regclass(), (None, None), "nothing written while the server ran");

    // Stop, migrate.
    server.terminate(Duration::from_secs(20)).await.expect("clean stop");
    let (ok, out, err) = server.cli_args(&["migrate-from-sqlite", "--to", &db.url]);
    assert!(ok, "migrate-from-sqlite: {out}{err}");
    assert!(out.contains("  events: "), "progress per table: {out}");
    assert!(out.contains("continues at position"), "{out}");
    let (_, events) = regclass();
    assert!(events.unwrap_or(0) >= 8, "events copied: {events:?}");

    // Again (the target named by database.url this time, without --to):
    // the target holds data now. Refused, nothing changes.
    server.set_env("WEFT_DATABASE__URL", &db.url);
    let (ok, out, err) = server.cli_args(&["migrate-from-sqlite"]);
    assert!(!ok, "a second migration into a full database must fail: {out}{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(regclass().1, events);

    // Serve on PostgreSQL from the same data directory (same signing key).
    server.set_env("WEFT_DATABASE__BACKEND", "postgres");
    server.restart().await;
    assert!(
        server.log_tail(400).contains("weft listening on"),
        "{}",
        server.log_tail(50)
    );

    // The same access tokens still work, each as its own device.
    for (c, device) in [
        (&alice, alice.device_id.as_str()),
        (&bob, bob.device_id.as_str()),
        (&sensor, "SENSOR1"),
    ] {
        let (status, who) = c.whoami().await;
        assert_eq!(status, 200, "{who}");
        assert_eq!(who["user_id"], c.user_id);
        assert_eq!(who["device_id"], device);
    }
    assert_err(&server.with_token("not-a-token").whoami().await, 401, "M_UNKNOWN_TOKEN");

    // A new send on PostgreSQL.
    let m4 = alice.send_text(&room, "t4", "fourth, on PostgreSQL").await;
    // The same transaction ID as before the move is still known.
    assert_eq!(alice.send_text(&room, "t1", "Grüße from the café").await, m1);
    // Bob's old token: exactly what came after it, in order, no duplicates.
    let after = bob.sync_full(Some(&since), 0).await;
    let tl = timeline(&after, &room);
    assert_eq!(
        texts(&tl),
        ["third, after bob's sync", "fourth, on PostgreSQL"],
        "{after}"
    );
    assert_eq!(event_ids(&of_type(&tl, "m.room.message")), [m3.clone(), m4.clone()]);

    // History intact, in order, the new event after it.
    let history_after = event_ids(&alice.all_messages(&room).await);
    assert_eq!(history_after[..history_before.len()], history_before[..]);
    assert_eq!(history_after[history_before.len()..], *std::slice::from_ref(&m4));
    // Old event IDs resolve, with their content.
    for (id, body) in [(&m1, "Grüße from the café"), (&m2, "second message")] {
        let (status, ev) = bob.get(&format!("rooms/{}/event/{}", enc(&room), enc(id))).await;
        assert_eq!(status, 200, "{ev}");
        assert_eq!(ev["content"]["body"], body);
        assert_eq!(ev["sender"], alice.user_id);
    }
    // Search finds what it found on SQLite, and the new message.
    assert_eq!(search(&alice, "cafe").await, found_before);
    assert_eq!(search(&alice, "postgresql").await, std::slice::from_ref(&m4));

    // The MQTT device's token works on PostgreSQL too, and its send
    // arrives after everything else.
    let since2 = after["next_batch"].as_str().unwrap().to_owned();
    let mqtt = server.addrs().mqtt.expect("mqtt listener");
    let (code, _) = mqtt_connect(mqtt, "SENSOR1", "alice", "wrong-token").await;
    assert_ne!(code, 0, "a wrong token is refused");
    let (code, mut dev) = mqtt_connect(mqtt, "SENSOR1", "alice", &sensor.access_token).await;
    assert_eq!(code, 0, "the SQLite-era token logs the device in on PostgreSQL");
    mqtt_publish(
        &mut dev,
        &format!("weft/r/{room}/e/m.room.message"),
        br#"{"msgtype":"m.text","body":"reading 22.0 C"}"#,
    )
    .await;
    let next = bob.sync_full(Some(&since2), 5000).await;
    assert_eq!(texts(&timeline(&next, &room)), ["reading 22.0 C"]);
}
