//! CoAP over DTLS (`coaps://`): per-device pre-shared keys, or a
//! certificate for clients without one.
//!
//! One UDP socket serves many peers: datagrams are demultiplexed by source
//! address to one DTLS session each (the sans-IO `dimpl` engine), and the
//! plaintext goes to the same CoAP engine ([`Door`]) as on the plain door.
//! Each session's ClientHello picks how it is authenticated (`dimpl`'s
//! auto-sensing server): a client offering the PSK suite
//! (`TLS_PSK_WITH_AES_128_CCM_8`) gets a PSK session, whose identity names
//! a device (`weft user psk`), so its requests need no access token; any
//! other client gets the server certificate (ECDHE-ECDSA suites, DTLS 1.2
//! or 1.3) and authenticates its requests with an access token (`?a=`,
//! option 256) exactly as on plain CoAP.
//!
//! Bounds: at most `[coap] dtls_max_sessions` sessions (handshakes
//! included), 32 queued datagrams per session, a 30 s handshake deadline,
//! `dtls_idle_timeout_secs` of silence ends a session. Only a datagram that
//! looks like a ClientHello opens a session; anything a peer sends can end
//! at most its own session, never the listener or other peers.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, DtlsCertificate, Output, PskResolver};
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use weft_services::Services;
use weft_services::tls::{CertFiles, cert_files, certificate_hosts, generated_pair, read_pem};

use crate::{Door, Transport};

/// Datagrams queued for one session before more are dropped.
const PEER_QUEUE: usize = 32;
/// A handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A full listener replaces its longest-idle session only if it has been
/// idle at least this long.
const EVICT_IDLE: Duration = Duration::from_secs(60);
/// Largest DTLS datagram we produce.
const MTU: usize = 1400;
/// Longest PSK identity looked up.
const MAX_IDENTITY: usize = 128;

thread_local! {
    /// Set while a handshake step runs on a blocking thread, where the PSK
    /// resolver may wait for the database.
    static MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// Looks up a session's PSK identity in the store (via the services) and
/// remembers which identity it accepted.
struct PeerKeys {
    services: Arc<Services>,
    runtime: tokio::runtime::Handle,
    accepted: Mutex<Option<String>>,
}

/// `dimpl` wants an unwind-safe resolver; the parts are only read, and a
/// panic in a lookup ends that one session.
struct Resolver(AssertUnwindSafe<Arc<PeerKeys>>);

impl PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        if !MAY_BLOCK.with(Cell::get) || identity.len() > MAX_IDENTITY {
            return None;
        }
        let identity = std::str::from_utf8(identity).ok()?;
        let keys = &self.0;
        match keys.runtime.block_on(keys.services.accounts.psk_owner(identity)) {
            Ok(Some((_, key))) => {
                *keys.accepted.lock() = Some(identity.to_owned());
                Some(key)
            }
            Ok(None) => {
                tracing::debug!("coap dtls: unknown PSK identity {identity:?}");
                None
            }
            Err(e) => {
                tracing::warn!("coap dtls: PSK lookup failed: {e}");
                None
            }
        }
    }
}

/// One DTLS session (or handshake) with one peer address.
struct Peer {
    generation: u64,
    dtls: Mutex<Dtls>,
    keys: Arc<PeerKeys>,
    connected: AtomicBool,
    /// Datagrams for the session's task.
    inbox: mpsc::Sender<Vec<u8>>,
    last_seen: Mutex<Instant>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// What one step of a session's engine produced.
#[derive(Default)]
struct Step {
    packets: Vec<Vec<u8>>,
    plaintext: Vec<Vec<u8>>,
    connected: bool,
    closed: bool,
    timer: Option<Instant>,
}

impl Peer {
    /// Runs `f` on the engine and collects its output. `Err` means the
    /// session is over (a DTLS error, or a panic inside the engine).
    fn step(&self, f: impl FnOnce(&mut Dtls) -> Result<(), dimpl::Error>) -> Result<Step, String> {
        let mut dtls = self.dtls.lock();
        let run = catch_unwind(AssertUnwindSafe(|| -> Result<Step, dimpl::Error> {
            dtls.handle_timeout(Instant::now())?;
            f(&mut dtls)?;
            Ok(drain(&mut dtls))
        }));
        match run {
            Ok(Ok(step)) => Ok(step),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("DTLS engine panicked".into()),
        }
    }
}

fn drain(dtls: &mut Dtls) -> Step {
    let mut step = Step::default();
    let mut buf = vec![0u8; 2048];
    loop {
        let len = buf.len();
        match dtls.poll_output(&mut buf) {
            Output::Packet(p) => step.packets.push(p.to_vec()),
            Output::BufferTooSmall { needed } if needed <= 65_536 && needed > len => buf.resize(needed, 0),
            Output::BufferTooSmall { .. } => {
                step.closed = true;
                break;
            }
            Output::Timeout(t) => {
                step.timer = Some(t);
                break;
            }
            Output::Connected => step.connected = true,
            Output::ApplicationData(d) => step.plaintext.push(d.to_vec()),
            Output::CloseNotify => step.closed = true,
            _ => {}
        }
    }
    step
}

/// Whether a datagram could open a DTLS session: one handshake record of
/// epoch 0 carrying a ClientHello.
fn is_client_hello(d: &[u8]) -> bool {
    d.len() >= 25 && d[0] == 22 && d[1] == 0xfe && d[3] == 0 && d[4] == 0 && d[13] == 1
}

/// The certificate DTLS clients without a pre-shared key are served.
#[derive(Clone)]
pub struct DtlsCert {
    certificate: DtlsCertificate,
    /// The PEM file it came from.
    pub cert_path: PathBuf,
    /// Whether it is the generated self-signed one.
    pub self_signed: bool,
    /// Why the generated pair serves instead of MQTT's, when it does.
    pub fallback: Option<String>,
}

impl std::fmt::Debug for DtlsCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsCert")
            .field("cert_path", &self.cert_path)
            .field("self_signed", &self.self_signed)
            .finish_non_exhaustive()
    }
}

/// Finds the DTLS certificate: `[coap] dtls_cert`/`dtls_key` if set;
/// else MQTT's `tls_cert`/`tls_key` if set and usable for DTLS (an ECDSA
/// key); else the generated self-signed pair shared with MQTT over TLS
/// (created first if missing). Relative paths are in `data_dir`.
pub fn load_certificate(data_dir: &Path, config: &weft_core::Config) -> Result<DtlsCert, String> {
    let c = &config.coap;
    let hosts = certificate_hosts(config);
    if c.dtls_cert.is_some() || c.dtls_key.is_some() {
        if c.dtls_cert.is_none() || c.dtls_key.is_none() {
            return Err("[coap] needs both dtls_cert and dtls_key, or neither".into());
        }
        let files = cert_files(data_dir, c.dtls_cert.as_deref(), c.dtls_key.as_deref(), &hosts)?;
        return dtls_cert(&files, None);
    }
    let m = &config.mqtt;
    let mut fallback = None;
    if let (Some(cert), Some(key)) = (&m.tls_cert, &m.tls_key) {
        let files = cert_files(data_dir, Some(cert), Some(key), &hosts)?;
        match dtls_cert(&files, None) {
            Ok(found) => return Ok(found),
            Err(e) => fallback = Some(format!("MQTT's certificate does not serve DTLS ({e})")),
        }
    }
    dtls_cert(&generated_pair(data_dir, &hosts)?, fallback)
}

/// Reads a PEM pair and checks the DTLS engine can sign with its key.
fn dtls_cert(files: &CertFiles, fallback: Option<String>) -> Result<DtlsCert, String> {
    let (certs, key) = read_pem(&files.cert_path, &files.key_path)?;
    let private_key = key.secret_der().to_vec();
    // The engine panics on a key it cannot load; find out now, once.
    let loads = catch_unwind(|| {
        Config::default()
            .crypto_provider()
            .key_provider
            .load_private_key(&private_key)
            .is_ok()
    });
    if !matches!(loads, Ok(true)) {
        return Err(format!(
            "the private key {} is not an ECDSA P-256 or P-384 key, which DTLS needs",
            files.key_path.display()
        ));
    }
    Ok(DtlsCert {
        // The engine sends one certificate: the leaf.
        certificate: DtlsCertificate {
            certificate: certs[0].to_vec(),
            private_key,
        },
        cert_path: files.cert_path.clone(),
        self_signed: files.self_signed,
        fallback,
    })
}

/// The DTLS side of the door: the socket and its sessions.
pub struct DtlsTransport {
    socket: Arc<UdpSocket>,
    services: Arc<Services>,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    max_sessions: usize,
    idle_timeout: Duration,
    next_generation: AtomicU64,
    certificate: DtlsCert,
}

impl Transport for DtlsTransport {
    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        let Some(p) = self.peers.lock().get(&peer).cloned() else {
            return;
        };
        if !p.connected.load(Ordering::Acquire) {
            return;
        }
        match p.step(|d| d.send_application_data(bytes).map(|_| ())) {
            Ok(step) => self.send_packets(&step.packets, peer).await,
            Err(e) => {
                tracing::debug!("coap dtls: {peer}: {e}");
                self.end(peer, p.generation);
            }
        }
    }

    fn peer_identity(&self, peer: SocketAddr) -> Option<String> {
        let p = self.peers.lock().get(&peer).cloned()?;
        if !p.connected.load(Ordering::Acquire) {
            return None;
        }
        p.keys.accepted.lock().clone()
    }
}

impl DtlsTransport {
    async fn send_packets(&self, packets: &[Vec<u8>], peer: SocketAddr) {
        for pkt in packets {
            if let Err(e) = self.socket.send_to(pkt, peer).await {
                tracing::debug!("coap dtls: send to {peer} failed: {e}");
            }
        }
    }

    /// Drops `peer`'s session if it is still generation `generation`.
    fn end(&self, peer: SocketAddr, generation: u64) {
        let mut peers = self.peers.lock();
        if peers.get(&peer).is_some_and(|p| p.generation == generation)
            && let Some(p) = peers.remove(&peer)
            && let Some(task) = p.task.lock().take()
        {
            task.abort();
        }
    }

    /// Number of sessions (handshakes included) right now.
    pub fn sessions(&self) -> usize {
        self.peers.lock().len()
    }

    fn new_peer(&self) -> Option<(Arc<Peer>, mpsc::Receiver<Vec<u8>>)> {
        let keys = Arc::new(PeerKeys {
            services: self.services.clone(),
            runtime: tokio::runtime::Handle::current(),
            accepted: Mutex::new(None),
        });
        // PSK and certificate suites: the engine picks the session's kind
        // from its ClientHello.
        let mut suites = vec![Dtls12CipherSuite::PSK_AES128_CCM_8];
        suites.extend(Config::default().dtls12_cipher_suites().map(|s| s.suite()));
        let config = Config::builder()
            .with_psk_server(None, Arc::new(Resolver(AssertUnwindSafe(keys.clone()))))
            .dtls12_cipher_suites(&suites)
            // Clients authenticate with a token in the request, not a
            // certificate.
            .require_client_certificate(false)
            .mtu(MTU)
            .max_queue_rx(PEER_QUEUE)
            .max_queue_tx(PEER_QUEUE)
            .handshake_timeout(HANDSHAKE_TIMEOUT)
            .build();
        let config = match config {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!("coap dtls: cannot configure DTLS: {e}");
                return None;
            }
        };
        let certificate = self.certificate.certificate.clone();
        let dtls = catch_unwind(AssertUnwindSafe(|| Dtls::new_auto(config, certificate, Instant::now()))).ok()?;
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let peer = Arc::new(Peer {
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            dtls: Mutex::new(dtls),
            keys,
            connected: AtomicBool::new(false),
            inbox: tx,
            last_seen: Mutex::new(Instant::now()),
            task: Mutex::new(None),
        });
        Some((peer, rx))
    }

    /// Routes one datagram to its peer's session, opening one for a
    /// ClientHello from a new address (or a new handshake at an address
    /// whose session is established: a restarted device).
    fn on_datagram(self: &Arc<Self>, door: &Arc<Door<DtlsTransport>>, data: &[u8], from: SocketAddr) {
        let hello = is_client_hello(data);
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get(&from) {
            let restart = hello && p.connected.load(Ordering::Acquire);
            if !restart {
                *p.last_seen.lock() = Instant::now();
                // Full: drop it, as the network might have.
                let _ = p.inbox.try_send(data.to_vec());
                return;
            }
            if let Some(old) = peers.remove(&from)
                && let Some(task) = old.task.lock().take()
            {
                task.abort();
            }
        } else if !hello {
            return;
        }
        if peers.len() >= self.max_sessions {
            let idlest = peers
                .iter()
                .map(|(a, p)| (*a, *p.last_seen.lock()))
                .min_by_key(|(_, t)| *t)
                .filter(|(_, t)| t.elapsed() >= EVICT_IDLE);
            let Some((addr, _)) = idlest else {
                tracing::debug!("coap dtls: {} sessions, ignoring a handshake from {from}", peers.len());
                return;
            };
            if let Some(old) = peers.remove(&addr)
                && let Some(task) = old.task.lock().take()
            {
                task.abort();
            }
            door.forget_peer(addr);
        }
        let Some((peer, rx)) = self.new_peer() else {
            return;
        };
        let _ = peer.inbox.try_send(data.to_vec());
        peers.insert(from, peer.clone());
        drop(peers);
        door.forget_peer(from);
        let task = tokio::spawn(run_session(self.clone(), door.clone(), from, peer.clone(), rx));
        *peer.task.lock() = Some(task.abort_handle());
    }
}

/// Drives one session: datagrams in, timers, plaintext to the CoAP engine.
async fn run_session(
    transport: Arc<DtlsTransport>,
    door: Arc<Door<DtlsTransport>>,
    addr: SocketAddr,
    peer: Arc<Peer>,
    mut inbox: mpsc::Receiver<Vec<u8>>,
) {
    let mut timer: Option<Instant> = None;
    loop {
        let idle_at = *peer.last_seen.lock() + transport.idle_timeout;
        let wake = timer.unwrap_or(idle_at).min(idle_at);
        let datagram = tokio::select! {
            d = inbox.recv() => match d {
                Some(d) => Some(d),
                None => break,
            },
            _ = tokio::time::sleep_until(wake.into()) => None,
        };
        if datagram.is_none() && peer.last_seen.lock().elapsed() >= transport.idle_timeout {
            tracing::debug!("coap dtls: {addr}: idle, session dropped");
            break;
        }
        let result = if peer.connected.load(Ordering::Acquire) {
            // Established: no key lookups any more, so no need to block.
            match &datagram {
                Some(d) => peer.step(|dtls| dtls.handle_packet(d)),
                None => peer.step(|_| Ok(())),
            }
        } else {
            // Handshaking: the PSK resolver may wait for the database.
            let p = peer.clone();
            tokio::task::spawn_blocking(move || {
                MAY_BLOCK.with(|b| b.set(true));
                let r = match &datagram {
                    Some(d) => p.step(|dtls| dtls.handle_packet(d)),
                    None => p.step(|_| Ok(())),
                };
                MAY_BLOCK.with(|b| b.set(false));
                r
            })
            .await
            .unwrap_or_else(|_| Err("DTLS step failed".into()))
        };
        let step = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("coap dtls: {addr}: {e}");
                break;
            }
        };
        timer = step.timer;
        transport.send_packets(&step.packets, addr).await;
        if step.connected {
            peer.connected.store(true, Ordering::Release);
            tracing::debug!(
                "coap dtls: {addr}: session established ({:?})",
                peer.keys.accepted.lock().as_deref()
            );
        }
        for msg in step.plaintext {
            door.clone().on_datagram(&msg, addr).await;
        }
        if step.closed {
            break;
        }
    }
    // This task may be aborted by `end` below; forget the peer first.
    door.forget_peer(addr);
    let mut peers = transport.peers.lock();
    if peers.get(&addr).is_some_and(|p| p.generation == peer.generation) {
        peers.remove(&addr);
    }
}

/// Serves CoAP over DTLS on `socket` until the task is dropped, with
/// `certificate` (see [`load_certificate`]) for clients without a
/// pre-shared key.
pub async fn serve_dtls(services: Arc<Services>, socket: UdpSocket, certificate: DtlsCert) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let cfg = &services.config.coap;
    let transport = Arc::new(DtlsTransport {
        socket: socket.clone(),
        services: services.clone(),
        peers: Mutex::new(HashMap::new()),
        max_sessions: cfg.dtls_max_sessions.max(1),
        idle_timeout: Duration::from_secs(cfg.dtls_idle_timeout_secs.max(1)),
        next_generation: AtomicU64::new(0),
        certificate,
    });
    let door = Door::new(services.clone(), transport.clone());
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("coap dtls: recv error: {e}");
                continue;
            }
        };
        transport.on_datagram(&door, &buf[..n], peer);
    }
}
