//! Open connections per client address, for the listeners of every
//! TCP door (HTTP, MQTT over TCP and TLS): one address cannot take all
//! of the process's file descriptors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

pub struct ConnectionLimiter {
    /// Most connections per address; 0: no limit.
    max_per_ip: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of an address; dropping it closes the slot.
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn new(max_per_ip: usize) -> Self {
        Self {
            max_per_ip,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `ip`, or `None` if it has
    /// [`max_per_ip`](Self::new) open already.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionPermit> {
        let ip = canonical(ip);
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(ConnectionPermit {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip` now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.open.lock().get(&canonical(ip)).copied().unwrap_or(0)
    }

    pub fn max_per_ip(&self) -> usize {
        self.max_per_ip
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An IPv4 address seen through an IPv6 socket counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The MQTT door's live client IDs across processes (docs/mqtt.md,
/// "Several processes"): the database holds which connection has each
/// client, and the stream tells every process of a claim and of a
/// connection's end.
impl crate::Services {
    /// Claims the MQTT client `key` for the connection `owner`; answers
    /// the owner it had (a connection of this or another process).
    pub async fn claim_mqtt_client(&self, key: &str, owner: &str) -> weft_core::Result<Option<String>> {
        self.store
            .claim_mqtt_client(key, owner)
            .await
            .map_err(|_| weft_core::Error::internal("database writer stopped"))?
    }

    /// The connection `owner` of `key` ended and saved its session.
    pub async fn release_mqtt_client(&self, key: &str, owner: &str) -> weft_core::Result<()> {
        self.store
            .release_mqtt_client(key, owner)
            .await
            .map_err(|_| weft_core::Error::internal("database writer stopped"))?
    }

    /// Follows the stream for MQTT client claims and releases of every
    /// process: the receiver of stream positions, and the events after a
    /// position (`None` when this process no longer remembers that far
    /// back): (key, `+owner` or `-owner`).
    pub fn mqtt_client_events(&self, after: i64, upto: i64) -> Option<Vec<(String, String)>> {
        self.stream_keys(after, upto, |k| match k {
            weft_store::StreamKey::MqttClient(key, event) => Some((key, event)),
            _ => None,
        })
    }

    /// This process's name among those on the database
    /// ([`weft_store::Store::process_tag`]).
    pub fn process_tag(&self) -> &str {
        self.store.process_tag()
    }

    /// A receiver of the stream's position (every process's writes).
    pub fn subscribe_stream(&self) -> tokio::sync::watch::Receiver<i64> {
        self.store.subscribe_position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_frees_on_drop() {
        let l = Arc::new(ConnectionLimiter::new(2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = l.try_open(a).unwrap();
        let _p2 = l.try_open(a).unwrap();
        assert!(l.try_open(a).is_none());
        assert!(l.try_open("::ffff:127.0.0.1".parse().unwrap()).is_none());
        let _q = l.try_open(b).unwrap();
        drop(p1);
        assert_eq!(l.open_from(a), 1);
        assert!(l.try_open(a).is_some());
    }
}
