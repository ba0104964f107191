//! Requests → shared service calls. Each route is the Client-Server API
//! endpoint of the same name; the talk's compact form
//! `POST /_m/c/a/v1/r/{room}/s/{type}` is the `api/v1` send without a
//! transaction ID. No room or account logic lives here.

use coap_lite::{RequestType as Method, ResponseType};
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_services::room_ops::{CreateRoomRequest, Pagination};
use weft_services::sync::{EventFilter, SyncRequest};
use weft_services::{Services, Session};
use weft_store::{Direction, StoredEvent};

/// The spec versions the HTTP door advertises (kept equal to
/// `weft_http::misc::SPEC_VERSIONS`; a door does not depend on another).
const SPEC_VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11",
];

/// Content-Format numbers (RFC 7252 §12.3).
pub const CF_TEXT: u16 = 0;
pub const CF_JSON: u16 = 50;
pub const CF_CBOR: u16 = 60;

/// A decoded request.
pub struct Req {
    pub method: Method,
    pub path: Vec<String>,
    pub query: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub content_format: Option<u16>,
    /// Observe option value on a GET (0 = register).
    pub observe: Option<u32>,
}

impl Req {
    pub fn q(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The access token carried by this request, if any: `?a=`,
    /// `?access_token=`.
    pub fn query_token(&self) -> Option<&str> {
        self.q("a").or_else(|| self.q("access_token"))
    }

    /// The body as JSON: CBOR (60, or no Content-Format and a CBOR map),
    /// or JSON (50).
    pub fn json_body(&self) -> Result<Value> {
        if self.payload.is_empty() {
            return Ok(json!({}));
        }
        match self.content_format {
            Some(CF_JSON) => {
                serde_json::from_slice(&self.payload).map_err(|e| Error::new(ErrorKind::NotJson, e.to_string()))
            }
            _ => crate::cbor::to_json(&self.payload)
                .map_err(|e| Error::new(ErrorKind::NotJson, format!("Invalid CBOR: {e}"))),
        }
    }

    /// Event content from the payload. CBOR maps become JSON objects with
    /// floats as exact decimal strings; JSON and text payloads go through
    /// `door_content` (numbers quoted exactly, non-objects wrapped).
    pub fn content(&self) -> Result<Value> {
        let cbor = match self.content_format {
            Some(CF_CBOR) => true,
            None => self.payload.is_empty() || matches!(self.payload[0], 0xa0..=0xbf),
            Some(_) => false,
        };
        if self.payload.is_empty() {
            return Err(Error::new(ErrorKind::NotJson, "Empty payload: send the event content"));
        }
        if cbor {
            return self.json_body();
        }
        let obj = weft_services::content::door_content(&self.payload)?;
        serde_json::to_value(obj).map_err(Error::internal)
    }
}

/// What a route answers.
pub struct Reply {
    pub code: ResponseType,
    pub body: Value,
}

fn ok(code: ResponseType, body: Value) -> Result<Reply> {
    Ok(Reply { code, body })
}

fn unrecognized(method_not_allowed: bool) -> Error {
    Error::new(
        ErrorKind::Unrecognized { method_not_allowed },
        if method_not_allowed {
            "Method not allowed on this endpoint"
        } else {
            "Unrecognized request"
        },
    )
}

fn fmt(e: &StoredEvent, s: &Session) -> Value {
    weft_rooms::client_event(e, Some((s.user_id.as_str(), s.device_id.as_str())), weft_core::now_ms())
}

fn content_of(e: &StoredEvent) -> Value {
    serde_json::from_str::<Value>(&e.pdu_json)
        .ok()
        .and_then(|v| v.get("content").cloned())
        .unwrap_or(json!({}))
}

/// The Client-Server path below the version prefix, or `None` when the
/// path is not a Client-Server path. `["versions"]` is returned for
/// `/_matrix/client/versions`.
pub fn cs_path(path: &[String]) -> Option<Vec<&str>> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        // The talk's compact form: /_m/c/a/v1/r/{room}/s/{type}
        ["_m", "c", "a", "v1", "r", room, "s", ty] => Some(vec!["rooms", room, "send", ty]),
        ["_matrix", "client", "versions"] => Some(vec!["versions"]),
        ["_matrix", "client", "api", "v1", rest @ ..] => Some(rest.to_vec()),
        ["_matrix", "client", "v3" | "r0", rest @ ..] => Some(rest.to_vec()),
        _ => None,
    }
}

/// Whether a route needs no access token.
pub fn is_public(p: &[&str]) -> bool {
    matches!(p, ["versions"])
}

/// Is this the sync endpoint (which may be observed)?
pub fn is_sync(p: &[&str]) -> bool {
    matches!(p, ["sync"])
}

pub async fn sync_json(
    s: &Services,
    session: &Session,
    since: Option<String>,
    timeout_ms: u64,
    filter: Option<&str>,
    full_state: bool,
) -> Result<Value> {
    let filter = s.sync_filter(session, filter).await?;
    s.sync(
        session,
        SyncRequest {
            since,
            timeout_ms,
            full_state,
            filter,
        },
    )
    .await
}

/// Runs one authenticated (or public) request.
pub async fn route(s: &Services, session: Option<&Session>, p: &[&str], req: &Req) -> Result<Reply> {
    use Method::*;
    use ResponseType::*;
    if let ["versions"] = p {
        // MSC3079 discovery, with the DTLS listener's port when it runs.
        let mut low_bandwidth = json!({
            "cbor_enum_version": 1,
            "coap_enum_version": 1,
            "observe": 1,
        });
        let coap = &s.config.coap;
        if coap.enabled
            && coap.dtls_enabled
            && let Ok(addr) = coap.dtls_listen.parse::<std::net::SocketAddr>()
        {
            low_bandwidth["dtls"] = json!(addr.port());
        }
        return match req.method {
            Get => ok(
                Content,
                json!({
                    "versions": SPEC_VERSIONS,
                    "unstable_features": {},
                    "org.matrix.msc3079.low_bandwidth": low_bandwidth,
                }),
            ),
            _ => Err(unrecognized(true)),
        };
    }
    let session = session.ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))?;
    match (p, req.method) {
        (["account", "whoami"], Get) => ok(
            Content,
            json!({ "user_id": session.user_id, "device_id": session.device_id, "is_guest": false }),
        ),
        (["rooms", room, "send", ty], Post) => {
            let id = s.send_event(session, room, ty, None, None, req.content()?).await?;
            ok(Created, json!({ "event_id": id }))
        }
        (["rooms", room, "send", ty, txn], Put) => {
            let id = s.send_event(session, room, ty, None, Some(txn), req.content()?).await?;
            ok(Changed, json!({ "event_id": id }))
        }
        (["rooms", room, "state", ty, rest @ ..], Put) if rest.len() <= 1 => {
            let key = rest.first().copied().unwrap_or("");
            let id = s.send_event(session, room, ty, Some(key), None, req.content()?).await?;
            ok(Changed, json!({ "event_id": id }))
        }
        (["rooms", room, "state", ty, rest @ ..], Get) if rest.len() <= 1 => {
            let key = rest.first().copied().unwrap_or("");
            let ev = s.state_event(&session.user_id, room, ty, key).await?;
            if req.q("format") == Some("event") {
                ok(Content, fmt(&ev, session))
            } else {
                ok(Content, content_of(&ev))
            }
        }
        (["rooms", room, "state"], Get) => {
            let state = s.room_state(&session.user_id, room).await?;
            ok(Content, Value::Array(state.iter().map(|e| fmt(e, session)).collect()))
        }
        (["rooms", room, "messages"], Get) => {
            let dir = match req.q("dir") {
                Some("b") | None => Direction::Backward,
                Some("f") => Direction::Forward,
                Some(_) => return Err(Error::invalid_param("dir must be b or f")),
            };
            let filter: EventFilter = match req.q("filter") {
                None => EventFilter::default(),
                Some(f) => serde_json::from_str(f).map_err(|e| Error::bad_json(format!("Invalid filter: {e}")))?,
            };
            let limit = match req.q("limit") {
                Some(l) => l.parse().map_err(|_| Error::invalid_param("Invalid limit"))?,
                None => filter.limit.unwrap_or(10),
            };
            let page = s
                .messages(
                    &session.user_id,
                    room,
                    Pagination {
                        from: req.q("from"),
                        to: req.q("to"),
                        dir,
                        limit,
                    },
                    &filter,
                )
                .await?;
            let mut out = json!({
                "chunk": page.chunk.iter().map(|e| fmt(e, session)).collect::<Vec<_>>(),
                "start": page.start,
                "state": page.state.iter().map(|e| fmt(e, session)).collect::<Vec<_>>(),
            });
            if let Some(end) = page.end {
                out["end"] = end.into();
            }
            ok(Content, out)
        }
        (["sync"], Get) => {
            let timeout = match req.q("timeout") {
                Some(t) => t.parse().map_err(|_| Error::invalid_param("Invalid timeout"))?,
                None => 0,
            };
            // An observe registration answers at once; changes are pushed.
            let timeout = if req.observe == Some(0) { 0 } else { timeout };
            let full_state = req.q("full_state") == Some("true");
            let v = sync_json(
                s,
                session,
                req.q("since").map(str::to_owned),
                timeout,
                req.q("filter"),
                full_state,
            )
            .await?;
            ok(Content, v)
        }
        (["createRoom"], Post) => {
            let body: CreateRoomRequest = serde_json::from_value(req.json_body()?)
                .map_err(|e| Error::bad_json(format!("Invalid createRoom body: {e}")))?;
            let room_id = s.create_room(session, body).await?;
            ok(Created, json!({ "room_id": room_id }))
        }
        (["join", room], Post) | (["rooms", room, "join"], Post) => {
            let room_id = s.join(&session.user_id, room).await?;
            ok(Changed, json!({ "room_id": room_id }))
        }
        (["joined_rooms"], Get) => ok(
            Content,
            json!({ "joined_rooms": s.joined_rooms(&session.user_id).await? }),
        ),
        (
            ["account", "whoami"]
            | ["rooms", _, "send", _]
            | ["rooms", _, "send", _, _]
            | ["rooms", _, "state", ..]
            | ["rooms", _, "messages"]
            | ["sync"]
            | ["createRoom"]
            | ["join", _]
            | ["rooms", _, "join"]
            | ["joined_rooms"],
            _,
        ) => Err(unrecognized(true)),
        _ => Err(unrecognized(false)),
    }
}

/// The one place a [`weft_core::Error`] becomes a CoAP response: the code,
/// the Matrix error body, and Max-Age (seconds) for 4.29.
pub fn error_reply(e: &Error) -> (ResponseType, Value, Option<u32>) {
    use ResponseType::*;
    if e.kind == ErrorKind::Unknown {
        tracing::error!("coap: internal error: {}", e.message);
    }
    let code = match e.http_status() {
        401 => Unauthorized,
        403 => Forbidden,
        404 => NotFound,
        405 => MethodNotAllowed,
        409 => Conflict,
        413 => RequestEntityTooLarge,
        429 => TooManyRequests,
        400..=499 => BadRequest,
        _ => InternalServerError,
    };
    let mut body = e.body();
    if e.kind == ErrorKind::Unknown && e.status.is_none() {
        body["error"] = "Internal server error".into();
    }
    let max_age = match e.kind {
        ErrorKind::LimitExceeded { retry_after_ms } => Some(retry_after_ms.div_ceil(1000).max(1) as u32),
        _ => None,
    };
    (code, body, max_age)
}
