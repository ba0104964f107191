//! `POST /search`: words matched as prefixes in message bodies, room names
//! and topics, only in rooms the searcher is in, best or newest first,
//! pages, context, and redacted events gone from the results.

mod common;

use common::*;
use serde_json::{Value, json};

fn bodies(r: &Value) -> Vec<String> {
    r["search_categories"]["room_events"]["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results: {r}"))
        .iter()
        .map(|x| {
            let c = &x["result"]["content"];
            c["body"]
                .as_str()
                .or(c["name"].as_str())
                .or(c["topic"].as_str())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn query(term: &str) -> Value {
    json!({"search_categories": {"room_events": {"search_term": term, "order_by": "recent"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_words_in_rooms_the_user_is_in() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let eve = server.register("eve").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let secret = eve
        .create_room(json!({"preset": "private_chat", "name": "Greenhouse secrets"}))
        .await;
    eve.send_text(&secret, "s1", "greenhouse temperature is 40").await;

    alice
        .send_text(&room, "m1", "The greenhouse sensor reports 21.5 degrees")
        .await;
    let (st, _) = alice
        .put(
            &format!("rooms/{}/state/m.room.topic/", enc(&room)),
            json!({"topic": "Greenhouse telemetry"}),
        )
        .await;
    assert_eq!(st, 200);
    bob.send_text(&room, "m2", "Kitchen humidity: 40%").await;
    let wrong = bob.send_text(&room, "m3", "greenhouse door left open").await;
    bob.send_text(&room, "m4", "Café opens at nine").await;

    let (st, r) = alice.post("search", query("greenhouse")).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        bodies(&r),
        vec![
            "greenhouse door left open",
            "Greenhouse telemetry",
            "The greenhouse sensor reports 21.5 degrees"
        ],
        "newest first, nothing from eve's room"
    );
    assert_eq!(r["search_categories"]["room_events"]["count"], 3);
    assert_eq!(
        r["search_categories"]["room_events"]["highlights"],
        json!(["greenhouse"])
    );
    // Prefixes, every word required, accents and case ignored.
    assert_eq!(
        bodies(&alice.post("search", query("GREEN sens")).await.1),
        vec!["The greenhouse sensor reports 21.5 degrees"]
    );
    assert_eq!(
        bodies(&alice.post("search", query("cafe")).await.1),
        vec!["Café opens at nine"]
    );
    // FTS5's syntax in the words is only text.
    assert_eq!(
        bodies(&alice.post("search", query("\"kitchen OR* NEAR(")).await.1),
        Vec::<String>::new()
    );
    assert_eq!(
        bodies(&alice.post("search", query("kitchen 40")).await.1),
        vec!["Kitchen humidity: 40%"]
    );
    // Keys: only topics.
    let (_, topics) = alice
        .post(
            "search",
            json!({"search_categories": {"room_events": {"search_term": "greenhouse", "keys": ["content.topic"]}}}),
        )
        .await;
    assert_eq!(bodies(&topics), vec!["Greenhouse telemetry"]);
    // Nothing for eve in alice's room, nothing for alice in eve's.
    assert_eq!(
        bodies(&eve.post("search", query("kitchen")).await.1),
        Vec::<String>::new()
    );
    assert_eq!(
        bodies(&alice.post("search", query("temperature")).await.1),
        Vec::<String>::new()
    );

    // Pages of one, with context around each result.
    let paged = |next: Option<&str>| {
        let mut q = json!({"search_categories": {"room_events": {
            "search_term": "greenhouse", "order_by": "recent", "filter": {"limit": 1},
            "event_context": {"before_limit": 1, "after_limit": 1},
        }}});
        let path = match next {
            Some(n) => format!("search?next_batch={n}"),
            None => "search".to_owned(),
        };
        let alice = alice.clone();
        q["x"] = Value::Null;
        async move { alice.post(&path, q).await }
    };
    let (st, p1) = paged(None).await;
    assert_eq!(st, 200, "{p1}");
    assert_eq!(bodies(&p1), vec!["greenhouse door left open"]);
    let ctx = &p1["search_categories"]["room_events"]["results"][0]["context"];
    assert_eq!(
        ctx["events_before"][0]["content"]["body"], "Kitchen humidity: 40%",
        "{ctx}"
    );
    assert_eq!(ctx["events_after"][0]["content"]["body"], "Café opens at nine", "{ctx}");
    let n1 = p1["search_categories"]["room_events"]["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let (_, p2) = paged(Some(&n1)).await;
    assert_eq!(bodies(&p2), vec!["Greenhouse telemetry"]);
    let n2 = p2["search_categories"]["room_events"]["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let (_, p3) = paged(Some(&n2)).await;
    assert_eq!(bodies(&p3), vec!["The greenhouse sensor reports 21.5 degrees"]);
    assert!(p3["search_categories"]["room_events"]["next_batch"].is_null(), "{p3}");

    // A redacted message is not found any more.
    let (st, _) = bob
        .put(&format!("rooms/{}/redact/{}/r1", enc(&room), enc(&wrong)), json!({}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        bodies(&alice.post("search", query("door")).await.1),
        Vec::<String>::new()
    );

    assert_err(
        &alice
            .post("search", json!({"search_categories": {"room_events": {}}}))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &alice.post("search?next_batch=zz", query("greenhouse")).await,
        400,
        "M_INVALID_PARAM",
    );
    let (st, empty) = alice.post("search", json!({"search_categories": {}})).await;
    assert_eq!(st, 200);
    assert_eq!(empty["search_categories"]["room_events"]["results"], json!([]));
}
