//! The few Client-Server API calls the benchmark makes, over plain HTTP/1.1
//! with keep-alive.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A user's access token (and ID, when known).
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: String,
    pub token: String,
}

/// One HTTP client (its own keep-alive connection pool) bound to a server.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

/// Percent-encodes a path segment (room IDs contain `!` and `:`).
pub use weft_testkit::enc as encode_segment;

impl Api {
    /// A client with its own connection pool. `max_idle` bounds the idle
    /// keep-alive connections it keeps per host.
    pub fn new(base: &str, max_idle: usize) -> Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(max_idle)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // Long-poll syncs run up to 30 s; nothing should take longer.
            .timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("building HTTP client")?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET /_matrix/client/versions`, succeeding only on 200.
    pub async fn versions(&self) -> Result<()> {
        let resp = self
            .http
            .get(self.url("/_matrix/client/versions"))
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        if resp.status() != StatusCode::OK {
            bail!("/versions returned {}", resp.status());
        }
        Ok(())
    }

    /// Registers `username` via open registration (completing an
    /// `m.login.dummy` stage if asked).
    pub async fn register(&self, username: &str, password: &str) -> Result<Session> {
        let url = self.url("/_matrix/client/v3/register");
        let mut body = json!({
            "username": username,
            "password": password,
            "initial_device_display_name": "weft-bench",
        });
        for _ in 0..3 {
            let resp = self.http.post(&url).json(&body).send().await?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                return Ok(Session {
                    user_id: v["user_id"].as_str().unwrap_or_default().to_owned(),
                    token: v["access_token"]
                        .as_str()
                        .context("register response without access_token")?
                        .to_owned(),
                });
            }
            if status == StatusCode::UNAUTHORIZED && v.get("flows").is_some() {
                let mut auth = json!({ "type": "m.login.dummy" });
                if let Some(session) = v.get("session") {
                    auth["session"] = session.clone();
                }
                body["auth"] = auth;
                continue;
            }
            bail!("register {username}: {status} {v}");
        }
        bail!("register {username}: UIA did not complete")
    }

    /// `POST /createRoom`; returns the room ID.
    pub async fn create_room(&self, token: &str, body: &Value) -> Result<String> {
        let resp = self
            .http
            .post(self.url("/_matrix/client/v3/createRoom"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("createRoom: {status} {v}");
        }
        Ok(v["room_id"].as_str().context("createRoom without room_id")?.to_owned())
    }

    /// `POST /rooms/{roomId}/join`.
    pub async fn join(&self, token: &str, room_id: &str) -> Result<()> {
        self.join_path(
            token,
            room_id,
            &format!("/_matrix/client/v3/rooms/{}/join", encode_segment(room_id)),
        )
        .await
    }

    /// `POST /join/{roomIdOrAlias}`; returns the room ID.
    pub async fn join_alias(&self, token: &str, alias: &str) -> Result<String> {
        let resp = self
            .http
            .post(self.url(&format!("/_matrix/client/v3/join/{}", encode_segment(alias))))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("join {alias}: {status} {v}");
        }
        Ok(v["room_id"].as_str().context("join without room_id")?.to_owned())
    }

    /// `POST /join/{roomId}?via=SERVER`: a room of another server.
    pub async fn join_via(&self, token: &str, room_id: &str, server: &str) -> Result<()> {
        let path = format!(
            "/_matrix/client/v3/join/{}?via={}",
            encode_segment(room_id),
            encode_segment(server)
        );
        self.join_path(token, room_id, &path).await
    }

    async fn join_path(&self, token: &str, room_id: &str, path: &str) -> Result<()> {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            bail!("join {room_id}: {status} {}", resp.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// `PUT /rooms/{roomId}/send/{type}/{txnId}` with a pre-serialized body.
    /// Returns the status (errors are counted by the caller, not raised).
    pub async fn send(
        &self,
        token: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
        body: String,
    ) -> Result<StatusCode> {
        let resp = self
            .http
            .put(self.url(&format!(
                "/_matrix/client/v3/rooms/{}/send/{}/{}",
                encode_segment(room_id),
                encode_segment(event_type),
                encode_segment(txn_id)
            )))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        // Read the body so the connection goes back to the pool.
        let _ = resp.bytes().await?;
        Ok(status)
    }

    /// `GET /sync`. Returns the parsed body and the instant the whole body
    /// had arrived.
    pub async fn sync(
        &self,
        token: &str,
        since: Option<&str>,
        timeout_ms: u64,
        filter: Option<&str>,
    ) -> Result<(Value, Instant)> {
        let mut query: Vec<(&str, String)> = vec![("timeout", timeout_ms.to_string())];
        if let Some(since) = since {
            query.push(("since", since.to_owned()));
        }
        if let Some(filter) = filter {
            query.push(("filter", filter.to_owned()));
        }
        let resp = self
            .http
            .get(self.url("/_matrix/client/v3/sync"))
            .bearer_auth(token)
            .query(&query)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let at = Instant::now();
        if !status.is_success() {
            bail!("sync: {status} {}", String::from_utf8_lossy(&bytes));
        }
        let v: Value = serde_json::from_slice(&bytes).context("sync body is not JSON")?;
        Ok((v, at))
    }
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn encodes_room_ids() {
        assert_eq!(encode_segment("!abc:localhost:8008"), "%21abc%3Alocalhost%3A8008");
        assert_eq!(encode_segment("org.weft.telemetry"), "org.weft.telemetry");
    }
}
