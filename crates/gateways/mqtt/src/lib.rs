//! The MQTT door: MQTT 3.1.1 and 5 over TCP, a thin adapter onto
//! `weft_services::Services`. Devices publish events and state to rooms
//! and subscribe to rooms' events; the topic scheme is in docs/mqtt.md and
//! [`topics`]. Authentication, authorization and event building are the
//! shared services'; this crate decodes MQTT (with rumqttc's codecs, see
//! [`codec`]), tracks MQTT sessions, and reads the server's stream.

mod codec;
mod conn;
mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod topics;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use weft_services::Services;

pub use codec::MAX_PACKET;

/// Open MQTT connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Shared by all connections of one listener.
pub(crate) struct Broker {
    pub(crate) services: Arc<Services>,
    /// Live connections by user and client ID.
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
}

struct Live {
    id: u64,
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
                kill: kill.clone(),
                lock: lock.clone(),
            },
        );
        if let Some(old) = old {
            old.kill.notify_one();
        }
        (id, kill, lock)
    }

    fn unregister(&self, key: &str, id: u64) {
        let mut live = self.live.lock();
        if live.get(key).is_some_and(|l| l.id == id) {
            live.remove(key);
        }
    }
}

/// Serves MQTT on `listener` until the task is dropped: one task per
/// connection; a failing connection never affects the others.
pub async fn serve(services: Arc<Services>, listener: TcpListener) {
    let broker = Arc::new(Broker {
        services,
        live: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("mqtt: {MAX_CONNECTIONS} connections open; closing the one from {peer}");
                    continue;
                };
                let broker = broker.clone();
                tokio::spawn(async move {
                    conn::run(broker, stream).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // E.g. out of file descriptors: wait rather than spin.
                tracing::warn!("mqtt: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
