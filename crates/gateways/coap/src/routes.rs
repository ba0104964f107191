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
    /// Block2 option (num, more, szx): which block of a file to answer.
    pub block2: Option<(u32, bool, u8)>,
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
    /// A file (or one block of it) from the media repository, sent as
    /// it is instead of `body`.
    pub file: Option<FileBlock>,
}

/// One block of a media file: its bytes, Content-Format, which block of
/// which size it is, and the whole file's length.
pub struct FileBlock {
    pub bytes: Vec<u8>,
    pub cf: u16,
    pub num: u32,
    pub szx: u8,
    pub total: u64,
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
    Ok(Reply {
        code,
        body,
        max_age,
        file: None,
    })
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
        file: None,
    }
}

/// The HTTP path of a media repository request (`/_matrix/media/…`,
/// `/_matrix/client/v1/media/…`), which the door hands on with its
/// payload as it is (docs/coap.md, "Files").
pub fn media_path(path: &[String]) -> Option<String> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    if !matches!(
        p.as_slice(),
        ["_matrix", "media", _, ..] | ["_matrix", "client", "v1", "media", _, ..]
    ) {
        return None;
    }
    let mut uri = String::new();
    for seg in p {
        uri.push('/');
        uri.extend(percent_encoding::utf8_percent_encode(seg, ESCAPE));
    }
    Some(uri)
}

/// Content-Formats (RFC 7252 §12.3 and its registry) and their types.
const MEDIA_FORMATS: [(u16, &str); 8] = [
    (0, "text/plain"),
    (21, "image/gif"),
    (22, "image/jpeg"),
    (23, "image/png"),
    (41, "application/xml"),
    (42, "application/octet-stream"),
    (50, "application/json"),
    (60, "application/cbor"),
];

/// The Content-Type of an upload with this Content-Format (none, or one
/// without a type of its own: `application/octet-stream`).
pub fn content_type_of(cf: Option<u16>) -> &'static str {
    match cf {
        Some(0) => "text/plain; charset=utf-8",
        Some(cf) => MEDIA_FORMATS
            .iter()
            .find(|(n, _)| *n == cf)
            .map_or("application/octet-stream", |(_, t)| t),
        None => "application/octet-stream",
    }
}

/// The Content-Format for a file of this Content-Type (42, octet-stream,
/// for types CoAP has no number for).
pub fn format_of(content_type: &str) -> u16 {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    MEDIA_FORMATS
        .iter()
        .find(|(_, t)| t.eq_ignore_ascii_case(essence))
        .map_or(42, |(n, _)| *n)
}

/// Runs a media repository request through the endpoint layer: the
/// payload goes up as the file (its Content-Format as Content-Type); a
/// download asks for the one block the request's Block2 names (as an HTTP
/// range), so a large file is never held whole in memory.
pub async fn dispatch_media(
    api: &axum::Router,
    session: Option<&Session>,
    peer: Option<SocketAddr>,
    path: &str,
    req: &Req,
) -> Result<Reply> {
    use tower::ServiceExt;
    let method = match req.method {
        Method::Get => axum::http::Method::GET,
        Method::Post => axum::http::Method::POST,
        Method::Put => axum::http::Method::PUT,
        _ => {
            return Err(Error::new(
                ErrorKind::Unrecognized {
                    method_not_allowed: true,
                },
                "Method not allowed on this endpoint",
            ));
        }
    };
    let mut uri = path.to_owned();
    let mut sep = '?';
    for (k, v) in &req.query {
        if k == "a" || k == "access_token" {
            continue;
        }
        uri.push(sep);
        uri.extend(percent_encoding::utf8_percent_encode(k, ESCAPE));
        uri.push('=');
        uri.extend(percent_encoding::utf8_percent_encode(v, ESCAPE));
        sep = '&';
    }
    let (num, szx) = match req.block2 {
        Some((num, _, szx)) => (num, szx.min(crate::BLOCK_SZX)),
        None => (0, crate::BLOCK_SZX),
    };
    let size = 1u64 << (szx + 4);
    let start = u64::from(num) * size;
    let request = |range: bool| {
        let mut b = axum::http::Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .header(axum::http::header::CONTENT_TYPE, content_type_of(req.content_format));
        if method == axum::http::Method::GET && range {
            b = b.header(axum::http::header::RANGE, format!("bytes={start}-{}", start + size - 1));
        }
        let body = if method == axum::http::Method::GET {
            Vec::new()
        } else {
            req.payload.clone()
        };
        let mut http = b
            .body(axum::body::Body::from(body))
            .map_err(|e| Error::invalid_param(format!("Invalid request: {e}")))?;
        if let Some(s) = session {
            http.extensions_mut().insert(weft_api::Authenticated(s.clone()));
        }
        if let Some(peer) = peer {
            http.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        }
        Ok::<_, Error>(http)
    };
    let mut resp = match api.clone().oneshot(request(true)?).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    // An empty file has no first block: ask again for all of it.
    if resp.status() == axum::http::StatusCode::RANGE_NOT_SATISFIABLE
        && num == 0
        && resp
            .headers()
            .get(axum::http::header::CONTENT_RANGE)
            .is_some_and(|v| v.as_bytes() == b"bytes */0")
    {
        resp = match api.clone().oneshot(request(false)?).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
    }
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let header = |n: axum::http::header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header(axum::http::header::CONTENT_TYPE).unwrap_or_default();
    let total = header(axum::http::header::CONTENT_RANGE)
        .and_then(|r| r.rsplit('/').next().and_then(|t| t.parse::<u64>().ok()));
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(Error::internal)?
        .to_bytes();
    let is_file = method == axum::http::Method::GET && (path.contains("/download/") || path.contains("/thumbnail/"));
    if !(200..=299).contains(&status) || !is_file {
        let body: Value = if bytes.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({}))
        };
        let code = match status {
            200..=299 if req.method == Method::Post => ResponseType::Created,
            200..=299 if req.method == Method::Get => ResponseType::Content,
            200..=299 => ResponseType::Changed,
            416 => ResponseType::BadOption,
            _ => code_for_status(status),
        };
        return Ok(Reply {
            code,
            body,
            max_age: None,
            file: None,
        });
    }
    Ok(Reply {
        code: ResponseType::Content,
        body: Value::Null,
        max_age: None,
        file: Some(FileBlock {
            total: total.unwrap_or(bytes.len() as u64),
            bytes: bytes.to_vec(),
            cf: format_of(&content_type),
            num,
            szx,
        }),
    })
}
