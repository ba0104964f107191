//! Typed configuration. Sources, later ones winning: built-in defaults, the
//! TOML file in the data directory (`weft.toml`), `WEFT_*` environment
//! variables (`WEFT_REGISTRATION__MODE=open`: double underscore separates
//! sections), then command-line flags applied by the binary.

use std::path::{Path, PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The server name: the part after `:` in user IDs. Cannot change later.
    pub server_name: String,
    /// Address the Client-Server API listens on.
    pub listen: String,
    /// Public base URL advertised in `/.well-known/matrix/client`.
    pub public_baseurl: Option<String>,
    pub registration: RegistrationConfig,
    pub limits: LimitsConfig,
    pub rate_limit: RateLimitConfig,
    pub database: DatabaseConfig,
    pub rooms: RoomsConfig,
    pub mqtt: MqttConfig,
    pub coap: CoapConfig,
    pub voip: VoipConfig,
    pub media: MediaConfig,
    pub push: PushConfig,
    pub presence: PresenceConfig,
    pub federation: FederationConfig,
    pub appservice: AppserviceConfig,
}

/// Application services (docs/appservices.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AppserviceConfig {
    /// Registration files in Synapse's YAML format; relative paths are in
    /// the data directory. A malformed file, or two with the same `id`,
    /// `as_token` or `hs_token`, stops the server at start-up.
    pub registration_files: Vec<String>,
    /// First wait before delivering to a service again after a failed
    /// transaction; doubles with each failure up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How long one request to a service (a transaction, a query, a
    /// ping) may take.
    pub request_timeout_secs: u64,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            registration_files: vec![],
            retry_initial_ms: 1_000,
            retry_max_ms: 300_000,
            request_timeout_secs: 30,
        }
    }
}

/// The Server-Server API (docs/federation.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FederationConfig {
    /// Off: no federation listener, no outgoing federation requests, and
    /// `/.well-known/matrix/server` is not served.
    pub enabled: bool,
    /// `host:port` of the TLS federation listener; port 0 picks a free
    /// one (printed at start-up); empty: no federation listener.
    pub listen: String,
    /// PEM certificate chain and private key of the federation listener;
    /// relative paths are in the data directory. Unset: the generated
    /// self-signed pair the MQTT and CoAP doors use (`tls/mqtt.crt`).
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// Verify other servers' certificates (against the system's roots and
    /// `ca_file`). Off only for tests and local interop.
    pub verify_certificates: bool,
    /// A PEM file of extra trusted CA certificates for outgoing requests.
    pub ca_file: Option<String>,
    /// Notary servers asked for a server's keys when it cannot be asked
    /// itself (`/_matrix/key/v2/query`).
    pub trusted_key_servers: Vec<String>,
    /// `host[:port]` served as `m.server` in `/.well-known/matrix/server`
    /// on the client listener; unset: that path answers 404.
    pub well_known_server: Option<String>,
    /// How long one outgoing federation request may take.
    pub request_timeout_secs: u64,
    /// First wait before sending to a server again after a transaction to
    /// it failed; doubles with each failure up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8448".into(),
            tls_cert: None,
            tls_key: None,
            verify_certificates: true,
            ca_file: None,
            trusted_key_servers: vec![],
            well_known_server: None,
            request_timeout_secs: 30,
            retry_initial_ms: 1_000,
            retry_max_ms: 3_600_000,
        }
    }
}

/// The media repository (docs/media.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MediaConfig {
    /// Largest upload; over it `413 M_TOO_LARGE` and nothing is kept.
    /// Uploads stream to disk: this is not held in memory.
    pub max_upload_bytes: u64,
    /// Bytes each user may keep uploaded; 0: no quota.
    pub quota_bytes_per_user: u64,
    /// Asynchronous uploads (`/media/v1/create`) a user may have waiting.
    pub max_pending_uploads: u64,
    /// How long a created media ID waits for its bytes.
    pub pending_ttl_secs: u64,
    /// Also serve the unauthenticated `/_matrix/media/v3/download` and
    /// `/thumbnail` (deprecated by spec v1.11; Synapse's
    /// `enable_authenticated_media` turns them off).
    pub legacy_unauthenticated: bool,
    /// Images larger than this are not thumbnailed (`400 M_UNKNOWN`).
    pub max_thumbnail_source_bytes: u64,
    /// Thumbnails generated at once; more wait.
    pub thumbnail_concurrency: usize,
    /// URL previews (`/preview_url`): off unless set, and then only for
    /// the hosts of `url_preview_allow`.
    pub url_preview_enabled: bool,
    /// Hosts a preview may fetch from: `example.org` (that host),
    /// `*.example.org` (its subdomains), or an IP address. Nothing else,
    /// so the server cannot be made to fetch from the inside network.
    pub url_preview_allow: Vec<String>,
    /// Where the bytes are kept: `fs` (`media/` in the data directory) or
    /// `s3` (an S3-compatible bucket, for several processes).
    pub backend: String,
    /// The `s3` backend: endpoint URL, bucket, region and credentials.
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub s3_region: String,
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 100 * 1024 * 1024,
            quota_bytes_per_user: 0,
            max_pending_uploads: 5,
            pending_ttl_secs: 24 * 3600,
            legacy_unauthenticated: true,
            max_thumbnail_source_bytes: 32 * 1024 * 1024,
            thumbnail_concurrency: 2,
            url_preview_enabled: false,
            url_preview_allow: vec![],
            backend: "fs".into(),
            s3_endpoint: String::new(),
            s3_bucket: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
        }
    }
}

/// Delivery of push notifications to HTTP pushers (push gateways).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PushConfig {
    /// Requests to push gateways in flight at once, over all pushers.
    pub max_concurrent_requests: usize,
    /// How long one request to a push gateway may take.
    pub request_timeout_secs: u64,
    /// First wait before retrying a gateway that is down or answered 5xx;
    /// doubles with each failure up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 16,
            request_timeout_secs: 10,
            retry_initial_ms: 1_000,
            retry_max_ms: 600_000,
        }
    }
}

/// Presence (`/presence/{userId}/status`, `set_presence` on `/sync`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceConfig {
    /// Off: presence updates are accepted but nothing is stored or relayed
    /// (as Synapse's `use_presence = false`).
    pub enabled: bool,
    /// A user who has not synced (nor set presence) for this long goes
    /// offline; a long-poll counts until its timeout ends.
    pub offline_after_ms: u64,
    /// An online user who has done nothing (sent no event, set no
    /// presence) for this long becomes unavailable.
    pub idle_after_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            offline_after_ms: 30_000,
            idle_after_ms: 300_000,
        }
    }
}

/// TURN servers handed to clients for calls (`GET /voip/turnServer`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VoipConfig {
    /// `turn:`/`turns:` URIs; none: clients are told there is no TURN server.
    pub turn_uris: Vec<String>,
    /// The secret shared with the TURN server (coturn's
    /// `static-auth-secret`), from which time-limited credentials are made.
    pub turn_shared_secret: Option<String>,
    /// How long the credentials hold.
    pub turn_ttl_secs: u64,
}

impl Default for VoipConfig {
    fn default() -> Self {
        Self {
            turn_uris: vec![],
            turn_shared_secret: None,
            turn_ttl_secs: 86_400,
        }
    }
}

/// The MQTT door: plain TCP, TLS, and WebSocket on the HTTP port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MqttConfig {
    /// Off: no MQTT at all (no TCP, TLS or WebSocket).
    pub enabled: bool,
    /// Plain TCP, `host:port`; port 0 picks a free one (printed at
    /// start-up); empty: no plain-TCP listener.
    pub listen: String,
    /// MQTT over TLS (`mqtts`) on `tls_listen`.
    pub tls_enabled: bool,
    /// `host:port` of the TLS listener; port 0 picks a free one.
    pub tls_listen: String,
    /// PEM certificate chain; relative paths are in the data directory.
    /// With neither `tls_cert` nor `tls_key` set, a self-signed
    /// certificate is generated on first start (`tls/mqtt.crt`,
    /// `tls/mqtt.key` in the data directory) and reused afterwards.
    pub tls_cert: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<String>,
    /// MQTT over WebSocket on the HTTP listener, path `/mqtt`.
    pub ws_enabled: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:1883".into(),
            tls_enabled: true,
            tls_listen: "127.0.0.1:8883".into(),
            tls_cert: None,
            tls_key: None,
            ws_enabled: true,
        }
    }
}

/// The CoAP door: plain CoAP on UDP, and CoAP over DTLS 1.2 with a
/// certificate (requests carry an access token) or per-device pre-shared
/// keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CoapConfig {
    pub enabled: bool,
    /// `host:port` of plain CoAP; port 0 picks a free one.
    pub listen: String,
    /// Whether the DTLS (`coaps://`) listener runs.
    pub dtls_enabled: bool,
    /// `host:port` of the DTLS listener; port 0 picks a free one.
    pub dtls_listen: String,
    /// Most DTLS sessions (and handshakes) at once; past it, a new
    /// handshake replaces the longest-idle session if that has been idle
    /// for a minute, and is ignored otherwise.
    pub dtls_max_sessions: usize,
    /// A DTLS session that receives nothing for this long is dropped.
    pub dtls_idle_timeout_secs: u64,
    /// PEM certificate (only the first one, the leaf, is sent) and private
    /// key (ECDSA P-256 or P-384) for DTLS clients without a pre-shared
    /// key; relative paths are in the data directory. Unset: the MQTT
    /// door's pair (`mqtt.tls_cert`/`tls_key`, or the generated one), or
    /// the generated one if that key is not ECDSA.
    pub dtls_cert: Option<String>,
    pub dtls_key: Option<String>,
    /// RFC 7252 §4.8 transmission parameters for the confirmable messages
    /// the door sends (notifications, separate responses): the first wait
    /// for an ACK (times a random factor of 1 to 1.5, then doubling), and
    /// how many times a message is resent before the peer is given up on
    /// (an observer is then dropped).
    pub ack_timeout_ms: u64,
    pub max_retransmit: u32,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:5683".into(),
            dtls_enabled: true,
            dtls_listen: "127.0.0.1:5684".into(),
            dtls_max_sessions: 1000,
            dtls_idle_timeout_secs: 600,
            dtls_cert: None,
            dtls_key: None,
            ack_timeout_ms: 2000,
            max_retransmit: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    /// Only the operator creates accounts (`weft user create`).
    Disabled,
    /// Anyone may register (user-interactive auth `m.login.dummy`).
    Open,
    /// Registration needs one of `tokens` (`m.login.registration_token`).
    Token,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistrationConfig {
    pub mode: RegistrationMode,
    /// Tokens accepted when `mode = "token"`.
    pub tokens: Vec<String>,
    /// Minimum password length for registration and password changes.
    pub min_password_length: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Largest request body accepted, in bytes; larger gets `M_TOO_LARGE`.
    pub max_body_bytes: usize,
    /// Longest `/sync` long-poll a client may ask for, in milliseconds.
    pub max_sync_timeout_ms: u64,
    /// Open TCP connections one client address may have on the HTTP
    /// listener and the MQTT TCP and TLS listeners together; one more is
    /// closed at once. 0: no limit.
    pub max_connections_per_ip: usize,
    /// Seconds an HTTP client has to send a request's headers; a
    /// keep-alive connection waiting this long for its next request is
    /// closed too.
    pub header_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Sustained requests per second allowed per user (or per IP when
    /// unauthenticated).
    pub per_second: f64,
    /// Requests allowed in a burst above the sustained rate.
    pub burst: f64,
    /// Failed password logins allowed per second, per client address
    /// and per account (each has its own bucket), through every door.
    pub failed_login_per_second: f64,
    /// Failed password logins allowed in a burst (per address, per account).
    pub failed_login_burst: f64,
    /// Sign-in requests (`/login`, `/register`, the username and
    /// registration-token checks) allowed per second per client address,
    /// on top of the general limit and whether they succeed or not.
    pub login_per_second: f64,
    /// Sign-in requests allowed in a burst, per client address.
    pub login_burst: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// `sqlite` (embedded, default) or `postgres` (docs/scale-out.md).
    pub backend: String,
    /// PostgreSQL connection URL (`postgres://user:password@host:port/db`)
    /// for `backend = "postgres"`.
    pub url: Option<String>,
    /// SQLite file, relative to the data directory.
    pub sqlite_path: String,
    /// `full` (fsync every commit: an acknowledged event survives power
    /// loss) or `normal` (survives a process crash, faster).
    pub synchronous: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomsConfig {
    /// Room version used by `/createRoom` when the client names none.
    pub default_room_version: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost:8008".into(),
            listen: "127.0.0.1:8008".into(),
            public_baseurl: None,
            registration: RegistrationConfig::default(),
            limits: LimitsConfig::default(),
            rate_limit: RateLimitConfig::default(),
            database: DatabaseConfig::default(),
            rooms: RoomsConfig::default(),
            mqtt: MqttConfig::default(),
            coap: CoapConfig::default(),
            voip: VoipConfig::default(),
            media: MediaConfig::default(),
            push: PushConfig::default(),
            presence: PresenceConfig::default(),
            federation: FederationConfig::default(),
            appservice: AppserviceConfig::default(),
        }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            mode: RegistrationMode::Disabled,
            tokens: vec![],
            min_password_length: 8,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_sync_timeout_ms: 60_000,
            max_connections_per_ip: 2000,
            header_timeout_secs: 10,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            per_second: 50.0,
            burst: 200.0,
            failed_login_per_second: 0.1,
            failed_login_burst: 5.0,
            login_per_second: 1.0,
            login_burst: 30.0,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            backend: "sqlite".into(),
            url: None,
            sqlite_path: "weft.db".into(),
            synchronous: "full".into(),
        }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            default_room_version: "10".into(),
        }
    }
}

/// The config file written on first run: every key, commented.
pub const DEFAULT_CONFIG_TOML: &str = r#"# Weft configuration. Every key is optional; shown here with its default.
# Environment variables override this file: WEFT_<KEY>, and for keys in a
# section WEFT_<SECTION>__<KEY> (e.g. WEFT_REGISTRATION__MODE=open).
# Command-line flags override both.

# The server name: the part after ':' in user IDs (@alice:localhost:8008).
# Choose it before creating users; it cannot be changed later.
server_name = "localhost:8008"

# Address the Client-Server API (HTTP) listens on.
listen = "127.0.0.1:8008"

# Base URL clients should use, advertised in /.well-known/matrix/client.
# Defaults to http://<listen>.
# public_baseurl = "https://matrix.example.org"

[registration]
# "disabled": only the operator creates users (weft user create).
# "open": anyone may register. "token": registration needs one of `tokens`.
mode = "disabled"
tokens = []
min_password_length = 8

[limits]
# Largest request body in bytes; larger requests get M_TOO_LARGE (413).
max_body_bytes = 1048576
# Longest /sync long-poll a client may request, in milliseconds.
max_sync_timeout_ms = 60000
# Open TCP connections per client address, HTTP and MQTT (TCP, TLS)
# together; more are closed at once. 0: no limit.
max_connections_per_ip = 2000
# Seconds an HTTP client has to send its request headers; an idle
# keep-alive connection is closed after this long too.
header_timeout_secs = 10

[rate_limit]
# Per user (per IP when unauthenticated, or when the access token is
# unknown); appservices are exempt.
enabled = true
per_second = 50.0
burst = 200.0
# Failed password logins (HTTP /login and user-interactive auth, MQTT
# CONNECT): a bucket per client address and one per account. When either
# is empty, logins get 429 M_LIMIT_EXCEEDED (MQTT: CONNACK quota exceeded)
# without the password being checked. Successful logins are not counted.
failed_login_per_second = 0.1
failed_login_burst = 5.0
# Sign-in requests (/login, /register, /register/available, the
# registration-token check): a bucket per client address, whether the
# request has an access token or not and whether it succeeds or not.
login_per_second = 1.0
login_burst = 30.0

[database]
# "sqlite" (embedded) or "postgres" (in progress: docs/scale-out.md).
backend = "sqlite"
# For "postgres": postgres://user:password@host:port/database
# url = "postgres://weft:change-me@127.0.0.1:5432/weft"
# Relative to the data directory.
sqlite_path = "weft.db"
# "full": every acknowledged write is fsynced (survives power loss).
# "normal": survives a process crash; faster on slow disks.
synchronous = "full"

[rooms]
# Room version for /createRoom when the client names none (10, 11 or 12).
default_room_version = "10"

[mqtt]
# The MQTT door (3.1.1 and 5). See docs/mqtt.md. enabled = false turns off
# every MQTT transport (TCP, TLS, WebSocket).
enabled = true
# Plain TCP; "" for none (e.g. TLS only).
listen = "127.0.0.1:1883"
# MQTT over TLS (mqtts).
tls_enabled = true
tls_listen = "127.0.0.1:8883"
# PEM certificate chain and private key; relative paths are in the data
# directory. Unset: a self-signed certificate for the server name,
# localhost and 127.0.0.1 is generated on first start into tls/mqtt.crt
# and tls/mqtt.key (give clients tls/mqtt.crt as their CA file).
# tls_cert = "tls/mqtt.crt"
# tls_key = "tls/mqtt.key"
# MQTT over WebSocket on the HTTP listener, path /mqtt (subprotocol mqtt).
ws_enabled = true

[coap]
# The CoAP+CBOR door (UDP). See docs/coap.md.
enabled = true
listen = "127.0.0.1:5683"
# CoAP over DTLS 1.2 (coaps://). Runs when `enabled` is true too. A client
# with a pre-shared key minted by `weft user psk NAME [--device-id ID]` needs
# no access token; any other client gets the certificate below and sends
# its access token (?a=TOKEN) as on plain CoAP.
dtls_enabled = true
dtls_listen = "127.0.0.1:5684"
# PEM certificate and private key (ECDSA P-256 or P-384); relative paths
# are in the data directory. Unset: MQTT's tls_cert/tls_key, or the
# generated tls/mqtt.crt and tls/mqtt.key (also if MQTT's key is not ECDSA).
# dtls_cert = "tls/mqtt.crt"
# dtls_key = "tls/mqtt.key"
# Most DTLS sessions at once; past it a new handshake replaces the
# longest-idle session (if idle for a minute) or is ignored.
dtls_max_sessions = 1000
# Drop a DTLS session that has received nothing for this many seconds.
dtls_idle_timeout_secs = 600
# Confirmable messages the door sends (Observe notifications, separate
# responses) wait ack_timeout_ms (x 1..1.5, doubling each time) for an ACK
# and are resent up to max_retransmit times; then the observer is dropped.
# RFC 7252's defaults; raise them for slow radio links.
ack_timeout_ms = 2000
max_retransmit = 4

[voip]
# TURN servers for calls, handed out by GET /voip/turnServer with
# time-limited credentials made from the secret shared with the TURN
# server (coturn: use-auth-secret, static-auth-secret). No URIs: clients
# are told there is no TURN server.
turn_uris = []
# turn_shared_secret = "a long random string"
turn_ttl_secs = 86400

[push]
# Push notifications to HTTP pushers (push gateways such as Sygnal).
# Requests in flight at once, over all pushers, and how long one may take.
max_concurrent_requests = 16
request_timeout_secs = 10
# A gateway that is down or answers 5xx is retried after retry_initial_ms,
# doubling with each failure up to retry_max_ms; notifications wait, in order.
retry_initial_ms = 1000
retry_max_ms = 600000

[federation]
# The Server-Server API. See docs/federation.md. enabled = false: no
# federation listener and no requests to other servers.
enabled = true
# The TLS federation listener; "" for none.
listen = "127.0.0.1:8448"
# PEM certificate chain and key; relative paths are in the data directory.
# Unset: the generated self-signed tls/mqtt.crt and tls/mqtt.key.
# tls_cert = "tls/federation.crt"
# tls_key = "tls/federation.key"
# Check other servers' certificates (system roots plus ca_file). Turn off
# only for tests and local interop (a warning is logged at start-up).
verify_certificates = true
# ca_file = "/etc/ssl/my-test-ca.pem"
# Notaries asked for a server's keys when that server cannot be asked.
trusted_key_servers = []
# Delegation: served as {"m.server": ...} at /.well-known/matrix/server on
# the client listener. Unset: that path answers 404.
# well_known_server = "matrix.example.org:443"
# How long one outgoing federation request may take, in seconds.
request_timeout_secs = 30
# A server a transaction could not be sent to is tried again after
# retry_initial_ms, doubling with each failure up to retry_max_ms.
retry_initial_ms = 1000
retry_max_ms = 3600000

[appservice]
# Application services' registration files (Synapse's YAML format);
# relative paths are in the data directory (docs/appservices.md).
registration_files = []
# A service that failed a transaction is tried again after
# retry_initial_ms, doubling with each failure up to retry_max_ms.
retry_initial_ms = 1000
retry_max_ms = 300000
# How long one request to a service may take, in seconds.
request_timeout_secs = 30
"#;

impl Config {
    /// Loads defaults, then `config_file` if it exists, then `WEFT_*` env vars.
    pub fn load(config_file: &Path) -> Result<Self, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if config_file.exists() {
            fig = fig.merge(Toml::file(config_file));
        }
        fig = fig.merge(Env::prefixed("WEFT_").split("__").ignore(&["data_dir", "config"]));
        fig.extract().map_err(|e| format!("invalid configuration: {e}"))
    }

    /// Path of the SQLite database inside `data_dir`.
    pub fn sqlite_file(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.database.sqlite_path)
    }

    /// Base URL advertised to clients.
    pub fn base_url(&self) -> String {
        self.public_baseurl
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}
