//! The network-free part of the door, for the fuzz targets in
//! `crates/fuzz` (see docs/fuzzing.md). Not an API: hidden from the docs,
//! may change at any time.
//!
//! [`request`] takes one datagram through what `Door::on_datagram` and
//! `Door::respond` do before the services are called, step for step and
//! with the same helpers (coap-lite's parser, our option, path and Block
//! parsing, the MSC3079 path enums and integer keys); [`response`] builds
//! and encodes a (Block2) response the way the door does. Keep them in
//! step with `lib.rs` when that changes.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType as Method, ResponseType};
use weft_core::{Error, ErrorKind};

use crate::routes::{CF_JSON, Req};
use crate::{BLOCK_SZX, ContentFormatNum as _, OPTION_ACCESS_TOKEN, OPTION_CBOR_VERSION, cbor, msc3079, routes};

/// What the door makes of a request datagram before calling the services.
pub struct Parsed {
    pub req: Req,
    pub token: Vec<u8>,
    pub confirmable: bool,
    /// Key under which Block2 bodies and Block1 uploads are kept.
    pub uri_key: String,
    pub accept: Option<u16>,
    /// Block1 (num, more, szx), with the block size and the byte offset
    /// the door expects the block at.
    pub block1: Option<(u32, bool, u8, usize, usize)>,
    pub block2: Option<(u32, bool, u8)>,
    pub cbor_version: Option<u32>,
    pub option_token: Option<String>,
    /// The Client-Server path the request routes to, if any.
    pub cs_path: Option<Vec<String>>,
}

/// What the door does with a datagram.
pub enum Datagram {
    /// Unparseable: `Some(message ID)` if the door answers it with RST.
    Bad(Option<u16>),
    /// An ACK or RST for one of our messages.
    AckOrReset(u16),
    /// Not a request (ping, stray response): `true` if answered with RST.
    NotRequest(bool),
    Request(Box<Parsed>),
}

/// One datagram, as far as the door takes it without the services.
pub fn request(data: &[u8]) -> Datagram {
    // Door::on_datagram
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
    if matches!(
        packet.header.get_type(),
        MessageType::Acknowledgement | MessageType::Reset
    ) {
        return Datagram::AckOrReset(mid);
    }
    let method = match packet.header.code {
        MessageClass::Request(m) => m,
        _ => return Datagram::NotRequest(packet.header.get_type() == MessageType::Confirmable),
    };
    Datagram::Request(Box::new(parse(&packet, method)))
}

/// Door::respond up to the services.
fn parse(req: &Packet, method: Method) -> Parsed {
    let path = crate::opt_str(req, CoapOption::UriPath);
    let path = msc3079::expand_path(&path).unwrap_or(path);
    let query: Vec<(String, String)> = crate::opt_str(req, CoapOption::UriQuery)
        .into_iter()
        .map(|q| match q.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (q, String::new()),
        })
        .collect();
    let uri_key = {
        let mut k = format!("{method:?} /{}", path.join("/"));
        for (a, b) in &query {
            if a != "a" && a != "access_token" {
                k.push_str(&format!("&{a}={b}"));
            }
        }
        k
    };
    let accept = req
        .get_first_option(CoapOption::Accept)
        .map(|v| crate::parse_uint(v) as u16);
    let block2 = req.get_first_option(CoapOption::Block2).map(|v| crate::parse_block(v));
    let block1 = req.get_first_option(CoapOption::Block1).map(|b1| {
        let (num, more, szx) = crate::parse_block(b1);
        let size = 1usize << (szx.min(6) + 4);
        (num, more, szx, size, num as usize * size)
    });
    let payload = req.payload.clone();
    let observe = req.get_first_option(CoapOption::Observe).map(|v| crate::parse_uint(v));
    let content_format = req
        .get_first_option(CoapOption::ContentFormat)
        .map(|v| crate::parse_uint(v) as u16);
    let cbor_version = req
        .get_first_option(CoapOption::Unknown(OPTION_CBOR_VERSION))
        .map(|v| crate::parse_uint(v))
        .or_else(|| {
            (content_format != Some(CF_JSON) && !payload.is_empty())
                .then(|| cbor::to_json_with_keys(&payload).ok())
                .flatten()
                .and_then(|(_, used)| used.then_some(1))
        });
    let option_token = req.get_first_option(CoapOption::Unknown(OPTION_ACCESS_TOKEN)).map(|v| {
        let t = String::from_utf8_lossy(v);
        t.strip_prefix("Bearer ").unwrap_or(&t).to_owned()
    });
    let r = Req {
        method,
        path,
        query,
        payload,
        content_format,
        observe,
    };
    let cs_path = routes::cs_path(&r.path).map(|p| p.into_iter().map(str::to_owned).collect());
    Parsed {
        token: req.get_token().to_vec(),
        confirmable: req.header.get_type() == MessageType::Confirmable,
        req: r,
        uri_key,
        accept,
        block1,
        block2,
        cbor_version,
        option_token,
        cs_path,
    }
}

/// The response the door sends for `body` when the request asked for
/// block `block2` (or none), as bytes; `error` makes it an error response.
pub fn response(req: &Parsed, body: &serde_json::Value, error: bool) -> Vec<u8> {
    let out_cf = if req.accept == Some(CF_JSON) {
        CF_JSON
    } else {
        routes::CF_CBOR
    };
    let mut resp = if error {
        crate::error_packet(&Error::new(ErrorKind::NotJson, "Invalid CBOR"), out_cf)
    } else {
        let mut p = Packet::new();
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.set_content_format_num(out_cf);
        let bytes = crate::encode_body(body, out_cf);
        match req.block2 {
            // A later block of a kept body (Door::respond).
            Some((num, _, szx)) if num > 0 => crate::put_block(&mut p, &bytes, num, szx.min(BLOCK_SZX)),
            // The first (Door::attach_body).
            b => {
                let szx = b.map(|b| b.2).unwrap_or(BLOCK_SZX).min(BLOCK_SZX);
                if bytes.len() <= 1usize << (szx + 4) && szx == BLOCK_SZX {
                    p.payload = bytes;
                } else {
                    crate::put_block(&mut p, &bytes, 0, szx);
                }
            }
        }
        p
    };
    resp.set_token(req.token.clone());
    resp.header.set_type(if req.confirmable {
        MessageType::Acknowledgement
    } else {
        MessageType::NonConfirmable
    });
    crate::encode(&resp)
}
