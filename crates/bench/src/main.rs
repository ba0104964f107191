//! `weft-bench`: load generator for a weft server, printing one JSON object of
//! figures on stdout (progress goes to stderr).
//!
//! By default it starts `weft serve` itself (fresh temp data dir per scenario,
//! open registration, rate limits off) from the `weft` binary next to its own
//! executable, so `cargo run --release -p weft-bench` is enough. With `--url`
//! it drives an already running server instead. All traffic goes to
//! 127.0.0.1 (or the given URL), and every loop is bounded in count and time.

mod api;
mod bridge;
mod doors;
mod media;
mod scenarios;
mod server;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Map, Value, json};

use crate::api::{Api, Session};
use crate::server::{Launcher, Server};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Durable send throughput (PUT /send) with concurrent clients.
    Send,
    /// Send latency tail: a few clients, one request in flight each, many
    /// events (p99.9, max, the slowest requests, WAL size).
    SendTail,
    /// Publish-to-receive latency through long-polling /sync.
    Latency,
    /// Server RSS idle and with many open long-poll /sync requests.
    Rss,
    /// Time from spawn to first successful GET /versions.
    ColdStart,
    /// Bytes on the wire for one telemetry send: HTTP+JSON vs CoAP+CBOR.
    Wire,
    /// MQTT QoS 1 publishes/s and publish-to-subscriber latency, weft's
    /// MQTT door vs Mosquitto.
    Mqtt,
    /// Media upload and download MB/s beside raw disk writes, and
    /// thumbnail generation time.
    Media,
    /// Two federating servers: events sent on one, received through the
    /// other's /sync (PDUs per second, send-to-remote-sync latency).
    Federation,
    /// MQTT readings from Mosquitto through `weft-bridge-mqtt` into rooms:
    /// readings/s and publish-to-/sync latency.
    Bridge,
}

#[derive(Parser, Debug, Clone)]
#[command(version, about = "Benchmark a weft server and print JSON figures")]
pub struct Opts {
    /// Scenarios to run (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "send,send-tail,latency,rss,cold-start,wire"
    )]
    pub scenarios: Vec<Scenario>,

    /// Drive an already running server at this URL (loopback) instead of
    /// starting one. rss needs --server-pid; cold-start still spawns its own.
    #[arg(long)]
    pub url: Option<String>,
    /// Access tokens to use with --url (repeatable; reused round-robin). If
    /// none are given, users are registered (needs open registration).
    #[arg(long = "token")]
    pub tokens: Vec<String>,
    /// PID of the --url server, for the RSS figures.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The weft binary to spawn [default: `weft` next to this executable,
    /// rebuilt with `cargo build -p weft` first when run through cargo].
    #[arg(long)]
    pub weft_bin: Option<PathBuf>,
    /// WEFT_LOG (log filter) for spawned servers; their log goes to a file in
    /// the temp dir.
    #[arg(long, default_value = "warn")]
    pub server_log: String,
    /// Storage of spawned servers: `sqlite` (embedded) or `postgres` (a
    /// fresh database per server, made through WEFT_TEST_POSTGRES_URL,
    /// default postgres://weft:weft@127.0.0.1:5432/postgres).
    #[arg(long, default_value = "sqlite")]
    pub backend: String,

    /// send: concurrent clients (each with its own connection pool and user).
    #[arg(long, default_value_t = 4)]
    pub send_clients: usize,
    /// send: requests each client keeps in flight; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub send_inflight: Vec<usize>,
    /// send: events per run (all clients together).
    #[arg(long, default_value_t = 10_000)]
    pub send_events: u64,
    /// send: time limit per run, seconds.
    #[arg(long, default_value_t = 60)]
    pub send_max_secs: u64,
    /// send: all clients send to one shared room instead of one room each.
    #[arg(long)]
    pub send_shared_room: bool,

    /// send-tail: clients, each with one request in flight.
    #[arg(long, default_value_t = 4)]
    pub tail_clients: usize,
    /// send-tail: events (all clients together).
    #[arg(long, default_value_t = 20_000)]
    pub tail_events: u64,
    /// send-tail: time limit, seconds.
    #[arg(long, default_value_t = 120)]
    pub tail_max_secs: u64,

    /// latency: subscriber users long-polling /sync.
    #[arg(long, default_value_t = 10)]
    pub latency_subscribers: usize,
    /// latency: publish rate, events per second.
    #[arg(long, default_value_t = 1000)]
    pub latency_rate: u64,
    /// latency: publishing duration, seconds.
    #[arg(long, default_value_t = 5)]
    pub latency_secs: u64,
    /// latency: publisher requests in flight at most.
    #[arg(long, default_value_t = 8)]
    pub latency_inflight: usize,
    /// latency: how long subscribers may keep receiving after publishing
    /// ends, seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_grace_secs: u64,
    /// latency: /sync filter (inline JSON) asking for untruncated timelines;
    /// empty for none.
    #[arg(
        long,
        default_value = r#"{"room":{"timeline":{"limit":100000}},"presence":{"not_types":["*"]}}"#
    )]
    pub sync_filter: String,

    /// rss: open long-poll /sync requests.
    #[arg(long, default_value_t = 1000)]
    pub rss_syncs: usize,
    /// rss: users holding them (each holds rss_syncs / rss_users).
    #[arg(long, default_value_t = 100)]
    pub rss_users: usize,
    /// rss: seconds to wait after opening them before reading RSS (< 30).
    #[arg(long, default_value_t = 3)]
    pub rss_settle_secs: u64,

    /// cold-start: runs (each: fresh data dir, then restart on it).
    #[arg(long, default_value_t = 3)]
    pub cold_runs: usize,

    /// mqtt: publishing connections (each its own user and room on weft).
    #[arg(long, default_value_t = 8)]
    pub mqtt_publishers: usize,
    /// mqtt: unacknowledged QoS 1 publishes each publisher keeps in flight.
    #[arg(long, default_value_t = 16)]
    pub mqtt_inflight: usize,
    /// mqtt: publishes per run (all publishers together).
    #[arg(long, default_value_t = 20_000)]
    pub mqtt_messages: u64,
    /// mqtt: publishing time limit per run, seconds.
    #[arg(long, default_value_t = 30)]
    pub mqtt_max_secs: u64,
    /// mqtt: how long the subscriber may keep receiving after publishing
    /// ends, seconds.
    #[arg(long, default_value_t = 10)]
    pub mqtt_grace_secs: u64,
    /// mqtt: the Mosquitto binary (skipped, reported as not installed, if
    /// it does not exist).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,

    /// media: files uploaded and downloaded.
    #[arg(long, default_value_t = 4)]
    pub media_files: u64,
    /// media: size of each, MiB (at most 90, under the upload limit).
    #[arg(long, default_value_t = 32)]
    pub media_file_mib: u64,

    /// federation: subscribers on the receiving server long-polling /sync.
    #[arg(long, default_value_t = 2)]
    pub federation_subscribers: usize,
    /// federation, latency run: publish rate, events per second.
    #[arg(long, default_value_t = 200)]
    pub federation_rate: u64,
    /// federation, latency run: publishing duration, seconds.
    #[arg(long, default_value_t = 5)]
    pub federation_secs: u64,
    /// federation, throughput run: events sent as fast as the sending
    /// server takes them.
    #[arg(long, default_value_t = 5_000)]
    pub federation_events: u64,
    /// federation, throughput run: requests in flight.
    #[arg(long, default_value_t = 32)]
    pub federation_inflight: usize,

    /// bridge: the `weft-bridge-mqtt` binary [default: next to this
    /// executable, rebuilt first when run through cargo].
    #[arg(long)]
    pub bridge_bin: Option<PathBuf>,
    /// bridge: readings published per run (QoS 1).
    #[arg(long, default_value_t = 2_000)]
    pub bridge_readings: u64,
    /// bridge: devices they are spread over (round robin; one room each).
    #[arg(long, default_value_t = 4)]
    pub bridge_devices: usize,
    /// bridge: publish rates, readings per second, one run each (0: as fast
    /// as the broker takes them).
    #[arg(long, value_delimiter = ',', default_value = "0,200")]
    pub bridge_rates: Vec<u64>,
    /// bridge: time limit per run (publishing and receiving), seconds.
    #[arg(long, default_value_t = 120)]
    pub bridge_max_secs: u64,
}

/// Microseconds since the benchmark started (the clock carried in events).
pub fn now_us() -> u64 {
    bench_start().elapsed().as_micros() as u64
}

pub fn bench_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

pub const PASSWORD: &str = "weft-bench-password";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a scenario's traffic goes: a server this run spawned (killed on
/// drop) or an external one, with logged-in users.
pub struct Target {
    pub url: String,
    pub pid: Option<u32>,
    pub sessions: Vec<Session>,
    /// RSS (KiB) of a spawned server once ready, before any user existed.
    pub rss_fresh_kib: Option<u64>,
    pub mqtt: Option<std::net::SocketAddr>,
    pub coap: Option<std::net::SocketAddr>,
    /// A spawned server's data directory.
    pub data_dir: Option<PathBuf>,
    /// A federating server's name.
    pub server_name: Option<String>,
    server: Option<Server>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// A session for user slot `i` (reused round-robin).
    pub fn session(&self, i: usize) -> &Session {
        &self.sessions[i % self.sessions.len()]
    }

    pub async fn stop(self) {
        if let Some(server) = self.server {
            let _ = server.stop(Duration::from_secs(10)).await;
        }
    }
}

pub struct Bench {
    pub opts: Opts,
    launcher: Option<Launcher>,
    run_id: String,
    /// Makes user names unique across `target()` calls on one server.
    targets_made: std::sync::atomic::AtomicUsize,
}

impl Bench {
    /// A fresh spawned server with `users` registered users, or the --url
    /// server with `users` sessions.
    pub async fn target(&self, users: usize, label: &str) -> Result<Target> {
        self.target_with(users, label, false).await
    }

    /// [`Bench::target`]; with `doors`, a spawned server's MQTT and CoAP
    /// addresses are known too (an external server has none).
    pub async fn target_with(&self, users: usize, label: &str, doors: bool) -> Result<Target> {
        self.make_target(users, label, doors, false, &[]).await
    }

    /// A fresh spawned server (never the --url server) with `env` added
    /// to its environment, with `users` registered users.
    pub async fn target_env(&self, users: usize, label: &str, env: &[(&str, String)]) -> Result<Target> {
        if self.opts.url.is_some() {
            bail!("this scenario configures the server it spawns; it cannot use --url");
        }
        self.make_target(users, label, false, false, env).await
    }

    /// A fresh spawned server with a federation listener (never the --url
    /// server), with `users` registered users.
    pub async fn federating_target(&self, users: usize, label: &str) -> Result<Target> {
        if self.opts.url.is_some() {
            bail!("the federation scenario spawns its own two servers; it cannot use --url");
        }
        self.make_target(users, label, false, true, &[]).await
    }

    async fn make_target(
        &self,
        users: usize,
        label: &str,
        doors: bool,
        federating: bool,
        env: &[(&str, String)],
    ) -> Result<Target> {
        let users = users.max(1);
        let n = self.targets_made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let label = format!("{label}{n}x");
        let label = label.as_str();
        if let Some(url) = &self.opts.url {
            let sessions = if self.opts.tokens.is_empty() {
                self.register_users(url, users, label).await?
            } else {
                self.opts
                    .tokens
                    .iter()
                    .map(|t| Session {
                        user_id: String::new(),
                        token: t.clone(),
                    })
                    .collect()
            };
            return Ok(Target {
                url: url.clone(),
                pid: self.opts.server_pid,
                sessions,
                rss_fresh_kib: None,
                mqtt: None,
                coap: None,
                data_dir: None,
                server_name: None,
                server: None,
                _dir: None,
            });
        }
        let launcher = self.launcher.as_ref().context("no weft binary")?;
        let dir = tempfile::Builder::new().prefix("weft-bench-").tempdir()?;
        let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
        let server = if federating {
            launcher.spawn_federating(&data, &log, STARTUP_TIMEOUT).await?
        } else if !env.is_empty() {
            launcher.spawn_env(&data, &log, STARTUP_TIMEOUT, doors, env).await?
        } else {
            launcher.spawn_with(&data, &log, STARTUP_TIMEOUT, doors).await?
        };
        server.wait_ready(STARTUP_TIMEOUT).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_fresh_kib = server::rss_kib(server.pid).ok().map(|(rss, _)| rss);
        let sessions = self.register_users(&server.url, users, label).await?;
        Ok(Target {
            url: server.url.clone(),
            pid: Some(server.pid),
            sessions,
            rss_fresh_kib,
            mqtt: server.mqtt,
            coap: server.coap,
            data_dir: Some(dir.path().join("data")),
            server_name: server.server_name.clone(),
            server: Some(server),
            _dir: Some(dir),
        })
    }

    /// Registers `n` users, a few at a time (password hashing is slow).
    async fn register_users(&self, url: &str, n: usize, label: &str) -> Result<Vec<Session>> {
        let api = Api::new(url, 8)?;
        let mut sessions = Vec::with_capacity(n);
        let mut next = 0usize;
        while next < n {
            let batch: Vec<_> = (next..n.min(next + 8))
                .map(|i| {
                    let api = api.clone();
                    let name = format!("bench{}{label}{i}", self.run_id);
                    tokio::spawn(async move { api.register(&name, PASSWORD).await })
                })
                .collect();
            for h in batch {
                sessions.push(h.await??);
            }
            next = n.min(next + 8);
        }
        Ok(sessions)
    }

    pub fn launcher(&self) -> Option<&Launcher> {
        self.launcher.as_ref()
    }
}

/// Finds the weft binary: --weft-bin, else `weft` next to this executable
/// (rebuilt first when running under cargo, so it is never stale).
fn find_weft_bin(opts: &Opts) -> Result<PathBuf> {
    if let Some(bin) = &opts.weft_bin {
        if !bin.is_file() {
            bail!("--weft-bin {} does not exist", bin.display());
        }
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let bin = dir.join(format!("weft{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_bin(Path::new(&cargo), dir, "weft", "weft")?;
    }
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p weft` or pass --weft-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Finds the `weft-bridge-mqtt` binary like [`find_weft_bin`]:
/// --bridge-bin, else next to this executable (rebuilt under cargo).
pub fn find_bridge_bin(opts: &Opts) -> Result<PathBuf> {
    if let Some(bin) = &opts.bridge_bin {
        if !bin.is_file() {
            bail!("--bridge-bin {} does not exist", bin.display());
        }
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let bin = dir.join(format!("weft-bridge-mqtt{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_bin(Path::new(&cargo), dir, "weft-bridge-mqtt", "weft-bridge-mqtt")?;
    }
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p weft-bridge-mqtt` or pass --bridge-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// `cargo build -p PACKAGE --bin BIN` with the profile and target dir of
/// this executable.
fn build_bin(cargo: &Path, profile_dir: &Path, package: &str, bin: &str) -> Result<()> {
    let target_dir = profile_dir.parent().context("no target dir")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("release");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", target_dir)
        .stdout(std::process::Stdio::null());
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("weft-bench: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

async fn run(opts: Opts) -> (Value, bool) {
    let mut out = Map::new();
    let mut failed = false;
    let nofile = server::raise_nofile_limit();
    let launcher = if opts.url.is_none() || opts.scenarios.contains(&Scenario::ColdStart) {
        match find_weft_bin(&opts) {
            Ok(bin) => Some(Launcher {
                bin,
                log_filter: opts.server_log.clone(),
                postgres: opts.backend == "postgres",
            }),
            Err(e) => {
                out.insert("error".into(), json!(format!("{e:#}")));
                return (Value::Object(out), true);
            }
        }
    } else {
        None
    };
    out.insert(
        "meta".into(),
        json!({
            "bench_version": env!("CARGO_PKG_VERSION"),
            "bench_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "server": match &opts.url {
                Some(url) => json!({ "mode": "external", "url": url }),
                None => json!({
                    "mode": "spawned (fresh data dir per scenario)",
                    "bin": launcher.as_ref().map(|l| l.bin.display().to_string()),
                }),
            },
            "nofile_limit": nofile,
        }),
    );
    let bench = Bench {
        opts: opts.clone(),
        launcher,
        run_id: format!("{:x}", std::process::id()),
        targets_made: Default::default(),
    };
    for scenario in &opts.scenarios {
        let started = Instant::now();
        eprintln!("weft-bench: running {scenario:?}");
        let (key, result) = match scenario {
            Scenario::Send => ("send", scenarios::send(&bench).await),
            Scenario::SendTail => ("send_tail", scenarios::send_tail(&bench).await),
            Scenario::Latency => ("publish_to_receive", scenarios::latency(&bench).await),
            Scenario::Rss => ("rss", scenarios::rss(&bench).await),
            Scenario::ColdStart => ("cold_start", scenarios::cold_start(&bench).await),
            Scenario::Wire => ("wire", doors::wire(&bench).await),
            Scenario::Mqtt => ("mqtt", doors::mqtt(&bench).await),
            Scenario::Media => ("media", media::media(&bench).await),
            Scenario::Federation => ("federation", scenarios::federation(&bench).await),
            Scenario::Bridge => ("bridge", bridge::bridge(&bench).await),
        };
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                failed = true;
                eprintln!("weft-bench: {scenario:?} failed: {e:#}");
                json!({ "error": format!("{e:#}") })
            }
        };
        eprintln!(
            "weft-bench: {scenario:?} done in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        out.insert(key.into(), value);
    }
    (Value::Object(out), failed)
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    bench_start();
    if let Some(url) = &opts.url
        && !is_loopback_url(url)
    {
        eprintln!("weft-bench: --url must point at a loopback address (127.0.0.0/8, localhost, [::1])");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (value, failed) = rt.block_on(run(opts));
    println!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
    // Don't wait for lingering long-polls.
    rt.shutdown_timeout(Duration::from_secs(1));
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Only loopback targets are allowed.
fn is_loopback_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host_port = rest.split('/').next().unwrap_or_default();
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn loopback_only() {
        assert!(is_loopback_url("http://127.0.0.1:8008"));
        assert!(is_loopback_url("http://127.9.0.1:8008/"));
        assert!(is_loopback_url("http://localhost:8008"));
        assert!(is_loopback_url("http://[::1]:8008"));
        assert!(!is_loopback_url("http://10.0.0.1:8008"));
        assert!(!is_loopback_url("https://127.0.0.1"));
        assert!(!is_loopback_url("http://example.org"));
    }
}
