//! Relations (`/rooms/{id}/relations/…`) and threads (`/rooms/{id}/threads`)
//! over HTTP: filtering by relation and event type, both directions with
//! pagination, redaction, visibility, and thread summaries.

mod common;

use common::*;
use serde_json::{Value, json};

fn ids(r: &Value) -> Vec<String> {
    r["chunk"]
        .as_array()
        .unwrap_or_else(|| panic!("chunk: {r}"))
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn thread_reply(root: &str, body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body, "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_filter_page_and_forget_redacted_events() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let root = alice.send_text(&room, "r", "root").await;
    let other = alice.send_text(&room, "o", "another").await;
    let t1 = bob
        .send(&room, "m.room.message", "t1", thread_reply(&root, "one"))
        .await;
    let react = alice
        .send(
            &room,
            "m.reaction",
            "re",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "👍"}}),
        )
        .await;
    let t2 = bob
        .send(&room, "m.room.message", "t2", thread_reply(&root, "two"))
        .await;
    // A relation to another event is not one of root's.
    bob.send(&room, "m.room.message", "t3", thread_reply(&other, "elsewhere"))
        .await;
    let base = format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(&room), enc(&root));

    let (st, all) = alice.get(&base).await;
    assert_eq!(st, 200, "{all}");
    assert_eq!(ids(&all), vec![t2.clone(), react.clone(), t1.clone()], "newest first");
    assert!(all["next_batch"].is_null(), "{all}");
    let (_, threads) = alice.get(&format!("{base}/m.thread")).await;
    assert_eq!(ids(&threads), vec![t2.clone(), t1.clone()]);
    let (_, reactions) = alice.get(&format!("{base}/m.annotation/m.reaction")).await;
    assert_eq!(ids(&reactions), vec![react.clone()]);
    assert_eq!(reactions["chunk"][0]["content"]["m.relates_to"]["key"], "👍");
    let (_, none) = alice.get(&format!("{base}/m.annotation/m.room.message")).await;
    assert_eq!(ids(&none), Vec::<String>::new());

    // Pages of one, forwards: every event once, in order.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..5 {
        let q = match &from {
            Some(f) => format!("{base}?dir=f&limit=1&from={f}"),
            None => format!("{base}?dir=f&limit=1"),
        };
        let (st, page) = alice.get(&q).await;
        assert_eq!(st, 200, "{page}");
        seen.extend(ids(&page));
        match page["next_batch"].as_str() {
            Some(n) => from = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, vec![t1.clone(), react.clone(), t2.clone()]);

    // A redacted event loses its relation.
    let (st, v) = bob
        .put(
            &format!("rooms/{}/redact/{}/x1", enc(&room), enc(&t1)),
            json!({"reason": "oops"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, after) = alice.get(&format!("{base}/m.thread")).await;
    assert_eq!(ids(&after), vec![t2.clone()]);

    // Someone who cannot see the room learns nothing.
    assert_err(&carol.get(&base).await, 404, "M_NOT_FOUND");
    assert_err(
        &alice
            .get(&format!(
                "/_matrix/client/v1/rooms/{}/relations/{}",
                enc(&room),
                enc("$missing")
            ))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &alice.get(&format!("{base}?from=garbage")).await,
        400,
        "M_INVALID_PARAM",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_list_roots_with_summaries() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = room_with(&alice, &bob, "public_chat").await;
    carol.join(&room).await;
    let a = alice.send_text(&room, "a", "thread A").await;
    let b = bob.send_text(&room, "b", "thread B").await;
    bob.send(&room, "m.room.message", "a1", thread_reply(&a, "a1")).await;
    bob.send(&room, "m.room.message", "b1", thread_reply(&b, "b1")).await;
    let a2 = bob.send(&room, "m.room.message", "a2", thread_reply(&a, "a2")).await;
    let path = format!("/_matrix/client/v1/rooms/{}/threads", enc(&room));

    let (st, r) = alice.get(&path).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(ids(&r), vec![a.clone(), b.clone()], "newest reply first");
    let summary = &r["chunk"][0]["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(summary["count"], 2, "{r}");
    assert_eq!(summary["latest_event"]["event_id"], a2.as_str());
    assert_eq!(summary["latest_event"]["content"]["body"], "a2");
    assert_eq!(summary["current_user_participated"], true, "alice wrote root A");
    assert_eq!(
        r["chunk"][1]["unsigned"]["m.relations"]["m.thread"]["current_user_participated"],
        false
    );

    let (_, mine) = alice.get(&format!("{path}?include=participated")).await;
    assert_eq!(ids(&mine), vec![a.clone()]);
    let (_, carols) = carol.get(&format!("{path}?include=participated")).await;
    assert_eq!(ids(&carols), Vec::<String>::new());
    let (_, first) = carol.get(&format!("{path}?limit=1")).await;
    assert_eq!(ids(&first), vec![a.clone()]);
    let next = first["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, second) = carol.get(&format!("{path}?limit=1&from={next}")).await;
    assert_eq!(ids(&second), vec![b.clone()]);
}
