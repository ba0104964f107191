//! The packet decoders, for the fuzz targets in `crates/fuzz` (see
//! docs/fuzzing.md). Not an API: hidden from the docs, may change at any
//! time. A connection (`conn.rs`) does, per packet: [`frame`] off the read
//! buffer, then [`decode_connect`] for the first and [`decode`] for the rest.

pub use crate::codec::{
    Connect, Frame, In, MAX_PACKET, Out, Refusal, Version, Will, connect_level, decode, decode_connect, encode, frame,
};
