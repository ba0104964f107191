//! The workspace's test harness lives in `weft-testkit`
//! (crates/testkit): [`TestServer`] runs the real `weft` binary on free
//! ports with its own temporary data directory, [`Client`] speaks the Matrix
//! Client-Server API (v3) to it. This module only re-exports it, so the
//! tests here write `common::…`.

#![allow(unused_imports)]

pub use weft_testkit::client::*;
pub use weft_testkit::enc;
pub use weft_testkit::server::*;
pub use weft_testkit::synapse::*;

/// Two federating servers: the outgoing queue's admin commands, a shared room.
pub mod federation;
