//! Test harness: runs the real `weft` binary as a child process on an
//! ephemeral port with its own temporary data directory, and talks to it over
//! HTTP with the Matrix Client-Server API (v3).
//!
//! Every test builds its own [`TestServer`], so tests are independent and run
//! in parallel under `cargo nextest`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
pub use weft_testkit::enc;
use weft_testkit::{ServeSpec, ServerProcess};

/// Server name used when the test does not pick one (the binary's default).
pub const DEFAULT_SERVER_NAME: &str = "localhost:8008";

/// A sync filter whose timeline limit is far above what any test sends
/// between two syncs, so a `limited: true` timeline means events were lost.
pub const BIG_TIMELINE_FILTER: &str = r#"{"room":{"timeline":{"limit":500}}}"#;

/// Builds a query string `?k=v&...` with encoded values.
pub fn query(params: &[(&str, &str)]) -> String {
    if params.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    format!("?{}", parts.join("&"))
}

pub struct TestServerBuilder {
    env: Vec<(String, String)>,
    server_name: Option<String>,
}

impl TestServerBuilder {
    /// Sets an environment variable for the server (and for admin CLI runs).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Passes `--server-name NAME`.
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_string());
        self
    }

    pub async fn start(self) -> TestServer {
        let root = tempfile::Builder::new()
            .prefix("weft-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = root.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_string());
        let mut spec = ServeSpec::new(env!("CARGO_BIN_EXE_weft"), &data_dir, root.path().join("server.log"));
        if let Some(name) = &self.server_name {
            spec = spec.arg("--server-name").arg(name);
        }
        for (k, v) in &self.env {
            spec = spec.env(k, v);
        }
        let process = ServerProcess::start(spec).await.unwrap_or_else(|e| panic!("{e}"));
        TestServer {
            base: Arc::new(Mutex::new(process.addrs.http.clone())),
            process,
            root,
            data_dir,
            env: self.env,
            server_name,
            http: http_client(),
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .pool_max_idle_per_host(16)
        .build()
        .expect("reqwest client")
}

pub struct TestServer {
    process: ServerProcess,
    root: tempfile::TempDir,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
    pub server_name: String,
    /// Shared with every [`Client`] so clients follow the server across
    /// restarts (each start gets a new ephemeral port).
    base: Arc<Mutex<String>>,
    pub http: reqwest::Client,
}

impl TestServer {
    /// Default server: registration open, rate limiting disabled.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder {
            env: vec![
                ("WEFT_REGISTRATION__MODE".into(), "open".into()),
                ("WEFT_RATE_LIMIT__ENABLED".into(), "false".into()),
                // Other doors on free ports, so parallel servers don't collide.
                ("WEFT_MQTT__LISTEN".into(), "127.0.0.1:0".into()),
                ("WEFT_COAP__LISTEN".into(), "127.0.0.1:0".into()),
                ("WEFT_COAP__DTLS_LISTEN".into(), "127.0.0.1:0".into()),
            ],
            server_name: None,
        }
    }

    pub async fn start() -> TestServer {
        Self::builder().start().await
    }

    /// `http://127.0.0.1:PORT` of the currently running child.
    pub fn base_url(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    /// stdout and stderr of every run of the server.
    pub fn stderr_log_path(&self) -> PathBuf {
        self.process.spec().log.clone()
    }

    fn apply_env(&self, cmd: &mut Command) {
        // Do not inherit stray WEFT_* settings from the developer's shell.
        for (k, _) in std::env::vars() {
            if k.starts_with("WEFT_") {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    /// Returns its exit status, or `None` if it had to be SIGKILLed.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.terminate(timeout).await
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts a new child on the same data dir (new ephemeral port). The
    /// previous child must have been stopped.
    pub async fn restart(&mut self) {
        self.process.restart().await.unwrap_or_else(|e| panic!("{e}"));
        *self.base.lock().unwrap() = self.process.addrs.http.clone();
    }

    /// The process ID of the running child.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Runs `weft <group> <cmd> --data-dir DIR <rest...>` (admin CLI) and
    /// returns (success, stdout, stderr).
    pub fn cli(&self, group: &str, cmd_name: &str, rest: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft"));
        cmd.arg(group).arg(cmd_name).arg("--data-dir").arg(&self.data_dir);
        cmd.args(rest);
        self.apply_env(&mut cmd);
        let out = cmd.stdin(Stdio::null()).output().expect("run weft cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A client with no access token.
    pub fn anon(&self) -> Client {
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            user_id: String::new(),
            access_token: String::new(),
            device_id: String::new(),
            password: String::new(),
            localpart: String::new(),
        }
    }

    /// A client using an arbitrary access token.
    pub fn with_token(&self, token: &str) -> Client {
        let mut c = self.anon();
        c.access_token = token.to_string();
        c
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    pub fn default_password(localpart: &str) -> String {
        format!("pw-{localpart}-correct-horse")
    }

    /// Registers `localpart` through user-interactive auth with
    /// `m.login.dummy` and returns a logged-in client.
    pub async fn register(&self, localpart: &str) -> Client {
        let password = Self::default_password(localpart);
        self.register_with_password(localpart, &password).await
    }

    pub async fn register_with_password(&self, localpart: &str, password: &str) -> Client {
        let anon = self.anon();
        let body = json!({"username": localpart, "password": password});
        let (status, first) = anon.post("register", body.clone()).await;
        assert_eq!(status, 401, "first /register (no auth) should be a UIA 401: {first}");
        let session = first["session"]
            .as_str()
            .unwrap_or_else(|| panic!("UIA 401 without session: {first}"));
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": session});
        let (status, resp) = anon.post("register", body).await;
        assert_eq!(status, 200, "register {localpart}: {resp}");
        self.client_from_login(&resp, localpart, password)
    }

    fn client_from_login(&self, resp: &Value, localpart: &str, password: &str) -> Client {
        let s = |k: &str| -> String {
            resp[k]
                .as_str()
                .unwrap_or_else(|| panic!("login/register response lacks `{k}`: {resp}"))
                .to_string()
        };
        Client {
            http: self.http.clone(),
            base: self.base.clone(),
            user_id: s("user_id"),
            access_token: s("access_token"),
            device_id: s("device_id"),
            password: password.to_string(),
            localpart: localpart.to_string(),
        }
    }

    /// POST /login with m.login.password and `identifier`; returns raw result.
    pub async fn login_raw(&self, localpart: &str, password: &str) -> (u16, Value) {
        self.anon()
            .post(
                "login",
                json!({
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": localpart},
                    "password": password,
                }),
            )
            .await
    }

    /// Logs in (new device) and returns a client; panics unless 200.
    pub async fn login(&self, localpart: &str, password: &str) -> Client {
        let (status, resp) = self.login_raw(localpart, password).await;
        assert_eq!(status, 200, "login {localpart}: {resp}");
        self.client_from_login(&resp, localpart, password)
    }

    fn dump_logs(&self) {
        // Keep the tail; logs of a busy test can be long.
        eprintln!("===== weft log (tail) =====\n{}", self.process.log_tail(200));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.process.is_running() {
            self.process.kill();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

/// A (possibly logged-in) Matrix client.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<Mutex<String>>,
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    /// Password used at registration (empty for anonymous clients).
    pub password: String,
    pub localpart: String,
}

impl Client {
    fn url(&self, path: &str) -> String {
        let base = self.base.lock().unwrap().clone();
        if path.starts_with('/') {
            format!("{base}{path}")
        } else {
            format!("{base}/_matrix/client/v3/{path}")
        }
    }

    /// Sends a request. `path` is relative to `/_matrix/client/v3/` unless it
    /// starts with `/`. Returns the status and the JSON body (a non-JSON body
    /// comes back as `{"_raw": TEXT}`).
    pub async fn request(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if !self.access_token.is_empty() {
            req = req.bearer_auth(&self.access_token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to {path} failed: {e}"));
        read_response(resp).await
    }

    /// Like [`request`](Self::request) but returns transport errors instead
    /// of panicking (for tests that kill the server mid-request).
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut req = self.http.request(method, self.url(path));
        if !self.access_token.is_empty() {
            req = req.bearer_auth(&self.access_token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((status, parse_body(&bytes)))
    }

    /// Sends raw bytes with the given content type.
    pub async fn request_raw(&self, method: Method, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("content-type", content_type)
            .body(body);
        if !self.access_token.is_empty() {
            req = req.bearer_auth(&self.access_token);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to {path} failed: {e}"));
        read_response(resp).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(Method::GET, path, None).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(Method::PUT, path, Some(body)).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(Method::POST, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(Method::DELETE, path, None).await
    }

    /// POST /createRoom; returns the room ID.
    pub async fn create_room(&self, body: Value) -> String {
        let (status, resp) = self.post("createRoom", body).await;
        assert_eq!(status, 200, "createRoom: {resp}");
        resp["room_id"]
            .as_str()
            .unwrap_or_else(|| panic!("createRoom without room_id: {resp}"))
            .to_string()
    }

    /// PUT /rooms/{room}/send/{type}/{txn}; returns (status, body).
    pub async fn send_raw(&self, room: &str, event_type: &str, txn: &str, content: Value) -> (u16, Value) {
        self.put(
            &format!("rooms/{}/send/{}/{}", enc(room), enc(event_type), enc(txn)),
            content,
        )
        .await
    }

    /// Sends an event; panics unless 200; returns the event ID.
    pub async fn send(&self, room: &str, event_type: &str, txn: &str, content: Value) -> String {
        let (status, resp) = self.send_raw(room, event_type, txn, content).await;
        assert_eq!(status, 200, "send {event_type} txn {txn}: {resp}");
        resp["event_id"]
            .as_str()
            .unwrap_or_else(|| panic!("send without event_id: {resp}"))
            .to_string()
    }

    /// Sends `m.room.message` text.
    pub async fn send_text(&self, room: &str, txn: &str, body: &str) -> String {
        self.send(room, "m.room.message", txn, json!({"msgtype": "m.text", "body": body}))
            .await
    }

    pub async fn invite(&self, room: &str, user_id: &str) {
        let (status, resp) = self
            .post(&format!("rooms/{}/invite", enc(room)), json!({"user_id": user_id}))
            .await;
        assert_eq!(status, 200, "invite {user_id}: {resp}");
    }

    /// POST /join/{roomIdOrAlias}; returns the room ID.
    pub async fn join(&self, room_or_alias: &str) -> String {
        let (status, resp) = self.post(&format!("join/{}", enc(room_or_alias)), json!({})).await;
        assert_eq!(status, 200, "join {room_or_alias}: {resp}");
        resp["room_id"]
            .as_str()
            .unwrap_or_else(|| panic!("join without room_id: {resp}"))
            .to_string()
    }

    /// GET /sync with arbitrary parameters.
    pub async fn sync_params(&self, params: &[(&str, &str)]) -> (u16, Value) {
        self.get(&format!("sync{}", query(params))).await
    }

    /// GET /sync (default filter); panics unless 200.
    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let t = timeout_ms.to_string();
        let mut params = vec![("timeout", t.as_str())];
        if let Some(s) = since {
            params.push(("since", s));
        }
        let (status, resp) = self.sync_params(&params).await;
        assert_eq!(status, 200, "sync: {resp}");
        resp
    }

    /// GET /sync with [`BIG_TIMELINE_FILTER`]; panics unless 200.
    pub async fn sync_full(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let t = timeout_ms.to_string();
        let mut params = vec![("timeout", t.as_str()), ("filter", BIG_TIMELINE_FILTER)];
        if let Some(s) = since {
            params.push(("since", s));
        }
        let (status, resp) = self.sync_params(&params).await;
        assert_eq!(status, 200, "sync: {resp}");
        resp
    }

    /// GET /rooms/{room}/messages; panics unless 200.
    pub async fn messages(&self, room: &str, from: Option<&str>, dir: &str, limit: u32) -> Value {
        let l = limit.to_string();
        let mut params = vec![("dir", dir), ("limit", l.as_str())];
        if let Some(f) = from {
            params.push(("from", f));
        }
        let (status, resp) = self
            .get(&format!("rooms/{}/messages{}", enc(room), query(&params)))
            .await;
        assert_eq!(status, 200, "messages dir={dir} from={from:?}: {resp}");
        resp
    }

    /// Every event of the room visible to this client, oldest first, via a
    /// full backwards /messages pagination from a fresh sync token.
    pub async fn all_messages(&self, room: &str) -> Vec<Value> {
        let s = self.sync(None, 0).await;
        let mut from = s["next_batch"].as_str().expect("next_batch").to_string();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let page = self.messages(room, Some(&from), "b", 100).await;
            let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
            let done = chunk.is_empty();
            out.extend(chunk);
            match page["end"].as_str() {
                Some(e) if !done => from = e.to_string(),
                _ => {
                    out.reverse();
                    return out;
                }
            }
        }
        panic!("backwards pagination did not terminate");
    }

    pub async fn whoami(&self) -> (u16, Value) {
        self.get("account/whoami").await
    }
}

fn parse_body(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({"_raw": String::from_utf8_lossy(bytes)}))
}

async fn read_response(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("read body");
    (status, parse_body(&bytes))
}

/// `rooms.join[room].timeline.events` of a sync response (empty if absent).
pub fn timeline(sync: &Value, room: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Events of `event_type` only.
pub fn of_type(events: &[Value], event_type: &str) -> Vec<Value> {
    events.iter().filter(|e| e["type"] == event_type).cloned().collect()
}

pub fn event_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().expect("event without event_id").to_string())
        .collect()
}

/// Asserts an error response: status and `errcode`.
#[track_caller]
pub fn assert_err(got: &(u16, Value), status: u16, errcode: &str) {
    assert_eq!(got.0, status, "expected {status} {errcode}, got {} {}", got.0, got.1);
    assert_eq!(
        got.1["errcode"], errcode,
        "expected errcode {errcode}, got {} {}",
        got.0, got.1
    );
    assert!(
        got.1["error"].is_string() || got.1["error"].is_null(),
        "`error` must be a string: {}",
        got.1
    );
}

/// Creates a room (preset as given) with alice, invites and joins bob.
pub async fn room_with(alice: &Client, bob: &Client, preset: &str) -> String {
    let room = alice.create_room(json!({"preset": preset})).await;
    alice.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    room
}

pub fn data_dir_of(server: &TestServer) -> &Path {
    &server.data_dir
}
