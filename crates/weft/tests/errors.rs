//! Error responses: status codes and errcodes per the Client-Server spec.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_errors() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    // Missing token.
    let got = server.anon().get("account/whoami").await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let got = server.anon().get("sync").await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let got = server.anon().post("createRoom", json!({})).await;
    assert_err(&got, 401, "M_MISSING_TOKEN");

    // Unknown token, with soft_logout.
    let bogus = server.with_token("syt_not_a_real_token");
    let got = bogus.get("account/whoami").await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    assert!(
        got.1["soft_logout"].is_boolean(),
        "M_UNKNOWN_TOKEN needs a boolean soft_logout: {}",
        got.1
    );

    // Token in the query string (deprecated but still in the spec) works.
    let (st, who) = server
        .anon()
        .get(&format!("account/whoami?access_token={}", enc(&alice.access_token)))
        .await;
    assert_eq!(st, 200, "access_token query parameter: {who}");
    assert_eq!(who["user_id"], alice.user_id.as_str());
    let got = server.anon().get("account/whoami?access_token=nope").await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_errors() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let send_path = |txn: &str| format!("rooms/{}/send/m.room.message/{}", enc(&room), txn);

    // Not JSON at all.
    let got = alice
        .request_raw(
            Method::POST,
            "createRoom",
            "application/json",
            b"this is not json".to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    let got = alice
        .request_raw(
            Method::PUT,
            &send_path("nj"),
            "application/json",
            b"{\"body\": ".to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_NOT_JSON");

    // Valid JSON, but not an object where an object is required.
    let got = alice
        .request_raw(Method::PUT, &send_path("arr"), "application/json", b"[1,2,3]".to_vec())
        .await;
    assert_eq!(got.0, 400, "array as event content: {}", got.1);
    assert!(
        got.1["errcode"] == "M_BAD_JSON" || got.1["errcode"] == "M_NOT_JSON",
        "{}",
        got.1
    );

    // Floats are not allowed in event content (canonical JSON).
    let got = alice
        .request_raw(
            Method::PUT,
            &send_path("float"),
            "application/json",
            br#"{"msgtype":"m.text","body":"x","v": 1.5}"#.to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    // Integers outside [-(2^53)+1, 2^53-1].
    let got = alice
        .request_raw(
            Method::PUT,
            &send_path("big"),
            "application/json",
            br#"{"msgtype":"m.text","body":"x","v": 9007199254740992}"#.to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    let got = alice
        .request_raw(
            Method::PUT,
            &send_path("small"),
            "application/json",
            br#"{"body":"x","n":{"v": -9007199254740992}}"#.to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
    // In a state event too.
    let got = alice
        .request_raw(
            Method::PUT,
            &format!("rooms/{}/state/org.weft.config", enc(&room)),
            "application/json",
            br#"{"threshold": 0.25}"#.to_vec(),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");

    // The edges of the range are fine.
    let (st, r) = alice
        .request_raw(
            Method::PUT,
            &send_path("edge"),
            "application/json",
            br#"{"msgtype":"m.text","body":"x","max": 9007199254740991, "min": -9007199254740991}"#.to_vec(),
        )
        .await;
    assert_eq!(st, 200, "2^53-1 is in range: {r}");
    let eid = r["event_id"].as_str().unwrap().to_string();
    let (_, ev) = alice.get(&format!("rooms/{}/event/{}", enc(&room), enc(&eid))).await;
    assert_eq!(ev["content"]["max"], json!(9007199254740991i64));
    assert_eq!(ev["content"]["min"], json!(-9007199254740991i64));

    // Nothing rejected made it into the room.
    let msgs = of_type(&alice.all_messages(&room).await, "m.room.message");
    assert_eq!(event_ids(&msgs), vec![eid], "rejected events were stored");
    let (st, _) = alice.get(&format!("rooms/{}/state/org.weft.config", enc(&room))).await;
    assert_eq!(st, 404, "rejected state event was stored");

    // Missing required fields.
    let got = server.anon().post("login", json!({"type": "m.login.password"})).await;
    assert_eq!(got.0, 400, "login without identifier/password: {}", got.1);
    assert!(
        ["M_BAD_JSON", "M_MISSING_PARAM", "M_INVALID_PARAM", "M_UNKNOWN"]
            .contains(&got.1["errcode"].as_str().unwrap_or("")),
        "{}",
        got.1
    );
    let got = alice.post(&format!("rooms/{}/invite", enc(&room)), json!({})).await;
    assert_eq!(got.0, 400, "invite without user_id: {}", got.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_endpoint_and_wrong_method() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    let got = alice.get("no_such_endpoint").await;
    assert_err(&got, 404, "M_UNRECOGNIZED");
    let got = server.anon().get("no_such_endpoint").await;
    assert_err(&got, 404, "M_UNRECOGNIZED");
    let got = alice.get("/_matrix/client/v3/rooms/!x:y/frobnicate").await;
    assert_err(&got, 404, "M_UNRECOGNIZED");
    let got = alice.post("/_matrix/client/v9/login", json!({})).await;
    assert_err(&got, 404, "M_UNRECOGNIZED");

    // Known endpoint, wrong method.
    let got = alice.get("createRoom").await;
    assert_err(&got, 405, "M_UNRECOGNIZED");
    let got = alice.request(Method::DELETE, "account/whoami", None).await;
    assert_err(&got, 405, "M_UNRECOGNIZED");
    let got = server.anon().request(Method::PUT, "login", Some(json!({}))).await;
    assert_err(&got, 405, "M_UNRECOGNIZED");
}

/// Runs the UIA dance for /register and returns the final response (the
/// first one if it was not a 401).
async fn register_attempt(server: &TestServer, username: &str) -> (u16, Value) {
    let anon = server.anon();
    let body = json!({"username": username, "password": "a-good-long-password"});
    let first = anon.post("register", body.clone()).await;
    if first.0 != 401 {
        return first;
    }
    let session = first.1["session"].as_str().expect("session").to_string();
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy", "session": session});
    anon.post("register", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_errors_and_availability() {
    let server = TestServer::start().await;

    // The UIA 401 for open registration offers m.login.dummy.
    let (st, uia) = server
        .anon()
        .post(
            "register",
            json!({"username": "zed", "password": "a-good-long-password"}),
        )
        .await;
    assert_eq!(st, 401, "{uia}");
    let flows = uia["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("UIA response without flows: {uia}"));
    assert!(
        flows.iter().any(|f| f["stages"] == json!(["m.login.dummy"])),
        "open registration should offer the [m.login.dummy] flow: {uia}"
    );
    assert!(uia["session"].is_string(), "{uia}");

    let (st, avail) = server.anon().get("register/available?username=alice").await;
    assert_eq!((st, avail.clone()), (200, json!({"available": true})), "{avail}");
    // Registration tokens are not in use with open registration.
    let got = server
        .anon()
        .get("/_matrix/client/v1/register/m.login.registration_token/validity?token=x")
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");

    let alice = server.register("alice").await;
    assert_eq!(alice.user_id, server.user_id("alice"));

    let got = register_attempt(&server, "alice").await;
    assert_err(&got, 400, "M_USER_IN_USE");
    // Case-folded duplicates count as taken as well (user IDs are lowercase).
    let got = register_attempt(&server, "ALICE").await;
    assert_eq!(got.0, 400, "ALICE: {}", got.1);
    assert!(
        got.1["errcode"] == "M_USER_IN_USE" || got.1["errcode"] == "M_INVALID_USERNAME",
        "{}",
        got.1
    );

    let got = register_attempt(&server, "Bad Name!").await;
    assert_err(&got, 400, "M_INVALID_USERNAME");
    let got = register_attempt(&server, "x:y").await;
    assert_err(&got, 400, "M_INVALID_USERNAME");

    let got = server.anon().get("register/available?username=alice").await;
    assert_err(&got, 400, "M_USER_IN_USE");
    let got = server
        .anon()
        .get(&format!("register/available?username={}", enc("Bad Name!")))
        .await;
    assert_err(&got, 400, "M_INVALID_USERNAME");
    let (st, avail) = server.anon().get("register/available?username=bob").await;
    assert_eq!((st, avail.clone()), (200, json!({"available": true})), "{avail}");

    // A weak (short) password is refused.
    let got = register_attempt_pw(&server, "carol", "short").await;
    assert_err(&got, 400, "M_WEAK_PASSWORD");

    // UIA with a made-up session is refused.
    let (st, r) = server
        .anon()
        .post(
            "register",
            json!({"username": "dave", "password": "a-good-long-password",
                   "auth": {"type": "m.login.dummy", "session": "no-such-session"}}),
        )
        .await;
    assert!(
        st == 401 || st == 400 || st == 403,
        "bogus UIA session accepted: {st} {r}"
    );
    assert!(r["access_token"].is_null(), "{r}");

    // Server-generated username when none is given.
    let anon = server.anon();
    let (st, first) = anon.post("register", json!({"password": "a-good-long-password"})).await;
    assert_eq!(st, 401, "{first}");
    let (st, r) = anon
        .post(
            "register",
            json!({"password": "a-good-long-password", "auth": {"type": "m.login.dummy", "session": first["session"]}}),
        )
        .await;
    assert_eq!(st, 200, "register without username: {r}");
    assert!(
        r["user_id"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!(":{}", server.server_name))),
        "{r}"
    );
}

async fn register_attempt_pw(server: &TestServer, username: &str, pw: &str) -> (u16, Value) {
    let anon = server.anon();
    let body = json!({"username": username, "password": pw});
    let first = anon.post("register", body.clone()).await;
    if first.0 != 401 {
        return first;
    }
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy", "session": first.1["session"]});
    anon.post("register", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_access_errors() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mallory = server.register("mallory").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let eid = alice.send_text(&room, "t1", "secret").await;
    let r = enc(&room);

    // Not a member of an existing private room.
    let got = mallory
        .send_raw(
            &room,
            "m.room.message",
            "m1",
            json!({"msgtype": "m.text", "body": "hi"}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = mallory.get(&format!("rooms/{r}/messages?dir=b")).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = mallory.get(&format!("rooms/{r}/state")).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = mallory.get(&format!("rooms/{r}/state/m.room.create")).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = mallory.get(&format!("rooms/{r}/members")).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = mallory.get(&format!("rooms/{r}/event/{}", enc(&eid))).await;
    assert_err(&got, 404, "M_NOT_FOUND");
    let got = mallory.get(&format!("rooms/{r}/context/{}", enc(&eid))).await;
    assert!(
        got.0 == 403 || got.0 == 404,
        "context for non-member: {} {}",
        got.0,
        got.1
    );
    // Joining an invite-only room uninvited.
    let got = mallory.post(&format!("join/{r}"), json!({})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Inviting into a room you are not in.
    let got = mallory
        .post(&format!("rooms/{r}/invite"), json!({"user_id": mallory.user_id}))
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // Mallory's sync does not reveal the room.
    let s = mallory.sync(None, 0).await;
    assert!(
        s["rooms"]["join"][&room].is_null() && s["rooms"]["invite"][&room].is_null(),
        "{s}"
    );

    // A room that does not exist.
    let ghost = format!("!doesnotexist:{}", server.server_name);
    let g = enc(&ghost);
    for got in [
        alice.get(&format!("rooms/{g}/messages?dir=b")).await,
        alice
            .send_raw(
                &ghost,
                "m.room.message",
                "g1",
                json!({"msgtype": "m.text", "body": "hi"}),
            )
            .await,
        alice.get(&format!("rooms/{g}/state")).await,
        alice.post(&format!("join/{g}"), json!({})).await,
    ] {
        assert!(
            (got.0 == 403 && got.1["errcode"] == "M_FORBIDDEN") || (got.0 == 404 && got.1["errcode"] == "M_NOT_FOUND"),
            "nonexistent room: expected 403 M_FORBIDDEN or 404 M_NOT_FOUND, got {} {}",
            got.0,
            got.1
        );
    }
    // Malformed room ID: a client error with a Matrix errcode, not a 5xx.
    let got = alice.get("rooms/not-a-room-id/messages?dir=b").await;
    assert!((400..500).contains(&got.0), "malformed room id: {} {}", got.0, got.1);
    assert!(
        got.1["errcode"].as_str().is_some_and(|c| c.starts_with("M_")),
        "{}",
        got.1
    );

    // Unknown alias.
    let got = alice
        .get(&format!(
            "directory/room/{}",
            enc(&format!("#nope:{}", server.server_name))
        ))
        .await;
    assert_err(&got, 404, "M_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large() {
    let server = TestServer::builder()
        .env("WEFT_LIMITS__MAX_BODY_BYTES", "4096")
        .start()
        .await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    let ok_body = "a".repeat(3000);
    let eid = alice
        .send(
            &room,
            "m.room.message",
            "small",
            json!({"msgtype": "m.text", "body": ok_body}),
        )
        .await;

    let big = "b".repeat(8192);
    let got = alice
        .send_raw(
            &room,
            "m.room.message",
            "big",
            json!({"msgtype": "m.text", "body": big}),
        )
        .await;
    assert_err(&got, 413, "M_TOO_LARGE");
    let huge = "c".repeat(64 * 1024);
    let got = alice
        .send_raw(
            &room,
            "m.room.message",
            "huge",
            json!({"msgtype": "m.text", "body": huge}),
        )
        .await;
    assert_err(&got, 413, "M_TOO_LARGE");
    // Unauthenticated too (limit applies before auth).
    let got = server
        .anon()
        .request_raw(
            Method::POST,
            "login",
            "application/json",
            format!("{{\"x\":\"{}\"}}", "d".repeat(10_000)).into_bytes(),
        )
        .await;
    assert_err(&got, 413, "M_TOO_LARGE");

    let msgs = of_type(&alice.all_messages(&room).await, "m.room.message");
    assert_eq!(event_ids(&msgs), vec![eid], "oversized events must not be stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_returns_429_with_retry_after() {
    let server = TestServer::builder()
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .env("WEFT_RATE_LIMIT__PER_SECOND", "1")
        .env("WEFT_RATE_LIMIT__BURST", "3")
        .start()
        .await;

    // Setup requests may themselves be limited: retry politely.
    async fn retrying(c: &Client, path: &str, body: Value) -> (u16, Value) {
        for _ in 0..20 {
            let got = c.post(path, body.clone()).await;
            if got.0 != 429 {
                return got;
            }
            let ms = got.1["retry_after_ms"].as_u64().unwrap_or(1000).min(5000);
            tokio::time::sleep(Duration::from_millis(ms + 50)).await;
        }
        panic!("still rate limited after 20 retries");
    }
    let anon = server.anon();
    let (st, first) = retrying(
        &anon,
        "register",
        json!({"username": "alice", "password": "a-good-long-password"}),
    )
    .await;
    assert_eq!(st, 401, "{first}");
    let (st, reg) = retrying(
        &anon,
        "register",
        json!({"username": "alice", "password": "a-good-long-password",
               "auth": {"type": "m.login.dummy", "session": first["session"]}}),
    )
    .await;
    assert_eq!(st, 200, "{reg}");
    let alice = server.with_token(reg["access_token"].as_str().unwrap());
    let (st, cr) = retrying(&alice, "createRoom", json!({"preset": "private_chat"})).await;
    assert_eq!(st, 200, "{cr}");
    let room = cr["room_id"].as_str().unwrap().to_string();

    // Let the bucket refill, then fire 12 sends back to back.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut results = Vec::new();
    for i in 0..12 {
        results.push(
            alice
                .send_raw(
                    &room,
                    "m.room.message",
                    &format!("rl-{i}"),
                    json!({"msgtype": "m.text", "body": "x"}),
                )
                .await,
        );
    }
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<&(u16, Value)> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(
        results[0].0, 200,
        "first request after idle should pass: {}",
        results[0].1
    );
    assert!(
        !limited.is_empty(),
        "no 429 in 12 back-to-back requests with burst 3, per_second 1"
    );
    assert!(
        (2..=6).contains(&ok),
        "burst 3 should let roughly 3 of 12 instant requests through, got {ok}"
    );
    assert_eq!(ok + limited.len(), 12, "unexpected statuses: {results:?}");
    let (_, body) = limited[0];
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
    let retry = body["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("429 without integer retry_after_ms: {body}"));
    assert!(
        retry > 0 && retry <= 5000,
        "retry_after_ms {retry} not plausible for 1/s"
    );

    // After waiting as told, a request passes.
    tokio::time::sleep(Duration::from_millis(retry + 100)).await;
    let got = alice
        .send_raw(
            &room,
            "m.room.message",
            "rl-after",
            json!({"msgtype": "m.text", "body": "x"}),
        )
        .await;
    assert_eq!(got.0, 200, "request after retry_after_ms still refused: {}", got.1);

    // Only the accepted sends are in the room.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (st, page) = alice
        .get(&format!("rooms/{}/messages?dir=b&limit=50", enc(&room)))
        .await;
    assert_eq!(st, 200, "{page}");
    let msgs = of_type(page["chunk"].as_array().unwrap(), "m.room.message");
    assert_eq!(msgs.len(), ok + 1, "429'd sends must not create events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_disabled() {
    let server = TestServer::builder()
        .env("WEFT_REGISTRATION__MODE", "disabled")
        .start()
        .await;
    let got = server
        .anon()
        .post(
            "register",
            json!({"username": "alice", "password": "a-good-long-password"}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = server
        .anon()
        .post(
            "register",
            json!({"username": "alice", "password": "a-good-long-password", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_err(&got, 403, "M_FORBIDDEN");
    // And the user was not created.
    let (st, r) = server.login_raw("alice", "a-good-long-password").await;
    assert_eq!(st, 403, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_token_mode() {
    let server = TestServer::builder()
        .env("WEFT_REGISTRATION__MODE", "token")
        .env("WEFT_REGISTRATION__TOKENS", r#"["tok1"]"#)
        .start()
        .await;
    let anon = server.anon();

    // The token check, where the spec puts it (v1) and under the other prefixes.
    for prefix in ["/_matrix/client/v1", "/_matrix/client/v3", "/_matrix/client/r0"] {
        let path = format!("{prefix}/register/m.login.registration_token/validity");
        let (st, r) = anon.get(&format!("{path}?token=tok1")).await;
        assert_eq!((st, r.clone()), (200, json!({"valid": true})), "{path}: {r}");
        let (st, r) = anon.get(&format!("{path}?token=tok2")).await;
        assert_eq!((st, r.clone()), (200, json!({"valid": false})), "{path}: {r}");
        assert_err(&anon.get(&path).await, 400, "M_MISSING_PARAM");
    }

    let body = json!({"username": "alice", "password": "a-good-long-password"});
    let (st, uia) = anon.post("register", body.clone()).await;
    assert_eq!(st, 401, "{uia}");
    let flows = uia["flows"].as_array().unwrap_or_else(|| panic!("no flows: {uia}"));
    assert!(
        flows.iter().all(|f| f["stages"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("m.login.registration_token")))),
        "every flow must require m.login.registration_token: {uia}"
    );
    assert!(
        !flows.iter().any(|f| f["stages"] == json!(["m.login.dummy"])),
        "token mode must not offer dummy-only registration: {uia}"
    );
    let session = uia["session"].as_str().expect("session").to_string();

    // Dummy alone is refused.
    let mut b = body.clone();
    b["auth"] = json!({"type": "m.login.dummy", "session": session});
    let (st, r) = anon.post("register", b).await;
    assert!(st == 401 || st == 403, "dummy auth in token mode: {st} {r}");
    assert!(r["access_token"].is_null(), "registered without a token: {r}");

    // A token stage without its token: the UIA 401 again, flows included.
    let mut b = body.clone();
    b["auth"] = json!({"type": "m.login.registration_token", "session": session});
    let (st, r) = anon.post("register", b).await;
    assert_eq!(st, 401, "token stage without a token: {r}");
    assert!(r["flows"].is_array() && r["session"].is_string(), "{r}");
    assert!(r["access_token"].is_null(), "{r}");

    // Wrong token refused.
    let mut b = body.clone();
    b["auth"] = json!({"type": "m.login.registration_token", "token": "wrong", "session": session});
    let (st, r) = anon.post("register", b).await;
    assert!(st == 401 || st == 403, "wrong token: {st} {r}");
    assert!(
        r["access_token"].is_null() && r["user_id"].is_null(),
        "wrong registration token accepted: {r}"
    );
    if st == 401 {
        assert!(
            r["errcode"].is_string(),
            "failed UIA stage should carry an errcode: {r}"
        );
    }
    let (st, _) = server.login_raw("alice", "a-good-long-password").await;
    assert_eq!(st, 403, "alice must not exist after a wrong-token attempt");

    // Right token works (the session may have been used; start fresh if needed).
    let mut b = body.clone();
    b["auth"] = json!({"type": "m.login.registration_token", "token": "tok1", "session": session});
    let (mut st, mut r) = anon.post("register", b).await;
    if st == 401 && r["session"].is_string() && r["session"] != json!(session) {
        let mut b = body.clone();
        b["auth"] = json!({"type": "m.login.registration_token", "token": "tok1", "session": r["session"]});
        (st, r) = anon.post("register", b).await;
    }
    assert_eq!(st, 200, "right registration token refused: {r}");
    assert_eq!(r["user_id"], server.user_id("alice").as_str());
    let alice = server.with_token(r["access_token"].as_str().expect("access_token"));
    let (st, who) = alice.whoami().await;
    assert_eq!((st, who["user_id"].clone()), (200, json!(server.user_id("alice"))));
    // And login works.
    let (st, r) = server.login_raw("alice", "a-good-long-password").await;
    assert_eq!(st, 200, "{r}");
}

/// An event over the spec's 64 KiB PDU limit is `413 M_TOO_LARGE`, not a
/// 500, whether its content alone is too large or only the whole PDU is;
/// as a message and as state; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_64k_are_413_too_large() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let before = alice.all_messages(&room).await.len();
    // 65 KiB of content; and content of 65 300 bytes, under the limit
    // alone but over it once the envelope and signature are added.
    for (i, n) in [65 * 1024, 65_300].into_iter().enumerate() {
        let content = json!({"msgtype": "m.text", "body": "x".repeat(n)});
        let got = alice
            .send_raw(&room, "m.room.message", &format!("big{i}"), content.clone())
            .await;
        assert_err(&got, 413, "M_TOO_LARGE");
        let got = alice
            .put(&format!("rooms/{}/state/org.weft.big/k{i}", enc(&room)), content)
            .await;
        assert_err(&got, 413, "M_TOO_LARGE");
        let got = alice
            .get(&format!("rooms/{}/state/org.weft.big/k{i}", enc(&room)))
            .await;
        assert_err(&got, 404, "M_NOT_FOUND");
    }
    assert_eq!(alice.all_messages(&room).await.len(), before, "nothing stored");
    // Just under the limit still goes through.
    alice
        .send(
            &room,
            "m.room.message",
            "fits",
            json!({"msgtype": "m.text", "body": "y".repeat(60_000)}),
        )
        .await;
}

/// Event types and state keys the spec's size limits or common sense
/// forbid (control characters, NUL) are refused with 400 M_INVALID_PARAM;
/// `+`, `#` and `/` are allowed (the spec does not forbid them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_types_and_state_keys_are_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let before = alice.all_messages(&room).await.len();
    let long = "t".repeat(256);
    for (i, t) in ["org.x\u{0}y", "org.x\ny", "a\u{7f}", "b\u{85}", long.as_str()]
        .into_iter()
        .enumerate()
    {
        let got = alice.send_raw(&room, t, &format!("bad{i}"), json!({})).await;
        assert_err(&got, 400, "M_INVALID_PARAM");
        let got = alice
            .put(&format!("rooms/{}/state/{}/k", enc(&room), enc(t)), json!({}))
            .await;
        assert_err(&got, 400, "M_INVALID_PARAM");
        let got = alice
            .put(&format!("rooms/{}/state/org.weft.ok/{}", enc(&room), enc(t)), json!({}))
            .await;
        assert_err(&got, 400, "M_INVALID_PARAM");
    }
    assert_eq!(alice.all_messages(&room).await.len(), before, "nothing stored");
    alice.send(&room, "org.x+y#z/w", "ok", json!({})).await;
    let (st, body) = alice
        .put(
            &format!("rooms/{}/state/org.weft.ok/{}", enc(&room), enc("k:1/+#")),
            json!({"v": 1}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
}

/// A /createRoom body of the wrong shape is `M_BAD_JSON`; well-formed but
/// unknown options are `M_INVALID_PARAM` (or the room version's own
/// error); none of them creates a room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room_bad_bodies() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for body in [
        json!({"name": 5}),
        json!({"invite": "@bob:x"}),
        json!({"invite": ["not a user id"]}),
        json!({"initial_state": [{"state_key": "", "content": {}}]}),
        json!({"initial_state": [{"type": "org.weft.x", "content": {"f": 1.5}}]}),
        json!({"creation_content": [1]}),
        json!({"power_level_content_override": "all"}),
        json!({"is_direct": "yes"}),
        json!([]),
    ] {
        let got = alice.post("createRoom", body.clone()).await;
        assert_err(&got, 400, "M_BAD_JSON");
        assert!(got.1["error"].is_string(), "{body}: {}", got.1);
    }
    for body in [
        json!({"preset": "secret_chat"}),
        json!({"visibility": "hidden"}),
        json!({"room_alias_name": "has space"}),
    ] {
        let got = alice.post("createRoom", body.clone()).await;
        assert_err(&got, 400, "M_INVALID_PARAM");
    }
    let got = alice.post("createRoom", json!({"room_version": "999"})).await;
    assert_err(&got, 400, "M_UNSUPPORTED_ROOM_VERSION");
    let (st, rooms) = alice.get("joined_rooms").await;
    assert_eq!((st, rooms), (200, json!({"joined_rooms": []})));
}

/// Bad query parameters of the read endpoints are 400 `M_INVALID_PARAM`
/// (never a 500); a bad `/sync` filter is `M_BAD_JSON` (inline filter that
/// is not JSON or not a filter) or `M_INVALID_PARAM` (unknown filter ID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_parameter_errors() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let eid = alice.send_text(&room, "t1", "hello").await;
    let r = enc(&room);
    let e = enc(&eid);

    for q in [
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "dir=x",
        "dir=backwards",
        "dir=b&from=garbage",
        // Below zero is history fetched from other servers (backfill):
        // valid; the smallest position is not.
        "from=s-9223372036854775808",
        "from=s--5",
        "dir=f&to=nope",
        "filter=%7Bnot-json",
        "filter=%5B1%2C2%5D",
    ] {
        let got = alice.get(&format!("rooms/{r}/messages?{q}")).await;
        assert_err(&got, 400, "M_INVALID_PARAM");
        assert!(
            got.1["error"].as_str().is_some_and(|m| !m.is_empty()),
            "/messages?{q}: error without a message: {}",
            got.1
        );
    }
    for q in ["limit=abc", "limit=-3", "filter=%7Bnot-json"] {
        let got = alice.get(&format!("rooms/{r}/context/{e}?{q}")).await;
        assert_err(&got, 400, "M_INVALID_PARAM");
    }
    let got = alice.get(&format!("rooms/{r}/context/not-an-event-id")).await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    for param in [("timeout", "abc"), ("timeout", "-1"), ("full_state", "maybe")] {
        let got = alice.sync_params(&[param]).await;
        assert_err(&got, 400, "M_INVALID_PARAM");
    }
    // Inline filters: not JSON, JSON but not a filter.
    for f in [
        "{not json",
        r#"{"room":{"timeline":{"limit":"many"}}}"#,
        r#"{"room": 7}"#,
    ] {
        let got = alice.sync_params(&[("timeout", "0"), ("filter", f)]).await;
        assert_err(&got, 400, "M_BAD_JSON");
    }
    // A filter ID nobody uploaded.
    let got = alice.sync_params(&[("timeout", "0"), ("filter", "12345")]).await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    // And a good inline filter still works.
    let (st, s) = alice
        .sync_params(&[("timeout", "0"), ("filter", r#"{"room":{"timeline":{"limit":1}}}"#)])
        .await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(timeline(&s, &room).len(), 1, "{s}");
}
