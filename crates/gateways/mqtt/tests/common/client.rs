//! A rumqttc 3.1.1 client driven from a test, and small helpers shared by
//! the MQTT test files.

use std::time::Duration;

use rumqttc::{MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::User;

pub const WAIT: Duration = Duration::from_secs(5);

/// A rumqttc 3.1.1 client whose event loop runs in a task; incoming packets
/// (and the first error, which ends the loop) come out of `rx`.
pub struct Mqtt {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Result<Packet, rumqttc::ConnectionError>>,
    /// The event loop; aborting it drops the socket without DISCONNECT.
    pub task: tokio::task::JoinHandle<()>,
}

pub fn spawn(o: MqttOptions) -> Mqtt {
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    Mqtt { client, rx, task }
}

impl Mqtt {
    pub async fn next(&mut self) -> Result<Packet, rumqttc::ConnectionError> {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("no MQTT packet in time")
            .expect("event loop ended")
    }

    /// Skips pings; panics on errors.
    pub async fn packet(&mut self) -> Packet {
        loop {
            match self.next().await {
                Ok(Packet::PingResp) => {}
                Ok(p) => return p,
                Err(e) => panic!("connection error: {e:?}"),
            }
        }
    }

    pub async fn connack(&mut self) -> rumqttc::ConnAck {
        match self.packet().await {
            Packet::ConnAck(c) => c,
            p => panic!("expected CONNACK, got {p:?}"),
        }
    }

    pub async fn suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
        match self.packet().await {
            Packet::SubAck(s) => s.return_codes,
            p => panic!("expected SUBACK, got {p:?}"),
        }
    }

    /// The next `n` PUBLISHes, skipping acknowledgements.
    pub async fn publishes(&mut self, n: usize) -> Vec<rumqttc::Publish> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.packet().await {
                Packet::Publish(p) => out.push(p),
                Packet::PubAck(_) | Packet::SubAck(_) | Packet::PubRel(_) | Packet::PubComp(_) | Packet::PubRec(_) => {}
                p => panic!("unexpected {p:?}"),
            }
        }
        out
    }

    /// The next `n` QoS 2 PUBLISHes, and the `n` PUBRELs completing them.
    pub async fn qos2_publishes(&mut self, n: usize) -> Vec<rumqttc::Publish> {
        let (mut out, mut pubrels) = (Vec::new(), 0);
        while out.len() < n || pubrels < n {
            match self.packet().await {
                Packet::Publish(p) => {
                    assert_eq!(p.qos, QoS::ExactlyOnce);
                    out.push(p)
                }
                Packet::PubRel(_) => pubrels += 1,
                p => panic!("unexpected {p:?}"),
            }
        }
        assert_eq!(pubrels, n);
        out
    }

    /// Nothing but pings for `d`.
    pub async fn quiet(&mut self, d: Duration) {
        if let Ok(Some(Ok(p))) = timeout(d, self.rx.recv()).await {
            assert!(matches!(p, Packet::PingResp), "unexpected extra packet {p:?}");
        }
    }

    /// DISCONNECT, then waits for the event loop to end.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        while let Ok(Some(Ok(_))) = timeout(WAIT, self.rx.recv()).await {}
        self.task.abort();
    }
}

pub fn body(p: &[u8]) -> Value {
    serde_json::from_slice(p).expect("payload is JSON")
}

/// The `content.body` of each published event.
pub fn bodies_of(ps: &[rumqttc::Publish]) -> Vec<String> {
    ps.iter()
        .map(|p| body(&p.payload)["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn room_for(alice: &User) -> String {
    alice
        .create_room(json!({"preset": "private_chat", "name": "Lab"}))
        .await
}

/// Reads until the server closes; panics if it does not within 3 s.
pub async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        match timeout(Duration::from_secs(3), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&b[..n]),
            Err(_) => panic!("server did not close the connection"),
        }
    }
}
