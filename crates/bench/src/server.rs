//! Spawning `weft serve` on a temp data dir, and reading its memory and CPU
//! use from /proc.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::Api;

/// A `weft serve` child process; killed when dropped.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub url: String,
    /// From spawn to the `listening on` line.
    pub listen_line_after: Duration,
    pub log: PathBuf,
}

/// How the benchmark starts servers.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub bin: PathBuf,
    /// `WEFT_LOG` (log filter) for the server.
    pub log_filter: String,
}

impl Launcher {
    /// Spawns `weft serve --data-dir DATA --listen 127.0.0.1:0` with open
    /// registration and no rate limits, and waits for its `listening on` line
    /// (at most `timeout`). `spawned_at` is taken just before the spawn.
    pub async fn spawn(&self, data_dir: &Path, log: &Path, timeout: Duration) -> Result<Server> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let spawned_at = Instant::now();
        let mut child = Command::new(&self.bin)
            .env_remove("WEFT_CONFIG")
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("WEFT_REGISTRATION__MODE", "open")
            .env("WEFT_RATE_LIMIT__ENABLED", "false")
            .env("WEFT_MQTT__LISTEN", "127.0.0.1:0")
            .env("WEFT_COAP__LISTEN", "127.0.0.1:0")
            .env("WEFT_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let pid = child.id().context("child has no pid")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let log_path = log.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            let mut out = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .await
                .ok();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = parse_listen_url(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url);
                }
                if let Some(f) = out.as_mut() {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        let url = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(url)) => url,
            _ => {
                let _ = child.start_kill();
                bail!(
                    "{} serve printed no `listening on http://ADDR` line within {timeout:?}; log:\n{}",
                    self.bin.display(),
                    tail(log, 40)
                );
            }
        };
        Ok(Server {
            child,
            pid,
            url,
            listen_line_after: spawned_at.elapsed(),
            log: log.to_owned(),
        })
    }
}

impl Server {
    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            self.child.start_kill()?;
            self.child.wait().await?;
        }
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

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Resident set size (VmRSS) and peak (VmHWM) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Ok((field("VmRSS:").context("no VmRSS")?, field("VmHWM:").unwrap_or(0)))
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

#[cfg(test)]
mod tests {
    use super::parse_listen_url;

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
