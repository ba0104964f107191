//! Harness for the matrix-sdk end-to-end tests: finds (or builds) the `weft`
//! binary and runs `weft serve` on a fresh data directory on 127.0.0.1.
//!
//! `CARGO_BIN_EXE_weft` is only set for the `weft` package's own tests, so the
//! binary is located next to the test executable instead:
//! `<target>/<profile>/deps/sdk-<hash>` → `<target>/<profile>/weft`.
//! `WEFT_BIN` overrides the location. If the binary is missing it is built
//! with `cargo build -p weft` into the same target directory (once per test
//! process).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How long `weft serve` may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the `weft` binary to test, building it if it does not exist.
///
/// Panics with an explanatory message if it can neither be found nor built.
pub fn weft_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(locate_or_build) {
        Ok(path) => path.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("WEFT_BIN={} does not exist", bin.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // <target>/<profile>/deps/<test-exe>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable location {}", exe.display()))?;
    let bin = profile_dir.join(format!("weft{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        return Ok(bin);
    }
    build_weft(profile_dir)?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "`cargo build -p weft` succeeded but {} is still missing; build it \
             yourself (`cargo build -p weft`) or point WEFT_BIN at it",
            bin.display()
        ))
    }
}

/// Runs `cargo build -p weft` for the profile the tests were built with, into
/// the same target directory.
fn build_weft(profile_dir: &Path) -> Result<(), String> {
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("no target dir above {}", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "weft", "--bin", "weft"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("weft binary not found in {}; running {cmd:?}", profile_dir.display());
    let status = cmd
        .status()
        .map_err(|e| format!("could not run {cmd:?}: {e}; build the server with `cargo build -p weft` first"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({status}); the sdk tests need the weft binary: fix the build or set WEFT_BIN"
        ))
    }
}

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
    child: Child,
    /// e.g. `http://127.0.0.1:41234`
    pub url: String,
    log: PathBuf,
    // Keeps the data directory alive as long as the server.
    _data: DataDir,
}

/// Log lines shared between the reader threads and the log file.
static LOG_LOCK: Mutex<()> = Mutex::new(());

impl Weft {
    /// Starts `weft serve` with open registration and no rate limits on a
    /// fresh data directory.
    pub fn start() -> Self {
        Self::start_in(DataDir::new())
    }

    /// Starts `weft serve` on `data` (which may already hold users made with
    /// [`DataDir::create_user`]).
    pub fn start_in(data: DataDir) -> Self {
        let log = data.log_path();
        let data_path = data.path();
        let mut child = Command::new(weft_bin())
            .env_remove("WEFT_CONFIG")
            .args(["serve", "--data-dir"])
            .arg(&data_path)
            .args(["--listen", "127.0.0.1:0"])
            .env("WEFT_REGISTRATION__MODE", "open")
            .env("WEFT_RATE_LIMIT__ENABLED", "false")
            .env("WEFT_MQTT__LISTEN", "127.0.0.1:0")
            .env("WEFT_COAP__LISTEN", "127.0.0.1:0")
            // The server's log filter; its log is printed when a test fails.
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_LOG").unwrap_or_else(|_| "weft=info,warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", weft_bin().display()));

        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        pump(stdout, log.clone(), Some(tx));
        pump(stderr, log.clone(), None);

        let url = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(url) => url,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "weft serve did not print `listening on http://ADDR` within {STARTUP_TIMEOUT:?} ({e}); log:\n{}",
                    read_log(&log)
                );
            }
        };
        Weft {
            child,
            url,
            log,
            _data: data,
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- weft server log ----\n{}", self.log());
        }
    }
}

/// Copies a child's output into `log`; the first `listening on http://ADDR`
/// line's URL is sent on `tx`.
fn pump<R: Read + Send + 'static>(pipe: R, log: PathBuf, mut tx: Option<mpsc::Sender<String>>) {
    std::thread::spawn(move || {
        let reader = BufReader::new(pipe);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = tx.take_if(|_| line.contains("listening on http://"))
                && let Some(url) = parse_listen_url(&line)
            {
                let _ = tx.send(url);
            }
            let _guard = LOG_LOCK.lock();
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&log) {
                let _ = writeln!(f, "{line}");
            }
        }
    });
}

/// Extracts `http://ADDR` from a line containing `listening on http://ADDR`.
pub fn parse_listen_url(line: &str) -> Option<String> {
    let start = line.find("listening on http://")? + "listening on ".len();
    let rest = &line[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '\u{1b}'))
        .unwrap_or(rest.len());
    let url = rest[..end].trim_end_matches('/');
    (url.len() > "http://".len()).then(|| url.to_owned())
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Keep failure output readable: the last 200 lines are enough.
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(200);
    lines[skip..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::parse_listen_url;

    #[test]
    fn parses_listen_line() {
        assert_eq!(
            parse_listen_url("weft 0.1.0 listening on http://127.0.0.1:4567").as_deref(),
            Some("http://127.0.0.1:4567")
        );
        assert_eq!(
            parse_listen_url("INFO listening on http://127.0.0.1:80/ (server name x)").as_deref(),
            Some("http://127.0.0.1:80")
        );
        assert_eq!(parse_listen_url("listening on http:// "), None);
    }
}
