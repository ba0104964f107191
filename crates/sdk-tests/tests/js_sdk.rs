//! An unmodified matrix-js-sdk client (the library Element Web is built on)
//! in Node against the real `weft serve`: the script js/observe.mjs syncs as
//! one user and answers, one JSON line each, what its room objects show
//! (member counts, the computed room name, read receipts, typing) while the
//! test acts as the other users over plain HTTP.
//!
//! Needs `node` (>= 20) and the script's packages (`npm ci` in
//! crates/sdk-tests/js, which `.ci/run` does). Without them the tests fail
//! under CI (env `CI` set) and are skipped with a note elsewhere.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use weft_testkit::TestServer;
use weft_testkit::client::Client;

/// Upper bound on one answer of the script (its own waits end at 20 s).
const ANSWER: Duration = Duration::from_secs(60);

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Whether node and the script's packages are there; if not, fails under CI
/// and prints a note elsewhere (the caller then skips the test).
fn node_ready() -> bool {
    let install = "apt-get install nodejs npm; npm ci --prefix crates/sdk-tests/js";
    // `node --version` prints `v20.20.2`.
    let major = std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|v| v.trim().trim_start_matches('v').split('.').next()?.parse::<u32>().ok());
    match major {
        None => {
            weft_testkit::tool_missing("node", install);
            return false;
        }
        Some(major) if major < 20 => {
            weft_testkit::tool_missing(&format!("node >= 20 (found major version {major})"), install);
            return false;
        }
        Some(_) => {}
    }
    if !js_dir().join("node_modules/matrix-js-sdk/package.json").is_file() {
        weft_testkit::tool_missing("matrix-js-sdk (crates/sdk-tests/js/node_modules)", install);
        return false;
    }
    true
}

/// The node process running js/observe.mjs as one user.
struct JsClient {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl JsClient {
    /// Starts the script as `user` and waits for its first sync.
    async fn start(server: &TestServer, user: &Client) -> JsClient {
        let log = server.root().join(format!("js-{}.log", user.localpart));
        let stderr = std::fs::File::create(&log).expect("create the script's log file");
        let mut child = Command::new("node")
            .arg(js_dir().join("observe.mjs"))
            .current_dir(js_dir())
            .env("WEFT_BASE_URL", server.base_url())
            .env("WEFT_USER_ID", &user.user_id)
            .env("WEFT_ACCESS_TOKEN", &user.access_token)
            .env("WEFT_DEVICE_ID", &user.device_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start node");
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut js = JsClient {
            child,
            stdin,
            lines,
            log,
        };
        let ready = js.answer().await;
        assert_eq!(ready["op"], "ready", "{ready}");
        assert!(ready.get("error").is_none(), "first sync of matrix-js-sdk: {ready}");
        assert_eq!(ready["user_id"], user.user_id.as_str());
        js
    }

    /// The next JSON line the script prints.
    async fn answer(&mut self) -> Value {
        let line = match tokio::time::timeout(ANSWER, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "no answer from matrix-js-sdk ({other:?}); its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        };
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("script printed non-JSON {line:?}: {e}"))
    }

    /// Sends one command and returns its answer; a wait that timed out fails
    /// the test with what the client showed.
    async fn ask(&mut self, cmd: Value) -> Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.expect("write to node");
        self.stdin.flush().await.expect("flush to node");
        let answer = self.answer().await;
        assert_eq!(answer["op"], cmd["op"], "answer to {cmd}: {answer}");
        assert_ne!(
            answer["timeout"], true,
            "matrix-js-sdk never showed {cmd}; it shows {answer}"
        );
        assert_ne!(answer["known"], false, "matrix-js-sdk does not know the room of {cmd}");
        answer
    }

    async fn quit(mut self) {
        let bye = self.ask(json!({"op": "quit"})).await;
        assert_eq!(bye["op"], "quit");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("node exits after quit")
            .expect("wait for node");
        assert!(status.success(), "node exited with {status}");
    }
}

async fn set_displayname(user: &Client, name: &str) {
    let (st, body) = user
        .put(
            &format!("profile/{}/displayname", weft_testkit::enc(&user.user_id)),
            json!({"displayname": name}),
        )
        .await;
    assert_eq!(st, 200, "set displayname of {}: {body}", user.user_id);
}

async fn receipt(user: &Client, room: &str, kind: &str, event_id: &str) {
    let (st, body) = user
        .post(
            &format!(
                "rooms/{}/receipt/{kind}/{}",
                weft_testkit::enc(room),
                weft_testkit::enc(event_id)
            ),
            json!({}),
        )
        .await;
    assert_eq!(st, 200, "{kind} receipt of {} on {event_id}: {body}", user.user_id);
}

/// The users other than `me` in a `wait_read` answer's `users_read_up_to`
/// (the SDK also counts the sender of an event as having read it).
fn readers_but(read: &Value, me: &str) -> Vec<String> {
    read["users_read_up_to"]
        .as_array()
        .expect("users_read_up_to")
        .iter()
        .filter_map(Value::as_str)
        .filter(|u| *u != me)
        .map(str::to_owned)
        .collect()
}

/// The receipts of `user` in a `wait_read` answer's `receipts`.
fn receipts_of(read: &Value, user: &str) -> Vec<Value> {
    read["receipts"]
        .as_array()
        .expect("receipts")
        .iter()
        .filter(|r| r["user_id"] == user)
        .cloned()
        .collect()
}

/// The (user, membership) pairs of a `room` answer.
fn memberships(view: &Value) -> Vec<(String, String)> {
    view["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap_or_default().to_owned(),
                m["membership"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

// Member counts and the name Element computes for an unnamed room: from the
// summary (`m.joined_member_count`, `m.invited_member_count`, `m.heroes`)
// and the heroes' display names, at the first sync and as members change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_shows_member_counts_and_a_name_from_heroes() {
    if !node_ready() {
        return;
    }
    let server = sdk_tests::weft().start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let dave = server.register("dave").await;
    set_displayname(&bob, "Bob Builder").await;
    set_displayname(&carol, "Carol Singer").await;
    set_displayname(&dave, "Dave Diver").await;

    // An unnamed room: bob joined, carol invited.
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    alice.invite(&room, &bob.user_id).await;
    alice.invite(&room, &carol.user_id).await;
    bob.join(&room).await;

    let mut js = JsClient::start(&server, &alice).await;
    let view = js.ask(json!({"op": "room", "room_id": room})).await;
    assert_eq!(view["my_membership"], "join", "{view}");
    assert_eq!(view["joined"], 2, "alice and bob joined: {view}");
    assert_eq!(view["invited"], 1, "carol invited: {view}");
    // Heroes in stream order: carol's invite came before bob's join.
    assert_eq!(view["name"], "Carol Singer and Bob Builder", "{view}");
    assert_eq!(
        memberships(&view),
        vec![
            (alice.user_id.clone(), "join".to_owned()),
            (bob.user_id.clone(), "join".to_owned()),
            (carol.user_id.clone(), "invite".to_owned()),
        ]
    );

    // Live: carol joins, dave is invited. Three others now: Element names
    // the room after the first hero and counts the rest.
    carol.join(&room).await;
    alice.invite(&room, &dave.user_id).await;
    let view = js
        .ask(json!({"op": "wait_member", "room_id": room, "user_id": dave.user_id, "membership": "invite"}))
        .await;
    assert_eq!(view["joined"], 3, "alice, bob and carol joined: {view}");
    assert_eq!(view["invited"], 1, "dave invited: {view}");
    assert_eq!(view["name"], "Bob Builder and 2 others", "{view}");

    // bob leaves, dave declines: alice and carol are left.
    let (st, body) = bob
        .post(&format!("rooms/{}/leave", weft_testkit::enc(&room)), json!({}))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = dave
        .post(&format!("rooms/{}/leave", weft_testkit::enc(&room)), json!({}))
        .await;
    assert_eq!(st, 200, "{body}");
    let view = js
        .ask(json!({"op": "wait_member", "room_id": room, "user_id": dave.user_id, "membership": "leave"}))
        .await;
    assert_eq!(view["joined"], 2, "alice and carol: {view}");
    assert_eq!(view["invited"], 0, "{view}");
    assert_eq!(view["name"], "Carol Singer", "{view}");
    js.quit().await;
}

// bob's public read receipts as alice's client shows them (the receipt
// cache behind Element's read avatars), at the first sync and live; his
// private receipt never reaches her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_shows_the_other_users_read_receipts() {
    if !node_ready() {
        return;
    }
    let server = sdk_tests::weft().start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = weft_testkit::client::room_with(&alice, &bob, "private_chat").await;

    // Before alice's client starts: bob reads her first message.
    let first = alice.send_text(&room, "t1", "first").await;
    receipt(&bob, &room, "m.read", &first).await;

    let mut js = JsClient::start(&server, &alice).await;
    let read = js
        .ask(json!({"op": "wait_read", "room_id": room, "user_id": bob.user_id, "event_id": first}))
        .await;
    assert_eq!(read["event_known"], true, "{read}");
    assert_eq!(readers_but(&read, &alice.user_id), vec![bob.user_id.clone()], "{read}");
    let receipts = receipts_of(&read, &bob.user_id);
    assert_eq!(receipts.len(), 1, "{read}");
    assert_eq!(receipts[0]["type"], "m.read");
    assert_eq!(receipts[0]["user_id"], bob.user_id.as_str());
    assert!(receipts[0]["ts"].as_u64().is_some_and(|ts| ts > 0), "{read}");

    // Live: two more messages; bob's private receipt on the last comes
    // first, then his public one on the middle one. alice's client must end
    // at the middle one (a leaked private receipt would put him further).
    let second = alice.send_text(&room, "t2", "second").await;
    let third = alice.send_text(&room, "t3", "third").await;
    receipt(&bob, &room, "m.read.private", &third).await;
    receipt(&bob, &room, "m.read", &second).await;
    let read = js
        .ask(json!({"op": "wait_read", "room_id": room, "user_id": bob.user_id, "event_id": second}))
        .await;
    assert_eq!(read["read_up_to"], second.as_str(), "{read}");
    assert_eq!(readers_but(&read, &alice.user_id), vec![bob.user_id.clone()], "{read}");
    let receipts = receipts_of(&read, &bob.user_id);
    assert_eq!(receipts.len(), 1, "{read}");
    assert_eq!(receipts[0]["type"], "m.read", "{read}");
    js.quit().await;
}

// bob's typing notifications as alice's client shows them
// (`RoomMember.typing`, Element's "bob is typing…").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_shows_the_other_user_typing() {
    if !node_ready() {
        return;
    }
    let server = sdk_tests::weft().start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = weft_testkit::client::room_with(&alice, &bob, "private_chat").await;

    let mut js = JsClient::start(&server, &alice).await;
    let typing_path = format!(
        "rooms/{}/typing/{}",
        weft_testkit::enc(&room),
        weft_testkit::enc(&bob.user_id)
    );
    let (st, body) = bob.put(&typing_path, json!({"typing": true, "timeout": 30000})).await;
    assert_eq!(st, 200, "{body}");
    let seen = js
        .ask(json!({"op": "wait_typing", "room_id": room, "user_id": bob.user_id, "typing": true}))
        .await;
    assert_eq!(seen["typing"], true, "{seen}");
    assert_eq!(seen["events"], json!([true]), "one RoomMember.typing event: {seen}");

    let (st, body) = bob.put(&typing_path, json!({"typing": false})).await;
    assert_eq!(st, 200, "{body}");
    let seen = js
        .ask(json!({"op": "wait_typing", "room_id": room, "user_id": bob.user_id, "typing": false}))
        .await;
    assert_eq!(seen["typing"], false, "{seen}");
    assert_eq!(seen["events"], json!([true, false]), "{seen}");
    js.quit().await;
}
