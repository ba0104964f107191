//! One MQTT connection, over any byte stream (TCP, TLS, WebSocket):
//! CONNECT and authentication, then a loop over the stream, the
//! subscription feed and the keepalive timer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use ruma::OwnedRoomId;
use serde::{Deserialize, Serialize};
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use weft_core::ErrorKind;
use weft_services::content::door_content;
use weft_services::revocation::SessionWatch;
use weft_services::{Services, Session};

use crate::Broker;
use crate::codec::{self, Connect, Frame, In, Out, ProtocolFailure, Refusal, Version, refusal};
use crate::feed::{FeedItem, Sub, run_feed, state_publishes};
use crate::topics::{FilterRoom, parse_filter, parse_publish};

/// Time a client has to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a write to a client may take before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// QoS 1 and 2 messages sent and not yet completely acknowledged (PUBACK,
/// PUBCOMP), at most (less if an MQTT 5 client asks for less with its
/// Receive Maximum).
const MAX_INFLIGHT: usize = 256;
/// How often a persistent session's position is saved while connected.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Time a new connection waits for an older one with its client ID to end.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Incoming publishes accepted and still being committed, at most; beyond
/// this the connection stops reading until the oldest is durable.
const MAX_PIPELINE: usize = 256;

/// The outcome of one incoming publish, once durable (or refused).
struct Ack {
    qos: u8,
    pkid: u16,
    result: Result<(), Refusal>,
}

type AckFuture = Pin<Box<dyn Future<Output = Ack> + Send + Sync>>;

/// The reading half of a connection's byte stream.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of a connection's byte stream.
pub type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// A persistent session, stored as account data of the user.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    subscriptions: Vec<SavedSub>,
    /// Every event up to this stream position has been delivered (and, at
    /// QoS 1, acknowledged; at QoS 2, PUBREC'd).
    position: i64,
    /// QoS 1 and 2 messages to the client not yet complete (MQTT 4.4): on
    /// reconnect, a released QoS 2 one gets its PUBREL again; an
    /// unacknowledged one is sent again with the same packet ID and the
    /// DUP flag when the replay of the stream from `position` reaches it.
    /// (Named `qos2` from when only QoS 2 was kept.)
    #[serde(rename = "qos2", default, skip_serializing_if = "Vec::is_empty")]
    flights: Vec<SavedFlight>,
    /// QoS 1 and 2 messages (stream position, topic) after `position` that
    /// were PUBACK'd / PUBREC'd already (an earlier message was still
    /// unacknowledged): the replay does not send them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    received: Vec<(i64, String)>,
    /// MQTT 5: seconds the session outlives its connection (`None`: until
    /// a clean start), counted from `saved_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiry: Option<u32>,
    /// When this was stored (ms since the epoch); the last store is at the
    /// end of the connection.
    #[serde(default)]
    saved_ms: i64,
}

impl Saved {
    fn expired(&self, now_ms: i64) -> bool {
        self.expiry
            .is_some_and(|e| self.saved_ms > 0 && now_ms.saturating_sub(self.saved_ms) > i64::from(e) * 1000)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedFlight {
    pkid: u16,
    /// 1 or 2 (sessions stored before QoS 1 was kept have only QoS 2).
    #[serde(default = "qos_two")]
    qos: u8,
    /// `None` for retained state sent on subscribe (not replayed).
    position: Option<i64>,
    topic: String,
    /// PUBREC received, PUBREL sent, PUBCOMP awaited.
    released: bool,
}

fn qos_two() -> u8 {
    2
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedSub {
    filter: String,
    qos: u8,
}

fn session_type(client_id: &str) -> String {
    format!("org.weft.mqtt.session.{client_id}")
}

/// Resolves once the server shuts down.
async fn shutting_down(stop: &mut watch::Receiver<bool>) {
    // (The guard `wait_for` returns is dropped here: it is not `Send`.)
    if stop.wait_for(|s| *s).await.is_err() {
        // The broker is gone: nobody will ever say so.
        std::future::pending::<()>().await;
    }
}

/// Reasons a connection ends.
enum End {
    /// DISCONNECT from the client.
    Graceful {
        send_will: bool,
        /// MQTT 5: a new session expiry interval.
        session_expiry: Option<u32>,
    },
    /// Socket closed, I/O error, or a protocol failure already answered.
    Dropped,
    /// The server shuts down.
    Shutdown,
    /// The credential was revoked (logout, device deleted, user
    /// deactivated): no will, it would be published with it.
    Revoked,
}

pub async fn run(broker: Arc<Broker>, mut rd: Reader, wr: WriteHalf, peer: Option<SocketAddr>) {
    let mut buf = BytesMut::with_capacity(4096);

    // CONNECT, within CONNECT_TIMEOUT.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let frame = loop {
        if buf.first().is_some_and(|b| *b != 0x10) {
            // Not a CONNECT: not an MQTT client.
            return;
        }
        match codec::frame(&mut buf) {
            Frame::Packet(p) => break p,
            Frame::Incomplete => {}
            Frame::TooLarge | Frame::Malformed => return,
        }
        match timeout(deadline - Instant::now(), rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    };
    let mut writer = Writer {
        wr: SyncWrapper::new(wr),
        version: Version::V311,
        buf: BytesMut::new(),
    };
    let level = codec::connect_level(&frame);
    let connect = match codec::decode_connect(frame) {
        Ok(c) => c,
        Err(rumqttc::mqttbytes::Error::InvalidProtocolLevel(_)) => {
            let _ = writer.send(Out::ConnAckBadVersion).await;
            return;
        }
        Err(e) => {
            tracing::debug!(?peer, "mqtt: bad CONNECT: {e}");
            if level == Some(5) {
                // MQTT 5 can say why: CONNACK 0x81 malformed packet.
                writer.version = Version::V5;
                let _ = writer
                    .send(Out::ConnAck {
                        session_present: false,
                        result: Err(Refusal::PayloadInvalid),
                        assigned_id: None,
                    })
                    .await;
            }
            return;
        }
    };
    writer.version = connect.version;

    let refuse = |r: Refusal| Out::ConnAck {
        session_present: false,
        result: Err(r),
        assigned_id: None,
    };
    // Connection attempts share the HTTP API's per-address budget.
    if let Some(p) = peer
        && let Err(e) = broker.services.limiter.check(&format!("ip:{}", p.ip()))
    {
        let _ = writer.send(refuse(refusal(&e))).await;
        return;
    }
    let mut client_id = connect.client_id.clone();
    let mut assigned_id = None;
    if client_id.is_empty() {
        if !connect.clean || connect.keep_session {
            let _ = writer.send(refuse(Refusal::ClientIdInvalid)).await;
            return;
        }
        client_id = format!("mqtt-{}", weft_services::accounts::random_string(12));
        assigned_id = Some(client_id.clone());
    }
    if client_id.len() > 200 || client_id.contains(['\0', '/']) {
        let _ = writer.send(refuse(Refusal::ClientIdInvalid)).await;
        return;
    }
    let (session, token) = match authenticate(&broker.services, &connect, &client_id, peer.map(|p| p.ip())).await {
        Ok(s) => s,
        Err(r) => {
            tracing::debug!(?peer, "mqtt: CONNECT refused: {r:?}");
            let _ = writer.send(refuse(r)).await;
            return;
        }
    };

    // One connection per (user, client ID): a new one takes over.
    let key = format!("{}\n{client_id}", session.user_id);
    let (conn_id, kill, lock) = broker.register(&key);
    let Ok(_guard) = timeout(TAKEOVER_WAIT, lock.lock_owned()).await else {
        let _ = writer.send(refuse(Refusal::Unspecified)).await;
        broker.unregister(&key, conn_id);
        return;
    };
    // On a database several processes share, the client ID is claimed
    // there too: a connection of it on another process ends, and this one
    // waits for it to have saved the session.
    let owner = broker.shared.then(|| broker.owner(conn_id));
    if let Some(owner) = &owner {
        take_over_elsewhere(&broker, &key, owner).await;
    }
    let release = || async {
        if let Some(owner) = &owner
            && let Err(e) = broker.services.release_mqtt_client(&key, owner).await
        {
            tracing::warn!("mqtt: cannot release client {client_id:?}: {}", e.message);
        }
    };

    let services = broker.services.clone();
    // The device is seen now (and again with each PUBLISH), as `GET /devices`
    // shows for every door.
    services.accounts.touch_device(&session, peer.map(|p| p.ip())).await;
    let data_type = session_type(&client_id);
    let user = session.user_id.as_str().to_owned();
    let mut saved: Option<Saved> = None;
    if connect.clean {
        // Forget an earlier persistent session of this client ID.
        if let Ok(stored) = services.account_data(&session, &user, None, &data_type).await
            && stored != serde_json::json!({})
        {
            let _ = put_saved(&services, &session, &data_type, None).await;
        }
    } else if let Ok(stored) = services.account_data(&session, &user, None, &data_type).await {
        saved = serde_json::from_value::<Saved>(stored).ok().filter(|s| s.position > 0);
        if saved.as_ref().is_some_and(|s| s.expired(weft_core::now_ms() as i64)) {
            // Its session expiry interval has passed since it ended.
            saved = None;
            let _ = put_saved(&services, &session, &data_type, None).await;
        }
    }
    let session_present = saved.is_some();
    let position = saved
        .as_ref()
        .map(|s| s.position)
        .unwrap_or_else(|| services.stream_position());
    let (saved_subs, saved_flights, saved_received) = saved
        .map(|s| (s.subscriptions, s.flights, s.received))
        .unwrap_or_default();
    let mut subs = Vec::new();
    for s in saved_subs {
        // Re-checked: the user may have left a room since.
        if let Ok(sub) = make_sub(&services, &session, &s.filter, s.qos, 0).await {
            subs.push(sub);
        }
    }
    if writer
        .send(Out::ConnAck {
            session_present,
            result: Ok(()),
            assigned_id,
        })
        .await
        .is_err()
    {
        release().await;
        broker.unregister(&key, conn_id);
        return;
    }

    let (subs_tx, subs_rx) = watch::channel(Arc::new(subs));
    let (feed_tx, feed_rx) = mpsc::channel(64);
    let feed = tokio::spawn(run_feed(services.clone(), session.clone(), subs_rx, position, feed_tx));

    let mut conn = Conn {
        services: services.clone(),
        watch: services.watch_session(&session, &token),
        session,
        ip: peer.map(|p| p.ip()),
        persistent: connect.keep_session,
        expiry: connect.session_expiry,
        stored: false,
        data_type,
        writer,
        subs: subs_tx,
        inflight: HashMap::new(),
        pending: BTreeMap::new(),
        delivered: position,
        saved_position: position,
        next_pkid: 0,
        qos2: HashSet::new(),
        acks: FuturesOrdered::new(),
        max_inflight: connect
            .receive_max
            .map_or(MAX_INFLIGHT, |m| usize::from(m).clamp(1, MAX_INFLIGHT)),
        owed: HashMap::new(),
        received: BTreeSet::new(),
    };
    conn.resume_flights(saved_flights, saved_received);
    let mut stop = broker.shutdown.subscribe();
    let mut end = conn
        .serve(&mut rd, buf, feed_rx, connect.keep_alive, &kill, &mut stop)
        .await;
    feed.abort();
    if let End::Graceful {
        session_expiry: Some(e),
        ..
    } = end
    {
        if e > 0 && !connect.keep_session {
            // MQTT 5 3.14.2.2.2: no expiry at CONNECT, none at DISCONNECT.
            let _ = conn
                .writer
                .send(Out::DisconnectProtocol(ProtocolFailure::ProtocolError))
                .await;
            end = End::Dropped;
        } else {
            conn.persistent = e > 0;
            conn.expiry = (e != u32::MAX).then_some(e);
        }
    }
    if conn.persistent {
        conn.save().await;
    } else if session_present || conn.stored {
        // MQTT 5 without (or with a DISCONNECT ending its) expiry interval:
        // the session ends here.
        let _ = put_saved(&services, &conn.session, &conn.data_type, None).await;
    }
    let send_will = match end {
        End::Graceful { send_will, .. } => send_will,
        End::Dropped => true,
        // The client is not gone; the server is.
        End::Shutdown => false,
        End::Revoked => false,
    };
    if send_will
        && let Some(w) = &connect.will
        && let Err(r) = conn.publish_event(&w.topic, &w.payload).await
    {
        tracing::debug!("mqtt: will of {client_id} not published: {r:?}");
    }
    let _ = conn.writer.wr.get_mut().shutdown().await;
    release().await;
    broker.unregister(&key, conn_id);
    // The session is stored: a reconnect of this client ID need not wait.
    drop(_guard);
    linger(&mut rd).await;
}

/// Claims the client `key` for `owner` in the database; if a connection of
/// another process had it, waits (at most [`TAKEOVER_WAIT`]) for that one
/// to end and save its session (its process ends it on seeing the claim).
/// A process that died leaves its claim, but the store answers no owner
/// for it (none of that process's connections to the database is left),
/// so the new connection does not wait.
async fn take_over_elsewhere(broker: &Broker, key: &str, owner: &str) {
    let services = &broker.services;
    let mut rx = services.subscribe_stream();
    let mut seen = *rx.borrow_and_update();
    let before = match services.claim_mqtt_client(key, owner).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("mqtt: cannot claim client {key:?}: {}", e.message);
            return;
        }
    };
    let Some(before) = before.filter(|b| !broker.is_ours(b)) else {
        return;
    };
    let released = format!("-{before}");
    let wait = async {
        loop {
            let upto = *rx.borrow_and_update();
            let events = services.mqtt_client_events(seen, upto).unwrap_or_default();
            if events.iter().any(|(k, e)| k == key && *e == released) {
                return;
            }
            seen = upto;
            if rx.changed().await.is_err() {
                return;
            }
        }
    };
    if timeout(TAKEOVER_WAIT, wait).await.is_err() {
        tracing::debug!("mqtt: client {key:?}: its connection elsewhere did not end in {TAKEOVER_WAIT:?}");
    }
}

/// After the server half-closed a connection, reads (and drops) what the
/// client still sends, until it closes too, for a second at most. Closing a
/// socket with unread input makes the kernel reset the connection, and a
/// reset can discard the last acknowledgements or DISCONNECT on their way
/// to the client (a refused MQTT 3.1.1 publish after pipelined ones).
async fn linger(rd: &mut Reader) {
    let mut sink = vec![0u8; 16 * 1024];
    let mut left: usize = 1 << 20;
    let _ = timeout(Duration::from_secs(1), async {
        while left > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Stores (or, with `None`, clears) a persistent session, as the user's
/// account data.
async fn put_saved(services: &Services, session: &Session, data_type: &str, saved: Option<&Saved>) -> Result<(), ()> {
    let value = match saved {
        Some(s) => serde_json::to_value(s).map_err(|_| ())?,
        None => serde_json::json!({}),
    };
    services
        .put_account_data(session, session.user_id.as_str(), None, data_type, value)
        .await
        .map_err(|_| ())
}

/// Username is a Matrix user ID or localpart; the password is an access
/// token of that user, the token of an application service that may act
/// as that user (docs/appservices.md), or the account password (then a
/// device with the
/// client ID as device ID is created or reused). Returns the session and
/// its access token (which revocation is checked by).
async fn authenticate(
    services: &Services,
    c: &Connect,
    client_id: &str,
    ip: Option<std::net::IpAddr>,
) -> Result<(Session, String), Refusal> {
    let (Some(user), Some(password)) = (&c.username, &c.password) else {
        return Err(Refusal::BadCredentials);
    };
    let wanted = services
        .accounts
        .user_id_for(user)
        .map_err(|_| Refusal::BadCredentials)?;
    // An application service's token (as the password) acts as the user
    // named, its sender or one of its users, as `?user_id=` over HTTP.
    if let Ok(session) = services.authenticate(password, Some(wanted.as_str()), None, ip).await {
        return if session.user_id == wanted {
            Ok((session, password.clone()))
        } else {
            Err(Refusal::BadCredentials)
        };
    }
    // A password CONNECT is a sign-in, limited per address as `/login` is.
    services.charge_sign_in(ip).await.map_err(|e| refusal(&e))?;
    match services.accounts.check_password(user, password, ip).await {
        Ok(user_id) => {
            let login = services
                .accounts
                .new_device(&user_id, Some(client_id), Some("MQTT"))
                .await
                .map_err(|e| refusal(&e))?;
            Ok((
                Session {
                    user_id,
                    device_id: login.device_id,
                    appservice: None,
                },
                login.access_token,
            ))
        }
        Err(e) if e.kind == ErrorKind::Forbidden => Err(Refusal::BadCredentials),
        Err(e) => Err(refusal(&e)),
    }
}

/// Checks a subscription filter against the rooms it names.
async fn make_sub(services: &Services, session: &Session, filter: &str, qos: u8, from: i64) -> Result<Sub, Refusal> {
    let room = parse_filter(filter).ok_or(Refusal::TopicInvalid)?;
    let room_id: Option<OwnedRoomId> = match &room {
        FilterRoom::All => None,
        FilterRoom::Id(id) => Some(
            services
                .read_view(&session.user_id, id)
                .await
                .map_err(|e| refusal(&e))?
                .0,
        ),
        FilterRoom::Alias(a) => {
            let id = services
                .resolve_room(&format!("#{a}"))
                .await
                .map_err(|_| Refusal::NotAuthorized)?;
            Some(
                services
                    .read_view(&session.user_id, id.as_str())
                    .await
                    .map_err(|e| refusal(&e))?
                    .0,
            )
        }
    };
    Ok(Sub {
        filter: filter.to_owned(),
        qos: qos.min(2),
        room,
        room_id,
        from,
    })
}

struct Writer {
    /// Only ever used through `&mut`; the wrapper makes `Conn` `Sync`
    /// (its futures borrow it across awaits) for streams that are not.
    wr: SyncWrapper<WriteHalf>,
    version: Version,
    buf: BytesMut,
}

impl Writer {
    fn queue(&mut self, out: Out) {
        codec::encode(self.version, out, &mut self.buf);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split();
        // TLS and WebSocket buffer inside the stream: flush pushes it out.
        let wr = self.wr.get_mut();
        let write = async {
            wr.write_all(&data).await?;
            wr.flush().await
        };
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    async fn send(&mut self, out: Out) -> std::io::Result<()> {
        self.queue(out);
        self.flush().await
    }
}

struct Conn {
    services: Arc<Services>,
    /// Whether the credential still holds (checked before accepting or
    /// delivering anything).
    watch: Arc<SessionWatch>,
    session: Session,
    /// The client's address, recorded as the device's last-seen one.
    ip: Option<std::net::IpAddr>,
    persistent: bool,
    /// See [`Saved::expiry`].
    expiry: Option<u32>,
    /// Whether this connection has stored its session.
    stored: bool,
    data_type: String,
    writer: Writer,
    subs: watch::Sender<Arc<Vec<Sub>>>,
    /// QoS 1 and 2 messages sent and not complete, by packet ID.
    inflight: HashMap<u16, Flight>,
    /// Unacknowledged (no PUBACK / PUBREC yet) messages per stream position.
    pending: BTreeMap<i64, usize>,
    /// Stream position up to which the feed has been handed to the client.
    delivered: i64,
    saved_position: i64,
    next_pkid: u16,
    /// Incoming QoS 2 messages already turned into events, awaiting PUBREL.
    qos2: HashSet<u16>,
    /// Incoming publishes being committed, in the order they arrived: their
    /// PUBACKs (PUBRECs) go out in that order once each is durable.
    acks: FuturesOrdered<AckFuture>,
    /// QoS 1 messages this client takes unacknowledged at once.
    max_inflight: usize,
    /// From a resumed session: QoS 1 and 2 messages (stream position,
    /// topic) sent before and never PUBACK'd / PUBREC'd, to send again with
    /// the same packet ID and DUP when the replay of the stream meets them.
    owed: HashMap<(i64, String), u16>,
    /// QoS 1 and 2 messages PUBACK'd / PUBREC'd at a position the safe
    /// position has not reached (so a replay would meet them again): not
    /// to be sent again.
    received: BTreeSet<(i64, String)>,
}

/// At most this many entries in `Conn::received` (only a client leaving
/// an earlier message unacknowledged for long makes it grow).
const MAX_RECEIVED: usize = 4096;

/// A message to the client awaiting its acknowledgement.
struct Flight {
    /// Stream position of its event (`None`: retained state on subscribe).
    position: Option<i64>,
    topic: String,
    qos: u8,
    /// QoS 2: PUBREC came and PUBREL went; PUBCOMP awaited.
    released: bool,
}

impl Conn {
    /// Everything up to this position is delivered and acknowledged.
    fn safe_position(&self) -> i64 {
        match self.pending.keys().next() {
            Some(p) => p - 1,
            None => self.delivered,
        }
    }

    async fn save(&mut self) {
        let subs = self.subs.borrow().clone();
        let position = self.safe_position();
        self.prune_received(position);
        let saved = Saved {
            subscriptions: subs
                .iter()
                .map(|s| SavedSub {
                    filter: s.filter.clone(),
                    qos: s.qos,
                })
                .collect(),
            position,
            flights: self
                .inflight
                .iter()
                .map(|(pkid, f)| SavedFlight {
                    pkid: *pkid,
                    qos: f.qos,
                    position: f.position,
                    topic: f.topic.clone(),
                    released: f.released,
                })
                // Not met by the replay yet (the session ended first): still owed.
                .chain(self.owed.iter().map(|((position, topic), pkid)| SavedFlight {
                    pkid: *pkid,
                    // (Re-sent at the subscription's QoS, whatever this says.)
                    qos: 1,
                    position: Some(*position),
                    topic: topic.clone(),
                    released: false,
                }))
                .collect(),
            received: self.received.iter().cloned().collect(),
            expiry: self.expiry,
            saved_ms: weft_core::now_ms() as i64,
        };
        if put_saved(&self.services, &self.session, &self.data_type, Some(&saved))
            .await
            .is_ok()
        {
            self.saved_position = saved.position;
            self.stored = true;
        }
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let id = self.next_pkid;
            // Packet IDs owed to a resumed session's messages stay reserved.
            if !self.inflight.contains_key(&id) && !self.owed.values().any(|p| *p == id) {
                return id;
            }
        }
    }

    /// Takes over a resumed session's unfinished QoS 1 and 2 messages:
    /// PUBRELs go out again at once (MQTT 4.4); the others wait for the
    /// replay, to go out with their packet IDs and DUP.
    fn resume_flights(&mut self, flights: Vec<SavedFlight>, received: Vec<(i64, String)>) {
        self.received = received.into_iter().filter(|(p, _)| *p > self.delivered).collect();
        for f in flights {
            if f.released && f.qos == 2 {
                self.writer.queue(Out::PubRel(f.pkid));
                if let Some(p) = f.position
                    && p > self.delivered
                {
                    self.received.insert((p, f.topic.clone()));
                }
                self.inflight.insert(
                    f.pkid,
                    Flight {
                        position: f.position,
                        topic: f.topic,
                        qos: 2,
                        released: true,
                    },
                );
            } else if let Some(p) = f.position
                && p > self.delivered
            {
                self.owed.insert((p, f.topic), f.pkid);
            }
        }
    }

    /// Forgets received QoS 2 messages at or below `safe`: a replay starts after it.
    fn prune_received(&mut self, safe: i64) {
        if self.received.first().is_some_and(|(p, _)| *p <= safe) {
            self.received = self.received.split_off(&(safe + 1, String::new()));
        }
        while self.received.len() > MAX_RECEIVED {
            self.received.pop_first();
        }
    }

    /// Remembers a message acknowledged out of order (an earlier one is
    /// still unacknowledged), so a replay from the safe position skips it.
    fn note_received(&mut self, position: Option<i64>, topic: String) {
        if let Some(p) = position
            && p > self.safe_position()
        {
            self.received.insert((p, topic));
            if self.received.len() > MAX_RECEIVED {
                let safe = self.safe_position();
                self.prune_received(safe);
            }
        }
    }

    /// A PUBACK or PUBREC: the message's event counts as delivered.
    fn acknowledged(&mut self, position: Option<i64>) {
        if let Some(position) = position
            && let Some(n) = self.pending.get_mut(&position)
        {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&position);
            }
        }
    }

    async fn serve(
        &mut self,
        rd: &mut Reader,
        mut buf: BytesMut,
        mut feed: mpsc::Receiver<FeedItem>,
        keep_alive: u16,
        kill: &Notify,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        // Silence for 1.5 × keepalive closes the connection.
        let grace = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let far = Duration::from_secs(86400 * 365);
        let mut last_rx = Instant::now();
        let watch = self.watch.clone();
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Handle every whole packet in the buffer, while the pipeline
            // of publishes being committed has room.
            while self.acks.len() < MAX_PIPELINE {
                match codec::frame(&mut buf) {
                    Frame::Incomplete => break,
                    Frame::TooLarge => return self.fail(ProtocolFailure::TooLarge).await,
                    Frame::Malformed => return self.fail(ProtocolFailure::Malformed).await,
                    Frame::Packet(p) => {
                        let packet = match codec::decode(self.writer.version, p) {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::debug!("mqtt: malformed packet: {e}");
                                return self.fail(ProtocolFailure::Malformed).await;
                            }
                        };
                        if let Some(end) = self.handle(packet).await {
                            let _ = self.writer.flush().await;
                            return end;
                        }
                    }
                }
            }
            if self.writer.flush().await.is_err() {
                return End::Dropped;
            }
            // While the pipeline is full the client is not read, so its
            // silence says nothing about its liveness.
            let can_read = self.acks.len() < MAX_PIPELINE;
            let keepalive_deadline = if can_read {
                last_rx + grace.unwrap_or(far)
            } else {
                Instant::now() + far
            };
            let can_take = self.inflight.len() < self.max_inflight;
            tokio::select! {
                n = rd.read_buf(&mut buf), if can_read => match n {
                    Ok(n) if n > 0 => last_rx = Instant::now(),
                    _ => return End::Dropped,
                },
                Some(ack) = self.acks.next(), if !self.acks.is_empty() => {
                    if let Some(end) = self.acknowledge(ack).await {
                        return end;
                    }
                    // Publishes committed together are acknowledged in one write.
                    while let Some(Some(ack)) = self.acks.next().now_or_never() {
                        if let Some(end) = self.acknowledge(ack).await {
                            return end;
                        }
                    }
                    if !can_read {
                        last_rx = Instant::now();
                    }
                }
                item = feed.recv(), if can_take => match item {
                    Some(item) => {
                        // Nothing more reaches a revoked credential.
                        if self.watch.check().await.is_err() {
                            return self.revoke().await;
                        }
                        self.deliver(item);
                        // What else the feed has ready goes out in the same write.
                        while self.inflight.len() < self.max_inflight
                            && let Ok(item) = feed.try_recv()
                        {
                            self.deliver(item);
                        }
                    }
                    None => return End::Dropped,
                },
                _ = sleep_until(keepalive_deadline) => return self.fail(ProtocolFailure::KeepAliveTimeout).await,
                _ = kill.notified() => return self.fail(ProtocolFailure::TakenOver).await,
                _ = watch.revoked() => return self.revoke().await,
                _ = shutting_down(stop) => {
                    let _ = self.writer.send(Out::DisconnectProtocol(ProtocolFailure::ServerShuttingDown)).await;
                    return End::Shutdown;
                }
                _ = save_tick.tick() => {
                    if self.persistent && self.safe_position() != self.saved_position {
                        self.save().await;
                    }
                }
            }
        }
    }

    /// Closes for a protocol reason (MQTT 5 first says why).
    async fn fail(&mut self, why: ProtocolFailure) -> End {
        let _ = self.writer.send(Out::DisconnectProtocol(why)).await;
        End::Dropped
    }

    /// Closes because the credential was revoked (MQTT 5: DISCONNECT
    /// `0x87` not authorized; 3.1.1 has no DISCONNECT from the server).
    async fn revoke(&mut self) -> End {
        tracing::info!(
            "mqtt: the credential of {} (device {}) was revoked; closing",
            self.session.user_id,
            self.session.device_id
        );
        let _ = self.writer.send(Out::Disconnect(Refusal::NotAuthorized)).await;
        End::Revoked
    }

    fn deliver(&mut self, item: FeedItem) {
        match item {
            FeedItem::Event { position, publishes } => {
                for (topic, qos, payload) in publishes {
                    if qos > 0 && !self.received.is_empty() && self.received.contains(&(position, topic.clone())) {
                        // PUBACK'd / PUBREC'd before the reconnect: delivered already.
                        continue;
                    }
                    match self.owed.remove(&(position, topic.clone())) {
                        Some(pkid) if qos > 0 => {
                            self.send_publish_as(topic, qos, payload, false, Some(position), pkid, true)
                        }
                        _ => self.send_publish(topic, qos, payload, false, Some(position)),
                    }
                }
                self.delivered = self.delivered.max(position);
            }
            FeedItem::Advance(next) => self.delivered = self.delivered.max(next),
        }
        if !self.owed.is_empty() {
            // Owed messages the replay has passed (a subscription or room gone).
            let delivered = self.delivered;
            self.owed.retain(|(p, _), _| *p > delivered);
        }
    }

    fn send_publish(&mut self, topic: String, qos: u8, payload: Bytes, retain: bool, position: Option<i64>) {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        self.send_publish_as(topic, qos, payload, retain, position, pkid, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn send_publish_as(
        &mut self,
        topic: String,
        qos: u8,
        payload: Bytes,
        retain: bool,
        position: Option<i64>,
        pkid: u16,
        dup: bool,
    ) {
        if qos > 0 {
            self.inflight.insert(
                pkid,
                Flight {
                    position,
                    topic: topic.clone(),
                    qos,
                    released: false,
                },
            );
            if let Some(p) = position {
                *self.pending.entry(p).or_default() += 1;
            }
        }
        self.writer.queue(Out::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
        });
    }

    /// Handles one packet; `Some` ends the connection.
    async fn handle(&mut self, packet: In) -> Option<End> {
        if matches!(packet, In::Publish { .. } | In::Subscribe { .. }) && self.watch.check().await.is_err() {
            return Some(self.revoke().await);
        }
        match packet {
            In::Publish {
                topic,
                qos,
                pkid,
                payload,
            } => {
                if qos == 2 && self.qos2.contains(&pkid) {
                    // A resend of a message already turned into an event.
                    self.writer.queue(Out::PubRec(pkid));
                    return None;
                }
                match self.submit_publish(&topic, &payload).await {
                    Ok(submitted) => {
                        if qos == 2 {
                            self.qos2.insert(pkid);
                        }
                        // (Only ever polled through `&mut`: the wrapper
                        // makes the store's futures inside it `Sync`.)
                        self.acks.push_back(Box::pin(sync_wrapper::SyncFuture::new(async move {
                            let result = submitted.durable().await.map(|_| ()).map_err(|e| refusal(&e));
                            Ack { qos, pkid, result }
                        })));
                    }
                    // MQTT 5 refuses a QoS 1 publish in its PUBACK, in turn.
                    Err(r) if qos == 1 && self.writer.version == Version::V5 => {
                        self.acks.push_back(Box::pin(std::future::ready(Ack {
                            qos,
                            pkid,
                            result: Err(r),
                        })));
                    }
                    Err(r) => {
                        // No negative acknowledgement here (3.1.1, or QoS
                        // 0/2): the connection is closed, never silently,
                        // after acknowledging what was accepted before.
                        tracing::debug!("mqtt: publish to {topic} refused: {r:?}");
                        return Some(self.refuse_publish(r).await);
                    }
                }
            }
            In::PubAck(pkid) => {
                if self.inflight.get(&pkid).is_some_and(|f| f.qos == 1)
                    && let Some(f) = self.inflight.remove(&pkid)
                {
                    self.acknowledged(f.position);
                    self.note_received(f.position, f.topic);
                }
            }
            In::PubRel(pkid) => {
                self.qos2.remove(&pkid);
                self.writer.queue(Out::PubComp(pkid));
            }
            In::PubRec(pkid) => {
                // Delivered now (MQTT 4.3.3, method B): the event counts
                // as acknowledged; the PUBREL is kept until PUBCOMP.
                let first = match self.inflight.get_mut(&pkid) {
                    Some(f) if f.qos == 2 && !f.released => {
                        f.released = true;
                        Some((f.position, f.topic.clone()))
                    }
                    _ => None,
                };
                if let Some((position, topic)) = first {
                    self.acknowledged(position);
                    self.note_received(position, topic);
                }
                // Also for a repeated or unknown PUBREC, so the client can finish.
                self.writer.queue(Out::PubRel(pkid));
            }
            In::PubRecFailed(pkid) => {
                // The client refused it (MQTT 5): no PUBREL, the flow ends.
                if self.inflight.get(&pkid).is_some_and(|f| f.qos == 2 && !f.released)
                    && let Some(f) = self.inflight.remove(&pkid)
                {
                    self.acknowledged(f.position);
                }
            }
            In::PubComp(pkid) => {
                if self.inflight.get(&pkid).is_some_and(|f| f.released) {
                    self.inflight.remove(&pkid);
                }
            }
            In::Subscribe { pkid, filters } => self.subscribe(pkid, filters).await,
            In::Unsubscribe { pkid, filters } => {
                let count = filters.len();
                self.subs.send_modify(|subs| {
                    let mut v: Vec<Sub> = subs.as_ref().clone();
                    v.retain(|s| !filters.contains(&s.filter));
                    *subs = Arc::new(v);
                });
                self.writer.queue(Out::UnsubAck { pkid, count });
                if self.persistent {
                    self.save().await;
                }
            }
            In::PingReq => self.writer.queue(Out::PingResp),
            In::Disconnect {
                send_will,
                session_expiry,
            } => {
                return Some(End::Graceful {
                    send_will,
                    session_expiry,
                });
            }
            In::Unexpected => return Some(self.fail(ProtocolFailure::ProtocolError).await),
        }
        None
    }

    async fn subscribe(&mut self, pkid: u16, filters: Vec<(String, u8)>) {
        let mut results = Vec::with_capacity(filters.len());
        let mut added = Vec::new();
        for (filter, qos) in filters {
            let from = self.services.stream_position();
            match make_sub(&self.services, &self.session, &filter, qos, from).await {
                Ok(sub) => {
                    results.push(Ok(sub.qos));
                    added.push(sub);
                }
                Err(r) => results.push(Err(r)),
            }
        }
        self.writer.queue(Out::SubAck { pkid, results });
        // Current state first, as retained messages.
        for sub in &added {
            for (topic, payload) in state_publishes(&self.services, &self.session, sub).await {
                self.send_publish(topic, sub.qos, payload, true, None);
            }
        }
        if added.is_empty() {
            return;
        }
        self.subs.send_modify(|subs| {
            let mut v: Vec<Sub> = subs.as_ref().clone();
            v.retain(|s| !added.iter().any(|a| a.filter == s.filter));
            v.extend(added);
            *subs = Arc::new(v);
        });
        if self.persistent {
            self.save().await;
        }
    }

    /// Sends the acknowledgement of an incoming publish that is now durable
    /// (or failed to be); `Some` ends the connection.
    async fn acknowledge(&mut self, ack: Ack) -> Option<End> {
        match self.ack_packet(ack) {
            Ok(Some(out)) => self.writer.queue(out),
            Ok(None) => {}
            Err((pkid, r)) => {
                tracing::warn!("mqtt: a publish of {} was not stored: {r:?}", self.session.user_id);
                self.qos2.remove(&pkid);
                return Some(self.refuse_publish(r).await);
            }
        }
        None
    }

    /// What answers a publish's outcome: the packet to send (none for QoS
    /// 0), or the refusal that must close the connection (3.1.1 has no
    /// negative PUBACK; a failed QoS 0 or 2 publish has none either).
    fn ack_packet(&self, ack: Ack) -> Result<Option<Out>, (u16, Refusal)> {
        let pkid = ack.pkid;
        match (ack.qos, ack.result) {
            (0, Ok(())) => Ok(None),
            (1, result @ Ok(())) => Ok(Some(Out::PubAck { pkid, result })),
            (1, result @ Err(_)) if self.writer.version == Version::V5 => Ok(Some(Out::PubAck { pkid, result })),
            (2, Ok(())) => Ok(Some(Out::PubRec(pkid))),
            (_, Err(r)) => Err((pkid, r)),
            (_, Ok(())) => Ok(None),
        }
    }

    /// Acknowledges the publishes still in the pipeline (up to the next
    /// that failed), then closes the connection with `why`.
    async fn refuse_publish(&mut self, why: Refusal) -> End {
        while let Some(ack) = self.acks.next().await {
            match self.ack_packet(ack) {
                Ok(Some(out)) => self.writer.queue(out),
                Ok(None) => {}
                Err(_) => break,
            }
        }
        let _ = self.writer.send(Out::Disconnect(why)).await;
        End::Dropped
    }

    /// A PUBLISH (or will) turned into an event, once durable.
    async fn publish_event(&self, topic: &str, payload: &[u8]) -> Result<(), Refusal> {
        self.submit_publish(topic, payload)
            .await?
            .durable()
            .await
            .map(|_| ())
            .map_err(|e| refusal(&e))
    }

    /// A PUBLISH checked, built into an event and queued for the store
    /// through the shared pipeline.
    async fn submit_publish(&self, topic: &str, payload: &[u8]) -> Result<weft_services::Submitted, Refusal> {
        let target = parse_publish(topic).ok_or(Refusal::TopicInvalid)?;
        self.services.accounts.touch_device(&self.session, self.ip).await;
        // The same per-user budget as the HTTP API. Over it, the client is
        // slowed down first (MQTT's flow control is not reading), and only
        // refused if it stays over.
        if let Err(e) = self.services.limiter.check(self.session.user_id.as_str()) {
            if let ErrorKind::LimitExceeded { retry_after_ms } = e.kind {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.min(5000))).await;
            }
            self.services
                .limiter
                .check(self.session.user_id.as_str())
                .map_err(|e| refusal(&e))?;
        }
        let room_id = self
            .services
            .resolve_room(&target.room)
            .await
            .map_err(|e| refusal(&e))?;
        if let Some(name) = &target.file {
            return self
                .services
                .share_file(&self.session, &room_id, name, None, payload)
                .await
                .map_err(|e| refusal(&e));
        }
        let content = door_content(payload).map_err(|e| refusal(&e))?;
        let content = serde_json::to_value(content).map_err(|_| Refusal::PayloadInvalid)?;
        self.services
            .submit_event(
                &self.session,
                &room_id,
                &target.event_type,
                target.state_key.as_deref(),
                content,
            )
            .await
            .map_err(|e| refusal(&e))
    }
}
