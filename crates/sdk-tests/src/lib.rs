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

/// Routes the SDK's tracing output into the test's captured output:
/// `SDK_TEST_LOG` (an env-filter), else `default`. With
/// `SDK_TEST_LOG=matrix_sdk::http_client=debug` every request the client
/// makes is listed with its status.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SDK_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}
