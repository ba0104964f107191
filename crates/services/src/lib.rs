//! The shared services every door calls: accounts and devices, room
//! operations (membership, sending, reading with access checks), sync, and
//! rate limiting. Doors (HTTP, CoAP, MQTT, WebSocket) decode their wire
//! format and call these; they hold no room or account logic of their own.
//! Events are written only through `weft-rooms`.

pub mod accounts;
pub mod content;
pub mod keys;
pub mod ratelimit;
pub mod room_ops;
pub mod stream;
pub mod sync;

use std::sync::Arc;

use ruma::OwnedServerName;
use weft_core::{Config, Error, Result};
use weft_rooms::Rooms;
use weft_store::Store;

pub use accounts::{Accounts, Session};
pub use ratelimit::RateLimiter;

/// Everything a door needs, built once at start-up.
pub struct Services {
    pub config: Config,
    pub server_name: OwnedServerName,
    pub store: Arc<dyn Store>,
    pub rooms: Arc<Rooms>,
    pub accounts: Accounts,
    pub limiter: RateLimiter,
}

impl Services {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        signing_key: ruma::signatures::Ed25519KeyPair,
    ) -> Result<Arc<Self>> {
        let server_name = OwnedServerName::try_from(config.server_name.as_str())
            .map_err(|e| Error::internal(format!("invalid server_name {:?}: {e}", config.server_name)))?;
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            server_name.clone(),
            signing_key,
            &config.rooms.default_room_version,
        )?);
        let accounts = Accounts::new(store.clone(), server_name.clone(), config.registration.clone());
        let limiter = RateLimiter::new(&config.rate_limit);
        Ok(Arc::new(Self {
            config,
            server_name,
            store,
            rooms,
            accounts,
            limiter,
        }))
    }
}
