//! Test harness: runs the real `weft` binary on free ports (HTTP, MQTT
//! over TCP and TLS) with its own data directory, and a small Matrix HTTP
//! client.
//!
//! The binary is found next to the test executable
//! (`<target>/<profile>/deps/<test>` → `<target>/<profile>/weft`, as
//! crates/sdk-tests does), or at `WEFT_BIN`; if missing it is built with
//! `cargo build -p weft` into the same target directory.

#![allow(dead_code)]

pub mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use weft_testkit::{ServeSpec, ServerProcess};
pub use weft_testkit::{enc, weft_bin};

pub const SERVER_NAME: &str = "localhost:8008";

pub struct Server {
    process: ServerProcess,
    _dir: tempfile::TempDir,
    pub http: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// MQTT over TLS.
    pub mqtt_tls: SocketAddr,
    /// The self-signed certificate the server generated: the CA file.
    pub tls_cert: PathBuf,
    client: reqwest::Client,
}

impl Server {
    pub async fn start() -> Server {
        let dir = tempfile::Builder::new().prefix("weft-mqtt-test-").tempdir().unwrap();
        let mut spec = ServeSpec::new(weft_bin(), dir.path().join("data"), dir.path().join("server.log"));
        spec.wait_mqtt = true;
        spec.wait_mqtt_tls = true;
        let process = ServerProcess::start(spec).await.unwrap_or_else(|e| panic!("{e}"));
        let mqtt = process.addrs.mqtt.expect("mqtt address");
        Server {
            mqtt_tls: process.addrs.mqtt_tls.expect("mqtt tls address"),
            tls_cert: process.addrs.mqtt_tls_cert.clone().expect("mqtt tls certificate"),
            http: process.addrs.http.clone(),
            mqtt_host: mqtt.ip().to_string(),
            mqtt_port: mqtt.port(),
            process,
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

    /// Stops the server with SIGTERM (asserting a clean exit) and starts it
    /// again on the same data directory; the ports change.
    pub async fn restart(&mut self) {
        let status = self.process.terminate(Duration::from_secs(15)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "no clean exit on SIGTERM: {status:?}\n{}",
            self.process.log_tail(30)
        );
        self.process.restart().await.unwrap_or_else(|e| panic!("{e}"));
        let addrs = &self.process.addrs;
        let mqtt = addrs.mqtt.expect("mqtt address");
        self.http = addrs.http.clone();
        self.mqtt_host = mqtt.ip().to_string();
        self.mqtt_port = mqtt.port();
        self.mqtt_tls = addrs.mqtt_tls.expect("mqtt tls address");
    }

    /// Runs `weft <args> --data-dir <its data dir>` (the admin CLI, as
    /// another process on the same database); its success and output.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let spec = self.process.spec();
        let out = std::process::Command::new(&spec.bin)
            .args(args)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("WEFT_CONFIG")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the weft CLI");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `host:port` of the HTTP listener (which also serves MQTT over WebSocket).
    pub fn http_addr(&self) -> &str {
        self.http.trim_start_matches("http://")
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
    /// The same user, talking to `srv` (after a restart, say).
    pub fn on(&self, srv: &Server) -> User {
        User {
            base: srv.http.clone(),
            ..self.clone()
        }
    }

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
