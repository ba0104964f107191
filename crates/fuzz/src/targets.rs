//! The targets. Each takes fuzz input (see [`crate::mutate`]), runs one
//! door's decoding on it, and panics only where an invariant is broken.

use std::sync::OnceLock;

use bytes::BytesMut;
use serde_json::Value;
use weft_coap::fuzzing::{self as coap_door, Datagram};
use weft_mqtt::fuzzing::{self as mq, Frame, In, Out, Version};

fn seeds(cell: &'static OnceLock<Vec<Vec<u8>>>, make: fn() -> Vec<Vec<u8>>) -> &'static [Vec<u8>] {
    cell.get_or_init(make)
}

// ---------------------------------------------------------------------------
// MQTT

/// How a run of `frame` over a buffer ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Incomplete,
    TooLarge,
    Malformed,
}

/// Frames `data` as one read (`chunk == 0`) or as reads of `chunk` bytes,
/// the way a connection does: whole packets, then how it stopped.
fn frames(data: &[u8], chunk: usize) -> (Vec<Vec<u8>>, End) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = if chunk == 0 {
        vec![data]
    } else {
        data.chunks(chunk).collect()
    };
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            let before = buf.len();
            match mq::frame(&mut buf) {
                Frame::Packet(p) => {
                    assert!(
                        !p.is_empty() && p.len() <= mq::MAX_PACKET + 5,
                        "frame of {} bytes",
                        p.len()
                    );
                    assert_eq!(buf.len() + p.len(), before, "frame lost or invented bytes");
                    out.push(p.to_vec());
                }
                Frame::Incomplete => {
                    assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                    break;
                }
                Frame::TooLarge => return (out, End::TooLarge),
                Frame::Malformed => return (out, End::Malformed),
            }
        }
    }
    (out, End::Incomplete)
}

/// A byte stream from a client: framing (in one read and in small reads,
/// which must agree), the CONNECT, then each packet in the connection's
/// version and, for good measure, in the other one too; decoded topics
/// and filters go through the topic parser; a decoded PUBLISH re-encodes
/// to itself.
pub fn mqtt(input: &[u8]) {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let data = crate::mutate(seeds(&SEEDS, crate::seeds::mqtt), input);
    let chunk = 1 + input.len() % 7;
    let whole = frames(&data, 0);
    assert_eq!(whole, frames(&data, chunk), "framing depends on how the bytes arrive");
    let (packets, _) = whole;

    let mut version = None;
    for (i, p) in packets.into_iter().enumerate() {
        if i == 0 {
            // conn.rs: a stream that does not start with CONNECT is dropped.
            if p[0] != 0x10 {
                return;
            }
            let level = mq::connect_level(&p);
            match mq::decode_connect(BytesMut::from(&p[..])) {
                Ok(c) => {
                    let v = if level == Some(4) { Version::V311 } else { Version::V5 };
                    assert!(matches!(level, Some(4 | 5)), "CONNECT accepted at level {level:?}");
                    assert_eq!(c.version, v);
                    if let Some(w) = &c.will {
                        let _ = weft_mqtt::topics::parse_publish(&w.topic);
                    }
                    version = Some(v);
                }
                // conn.rs answers with a CONNACK (if it can tell the
                // version) and closes; fuzz the rest anyway.
                Err(_) => version = Some(if level == Some(5) { Version::V5 } else { Version::V311 }),
            }
            continue;
        }
        let v = version.unwrap_or(Version::V311);
        let other = if v == Version::V5 { Version::V311 } else { Version::V5 };
        let _ = mq::decode(other, BytesMut::from(&p[..]));
        match mq::decode(v, BytesMut::from(&p[..])) {
            Ok(In::Publish {
                topic,
                qos,
                pkid,
                payload,
            }) => {
                let _ = weft_mqtt::topics::parse_publish(&topic);
                if qos > 0 && pkid == 0 {
                    continue;
                }
                let mut buf = BytesMut::new();
                let out = Out::Publish {
                    topic: topic.clone(),
                    qos,
                    pkid,
                    retain: false,
                    dup: false,
                    payload: payload.clone(),
                };
                mq::encode(v, out, &mut buf);
                let (again, _) = frames(&buf, 0);
                assert_eq!(again.len(), 1, "a decoded PUBLISH does not re-encode to one packet");
                match mq::decode(v, BytesMut::from(&again[0][..])) {
                    Ok(In::Publish {
                        topic: t,
                        qos: q,
                        pkid: k,
                        payload: b,
                    }) => assert_eq!((t, q, k, b), (topic, qos, pkid, payload), "PUBLISH round trip"),
                    other => panic!("re-encoded PUBLISH decodes as {other:?}"),
                }
            }
            Ok(In::Subscribe { filters, .. }) => {
                for (f, _) in &filters {
                    if let Some(room) = weft_mqtt::topics::parse_filter(f) {
                        let _ = weft_mqtt::topics::prefix(&room, "!r:x");
                    }
                    let _ = weft_mqtt::topics::matches(f, "weft/r/!r:x/e/m.room.message");
                }
            }
            Ok(In::Unsubscribe { filters, .. }) => {
                for f in &filters {
                    let _ = weft_mqtt::topics::parse_filter(f);
                }
            }
            Ok(_) | Err(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// CoAP

/// One datagram through the door's parsing (coap-lite, options, path
/// enums, Block1/Block2, token option, CBOR key version), the body
/// decoders the routes use, and the response the door would build; the
/// response must parse back with the request's token and block.
pub fn coap(input: &[u8]) {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let data = crate::mutate(seeds(&SEEDS, crate::seeds::coap), input);
    let Datagram::Request(parsed) = coap_door::request(&data) else {
        return;
    };
    let r = &parsed.req;
    let _ = r.query_token();
    let _ = r.q("filter");
    let body = r.json_body();
    let content = r.content();
    if let (Some(60), Ok(b), Ok(c)) = (r.content_format, &body, &content) {
        assert_eq!(b, c, "CBOR content and body differ");
    }
    let reply = match (&body, &content) {
        (Ok(v), _) | (_, Ok(v)) => v.clone(),
        _ => Value::Null,
    };
    let bytes = coap_door::response(&parsed, &reply, body.is_err());
    let resp = coap_lite::Packet::from_bytes(&bytes).expect("the door's response parses");
    assert_eq!(resp.get_token(), &parsed.token[..], "response token");
    if let Some((num, _, szx)) = parsed.block2
        && body.is_ok()
    {
        let b2 = resp
            .get_first_option(coap_lite::CoapOption::Block2)
            .map(|v| v.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x)));
        // The door answers the block asked for, at most at its own size.
        if num > 0 || szx < 6 {
            let b2 = b2.expect("Block2 answered without Block2 option");
            assert_eq!(b2 >> 4, num, "Block2 number");
            assert!(b2 & 7 <= 6 && resp.payload.len() <= 1 << ((b2 & 7) + 4), "Block2 size");
        }
    }
}

// ---------------------------------------------------------------------------
// CBOR

/// The hand-written CBOR decoder: both entry points agree; whatever it
/// decodes re-encodes (plainly, and with MSC3079 integer keys) to CBOR
/// that decodes to the same JSON.
pub fn cbor(input: &[u8]) {
    use weft_coap::{cbor, msc3079};
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let data = crate::mutate(seeds(&SEEDS, crate::seeds::cbor), input);
    let keyed = cbor::to_json_with_keys(&data);
    let plain = cbor::to_json(&data);
    assert_eq!(
        plain.ok(),
        keyed.as_ref().ok().map(|(v, _)| v.clone()),
        "to_json and to_json_with_keys differ"
    );
    let Ok((v, _)) = keyed else { return };
    let again = cbor::to_json_with_keys(&cbor::from_json(&v));
    assert_eq!(again, Ok((v.clone(), false)), "decode → encode → decode");
    let again = cbor::to_json_with_keys(&msc3079::encode(&v)).map(|(v, _)| v);
    assert_eq!(again, Ok(v), "decode → encode with integer keys → decode");
}

// ---------------------------------------------------------------------------
// Door payloads

/// `door_content`: never a panic; JSON objects (after number quoting)
/// are accepted whenever they are valid JSON, text and bytes are wrapped
/// losslessly, and what comes out is canonical JSON.
pub fn door_content(input: &[u8]) {
    use base64::Engine;
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let data = crate::mutate(seeds(&SEEDS, crate::seeds::door_content), input);
    let got = weft_services::content::door_content(&data);
    match std::str::from_utf8(&data) {
        Ok(text) if text.trim_start().starts_with('{') => {
            if serde_json::from_str::<Value>(text).is_ok() {
                assert!(
                    got.is_ok(),
                    "valid JSON object refused: {text:?}: {:?}",
                    got.as_ref().err()
                );
            }
        }
        Ok(text) => {
            let obj = got.as_ref().expect("text is always accepted");
            assert_eq!(obj.get("body").and_then(|v| v.as_str()), Some(text));
        }
        Err(_) => {
            let obj = got.as_ref().expect("bytes are always accepted");
            let b64 = obj.get("body_base64").and_then(|v| v.as_str()).expect("body_base64");
            let back = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
            assert_eq!(back, data);
        }
    }
    if let Ok(obj) = got {
        // What the services get is canonical JSON and reads back as such.
        let text = ruma::CanonicalJsonValue::Object(obj).to_string();
        let back: Value = serde_json::from_str(&text).expect("canonical JSON parses");
        assert!(
            ruma::CanonicalJsonValue::try_from(back).is_ok(),
            "not canonical: {text}"
        );
    }
}

// ---------------------------------------------------------------------------
// CoAP requests through the services

/// Path segments whose requests [`coap_requests`] does not make: they end
/// the session or the membership every other request needs.
const SKIP: &[&str] = &[
    "logout",
    "deactivate",
    "password",
    "leave",
    "forget",
    "kick",
    "ban",
    "devices",
    "delete_devices",
];

/// What [`coap_requests`] runs against: the shared services on a fresh
/// data directory (no listener, no network), one user with a session and
/// one room the seeds name.
pub struct Server {
    rt: tokio::runtime::Runtime,
    /// The endpoint layer the door dispatches to.
    api: axum::Router,
    session: weft_services::Session,
    seeds: Vec<Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Self {
        use weft_coap::routes::{CF_CBOR, Req, dispatch};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = weft_core::Config::default();
        config.rate_limit.enabled = false;
        config.limits.max_sync_timeout_ms = 0;
        config.database.synchronous = "normal".into();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _rt = rt.enter();
        let key = weft_rooms::keys::load_or_create(dir.path()).expect("signing key");
        let store = weft_store::open(&config, dir.path()).expect("store");
        let blobs = weft_services::media::open_blobs(&config, dir.path()).expect("media directory");
        let services = weft_services::Services::new(config, store, key, blobs).expect("services");
        let api = weft_api::dispatcher(&services);
        let (session, room) = rt.block_on(async {
            let user = services.accounts.create_user("fuzz", None, false).await.expect("user");
            let login = services
                .accounts
                .new_device(&user, Some("FUZZ"), None)
                .await
                .expect("device");
            let session = services
                .accounts
                .authenticate(&login.access_token, None)
                .await
                .expect("session");
            let req = Req {
                method: coap_lite::RequestType::Post,
                path: ["_matrix", "client", "v3", "createRoom"].map(str::to_owned).to_vec(),
                query: vec![],
                payload: crate::seeds::cbor_of(&serde_json::json!({"name": "fuzz"})),
                content_format: Some(CF_CBOR),
                observe: None,
                block2: None,
            };
            let reply = dispatch(&api, Some(&session), None, &["createRoom"], &req)
                .await
                .unwrap_or_else(|e| panic!("createRoom: {e:?}"));
            assert!(reply.is_success(), "createRoom: {}", reply.body);
            let room = reply.body["room_id"].as_str().expect("room_id").to_owned();
            (session, room)
        });
        drop(_rt);
        Server {
            rt,
            api,
            session,
            seeds: crate::seeds::coap_for(&room),
            _dir: dir,
        }
    }
}

/// One datagram through the door's parsing and on into the route it names
/// through the endpoint layer, as the door dispatches it, with the server's
/// session): bad input gives an error, never a panic, a hang, or an
/// internal error (`M_UNKNOWN`, 5.00), and a reply encodes into a response.
pub fn coap_requests(server: &Server, input: &[u8]) {
    use weft_coap::routes;
    let data = crate::mutate(&server.seeds, input);
    let Datagram::Request(parsed) = coap_door::request(&data) else {
        return;
    };
    let r = &parsed.req;
    let Some(p) = routes::cs_path(&r.path) else {
        return;
    };
    if p.iter().any(|s| SKIP.contains(s)) {
        return;
    }
    let session = (!routes::is_public(&p)).then_some(&server.session);
    let what = || format!("{:?} /{}", r.method, r.path.join("/"));
    let result = server.rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            routes::dispatch(&server.api, session, None, &p, r),
        )
        .await
    });
    match result {
        Err(_) => panic!("request hung: {}", what()),
        Ok(Err(e)) => assert!(
            e.kind != weft_core::ErrorKind::Unknown,
            "bad input became an internal error: {}: {e:?}",
            what()
        ),
        Ok(Ok(reply)) => {
            assert!(
                reply.code != coap_lite::ResponseType::InternalServerError,
                "bad input became an internal error: {}: {}",
                what(),
                reply.body
            );
            let _ = coap_door::response(&parsed, &reply.body, false);
        }
    }
}
