//! The homeserver, through the Client-Server API as an application
//! service: `Authorization: Bearer <as_token>`, acting as a puppet with
//! `?user_id=`. Nothing here is specific to Weft.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

/// Why a call failed: worth trying again (the homeserver is down, busy or
/// failing), or refused for good (a 4xx other than 429).
#[derive(Debug)]
pub enum HsError {
    Retry(String),
    Refused {
        status: u16,
        errcode: String,
        error: String,
    },
}

impl std::fmt::Display for HsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HsError::Retry(e) => write!(f, "homeserver unavailable: {e}"),
            HsError::Refused { status, errcode, error } => write!(f, "refused: {status} {errcode} {error}"),
        }
    }
}

pub type HsResult<T> = Result<T, HsError>;

#[derive(Clone)]
pub struct Homeserver {
    http: reqwest::Client,
    base: Url,
    as_token: String,
    pub server_name: String,
}

impl Homeserver {
    pub fn new(base: &str, as_token: &str, server_name: &str) -> anyhow::Result<Homeserver> {
        Ok(Homeserver {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            base: Url::parse(base)?,
            as_token: as_token.to_string(),
            server_name: server_name.to_string(),
        })
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    fn url(&self, segments: &[&str], user: Option<&str>) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(["_matrix", "client", "v3"]);
            p.extend(segments);
        }
        if let Some(user) = user {
            u.query_pairs_mut().append_pair("user_id", user);
        }
        u
    }

    async fn call(&self, method: Method, url: Url, body: Option<&Value>) -> HsResult<Value> {
        let mut req = self.http.request(method, url).bearer_auth(&self.as_token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| HsError::Retry(e.to_string()))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(HsError::Retry(format!("{status} {v}")));
        }
        Err(HsError::Refused {
            status: status.as_u16(),
            errcode: v["errcode"].as_str().unwrap_or("").to_string(),
            error: v["error"].as_str().unwrap_or("").to_string(),
        })
    }

    /// Registers a puppet (`m.login.application_service`); one that exists
    /// already is fine.
    pub async fn register(&self, localpart: &str) -> HsResult<()> {
        let body = json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true});
        match self
            .call(Method::POST, self.url(&["register"], None), Some(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(HsError::Refused { errcode, .. }) if errcode == "M_USER_IN_USE" => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn resolve_alias(&self, alias: &str) -> HsResult<Option<String>> {
        match self
            .call(Method::GET, self.url(&["directory", "room", alias], None), None)
            .await
        {
            Ok(v) => Ok(v["room_id"].as_str().map(str::to_string)),
            Err(HsError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn create_room(&self, as_user: &str, body: &Value) -> HsResult<String> {
        let v = self
            .call(Method::POST, self.url(&["createRoom"], Some(as_user)), Some(body))
            .await?;
        v["room_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| HsError::Retry(format!("createRoom answered without room_id: {v}")))
    }

    pub async fn send(&self, room: &str, ty: &str, txn: &str, content: &Value, as_user: &str) -> HsResult<String> {
        let url = self.url(&["rooms", room, "send", ty, txn], Some(as_user));
        let v = self.call(Method::PUT, url, Some(content)).await?;
        Ok(v["event_id"].as_str().unwrap_or("").to_string())
    }

    pub async fn put_state(&self, room: &str, ty: &str, key: &str, content: &Value, as_user: &str) -> HsResult<String> {
        let url = self.url(&["rooms", room, "state", ty, key], Some(as_user));
        let v = self.call(Method::PUT, url, Some(content)).await?;
        Ok(v["event_id"].as_str().unwrap_or("").to_string())
    }

    /// Joins a room (by ID or alias) as `as_user`; answers the room ID.
    pub async fn join(&self, room_or_alias: &str, as_user: &str) -> HsResult<String> {
        let v = self
            .call(
                Method::POST,
                self.url(&["join", room_or_alias], Some(as_user)),
                Some(&json!({})),
            )
            .await?;
        v["room_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| HsError::Retry(format!("join answered without room_id: {v}")))
    }

    /// The content of a current state event, `None` if there is none.
    pub async fn get_state(&self, room: &str, ty: &str, key: &str, as_user: &str) -> HsResult<Option<Value>> {
        let url = self.url(&["rooms", room, "state", ty, key], Some(as_user));
        match self.call(Method::GET, url, None).await {
            Ok(v) => Ok(Some(v)),
            Err(HsError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
