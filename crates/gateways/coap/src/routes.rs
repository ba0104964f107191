//! Requests → shared service calls. Each route is the Client-Server API
//! endpoint of the same name; the talk's compact form
//! `POST /_m/c/a/v1/r/{room}/s/{type}` is the `api/v1` send without a
//! transaction ID. No room or account logic lives here.

use coap_lite::{RequestType as Method, ResponseType};
use serde_json::{Value, json};
use std::net::SocketAddr;
use weft_core::{Error, ErrorKind, Result};

use weft_services::sync::SyncRequest;
use weft_services::{Services, Session};

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

/// What a request is answered with: the CoAP code, the body (a Matrix
/// error body for errors), and Max-Age (seconds) for 4.29.
pub struct Reply {
    pub code: ResponseType,
    pub body: Value,
    pub max_age: Option<u32>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        matches!(
            self.code,
            ResponseType::Created
                | ResponseType::Deleted
                | ResponseType::Valid
                | ResponseType::Changed
                | ResponseType::Content
        )
    }
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
            set_presence: None,
        },
    )
    .await
}

/// Characters escaped in a path segment or query part handed on to the
/// endpoint layer: everything but RFC 3986's unreserved characters.
const ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Whether the body of a request to `p` is event content (a send or a
/// state event), which devices may send as any payload (`Req::content`),
/// rather than a JSON object in CBOR or JSON.
fn takes_content(p: &[&str], method: Method) -> bool {
    matches!(
        (p, method),
        (["rooms", _, "send", ..], Method::Put | Method::Post) | (["rooms", _, "state", ..], Method::Put)
    )
}

/// Runs one request through the endpoint layer (`weft_api`), the same one
/// HTTP and the WebSocket door reach: `p` is the Client-Server path below
/// the version prefix ([`cs_path`]), `session` the device the door
/// authenticated, if any. Tokens go no further than the door: the session
/// goes along as [`weft_api::Authenticated`].
pub async fn dispatch(
    api: &axum::Router,
    session: Option<&Session>,
    peer: Option<SocketAddr>,
    p: &[&str],
    req: &Req,
) -> Result<Reply> {
    use tower::ServiceExt;
    let method = match req.method {
        Method::Get => axum::http::Method::GET,
        Method::Post => axum::http::Method::POST,
        Method::Put => axum::http::Method::PUT,
        Method::Delete => axum::http::Method::DELETE,
        _ => {
            return Err(Error::new(
                ErrorKind::Unrecognized {
                    method_not_allowed: true,
                },
                "Method not allowed on this endpoint",
            ));
        }
    };
    let mut uri = match p {
        ["versions"] => "/_matrix/client/versions".to_owned(),
        _ => {
            let mut uri = "/_matrix/client/v3".to_owned();
            for seg in p {
                uri.push('/');
                uri.extend(percent_encoding::utf8_percent_encode(seg, ESCAPE));
            }
            uri
        }
    };
    let mut sep = '?';
    for (k, v) in &req.query {
        if k == "a" || k == "access_token" {
            continue;
        }
        // An Observe registration answers at once; changes are pushed.
        let v = if k == "timeout" && req.observe == Some(0) && is_sync(p) {
            "0"
        } else {
            v
        };
        uri.push(sep);
        uri.extend(percent_encoding::utf8_percent_encode(k, ESCAPE));
        uri.push('=');
        uri.extend(percent_encoding::utf8_percent_encode(v, ESCAPE));
        sep = '&';
    }
    let body = if matches!(req.method, Method::Get | Method::Delete) {
        Vec::new()
    } else {
        let v = if takes_content(p, req.method) {
            req.content()?
        } else {
            req.json_body()?
        };
        serde_json::to_vec(&v).map_err(Error::internal)?
    };
    let mut http = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body))
        .map_err(|e| Error::invalid_param(format!("Invalid request: {e}")))?;
    if let Some(s) = session {
        http.extensions_mut().insert(weft_api::Authenticated(s.clone()));
    }
    if let Some(peer) = peer {
        http.extensions_mut().insert(axum::extract::ConnectInfo(peer));
    }
    let resp = match api.clone().oneshot(http).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(Error::internal)?
        .to_bytes();
    let body: Value = if bytes.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&bytes).map_err(Error::internal)?
    };
    let max_age = body
        .get("retry_after_ms")
        .and_then(Value::as_u64)
        .filter(|_| status == 429)
        .map(|ms| ms.div_ceil(1000).max(1) as u32);
    let code = match status {
        200..=299 => match req.method {
            Method::Get => ResponseType::Content,
            Method::Delete => ResponseType::Deleted,
            // A new resource: an event sent without a transaction ID, a room.
            Method::Post if matches!(p, ["rooms", _, "send", _] | ["createRoom"]) => ResponseType::Created,
            _ => ResponseType::Changed,
        },
        _ => code_for_status(status),
    };
    Ok(Reply { code, body, max_age })
}

/// The CoAP code for an HTTP error status.
fn code_for_status(status: u16) -> ResponseType {
    use ResponseType::*;
    match status {
        401 => Unauthorized,
        403 => Forbidden,
        404 => NotFound,
        405 => MethodNotAllowed,
        409 => Conflict,
        413 => RequestEntityTooLarge,
        429 => TooManyRequests,
        400..=499 => BadRequest,
        _ => InternalServerError,
    }
}

/// The one place a [`weft_core::Error`] of the door itself becomes a CoAP
/// response: the code, the Matrix error body, and Max-Age (seconds) for
/// 4.29. Errors of endpoints come back from [`dispatch`] already encoded.
pub fn error_reply(e: &Error) -> Reply {
    if e.kind == ErrorKind::Unknown {
        tracing::error!("coap: internal error: {}", e.message);
    }
    let mut body = e.body();
    if e.kind == ErrorKind::Unknown && e.status.is_none() {
        body["error"] = "Internal server error".into();
    }
    let max_age = match e.kind {
        ErrorKind::LimitExceeded { retry_after_ms } => Some(retry_after_ms.div_ceil(1000).max(1) as u32),
        _ => None,
    };
    Reply {
        code: code_for_status(e.http_status()),
        body,
        max_age,
    }
}
