//! Shared bits of the matrix-sdk end-to-end tests (tests/sdk.rs,
//! tests/cross_door.rs, tests/federation_synapse_e2ee.rs). The server itself is the workspace's test harness,
//! [`weft_testkit::TestServer`]: the real `weft serve` on free ports with
//! its own data directory, killed on drop, its log printed when a test
//! fails.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use matrix_sdk::Client;
use matrix_sdk::config::SyncSettings;
use weft_testkit::{TestServer, TestServerBuilder};

/// Upper bound on any wait for something to show up in a sync (with a
/// Synapse on the other side, federation adds a hop each way).
pub const WAIT: Duration = Duration::from_secs(45);
/// Long-poll timeout of each `/sync` while waiting.
pub const POLL: Duration = Duration::from_millis(1000);

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

/// Checks `done`, and while it does not hold syncs `clients` (all at once,
/// so to-device messages and device list changes flow on every side) and
/// checks again, up to [`WAIT`].
pub async fn sync_until(clients: &[&Client], what: &str, mut done: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if done().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        let syncs = clients
            .iter()
            .map(|c| c.sync_once(SyncSettings::default().timeout(POLL)));
        for r in futures_util::future::join_all(syncs).await {
            r.with_context(|| format!("sync while waiting for {what}"))?;
        }
    }
}
