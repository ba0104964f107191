//! The user directory, TURN credentials, third-party IDs, and reports of
//! events and users (listed by `weft report list`).

mod common;

use common::*;
use serde_json::{Value, json};

fn user_ids(r: &Value) -> Vec<String> {
    r["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results: {r}"))
        .iter()
        .map(|u| u["user_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_finds_people_who_share_a_room_or_a_public_one() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let bobby = server.register("bobby").await;
    let _bobo = server.register("bobo").await;
    let gone = server.register("bobgone").await;

    // bob shares a private room with alice; carol is in a published room;
    // bobby shares nothing with alice; bobgone is deactivated.
    room_with(&alice, &bob, "private_chat").await;
    room_with(&alice, &gone, "private_chat").await;
    carol
        .create_room(json!({"preset": "public_chat", "visibility": "public"}))
        .await;
    bobby.create_room(json!({"preset": "private_chat"})).await;
    let (st, _) = carol
        .put(
            &format!("profile/{}/displayname", enc(&carol.user_id)),
            json!({"displayname": "Carol the Bob_Fan"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = gone
        .post(
            "account/deactivate",
            json!({"auth": {"type": "m.login.password", "user": gone.user_id, "password": gone.password}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    let search = |term: &str, limit: Option<u64>| {
        let mut body = json!({ "search_term": term });
        if let Some(l) = limit {
            body["limit"] = l.into();
        }
        let alice = alice.clone();
        async move {
            let (st, r) = alice.post("user_directory/search", body).await;
            assert_eq!(st, 200, "{r}");
            r
        }
    };
    let r = search("BOB", None).await;
    assert_eq!(user_ids(&r), vec![bob.user_id.clone(), carol.user_id.clone()], "{r}");
    assert_eq!(r["limited"], false);
    let carol_hit = r["results"][1].clone();
    assert_eq!(carol_hit["display_name"], "Carol the Bob_Fan", "{r}");

    let r = search("bob", Some(1)).await;
    assert_eq!(user_ids(&r), vec![bob.user_id.clone()]);
    assert_eq!(r["limited"], true);
    // LIKE's wildcards match only themselves.
    assert_eq!(user_ids(&search("%", None).await), Vec::<String>::new());
    assert_eq!(user_ids(&search("b_b", None).await), Vec::<String>::new());
    assert_eq!(user_ids(&search("bob_fan", None).await), vec![carol.user_id.clone()]);
    assert_eq!(user_ids(&search("   ", None).await), Vec::<String>::new());
    // bobby, sharing no room with alice and in no public room, is found by
    // nobody but himself.
    let (_, r) = bobby
        .post("user_directory/search", json!({"search_term": "bobby"}))
        .await;
    assert_eq!(user_ids(&r), vec![bobby.user_id.clone()]);

    assert_err(&alice.post("user_directory/search", json!({})).await, 400, "M_BAD_JSON");
    assert_err(
        &server
            .anon()
            .post("user_directory/search", json!({"search_term": "b"}))
            .await,
        401,
        "M_MISSING_TOKEN",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_come_from_the_shared_secret() {
    // No TURN server configured: an empty answer.
    let plain = TestServer::start().await;
    let alice = plain.register("alice").await;
    assert_eq!(alice.get("voip/turnServer").await, (200, json!({})));
    assert_eq!(alice.get("account/3pid").await, (200, json!({"threepids": []})));

    let server = TestServer::builder()
        .env(
            "WEFT_VOIP__TURN_URIS",
            r#"["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]"#,
        )
        .env("WEFT_VOIP__TURN_SHARED_SECRET", "north")
        .env("WEFT_VOIP__TURN_TTL_SECS", "600")
        .start()
        .await;
    let bob = server.register("bob").await;
    let (st, t) = bob.get("voip/turnServer").await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(
        t["uris"],
        json!([
            "turn:turn.example.org:3478?transport=udp",
            "turns:turn.example.org:5349"
        ])
    );
    assert_eq!(t["ttl"], 600);
    let username = t["username"].as_str().expect("username");
    let (expiry, user) = username.split_once(':').expect("expiry:user");
    assert_eq!(user, bob.user_id);
    let expiry: u64 = expiry.parse().expect("expiry in seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!((now + 590..=now + 610).contains(&expiry), "expiry {expiry}, now {now}");
    let (_, password) = weft_services::directory::turn_credentials("north", &bob.user_id, expiry).expect("hmac");
    assert_eq!(t["password"], password.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_need_a_visible_event_and_reach_the_operator() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let mallory = server.register("mallory").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let event = bob.send_text(&room, "t1", "offensive").await;
    let path = format!("rooms/{}/report/{}", enc(&room), enc(&event));

    let (st, r) = alice
        .post(&path, json!({"reason": "spam\tand worse", "score": -100}))
        .await;
    assert_eq!(st, 200, "{r}");
    // Not in the room: the same answer as for an event that does not exist.
    assert_err(&mallory.post(&path, json!({"reason": "x"})).await, 404, "M_NOT_FOUND");
    assert_err(
        &alice
            .post(&format!("rooms/{}/report/{}", enc(&room), enc("$nope")), json!({}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    assert_err(
        &alice.post(&path, json!({"reason": "x".repeat(5000)})).await,
        400,
        "M_INVALID_PARAM",
    );
    let (st, r) = bob
        .post(
            &format!("users/{}/report", enc(&mallory.user_id)),
            json!({"reason": "stalking"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_err(
        &bob.post("users/not-a-user-id/report", json!({"reason": "x"})).await,
        400,
        "M_INVALID_PARAM",
    );

    let (ok, out, err) = server.cli("report", "list", &[]);
    assert!(ok, "{err}");
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0][2], bob.user_id);
    assert_eq!(lines[0][3], mallory.user_id);
    assert_eq!(lines[0][4], "stalking");
    assert_eq!(lines[1][2], alice.user_id);
    assert_eq!(lines[1][3], format!("{room} {event}"));
    assert_eq!(lines[1][4], "spam and worse");
}
