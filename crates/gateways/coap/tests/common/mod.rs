//! Harness for the CoAP door tests: the workspace's [`TestServer`]
//! (weft-testkit: the real `weft` binary on free ports, HTTP on TCP, CoAP
//! on UDP, and its Matrix HTTP client for registering users and reading
//! rooms back), and a small CoAP client built on `coap-lite` messages over
//! a real UDP socket (and libcoap's `coap-client` where installed).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
pub use weft_testkit::{TestServer, enc, of_type};

/// A [`TestServer`] (which it dereferences to) with the CoAP listeners.
pub struct Server {
    inner: TestServer,
    pub coap: SocketAddr,
    /// The DTLS listener (`coaps://`).
    pub coaps: SocketAddr,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts with extra environment settings.
    pub async fn start_with(env: &[(&str, &str)]) -> Server {
        let mut builder = TestServer::builder().with_coap();
        for (k, v) in env {
            builder = builder.env(k, v);
        }
        let inner = builder.start().await;
        Server {
            coap: inner.addrs().coap.expect("coap addr"),
            coaps: inner.addrs().coaps.expect("coaps addr"),
            inner,
        }
    }

    /// A fresh server with user `alice` (her access token) and a room she made.
    pub async fn with_alice_and_room() -> (Server, String, String) {
        let s = Server::start().await;
        let (token, _) = register(&s, "alice").await;
        let room = create_room(&s, &token).await;
        (s, token, room)
    }

    /// Runs `weft user psk NAME --device-id DEVICE` on the server's data
    /// directory (as an operator would, with the server running) and
    /// returns the (identity, key) it prints.
    pub async fn mint_psk(&self, name: &str, device: &str) -> (String, String) {
        let (ok, stdout, stderr) = self.cli("user", "psk", &[name, "--device-id", device]);
        assert!(ok, "weft user psk: {stdout}{stderr}");
        let field = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name:?} line in {stdout:?}"))
                .trim()
                .to_owned()
        };
        (field("identity "), field("key "))
    }

    /// Events of `event_type` in the room, oldest first, via HTTP `/messages`.
    pub async fn http_messages(&self, token: &str, room: &str, event_type: &str) -> Vec<Value> {
        let page = self.with_token(token).messages(room, None, "f", 1000).await;
        of_type(page["chunk"].as_array().expect("chunk"), event_type)
    }
}

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.inner
    }
}

/// Registers `name` over HTTP; (access token, user ID), the strings the
/// CoAP requests carry.
pub async fn register(s: &TestServer, name: &str) -> (String, String) {
    let c = s.register(name).await;
    (c.access_token, c.user_id)
}

/// A room made over HTTP by the holder of `token`.
pub async fn create_room(s: &TestServer, token: &str) -> String {
    s.with_token(token).create_room(json!({})).await
}

pub fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

pub fn uncbor(b: &[u8]) -> Value {
    ciborium::from_reader(b).unwrap_or_else(|e| panic!("response is not CBOR ({e}): {b:?}"))
}

/// A confirmable request packet with message ID `mid` and token `token`.
pub fn request_packet(r: &Request<'_>, mid: u16, token: u32) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(r.method);
    p.header.message_id = mid;
    p.set_token(token.to_be_bytes().to_vec());
    for seg in r.path.trim_start_matches('/').split('/') {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    if let Some(cf) = r.content_format {
        p.add_option(CoapOption::ContentFormat, vec![cf as u8]);
    }
    for q in &r.query {
        p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
    }
    for (o, v) in &r.options {
        p.add_option(*o, v.clone());
    }
    p.payload = r.payload.clone();
    p
}

/// A small CoAP client: confirmable requests, separate responses, Block2.
pub struct Client {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    mid: u16,
    token: u32,
}

pub struct Request<'a> {
    pub method: RequestType,
    pub path: &'a str,
    pub query: Vec<String>,
    pub payload: Vec<u8>,
    pub content_format: Option<u16>,
    pub options: Vec<(CoapOption, Vec<u8>)>,
}

impl<'a> Request<'a> {
    pub fn new(method: RequestType, path: &'a str) -> Self {
        Request {
            method,
            path,
            query: vec![],
            payload: vec![],
            content_format: None,
            options: vec![],
        }
    }
    pub fn q(mut self, k: &str, v: &str) -> Self {
        self.query.push(format!("{k}={v}"));
        self
    }
    pub fn cbor(mut self, v: &Value) -> Self {
        self.payload = cbor(v);
        self.content_format = Some(60);
        self
    }
    pub fn opt(mut self, o: CoapOption, v: Vec<u8>) -> Self {
        self.options.push((o, v));
        self
    }
}

impl Client {
    pub async fn new(server: SocketAddr) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Client {
            sock,
            server,
            mid: 1000,
            token: 1,
        }
    }

    pub fn packet(&mut self, r: &Request<'_>) -> Packet {
        self.mid = self.mid.wrapping_add(1);
        self.token += 1;
        request_packet(r, self.mid, self.token)
    }

    /// Sends raw bytes and waits for one datagram (or `None` after `wait`).
    pub async fn raw(&self, bytes: &[u8], wait: Duration) -> Option<Packet> {
        self.sock.send_to(bytes, self.server).await.unwrap();
        self.recv(wait).await
    }

    pub async fn recv(&self, wait: Duration) -> Option<Packet> {
        let mut buf = vec![0u8; 65_536];
        match tokio::time::timeout(wait, self.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(Packet::from_bytes(&buf[..n]).expect("server sent a valid CoAP message")),
            _ => None,
        }
    }

    /// Sends a confirmable request and returns the response, following a
    /// separate response and Block2 continuation.
    pub async fn send_packet(&mut self, p: &Packet) -> Packet {
        let bytes = p.to_bytes_unlimited().unwrap();
        let mut resp = None;
        for _ in 0..4 {
            if let Some(r) = self.raw(&bytes, Duration::from_secs(5)).await {
                resp = Some(r);
                break;
            }
        }
        let mut resp = resp.expect("no response from the CoAP door");
        if resp.header.code == MessageClass::Empty {
            // Separate response: wait for the CON, then ACK it.
            assert_eq!(resp.header.get_type(), MessageType::Acknowledgement);
            resp = self.recv(Duration::from_secs(40)).await.expect("separate response");
            self.ack(&resp).await;
        }
        assert_eq!(resp.get_token(), p.get_token(), "response token matches request");
        resp
    }

    pub async fn ack(&self, p: &Packet) {
        if p.header.get_type() == MessageType::Confirmable {
            let mut a = Packet::new();
            a.header.set_type(MessageType::Acknowledgement);
            a.header.code = MessageClass::Empty;
            a.header.message_id = p.header.message_id;
            self.sock.send_to(&a.to_bytes().unwrap(), self.server).await.unwrap();
        }
    }

    /// Request → (code, whole payload), fetching further Block2 blocks.
    pub async fn call(&mut self, r: Request<'_>) -> (ResponseType, Vec<u8>) {
        let p = self.packet(&r);
        let resp = self.send_packet(&p).await;
        let code = match resp.header.code {
            MessageClass::Response(c) => c,
            other => panic!("not a response: {other:?}"),
        };
        let mut body = resp.payload.clone();
        let mut block = resp.get_first_option(CoapOption::Block2).cloned();
        while let Some(b) = block {
            let v = b.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x));
            if v & 0x8 == 0 {
                break;
            }
            let num = (v >> 4) + 1;
            let val = (num << 4) | (v & 7);
            let mut next = Request::new(r.method, r.path);
            next.query = r.query.clone();
            next.options = r
                .options
                .iter()
                .filter(|(o, _)| *o != CoapOption::Observe)
                .cloned()
                .collect();
            next.options.push((CoapOption::Block2, uint_opt(val)));
            let np = self.packet(&next);
            let nr = self.send_packet(&np).await;
            body.extend_from_slice(&nr.payload);
            block = nr.get_first_option(CoapOption::Block2).cloned();
        }
        (code, body)
    }

    /// Sends `body` as `r`'s payload in 1024-byte Block1 blocks, each but
    /// the last answered 2.31 Continue (asserted); the last answer.
    pub async fn send_block1(&mut self, r: &Request<'_>, body: &[u8]) -> Packet {
        let chunks: Vec<&[u8]> = body.chunks(1024).collect();
        let mut last = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let more = i + 1 < chunks.len();
            let mut b = Request::new(r.method, r.path);
            b.query = r.query.clone();
            b.content_format = r.content_format;
            b.options = r.options.clone();
            b.options.push((
                CoapOption::Block1,
                uint_opt(((i as u32) << 4) | (u32::from(more) << 3) | 6),
            ));
            b.payload = chunk.to_vec();
            let p = self.packet(&b);
            let resp = self.send_packet(&p).await;
            if more {
                assert_eq!(
                    resp.header.code,
                    MessageClass::Response(ResponseType::Continue),
                    "block {i}"
                );
            }
            last = Some(resp);
        }
        last.expect("a body of at least one block")
    }

    pub async fn call_cbor(&mut self, r: Request<'_>) -> (ResponseType, Value) {
        let (code, body) = self.call(r).await;
        (code, uncbor(&body))
    }
}

/// The first of `names` that runs, if any.
fn first_installed(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find(|name| weft_testkit::installed(name))
        .map(|n| (*n).to_owned())
}

/// A missing external tool: a note and `None` locally, a failure under CI
/// (env `CI` set), where `.ci/run` installs it.
fn missing(what: &str) -> Option<String> {
    weft_testkit::tool_missing(what, "apt-get install libcoap3-bin");
    None
}

/// A libcoap client built with DTLS (`coap-client-openssl`, or
/// `coap-client-gnutls`), if installed; `prefer` first.
pub fn coap_client_dtls(prefer: &str) -> Option<String> {
    first_installed(&[prefer, "coap-client-openssl", "coap-client-gnutls"])
        .or_else(|| missing("libcoap's coap-client-openssl"))
}

/// Exactly the libcoap client `name` (e.g. `coap-client-gnutls`), if
/// installed.
pub fn coap_client_named(name: &str) -> Option<String> {
    first_installed(&[name]).or_else(|| missing(&format!("libcoap's {name}")))
}

/// libcoap's client, if installed.
pub fn coap_client() -> Option<String> {
    first_installed(&[
        "coap-client",
        "coap-client-notls",
        "coap-client-openssl",
        "coap-client-gnutls",
    ])
    .or_else(|| missing("libcoap's coap-client"))
}

/// A CoAP uint option's value: big-endian, without leading zero bytes.
pub fn uint_opt(v: u32) -> Vec<u8> {
    let vb = v.to_be_bytes();
    let skip = vb.iter().take_while(|x| **x == 0).count();
    vb[skip..].to_vec()
}
