//! Spawning `weft serve` on a temp data dir, and reading its memory and CPU
//! use from /proc.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use weft_testkit::{ServeSpec, ServerProcess};

use crate::api::Api;

use weft_testkit::tail;

/// A `weft serve` child process; killed when dropped.
pub struct Server {
    process: ServerProcess,
    pub pid: u32,
    pub url: String,
    /// MQTT and CoAP door addresses (only when spawned with `doors`).
    pub mqtt: Option<std::net::SocketAddr>,
    pub coap: Option<std::net::SocketAddr>,
    /// From spawn to the `listening on` line.
    pub listen_line_after: Duration,
    pub log: PathBuf,
    /// The server name (`localhost:PORT`) when spawned federating.
    pub server_name: Option<String>,
    /// Its PostgreSQL database (`--backend postgres`), dropped after it.
    _pg: Option<weft_testkit::PgTestDb>,
}

/// How the benchmark starts servers.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub bin: PathBuf,
    /// `WEFT_LOG` (log filter) for the server.
    pub log_filter: String,
    /// Each server on a fresh PostgreSQL database instead of SQLite.
    pub postgres: bool,
}

impl Launcher {
    /// Spawns `weft serve --data-dir DATA --listen 127.0.0.1:0` with open
    /// registration and no rate limits, and waits for its `listening on` line
    /// (at most `timeout`). `spawned_at` is taken just before the spawn.
    pub async fn spawn(&self, data_dir: &Path, log: &Path, timeout: Duration) -> Result<Server> {
        self.spawn_with(data_dir, log, timeout, false).await
    }

    /// [`Launcher::spawn`], also waiting for the MQTT and CoAP `listening
    /// on` lines when `doors` is set.
    pub async fn spawn_with(&self, data_dir: &Path, log: &Path, timeout: Duration, doors: bool) -> Result<Server> {
        self.spawn_env(data_dir, log, timeout, doors, &[]).await
    }

    /// [`Launcher::spawn`] with a TLS federation listener: the server name
    /// is `localhost:PORT` on a free port, other servers' certificates are
    /// not checked (they are self-signed here).
    pub async fn spawn_federating(&self, data_dir: &Path, log: &Path, timeout: Duration) -> Result<Server> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("a free port")?
                .port();
            let name = format!("localhost:{port}");
            let env = [
                ("WEFT_SERVER_NAME", name.clone()),
                ("WEFT_FEDERATION__LISTEN", format!("127.0.0.1:{port}")),
                ("WEFT_FEDERATION__VERIFY_CERTIFICATES", "false".into()),
            ];
            match self.spawn_env(data_dir, log, timeout, false, &env).await {
                Ok(mut server) => {
                    server.server_name = Some(name);
                    return Ok(server);
                }
                // The port was taken between the probe and the start.
                Err(e) if attempt < 5 && e.to_string().contains("cannot listen for federation") => {
                    let _ = std::fs::remove_dir_all(data_dir);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn spawn_env(
        &self,
        data_dir: &Path,
        log: &Path,
        timeout: Duration,
        doors: bool,
        env: &[(&str, String)],
    ) -> Result<Server> {
        // Every bench client connects from 127.0.0.1: no per-address cap
        // (`--rss-syncs` and `--subscribers` can go past the default).
        let mut spec = ServeSpec::new(&self.bin, data_dir, log)
            .env("WEFT_LOG", &self.log_filter)
            .env("WEFT_LIMITS__MAX_CONNECTIONS_PER_IP", "0");
        let pg = if self.postgres {
            let db = weft_testkit::PgTestDb::create().context("PostgreSQL (WEFT_TEST_POSTGRES_URL) is unreachable")?;
            spec = spec
                .env("WEFT_DATABASE__BACKEND", "postgres")
                .env("WEFT_DATABASE__URL", &db.url);
            Some(db)
        } else {
            None
        };
        for (k, v) in env {
            spec = spec.env(k, v);
        }
        spec.clean_env = false;
        spec.timeout = timeout;
        spec.wait_mqtt = doors;
        spec.wait_coap = doors;
        let process = ServerProcess::start(spec).await.map_err(|e| anyhow!(e))?;
        Ok(Server {
            pid: process.pid().context("child has no pid")?,
            url: process.addrs.http.clone(),
            mqtt: process.addrs.mqtt,
            coap: process.addrs.coap,
            listen_line_after: process.listening_after,
            log: log.to_owned(),
            server_name: None,
            process,
            _pg: pg,
        })
    }
}

impl Server {
    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        self.process.terminate(grace).await;
        Ok(())
    }

    /// Polls `GET /_matrix/client/versions` until it returns 200; returns the
    /// instant of the first success.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Instant> {
        let api = Api::new(&self.url, 1)?;
        let deadline = Instant::now() + timeout;
        loop {
            if api.versions().await.is_ok() {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer /versions within {timeout:?}; log:\n{}",
                    self.url,
                    tail(&self.log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Resident set size (VmRSS) and peak (VmHWM) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok((
        status_kib(&status, "VmRSS:").context("no VmRSS")?,
        status_kib(&status, "VmHWM:").unwrap_or(0),
    ))
}

/// The figure (KiB) of the `name` line of a `/proc/PID/status` text.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The anonymous (heap, stacks) and file-backed (the binary's and
/// libraries' pages, shared and reclaimable) parts of `pid`'s resident set
/// (RssAnon, RssFile), in KiB.
pub fn rss_split_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((status_kib(&status, "RssAnon:")?, status_kib(&status, "RssFile:")?))
}

/// User + system CPU time consumed so far by `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((utime + stime) / ticks)
}

/// Raises the soft open-files limit to the hard limit (the RSS scenario
/// holds over a thousand connections; the server inherits the limit).
pub fn raise_nofile_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        Some(lim.rlim_cur)
    }
}
