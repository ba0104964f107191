//! What the door makes of a datagram before any service is called, and how
//! a body goes into a response: pure functions over coap-lite packets,
//! used by the door (`lib.rs`) and, unchanged, by its fuzz targets
//! (`fuzzing.rs`).

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType as Method};

use crate::routes::CF_JSON;
use crate::{BLOCK_SZX, OPTION_ACCESS_TOKEN, OPTION_CBOR_VERSION, cbor, msc3079, opt_str, parse_block, parse_uint};

/// What one datagram is.
pub enum Datagram {
    /// Not CoAP version 1: `Some(message ID)` when it looks confirmable, to
    /// be rejected with RST (RFC 7252 §4.2); otherwise ignored.
    Bad(Option<u16>),
    /// An ACK (or, with `reset`, an RST) for a message of ours.
    Answer { mid: u16, reset: bool },
    /// No request (a ping, a stray response): answered with RST when
    /// `reset` (it was confirmable), else ignored.
    NotRequest { mid: u16, reset: bool },
    /// A request.
    Request(Box<Packet>, Method),
}

pub fn classify(data: &[u8]) -> Datagram {
    let packet = match Packet::from_bytes(data) {
        Ok(p) if p.header.get_version() == 1 => p,
        _ => {
            return Datagram::Bad(
                (data.len() >= 4 && data[0] >> 6 == 1 && (data[0] >> 4) & 3 == 0)
                    .then(|| u16::from_be_bytes([data[2], data[3]])),
            );
        }
    };
    let mid = packet.header.message_id;
    let kind = packet.header.get_type();
    if matches!(kind, MessageType::Acknowledgement | MessageType::Reset) {
        return Datagram::Answer {
            mid,
            reset: kind == MessageType::Reset,
        };
    }
    match packet.header.code {
        MessageClass::Request(m) => Datagram::Request(Box::new(packet), m),
        _ => Datagram::NotRequest {
            mid,
            reset: kind == MessageType::Confirmable,
        },
    }
}

/// A request's options, read once.
pub struct Parts {
    /// Uri-Path, with MSC3079 path enums (`/7` = sync …) expanded.
    pub path: Vec<String>,
    pub query: Vec<(String, String)>,
    /// Names the resource across the blocks of one body (method, path and
    /// query without the access token).
    pub uri_key: String,
    pub accept: Option<u16>,
    /// (num, more, szx)
    pub block1: Option<(u32, bool, u8)>,
    pub block2: Option<(u32, bool, u8)>,
    pub observe: Option<u32>,
    pub content_format: Option<u16>,
    /// MSC3079 option 257: the CBOR integer-key version asked for.
    pub cbor_option: Option<u32>,
    /// MSC3079 option 256: the access token (a `Bearer ` prefix removed).
    pub option_token: Option<String>,
}

impl Parts {
    pub fn of(req: &Packet, method: Method) -> Self {
        let path = opt_str(req, CoapOption::UriPath);
        let path = msc3079::expand_path(&path).unwrap_or(path);
        let query: Vec<(String, String)> = opt_str(req, CoapOption::UriQuery)
            .into_iter()
            .map(|q| match q.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (q, String::new()),
            })
            .collect();
        let mut uri_key = format!("{method:?} /{}", path.join("/"));
        for (a, b) in &query {
            if a != "a" && a != "access_token" {
                uri_key.push_str(&format!("&{a}={b}"));
            }
        }
        let uint = |o: CoapOption| req.get_first_option(o).map(|v| parse_uint(v));
        Parts {
            path,
            query,
            uri_key,
            accept: uint(CoapOption::Accept).map(|v| v as u16),
            block1: req.get_first_option(CoapOption::Block1).map(|v| parse_block(v)),
            block2: req.get_first_option(CoapOption::Block2).map(|v| parse_block(v)),
            observe: uint(CoapOption::Observe),
            content_format: uint(CoapOption::ContentFormat).map(|v| v as u16),
            cbor_option: uint(CoapOption::Unknown(OPTION_CBOR_VERSION)),
            option_token: req.get_first_option(CoapOption::Unknown(OPTION_ACCESS_TOKEN)).map(|v| {
                let t = String::from_utf8_lossy(v);
                t.strip_prefix("Bearer ").unwrap_or(&t).to_owned()
            }),
        }
    }

    /// The Content-Format of the response: JSON if asked for, else CBOR.
    pub fn out_cf(&self) -> u16 {
        if self.accept == Some(CF_JSON) {
            CF_JSON
        } else {
            crate::routes::CF_CBOR
        }
    }

    /// The MSC3079 CBOR key version this request implies: option 257, or
    /// 1 when its CBOR body uses integer keys.
    pub fn cbor_version(&self, payload: &[u8]) -> Option<u32> {
        self.cbor_option.or_else(|| {
            (self.content_format != Some(CF_JSON) && !payload.is_empty())
                .then(|| cbor::to_json_with_keys(payload).ok())
                .flatten()
                .and_then(|(_, used)| used.then_some(1))
        })
    }
}

/// Block1 block `num` of size exponent `szx`: its size in bytes and the
/// offset in the body it belongs at.
pub fn block1_layout(num: u32, szx: u8) -> (usize, usize) {
    let size = 1usize << (szx.min(6) + 4);
    (size, num as usize * size)
}

/// The block size exponent a response body of `len` bytes is cut with when
/// the request asked for blocks of `asked` (or none): `None` when it goes
/// whole.
pub fn first_block(len: usize, asked: Option<u8>) -> Option<u8> {
    let szx = asked.unwrap_or(BLOCK_SZX).min(BLOCK_SZX);
    (len > 1usize << (szx + 4) || szx != BLOCK_SZX).then_some(szx)
}
