//! Push notifications end to end: the push worker evaluates each new
//! event against the members' push rules, `/sync` carries unread counts,
//! `/notifications` lists them, and HTTP pushers deliver them to a push
//! gateway — here a small HTTP server in the test process that records
//! what it receives, as Sygnal would.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A push gateway: records each request body to
/// `/_matrix/push/v1/notify` and answers `{"rejected": [..]}` listing the
/// pushkeys in `reject`.
struct Gateway {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Value>>>,
    reject: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    async fn start() -> Gateway {
        Self::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(addr: SocketAddr) -> Gateway {
        let listener = TcpListener::bind(addr).await.expect("bind gateway");
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let reject = Arc::new(Mutex::new(Vec::new()));
        let (g, r) = (got.clone(), reject.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, g.clone(), r.clone()));
            }
        });
        Gateway {
            addr,
            got,
            reject,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/_matrix/push/v1/notify", self.addr)
    }

    fn received(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until at least `n` notifications arrived (panics after 20 s).
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "gateway got {} of {n}: {got:?}", got.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 request per connection: the body is recorded (if the path
/// is the notify path), the answer closes the connection.
async fn serve(mut stream: TcpStream, got: Arc<Mutex<Vec<Value>>>, reject: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, len) = loop {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_line = String::from_utf8_lossy(&buf[..head_end])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let (status, answer) = if request_line.starts_with("POST /_matrix/push/v1/notify ") {
        let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
        got.lock().unwrap().push(body);
        let rejected = reject.lock().unwrap().clone();
        ("200 OK", json!({ "rejected": rejected }).to_string())
    } else {
        ("404 Not Found", "{}".to_owned())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn set_pusher(c: &Client, url: &str, pushkey: &str, extra: Value) -> (u16, Value) {
    let mut data = json!({ "url": url });
    if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    c.post(
        "pushers/set",
        json!({
            "kind": "http",
            "app_id": "org.weft.test",
            "pushkey": pushkey,
            "app_display_name": "Weft tests",
            "device_display_name": "phone",
            "lang": "en",
            "data": data,
        }),
    )
    .await
}

async fn rule_enabled(c: &Client, kind: &str, id: &str, enabled: bool) {
    let (st, body) = c
        .put(
            &format!("pushrules/global/{kind}/{id}/enabled"),
            json!({ "enabled": enabled }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
}

fn event_ids_of(notifications: &[Value]) -> Vec<String> {
    notifications
        .iter()
        .map(|n| n["notification"]["event_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn mention(user: &str, body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body, "m.mentions": { "user_ids": [user] } })
}

/// The room's `unread_notifications` in a sync response, if the room is in it.
fn unread(sync: &Value, room: &str) -> Option<(u64, u64)> {
    let u = &sync["rooms"]["join"][room]["unread_notifications"];
    Some((u["notification_count"].as_u64()?, u["highlight_count"].as_u64()?))
}

/// Syncs incrementally (with `params`) from `since` until `done` holds for
/// a response; answers it. Panics after 20 s.
async fn sync_until(
    c: &Client,
    since: Option<String>,
    params: &[(&str, &str)],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since = since;
    loop {
        let mut p: Vec<(&str, &str)> = params.to_vec();
        p.push(("timeout", "2000"));
        if let Some(s) = since.as_deref() {
            p.push(("since", s));
        }
        let (st, s) = c.sync_params(&p).await;
        assert_eq!(st, 200, "{s}");
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "condition not met; last sync: {s}");
        since = s["next_batch"].as_str().map(str::to_owned);
    }
}

// Only messages matching a rule notify: with the default "every message"
// rules off, a keyword (content rule) and a mention each reach the gateway
// exactly once, in order, with the push gateway API's fields; the others
// never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mention_and_keyword_notify_once_each_others_not_at_all() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let gw = Gateway::start().await;
    for id in [".m.rule.room_one_to_one", ".m.rule.message"] {
        rule_enabled(&bob, "underride", id, false).await;
    }
    let (st, body) = bob
        .put(
            "pushrules/global/content/pineapple",
            json!({ "pattern": "pineapple", "actions": ["notify"] }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = set_pusher(&bob, &gw.url(), "bob-key", json!({ "custom": "x" })).await;
    assert_eq!(st, 200, "{body}");

    alice.send_text(&room, "t1", "hello").await;
    let keyword = alice.send_text(&room, "t2", "I like pineapple pizza").await;
    alice.send_text(&room, "t3", "nothing here").await;
    let mentioned = alice
        .send(&room, "m.room.message", "t4", mention(&bob.user_id, "bob: look"))
        .await;
    alice.send_text(&room, "t5", "bye").await;
    let last = alice.send_text(&room, "t6", "pineapple again").await;

    // Delivery is in stream order: once the last arrived, all before did.
    let got = gw.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got_after = gw.received();
    assert_eq!(got_after.len(), 3, "exactly three notifications: {got_after:?}");
    assert_eq!(
        event_ids_of(&got),
        vec![keyword.clone(), mentioned.clone(), last.clone()]
    );

    let n = &got[1]["notification"];
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], alice.user_id.as_str());
    assert_eq!(n["content"]["body"], "bob: look");
    assert_eq!(n["prio"], "high", "a mention is a highlight: {n}");
    let counts = n["counts"]["unread"].as_u64().expect("counts.unread");
    assert!(counts >= 2, "two unread so far: {n}");
    let device = &n["devices"][0];
    assert_eq!(device["app_id"], "org.weft.test");
    assert_eq!(device["pushkey"], "bob-key");
    assert!(device["pushkey_ts"].as_u64().is_some_and(|t| t > 1_600_000_000), "{n}");
    assert_eq!(device["data"], json!({ "custom": "x" }), "data without url: {n}");
    assert_eq!(device["tweaks"]["highlight"], true, "{n}");
    assert_eq!(
        got[0]["notification"]["prio"], "low",
        "a plain notify is low: {}",
        got[0]
    );
    assert_eq!(
        got[0]["notification"]["devices"][0]["tweaks"],
        json!({}),
        "no tweaks for the keyword rule: {}",
        got[0]
    );
}

// With `.m.rule.master` enabled nothing notifies: no rows, no counts, no
// push. Carol (same room, defaults) shows the worker got that far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_rule_silences_everything() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    // On before anything happens to bob (his invite would notify too).
    rule_enabled(&bob, "override", ".m.rule.master", true).await;
    let room = room_with(&alice, &bob, "private_chat").await;
    alice.invite(&room, &carol.user_id).await;
    carol.join(&room).await;
    let bob_gw = Gateway::start().await;
    let carol_gw = Gateway::start().await;
    assert_eq!(set_pusher(&bob, &bob_gw.url(), "bob-key", json!({})).await.0, 200);
    assert_eq!(set_pusher(&carol, &carol_gw.url(), "carol-key", json!({})).await.0, 200);

    alice.send_text(&room, "t1", "hello all").await;
    alice
        .send(&room, "m.room.message", "t2", mention(&bob.user_id, "bob!"))
        .await;
    let last = alice.send_text(&room, "t3", "last").await;
    let got = carol_gw.wait_for(3).await;
    assert_eq!(event_ids_of(&got).last(), Some(&last));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        bob_gw.received().is_empty(),
        "master rule: no push: {:?}",
        bob_gw.received()
    );
    let (st, list) = bob.get("notifications").await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["notifications"], json!([]), "{list}");
    let s = bob.sync(None, 0).await;
    assert_eq!(unread(&s, &room), Some((0, 0)), "{s}");
    // Carol got all three (mention of bob is a plain message to her).
    assert_eq!(carol_gw.received().len(), 3);
}

// A gateway that is down at first gets every notification once it comes
// up, in order, even across a restart of the server in between (the
// evaluated position and each pusher's last sent position are stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_down_at_first_gets_everything_in_order_after_restart() {
    let mut server = TestServer::builder()
        .env("WEFT_PUSH__RETRY_INITIAL_MS", "100")
        .env("WEFT_PUSH__RETRY_MAX_MS", "400")
        .start()
        .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    // An address nothing listens on (yet).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{addr}/_matrix/push/v1/notify");
    assert_eq!(set_pusher(&bob, &url, "bob-key", json!({})).await.0, 200);
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(alice.send_text(&room, &format!("a{i}"), &format!("message {i}")).await);
    }
    // Let a few attempts fail.
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.terminate(Duration::from_secs(10)).await;
    server.restart().await;
    for i in 3..5 {
        sent.push(alice.send_text(&room, &format!("a{i}"), &format!("message {i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gw = Gateway::start_at(addr).await;
    let got = gw.wait_for(5).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got_after = gw.received();
    assert_eq!(got_after.len(), 5, "each once: {got_after:?}");
    assert_eq!(event_ids_of(&got), sent, "in order");
}

// The unread counts of /sync rise with the other user's messages (a
// mention is also a highlight) and fall to 0 after an m.read receipt; the
// room shows up in an incremental sync when only its counts changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_rise_and_fall_after_read_receipt() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let s0 = bob.sync(None, 0).await;
    assert_eq!(unread(&s0, &room), Some((0, 0)), "{s0}");
    let since = s0["next_batch"].as_str().map(str::to_owned);

    alice.send_text(&room, "t1", "one").await;
    alice
        .send(&room, "m.room.message", "t2", mention(&bob.user_id, "two, bob"))
        .await;
    let third = alice.send_text(&room, "t3", "three").await;
    let s1 = sync_until(&bob, since, &[], |s| unread(s, &room) == Some((3, 1))).await;
    // Bob's own messages do not count for him.
    bob.send_text(&room, "b1", "my own").await;
    let s2 = bob.sync(s1["next_batch"].as_str(), 1000).await;
    assert_ne!(unread(&s2, &room), Some((4, 1)), "own message counted: {s2}");

    let (st, body) = bob
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&third)),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let s3 = sync_until(&bob, s2["next_batch"].as_str().map(str::to_owned), &[], |s| {
        unread(s, &room).is_some()
    })
    .await;
    assert_eq!(unread(&s3, &room), Some((0, 0)), "{s3}");

    // A new message after the receipt counts again, and alone.
    alice.send_text(&room, "t4", "four").await;
    sync_until(&bob, s3["next_batch"].as_str().map(str::to_owned), &[], |s| {
        unread(s, &room) == Some((1, 0))
    })
    .await;
    assert_eq!(server.user_id("bob"), bob.user_id);
}

// With `unread_thread_notifications` the main counts leave thread replies
// out and each thread has its own; a threaded receipt clears only its
// thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_counts_and_threaded_receipts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let root = alice.send_text(&room, "t1", "root").await;
    let reply = alice
        .send(
            &room,
            "m.room.message",
            "t2",
            json!({ "msgtype": "m.text", "body": "in thread",
                    "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
        )
        .await;
    let filter = json!({ "room": { "timeline": { "unread_thread_notifications": true } } }).to_string();
    let params = [("filter", filter.as_str())];
    let threads = |s: &Value| s["rooms"]["join"][&room]["unread_thread_notifications"].clone();
    let s = sync_until(&bob, None, &params, |s| {
        threads(s)[&root]["notification_count"] == 1 && unread(s, &room) == Some((1, 0))
    })
    .await;
    // Without the filter flag everything counts in the room's counts.
    let plain = bob.sync(None, 0).await;
    assert_eq!(unread(&plain, &room), Some((2, 0)), "{plain}");
    assert!(
        plain["rooms"]["join"][&room]
            .get("unread_thread_notifications")
            .is_none(),
        "{plain}"
    );

    let (st, body) = bob
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&reply)),
            json!({ "thread_id": root }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let s2 = sync_until(&bob, s["next_batch"].as_str().map(str::to_owned), &params, |s| {
        unread(s, &room).is_some()
    })
    .await;
    assert_eq!(unread(&s2, &room), Some((1, 0)), "main still unread: {s2}");
    assert!(threads(&s2).get(&root).is_none(), "thread read: {s2}");
}

// /notifications lists the rows newest first with read flags, pages with
// next_token, and `only=highlight` keeps the mentions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_list_with_read_flags_and_pages() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let first = alice.send_text(&room, "t1", "one").await;
    let second = alice
        .send(&room, "m.room.message", "t2", mention(&bob.user_id, "two, bob"))
        .await;
    let third = alice.send_text(&room, "t3", "three").await;
    sync_until(&bob, None, &[], |s| unread(s, &room) == Some((3, 1))).await;
    let (st, body) = bob
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&second)),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{body}");

    let (st, list) = bob.get("notifications").await;
    assert_eq!(st, 200, "{list}");
    let items = list["notifications"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = items
        .iter()
        .map(|n| n["event"]["event_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids.len(), 4, "three messages and bob's invite: {list}");
    assert_eq!(&ids[..3], &[third.as_str(), second.as_str(), first.as_str()], "{list}");
    assert_eq!(items[3]["event"]["type"], "m.room.member", "{list}");
    assert_eq!(items[3]["event"]["content"]["membership"], "invite", "{list}");
    let read: Vec<bool> = items.iter().map(|n| n["read"].as_bool().unwrap_or(true)).collect();
    assert_eq!(read, vec![false, true, true, true], "{list}");
    assert!(
        items
            .iter()
            .all(|n| n["room_id"] == room.as_str() && n["ts"].as_u64().is_some())
    );
    assert!(
        items[1]["actions"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("notify"))),
        "{list}"
    );
    assert!(list.get("next_token").is_none(), "{list}");

    let (_, page1) = bob.get("notifications?limit=2").await;
    assert_eq!(page1["notifications"].as_array().map(|a| a.len()), Some(2), "{page1}");
    let token = page1["next_token"].as_str().expect("next_token").to_owned();
    let (_, page2) = bob.get(&format!("notifications?limit=2&from={}", enc(&token))).await;
    let p2: Vec<&str> = page2["notifications"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["event"]["event_id"].as_str().unwrap_or(""))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(p2.len(), 2, "{page2}");
    assert_eq!(p2[0], first.as_str(), "{page2}");
    let token = page2["next_token"].as_str().expect("next_token").to_owned();
    let (_, page3) = bob.get(&format!("notifications?limit=2&from={}", enc(&token))).await;
    assert_eq!(page3["notifications"], json!([]), "{page3}");

    let (_, high) = bob.get("notifications?only=highlight").await;
    let h: Vec<&str> = high["notifications"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["event"]["event_id"].as_str().unwrap_or(""))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(h, vec![second.as_str()], "{high}");
    assert_err(&bob.get("notifications?from=nonsense").await, 400, "M_INVALID_PARAM");
    // Alice sent them all: she has none.
    let (_, mine) = alice.get("notifications").await;
    assert_eq!(mine["notifications"], json!([]), "{mine}");
}

// /pushers/set: only http pushers with an http(s) URL ending in the notify
// path; kind null deletes; the same app_id and pushkey of another user is
// replaced unless `append`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_pusher_validation_listing_and_deletion() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    for bad in [
        "ftp://gw.example/_matrix/push/v1/notify",
        "https://gw.example/other/path",
        "https://gw.example/_matrix/push/v1/notify/extra",
        "not a url",
        "/_matrix/push/v1/notify",
    ] {
        let got = set_pusher(&alice, bad, "k", json!({})).await;
        assert_err(&got, 400, "M_INVALID_PARAM");
    }
    let email = alice
        .post(
            "pushers/set",
            json!({ "kind": "email", "app_id": "m.email", "pushkey": "a@example.org",
                    "app_display_name": "Mail", "device_display_name": "mail", "lang": "en",
                    "data": {} }),
        )
        .await;
    assert_err(&email, 400, "M_INVALID_PARAM");
    let (_, list) = alice.get("pushers").await;
    assert_eq!(list["pushers"], json!([]), "nothing stored: {list}");

    let url = "https://push.example.org/_matrix/push/v1/notify";
    let (st, body) = set_pusher(&alice, url, "shared", json!({ "format": "event_id_only" })).await;
    assert_eq!(st, 200, "{body}");
    let (_, list) = alice.get("pushers").await;
    let pushers = list["pushers"].as_array().cloned().unwrap_or_default();
    assert_eq!(pushers.len(), 1, "{list}");
    assert_eq!(pushers[0]["pushkey"], "shared");
    assert_eq!(pushers[0]["kind"], "http");
    assert_eq!(pushers[0]["app_id"], "org.weft.test");
    assert_eq!(pushers[0]["data"]["url"], url);
    assert_eq!(pushers[0]["data"]["format"], "event_id_only");

    // Bob takes the same app_id + pushkey: alice's goes (no append).
    assert_eq!(set_pusher(&bob, url, "shared", json!({})).await.0, 200);
    let (_, list) = alice.get("pushers").await;
    assert_eq!(list["pushers"], json!([]), "replaced by bob's: {list}");
    // With append both stay.
    let (st, body) = alice
        .post(
            "pushers/set",
            json!({ "kind": "http", "app_id": "org.weft.test", "pushkey": "shared", "append": true,
                    "app_display_name": "A", "device_display_name": "d", "lang": "en",
                    "data": { "url": url } }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (_, a) = alice.get("pushers").await;
    let (_, b) = bob.get("pushers").await;
    assert_eq!(a["pushers"].as_array().map(|p| p.len()), Some(1), "{a}");
    assert_eq!(b["pushers"].as_array().map(|p| p.len()), Some(1), "{b}");

    // kind null deletes.
    let (st, body) = alice
        .post(
            "pushers/set",
            json!({ "kind": null, "app_id": "org.weft.test", "pushkey": "shared" }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (_, a) = alice.get("pushers").await;
    assert_eq!(a["pushers"], json!([]), "{a}");
    let (_, b) = bob.get("pushers").await;
    assert_eq!(b["pushers"].as_array().map(|p| p.len()), Some(1), "bob's stays: {b}");
}

// A gateway that lists the pushkey in `rejected` gets that pusher deleted;
// `event_id_only` pushers get no content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_pushkey_deletes_the_pusher() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let gw = Gateway::start().await;
    gw.reject.lock().unwrap().push("bob-key".into());
    let (st, body) = set_pusher(&bob, &gw.url(), "bob-key", json!({ "format": "event_id_only" })).await;
    assert_eq!(st, 200, "{body}");
    let (_, list) = bob.get("pushers").await;
    assert_eq!(list["pushers"].as_array().map(|p| p.len()), Some(1), "{list}");

    let first = alice.send_text(&room, "t1", "hello").await;
    let got = gw.wait_for(1).await;
    let n = &got[0]["notification"];
    assert_eq!(n["event_id"], first.as_str());
    assert!(
        n.get("content").is_none() && n.get("sender").is_none(),
        "event_id_only: {n}"
    );
    assert_eq!(n["devices"][0]["data"], json!({ "format": "event_id_only" }), "{n}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = bob.get("pushers").await;
        if list["pushers"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "pusher not deleted: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.send_text(&room, "t2", "again").await;
    sync_until(&bob, None, &[], |s| unread(s, &room) == Some((2, 0))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gw.received().len(),
        1,
        "nothing after the pusher went: {:?}",
        gw.received()
    );
}

// A sensor room: a device sends a burst of telemetry to a room its owner
// is in. No default rule notifies for telemetry, so the owner gets no
// notification for any of it, and the push worker, walking the whole burst
// after it was sent, still delivers the one message that mentions the
// owner right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_burst_notifies_nobody_and_a_later_mention_still_arrives() {
    let server = TestServer::start().await;
    let owner = server.register("owner").await;
    let sensor = server.register("sensor").await;
    let room = room_with(&owner, &sensor, "private_chat").await;
    let gw = Gateway::start().await;
    assert_eq!(set_pusher(&owner, &gw.url(), "owner-key", json!({})).await.0, 200);
    let mut sends = Vec::new();
    for w in 0..4 {
        let (sensor, room) = (sensor.clone(), room.clone());
        sends.push(tokio::spawn(async move {
            for i in 0..150 {
                sensor
                    .send(&room, "org.weft.telemetry", &format!("w{w}-{i}"), json!({ "t": i }))
                    .await;
            }
        }));
    }
    for s in sends {
        s.await.expect("sender");
    }
    let mention = sensor
        .send(
            &room,
            "m.room.message",
            "alarm",
            mention(&owner.user_id, "owner: too hot"),
        )
        .await;
    let got = gw.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(event_ids_of(&gw.received()), vec![mention.clone()], "{got:?}");
    let (_, list) = owner.get("notifications").await;
    let types: Vec<&str> = list["notifications"]
        .as_array()
        .map(|a| a.iter().map(|n| n["event"]["type"].as_str().unwrap_or("")).collect())
        .unwrap_or_default();
    assert!(!types.contains(&"org.weft.telemetry"), "{list}");
    let s = owner.sync(None, 0).await;
    assert_eq!(unread(&s, &room), Some((1, 1)), "only the mention: {s}");
}
