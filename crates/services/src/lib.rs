//! The shared services every door calls: accounts and devices, room
//! operations (membership, sending, reading with access checks), sync, and
//! rate limiting. Doors (HTTP, CoAP, MQTT, WebSocket) decode their wire
//! format and call these; they hold no room or account logic of their own.
//! Events are written only through `weft-rooms`.

pub mod accounts;
pub mod admin;
pub mod appservice;
pub mod appservice_push;
pub mod backup;
pub mod connections;
pub mod content;
pub mod devices;
pub mod directory;
pub mod ephemeral;
pub mod events;
pub mod federation;
pub mod federation_e2ee;
pub mod federation_queue;
pub mod federation_remote;
pub mod federation_rooms;
pub mod federation_txn;
pub mod files;
pub mod filter;
pub mod keys;
pub mod leader;
pub mod media;
mod memo;
pub mod preview;
pub mod push;
pub mod push_rules;
pub mod ratelimit;
pub mod relations;
pub mod reports;
pub mod revocation;
pub mod room_ops;
pub mod search;
pub mod sign_in;
pub mod sliding_sync;
pub mod spaces;
pub mod stream;
pub mod sync;
pub mod text;
pub mod tls;
pub mod tokens;
pub mod upgrade;
pub mod user_data;

use std::collections::BTreeMap;
use std::sync::Arc;

use ruma::OwnedServerName;
use weft_core::{Config, Error, Result};
use weft_rooms::Rooms;
use weft_store::Store;

pub use accounts::{Accounts, Session};
pub use connections::{ConnectionLimiter, ConnectionPermit};
pub use ratelimit::RateLimiter;
/// An event on its way to the store, for a door that acknowledges it once
/// it is durable.
pub use weft_rooms::Submitted;

/// Spec versions whose Client-Server API subset Weft serves.
pub const SPEC_VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11",
];

/// Everything a door needs, built once at start-up.
pub struct Services {
    pub config: Config,
    pub server_name: OwnedServerName,
    pub(crate) store: Arc<dyn Store>,
    pub rooms: Arc<Rooms>,
    pub accounts: Accounts,
    /// The general rate limit (`[rate_limit]` per_second/burst): keys
    /// `ip:ADDRESS`, user IDs, and `origin:SERVER` for requests another
    /// server signed (federation).
    pub limiter: Arc<RateLimiter>,
    /// Sign-in attempts (`/login`, `/register` and its checks) per client
    /// address (`[rate_limit]` login_per_second/login_burst): keys
    /// `login:ADDRESS`, whether or not the caller has a session. In the
    /// database: shared by every process.
    pub login_limiter: ratelimit::SharedLimiter,
    /// Open TCP connections per client address (`[limits]
    /// max_connections_per_ip`), shared by the HTTP and MQTT listeners.
    pub connections: Arc<ConnectionLimiter>,
    /// The media repository's blobs and thumbnailing slots.
    pub media: media::Media,
    /// Federation: the key ring, the signed outgoing client, our name.
    pub federation: weft_federation::Federation,
    /// Push delivery: HTTP client, request limit, pusher tasks.
    pub(crate) push: push::PushRuntime,
    /// Wakes the typing and presence expiry task
    /// ([`Services::run_ephemeral_expiry`]) when a new deadline is set.
    pub(crate) ephemeral_wake: tokio::sync::Notify,
    /// When [`Services::note_active`] last read each sender's presence
    /// (this process's memory only): it reads at most once a second per
    /// user unless this process changed that user's presence since.
    pub(crate) activity_checked: memo::Throttle<()>,
    /// The transaction IDs sent through this process lately (see
    /// [`room_ops::SentTxns`]).
    pub(crate) sent_txns: parking_lot::Mutex<room_ops::SentTxns>,
    /// What `/sync` remembers between syncs (see [`sync::SyncMemo`]).
    pub(crate) sync_memo: sync::SyncMemo,
    /// The outgoing federation queue's wake-ups and announced typers.
    pub(crate) fed_queue: federation_queue::QueueRuntime,
    /// Incoming federation transactions being processed.
    pub(crate) fed_txns: federation_txn::InFlight,
    /// Registered application services (`[appservice]`).
    pub appservices: appservice::AppServices,
    /// Whether this process leads (leader.rs), once a led worker started.
    pub(crate) leadership: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
}

impl Services {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        signing_key: ruma::signatures::Ed25519KeyPair,
        blobs: Arc<dyn weft_media::BlobStore>,
    ) -> Result<Arc<Self>> {
        let server_name = OwnedServerName::try_from(config.server_name.as_str())
            .map_err(|e| Error::internal(format!("invalid server_name {:?}: {e}", config.server_name)))?;
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            server_name.clone(),
            signing_key,
            &config.rooms.default_room_version,
        )?);
        let limiter = Arc::new(RateLimiter::new(&config.rate_limit));
        let login_limiter = ratelimit::SharedLimiter::logins(store.clone(), &config.rate_limit);
        let accounts = Accounts::new(
            store.clone(),
            server_name.clone(),
            config.registration.clone(),
            limiter.clone(),
            &config.rate_limit,
        );
        let connections = Arc::new(ConnectionLimiter::new(config.limits.max_connections_per_ip));
        let media = media::Media::new(blobs, config.media.thumbnail_concurrency);
        let federation = weft_federation::Federation::new(
            &config.federation,
            server_name.clone(),
            rooms.signing_key(),
            store.clone(),
        )?;
        let push = push::PushRuntime::new(&config.push)?;
        let appservices = appservice::AppServices::load(&config.appservice, None, &server_name)?;
        Ok(Arc::new(Self {
            config,
            server_name,
            store,
            rooms,
            accounts,
            limiter,
            login_limiter,
            connections,
            media,
            federation,
            push,
            ephemeral_wake: tokio::sync::Notify::new(),
            activity_checked: Default::default(),
            sent_txns: Default::default(),
            sync_memo: Default::default(),
            fed_queue: federation_queue::QueueRuntime::new(),
            fed_txns: federation_txn::InFlight::default(),
            appservices,
            leadership: std::sync::OnceLock::new(),
        }))
    }
}

impl Services {
    /// The body of `GET /_matrix/client/versions`, the same through every
    /// door. With the CoAP door on, it advertises MSC3079 (low-bandwidth
    /// CS API, version 1 of its tables, Observe on `/sync`, the DTLS port
    /// when that listener runs) under the key
    /// the MSC names, `m.low_bandwidth`, and its unstable-prefixed twin.
    pub fn versions(&self) -> Versions {
        let mut v = Versions {
            versions: SPEC_VERSIONS.iter().map(|v| v.to_string()).collect(),
            unstable_features: BTreeMap::new(),
            low_bandwidth_unstable: None,
            low_bandwidth: None,
        };
        // Simplified sliding sync (MSC4186), as matrix-sdk looks for it.
        v.unstable_features.insert("org.matrix.simplified_msc3575".into(), true);
        if self.config.coap.enabled {
            // The DTLS listener's port (its bound address, once it runs).
            let coap = &self.config.coap;
            let dtls = coap
                .dtls_enabled
                .then(|| coap.dtls_listen.parse::<std::net::SocketAddr>().ok())
                .flatten()
                .map(|addr| addr.port());
            let low_bandwidth = LowBandwidth {
                cbor_enum_version: 1,
                coap_enum_version: 1,
                observe: 1,
                dtls,
            };
            v.unstable_features.insert("org.matrix.msc3079".into(), true);
            v.low_bandwidth_unstable = Some(low_bandwidth.clone());
            v.low_bandwidth = Some(low_bandwidth);
        }
        v
    }

    /// The room versions rooms can be created in, and the one
    /// `/createRoom` uses when the client names none.
    pub fn room_versions(&self) -> (ruma::RoomVersionId, Vec<ruma::RoomVersionId>) {
        let supported = weft_rooms::SUPPORTED_VERSIONS
            .iter()
            .filter_map(|v| ruma::RoomVersionId::try_from(*v).ok())
            .collect();
        (self.rooms.default_version().clone(), supported)
    }

    /// Takes one sign-in attempt from the client address's bucket
    /// (`login_limiter`); callers without a known address share one.
    pub async fn charge_sign_in(&self, ip: Option<std::net::IpAddr>) -> Result<()> {
        let key = ip
            .map(|ip| format!("login:{ip}"))
            .unwrap_or_else(|| "login:".to_owned());
        self.login_limiter.check(&key).await
    }
}

/// The body of `GET /_matrix/client/versions`. Besides the spec's fields it
/// carries MSC3079's top-level `m.low_bandwidth` (and its unstable twin),
/// which ruma's typed response has no place for.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Versions {
    pub versions: Vec<String>,
    /// Always present, `{}` when empty.
    pub unstable_features: BTreeMap<String, bool>,
    #[serde(rename = "org.matrix.msc3079.low_bandwidth", skip_serializing_if = "Option::is_none")]
    pub low_bandwidth_unstable: Option<LowBandwidth>,
    #[serde(rename = "m.low_bandwidth", skip_serializing_if = "Option::is_none")]
    pub low_bandwidth: Option<LowBandwidth>,
}

/// MSC3079's description of the low-bandwidth (CoAP + CBOR) door.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LowBandwidth {
    pub cbor_enum_version: u32,
    pub coap_enum_version: u32,
    pub observe: u32,
    /// The DTLS listener's port, when it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtls: Option<u16>,
}
