//! [`TestServer`]: one `weft serve` child per test, on free ports with its
//! own temporary data directory, plus the admin CLI on that directory.
//!
//! Every test builds its own server, so tests are independent and run in
//! parallel under `cargo nextest`. The doors' tests wrap it to add their
//! listener addresses (see [`TestServerBuilder::with_mqtt`] and
//! [`TestServerBuilder::with_coap`]).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::client::Client;
use crate::{Addrs, ServeSpec, ServerProcess, weft_bin};

/// Server name used when the test does not pick one (the binary's default).
pub const DEFAULT_SERVER_NAME: &str = "localhost:8008";

/// Settings of a [`TestServer`] before it starts: environment, server name,
/// which door listeners to wait for, users to create first.
#[derive(Clone)]
pub struct TestServerBuilder {
    env: Vec<(String, String)>,
    server_name: Option<String>,
    bin: Option<PathBuf>,
    wait_mqtt: bool,
    wait_coap: bool,
    users: Vec<(String, String)>,
    federating: bool,
}

impl TestServerBuilder {
    /// Sets an environment variable for the server (and for admin CLI runs).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Passes `--server-name NAME`.
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_string());
        self
    }

    /// Runs this binary instead of [`weft_bin`].
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// Waits for the MQTT listeners (plain and TLS) too; their addresses
    /// are in [`TestServer::addrs`].
    pub fn with_mqtt(mut self) -> Self {
        self.wait_mqtt = true;
        self
    }

    /// Waits for the CoAP listeners (UDP and DTLS) too; their addresses
    /// are in [`TestServer::addrs`].
    pub fn with_coap(mut self) -> Self {
        self.wait_coap = true;
        self
    }

    /// A server other servers can reach: a free port P is picked first,
    /// the server name is `localhost:P` and the federation listener is on
    /// `127.0.0.1:P`; outgoing certificate checks are off (the peers'
    /// certificates are self-signed). A port taken meanwhile by someone
    /// else is retried with another.
    pub fn federating(mut self) -> Self {
        self.federating = true;
        self
    }

    /// Creates the account with the admin CLI (`weft user create`) before
    /// the server starts.
    pub fn user(mut self, localpart: &str, password: &str) -> Self {
        self.users.push((localpart.to_string(), password.to_string()));
        self
    }

    pub async fn start(self) -> TestServer {
        if !self.federating {
            return self.try_start().await.unwrap_or_else(|e| panic!("{e}"));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let builder = self
                .clone()
                .server_name(&format!("localhost:{port}"))
                // The admin CLI (`.user(…)`) reads the name from here.
                .env("WEFT_SERVER_NAME", &format!("localhost:{port}"))
                .env("WEFT_FEDERATION__LISTEN", &format!("127.0.0.1:{port}"))
                .env("WEFT_FEDERATION__VERIFY_CERTIFICATES", "false");
            match builder.try_start().await {
                Ok(server) => return server,
                Err(e) if attempt < 5 && e.contains("cannot listen for federation") => continue,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Starts `n` processes of one deployment (docs/scale-out.md): one
    /// fresh PostgreSQL database, the same server name, the same signing
    /// key (the first process makes it; the others get a copy in their
    /// own data directories before they start). Users of [`Self::user`]
    /// are created once, through the first. `None` (with a printed note)
    /// when PostgreSQL is unreachable and `CI` is not set; with `CI` set
    /// that panics.
    pub async fn start_cluster(self, n: usize) -> Option<Vec<TestServer>> {
        let db = Arc::new(weft_store::pg_testing::PgTestDb::create()?);
        let first = self
            .clone()
            .try_start_on(Some(db.clone()), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let key = first.data_dir.join("signing.key");
        let mut servers = vec![first];
        let mut rest = self;
        rest.users.clear();
        for _ in 1..n {
            let server = rest
                .clone()
                .try_start_on(Some(db.clone()), Some(&key))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            servers.push(server);
        }
        Some(servers)
    }

    async fn try_start(self) -> Result<TestServer, String> {
        // `WEFT_TEST_BACKEND=postgres` runs the server on a fresh
        // PostgreSQL database (docs/scale-out.md) instead of SQLite.
        let pg = match std::env::var("WEFT_TEST_BACKEND").as_deref() {
            Ok("postgres") => Some(Arc::new(
                weft_store::pg_testing::PgTestDb::create()
                    .ok_or("WEFT_TEST_BACKEND=postgres but PostgreSQL is unreachable")?,
            )),
            _ => None,
        };
        self.try_start_on(pg, None).await
    }

    /// Starts on `pg` (SQLite when `None`), with a copy of the signing
    /// key at `key` if given.
    async fn try_start_on(
        self,
        pg: Option<Arc<weft_store::pg_testing::PgTestDb>>,
        key: Option<&Path>,
    ) -> Result<TestServer, String> {
        let root = tempfile::Builder::new()
            .prefix("weft-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = root.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_string());
        let bin = self.bin.clone().unwrap_or_else(weft_bin);
        let mut spec = ServeSpec::new(&bin, &data_dir, root.path().join("server.log"));
        if let Some(name) = &self.server_name {
            spec = spec.arg("--server-name").arg(name);
        }
        if let Some(db) = &pg {
            spec = spec
                .env("WEFT_DATABASE__BACKEND", "postgres")
                .env("WEFT_DATABASE__URL", &db.url);
        }
        if let Some(key) = key {
            std::fs::copy(key, data_dir.join("signing.key")).map_err(|e| format!("copying the signing key: {e}"))?;
        }
        for (k, v) in &self.env {
            spec = spec.env(k, v);
        }
        spec.wait_mqtt = self.wait_mqtt;
        spec.wait_mqtt_tls = self.wait_mqtt;
        spec.wait_coap = self.wait_coap;
        spec.wait_coaps = self.wait_coap;
        for (name, password) in &self.users {
            let (ok, out, err) = run_cli(&spec, "user", "create", &[name, "--password", password]);
            assert!(ok, "weft user create {name}: {out}{err}");
        }
        let process = ServerProcess::start(spec).await?;
        // The first process on a PostgreSQL database becomes the leader
        // (docs/scale-out.md) after a short grace: wait for it (its log
        // says so, unless a `WEFT_LOG` filter hides it), so the background
        // workers run from the test's first request as they do on SQLite.
        if pg.is_some() && key.is_none() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !process.log_tail(400).contains("this process now leads") && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(TestServer {
            base: Arc::new(Mutex::new(process.addrs.http.clone())),
            process,
            root,
            data_dir,
            server_name,
            http: http_client(),
            _pg: pg,
        })
    }
}

pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .pool_max_idle_per_host(16)
        .build()
        .expect("reqwest client")
}

/// Runs `weft <group> <cmd> --data-dir DIR <rest...>` with the server's
/// environment; (success, stdout, stderr).
fn run_cli(spec: &ServeSpec, group: &str, cmd_name: &str, rest: &[&str]) -> (bool, String, String) {
    let mut args = vec![group, cmd_name];
    args.extend_from_slice(rest);
    run_cli_args(spec, &args)
}

/// Runs `weft ARGS… --data-dir DIR` with the server's environment;
/// (success, stdout, stderr).
fn run_cli_args(spec: &ServeSpec, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(&spec.bin);
    // Do not inherit stray WEFT_* settings from the developer's shell.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.args(args).arg("--data-dir").arg(&spec.data_dir);
    let out = cmd.stdin(Stdio::null()).output().expect("run weft cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running (or stopped) `weft serve` child with its temporary data
/// directory; killed when dropped, and its log tail printed if the test
/// panicked.
pub struct TestServer {
    process: ServerProcess,
    root: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub server_name: String,
    /// Shared with every [`Client`] so clients follow the server across
    /// restarts (each start gets a new ephemeral port).
    base: Arc<Mutex<String>>,
    pub http: reqwest::Client,
    /// The PostgreSQL database under `WEFT_TEST_BACKEND=postgres`, dropped
    /// after the server (fields drop in order).
    _pg: Option<Arc<weft_store::pg_testing::PgTestDb>>,
}

impl TestServer {
    /// Default server: registration open, rate limiting disabled, every
    /// door on a free port (see [`ServeSpec::new`]).
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder {
            env: Vec::new(),
            server_name: None,
            bin: None,
            wait_mqtt: false,
            wait_coap: false,
            users: Vec::new(),
            federating: false,
        }
    }

    pub async fn start() -> TestServer {
        Self::builder().start().await
    }

    /// `http://127.0.0.1:PORT` of the currently running child.
    pub fn base_url(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    /// Every address the current child printed (HTTP, and the MQTT and
    /// CoAP listeners it was asked to wait for).
    pub fn addrs(&self) -> &Addrs {
        &self.process.addrs
    }

    /// The TLS federation listener of the current child, if it runs.
    pub fn federation_addr(&self) -> Option<std::net::SocketAddr> {
        self.process.addrs.federation
    }

    /// The server name (`localhost:8008` unless the test chose one, or
    /// `localhost:P` for a [`TestServerBuilder::federating`] server).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// stdout and stderr of every run of the server.
    pub fn stderr_log_path(&self) -> PathBuf {
        self.process.spec().log.clone()
    }

    /// The last `n` lines of the server's log (all runs).
    pub fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    /// The PostgreSQL database the server runs on, if it does.
    pub fn database_url(&self) -> Option<String> {
        self._pg.as_ref().map(|db| db.url.clone())
    }

    /// The temporary directory holding the data directory and the log.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    /// Returns its exit status, or `None` if it had to be SIGKILLed.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.terminate(timeout).await
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts a new child on the same data dir (new ephemeral port). The
    /// previous child must have been stopped.
    pub async fn restart(&mut self) {
        self.process.restart().await.unwrap_or_else(|e| panic!("{e}"));
        *self.base.lock().unwrap() = self.process.addrs.http.clone();
    }

    /// The process ID of the running child.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Runs `weft ARGS… --data-dir DIR` (e.g. `["migrate-from-sqlite",
    /// "--to", url]`) with the server's environment and returns (success,
    /// stdout, stderr).
    pub fn cli_args(&self, args: &[&str]) -> (bool, String, String) {
        run_cli_args(self.process.spec(), args)
    }

    /// Sets an environment variable of the server's next start
    /// ([`TestServer::restart`]) and of later admin CLI runs, e.g. to
    /// restart it on another database.
    pub fn set_env(&mut self, k: &str, v: &str) {
        let spec = self.process.spec_mut();
        spec.env.retain(|(key, _)| key != k);
        spec.env.push((k.to_owned(), v.to_owned()));
    }

    /// Runs `weft <group> <cmd> --data-dir DIR <rest...>` (admin CLI) with
    /// the server's environment and returns (success, stdout, stderr).
    pub fn cli(&self, group: &str, cmd_name: &str, rest: &[&str]) -> (bool, String, String) {
        run_cli(self.process.spec(), group, cmd_name, rest)
    }

    /// A client with no access token.
    pub fn anon(&self) -> Client {
        Client::new(self.http.clone(), self.base.clone())
    }

    /// A client using an arbitrary access token.
    pub fn with_token(&self, token: &str) -> Client {
        let mut c = self.anon();
        c.access_token = token.to_string();
        c
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// The password [`TestServer::register`] gives `localpart`.
    pub fn default_password(localpart: &str) -> String {
        format!("pw-{localpart}-correct-horse")
    }

    /// Registers `localpart` through user-interactive auth with
    /// `m.login.dummy` and returns a logged-in client.
    pub async fn register(&self, localpart: &str) -> Client {
        let password = Self::default_password(localpart);
        self.register_with_password(localpart, &password).await
    }

    pub async fn register_with_password(&self, localpart: &str, password: &str) -> Client {
        let anon = self.anon();
        let body = json!({"username": localpart, "password": password});
        let (status, first) = anon.post("register", body.clone()).await;
        assert_eq!(status, 401, "first /register (no auth) should be a UIA 401: {first}");
        let session = first["session"]
            .as_str()
            .unwrap_or_else(|| panic!("UIA 401 without session: {first}"));
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": session});
        let (status, resp) = anon.post("register", body).await;
        assert_eq!(status, 200, "register {localpart}: {resp}");
        self.client_from_login(&resp, localpart, password)
    }

    fn client_from_login(&self, resp: &Value, localpart: &str, password: &str) -> Client {
        let s = |k: &str| -> String {
            resp[k]
                .as_str()
                .unwrap_or_else(|| panic!("login/register response lacks `{k}`: {resp}"))
                .to_string()
        };
        let mut c = self.with_token(&s("access_token"));
        c.user_id = s("user_id");
        c.device_id = s("device_id");
        c.password = password.to_string();
        c.localpart = localpart.to_string();
        c
    }

    /// POST /login with m.login.password and `identifier`; returns raw result.
    pub async fn login_raw(&self, localpart: &str, password: &str) -> (u16, Value) {
        self.login_request(localpart, password, None).await
    }

    async fn login_request(&self, localpart: &str, password: &str, device_id: Option<&str>) -> (u16, Value) {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        self.anon().post("login", body).await
    }

    /// Logs in (new device) and returns a client; panics unless 200.
    pub async fn login(&self, localpart: &str, password: &str) -> Client {
        let (status, resp) = self.login_raw(localpart, password).await;
        assert_eq!(status, 200, "login {localpart}: {resp}");
        self.client_from_login(&resp, localpart, password)
    }

    /// Logs in as device `device_id` (made or reused) and returns a client;
    /// panics unless 200.
    pub async fn login_device(&self, localpart: &str, password: &str, device_id: &str) -> Client {
        let (status, resp) = self.login_request(localpart, password, Some(device_id)).await;
        assert_eq!(status, 200, "login {localpart} as {device_id}: {resp}");
        self.client_from_login(&resp, localpart, password)
    }

    fn dump_logs(&self) {
        // Keep the tail; logs of a busy test can be long.
        eprintln!("===== weft log (tail) =====\n{}", self.process.log_tail(200));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.process.is_running() {
            self.process.kill();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

/// The data directory of `server`.
pub fn data_dir_of(server: &TestServer) -> &Path {
    &server.data_dir
}
