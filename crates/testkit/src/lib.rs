//! The test harness of the whole workspace: runs the real `weft` binary
//! and talks to it.
//!
//! - [`server::TestServer`]: one `weft serve` per test on free ports with a
//!   temporary data directory (builder for environment, server name, door
//!   listeners, users made with the admin CLI first), the admin CLI, restarts.
//! - [`client::Client`]: a JSON Matrix Client-Server API client (register,
//!   login, rooms, send, sync, messages, ...) and helpers such as
//!   [`client::assert_err`] and [`client::timeline`].
//! - [`ServeSpec`] / [`ServerProcess`]: the launcher underneath, for tests
//!   and the benchmark that need the raw process: finds (or builds) the
//!   binary, spawns `weft serve` on a data directory with HTTP, MQTT
//!   (plain and TLS) and CoAP on free ports, reads the addresses from its
//!   `listening on` lines, copies its stdout and stderr into a log file,
//!   and stops, kills or restarts it.
//! - [`synapse::Synapse`]: a live Synapse (from the virtualenv `.ci/run`
//!   installs) on free ports with a TLS federation listener, for
//!   federation tests; [`synapse_or_skip`] fails under `CI` without it.
//! - [`tools_installed`] / [`tool_missing`]: external programs a test needs
//!   (fail under `CI`, skip with a note elsewhere).
//!
//! `CARGO_BIN_EXE_weft` is only set for the `weft` package's own tests, so
//! [`weft_bin`] locates the binary next to the test executable instead:
//! `<target>/<profile>/deps/<test>` → `<target>/<profile>/weft`. `WEFT_BIN`
//! overrides the location. If the binary is missing it is built with
//! `cargo build -p weft` into the same target directory (once per process).

pub mod client;
pub mod server;
pub mod synapse;

pub use client::{BIG_TIMELINE_FILTER, Client, assert_err, event_ids, of_type, query, room_with, timeline};
pub use server::{DEFAULT_SERVER_NAME, TestServer, TestServerBuilder, data_dir_of};
pub use synapse::{Synapse, SynapseBuilder, synapse_or_skip, synapse_or_skip_with};
pub use weft_store::pg_testing::PgTestDb;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

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
            "{cmd:?} failed ({status}); the tests need the weft binary: fix the build or set WEFT_BIN"
        ))
    }
}

/// How to run `weft serve`: binary, data directory, log file, environment.
#[derive(Clone, Debug)]
pub struct ServeSpec {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    /// stdout and stderr of every run are appended here, line by line.
    pub log: PathBuf,
    /// Extra arguments after `serve --data-dir DIR --listen 127.0.0.1:0`.
    pub args: Vec<OsString>,
    /// Set on the child, after the defaults of [`ServeSpec::new`].
    pub env: Vec<(String, String)>,
    /// Remove every inherited `WEFT_*` variable (otherwise only
    /// `WEFT_CONFIG`).
    pub clean_env: bool,
    /// Also wait for the `weft: mqtt listening on ADDR` line.
    pub wait_mqtt: bool,
    /// Also wait for the `weft: mqtt tls listening on ADDR` and
    /// `weft: mqtt tls certificate PATH` lines.
    pub wait_mqtt_tls: bool,
    /// Also wait for the `weft: coap listening on ADDR` line.
    pub wait_coap: bool,
    /// Also wait for the `weft: coap dtls listening on ADDR` line.
    pub wait_coaps: bool,
    /// How long the `listening on` lines may take.
    pub timeout: Duration,
}

impl ServeSpec {
    /// Open registration, no rate limits, MQTT and CoAP on free ports,
    /// inherited `WEFT_*` variables removed, 60 s startup timeout.
    pub fn new(bin: impl Into<PathBuf>, data_dir: impl Into<PathBuf>, log: impl Into<PathBuf>) -> Self {
        ServeSpec {
            bin: bin.into(),
            data_dir: data_dir.into(),
            log: log.into(),
            args: Vec::new(),
            env: [
                ("WEFT_REGISTRATION__MODE", "open"),
                ("WEFT_RATE_LIMIT__ENABLED", "false"),
                // Other doors on free ports, so parallel servers don't collide.
                ("WEFT_MQTT__LISTEN", "127.0.0.1:0"),
                ("WEFT_MQTT__TLS_LISTEN", "127.0.0.1:0"),
                ("WEFT_COAP__LISTEN", "127.0.0.1:0"),
                ("WEFT_COAP__DTLS_LISTEN", "127.0.0.1:0"),
                ("WEFT_FEDERATION__LISTEN", "127.0.0.1:0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            clean_env: true,
            wait_mqtt: false,
            wait_mqtt_tls: false,
            wait_coap: false,
            wait_coaps: false,
            timeout: Duration::from_secs(60),
        }
    }

    /// Sets (or replaces) an environment variable of the server.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_remove("WEFT_CONFIG");
        if self.clean_env {
            // Do not inherit stray WEFT_* settings from the developer's shell.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("WEFT_") {
                    cmd.env_remove(&k);
                }
            }
        }
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// Addresses a running server printed.
#[derive(Clone, Debug, Default)]
pub struct Addrs {
    /// `http://127.0.0.1:PORT`
    pub http: String,
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS.
    pub mqtt_tls: Option<SocketAddr>,
    /// The certificate the TLS listener presents (PEM; self-signed unless
    /// configured, so it is the clients' CA file).
    pub mqtt_tls_cert: Option<PathBuf>,
    pub coap: Option<SocketAddr>,
    /// The CoAP door's DTLS listener (`coaps://`).
    pub coaps: Option<SocketAddr>,
    /// The TLS federation listener (printed before the HTTP line, so known
    /// whenever it runs).
    pub federation: Option<SocketAddr>,
}

/// A running (or stopped) `weft serve` child; killed when dropped.
pub struct ServerProcess {
    spec: ServeSpec,
    child: Option<Child>,
    pub addrs: Addrs,
    /// From spawn to the HTTP `listening on` line of the latest run.
    pub listening_after: Duration,
}

impl ServerProcess {
    /// Spawns the server and waits for its `listening on` lines, blocking
    /// the calling thread.
    pub fn start_blocking(spec: ServeSpec) -> Result<Self, String> {
        let (child, addrs, listening_after) = launch(&spec)?;
        Ok(ServerProcess {
            spec,
            child: Some(child),
            addrs,
            listening_after,
        })
    }

    /// [`ServerProcess::start_blocking`] on a blocking thread.
    pub async fn start(spec: ServeSpec) -> Result<Self, String> {
        tokio::task::spawn_blocking(move || Self::start_blocking(spec))
            .await
            .map_err(|e| format!("join: {e}"))?
    }

    /// Starts a new child on the same data dir (new ephemeral ports). The
    /// previous child must have been stopped.
    pub async fn restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "restart while a child is running");
        let spec = self.spec.clone();
        let (child, addrs, after) = tokio::task::spawn_blocking(move || launch(&spec))
            .await
            .map_err(|e| format!("join: {e}"))??;
        self.child = Some(child);
        self.addrs = addrs;
        self.listening_after = after;
        Ok(())
    }

    pub fn spec(&self) -> &ServeSpec {
        &self.spec
    }

    /// The settings of the next [`ServerProcess::restart`].
    pub fn spec_mut(&mut self) -> &mut ServeSpec {
        &mut self.spec
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    /// Returns its exit status, or `None` if it had to be SIGKILLed.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("server not running");
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server not running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// The last `n` lines of the log (all runs).
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.spec.log, n)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One line of interest on the server's stdout.
enum Seen {
    Http(String, Instant),
    Mqtt(SocketAddr),
    MqttTls(SocketAddr),
    MqttTlsCert(PathBuf),
    Coap(SocketAddr),
    Coaps(SocketAddr),
    Federation(SocketAddr),
}

fn launch(spec: &ServeSpec) -> Result<(Child, Addrs, Duration), String> {
    let mut cmd = spec.command();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let spawned_at = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", spec.bin.display()))?;
    let (tx, rx) = mpsc::channel::<Seen>();
    let lock = Arc::new(Mutex::new(()));
    pump(child.stdout.take().expect("piped stdout"), &spec.log, &lock, Some(tx));
    pump(child.stderr.take().expect("piped stderr"), &spec.log, &lock, None);

    let deadline = spawned_at + spec.timeout;
    let mut addrs = Addrs::default();
    let mut after = None;
    while after.is_none()
        || (spec.wait_mqtt && addrs.mqtt.is_none())
        || (spec.wait_mqtt_tls && (addrs.mqtt_tls.is_none() || addrs.mqtt_tls_cert.is_none()))
        || (spec.wait_coap && addrs.coap.is_none())
        || (spec.wait_coaps && addrs.coaps.is_none())
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Seen::Http(url, at)) => {
                addrs.http = url;
                after = Some(at.duration_since(spawned_at));
            }
            Ok(Seen::Mqtt(a)) => addrs.mqtt = Some(a),
            Ok(Seen::MqttTls(a)) => addrs.mqtt_tls = Some(a),
            Ok(Seen::MqttTlsCert(p)) => addrs.mqtt_tls_cert = Some(p),
            Ok(Seen::Coap(a)) => addrs.coap = Some(a),
            Ok(Seen::Coaps(a)) => addrs.coaps = Some(a),
            Ok(Seen::Federation(a)) => addrs.federation = Some(a),
            Err(e) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                // Let the pumps copy what is left.
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "{} serve did not print its `listening on` lines within {:?} ({e:?}); exit status {status:?}; log:\n{}",
                    spec.bin.display(),
                    spec.timeout,
                    tail(&spec.log, 200)
                ));
            }
        }
    }
    Ok((child, addrs, after.unwrap_or_default()))
}

/// Copies a child's output into `log` for its whole life (so it never blocks
/// on a full pipe), reporting `listening on` lines on `tx`.
fn pump<R: Read + Send + 'static>(pipe: R, log: &Path, lock: &Arc<Mutex<()>>, tx: Option<mpsc::Sender<Seen>>) {
    let log = log.to_owned();
    let lock = lock.clone();
    std::thread::spawn(move || {
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&log).ok();
        for line in BufReader::new(pipe).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(tx) = &tx {
                let seen = if let Some(url) = parse_listen_url(&line) {
                    Some(Seen::Http(url, Instant::now()))
                } else if let Some(a) = parse_door_line(&line, "weft: mqtt listening on ") {
                    Some(Seen::Mqtt(a))
                } else if let Some(a) = parse_door_line(&line, "weft: coap dtls listening on ") {
                    Some(Seen::Coaps(a))
                } else if let Some(a) = parse_door_line(&line, "weft: mqtt tls listening on ") {
                    Some(Seen::MqttTls(a))
                } else if let Some(a) = parse_door_line(&line, "weft: federation listening on https://") {
                    Some(Seen::Federation(a))
                } else if let Some(p) = parse_cert_line(&line) {
                    Some(Seen::MqttTlsCert(p))
                } else {
                    parse_door_line(&line, "weft: coap listening on ").map(Seen::Coap)
                };
                if let Some(seen) = seen {
                    let _ = tx.send(seen);
                }
            }
            let _guard = lock.lock();
            if let Some(f) = out.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    });
}

/// Percent-encodes one path segment or query value (everything but RFC 3986
/// unreserved characters).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Extracts `http://ADDR` from a line containing `listening on http://ADDR`.
pub fn parse_listen_url(line: &str) -> Option<String> {
    const MARK: &str = "listening on http://";
    let idx = line.find(MARK)?;
    let addr: String = line[idx + MARK.len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-'))
        .collect();
    (!addr.is_empty()).then(|| format!("http://{addr}"))
}

fn parse_door_line(line: &str, mark: &str) -> Option<SocketAddr> {
    line.split_once(mark)?.1.trim().parse().ok()
}

/// `weft: mqtt tls certificate PATH[ (note)]`
fn parse_cert_line(line: &str) -> Option<PathBuf> {
    let rest = line.split_once("weft: mqtt tls certificate ")?.1.trim();
    let path = rest.split_once(" (").map_or(rest, |(p, _)| p);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether the external programs a test needs are installed (each is run
/// with `--help`). When one is missing: under CI (env `CI` set, where
/// `.ci/run` installs them) the test fails; elsewhere a note is printed
/// and the caller skips that part.
pub fn tools_installed(programs: &[&str], install: &str) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return true;
    }
    tool_missing(&missing.join(", "), install);
    false
}

/// Whether `program` can be run (it is started with `--help`, output
/// discarded; only a failure to start it counts). No CI check: see
/// [`tools_installed`] and [`tool_missing`].
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Reports a missing external tool: fails the test under CI (env `CI`
/// set, where `.ci/run` installs it), prints a note elsewhere.
pub fn tool_missing(what: &str, install: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is not installed, and CI is set: .ci/run installs it ({install})");
    }
    eprintln!("NOTE: {what} is not installed ({install}); skipping that part");
}

#[cfg(test)]
mod tests {
    use super::{parse_cert_line, parse_door_line, parse_listen_url};

    #[test]
    fn mqtt_tls_lines() {
        assert_eq!(
            parse_door_line(
                "weft: mqtt tls listening on 127.0.0.1:8883",
                "weft: mqtt tls listening on "
            ),
            Some("127.0.0.1:8883".parse().unwrap())
        );
        // The plain line's mark does not match the TLS line.
        assert_eq!(
            parse_door_line("weft: mqtt tls listening on 127.0.0.1:8883", "weft: mqtt listening on "),
            None
        );
        assert_eq!(
            parse_cert_line("weft: mqtt tls certificate /d/tls/mqtt.crt (self-signed: …)"),
            Some("/d/tls/mqtt.crt".into())
        );
        assert_eq!(
            parse_door_line(
                "weft: federation listening on https://127.0.0.1:8448",
                "weft: federation listening on https://"
            ),
            Some("127.0.0.1:8448".parse().unwrap())
        );
        assert_eq!(
            parse_cert_line("weft: mqtt tls certificate /etc/c.pem"),
            Some("/etc/c.pem".into())
        );
    }

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

    #[test]
    fn listen_line() {
        assert_eq!(
            parse_listen_url("weft listening on http://127.0.0.1:3000").as_deref(),
            Some("http://127.0.0.1:3000")
        );
        assert_eq!(
            parse_listen_url("\u{1b}[32mINFO\u{1b}[0m listening on http://127.0.0.1:9/\u{1b}[0m").as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(parse_listen_url("starting"), None);
    }
}
