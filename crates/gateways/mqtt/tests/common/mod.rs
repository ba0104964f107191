//! The MQTT door's test harness: the workspace's [`TestServer`]
//! (weft-testkit: the real `weft` binary on free ports, its own data
//! directory, a Matrix HTTP client) waiting for the MQTT listeners too,
//! with their addresses at hand. The rumqttc client wrappers are in
//! [`client`].

#![allow(dead_code, unused_imports)]

pub mod client;

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

/// A registered user, talking Matrix over HTTP.
pub use weft_testkit::Client as User;
pub use weft_testkit::{DEFAULT_SERVER_NAME as SERVER_NAME, TestServer, enc};

/// A [`TestServer`] (which it dereferences to) with MQTT over TCP and TLS.
pub struct Server {
    inner: TestServer,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// MQTT over TLS.
    pub mqtt_tls: SocketAddr,
    /// The self-signed certificate the server generated: the CA file.
    pub tls_cert: PathBuf,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts with extra environment settings.
    pub async fn start_with(env: &[(&str, &str)]) -> Server {
        let mut builder = TestServer::builder().with_mqtt();
        for (k, v) in env {
            builder = builder.env(k, v);
        }
        let inner = builder.start().await;
        let mut srv = Server {
            inner,
            mqtt_host: String::new(),
            mqtt_port: 0,
            mqtt_tls: SocketAddr::from(([0, 0, 0, 0], 0)),
            tls_cert: PathBuf::new(),
        };
        srv.read_addrs();
        srv
    }

    /// `n` processes with MQTT on one fresh PostgreSQL database
    /// (docs/scale-out.md); `None` when PostgreSQL is unreachable and `CI`
    /// is unset.
    pub async fn cluster(n: usize) -> Option<Vec<Server>> {
        let servers = TestServer::builder().with_mqtt().start_cluster(n).await?;
        Some(
            servers
                .into_iter()
                .map(|inner| {
                    let mut srv = Server {
                        inner,
                        mqtt_host: String::new(),
                        mqtt_port: 0,
                        mqtt_tls: SocketAddr::from(([0, 0, 0, 0], 0)),
                        tls_cert: PathBuf::new(),
                    };
                    srv.read_addrs();
                    srv
                })
                .collect(),
        )
    }

    fn read_addrs(&mut self) {
        let addrs = self.inner.addrs();
        let mqtt = addrs.mqtt.expect("mqtt address");
        self.mqtt_host = mqtt.ip().to_string();
        self.mqtt_port = mqtt.port();
        self.mqtt_tls = addrs.mqtt_tls.expect("mqtt tls address");
        self.tls_cert = addrs.mqtt_tls_cert.clone().expect("mqtt tls certificate");
    }

    pub fn mqtt_addr(&self) -> String {
        format!("{}:{}", self.mqtt_host, self.mqtt_port)
    }

    /// Stops the server with SIGTERM (asserting a clean exit) and starts it
    /// again on the same data directory; the ports change (clients made
    /// before follow).
    pub async fn restart(&mut self) {
        let status = self.inner.terminate(Duration::from_secs(15)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "no clean exit on SIGTERM: {status:?}\n{}",
            self.inner.log_tail(30)
        );
        self.inner.restart().await;
        self.read_addrs();
    }

    /// `host:port` of the HTTP listener (which also serves MQTT over WebSocket).
    pub fn http_addr(&self) -> String {
        self.base_url().trim_start_matches("http://").to_owned()
    }
}

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.inner
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.inner
    }
}
