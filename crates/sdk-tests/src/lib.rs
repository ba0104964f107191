//! Harness for the matrix-sdk end-to-end tests: finds (or builds) the `weft`
//! binary and runs `weft serve` on a fresh data directory on 127.0.0.1, with
//! the launcher shared in `weft-testkit`.
//!
//! `CARGO_BIN_EXE_weft` is only set for the `weft` package's own tests, so the
//! binary is located next to the test executable instead:
//! `<target>/<profile>/deps/sdk-<hash>` → `<target>/<profile>/weft`.
//! `WEFT_BIN` overrides the location. If the binary is missing it is built
//! with `cargo build -p weft` into the same target directory (once per test
//! process).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use weft_testkit::{ServeSpec, ServerProcess};
pub use weft_testkit::{parse_listen_url, weft_bin};

/// Runs a `weft` subcommand to completion (e.g. the admin CLI) and returns its
/// stdout; panics with stdout/stderr on failure.
pub fn weft_cli(args: &[&str]) -> String {
    let out: Output = Command::new(weft_bin())
        .env_remove("WEFT_CONFIG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running weft {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "weft {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A fresh data directory; the server is started on it with [`Weft::start`].
pub struct DataDir {
    dir: tempfile::TempDir,
}

impl DataDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("weft-sdk-test-")
                .tempdir()
                .expect("create temp dir"),
        }
    }

    /// The `--data-dir` passed to weft (a subdirectory, so weft creates it).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// `weft user create --data-dir DIR NAME --password PW`.
    pub fn create_user(&self, name: &str, password: &str) {
        let data = self.path();
        weft_cli(&[
            "user",
            "create",
            "--data-dir",
            data.to_str().expect("utf-8 temp path"),
            name,
            "--password",
            password,
        ]);
    }
}

impl Default for DataDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `weft serve`; killed on drop. Its stdout and stderr go to
/// `server.log` in the temp dir, printed when a test panics.
pub struct Weft {
    process: ServerProcess,
    /// e.g. `http://127.0.0.1:41234`
    pub url: String,
    // Keeps the data directory alive as long as the server.
    _data: DataDir,
}

impl Weft {
    /// Starts `weft serve` with open registration and no rate limits on a
    /// fresh data directory.
    pub fn start() -> Self {
        Self::start_in(DataDir::new())
    }

    /// Starts `weft serve` on `data` (which may already hold users made with
    /// [`DataDir::create_user`]).
    pub fn start_in(data: DataDir) -> Self {
        let mut spec = ServeSpec::new(weft_bin(), data.path(), data.log_path())
            // The server's log filter; its log is printed when a test fails.
            .env(
                "WEFT_LOG",
                &std::env::var("WEFT_LOG").unwrap_or_else(|_| "weft=info,warn".into()),
            );
        spec.clean_env = false;
        let process = ServerProcess::start_blocking(spec).unwrap_or_else(|e| panic!("{e}"));
        Weft {
            url: process.addrs.http.clone(),
            process,
            _data: data,
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        // Keep failure output readable: the last 200 lines are enough.
        self.process.log_tail(200)
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        if self.process.is_running() {
            self.process.kill();
        }
        if std::thread::panicking() {
            eprintln!("---- weft server log ----\n{}", self.log());
        }
    }
}
