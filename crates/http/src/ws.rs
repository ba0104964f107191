//! The WebSocket door: `GET /_matrix/client/unstable/org.weft.ws`.
//!
//! One socket carries Client-Server API requests as JSON text frames
//! (`{"id", "method", "path", "body"}` → `{"id", "status", "body"}`), each
//! dispatched in process through the same axum router the HTTP door serves,
//! with the connection's access token injected as `Authorization: Bearer`.
//! A `{"type":"sync"}` frame starts a server-side sync loop pushing
//! `{"type":"sync","body":…}` frames whenever `Services::sync` has news.
//! See docs/websocket.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tower::ServiceExt;
use weft_core::{Error, ErrorKind};
use weft_services::revocation::SessionWatch;
use weft_services::sync::SyncRequest;
use weft_services::{Services, Session};

use weft_api::endpoint::{MASQUERADE_DEVICE, query_param};
use weft_api::{ApiError, Authenticated, TokenChecked, access_token};

pub const WS_PATH: &str = "/_matrix/client/unstable/org.weft.ws";

/// Outgoing frames queued per connection; a client that lets more pile up
/// is closed with 1008 rather than buffered without bound.
///
/// The close frame goes out behind what the socket already holds, so it
/// reaches a slow consumer only once that consumer reads again: it gets
/// [`CLOSE_GRACE`] to do so (a shorter bound dropped the connection without
/// a close frame when the consumer paused longer than that).
const OUT_QUEUE: usize = 64;
/// Requests of one connection being handled at once; more get 429.
const MAX_IN_FLIGHT: usize = 32;
/// How long a closing connection's close frame may wait for the client to
/// read what was sent before it.
const CLOSE_GRACE: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(30);
const PONG_TIMEOUT: Duration = Duration::from_secs(60);
/// Long-poll timeout of each round of the sync loop.
const SYNC_TIMEOUT_MS: u64 = 30_000;
/// Largest response body read back from a dispatched request.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Handles the upgrade request. A token on it (header or query) must be
/// valid; without one the client may send an `auth` frame later.
pub async fn upgrade(services: Arc<Services>, dispatch: Router, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &services).await {
        Ok(ws) => ws,
        Err(rej) => return rej.into_response(),
    };
    let mut session = None;
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().copied();
    let token = access_token(&parts);
    if let Some(t) = &token {
        // Resolved (once) by the rate-limit layer.
        let checked = match parts.extensions.get::<TokenChecked>() {
            Some(TokenChecked(checked)) => checked.clone(),
            None => {
                services
                    .authenticate(
                        t,
                        query_param(&parts.uri, "user_id").as_deref(),
                        query_param(&parts.uri, MASQUERADE_DEVICE).as_deref(),
                        peer.map(|p| p.0.ip()),
                    )
                    .await
            }
        };
        match checked {
            Ok(s) => session = Some(s),
            Err(e) => return ApiError(e).into_response(),
        }
    }
    let limit = services.config.limits.max_body_bytes;
    let auth = session.zip(token);
    let watch = auth.as_ref().map(|(s, t)| services.watch_session(s, t));
    let conn = Conn {
        services,
        dispatch,
        peer,
        auth,
        watch,
    };
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| conn.run(socket))
}

struct Conn {
    services: Arc<Services>,
    dispatch: Router,
    peer: Option<ConnectInfo<SocketAddr>>,
    /// The authenticated session and its access token.
    auth: Option<(Session, String)>,
    /// Whether that token still holds: once revoked the connection closes
    /// (1008) and its sync loop stops.
    watch: Option<Arc<SessionWatch>>,
}

/// The sending half shared by the request tasks and the sync loop.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<Message>,
    overflow: Arc<Notify>,
}

impl Out {
    /// Queues a frame; a full queue flags the connection for closing.
    fn send(&self, v: Value) -> bool {
        self.send_msg(Message::Text(Utf8Bytes::from(v.to_string())))
    }

    fn send_msg(&self, m: Message) -> bool {
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

fn error_frame(id: Value, e: Error) -> Value {
    let status = e.http_status();
    json!({ "id": id, "status": status, "body": e.body() })
}

impl Conn {
    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let (tx, mut rx) = mpsc::channel::<Message>(OUT_QUEUE);
        let overflow = Arc::new(Notify::new());
        let out = Out {
            tx,
            overflow: overflow.clone(),
        };
        // The writer; `close` makes it send a close frame (best effort) and stop.
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<CloseFrame>();
        let writer = tokio::spawn(async move {
            let mut close_rx = close_rx;
            loop {
                tokio::select! {
                    // Frames queued before the close go out first (say, a
                    // sync loop's error frame saying why).
                    biased;
                    sent = async {
                        match rx.recv().await {
                            Some(m) => Some(sink.send(m).await.is_ok()),
                            None => None,
                        }
                    } => match sent {
                        Some(true) => {}
                        Some(false) => break,
                        // Every sender gone: the close frame, if one comes.
                        None => {
                            if let Ok(frame) = (&mut close_rx).await {
                                let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
                            }
                            break;
                        }
                    },
                    frame = &mut close_rx => {
                        if let Ok(frame) = frame {
                            let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
                        }
                        break;
                    }
                }
            }
        });
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut sync_loop: Option<tokio::task::JoinHandle<()>> = None;
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        let mut last_seen = Instant::now();
        let close: Option<CloseFrame> = loop {
            let watch = self.watch.clone();
            let revoked = async {
                match &watch {
                    Some(w) => w.revoked().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = revoked => {
                    break Some(CloseFrame { code: 1008, reason: "access token revoked".into() });
                }
                _ = overflow.notified() => {
                    break Some(CloseFrame { code: 1008, reason: "slow consumer: outgoing queue full".into() });
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > PONG_TIMEOUT {
                        break Some(CloseFrame { code: 1001, reason: "no pong".into() });
                    }
                    out.send_msg(Message::Ping(Default::default()));
                }
                msg = stream.next() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        // Over `max_body_bytes`: tell the client why.
                        Some(Err(e)) if e.to_string().contains("too long") => {
                            tracing::debug!("websocket: {e}");
                            break Some(CloseFrame { code: 1009, reason: "message too big".into() });
                        }
                        _ => break None,
                    };
                    last_seen = Instant::now();
                    match msg {
                        Message::Text(t) => self.on_text(t.as_str(), &out, &in_flight, &mut sync_loop).await,
                        Message::Binary(_) => {
                            out.send(error_frame(Value::Null, Error::new(ErrorKind::NotJson, "Frames must be JSON text")));
                        }
                        Message::Close(_) => break None,
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
            }
        };
        if let Some(h) = sync_loop {
            h.abort();
        }
        let closing = close.is_some();
        match close {
            Some(frame) => {
                let _ = close_tx.send(frame);
            }
            None => drop(close_tx),
        }
        drop(out);
        let _ = writer.await;
        if closing {
            // Closing handshake: read (and drop) until the client's close,
            // briefly, so unread input does not reset the connection before
            // our close frame reaches the client.
            let drain = async {
                while let Some(Ok(m)) = stream.next().await
                    && !matches!(m, Message::Close(_))
                {}
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
    }

    async fn on_text(
        &mut self,
        text: &str,
        out: &Out,
        in_flight: &Arc<Semaphore>,
        sync_loop: &mut Option<tokio::task::JoinHandle<()>>,
    ) {
        let frame: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                out.send(error_frame(
                    Value::Null,
                    Error::new(ErrorKind::NotJson, "Frames must be JSON objects"),
                ));
                return;
            }
            Err(e) => {
                out.send(error_frame(
                    Value::Null,
                    Error::new(ErrorKind::NotJson, format!("Frame is not valid JSON: {e}")),
                ));
                return;
            }
        };
        match frame.get("type").and_then(Value::as_str) {
            Some("auth") => self.on_auth(&frame, out).await,
            Some("sync") => self.on_sync(&frame, out, sync_loop).await,
            Some(other) => {
                let id = frame.get("id").cloned().unwrap_or(Value::Null);
                out.send(error_frame(
                    id,
                    Error::bad_json(format!("Unknown frame type {other:?}")),
                ));
            }
            None => {
                let id = frame.get("id").cloned().unwrap_or(Value::Null);
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    out.send(error_frame(
                        id,
                        Error::new(
                            ErrorKind::LimitExceeded { retry_after_ms: 1000 },
                            "Too many requests in flight",
                        ),
                    ));
                    return;
                };
                let req = match self.build_request(frame) {
                    Ok(r) => r,
                    Err(e) => {
                        out.send(error_frame(id, e));
                        return;
                    }
                };
                let dispatch = self.dispatch.clone();
                let out = out.clone();
                tokio::spawn(async move {
                    let reply = dispatch_one(dispatch, req).await;
                    out.send(json!({ "id": id, "status": reply.0, "body": reply.1 }));
                    drop(permit);
                });
            }
        }
    }

    async fn on_auth(&mut self, frame: &Value, out: &Out) {
        let id = frame.get("id").cloned().unwrap_or(Value::Null);
        let Some(token) = frame.get("access_token").and_then(Value::as_str) else {
            out.send(error_frame(
                id,
                Error::new(ErrorKind::MissingToken, "Missing access token"),
            ));
            return;
        };
        // An application service's token may act as one of its users
        // (`user_id`) and device, as `?user_id=` does over HTTP.
        let str_of = |key: &str| frame.get(key).and_then(Value::as_str);
        match self
            .services
            .authenticate(
                token,
                str_of("user_id"),
                str_of(MASQUERADE_DEVICE),
                self.peer.map(|p| p.0.ip()),
            )
            .await
        {
            Ok(session) => {
                let body = json!({ "user_id": session.user_id, "device_id": session.device_id });
                self.watch = Some(self.services.watch_session(&session, token));
                self.auth = Some((session, token.to_owned()));
                out.send(json!({ "type": "auth", "id": id, "status": 200, "body": body }));
            }
            Err(e) => {
                let mut f = error_frame(id, e);
                f["type"] = "auth".into();
                out.send(f);
            }
        }
    }

    async fn on_sync(&mut self, frame: &Value, out: &Out, sync_loop: &mut Option<tokio::task::JoinHandle<()>>) {
        let id = frame.get("id").cloned().unwrap_or(Value::Null);
        let fail = |e: Error| {
            let mut f = error_frame(id.clone(), e);
            f["type"] = "sync".into();
            out.send(f);
        };
        let (Some((session, _)), Some(watch)) = (self.auth.clone(), self.watch.clone()) else {
            return fail(Error::new(ErrorKind::MissingToken, "Missing access token"));
        };
        if sync_loop.as_ref().is_some_and(|h| !h.is_finished()) {
            return fail(Error::invalid_param(
                "A sync loop is already running on this connection",
            ));
        }
        let filter = match frame.get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => Some(v.to_string()),
        };
        let filter = match self.services.sync_filter(&session, filter.as_deref()).await {
            Ok(f) => f,
            Err(e) => return fail(e),
        };
        let mut since = match frame.get("since") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return fail(Error::invalid_param("since must be a string")),
        };
        let set_presence = match frame.get("set_presence") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return fail(Error::invalid_param("set_presence must be a string")),
        };
        let services = self.services.clone();
        let out = out.clone();
        *sync_loop = Some(tokio::spawn(async move {
            loop {
                let req = SyncRequest {
                    since: since.clone(),
                    timeout_ms: if since.is_some() { SYNC_TIMEOUT_MS } else { 0 },
                    full_state: false,
                    filter: filter.clone(),
                    set_presence: set_presence.clone(),
                };
                let resp = match services.sync(&session, req).await {
                    // Nothing more reaches a revoked token.
                    Ok(r) => watch.check().await.map(|()| r),
                    Err(e) => Err(e),
                };
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => {
                        let mut f = error_frame(id.clone(), e);
                        f["type"] = "sync".into();
                        out.send(f);
                        return;
                    }
                };
                let next = resp["next_batch"].as_str().map(str::to_owned);
                let initial = since.is_none();
                if (initial || !weft_services::sync::is_empty(&resp))
                    && !out.send(json!({ "type": "sync", "body": resp }))
                {
                    return;
                }
                match next {
                    Some(n) => since = Some(n),
                    None => return,
                }
            }
        }));
    }

    /// Turns a request frame into an HTTP request for the router.
    fn build_request(&self, frame: Value) -> Result<Request, Error> {
        let method = match frame.get("method").and_then(Value::as_str) {
            Some("GET") => Method::GET,
            Some("PUT") => Method::PUT,
            Some("POST") => Method::POST,
            Some("DELETE") => Method::DELETE,
            _ => return Err(Error::bad_json("method must be one of GET, PUT, POST, DELETE")),
        };
        let path = frame
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| Error::bad_json("path must be a string starting with /"))?;
        if path.split('?').next() == Some(WS_PATH) {
            return Err(Error::invalid_param("Cannot nest the WebSocket endpoint"));
        }
        let body = match frame.get("body") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::to_vec(v).map_err(Error::internal)?,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .map_err(|e| Error::invalid_param(format!("Invalid path: {e}")))?;
        match &self.auth {
            // An application service's connection acts as the user (and
            // device) it authenticated as, unless the request names its
            // own `?user_id=` (then its token decides, as over HTTP).
            Some((session, _)) if session.appservice.is_some() && query_param(req.uri(), "user_id").is_none() => {
                req.extensions_mut().insert(Authenticated(session.clone()));
            }
            Some((_, token)) => {
                if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                    req.headers_mut().insert(header::AUTHORIZATION, v);
                }
            }
            None => {}
        }
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(peer);
        }
        Ok(req)
    }
}

/// Runs one request through the router; returns the status and JSON body.
async fn dispatch_one(dispatch: Router, req: Request) -> (u16, Value) {
    let resp = match dispatch.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let body = match axum::body::to_bytes(resp.into_body(), MAX_RESPONSE_BYTES).await {
        Ok(b) if b.is_empty() => json!({}),
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned())),
        Err(e) => return (500, Error::internal(e).body()),
    };
    (status, body)
}
