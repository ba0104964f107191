//! Shared bits of the matrix-sdk end-to-end tests (tests/sdk.rs,
//! tests/cross_door.rs). The server itself is the workspace's test harness,
//! [`weft_testkit::TestServer`]: the real `weft serve` on free ports with
//! its own data directory, killed on drop, its log printed when a test
//! fails.

use weft_testkit::{TestServer, TestServerBuilder};

/// The password of the users the tests make with the admin CLI.
pub const PASSWORD: &str = "correct horse battery staple";

/// The server's log filter: `WEFT_LOG` of the test run, else
/// `weft=info,warn` (its log is printed when a test fails).
pub fn log_filter() -> String {
    std::env::var("WEFT_LOG").unwrap_or_else(|_| "weft=info,warn".into())
}

/// A server with [`log_filter`]: open registration, no rate limits.
pub fn weft() -> TestServerBuilder {
    TestServer::builder().env("WEFT_LOG", &log_filter())
}

/// [`weft`] with alice and bob made with the admin CLI (password
/// [`PASSWORD`]) before the server starts.
pub fn weft_with_alice_and_bob() -> TestServerBuilder {
    weft().user("alice", PASSWORD).user("bob", PASSWORD)
}
