//! The application-service API (docs/appservices.md) against the real
//! binary: the "service" is a small axum server in the test process that
//! records the transactions, pings and queries Weft sends it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const AS_TOKEN: &str = "as-secret-token-1";
const HS_TOKEN: &str = "hs-secret-token-1";

#[derive(Default)]
struct Seen {
    /// (txn ID, body) of every transaction accepted, in arrival order.
    txns: Vec<(String, Value)>,
    /// Transactions refused while down.
    refused: usize,
    pings: Vec<Value>,
    /// Paths of the queries (`rooms/…`, `users/…`).
    queries: Vec<String>,
    /// Requests with the wrong `Authorization`.
    bad_auth: usize,
}

#[derive(Clone)]
struct Shared {
    seen: Arc<Mutex<Seen>>,
    down: Arc<AtomicBool>,
    /// The homeserver's base URL: when set, a query for
    /// `#_bridge_made:localhost` creates that room (as the service's
    /// sender) before answering 200.
    homeserver: Arc<Mutex<Option<String>>>,
}

/// The test's application service.
struct Service {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

fn authorized(h: &HeaderMap, shared: &Shared) -> bool {
    let ok = h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {HS_TOKEN}"));
    if !ok {
        shared.seen.lock().unwrap().bad_auth += 1;
    }
    ok
}

async fn transaction(
    State(s): State<Shared>,
    UrlPath(txn): UrlPath<String>,
    h: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&h, &s) {
        return (StatusCode::FORBIDDEN, Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    if s.down.load(Ordering::SeqCst) {
        s.seen.lock().unwrap().refused += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
    }
    s.seen.lock().unwrap().txns.push((txn, body));
    (StatusCode::OK, Json(json!({})))
}

async fn ping(State(s): State<Shared>, h: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if !authorized(&h, &s) {
        return (StatusCode::FORBIDDEN, Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    if s.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"down": true})));
    }
    s.seen.lock().unwrap().pings.push(body);
    (StatusCode::OK, Json(json!({})))
}

async fn query_room(State(s): State<Shared>, UrlPath(alias): UrlPath<String>, h: HeaderMap) -> StatusCode {
    if !authorized(&h, &s) {
        return StatusCode::FORBIDDEN;
    }
    s.seen.lock().unwrap().queries.push(format!("rooms/{alias}"));
    let hs = s.homeserver.lock().unwrap().clone();
    if let Some(hs) = hs
        && alias == "#_bridge_made:localhost"
    {
        let made = reqwest::Client::new()
            .post(format!("{hs}/_matrix/client/v3/createRoom"))
            .bearer_auth(AS_TOKEN)
            .json(&json!({"room_alias_name": "_bridge_made", "preset": "public_chat"}))
            .send()
            .await
            .map(|r| r.status().is_success());
        if made.unwrap_or(false) {
            return StatusCode::OK;
        }
    }
    StatusCode::NOT_FOUND
}

async fn query_user(State(s): State<Shared>, UrlPath(user): UrlPath<String>, h: HeaderMap) -> StatusCode {
    if !authorized(&h, &s) {
        return StatusCode::FORBIDDEN;
    }
    s.seen.lock().unwrap().queries.push(format!("users/{user}"));
    StatusCode::NOT_FOUND
}

async fn tp_protocol(State(s): State<Shared>, UrlPath(p): UrlPath<String>, h: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorized(&h, &s) || p != "test" {
        return (StatusCode::NOT_FOUND, Json(json!({"errcode": "M_NOT_FOUND"})));
    }
    (
        StatusCode::OK,
        Json(json!({
            "user_fields": ["nick"], "location_fields": ["channel"], "icon": "mxc://localhost/icon",
            "field_types": {
                "nick": {"regexp": ".*", "placeholder": "nick"},
                "channel": {"regexp": "#.*", "placeholder": "#channel"}
            },
            "instances": [{"desc": "Test net", "fields": {}, "network_id": "testnet"}]
        })),
    )
}

async fn tp_location(
    State(s): State<Shared>,
    UrlPath(p): UrlPath<String>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    h: HeaderMap,
) -> Json<Value> {
    authorized(&h, &s);
    Json(json!([{"alias": "#_bridge_chan:localhost", "protocol": p, "fields": q}]))
}

async fn tp_user(
    State(s): State<Shared>,
    UrlPath(p): UrlPath<String>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    h: HeaderMap,
) -> Json<Value> {
    authorized(&h, &s);
    Json(json!([{"userid": "@_bridge_nick:localhost", "protocol": p, "fields": q}]))
}

async fn tp_location_by_alias(
    State(s): State<Shared>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    h: HeaderMap,
) -> Json<Value> {
    authorized(&h, &s);
    Json(json!([{"alias": q.get("alias"), "protocol": "test", "fields": {"channel": "#chan"}}]))
}

async fn tp_user_by_id(
    State(s): State<Shared>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    h: HeaderMap,
) -> Json<Value> {
    authorized(&h, &s);
    Json(json!([{"userid": q.get("userid"), "protocol": "test", "fields": {"nick": "nick"}}]))
}

impl Service {
    async fn start() -> Service {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared {
            seen: Arc::default(),
            down: Arc::default(),
            homeserver: Arc::default(),
        };
        let app = Router::new()
            .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
            .route("/_matrix/app/v1/ping", post(ping))
            .route("/_matrix/app/v1/rooms/{alias}", get(query_room))
            .route("/_matrix/app/v1/users/{user}", get(query_user))
            .route("/_matrix/app/v1/thirdparty/protocol/{p}", get(tp_protocol))
            .route("/_matrix/app/v1/thirdparty/location/{p}", get(tp_location))
            .route("/_matrix/app/v1/thirdparty/user/{p}", get(tp_user))
            .route("/_matrix/app/v1/thirdparty/location", get(tp_location_by_alias))
            .route("/_matrix/app/v1/thirdparty/user", get(tp_user_by_id))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Service { addr, shared, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Every transaction body once per transaction ID (a repeated ID must
    /// carry the same body), in arrival order.
    fn transactions(&self) -> Vec<Value> {
        let seen = self.shared.seen.lock().unwrap();
        let mut out: Vec<(String, Value)> = Vec::new();
        for (id, body) in &seen.txns {
            match out.iter().find(|(i, _)| i == id) {
                Some((_, first)) => assert_eq!(first, body, "transaction {id} sent again with another body"),
                None => out.push((id.clone(), body.clone())),
            }
        }
        out.into_iter().map(|(_, b)| b).collect()
    }

    /// The events of every transaction, each transaction counted once.
    fn events(&self) -> Vec<Value> {
        self.transactions()
            .iter()
            .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn ephemeral(&self) -> Vec<Value> {
        self.transactions()
            .iter()
            .flat_map(|b| b["ephemeral"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until `done(self)` holds, up to `secs`.
    async fn wait_for(&self, secs: u64, what: &str, done: impl Fn(&Service) -> bool) {
        let until = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A registration in Synapse's format: users `@_bridge_.*` (exclusive),
/// aliases `#_bridge_.*` (exclusive), sender `bridgebot`.
fn registration(url: Option<&str>, extra: &str) -> String {
    let url = url.map(|u| format!("{u:?}")).unwrap_or_else(|| "null".into());
    format!(
        r##"# a bridge
id: "testbridge"
url: {url}
as_token: "{AS_TOKEN}"
hs_token: "{HS_TOKEN}"
sender_localpart: "bridgebot"
namespaces:
  users:
    - exclusive: true
      regex: "@_bridge_.*:localhost"
  aliases:
    - exclusive: true
      regex: "#_bridge_.*:localhost"
  rooms: []
rate_limited: false
protocols: ["test"]
{extra}
"##
    )
}

/// A server with the registration written to a file of `dir`, retrying a
/// failed transaction after 100 ms, up to 400 ms.
async fn server_with(dir: &tempfile::TempDir, reg: &str) -> TestServer {
    server_builder(dir, reg)
        .env("WEFT_APPSERVICE__RETRY_INITIAL_MS", "100")
        .env("WEFT_APPSERVICE__RETRY_MAX_MS", "400")
        .start()
        .await
}

/// A server with the registration written to a file of `dir`, the
/// default configuration otherwise.
fn server_builder(dir: &tempfile::TempDir, reg: &str) -> TestServerBuilder {
    let path = dir.path().join("bridge.yaml");
    std::fs::write(&path, reg).unwrap();
    TestServer::builder().server_name("localhost").env(
        "WEFT_APPSERVICE__REGISTRATION_FILES",
        &format!("[{:?}]", path.display().to_string()),
    )
}

/// The service's own client (its `as_token`), as its sender or, with
/// `user`, masquerading.
fn as_client(server: &TestServer) -> Client {
    server.with_token(AS_TOKEN)
}

/// Registers `localpart` through the service (`m.login.application_service`).
async fn as_register(server: &TestServer, localpart: &str) -> (u16, Value) {
    as_client(server)
        .post(
            "register",
            json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true}),
        )
        .await
}

/// The body of a request that must succeed (`200`).
#[track_caller]
fn ok((status, body): (u16, Value)) -> Value {
    assert_eq!(status, 200, "{body}");
    body
}

/// `@_bridge_bob:localhost` joins `room`, through the service.
async fn bob_joins(server: &TestServer, room: &str) {
    ok(as_client(server)
        .post(
            &format!("join/{}?user_id=%40_bridge_bob%3Alocalhost", enc(room)),
            json!({}),
        )
        .await);
}

#[tokio::test]
async fn registration_file_errors_are_reported_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let bin = weft_testkit::weft_bin();
    let run = |files: &[&std::path::Path]| {
        let list: Vec<String> = files.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
        let out = std::process::Command::new(&bin)
            .args(["appservice", "list", "--data-dir"])
            .arg(data.path())
            .env("WEFT_APPSERVICE__REGISTRATION_FILES", format!("[{}]", list.join(",")))
            .env("WEFT_SERVER_NAME", "localhost")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, registration(Some("http://127.0.0.1:9"), "")).unwrap();
    let (ok, out) = run(&[&good]);
    assert!(ok, "a valid registration is listed: {out}");
    assert!(
        out.contains("testbridge") && out.contains("@bridgebot:localhost"),
        "{out}"
    );
    assert!(out.contains("@_bridge_.*:localhost (exclusive)"), "{out}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "id: [unclosed\nas_token: x\n").unwrap();
    let (ok, out) = run(&[&bad]);
    assert!(!ok, "a malformed file must fail: {out}");
    assert!(
        out.contains("bad.yaml") && out.contains("not a valid registration"),
        "{out}"
    );

    let no_token = dir.path().join("no_token.yaml");
    std::fs::write(&no_token, "id: x\nurl: null\nhs_token: h\nsender_localpart: s\n").unwrap();
    let (ok, out) = run(&[&no_token]);
    assert!(
        !ok && out.contains("no_token.yaml") && out.contains("as_token"),
        "{out}"
    );

    let bad_regex = dir.path().join("bad_regex.yaml");
    std::fs::write(
        &bad_regex,
        registration(None, "").replace("@_bridge_.*:localhost", "@_bridge_(:localhost"),
    )
    .unwrap();
    let (ok, out) = run(&[&bad_regex]);
    assert!(!ok && out.contains("invalid regex"), "{out}");

    let twin = dir.path().join("twin.yaml");
    std::fs::write(
        &twin,
        registration(None, "")
            .replace(AS_TOKEN, "other-as")
            .replace(HS_TOKEN, "other-hs"),
    )
    .unwrap();
    let (ok, out) = run(&[&good, &twin]);
    assert!(
        !ok && out.contains("twin.yaml") && out.contains("id is also the id"),
        "{out}"
    );

    let same_token = dir.path().join("same_token.yaml");
    std::fs::write(
        &same_token,
        registration(None, "")
            .replace("testbridge", "other")
            .replace(HS_TOKEN, "other-hs"),
    )
    .unwrap();
    let (ok, out) = run(&[&good, &same_token]);
    assert!(!ok && out.contains("as_token is also the as_token"), "{out}");
}

#[tokio::test]
async fn masquerading_exclusive_namespaces_register_login_and_ts() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(None, "")).await;
    let asc = as_client(&server);

    // The sender exists implicitly.
    let (status, me) = asc.get("account/whoami").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user_id"], "@bridgebot:localhost");

    // Masquerading outside the namespace, or as a namespaced user not
    // registered yet, is refused.
    let (status, body) = asc.get("account/whoami?user_id=%40alice%3Alocalhost").await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    let (status, body) = asc.get("account/whoami?user_id=%40_bridge_bob%3Alocalhost").await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");

    // Registering through the service, inside and outside its namespace.
    let body = ok(as_register(&server, "_bridge_bob").await);
    assert_eq!(body["user_id"], "@_bridge_bob:localhost");
    assert_err(&as_register(&server, "carol").await, 400, "M_EXCLUSIVE");
    // Without the service's token, the type needs one.
    let (status, body) = server
        .anon()
        .post(
            "register",
            json!({"type": "m.login.application_service", "username": "_bridge_x"}),
        )
        .await;
    assert_err(&(status, body), 401, "M_MISSING_TOKEN");

    // Now masquerading as the registered user works.
    let (status, me) = asc.get("account/whoami?user_id=%40_bridge_bob%3Alocalhost").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user_id"], "@_bridge_bob:localhost");
    // Without MSC4190 in the registration, a missing device is not made.
    let (status, body) = asc
        .put(
            "devices/NOPE?user_id=%40_bridge_bob%3Alocalhost",
            json!({"display_name": "x"}),
        )
        .await;
    assert_err(&(status, body), 404, "M_NOT_FOUND");

    // A person cannot take a name in the exclusive namespace...
    let (status, body) = server
        .anon()
        .post(
            "register",
            json!({"username": "_bridge_eve", "password": "a-long-password-1"}),
        )
        .await;
    assert_err(&(status, body), 400, "M_EXCLUSIVE");
    let (status, body) = server.anon().get("register/available?username=_bridge_eve").await;
    assert_err(&(status, body), 400, "M_EXCLUSIVE");
    let (status, body) = server.anon().get("register/available?username=eve").await;
    assert_eq!((status, body["available"].clone()), (200, json!(true)), "{body}");
    // ...nor an alias in its exclusive alias namespace.
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let (status, body) = alice
        .put(
            &format!("directory/room/{}", enc("#_bridge_room:localhost")),
            json!({"room_id": room}),
        )
        .await;
    assert_err(&(status, body), 400, "M_EXCLUSIVE");
    let (status, body) = alice
        .post("createRoom", json!({"room_alias_name": "_bridge_other"}))
        .await;
    assert_err(&(status, body), 400, "M_EXCLUSIVE");
    // Other names and aliases are free.
    ok(alice
        .put(
            &format!("directory/room/{}", enc("#plain:localhost")),
            json!({"room_id": room}),
        )
        .await);

    // Login of a namespaced user by the service.
    let body = ok(asc
        .post(
            "login",
            json!({"type": "m.login.application_service",
                   "identifier": {"type": "m.id.user", "user": "_bridge_bob"}}),
        )
        .await);
    let bob = server.with_token(body["access_token"].as_str().unwrap());
    let (status, me) = bob.whoami().await;
    assert_eq!(status, 200);
    assert_eq!(me["user_id"], "@_bridge_bob:localhost");
    // Not for users outside its namespace, nor without its token.
    let (status, body) = asc
        .post(
            "login",
            json!({"type": "m.login.application_service",
                   "identifier": {"type": "m.id.user", "user": "alice"}}),
        )
        .await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    let (status, body) = server
        .anon()
        .post(
            "login",
            json!({"type": "m.login.application_service",
                   "identifier": {"type": "m.id.user", "user": "_bridge_bob"}}),
        )
        .await;
    assert_err(&(status, body), 401, "M_MISSING_TOKEN");
    let (_, flows) = server.anon().get("login").await;
    assert!(
        flows["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["type"] == "m.login.application_service"),
        "{flows}"
    );

    // Timestamp massaging: the service's `?ts=` is the event's
    // origin_server_ts; a person's is ignored.
    let bob_as = "user_id=%40_bridge_bob%3Alocalhost";
    ok(asc.post(&format!("join/{}?{bob_as}", enc(&room)), json!({})).await);
    let body = ok(asc
        .put(
            &format!("rooms/{}/send/m.room.message/t1?{bob_as}&ts=1234567890", enc(&room)),
            json!({"msgtype": "m.text", "body": "old news"}),
        )
        .await);
    let event_id = body["event_id"].as_str().unwrap().to_owned();
    let (status, ev) = alice
        .get(&format!("rooms/{}/event/{}", enc(&room), enc(&event_id)))
        .await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["origin_server_ts"], 1234567890);
    assert_eq!(ev["sender"], "@_bridge_bob:localhost");
    let body = ok(alice
        .put(
            &format!("rooms/{}/send/m.room.message/t2?ts=1234567890", enc(&room)),
            json!({"msgtype": "m.text", "body": "now"}),
        )
        .await);
    let (_, ev) = alice
        .get(&format!(
            "rooms/{}/event/{}",
            enc(&room),
            enc(body["event_id"].as_str().unwrap())
        ))
        .await;
    assert_ne!(ev["origin_server_ts"], 1234567890);

    // A deactivated user of the namespace cannot be acted as.
    let (ok, out, err) = server.cli("user", "deactivate", &["_bridge_bob"]);
    assert!(ok, "{out}{err}");
    let (status, body) = asc.get(&format!("account/whoami?{bob_as}")).await;
    assert_err(&(status, body), 403, "M_USER_DEACTIVATED");

    // A wrong token is still an unknown token.
    let (status, body) = server.with_token("not-the-as-token").get("account/whoami").await;
    assert_err(&(status, body), 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn ping_reaches_the_service() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "")).await;
    let asc = as_client(&server);
    let body = ok(asc
        .post(
            "/_matrix/client/v1/appservice/testbridge/ping",
            json!({"transaction_id": "ping-1"}),
        )
        .await);
    assert!(body["duration_ms"].is_u64(), "{body}");
    {
        let seen = service.shared.seen.lock().unwrap();
        assert_eq!(seen.pings, vec![json!({"transaction_id": "ping-1"})]);
        assert_eq!(seen.bad_auth, 0);
    }
    // Another service's ID, or no service token.
    let (status, body) = asc
        .post("/_matrix/client/v1/appservice/someone-else/ping", json!({}))
        .await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    let alice = server.register("alice").await;
    let (status, body) = alice
        .post("/_matrix/client/v1/appservice/testbridge/ping", json!({}))
        .await;
    assert_err(&(status, body), 401, "M_UNKNOWN_TOKEN");
    // The service failing: the spec's error, with its status and body.
    service.set_down(true);
    let (status, body) = asc
        .post("/_matrix/client/v1/appservice/testbridge/ping", json!({}))
        .await;
    assert_eq!(body["status"], 503, "{body}");
    assert!(body["body"].as_str().unwrap().contains("down"), "{body}");
    assert_err(&(status, body), 502, "M_BAD_STATUS");
}

#[tokio::test]
async fn ping_without_url_is_url_not_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(None, "")).await;
    let (status, body) = as_client(&server)
        .post("/_matrix/client/v1/appservice/testbridge/ping", json!({}))
        .await;
    assert_err(&(status, body), 400, "M_URL_NOT_SET");
}

/// 1,000 events in order without duplicates; then an outage of the
/// service (Weft backs off and retries the same transaction) and a Weft
/// restart in the middle of it: nothing lost, nothing twice.
#[tokio::test]
async fn events_are_delivered_in_order_across_outage_and_restart() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = server_with(&dir, &registration(Some(&service.url()), "")).await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    // An unrelated room the service must not hear of.
    let private = alice.create_room(json!({})).await;
    bob_joins(&server, &room).await;

    let mut sent = Vec::new();
    for i in 0..1000 {
        sent.push(alice.send_text(&room, &format!("a{i}"), &format!("reading {i}")).await);
        if i % 100 == 0 {
            alice.send_text(&private, &format!("p{i}"), "not for the bridge").await;
        }
    }
    let messages = |s: &Service| -> Vec<String> {
        s.events()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    service
        .wait_for(60, "1,000 events", |s| messages(s).len() >= 1000)
        .await;
    assert_eq!(messages(&service), sent, "every event once, in stream order");
    let all = service.events();
    assert!(all.iter().all(|e| e["room_id"] == room), "only the bridged room");
    assert!(
        all.iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == "@_bridge_bob:localhost"),
        "the bridge user's join is delivered"
    );
    assert!(service.transactions().len() >= 10, "at most 100 events per transaction");
    assert_eq!(service.shared.seen.lock().unwrap().bad_auth, 0);

    // The service goes down; Weft keeps retrying the same transaction.
    service.set_down(true);
    for i in 0..50 {
        sent.push(
            alice
                .send_text(&room, &format!("b{i}"), &format!("during outage {i}"))
                .await,
        );
    }
    service
        .wait_for(20, "retries while down", |s| s.shared.seen.lock().unwrap().refused >= 3)
        .await;
    // Weft stops in the middle of the outage and comes back.
    server.kill();
    server.restart().await;
    let alice = server.login("alice", &TestServer::default_password("alice")).await;
    for i in 0..50 {
        sent.push(
            alice
                .send_text(&room, &format!("c{i}"), &format!("after restart {i}"))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out, err) = server.cli("appservice", "list", &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("testbridge") && out.contains("last_error"), "{out}");
    assert!(out.contains("503"), "the outage shows as the last error: {out}");
    service.set_down(false);
    service
        .wait_for(60, "everything after the outage", |s| messages(s).len() >= 1100)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages(&service), sent, "nothing lost, nothing twice, in order");
}

#[tokio::test]
async fn ephemeral_events_are_delivered_when_asked_for() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(
        &dir,
        &registration(Some(&service.url()), "de.sorunome.msc2409.push_ephemeral: true"),
    )
    .await;
    let asc = as_client(&server);
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob_joins(&server, &room).await;
    let event_id = alice.send_text(&room, "m1", "hello bridge").await;
    ok(alice
        .put(
            &format!("rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
            json!({"typing": true, "timeout": 30000}),
        )
        .await);
    ok(alice
        .post(
            &format!("rooms/{}/receipt/m.read/{}", enc(&room), enc(&event_id)),
            json!({}),
        )
        .await);
    service
        .wait_for(20, "typing and receipt", |s| {
            let eph = s.ephemeral();
            eph.iter().any(|e| e["type"] == "m.typing") && eph.iter().any(|e| e["type"] == "m.receipt")
        })
        .await;
    let eph = service.ephemeral();
    let typing = eph.iter().find(|e| e["type"] == "m.typing").unwrap();
    assert_eq!(typing["room_id"], room);
    assert_eq!(typing["content"]["user_ids"], json!([alice.user_id]));
    let receipt = eph.iter().find(|e| e["type"] == "m.receipt").unwrap();
    assert!(
        receipt["content"][&event_id]["m.read"][&alice.user_id]["ts"].is_u64(),
        "{receipt}"
    );
    // To-device messages for a device of a namespaced user (MSC2409 /
    // MSC4203).
    ok(asc
        .post(
            "login",
            json!({"type": "m.login.application_service", "device_id": "BOBPHONE",
                   "identifier": {"type": "m.id.user", "user": "_bridge_bob"}}),
        )
        .await);
    ok(alice
        .put(
            "sendToDevice/m.test.ping/td1",
            json!({"messages": {"@_bridge_bob:localhost": {"BOBPHONE": {"hello": "bob"}}}}),
        )
        .await);
    service
        .wait_for(20, "the to-device message", |s| {
            s.transactions()
                .iter()
                .any(|t| t.get("de.sorunome.msc2409.to_device").is_some())
        })
        .await;
    let to_device: Vec<Value> = service
        .transactions()
        .iter()
        .flat_map(|t| {
            t["de.sorunome.msc2409.to_device"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        to_device,
        vec![
            json!({"type": "m.test.ping", "sender": alice.user_id, "content": {"hello": "bob"},
                     "to_user_id": "@_bridge_bob:localhost", "to_device_id": "BOBPHONE"})
        ]
    );
    // The unstable key carries the same.
    let txn = service
        .transactions()
        .into_iter()
        .find(|t| t.get("ephemeral").is_some())
        .unwrap();
    assert_eq!(txn["ephemeral"], txn["de.sorunome.msc2409.ephemeral"]);
}

#[tokio::test]
async fn ephemeral_events_are_not_delivered_unless_asked_for() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "")).await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob_joins(&server, &room).await;
    let (status, _) = alice
        .put(
            &format!("rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
            json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(status, 200);
    let last = alice.send_text(&room, "m1", "after typing").await;
    service
        .wait_for(20, "the message", |s| s.events().iter().any(|e| e["event_id"] == last))
        .await;
    assert!(service.ephemeral().is_empty(), "{:?}", service.ephemeral());
}

#[tokio::test]
async fn unknown_aliases_and_users_in_a_namespace_are_asked_of_the_service() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "")).await;
    *service.shared.homeserver.lock().unwrap() = Some(server.base_url());
    let alice = server.register("alice").await;
    let (status, body) = alice
        .get(&format!("directory/room/{}", enc("#_bridge_chan:localhost")))
        .await;
    assert_err(&(status, body), 404, "M_NOT_FOUND");
    // A service that creates the room when asked: the alias resolves, and
    // joining by it works.
    let body = ok(alice
        .get(&format!("directory/room/{}", enc("#_bridge_made:localhost")))
        .await);
    let made = body["room_id"].as_str().unwrap().to_owned();
    assert_eq!(alice.join("#_bridge_made:localhost").await, made);
    let (status, body) = alice
        .post(&format!("join/{}", enc("#_bridge_chan:localhost")), json!({}))
        .await;
    assert_eq!(status, 404, "{body}");
    // Outside the namespace: not asked.
    let (status, _) = alice.get(&format!("directory/room/{}", enc("#other:localhost"))).await;
    assert_eq!(status, 404);
    let (status, _) = alice
        .get(&format!("profile/{}", enc("@_bridge_nobody:localhost")))
        .await;
    assert_eq!(status, 404);
    let seen = service.shared.seen.lock().unwrap();
    assert!(
        seen.queries.iter().any(|q| q == "rooms/#_bridge_chan:localhost"),
        "{:?}",
        seen.queries
    );
    assert!(!seen.queries.iter().any(|q| q.contains("#other")), "{:?}", seen.queries);
    assert!(
        seen.queries.iter().any(|q| q == "users/@_bridge_nobody:localhost"),
        "{:?}",
        seen.queries
    );
}

/// MSC3202: with `org.matrix.msc3202: true`, a device list change of a
/// user sharing a room with the service's users comes in a transaction;
/// one of a user sharing no such room does not.
#[tokio::test]
async fn device_list_changes_are_delivered_with_msc3202() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "org.matrix.msc3202: true")).await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let loner = server.register("loner").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob_joins(&server, &room).await;
    let keys = |c: &Client| {
        json!({ "device_keys": {
            "user_id": c.user_id,
            "device_id": c.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", c.device_id): "curve-key-of-the-device",
                format!("ed25519:{}", c.device_id): "ed-key-of-the-device",
            },
            "signatures": { c.user_id.as_str(): { format!("ed25519:{}", c.device_id): "the-device-signature" } },
        }})
    };
    ok(loner.post("keys/upload", keys(&loner)).await);
    ok(alice.post("keys/upload", keys(&alice)).await);
    service
        .wait_for(20, "alice's device list change", |s| {
            s.transactions().iter().any(|t| {
                t["org.matrix.msc3202.device_lists"]["changed"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!(alice.user_id)))
            })
        })
        .await;
    let changed: Vec<Value> = service
        .transactions()
        .iter()
        .flat_map(|t| {
            t["org.matrix.msc3202.device_lists"]["changed"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert!(!changed.contains(&json!(loner.user_id)), "{changed:?}");
}

#[tokio::test]
async fn thirdparty_lookups_are_asked_of_the_service() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "")).await;
    let alice = server.register("alice").await;
    let body = ok(alice.get("thirdparty/protocols").await);
    assert_eq!(body["test"]["instances"][0]["network_id"], "testnet", "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let body = ok(alice.get("thirdparty/protocol/test").await);
    assert_eq!(body["location_fields"], json!(["channel"]));
    assert_err(&alice.get("thirdparty/protocol/nope").await, 404, "M_NOT_FOUND");
    let body = ok(alice.get("thirdparty/location/test?channel=%23chan").await);
    assert_eq!(
        body,
        json!([{"alias": "#_bridge_chan:localhost", "protocol": "test", "fields": {"channel": "#chan"}}])
    );
    let body = ok(alice.get("thirdparty/user/test?nick=bob").await);
    assert_eq!(body[0]["fields"], json!({"nick": "bob"}));
    let body = ok(alice
        .get(&format!("thirdparty/location?alias={}", enc("#_bridge_chan:localhost")))
        .await);
    assert_eq!(body[0]["alias"], "#_bridge_chan:localhost");
    // An alias outside every namespace is asked of no one.
    let (status, body) = alice
        .get(&format!("thirdparty/location?alias={}", enc("#other:localhost")))
        .await;
    assert_eq!((status, body), (200, json!([])));
    let body = ok(alice
        .get(&format!("thirdparty/user?userid={}", enc("@_bridge_nick:localhost")))
        .await);
    assert_eq!(body[0]["userid"], "@_bridge_nick:localhost");
    assert_eq!(service.shared.seen.lock().unwrap().bad_auth, 0);
}

/// With `rate_limited: false`, calls with the service's token are not
/// rate-limited, while a person's are.
#[tokio::test]
async fn a_service_that_is_not_rate_limited_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.yaml");
    std::fs::write(&path, registration(None, "")).unwrap();
    let server = TestServer::builder()
        .server_name("localhost")
        .env(
            "WEFT_APPSERVICE__REGISTRATION_FILES",
            &format!("[{:?}]", path.display().to_string()),
        )
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .env("WEFT_RATE_LIMIT__PER_SECOND", "0.1")
        .env("WEFT_RATE_LIMIT__BURST", "5")
        .start()
        .await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let mut limited = 0;
    for _ in 0..15 {
        if alice.whoami().await.0 == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "a person is rate-limited");
    let asc = as_client(&server);
    for i in 0..15 {
        let (status, body) = asc.get("account/whoami?user_id=%40_bridge_bob%3Alocalhost").await;
        assert_eq!(status, 200, "call {i}: {body}");
        let (status, body) = asc.get("account/whoami").await;
        assert_eq!(status, 200, "call {i} as the sender: {body}");
    }
}

/// MSC4190: the service makes and deletes its users' devices (no
/// user-interactive auth); MSC3202: it acts as one of those devices.
#[tokio::test]
async fn device_management_and_device_masquerading() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(None, "io.element.msc4190: true")).await;
    let asc = as_client(&server);
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    // It makes devices itself: logging its users in, or registering one
    // with a login, is refused (as Synapse does), and makes nothing.
    let (status, body) = asc
        .post(
            "login",
            json!({"type": "m.login.application_service", "device_id": "VIALOGIN",
                   "identifier": {"type": "m.id.user", "user": "_bridge_bob"}}),
        )
        .await;
    assert_err(&(status, body), 400, "M_APPSERVICE_LOGIN_UNSUPPORTED");
    let (status, body) = asc
        .post(
            "register",
            json!({"type": "m.login.application_service", "username": "_bridge_carl"}),
        )
        .await;
    assert_err(&(status, body), 400, "M_APPSERVICE_LOGIN_UNSUPPORTED");
    let (status, body) = asc.get("account/whoami?user_id=%40_bridge_carl%3Alocalhost").await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    let bob = "user_id=%40_bridge_bob%3Alocalhost";
    ok(asc
        .put(
            &format!("devices/BRIDGEDEV?{bob}"),
            json!({"display_name": "Bridge device"}),
        )
        .await);
    let body = ok(asc.get(&format!("devices?{bob}")).await);
    let ids: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["BRIDGEDEV"], "{body}");
    assert_eq!(body["devices"][0]["display_name"], "Bridge device");
    let (status, me) = asc
        .get(&format!("account/whoami?{bob}&org.matrix.msc3202.device_id=BRIDGEDEV"))
        .await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["device_id"], "BRIDGEDEV");
    let (status, body) = asc
        .get(&format!("account/whoami?{bob}&org.matrix.msc3202.device_id=OTHER"))
        .await;
    assert_err(&(status, body), 403, "M_FORBIDDEN");
    // Deleting needs no password (the user has none).
    ok(asc.delete(&format!("devices/BRIDGEDEV?{bob}")).await);
    let (_, body) = asc.get(&format!("devices?{bob}")).await;
    assert_eq!(body["devices"], json!([]), "{body}");
    // A person still needs user-interactive auth to delete a device.
    let alice = server.register("alice").await;
    let (status, body) = alice.delete(&format!("devices/{}", alice.device_id)).await;
    assert_eq!(status, 401, "{body}");
}

/// The service is interested in a room while one of its users is in it:
/// an event sent before that user left is delivered even when the reader
/// gets to it only after the leave (here: held up by an outage), and one
/// sent after the leave is not.
#[tokio::test]
async fn events_from_before_a_bridged_user_left_are_still_delivered() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "")).await;
    let asc = as_client(&server);
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let bob = "user_id=%40_bridge_bob%3Alocalhost";
    bob_joins(&server, &room).await;
    let first = alice.send_text(&room, "t0", "before the outage").await;
    service
        .wait_for(20, "the first message", |s| {
            s.events().iter().any(|e| e["event_id"] == first)
        })
        .await;
    service.set_down(true);
    let m1 = alice.send_text(&room, "t1", "while down 1").await;
    service
        .wait_for(20, "a refused transaction", |s| {
            s.shared.seen.lock().unwrap().refused >= 1
        })
        .await;
    let m2 = alice.send_text(&room, "t2", "while down 2").await;
    ok(asc.post(&format!("rooms/{}/leave?{bob}", enc(&room)), json!({})).await);
    let after = alice.send_text(&room, "t3", "after the leave").await;
    let marker = alice.send_text(&room, "t4", "still after").await;
    service.set_down(false);
    service
        .wait_for(30, "bob's leave", |s| {
            s.events()
                .iter()
                .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages: Vec<String> = service
        .events()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, vec![first, m1, m2], "not {after} nor {marker}");
}

impl Service {
    /// The (first) transaction that carries the event `event_id`.
    fn transaction_with(&self, event_id: &str) -> Value {
        self.transactions()
            .into_iter()
            .find(|t| {
                t["events"]
                    .as_array()
                    .is_some_and(|evs| evs.iter().any(|e| e["event_id"] == event_id))
            })
            .unwrap_or_else(|| panic!("no transaction carries {event_id}"))
    }

    async fn wait_for_event(&self, event_id: &str) -> Value {
        self.wait_for(20, event_id, |s| s.events().iter().any(|e| e["event_id"] == event_id))
            .await;
        self.transaction_with(event_id)
    }
}

/// MSC3202: a transaction carries the one-time key counts and unused
/// fallback key types of its users' devices (user → device → …, under
/// both names Synapse sends), and `device_lists.left` names the users who
/// no longer share a room with any of its users.
#[tokio::test]
async fn key_counts_and_left_device_lists_with_msc3202() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(Some(&service.url()), "org.matrix.msc3202: true")).await;
    let asc = as_client(&server);
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let body = ok(asc
        .post(
            "login",
            json!({"type": "m.login.application_service", "device_id": "BOBPHONE",
                   "identifier": {"type": "m.id.user", "user": "_bridge_bob"}}),
        )
        .await);
    let bob_device = server.with_token(body["access_token"].as_str().unwrap());
    ok(bob_device
        .post(
            "keys/upload",
            json!({
                "one_time_keys": {
                    "signed_curve25519:AAA": {"key": "otk-AAA", "signatures": {}},
                    "signed_curve25519:BBB": {"key": "otk-BBB", "signatures": {}},
                },
                "fallback_keys": {
                    "signed_curve25519:FB1": {"key": "fb-1", "fallback": true, "signatures": {}},
                },
            }),
        )
        .await);
    let alice = server.register("alice").await;
    let carol = server.register("carol").await;
    let loner = server.register("loner").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    assert_eq!(carol.join(&room).await, room);
    let bob = "user_id=%40_bridge_bob%3Alocalhost";
    bob_joins(&server, &room).await;
    let lonely = loner.create_room(json!({})).await;

    // Counts of bob's one device, as they are when the transaction goes.
    let counts = |t: &Value, name: &str| t[format!("org.matrix.msc3202.{name}")].clone();
    let t = service
        .wait_for_event(&alice.send_text(&room, "m1", "two keys").await)
        .await;
    let two = json!({"@_bridge_bob:localhost": {"BOBPHONE": {"signed_curve25519": 2}}});
    assert_eq!(counts(&t, "device_one_time_keys_count"), two, "{t}");
    assert_eq!(counts(&t, "device_one_time_key_counts"), two, "{t}");
    assert_eq!(
        counts(&t, "device_unused_fallback_key_types"),
        json!({"@_bridge_bob:localhost": {"BOBPHONE": ["signed_curve25519"]}}),
        "{t}"
    );
    let claim = json!({"one_time_keys": {"@_bridge_bob:localhost": {"BOBPHONE": "signed_curve25519"}}});
    ok(alice.post("keys/claim", claim.clone()).await);
    let t = service
        .wait_for_event(&alice.send_text(&room, "m2", "one key").await)
        .await;
    assert_eq!(
        counts(&t, "device_one_time_keys_count"),
        json!({"@_bridge_bob:localhost": {"BOBPHONE": {"signed_curve25519": 1}}}),
        "{t}"
    );
    // The last one-time key, then the fallback key.
    for _ in 0..2 {
        let (status, body) = alice.post("keys/claim", claim.clone()).await;
        assert_eq!(status, 200, "{body}");
    }
    let t = service
        .wait_for_event(&alice.send_text(&room, "m3", "no keys").await)
        .await;
    assert_eq!(
        counts(&t, "device_one_time_keys_count"),
        json!({"@_bridge_bob:localhost": {"BOBPHONE": {}}}),
        "{t}"
    );
    assert_eq!(
        counts(&t, "device_unused_fallback_key_types"),
        json!({"@_bridge_bob:localhost": {"BOBPHONE": []}}),
        "{t}"
    );
    assert!(t.get("org.matrix.msc3202.device_lists").is_none(), "{t}");

    // Carol leaves: she shares no room with bob any more.
    ok(carol.post(&format!("rooms/{}/leave", enc(&room)), json!({})).await);
    let left = alice.send_text(&room, "m4", "carol left").await;
    service.wait_for_event(&left).await;
    let carol_leave = service
        .events()
        .into_iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == carol.user_id)
        .unwrap_or_else(|| panic!("carol's leave is delivered"));
    let t = service.transaction_with(carol_leave["event_id"].as_str().unwrap());
    assert_eq!(
        t["org.matrix.msc3202.device_lists"],
        json!({"changed": [], "left": [carol.user_id]}),
        "{t}"
    );
    // Bob leaves: alice, the last other member, shares none either.
    ok(asc.post(&format!("rooms/{}/leave?{bob}", enc(&room)), json!({})).await);
    let is_bob_leave = |e: &Value| e["state_key"] == "@_bridge_bob:localhost" && e["content"]["membership"] == "leave";
    service
        .wait_for(20, "bob's leave", |s| s.events().iter().any(is_bob_leave))
        .await;
    let bob_leave = service.events().into_iter().find(is_bob_leave).unwrap();
    let t = service.transaction_with(bob_leave["event_id"].as_str().unwrap());
    assert_eq!(
        t["org.matrix.msc3202.device_lists"],
        json!({"changed": [], "left": [alice.user_id]}),
        "{t}"
    );
    // The loner's leave of a room no user of the service was in is not
    // the service's business.
    ok(loner.post(&format!("rooms/{}/leave", enc(&lonely)), json!({})).await);
    bob_joins(&server, &room).await;
    service
        .wait_for_event(&alice.send_text(&room, "m5", "bob is back").await)
        .await;
    let all_left: Vec<Value> = service
        .transactions()
        .iter()
        .flat_map(|t| {
            t["org.matrix.msc3202.device_lists"]["left"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(all_left, vec![json!(carol.user_id), json!(alice.user_id)]);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket-door connection (`query` on the upgrade request), with
/// `token` as `Authorization: Bearer` when given.
async fn ws_connect(server: &TestServer, query: &str, token: Option<&str>) -> Ws {
    let url = format!(
        "{}/_matrix/client/unstable/org.weft.ws{query}",
        server.base_url().replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("ws connect");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Sends a frame and answers the next JSON frame (pings skipped).
async fn ws_call(ws: &mut Ws, frame: Value) -> Value {
    ws.send(Message::Text(frame.to_string().into())).await.expect("ws send");
    ws_next(ws).await
}

async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("frame is JSON"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The user a WebSocket request frame acts as (`whoami`, with `query`).
async fn ws_whoami(ws: &mut Ws, query: &str) -> Value {
    ws_call(
        ws,
        json!({"id": "who", "method": "GET", "path": format!("/_matrix/client/v3/account/whoami{query}")}),
    )
    .await
}

/// An application service's token authenticates on the WebSocket door as
/// over HTTP: on the upgrade request (as its sender, or the user its
/// `?user_id=` names, for the whole connection, its sync loop included),
/// in an `auth` frame (with `user_id`), and per request frame (its own
/// `?user_id=`); outside its namespace it is refused the same way.
#[tokio::test]
async fn as_token_on_the_websocket_door() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(None, "")).await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let bob = "user_id=%40_bridge_bob%3Alocalhost";
    bob_joins(&server, &room).await;

    // The token on the upgrade: the sender; a frame's ?user_id=: that user.
    let mut ws = ws_connect(&server, "", Some(AS_TOKEN)).await;
    let r = ws_whoami(&mut ws, "").await;
    assert_eq!(
        (r["status"].clone(), r["body"]["user_id"].clone()),
        (json!(200), json!("@bridgebot:localhost")),
        "{r}"
    );
    let r = ws_whoami(&mut ws, &format!("?{bob}")).await;
    assert_eq!(r["body"]["user_id"], "@_bridge_bob:localhost", "{r}");
    let r = ws_whoami(&mut ws, "?user_id=%40alice%3Alocalhost").await;
    assert_eq!(
        (r["status"].clone(), r["body"]["errcode"].clone()),
        (json!(403), json!("M_FORBIDDEN")),
        "{r}"
    );
    // Outside the namespace on the upgrade: refused as over HTTP.
    let url = format!(
        "{}/_matrix/client/unstable/org.weft.ws?user_id=%40alice%3Alocalhost",
        server.base_url().replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {AS_TOKEN}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!(
            "upgrade as alice through the service: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }

    // ?user_id= on the upgrade: the connection is bob's, its sync too.
    let mut ws = ws_connect(&server, &format!("?{bob}"), Some(AS_TOKEN)).await;
    let r = ws_whoami(&mut ws, "").await;
    assert_eq!(r["body"]["user_id"], "@_bridge_bob:localhost", "{r}");
    let r = ws_call(&mut ws, json!({"type": "sync"})).await;
    assert_eq!(r["type"], "sync", "{r}");
    assert!(r["body"]["rooms"]["join"][&room].is_object(), "bob's rooms: {r}");
    let sent = alice.send_text(&room, "w0", "to bob's socket").await;
    let mut got = false;
    for _ in 0..5 {
        let f = ws_next(&mut ws).await;
        assert_eq!(f["type"], "sync", "{f}");
        let timeline = &f["body"]["rooms"]["join"][&room]["timeline"]["events"];
        if timeline
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["event_id"] == sent))
        {
            got = true;
            break;
        }
    }
    assert!(got, "alice's message reaches the service's socket for bob");

    // An auth frame: refused outside the namespace, then bob.
    let mut ws = ws_connect(&server, "", None).await;
    let r = ws_call(
        &mut ws,
        json!({"type": "auth", "id": 1, "access_token": AS_TOKEN, "user_id": "@alice:localhost"}),
    )
    .await;
    assert_eq!(
        (r["status"].clone(), r["body"]["errcode"].clone()),
        (json!(403), json!("M_FORBIDDEN")),
        "{r}"
    );
    let r = ws_call(
        &mut ws,
        json!({"type": "auth", "id": 2, "access_token": AS_TOKEN, "user_id": "@_bridge_bob:localhost"}),
    )
    .await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["user_id"], "@_bridge_bob:localhost", "{r}");
    let r = ws_call(
        &mut ws,
        json!({"id": "s", "method": "PUT",
               "path": format!("/_matrix/client/v3/rooms/{}/send/m.room.message/w1", enc(&room)),
               "body": {"msgtype": "m.text", "body": "from the bridge's socket"}}),
    )
    .await;
    assert_eq!(r["status"], 200, "{r}");
    let (status, ev) = alice
        .get(&format!(
            "rooms/{}/event/{}",
            enc(&room),
            enc(r["body"]["event_id"].as_str().unwrap())
        ))
        .await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["sender"], "@_bridge_bob:localhost");
}

/// The issue's "a 30-second outage of the service loses nothing", with
/// the default backoff (1 s, doubling, up to 5 min): the service answers
/// 503 for 30 s while events keep coming (one a second). Weft tries the
/// same transaction at about 0, 1, 3, 7 and 15 s (a fixed 1 s retry would
/// be 30 tries), and after the service is back the next try comes within
/// the backoff then in effect (16 s); every event arrives once, in order.
#[tokio::test]
async fn a_thirty_second_outage_with_the_default_backoff_loses_nothing() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = server_builder(&dir, &registration(Some(&service.url()), ""))
        .start()
        .await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob_joins(&server, &room).await;
    let messages = |s: &Service| -> Vec<String> {
        s.events()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut sent = vec![alice.send_text(&room, "before", "before the outage").await];
    service.wait_for(20, "the first message", |s| messages(s) == sent).await;

    service.set_down(true);
    let down_at = Instant::now();
    let mut i = 0;
    while down_at.elapsed() < OUTAGE {
        sent.push(
            alice
                .send_text(&room, &format!("o{i}"), &format!("during the outage {i}"))
                .await,
        );
        i += 1;
        let next = down_at + Duration::from_secs(i);
        if next < down_at + OUTAGE {
            tokio::time::sleep_until(next.into()).await;
        } else {
            tokio::time::sleep_until((down_at + OUTAGE).into()).await;
        }
    }
    let (ok, out, err) = server.cli("appservice", "list", &[]);
    assert!(ok, "{out}{err}");
    let backoff_ms: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("backoff_ms\t"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no backoff_ms in {out}"));
    let refused = service.shared.seen.lock().unwrap().refused;
    assert!(
        (5..=6).contains(&refused),
        "tries while down, backing off from 1 s doubling: {refused} (backoff now {backoff_ms} ms)"
    );
    assert!(
        (8_000..=16_000).contains(&backoff_ms),
        "the backoff in effect after 30 s of doubling from 1 s: {backoff_ms} ms\n{out}"
    );

    service.set_down(false);
    let up_at = Instant::now();
    service
        .wait_for(40, "the first event after the outage", |s| messages(s).len() > 1)
        .await;
    let resumed = up_at.elapsed();
    assert!(
        resumed <= Duration::from_millis(backoff_ms + 2_000),
        "delivery resumed {resumed:?} after the service came back; the backoff was {backoff_ms} ms"
    );
    service
        .wait_for(20, "every event of the outage", |s| messages(s).len() >= sent.len())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(messages(&service), sent, "every event once, in order");
    assert!(sent.len() >= 30, "{} events sent during the outage", sent.len() - 1);
    assert_eq!(service.shared.seen.lock().unwrap().bad_auth, 0);
}

/// A WebSocket the service opened for one of its users is watched like a
/// device's: once that user is deactivated (here by another process, the
/// admin CLI) its sync loop delivers nothing more and the socket ends.
#[tokio::test]
async fn a_service_socket_ends_when_its_user_is_deactivated() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, &registration(None, "")).await;
    assert_eq!(as_register(&server, "_bridge_bob").await.0, 200);
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob_joins(&server, &room).await;
    let mut ws = ws_connect(&server, "?user_id=%40_bridge_bob%3Alocalhost", Some(AS_TOKEN)).await;
    let r = ws_call(&mut ws, json!({"type": "sync"})).await;
    assert!(r["body"]["rooms"]["join"][&room].is_object(), "{r}");
    let (ok, out, err) = server.cli("user", "deactivate", &["_bridge_bob"]);
    assert!(ok, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = alice.send_text(&room, "late", "after the deactivation").await;
    let mut ended = false;
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                assert!(!t.as_str().contains(&after), "delivered after the deactivation: {t}");
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                if f["body"]["errcode"] == "M_UNKNOWN_TOKEN" {
                    continue;
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                ended = true;
                break;
            }
            Ok(Some(Ok(_))) => {}
            Err(_) => break,
        }
    }
    assert!(ended, "the socket of the deactivated user ends");
}
