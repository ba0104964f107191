//! A live Synapse for federation tests: [`Synapse::start`] runs one
//! `python -m synapse.app.homeserver` per call, on free loopback ports with
//! its own temporary directory, and kills it (its whole process group) when
//! dropped, or when the thread that started it ends (so a test process
//! killed outright leaves no Synapse behind; hence one Synapse per test, not
//! one shared from a static).
//!
//! Synapse comes from the virtualenv `.ci/run` installs
//! (`/var/tmp/weft-synapse-venv`, or the Python named by the environment
//! variable `WEFT_SYNAPSE_PYTHON`). [`synapse_or_skip`] is what a test
//! calls: without Synapse it fails under `CI` and skips with a note
//! elsewhere.
//!
//! The configuration it writes (see [`SynapseBuilder::extra_yaml`] to add
//! to it):
//! - server name `localhost:<federation port>`, as Weft's carries its
//!   federation port;
//! - a plain-HTTP client listener (client API, `/_synapse/admin`,
//!   `/health`) at [`Synapse::client_url`];
//! - a TLS federation listener (federation + keys) at
//!   [`Synapse::federation_addr`], with a self-signed certificate made here
//!   ([`Synapse::tls_cert_path`]);
//! - `federation_verify_certificates: false`, no trusted key servers (keys
//!   are fetched from the origin server itself), loopback allowed as a
//!   federation destination (`ip_range_whitelist`);
//! - SQLite, registration closed except through the shared-secret admin API
//!   ([`Synapse::register`]), every rate limit raised far above what a test
//!   does, cheap password hashing, no cached `/sync` answers, no stats
//!   reporting;
//! - its log (level INFO, with Synapse's stdout and stderr) in one file
//!   ([`Synapse::log_path`], [`Synapse::log_tail`]; its tail is printed
//!   when a test panics while the Synapse is alive).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;

use crate::client::Client;
use crate::{tail, tool_missing};

/// The virtualenv `.ci/run` installs Synapse into (`WEFT_SYNAPSE_VENV`
/// there chooses another).
pub const DEFAULT_SYNAPSE_VENV: &str = "/var/tmp/weft-synapse-venv";

/// How `.ci/run` installs Synapse, for messages.
const INSTALL_HINT: &str = "install it with `python3 -m venv /var/tmp/weft-synapse-venv && \
     /var/tmp/weft-synapse-venv/bin/pip install matrix-synapse==VERSION` (VERSION: the one .ci/run \
     pins), or point WEFT_SYNAPSE_PYTHON at a python that can import synapse";

/// The Python interpreter to run Synapse with: `WEFT_SYNAPSE_PYTHON`, else
/// [`DEFAULT_SYNAPSE_VENV`]`/bin/python`. An error says what is missing.
pub fn synapse_python() -> Result<PathBuf, String> {
    let (python, from) = match std::env::var_os("WEFT_SYNAPSE_PYTHON") {
        Some(p) => (PathBuf::from(p), "WEFT_SYNAPSE_PYTHON"),
        None => (Path::new(DEFAULT_SYNAPSE_VENV).join("bin/python"), "the default venv"),
    };
    if python.is_file() {
        Ok(python)
    } else {
        Err(format!("Synapse's python {} ({from}) does not exist", python.display()))
    }
}

/// Starts a Synapse for a test, or `None` when Synapse is not installed:
/// under `CI` (where `.ci/run` installs it) that panics, elsewhere it prints
/// a note and the caller skips the test. A Synapse that is installed but
/// fails to start always panics (with the tail of its log).
pub async fn synapse_or_skip() -> Option<Synapse> {
    synapse_or_skip_with(Synapse::builder()).await
}

/// [`synapse_or_skip`] with a configured builder.
pub async fn synapse_or_skip_with(builder: SynapseBuilder) -> Option<Synapse> {
    let found = match &builder.python {
        Some(p) if p.is_file() => Ok(()),
        Some(p) => Err(format!("Synapse's python {} does not exist", p.display())),
        None => synapse_python().map(drop),
    };
    if let Err(e) = found {
        tool_missing("Synapse", &format!("{e}; {INSTALL_HINT}"));
        return None;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match builder.clone().start().await {
            Ok(s) => return Some(s),
            // A port found free was taken by another test before Synapse
            // bound it: start again on new ports.
            Err(e) if attempt < 3 && e.contains("Address already in use") => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Options for [`Synapse`]; [`Synapse::start`] uses the defaults.
#[derive(Clone, Debug)]
pub struct SynapseBuilder {
    python: Option<PathBuf>,
    extra_yaml: String,
    start_timeout: Duration,
}

impl Default for SynapseBuilder {
    fn default() -> Self {
        SynapseBuilder {
            python: None,
            extra_yaml: String::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

impl SynapseBuilder {
    /// Appends top-level YAML to the generated `homeserver.yaml`. A key
    /// given here that the generated file already has wins (PyYAML keeps
    /// the last of duplicate keys).
    pub fn extra_yaml(mut self, yaml: &str) -> Self {
        self.extra_yaml.push('\n');
        self.extra_yaml.push_str(yaml);
        self.extra_yaml.push('\n');
        self
    }

    /// The Python to run Synapse with, instead of [`synapse_python`]'s.
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = Some(python.into());
        self
    }

    /// How long to wait for `/health` (default 60 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Writes the configuration and starts Synapse, waiting until its
    /// `/health` answers. The error says what went wrong, with the tail of
    /// Synapse's log when it got as far as running it.
    pub async fn start(self) -> Result<Synapse, String> {
        let python = match self.python {
            Some(p) if p.is_file() => p,
            Some(p) => return Err(format!("Synapse's python {} does not exist", p.display())),
            None => synapse_python()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("weft-synapse-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let (client_port, fed_port) = two_free_ports()?;
        let root = dir.path().to_path_buf();
        let server_name = format!("localhost:{fed_port}");
        let shared_secret = random_token(24)?;
        let files = write_files(
            &root,
            &server_name,
            client_port,
            fed_port,
            &shared_secret,
            &self.extra_yaml,
        )?;

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log)
            .map_err(|e| format!("{}: {e}", files.log.display()))?;
        let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(&files.config)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group, so Drop kills everything it started.
            .process_group(0);
        // Being in its own group, Synapse misses a Ctrl-C of the test run,
        // and a test process killed outright (a nextest timeout) runs no
        // Drop: have the kernel kill it when the thread that started it
        // ends (the test's thread or runtime worker), so none is left over.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("could not run {}: {e}", python.display()))?;
        let mut synapse = Synapse {
            child: Some(child),
            client_url: format!("http://127.0.0.1:{client_port}"),
            federation_addr: SocketAddr::from(([127, 0, 0, 1], fed_port)),
            server_name,
            shared_secret,
            log: files.log,
            cert: files.cert,
            started_in: Duration::ZERO,
            http: crate::server::http_client(),
            dir,
        };
        synapse.wait_healthy(started, self.start_timeout).await?;
        synapse.started_in = started.elapsed();
        Ok(synapse)
    }
}

/// A running Synapse; see the [module docs](self). Killed (with its process
/// group) when dropped, which also deletes its directory (unless the
/// environment variable `WEFT_SYNAPSE_KEEP` is set, for a look at its log
/// and database afterwards).
pub struct Synapse {
    child: Option<Child>,
    client_url: String,
    federation_addr: SocketAddr,
    server_name: String,
    shared_secret: String,
    log: PathBuf,
    cert: PathBuf,
    started_in: Duration,
    http: reqwest::Client,
    // Last: removed after the process is gone.
    dir: tempfile::TempDir,
}

impl Synapse {
    /// Starts a Synapse with the default configuration.
    pub async fn start() -> Result<Synapse, String> {
        SynapseBuilder::default().start().await
    }

    pub fn builder() -> SynapseBuilder {
        SynapseBuilder::default()
    }

    /// `http://127.0.0.1:PORT`: the client API, `/_synapse/admin`, `/health`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The TLS federation listener (federation and key APIs).
    pub fn federation_addr(&self) -> SocketAddr {
        self.federation_addr
    }

    /// `https://127.0.0.1:PORT` of the federation listener.
    pub fn federation_url(&self) -> String {
        format!("https://{}", self.federation_addr)
    }

    /// `localhost:<federation port>`.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// `@localpart:server_name`.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// The self-signed certificate (PEM) of the federation listener.
    pub fn tls_cert_path(&self) -> &Path {
        &self.cert
    }

    /// Synapse's directory (config, database, media, keys, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Synapse's log file (its logging at INFO plus its stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of [`Synapse::log_path`].
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// From spawning the process to the first healthy `/health`.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The process id (also its process group id), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An anonymous [`Client`] of the client API.
    pub fn anon(&self) -> Client {
        Client::at(&self.client_url)
    }

    /// Registers a user through the shared-secret admin API
    /// (`/_synapse/admin/v1/register`: a nonce, then an HMAC-SHA1 of it with
    /// the registration shared secret) and returns `(user_id, access_token)`.
    pub async fn register(&self, localpart: &str, password: &str, admin: bool) -> Result<(String, String), String> {
        let resp = self.register_raw(localpart, password, admin).await?;
        let field = |k: &str| {
            resp[k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("Synapse's register answer lacks `{k}`: {resp}"))
        };
        Ok((field("user_id")?, field("access_token")?))
    }

    /// [`Synapse::register`] returning a logged-in [`Client`] (user id,
    /// token, device id, password and localpart set); panics on failure.
    pub async fn register_client(&self, localpart: &str) -> Client {
        let password = format!("pw-{localpart}-synapse");
        let resp = self
            .register_raw(localpart, &password, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let field = |k: &str| {
            resp[k]
                .as_str()
                .unwrap_or_else(|| panic!("Synapse's register answer lacks `{k}`: {resp}"))
                .to_owned()
        };
        let mut c = self.anon();
        c.user_id = field("user_id");
        c.access_token = field("access_token");
        c.device_id = field("device_id");
        c.password = password;
        c.localpart = localpart.to_owned();
        c
    }

    async fn register_raw(&self, localpart: &str, password: &str, admin: bool) -> Result<Value, String> {
        let url = format!("{}/_synapse/admin/v1/register", self.client_url);
        let (status, nonce) = self.json(self.http.get(&url)).await?;
        let nonce = match nonce["nonce"].as_str() {
            Some(n) if status == 200 => n.to_owned(),
            _ => return Err(format!("GET {url}: {status} {nonce}")),
        };
        let mac = registration_mac(&self.shared_secret, &nonce, localpart, password, admin);
        let body = json!({
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac,
        });
        let (status, resp) = self.json(self.http.post(&url).json(&body)).await?;
        if status == 200 {
            Ok(resp)
        } else {
            Err(format!("registering {localpart} on Synapse: {status} {resp}"))
        }
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value), String> {
        let resp = req.send().await.map_err(|e| format!("Synapse request: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| format!("Synapse response: {e}"))?;
        let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "_raw": text }));
        Ok((status, v))
    }

    async fn wait_healthy(&mut self, started: Instant, timeout: Duration) -> Result<(), String> {
        let url = format!("{}/health", self.client_url);
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| format!("reqwest: {e}"))?;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "Synapse exited ({status}) before answering {url}; the end of its log {}:\n{}",
                    self.log.display(),
                    self.log_tail(40)
                ));
            }
            if let Ok(resp) = probe.get(&url).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "Synapse did not answer {url} within {timeout:?}; the end of its log {}:\n{}",
                    self.log.display(),
                    self.log_tail(40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- Synapse {} log ({}), last 60 lines ---\n{}\n--- end of Synapse log ---",
                self.server_name,
                self.log.display(),
                self.log_tail(60)
            );
        }
        if std::env::var_os("WEFT_SYNAPSE_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "WEFT_SYNAPSE_KEEP: kept Synapse {}'s directory {}",
                self.server_name,
                self.dir.path().display()
            );
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the process group we made the child lead
            // (`process_group(0)`); the child is not reaped yet, so the id is
            // still ours.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `mac` of a shared-secret registration: hex HMAC-SHA1 keyed with the
/// shared secret over `nonce NUL user NUL password NUL admin|notadmin`.
pub fn registration_mac(secret: &str, nonce: &str, user: &str, password: &str, admin: bool) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    for part in [nonce, user, password] {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    mac.update(if admin {
        b"admin".as_slice()
    } else {
        b"notadmin".as_slice()
    });
    mac.finalize().into_bytes().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Two distinct free TCP ports on 127.0.0.1 (both held while the second is
/// picked, then released for Synapse to bind).
fn two_free_ports() -> Result<(u16, u16), String> {
    let a = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let b = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(|e| format!("local_addr: {e}"));
    Ok((port(&a)?, port(&b)?))
}

fn random_bytes(n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(buf)
}

fn random_token(n: usize) -> Result<String, String> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(n)?))
}

struct Files {
    config: PathBuf,
    log: PathBuf,
    cert: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes homeserver.yaml, the log config, the signing key and the TLS
/// certificate and key into `root`.
fn write_files(
    root: &Path,
    server_name: &str,
    client_port: u16,
    fed_port: u16,
    shared_secret: &str,
    extra_yaml: &str,
) -> Result<Files, String> {
    // Paths go into YAML double-quoted; a temp dir path has no quotes or
    // backslashes, but make sure.
    let p = |name: &str| -> Result<String, String> {
        let path = root.join(name);
        let s = path
            .to_str()
            .ok_or_else(|| format!("non-UTF-8 path {}", path.display()))?;
        if s.contains(['"', '\\']) {
            return Err(format!("unusable temp path {s}"));
        }
        Ok(s.to_owned())
    };

    // An ed25519 signing key is its 32-byte seed: `ed25519 <version>
    // <unpadded base64>`, the format Synapse's `--generate-keys` writes.
    let seed = base64::engine::general_purpose::STANDARD_NO_PAD.encode(random_bytes(32)?);
    write(&root.join("signing.key"), &format!("ed25519 a_weft {seed}\n"))?;

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(|e| format!("self-signed certificate: {e}"))?;
    write(&root.join("tls.crt"), &cert.cert.pem())?;
    write(&root.join("tls.key"), &cert.signing_key.serialize_pem())?;

    let log = p("synapse.log")?;
    write(
        &root.join("log.yaml"),
        &format!(
            r#"version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: "{log}"
    encoding: utf8
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"#
        ),
    )?;

    // Far above anything a test does (per second and burst).
    let unlimited = "{per_second: 100000, burst_count: 100000}";
    let config = format!(
        r#"# Written by weft-testkit's Synapse rig (crates/testkit/src/synapse.rs).
server_name: "{server_name}"
pid_file: "{pid}"
public_baseurl: "http://127.0.0.1:{client_port}/"
report_stats: false
enable_metrics: false
listeners:
  - port: {client_port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
  - port: {fed_port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: true
    resources:
      - names: [federation, keys]
        compress: false
tls_certificate_path: "{tls_crt}"
tls_private_key_path: "{tls_key}"
federation_verify_certificates: false
trusted_key_servers: []
suppress_key_server_warning: true
# Peers on loopback (Weft under test) are allowed federation destinations.
ip_range_whitelist: ["127.0.0.0/8", "::1/128"]
allow_public_rooms_over_federation: true
database:
  name: sqlite3
  args:
    database: "{db}"
log_config: "{log_config}"
media_store_path: "{media}"
signing_key_path: "{signing_key}"
registration_shared_secret: "{shared_secret}"
macaroon_secret_key: "{shared_secret}-macaroon"
form_secret: "{shared_secret}-form"
enable_registration: false
# Cheap password hashing: registering takes milliseconds, not ~0.4 s.
bcrypt_rounds: 4
rc_message: {unlimited}
rc_registration: {unlimited}
rc_registration_token_validity: {unlimited}
rc_login:
  address: {unlimited}
  account: {unlimited}
  failed_attempts: {unlimited}
rc_admin_redaction: {unlimited}
rc_joins:
  local: {unlimited}
  remote: {unlimited}
rc_joins_per_room: {unlimited}
rc_invites:
  per_room: {unlimited}
  per_user: {unlimited}
  per_issuer: {unlimited}
rc_third_party_invite: {unlimited}
rc_key_requests: {unlimited}
rc_3pid_validation: {unlimited}
rc_media_create: {unlimited}
rc_presence:
  per_user: {unlimited}
rc_delayed_event_mgmt: {unlimited}
rc_room_creation: {unlimited}
rc_reports: {unlimited}
rc_user_directory: {unlimited}
rc_profile: {unlimited}
rc_federation:
  window_size: 1000
  sleep_limit: 100000
  sleep_delay: 1
  reject_limit: 100000
  concurrent: 100000
federation_rr_transactions_per_room_per_second: 100000
# Each /sync is computed afresh: by default Synapse answers a repeated
# identical request (an initial sync, say) from a 2-minute cache.
caches:
  sync_response_cache_duration: 0
{extra_yaml}"#,
        pid = p("homeserver.pid")?,
        tls_crt = p("tls.crt")?,
        tls_key = p("tls.key")?,
        db = p("homeserver.db")?,
        log_config = p("log.yaml")?,
        media = p("media")?,
        signing_key = p("signing.key")?,
    );
    let config_path = root.join("homeserver.yaml");
    write(&config_path, &config)?;
    Ok(Files {
        config: config_path,
        log: root.join("synapse.log"),
        cert: root.join("tls.crt"),
    })
}

#[cfg(test)]
mod tests {
    use super::registration_mac;

    #[test]
    fn registration_mac_is_hmac_sha1_of_the_nul_joined_fields() {
        // Computed independently with Python's hmac module:
        // hmac.new(b"secret", b"abc\0alice\0pw\0notadmin", hashlib.sha1).hexdigest()
        assert_eq!(
            registration_mac("secret", "abc", "alice", "pw", false),
            "42e32623fe124933c326f9d2d67ff7c617915a10"
        );
        assert_eq!(
            registration_mac("secret", "abc", "alice", "pw", true),
            "dc5ed98b283077684552e3f72d67f26b3366bf58"
        );
    }
}
