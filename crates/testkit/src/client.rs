//! [`Client`]: a JSON Matrix Client-Server API (v3) client over HTTP for
//! tests, and free helpers to pick apart its answers ([`timeline`],
//! [`of_type`], [`event_ids`]) and check errors ([`assert_err`]).
//!
//! Clients come from a [`TestServer`](crate::server::TestServer)
//! (`register`, `login`, `anon`, `with_token`) and follow it across
//! restarts.

use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{Value, json};

use crate::enc;

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
    /// An anonymous client of the server whose base URL is `base`.
    pub(crate) fn new(http: reqwest::Client, base: Arc<Mutex<String>>) -> Client {
        Client {
            http,
            base,
            user_id: String::new(),
            access_token: String::new(),
            device_id: String::new(),
            password: String::new(),
            localpart: String::new(),
        }
    }

    /// An anonymous client of any Matrix server at `base_url`
    /// (`http://HOST:PORT`), e.g. a [`Synapse`](crate::synapse::Synapse)'s
    /// [`client_url`](crate::synapse::Synapse::client_url). Set
    /// `access_token` (and `user_id`) to act as a user.
    pub fn at(base_url: &str) -> Client {
        let base = base_url.trim_end_matches('/').to_owned();
        Client::new(crate::server::http_client(), Arc::new(Mutex::new(base)))
    }

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

    /// PUT /rooms/{room}/state/{type}/{key}; panics unless 200; returns the
    /// event ID.
    pub async fn put_state(&self, room: &str, event_type: &str, key: &str, content: Value) -> String {
        let path = format!("rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(key));
        let (status, resp) = self.put(&path, content).await;
        assert_eq!(status, 200, "state {event_type}/{key}: {resp}");
        resp["event_id"]
            .as_str()
            .unwrap_or_else(|| panic!("state without event_id: {resp}"))
            .to_string()
    }

    /// GET /rooms/{room}/state/{type}/{key}: (status, content).
    pub async fn state(&self, room: &str, event_type: &str, key: &str) -> (u16, Value) {
        self.get(&format!("rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(key)))
            .await
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

    /// The last `limit` events of the room (one backwards /messages page
    /// from the end), oldest first.
    pub async fn last_events(&self, room: &str, limit: u32) -> Vec<Value> {
        let mut chunk = self.messages(room, None, "b", limit).await["chunk"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        chunk.reverse();
        chunk
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

    /// The bodies of the room's `m.room.message` events, oldest first
    /// (the whole history, see [`Client::all_messages`]).
    pub async fn message_bodies(&self, room: &str) -> Vec<String> {
        self.all_messages(room)
            .await
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
            .collect()
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
