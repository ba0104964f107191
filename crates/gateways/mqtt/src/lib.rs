//! The MQTT door: MQTT 3.1.1 and 5 over TCP, TLS and WebSocket, a thin
//! adapter onto `weft_services::Services`. Devices publish events and
//! state to rooms and subscribe to rooms' events; the topic scheme is in
//! docs/mqtt.md and [`topics`]. Authentication, authorization and event
//! building are the shared services'; this crate decodes MQTT (with
//! rumqttc's codecs, see [`codec`]), tracks MQTT sessions, and reads the
//! server's stream.
//!
//! One [`Mqtt`] serves every transport: the connection code is generic
//! over the byte stream, so TCP ([`Mqtt::serve_tcp`]), TLS
//! ([`Mqtt::serve_tls`]) and WebSocket ([`Mqtt::ws_router`]) share one
//! code path, one connection cap and one table of live sessions.

mod codec;
mod conn;
mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod tls;
pub mod topics;
mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use weft_services::{ConnectionPermit, Services};

pub use codec::MAX_PACKET;
pub use ws::WS_PATH;

/// Time a TLS client has to complete its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open MQTT connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Shared by all connections of one listener.
pub(crate) struct Broker {
    pub(crate) services: Arc<Services>,
    /// Live connections by user and client ID.
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
    /// One permit per open connection, whatever its transport.
    slots: Arc<Semaphore>,
    /// Set when the server shuts down: connections save their sessions and end.
    shutdown: watch::Sender<bool>,
    /// This process's part of a connection's owner name in the database
    /// (`NONCE/ID`), on a backend several processes share.
    nonce: String,
    /// Whether connections claim their client IDs in the database (several
    /// processes may share it: PostgreSQL).
    pub(crate) shared: bool,
}

struct Live {
    id: u64,
    /// Its claim of the client ID has been seen on the stream: a later
    /// claim by another process ends it.
    claimed: bool,
    kill: Arc<Notify>,
    /// Held by a connection for its life, so a successor starts only after
    /// its predecessor has saved the session.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Broker {
    /// Registers a connection under `key`, telling an older one to end.
    /// Returns its ID, its kill signal and the session lock to take.
    fn register(&self, key: &str) -> (u64, Arc<Notify>, Arc<tokio::sync::Mutex<()>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        let mut live = self.live.lock();
        let lock = live.get(key).map(|l| l.lock.clone()).unwrap_or_default();
        let old = live.insert(
            key.to_owned(),
            Live {
                id,
                claimed: false,
                kill: kill.clone(),
                lock: lock.clone(),
            },
        );
        if let Some(old) = old {
            old.kill.notify_one();
        }
        (id, kill, lock)
    }

    /// The name of connection `id` in the database.
    pub(crate) fn owner(&self, id: u64) -> String {
        format!("{}/{id}", self.nonce)
    }

    /// Whether `owner` is a connection of this process.
    pub(crate) fn is_ours(&self, owner: &str) -> bool {
        owner
            .strip_prefix(self.nonce.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Follows every process's claims of client IDs on the stream, in
    /// stream order: a claim by another process ends this process's
    /// connection for that client if that connection's own claim came
    /// first ([MQTT-3.1.4-2] across processes; if ours came later, the
    /// other process ends its connection instead).
    async fn follow_claims(self: Arc<Self>) {
        let mut rx = self.services.subscribe_stream();
        let mut seen = *rx.borrow_and_update();
        while rx.changed().await.is_ok() {
            let upto = *rx.borrow_and_update();
            for (key, event) in self.services.mqtt_client_events(seen, upto).unwrap_or_default() {
                let Some(owner) = event.strip_prefix('+') else {
                    continue;
                };
                let mut live = self.live.lock();
                let Some(l) = live.get_mut(&key) else {
                    continue;
                };
                if self.is_ours(owner) {
                    if owner == self.owner(l.id) {
                        l.claimed = true;
                    }
                } else if l.claimed {
                    tracing::debug!("mqtt: client {key:?} connected to another process: ending it here");
                    l.kill.notify_one();
                }
            }
            seen = upto;
        }
    }

    fn unregister(&self, key: &str, id: u64) {
        let mut live = self.live.lock();
        if live.get(key).is_some_and(|l| l.id == id) {
            live.remove(key);
        }
    }
}

/// The MQTT door, shared by its transports. Cheap to clone.
#[derive(Clone)]
pub struct Mqtt {
    broker: Arc<Broker>,
}

impl Mqtt {
    /// The door of `services`. On a database several processes share
    /// (PostgreSQL) it follows their claims of client IDs (needs a tokio
    /// runtime).
    pub fn new(services: Arc<Services>) -> Self {
        let shared = services.config.database.backend == "postgres";
        // The store's tag: a claim whose process is gone is seen so
        // (`Store::claim_mqtt_client`).
        let nonce = services.process_tag().to_owned();
        let broker = Arc::new(Broker {
            services,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            shutdown: watch::Sender::new(false),
            nonce,
            shared,
        });
        if shared {
            tokio::spawn(broker.clone().follow_claims());
        }
        Mqtt { broker }
    }

    /// A connection slot, if fewer than [`MAX_CONNECTIONS`] are open (and
    /// the server is not shutting down).
    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if *self.broker.shutdown.borrow() {
            return None;
        }
        self.broker.slots.clone().try_acquire_owned().ok()
    }

    /// The next accepted connection that gets a slot, and one of its
    /// address's (`[limits] max_connections_per_ip`, shared with the HTTP
    /// listener). One over either cap is closed at once.
    async fn admit(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, (OwnedSemaphorePermit, ConnectionPermit)) {
        loop {
            let Some((stream, peer)) = accept(listener).await else {
                continue;
            };
            let Some(slot) = self.slot() else {
                tracing::warn!("mqtt: {MAX_CONNECTIONS} connections open; closing the one from {peer}");
                continue;
            };
            match self.broker.services.connections.try_open(peer.ip()) {
                Some(per_ip) => return (stream, peer, (slot, per_ip)),
                None => tracing::debug!("mqtt: too many connections from {}; closing a new one", peer.ip()),
            }
        }
    }

    /// Starts [`Mqtt::shutdown`] without waiting.
    pub fn begin_shutdown(&self) {
        self.broker.shutdown.send_replace(true);
    }

    /// Shuts the door: no new connections; open ones end (MQTT 5 with
    /// DISCONNECT `0x8B` server shutting down, no will) after storing
    /// their persistent sessions. Waits for them at most `wait`.
    pub async fn shutdown(&self, wait: Duration) {
        self.begin_shutdown();
        let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
        if tokio::time::timeout(wait, self.broker.slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("mqtt: connections still open after {wait:?} of shutting down");
        }
    }

    /// Serves plain MQTT on `listener` until the task is dropped: one task
    /// per connection; a failing connection never affects the others.
    pub async fn serve_tcp(self, listener: TcpListener) {
        loop {
            let (stream, peer, slot) = self.admit(&listener).await;
            let broker = self.broker.clone();
            tokio::spawn(async move {
                let (rd, wr) = stream.into_split();
                conn::run(broker, Box::new(rd), Box::new(wr), Some(peer)).await;
                drop(slot);
            });
        }
    }

    /// Serves MQTT over TLS on `listener`. Each handshake runs in the
    /// connection's own task, within [`TLS_HANDSHAKE_TIMEOUT`]: a failing
    /// or stalled one affects no other connection.
    pub async fn serve_tls(self, listener: TcpListener, acceptor: TlsAcceptor) {
        loop {
            let (stream, peer, slot) = self.admit(&listener).await;
            let broker = self.broker.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let (rd, wr) = tokio::io::split(tls);
                        conn::run(broker, Box::new(rd), Box::new(wr), Some(peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("mqtt: TLS handshake with {peer} failed: {e}"),
                    Err(_) => tracing::debug!("mqtt: TLS handshake with {peer} timed out"),
                }
                drop(slot);
            });
        }
    }

    /// Serves one MQTT connection over any byte stream (TLS, WebSocket,
    /// in-memory…) until it ends. `peer` is the client's address, used for
    /// the per-address connection budget. Counts against
    /// [`MAX_CONNECTIONS`]; over it the stream is closed at once.
    pub async fn serve_connection<S>(&self, stream: S, peer: Option<SocketAddr>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(slot) = self.slot() else {
            tracing::warn!("mqtt: {MAX_CONNECTIONS} connections open; closing the one from {peer:?}");
            return;
        };
        self.serve_in_slot(stream, peer, slot).await;
    }

    async fn serve_in_slot<S>(&self, stream: S, peer: Option<SocketAddr>, slot: OwnedSemaphorePermit)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        conn::run(self.broker.clone(), Box::new(rd), Box::new(wr), peer).await;
        drop(slot);
    }
}

async fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) => {
            // E.g. out of file descriptors: wait rather than spin.
            tracing::warn!("mqtt: accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// Serves plain MQTT on `listener` (see [`Mqtt::serve_tcp`]).
pub async fn serve(services: Arc<Services>, listener: TcpListener) {
    Mqtt::new(services).serve_tcp(listener).await
}
