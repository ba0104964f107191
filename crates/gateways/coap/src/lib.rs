//! The CoAP+CBOR door: the Matrix Client-Server API over CoAP (RFC 7252)
//! on UDP, with CBOR bodies (Content-Format 60; JSON, 50, accepted too).
//!
//! The door decodes CoAP messages (with `coap-lite`), authenticates, and
//! calls the same `weft_services::Services` functions the HTTP door calls.
//! It adds only what CoAP itself needs: piggybacked or separate responses,
//! duplicate detection, Block-wise transfer (RFC 7959) and Observe on
//! `/sync` (RFC 7641). See docs/coap.md.
//!
//! The engine ([`Door`]) is generic over a [`Transport`]: plain UDP
//! ([`serve`]) or DTLS with a certificate or per-device pre-shared keys
//! ([`dtls::serve_dtls`]), which hands the engine the same CoAP messages
//! after decryption and, for a PSK session, tells it which device a peer
//! authenticated as.

pub mod cbor;
pub mod dtls;
#[doc(hidden)]
pub mod fuzzing;
mod message;
pub mod msc3079;
pub mod routes;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType as Method, ResponseType};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use weft_core::{Error, ErrorKind};
use weft_services::revocation::SessionWatch;
use weft_services::{Services, Session};

use crate::routes::{CF_CBOR, CF_JSON, Req, error_reply};

/// MSC3079's option number for the access token.
pub const OPTION_ACCESS_TOKEN: u16 = 256;
/// MSC3079's option number for the CBOR integer-key version (sticky).
pub const OPTION_CBOR_VERSION: u16 = 257;
/// RFC 7252 EXCHANGE_LIFETIME: how long a response is kept for duplicates.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Most remembered exchanges (duplicate detection) at once.
const MAX_EXCHANGES: usize = 20_000;
/// Most remembered peer tokens / block transfers at once.
const MAX_PEERS: usize = 10_000;
/// Most large bodies kept for Block2 / being assembled from Block1 at once,
/// and how long they are kept.
const MAX_BLOCK_BODIES: usize = 256;
const BLOCK_KEEP: Duration = Duration::from_secs(60);
/// Most observers of one peer, and in all.
const MAX_OBSERVERS_PER_PEER: usize = 8;
const MAX_OBSERVERS: usize = 10_000;
/// A handler slower than this gets an empty ACK and a separate response.
const SEPARATE_AFTER: Duration = Duration::from_millis(1000);
/// ACK_RANDOM_FACTOR (RFC 7252 §4.8), in thousandths; ACK_TIMEOUT and
/// MAX_RETRANSMIT are `[coap] ack_timeout_ms` and `max_retransmit`.
const ACK_RANDOM_FACTOR_MILLI: u64 = 1500;
/// Block size used for responses: 1024 bytes (SZX 6).
const BLOCK_SZX: u8 = 6;
/// Largest media upload over CoAP: Block1 bodies are assembled in memory.
const MAX_COAP_UPLOAD: usize = 16 * 1024 * 1024;
/// How long an observer's long-poll waits before polling again.
const OBSERVE_POLL_MS: u64 = 30_000;

/// Outcome of a confirmable message we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Acked,
    Reset,
    TimedOut,
}

enum Exchange {
    InProgress,
    Done(Vec<u8>),
}

#[derive(Default)]
struct State {
    exchanges: HashMap<(SocketAddr, u16), (Exchange, Instant)>,
    exchange_order: VecDeque<((SocketAddr, u16), Instant)>,
    /// Access token last presented by each peer.
    peer_tokens: HashMap<SocketAddr, String>,
    /// MSC3079 CBOR integer-key version each peer asked for (or used).
    peer_cbor: HashMap<SocketAddr, u32>,
    /// Confirmable messages we sent, waiting for ACK/RST.
    pending: HashMap<(SocketAddr, u16), oneshot::Sender<Delivery>>,
    /// Large response bodies, served block by block: (peer, uri) → body.
    blocks: HashMap<(SocketAddr, String), (Vec<u8>, u16, Instant)>,
    /// Block1 uploads being assembled: (peer, uri) → bytes so far.
    uploads: HashMap<(SocketAddr, String), (Vec<u8>, Instant)>,
    /// Observers: (peer, token) → the notifying task.
    observers: HashMap<(SocketAddr, Vec<u8>), tokio::task::AbortHandle>,
}

/// Where the CoAP engine's messages go: a datagram transport that knows
/// its peers by socket address.
pub trait Transport: Send + Sync + 'static {
    /// Sends one CoAP message to `peer` (errors are logged, not returned:
    /// CoAP has its own retransmission).
    fn send(&self, bytes: &[u8], peer: SocketAddr) -> impl std::future::Future<Output = ()> + Send;
    /// The pre-shared key identity `peer` authenticated with below CoAP
    /// (DTLS), if any. Requests from such a peer need no access token.
    fn peer_identity(&self, peer: SocketAddr) -> Option<String>;
}

/// Plain CoAP over UDP.
impl Transport for UdpSocket {
    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        if let Err(e) = self.send_to(bytes, peer).await {
            tracing::debug!("coap: send to {peer} failed: {e}");
        }
    }

    fn peer_identity(&self, _peer: SocketAddr) -> Option<String> {
        None
    }
}

/// The CoAP engine: one per listener, over its transport.
pub struct Door<T: Transport> {
    services: Arc<Services>,
    /// The endpoint layer every request is dispatched through.
    api: axum::Router,
    transport: Arc<T>,
    state: Mutex<State>,
    next_mid: AtomicU16,
    observe_seq: AtomicU32,
}

/// Serves CoAP on `socket` until the task is dropped. Bad datagrams are
/// ignored (or answered with RST); they never stop the loop.
pub async fn serve(services: Arc<Services>, socket: UdpSocket) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let door = Door::new(services, socket.clone());
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here; keep serving.
                tracing::debug!("coap: recv error: {e}");
                continue;
            }
        };
        door.clone().on_datagram(&buf[..n], peer).await;
    }
}

fn block_value(num: u32, more: bool, szx: u8) -> Vec<u8> {
    let v = (num << 4) | (u32::from(more) << 3) | u32::from(szx & 7);
    uint_bytes(v)
}

fn uint_bytes(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

fn parse_uint(b: &[u8]) -> u32 {
    b.iter().take(4).fold(0u32, |acc, x| (acc << 8) | u32::from(*x))
}

/// (num, more, szx)
fn parse_block(b: &[u8]) -> (u32, bool, u8) {
    let v = parse_uint(b);
    (v >> 4, v & 0x8 != 0, (v & 7) as u8)
}

fn opt_str(p: &Packet, o: CoapOption) -> Vec<String> {
    p.get_option(o)
        .map(|l| l.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect())
        .unwrap_or_default()
}

impl<T: Transport> Door<T> {
    pub fn new(services: Arc<Services>, transport: Arc<T>) -> Arc<Self> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Arc::new(Door {
            api: weft_api::dispatcher(&services),
            services,
            transport,
            state: Mutex::new(State::default()),
            next_mid: AtomicU16::new(seed as u16),
            observe_seq: AtomicU32::new(2),
        })
    }

    /// Forgets everything kept for `peer` (remembered token, CBOR version,
    /// block transfers, exchanges, observers): its transport session ended
    /// or a new one began at the same address.
    pub fn forget_peer(&self, peer: SocketAddr) {
        let mut st = self.state.lock();
        st.peer_tokens.remove(&peer);
        st.peer_cbor.remove(&peer);
        st.exchanges.retain(|(p, _), _| *p != peer);
        st.pending.retain(|(p, _), _| *p != peer);
        st.blocks.retain(|(p, _), _| *p != peer);
        st.uploads.retain(|(p, _), _| *p != peer);
        st.observers.retain(|(p, _), h| {
            if *p == peer {
                h.abort();
            }
            *p != peer
        });
    }

    /// Encodes a response body for `peer`: JSON if it asked for it, else
    /// CBOR, with MSC3079 integer keys if the peer uses them.
    fn encode_for(&self, v: &Value, cf: u16, peer: SocketAddr) -> Vec<u8> {
        if cf == CF_CBOR && self.state.lock().peer_cbor.get(&peer).copied().unwrap_or(0) >= 1 {
            msc3079::encode(v)
        } else {
            encode_body(v, cf)
        }
    }

    fn mid(&self) -> u16 {
        self.next_mid.fetch_add(1, Ordering::Relaxed)
    }

    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        self.transport.send(bytes, peer).await;
    }

    async fn reset(&self, mid: u16, peer: SocketAddr) {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Reset);
        p.header.code = MessageClass::Empty;
        p.header.message_id = mid;
        if let Ok(b) = p.to_bytes() {
            self.send(&b, peer).await;
        }
    }

    /// Handles one CoAP message from `peer` (plaintext, whatever the
    /// transport). Never fails: bad messages are answered with RST or dropped.
    pub async fn on_datagram(self: Arc<Self>, data: &[u8], peer: SocketAddr) {
        let (packet, method) = match message::classify(data) {
            message::Datagram::Request(packet, method) => (*packet, method),
            // A confirmable message we cannot parse, a ping, a stray
            // response: RST (RFC 7252 §4.2); anything else is ignored.
            message::Datagram::Bad(Some(mid)) | message::Datagram::NotRequest { mid, reset: true } => {
                self.reset(mid, peer).await;
                return;
            }
            message::Datagram::Bad(None) | message::Datagram::NotRequest { .. } => return,
            message::Datagram::Answer { mid, reset } => {
                let outcome = if reset { Delivery::Reset } else { Delivery::Acked };
                if let Some(tx) = self.state.lock().pending.remove(&(peer, mid)) {
                    let _ = tx.send(outcome);
                }
                return;
            }
        };
        let mid = packet.header.message_id;
        // Duplicate detection: replay the response, or wait for it.
        let cached = {
            let mut st = self.state.lock();
            let now = Instant::now();
            match st.exchanges.get(&(peer, mid)) {
                Some((Exchange::Done(b), _)) => Some(Some(b.clone())),
                Some((Exchange::InProgress, _)) => Some(None),
                None => {
                    // Expire old exchanges, then bound the cache.
                    while let Some((k, t)) = st.exchange_order.front().cloned() {
                        if now.duration_since(t) > EXCHANGE_LIFETIME || st.exchange_order.len() >= MAX_EXCHANGES {
                            st.exchange_order.pop_front();
                            if st.exchanges.get(&k).is_some_and(|(_, t2)| *t2 == t) {
                                st.exchanges.remove(&k);
                            }
                        } else {
                            break;
                        }
                    }
                    st.exchanges.insert((peer, mid), (Exchange::InProgress, now));
                    st.exchange_order.push_back(((peer, mid), now));
                    None
                }
            }
        };
        match cached {
            Some(Some(bytes)) => {
                self.send(&bytes, peer).await;
                return;
            }
            Some(None) => return,
            None => {}
        }
        tokio::spawn(async move { self.exchange(packet, method, peer).await });
    }

    fn finish_exchange(&self, peer: SocketAddr, mid: u16, bytes: &[u8]) {
        if let Some(e) = self.state.lock().exchanges.get_mut(&(peer, mid)) {
            e.0 = Exchange::Done(bytes.to_vec());
        }
    }

    /// Answers one request: piggybacked on the ACK if quick, else an empty
    /// ACK now and a separate confirmable response later.
    async fn exchange(self: Arc<Self>, req: Packet, method: Method, peer: SocketAddr) {
        let mid = req.header.message_id;
        let confirmable = req.header.get_type() == MessageType::Confirmable;
        let fut = self.clone().respond(req.clone(), method, peer);
        tokio::pin!(fut);
        let quick = if confirmable {
            tokio::select! {
                r = &mut fut => Some(r),
                _ = tokio::time::sleep(SEPARATE_AFTER) => None,
            }
        } else {
            Some(fut.as_mut().await)
        };
        match quick {
            Some(mut resp) => {
                resp.set_token(req.get_token().to_vec());
                if confirmable {
                    resp.header.set_type(MessageType::Acknowledgement);
                    resp.header.message_id = mid;
                } else {
                    resp.header.set_type(MessageType::NonConfirmable);
                    resp.header.message_id = self.mid();
                }
                let bytes = encode(&resp);
                self.finish_exchange(peer, mid, &bytes);
                self.send(&bytes, peer).await;
            }
            None => {
                let mut ack = Packet::new();
                ack.header.set_type(MessageType::Acknowledgement);
                ack.header.code = MessageClass::Empty;
                ack.header.message_id = mid;
                let bytes = encode(&ack);
                self.finish_exchange(peer, mid, &bytes);
                self.send(&bytes, peer).await;
                let mut resp = fut.await;
                resp.set_token(req.get_token().to_vec());
                let _ = self.send_confirmable(resp, peer).await;
            }
        }
    }

    /// Sends a CON message, retransmitting with exponential back-off until
    /// it is acknowledged, reset, or MAX_RETRANSMIT is exhausted. The first
    /// wait is ACK_TIMEOUT times a random factor in [1, ACK_RANDOM_FACTOR)
    /// so that many peers' retransmissions do not fall into step.
    async fn send_confirmable(&self, mut p: Packet, peer: SocketAddr) -> Delivery {
        let mid = self.mid();
        p.header.set_type(MessageType::Confirmable);
        p.header.message_id = mid;
        let bytes = encode(&p);
        let (tx, mut rx) = oneshot::channel();
        self.state.lock().pending.insert((peer, mid), tx);
        let coap = &self.services.config.coap;
        let base = coap.ack_timeout_ms.max(1);
        let spread = base * (ACK_RANDOM_FACTOR_MILLI - 1000) / 1000;
        let mut wait = Duration::from_millis(base + rand::random::<u64>() % spread.max(1));
        for _ in 0..=coap.max_retransmit.min(10) {
            self.send(&bytes, peer).await;
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(Ok(d)) => return d,
                Ok(Err(_)) => break,
                Err(_) => wait *= 2,
            }
        }
        self.state.lock().pending.remove(&(peer, mid));
        Delivery::TimedOut
    }

    /// Builds the response (code, options, payload) for a request.
    async fn respond(self: Arc<Self>, req: Packet, method: Method, peer: SocketAddr) -> Packet {
        let parts = message::Parts::of(&req, method);
        let uri_key = parts.uri_key.clone();
        let out_cf = parts.out_cf();
        let block2 = parts.block2;

        // A later block of a large response we already produced.
        if let Some((num, _, szx)) = block2
            && num > 0
        {
            let cached = self
                .state
                .lock()
                .blocks
                .get(&(peer, uri_key.clone()))
                .map(|(b, cf, _)| (b.clone(), *cf));
            if let Some((body, cf)) = cached {
                let mut resp = Packet::new();
                resp.header.code = MessageClass::Response(ResponseType::Content);
                resp.set_content_format_num(cf);
                put_block(&mut resp, &body, num, szx.min(BLOCK_SZX));
                return resp;
            }
        }

        // Block1: assemble the request body first.
        let mut payload = req.payload.clone();
        // Media uploads are files, bounded by the media repository's limit
        // (and, as the door assembles Block1 bodies in memory, by its own).
        let max_body = if routes::media_path(&parts.path).is_some() {
            usize::try_from(self.services.config.media.max_upload_bytes)
                .unwrap_or(usize::MAX)
                .min(MAX_COAP_UPLOAD)
        } else {
            self.services.config.limits.max_body_bytes
        };
        if let Some((num, more, szx)) = parts.block1 {
            let (_, offset) = message::block1_layout(num, szx);
            let key = (peer, uri_key.clone());
            let mut st = self.state.lock();
            let buf = if num == 0 {
                st.uploads.retain(|_, (_, t)| t.elapsed() < BLOCK_KEEP);
                if st.uploads.len() >= MAX_BLOCK_BODIES {
                    drop(st);
                    return error_packet(
                        &Error::new(ErrorKind::LimitExceeded { retry_after_ms: 5_000 }, "Too many uploads"),
                        out_cf,
                    );
                }
                st.uploads.insert(key.clone(), (Vec::new(), Instant::now()));
                st.uploads.get_mut(&key)
            } else {
                st.uploads.get_mut(&key)
            };
            let Some((buf, _)) = buf else {
                return error_packet(&incomplete(), out_cf);
            };
            if buf.len() != offset {
                st.uploads.remove(&key);
                return error_packet(&incomplete(), out_cf);
            }
            buf.extend_from_slice(&payload);
            if buf.len() > max_body {
                st.uploads.remove(&key);
                return error_packet(&Error::new(ErrorKind::TooLarge, "Request body too large"), out_cf);
            }
            if more {
                let mut resp = Packet::new();
                resp.header.code = MessageClass::Response(ResponseType::Continue);
                resp.add_option(CoapOption::Block1, block_value(num, true, szx));
                return resp;
            }
            payload = st.uploads.remove(&key).map(|(b, _)| b).unwrap_or_default();
        }
        if payload.len() > max_body {
            return error_packet(&Error::new(ErrorKind::TooLarge, "Request body too large"), out_cf);
        }

        let observe = parts.observe;
        let content_format = parts.content_format;
        // MSC3079: the CBOR key version is sticky per peer.
        let cbor_version = parts.cbor_version(&payload);
        if let Some(v) = cbor_version {
            let mut st = self.state.lock();
            if st.peer_cbor.len() >= MAX_PEERS && !st.peer_cbor.contains_key(&peer) {
                st.peer_cbor.clear();
            }
            st.peer_cbor.insert(peer, v);
        }
        let option_token = parts.option_token;
        let r = Req {
            method,
            path: parts.path,
            query: parts.query,
            payload,
            content_format,
            observe,
            block2,
        };
        let (reply, session) = match self.handle(&r, option_token, peer).await {
            Ok(answer) => answer,
            Err(e) => return error_packet(&e, out_cf),
        };
        if let Some(file) = reply.file {
            // A media file, one block per request (docs/coap.md, "Files").
            let mut resp = Packet::new();
            resp.header.code = MessageClass::Response(reply.code);
            resp.set_content_format_num(file.cf);
            let size = 1u64 << (file.szx + 4);
            let end = u64::from(file.num) * size + file.bytes.len() as u64;
            if block2.is_some() || file.total > size {
                resp.add_option(CoapOption::Block2, block_value(file.num, end < file.total, file.szx));
                if file.num == 0 {
                    resp.add_option(
                        CoapOption::Size2,
                        uint_bytes(u32::try_from(file.total).unwrap_or(u32::MAX)),
                    );
                }
            }
            resp.payload = file.bytes;
            return resp;
        }
        let mut resp = Packet::new();
        resp.header.code = MessageClass::Response(reply.code);
        resp.set_content_format_num(out_cf);
        if let Some(m) = reply.max_age {
            resp.add_option(CoapOption::MaxAge, uint_bytes(m));
        }
        let body = self.encode_for(&reply.body, out_cf, peer);
        // Observe registration on /sync or a room's /messages.
        let what = match (r.method, observe, &session, routes::cs_path(&r.path)) {
            _ if !reply.is_success() => None,
            (Method::Get, Some(0), Some(_), Some(p)) if routes::is_sync(&p) => {
                let since = reply.body.get("next_batch").and_then(Value::as_str).map(str::to_owned);
                Some(Watch::Sync {
                    since,
                    filter: r.q("filter").map(str::to_owned),
                })
            }
            (Method::Get, Some(0), Some(_), Some(p))
                if matches!(p.as_slice(), ["rooms", _, "messages"])
                    && r.q("from").is_none()
                    && r.q("dir").is_none_or(|d| d == "b") =>
            {
                // A backwards page without `from` starts at "now".
                let since = reply
                    .body
                    .get("start")
                    .and_then(Value::as_str)
                    .and_then(|t| weft_services::tokens::parse_token(t).ok());
                match (since, self.services.resolve_room(p[1]).await) {
                    (Some(since), Ok(room)) => Some(Watch::Room { room, since }),
                    _ => None,
                }
            }
            _ => None,
        };
        if let (Some(what), Some(auth)) = (what, session)
            && self.observer_room(peer, req.get_token())
        {
            let seq = self.observe_seq.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
            resp.add_option(CoapOption::Observe, uint_bytes(seq));
            self.clone()
                .observe(peer, req.get_token().to_vec(), auth, what, uri_key.clone(), out_cf);
        } else if observe == Some(1)
            && let Some(h) = self.state.lock().observers.remove(&(peer, req.get_token().to_vec()))
        {
            h.abort();
        }
        self.attach_body(&mut resp, body, out_cf, peer, uri_key, block2.map(|b| b.2));
        resp
    }

    /// Puts `body` in the response, or its first block (Block2) when it
    /// is larger than one block, keeping the rest for later requests.
    fn attach_body(
        &self,
        resp: &mut Packet,
        body: Vec<u8>,
        cf: u16,
        peer: SocketAddr,
        uri_key: String,
        szx: Option<u8>,
    ) {
        let Some(szx) = message::first_block(body.len(), szx) else {
            resp.payload = body;
            return;
        };
        put_block(resp, &body, 0, szx);
        let mut st = self.state.lock();
        st.blocks.retain(|_, (_, _, t)| t.elapsed() < BLOCK_KEEP);
        while st.blocks.len() >= MAX_BLOCK_BODIES {
            let oldest = st.blocks.iter().min_by_key(|(_, (_, _, t))| *t).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => st.blocks.remove(&k),
                None => break,
            };
        }
        st.blocks.insert((peer, uri_key), (body, cf, Instant::now()));
    }

    /// Waits for what an observer should be told next: a sync batch with
    /// news, or new events of the room (as a forward `/messages` page).
    /// `None` when the wait ended with nothing to tell.
    async fn next_batch(&self, session: &Session, what: &mut Watch) -> weft_core::Result<Option<Value>> {
        match what {
            Watch::Sync { since, filter } => {
                let batch = routes::sync_json(
                    &self.services,
                    session,
                    since.clone(),
                    OBSERVE_POLL_MS,
                    filter.as_deref(),
                    false,
                )
                .await?;
                let next = batch.get("next_batch").and_then(Value::as_str).map(str::to_owned);
                if next.is_none() || next == *since {
                    return Ok(None);
                }
                *since = next;
                Ok(sync_has_news(&batch).then_some(batch))
            }
            Watch::Room { room, since } => {
                let feed = self
                    .services
                    .wait_room_events(
                        &session.user_id,
                        std::slice::from_ref(room),
                        *since,
                        100,
                        Duration::from_millis(OBSERVE_POLL_MS),
                    )
                    .await?;
                let start = *since;
                *since = feed.next.max(*since);
                if feed.events.is_empty() {
                    return Ok(None);
                }
                Ok(Some(serde_json::json!({
                    "chunk": feed.client_events(session),
                    "start": weft_services::tokens::make_token(start),
                    "end": weft_services::tokens::make_token(*since),
                })))
            }
        }
    }

    /// Whether one more observer fits (a re-registration always does). If
    /// not, the response goes out without Observe: not registered.
    fn observer_room(&self, peer: SocketAddr, token: &[u8]) -> bool {
        let st = self.state.lock();
        st.observers.contains_key(&(peer, token.to_vec()))
            || (st.observers.len() < MAX_OBSERVERS
                && st.observers.keys().filter(|(p, _)| *p == peer).count() < MAX_OBSERVERS_PER_PEER)
    }

    /// Authenticates (a token presented or remembered for the peer, or
    /// the DTLS session's pre-shared key) and dispatches to the endpoint.
    async fn handle(
        &self,
        r: &Req,
        option_token: Option<String>,
        peer: SocketAddr,
    ) -> weft_core::Result<(routes::Reply, Option<Arc<SessionWatch>>)> {
        let media = routes::media_path(&r.path);
        let p = match &media {
            Some(_) => Vec::new(),
            None => routes::cs_path(&r.path).ok_or_else(|| {
                Error::new(
                    ErrorKind::Unrecognized {
                        method_not_allowed: false,
                    },
                    "Unrecognized request",
                )
            })?,
        };
        let run = |session: Option<Session>| {
            let media = media.clone();
            let p = p.clone();
            async move {
                match &media {
                    Some(path) => routes::dispatch_media(&self.api, session.as_ref(), Some(peer), path, r).await,
                    None => routes::dispatch(&self.api, session.as_ref(), Some(peer), &p, r).await,
                }
            }
        };
        if media.is_none() && routes::is_public(&p) {
            return Ok((run(None).await?, None));
        }
        let presented = r.query_token().map(str::to_owned).or(option_token);
        // A DTLS session set up with a device's pre-shared key is that
        // device; an explicit token still wins. The key is looked up again
        // for every request, so revoking it takes effect at once.
        if presented.is_none()
            && let Some(identity) = self.transport.peer_identity(peer)
        {
            let Some((session, _)) = self.services.accounts.psk_owner(&identity).await? else {
                return Err(Error::new(
                    ErrorKind::UnknownToken { soft_logout: false },
                    "The pre-shared key of this DTLS session was revoked",
                ));
            };
            let reply = run(Some(session.clone())).await?;
            return Ok((reply, Some(self.services.watch_psk_session(&session, &identity))));
        }
        let token = match &presented {
            Some(t) => Some(t.clone()),
            None => self.state.lock().peer_tokens.get(&peer).cloned(),
        };
        let Some(token) = token else {
            // The endpoint decides whether it needs a caller; the request
            // is charged to the peer's IP.
            return Ok((run(None).await?, None));
        };
        // An application service's token acts as it does over HTTP: as
        // its sender, or the user (and device) the request names.
        let session = self
            .services
            .authenticate(
                &token,
                r.q("user_id"),
                r.q(weft_api::endpoint::MASQUERADE_DEVICE),
                Some(peer.ip()),
            )
            .await?;
        if presented.is_some() {
            let mut st = self.state.lock();
            if st.peer_tokens.len() >= MAX_PEERS && !st.peer_tokens.contains_key(&peer) {
                st.peer_tokens.clear();
            }
            st.peer_tokens.insert(peer, token.clone());
        }
        let reply = run(Some(session.clone())).await?;
        Ok((reply, Some(self.services.watch_session(&session, &token))))
    }

    /// Registers an observer of `/sync`: each new sync batch after `since`
    /// is pushed as a confirmable notification; an observer that resets or
    /// stops acknowledging is dropped.
    /// Notifications use `cf`, the Content-Format the registration asked for.
    fn observe(
        self: Arc<Self>,
        peer: SocketAddr,
        token: Vec<u8>,
        watch: Arc<SessionWatch>,
        mut what: Watch,
        uri_key: String,
        cf: u16,
    ) {
        let door = self.clone();
        let key = (peer, token.clone());
        // Spawned under the lock, so the task cannot look itself up before
        // it is registered.
        let mut st = self.state.lock();
        let task = tokio::spawn(async move {
            let session = watch.session().clone();
            loop {
                // The credential is checked again before every notification,
                // and a revocation ends a waiting observer at once: a
                // logged-out token or revoked key stops it.
                let next = tokio::select! {
                    next = door.next_batch(&session, &mut what) => match next {
                        Ok(b) => watch.check().await.map(|()| b),
                        Err(e) => Err(e),
                    },
                    e = watch.revoked() => Err(e),
                };
                let batch = match next {
                    Ok(Some(b)) => b,
                    Ok(None) => continue,
                    Err(e) => {
                        // Tell the observer why, then stop.
                        let mut p = error_packet(&e, cf);
                        p.set_token(token.clone());
                        let _ = door.send_confirmable(p, peer).await;
                        break;
                    }
                };
                let mut p = Packet::new();
                p.header.code = MessageClass::Response(ResponseType::Content);
                p.set_token(token.clone());
                let seq = door.observe_seq.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
                p.add_option(CoapOption::Observe, uint_bytes(seq));
                p.set_content_format_num(cf);
                let body = door.encode_for(&batch, cf, peer);
                door.attach_body(&mut p, body, cf, peer, uri_key.clone(), None);
                if door.send_confirmable(p, peer).await != Delivery::Acked {
                    break;
                }
            }
            // Deregister, unless a newer registration took this slot.
            let me = tokio::task::id();
            let mut st = door.state.lock();
            if st.observers.get(&(peer, token.clone())).is_some_and(|h| h.id() == me) {
                st.observers.remove(&(peer, token));
            }
        });
        if let Some(old) = st.observers.insert(key, task.abort_handle()) {
            old.abort();
        }
    }
}

/// What an observer watches.
enum Watch {
    /// `/sync` from this `next_batch`.
    Sync {
        since: Option<String>,
        filter: Option<String>,
    },
    /// A room's new events after this stream position.
    Room { room: ruma::OwnedRoomId, since: i64 },
}

/// Whether a sync batch carries anything for the client (a long-poll that
/// timed out, or woke for another user's change, does not).
fn sync_has_news(v: &Value) -> bool {
    [
        "/rooms/join",
        "/rooms/invite",
        "/rooms/leave",
        "/rooms/knock",
        "/account_data/events",
        "/to_device/events",
        "/presence/events",
        "/device_lists/changed",
        "/device_lists/left",
    ]
    .iter()
    .any(|p| match v.pointer(p) {
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        _ => false,
    })
}

trait ContentFormatNum {
    fn set_content_format_num(&mut self, cf: u16);
}

impl ContentFormatNum for Packet {
    fn set_content_format_num(&mut self, cf: u16) {
        self.clear_option(CoapOption::ContentFormat);
        self.add_option(CoapOption::ContentFormat, uint_bytes(u32::from(cf)));
    }
}

fn incomplete() -> Error {
    Error::new(ErrorKind::InvalidParam, "Block1 transfer out of order or unknown").with_status(408)
}

fn put_block(resp: &mut Packet, body: &[u8], num: u32, szx: u8) {
    let size = 1usize << (szx + 4);
    let start = (num as usize).saturating_mul(size).min(body.len());
    let end = (start + size).min(body.len());
    resp.payload = body[start..end].to_vec();
    resp.clear_option(CoapOption::Block2);
    resp.add_option(CoapOption::Block2, block_value(num, end < body.len(), szx));
    if num == 0 {
        resp.add_option(CoapOption::Size2, uint_bytes(body.len() as u32));
    }
}

fn encode_body(v: &Value, cf: u16) -> Vec<u8> {
    if cf == CF_JSON {
        serde_json::to_vec(v).unwrap_or_default()
    } else {
        cbor::from_json(v)
    }
}

/// An error response: code from [`routes::error_reply`], Matrix error body.
fn error_packet(e: &Error, cf: u16) -> Packet {
    let routes::Reply {
        code, body, max_age, ..
    } = error_reply(e);
    let code = if e.status == Some(408) {
        ResponseType::RequestEntityIncomplete
    } else {
        code
    };
    let mut p = Packet::new();
    p.header.code = MessageClass::Response(code);
    p.set_content_format_num(cf);
    if let Some(m) = max_age {
        p.add_option(CoapOption::MaxAge, uint_bytes(m));
    }
    p.payload = encode_body(&body, cf);
    p
}

fn encode(p: &Packet) -> Vec<u8> {
    match p.to_bytes_unlimited() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("coap: cannot encode response: {e:?}");
            let mut q = Packet::new();
            q.header = p.header.clone();
            q.set_token(p.get_token().to_vec());
            q.header.code = MessageClass::Response(ResponseType::InternalServerError);
            q.to_bytes_unlimited().unwrap_or_default()
        }
    }
}
