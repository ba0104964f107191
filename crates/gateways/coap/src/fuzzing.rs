//! The network-free part of the door, for the fuzz targets in
//! `crates/fuzz` (see docs/fuzzing.md). Not an API: hidden from the docs,
//! may change at any time.
//!
//! [`request`] takes one datagram through the door's own parsing
//! (`message.rs`: coap-lite's parser, our option, path and Block parsing,
//! the MSC3079 path enums and integer keys), exactly as `Door::on_datagram`
//! and `Door::respond` do before the services are called; [`response`]
//! builds and encodes a (Block2) response with the door's helpers.

use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
use weft_core::{Error, ErrorKind};

use crate::routes::{CF_JSON, Req};
use crate::{BLOCK_SZX, ContentFormatNum as _, message, routes};

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

/// One datagram, as far as the door takes it without the services: the
/// door's own [`message::classify`] and [`message::Parts`].
pub fn request(data: &[u8]) -> Datagram {
    let (packet, method) = match message::classify(data) {
        message::Datagram::Bad(mid) => return Datagram::Bad(mid),
        message::Datagram::Answer { mid, .. } => return Datagram::AckOrReset(mid),
        message::Datagram::NotRequest { reset, .. } => return Datagram::NotRequest(reset),
        message::Datagram::Request(packet, method) => (packet, method),
    };
    let parts = message::Parts::of(&packet, method);
    let payload = packet.payload.clone();
    let cbor_version = parts.cbor_version(&payload);
    let block1 = parts.block1.map(|(num, more, szx)| {
        let (size, offset) = message::block1_layout(num, szx);
        (num, more, szx, size, offset)
    });
    let r = Req {
        method,
        path: parts.path,
        query: parts.query,
        payload,
        content_format: parts.content_format,
        observe: parts.observe,
        block2: parts.block2,
    };
    let cs_path = routes::cs_path(&r.path).map(|p| p.into_iter().map(str::to_owned).collect());
    Datagram::Request(Box::new(Parsed {
        token: packet.get_token().to_vec(),
        confirmable: packet.header.get_type() == MessageType::Confirmable,
        req: r,
        uri_key: parts.uri_key,
        accept: parts.accept,
        block1,
        block2: parts.block2,
        cbor_version,
        option_token: parts.option_token,
        cs_path,
    }))
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
            b => match message::first_block(bytes.len(), b.map(|b| b.2)) {
                None => p.payload = bytes,
                Some(szx) => crate::put_block(&mut p, &bytes, 0, szx),
            },
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
