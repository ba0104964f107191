//! One leader per deployment (docs/scale-out.md, "One leader"): the
//! process that holds a session advisory lock runs the workers of which a
//! deployment must run exactly one (push, the outgoing federation queue,
//! application-service delivery, typing and presence timeouts).
//!
//! The lock is held on a connection of its own for as long as the process
//! lives; PostgreSQL releases it when that session ends (the process dies,
//! its connection breaks). A process without it tries again every
//! [`RETRY`]. Two processes must never lead at once, so:
//!
//! - the leader checks its connection every [`CHECK`], and stops leading
//!   when no check has succeeded for [`TIMEOUT`] (a watchdog thread
//!   decides, so a check hanging on a dead network counts as failed);
//! - a process that gets the lock waits [`GRACE`] (longer than `TIMEOUT`)
//!   before it leads: the lock is free only once the old leader's session
//!   ended, which is after the old leader sent its last successful check,
//!   so by then the old leader has stopped its workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::PgConn;

/// Arbitrary key of the leader's advisory lock (beside `MIGRATION_LOCK`).
pub(crate) const LEADER_LOCK: i64 = 0x7765_6674_0002;
/// How often a process without the lock tries to take it.
const RETRY: Duration = Duration::from_secs(2);
/// How often the leader checks its connection.
const CHECK: Duration = Duration::from_millis(250);
/// No successful check for this long: leadership is lost.
const TIMEOUT: Duration = Duration::from_millis(1000);
/// Wait after taking the lock before leading (> `TIMEOUT` + a watchdog
/// tick).
const GRACE: Duration = Duration::from_millis(1500);
/// The watchdog's tick.
const WATCH: Duration = Duration::from_millis(100);

/// The lease's shared state.
struct Lease {
    tx: watch::Sender<bool>,
    started: Instant,
    /// When the last successful check was sent (ms since `started`).
    last_ok: AtomicU64,
}

impl Lease {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lose(&self, why: &str) {
        if self.tx.send_replace(false) {
            tracing::warn!("this process no longer leads (its background workers stop): {why}");
        }
    }
}

/// Starts competing for leadership; the receiver says whether this
/// process leads.
pub(crate) fn start(url: Arc<str>, stop: Arc<AtomicBool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let lease = Arc::new(Lease {
        tx,
        started: Instant::now(),
        last_ok: AtomicU64::new(0),
    });
    let (l, s) = (lease.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("weft-pg-lease".into())
        .spawn(move || lease_loop(&url, &l, &s));
    if let Err(e) = spawned {
        tracing::error!("cannot start the leadership thread: {e}");
        return rx;
    }
    let _ = std::thread::Builder::new()
        .name("weft-pg-lease-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(WATCH);
                if *lease.tx.borrow() {
                    let since = lease.now_ms().saturating_sub(lease.last_ok.load(Ordering::Acquire));
                    if since > TIMEOUT.as_millis() as u64 {
                        lease.lose("its database connection did not answer");
                    }
                }
            }
            lease.lose("the store was closed");
        });
    rx
}

fn connect(url: &str) -> weft_core::Result<PgConn> {
    // Names the leader in `pg_stat_activity` (docs/scale-out.md).
    PgConn::connect_as(url, Some(&format!("weft leader {}", std::process::id())))
}

fn lease_loop(url: &str, lease: &Lease, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match connect(url) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("leadership: cannot connect to the database: {e}");
                std::thread::sleep(RETRY);
                continue;
            }
        };
        // Ask until this process gets the lock (or the connection fails).
        let mut held = false;
        while !stop.load(Ordering::Relaxed) {
            match conn.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]) {
                Ok(r) if r.get::<_, bool>(0) => {
                    held = true;
                    break;
                }
                Ok(_) => std::thread::sleep(RETRY),
                Err(e) => {
                    tracing::warn!("leadership: cannot ask for the lock: {e}");
                    std::thread::sleep(RETRY);
                    break;
                }
            }
        }
        if !held {
            continue;
        }
        std::thread::sleep(GRACE);
        lead(&mut conn, lease, stop);
        // Closing the session releases the lock (if it still held it).
        drop(conn);
        if !stop.load(Ordering::Relaxed) {
            std::thread::sleep(RETRY);
        }
    }
}

/// Leads while the connection answers its checks.
fn lead(conn: &mut PgConn, lease: &Lease, stop: &AtomicBool) {
    let sent = lease.now_ms();
    if conn.query_one("SELECT 1", &[]).is_err() {
        return;
    }
    lease.last_ok.store(sent, Ordering::Release);
    lease.tx.send_replace(true);
    tracing::info!(
        "this process now leads: it runs the background workers (push, federation queue, application services, timeouts)"
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(CHECK);
        let sent = lease.now_ms();
        match conn.query_one("SELECT 1", &[]) {
            Ok(_) => lease.last_ok.store(sent, Ordering::Release),
            Err(e) => {
                lease.lose(&format!("its lock connection failed: {e}"));
                return;
            }
        }
        // The watchdog gave up on a slow check meanwhile: start over
        // (closing this session, so the lock is free for another).
        if !*lease.tx.borrow() {
            return;
        }
    }
}
