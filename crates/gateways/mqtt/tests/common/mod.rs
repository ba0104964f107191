//! Test harness: runs the real `weft` binary on free ports (HTTP and MQTT)
//! with its own data directory, and a small Matrix HTTP client.
//!
//! The binary is found next to the test executable
//! (`<target>/<profile>/deps/<test>` → `<target>/<profile>/weft`, as
//! crates/sdk-tests does), or at `WEFT_BIN`; if missing it is built with
//! `cargo build -p weft` into the same target directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};

pub fn weft_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(locate_or_build) {
        Ok(p) => p.clone(),
        Err(m) => panic!("{m}"),
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("WEFT_BIN={} does not exist", bin.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable location {}", exe.display()))?;
    let bin = profile_dir.join(format!("weft{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        return Ok(bin);
    }
    // Serialise builds between test processes of one run as far as cargo's
    // own lock does; cargo waits for the target directory lock itself.
    static BUILD: Mutex<()> = Mutex::new(());
    let _g = BUILD.lock().unwrap();
    let target_dir = profile_dir.parent().ok_or("no target dir")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "weft", "--bin", "weft"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    eprintln!("weft binary not found; running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{cmd:?} failed; build with `cargo build -p weft` or set WEFT_BIN"
        ))
    }
}

pub const SERVER_NAME: &str = "localhost:8008";

pub struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    pub http: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub async fn start() -> Server {
        let dir = tempfile::Builder::new().prefix("weft-mqtt-test-").tempdir().unwrap();
        let mut cmd = Command::new(weft_bin());
        for (k, _) in std::env::vars() {
            if k.starts_with("WEFT_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("WEFT_MQTT__LISTEN", "127.0.0.1:0")
            .env("WEFT_COAP__LISTEN", "127.0.0.1:0")
            .env("WEFT_REGISTRATION__MODE", "open")
            .env("WEFT_RATE_LIMIT__ENABLED", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr.log")).unwrap(),
            ));
        let mut child = cmd.spawn().expect("spawn weft");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
        std::thread::spawn(move || {
            let mut http = None;
            let mut mqtt = None;
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.split("listening on http://").nth(1) {
                    http = Some(a.trim().to_owned());
                }
                if let Some(a) = line.split("weft: mqtt listening on ").nth(1) {
                    mqtt = Some(a.trim().to_owned());
                }
                if let (Some(h), Some(m)) = (&http, &mqtt)
                    && let Some(t) = tx.take()
                {
                    let _ = t.send((h.clone(), m.clone()));
                }
            }
        });
        let (http, mqtt) = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap_or_else(|_| {
                panic!(
                    "weft did not print its http and mqtt addresses; stderr:\n{}",
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
                )
            });
        let (host, port) = mqtt.rsplit_once(':').unwrap();
        Server {
            child,
            http: format!("http://{http}"),
            mqtt_host: host.to_owned(),
            mqtt_port: port.parse().unwrap(),
            _dir: dir,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    pub fn mqtt_addr(&self) -> String {
        format!("{}:{}", self.mqtt_host, self.mqtt_port)
    }

    /// Registers a user (open registration, `m.login.dummy`).
    pub async fn register(&self, localpart: &str) -> User {
        let password = format!("pw-{localpart}-correct-horse");
        let url = format!("{}/_matrix/client/v3/register", self.http);
        let body = json!({"username": localpart, "password": password});
        let first: Value = self
            .client
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = first["session"].as_str().expect("UIA session").to_owned();
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": session});
        let resp = self.client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        User {
            base: self.http.clone(),
            client: self.client.clone(),
            user_id: v["user_id"].as_str().unwrap().to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
            password,
            localpart: localpart.to_owned(),
        }
    }
}

pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Clone)]
pub struct User {
    base: String,
    client: reqwest::Client,
    pub user_id: String,
    pub token: String,
    pub password: String,
    pub localpart: String,
}

impl User {
    pub async fn req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .client
            .request(method, format!("{}/_matrix/client/v3/{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_room(&self, body: Value) -> String {
        let (s, v) = self.req(reqwest::Method::POST, "createRoom", Some(body)).await;
        assert_eq!(s, 200, "createRoom: {v}");
        v["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn send(&self, room: &str, event_type: &str, txn: &str, content: Value) -> String {
        let path = format!("rooms/{}/send/{}/{}", enc(room), enc(event_type), enc(txn));
        let (s, v) = self.req(reqwest::Method::PUT, &path, Some(content)).await;
        assert_eq!(s, 200, "send: {v}");
        v["event_id"].as_str().unwrap().to_owned()
    }

    pub async fn put_state(&self, room: &str, event_type: &str, key: &str, content: Value) -> String {
        let path = format!("rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(key));
        let (s, v) = self.req(reqwest::Method::PUT, &path, Some(content)).await;
        assert_eq!(s, 200, "state: {v}");
        v["event_id"].as_str().unwrap().to_owned()
    }

    pub async fn state(&self, room: &str, event_type: &str, key: &str) -> (u16, Value) {
        let path = format!("rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(key));
        self.req(reqwest::Method::GET, &path, None).await
    }

    /// The last `limit` events of a room, oldest first.
    pub async fn messages(&self, room: &str, limit: u32) -> Vec<Value> {
        let path = format!("rooms/{}/messages?dir=b&limit={limit}", enc(room));
        let (s, v) = self.req(reqwest::Method::GET, &path, None).await;
        assert_eq!(s, 200, "messages: {v}");
        let mut chunk = v["chunk"].as_array().cloned().unwrap_or_default();
        chunk.reverse();
        chunk
    }

    pub async fn invite(&self, room: &str, user_id: &str) {
        let path = format!("rooms/{}/invite", enc(room));
        let (s, v) = self
            .req(reqwest::Method::POST, &path, Some(json!({"user_id": user_id})))
            .await;
        assert_eq!(s, 200, "invite: {v}");
    }

    pub async fn join(&self, room: &str) {
        let (s, v) = self
            .req(reqwest::Method::POST, &format!("join/{}", enc(room)), Some(json!({})))
            .await;
        assert_eq!(s, 200, "join: {v}");
    }
}
