//! The SQLite backend: one writer thread doing group commit, and a small
//! pool of read connections (WAL lets reads run beside the writer).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::{oneshot, watch};
use weft_core::{Error, ErrorKind, Result};

use crate::*;

mod appservice;
mod e2ee;
mod federation;
mod federation_queue;
mod graph;
mod media;

pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_initial.sql"),
    include_str!("../migrations/0002_e2ee.sql"),
    include_str!("../migrations/0003_cross_signing.sql"),
    include_str!("../migrations/0004_device_psks.sql"),
    include_str!("../migrations/0005_device_last_seen_ip.sql"),
    include_str!("../migrations/0006_key_backup.sql"),
    include_str!("../migrations/0007_reports.sql"),
    include_str!("../migrations/0008_relations.sql"),
    include_str!("../migrations/0009_search.sql"),
    include_str!("../migrations/0010_receipts.sql"),
    include_str!("../migrations/0011_typing_presence.sql"),
    include_str!("../migrations/0012_push.sql"),
    include_str!("../migrations/0013_sliding_sync.sql"),
    include_str!("../migrations/0014_media.sql"),
    include_str!("../migrations/0015_server_keys.sql"),
    DAG_MIGRATION,
    include_str!("../migrations/0017_federation_queue.sql"),
    include_str!("../migrations/0018_federated_e2ee.sql"),
    include_str!("../migrations/0019_compact_dag.sql"),
    include_str!("../migrations/0020_appservices.sql"),
    include_str!("../migrations/0021_process_state.sql"),
    include_str!("../migrations/0022_rate_buckets.sql"),
];
/// The migration after which rooms stored before the DAG get their state
/// groups (a Rust step: `graph::fill_state_groups`).
const DAG_MIGRATION: &str = include_str!("../migrations/0016_room_dag.sql");
/// `meta` key holding the highest stream position of a deleted row (acked
/// to-device messages) or of a stream key without a row (a revocation, a
/// federation destination's wake-up), so positions never go back across a
/// restart.
pub(crate) const DELETED_MAX: &str = "deleted_stream_max";
/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 512;
const READERS: usize = 4;
/// The highest stream position a database holds (`?1` is [`DELETED_MAX`]):
/// where the stream continues when it is opened, and where `migrate` sets
/// PostgreSQL's `stream_head`.
pub(crate) const MAX_POSITION_SQL: &str = "SELECT MAX(COALESCE((SELECT MAX(position) FROM events), 0),
        COALESCE((SELECT MAX(position) FROM account_data), 0),
        COALESCE((SELECT MAX(position) FROM device_list_changes), 0),
        COALESCE((SELECT MAX(position) FROM to_device), 0),
        COALESCE((SELECT MAX(position) FROM receipts), 0),
        COALESCE((SELECT MAX(position) FROM notifications), 0),
        COALESCE((SELECT MAX(position) FROM typing_rooms), 0),
        COALESCE((SELECT MAX(position) FROM presence), 0),
        COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1), 0))";
/// The lowest position of an event off the stream (0 or below).
pub(crate) const MIN_POSITION_SQL: &str = "SELECT MIN(0, COALESCE((SELECT MIN(position) FROM events), 0))";

/// Microseconds since the epoch: the clock of SQLite's rate-limit buckets
/// (one process owns the database, so its clock is the only one).
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What a write job leaves for after the commit: whether it succeeded (so
/// its savepoint is kept) and how to answer its caller once the batch is
/// durable (or failed to commit, with that error).
struct Done {
    ok: bool,
    answer: Box<dyn FnOnce(Option<Error>) + Send>,
}
type WriteFn = Box<dyn FnOnce(&Connection, &mut WriterCtx) -> Done + Send>;

pub struct SqliteStore {
    /// [`Store::process_tag`].
    tag: String,
    /// [`MediaStore::blob_gate`]: one process per database.
    blob_gate: Arc<tokio::sync::RwLock<()>>,
    writer: mpsc::Sender<WriteFn>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: std::path::PathBuf,
    position: watch::Receiver<i64>,
    recent: Arc<parking_lot::RwLock<RecentChanges>>,
    /// The last state group ID handed out ([`RoomGraphStore::reserve_state_groups`]).
    state_groups: tokio::sync::OnceCell<std::sync::atomic::AtomicI64>,
    /// When the push evaluator's and the federation queue reader's
    /// positions were last written.
    pub(crate) push_mark: crate::stream::ReaderMark,
    pub(crate) federation_mark: crate::stream::ReaderMark,
    /// Always true: one process per database, so it leads at once.
    leader: watch::Sender<bool>,
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("database: {e}"))
}

fn open_conn(path: &Path, full_sync: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if full_sync { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Readers see the writer's pages through the mapping instead of
    // re-reading them after every commit.
    conn.pragma_update(None, "mmap_size", 256i64 * 1024 * 1024)?;
    // Checkpoints run on their own thread (see `checkpointer`), never in
    // the writer's commit path.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if *sql == DAG_MIGRATION {
            graph::fill_state_groups(&tx)?;
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and runs migrations.
    pub fn open(path: &Path, full_sync: bool) -> Result<Self> {
        let mut conn = open_conn(path, full_sync).map_err(db_err)?;
        migrate(&mut conn).map_err(db_err)?;
        // The writer touches index pages all over (event IDs are hashes):
        // a larger cache saves re-reading them each batch. Grows only as used.
        conn.pragma_update(None, "cache_size", -32_768i64).map_err(db_err)?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(db_err)?;
        let max_pos: i64 = conn
            .query_row(MAX_POSITION_SQL, [DELETED_MAX], |r| r.get(0))
            .map_err(db_err)?;
        let min_pos: i64 = conn.query_row(MIN_POSITION_SQL, [], |r| r.get(0)).map_err(db_err)?;
        let (pos_tx, pos_rx) = watch::channel(max_pos);
        let (tx, rx) = mpsc::channel::<WriteFn>();
        let recent = Arc::new(parking_lot::RwLock::new(RecentChanges::new(max_pos)));
        let recent_w = recent.clone();
        let checkpoint_conn = open_conn(path, full_sync).map_err(db_err)?;
        let (wake_tx, wake_rx) = mpsc::sync_channel(1);
        let restart = Arc::new(AtomicBool::new(false));
        let restart_c = restart.clone();
        std::thread::Builder::new()
            .name("weft-sqlite-checkpoint".into())
            .spawn(move || checkpointer(checkpoint_conn, wake_rx, restart_c))
            .map_err(db_err)?;
        let wal = WalControl {
            restart,
            _checkpointer: wake_tx,
        };
        std::thread::Builder::new()
            .name("weft-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, pos_tx, recent_w, max_pos, min_pos, wal))
            .map_err(db_err)?;
        let mut readers = Vec::new();
        for _ in 0..READERS {
            readers.push(open_conn(path, full_sync).map_err(db_err)?);
        }
        Ok(Self {
            writer: tx,
            readers: Arc::new(Mutex::new(readers)),
            path: path.to_owned(),
            position: pos_rx,
            recent,
            state_groups: tokio::sync::OnceCell::new(),
            push_mark: Default::default(),
            federation_mark: Default::default(),
            leader: watch::Sender::new(true),
            tag: crate::process_tag(),
            blob_gate: Default::default(),
        })
    }

    /// Runs `f` on a pooled read connection.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        // Reads run inline on the calling task: they are indexed lookups
        // taking microseconds, far less than handing them to a blocking
        // thread and back (two context switches per query). WAL means they
        // never wait for the writer.
        let conn = self.readers.lock().pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path, false).map_err(db_err)?,
        };
        let out = f(&conn).map_err(db_err);
        let mut pool = self.readers.lock();
        if pool.len() < READERS * 2 {
            pool.push(conn);
        }
        out
    }

    /// Queues `f` to run inside the writer's next transaction (in its own
    /// savepoint). `f` gets the connection and the stream-position counter.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriterCtx) -> Result<T> + Send + 'static,
    ) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        let job: WriteFn = Box::new(move |conn, pos| {
            let result = f(conn, pos);
            Done {
                ok: result.is_ok(),
                answer: Box::new(move |commit_err| {
                    let _ = tx.send(match commit_err {
                        Some(e) => Err(e),
                        None => result,
                    });
                }),
            }
        });
        // If the writer is gone the job is dropped and the receiver errors.
        let _ = self.writer.send(job);
        rx
    }

    async fn write_wait<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriterCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write(f)
            .await
            .map_err(|_| Error::internal("database writer stopped"))?
    }
}

/// WAL pages (4 KiB each) above which the writer starts the WAL over from
/// its beginning once the checkpointer has copied it back.
const WAL_RESTART_PAGES: i64 = 4_096;
/// The WAL file is cut back to this size when it starts over (SQLite's
/// `journal_size_limit`), so a burst does not leave a huge file behind.
const WAL_SIZE_LIMIT: i64 = 32 << 20;

/// Runs a PASSIVE checkpoint: copies WAL pages back into the database
/// without taking the write lock and without waiting for anyone (a busy
/// checkpoint lock or a reader on an old snapshot just leaves pages for
/// the next one). Returns (pages in the WAL, pages copied back so far);
/// both are -1 when another checkpoint was running.
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let busy: i64 = r.get(0)?;
        Ok(if busy != 0 { (-1, -1) } else { (r.get(1)?, r.get(2)?) })
    })
}

/// Copies the WAL back into the database on its own connection, never
/// blocking the writer: only PASSIVE checkpoints, never RESTART or
/// TRUNCATE (those take the write lock and hold it while they wait for
/// readers, and the writer waiting for it sleeps in SQLite's busy handler
/// in steps of 1, 2, 5, 10, … 100 ms: that was the send latency tail).
/// When the WAL has grown past [`WAL_RESTART_PAGES`] it asks the writer
/// (`restart`) to start it over, see [`writer_loop`]. Runs every second,
/// every 100 ms while the WAL is large, and stops with the writer.
fn checkpointer(conn: Connection, wake: mpsc::Receiver<()>, restart: Arc<AtomicBool>) {
    let mut wait = Duration::from_secs(1);
    loop {
        if let Err(mpsc::RecvTimeoutError::Disconnected) = wake.recv_timeout(wait) {
            return;
        }
        match passive_checkpoint(&conn) {
            Ok((log, _)) => {
                if log >= WAL_RESTART_PAGES {
                    restart.store(true, Ordering::Relaxed);
                }
                wait = Duration::from_millis(if log >= WAL_RESTART_PAGES / 4 { 100 } else { 1_000 });
            }
            Err(e) => {
                tracing::warn!("WAL checkpoint failed: {e}");
                wait = Duration::from_secs(1);
            }
        }
    }
}

/// What the writer shares with the checkpointer thread.
struct WalControl {
    /// Set by the checkpointer when the WAL has grown past
    /// [`WAL_RESTART_PAGES`].
    restart: Arc<AtomicBool>,
    /// Dropped with the writer, which stops the checkpointer.
    _checkpointer: mpsc::SyncSender<()>,
}

/// Stores account data (`room` empty: global) at the next stream position.
fn upsert_account_data(
    c: &Connection,
    ctx: &mut WriterCtx,
    user: String,
    room: &str,
    data_type: &str,
    json: &str,
) -> Result<i64> {
    let p = ctx.pos + 1;
    c.prepare_cached(
        "INSERT INTO account_data (user_id, room_id, data_type, content_json, position) VALUES (?1,?2,?3,?4,?5) \
         ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content_json = excluded.content_json, \
         position = excluded.position",
    )
    .and_then(|mut s| s.execute(params![user, room, data_type, json, p]))
    .map_err(db_err)?;
    ctx.pos = p;
    ctx.changes.push((p, StreamKey::User(user)));
    Ok(p)
}

/// Runs one of the writer's fixed statements (cached, not re-parsed).
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// The writer: takes every job waiting, runs them in one transaction, each
/// in its own savepoint so a failing job does not undo the others, commits
/// (one fsync for the batch), then answers them and publishes the position.
fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<WriteFn>,
    pos_tx: watch::Sender<i64>,
    recent: Arc<parking_lot::RwLock<RecentChanges>>,
    pos: i64,
    low: i64,
    wal: WalControl,
) {
    let mut ctx = WriterCtx {
        pos,
        low,
        changes: Vec::new(),
        events: Vec::new(),
        redactions: Vec::new(),
    };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if wal.restart.load(Ordering::Relaxed) {
            // The WAL only starts over from its beginning when a write
            // transaction begins with every page of it copied back, which
            // a checkpointer on another thread never sees while writes
            // keep coming. So the writer copies back the little that came
            // after the checkpointer's last pass (between batches, never
            // waiting for a lock): the BEGIN below then reuses the file.
            if let Ok((log, done)) = passive_checkpoint(&conn)
                && log >= 0
                && log == done
            {
                wal.restart.store(false, Ordering::Relaxed);
            }
        }
        let (start_pos, start_low) = (ctx.pos, ctx.low);
        ctx.changes.clear();
        ctx.events.clear();
        ctx.redactions.clear();
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE") {
            tracing::error!("cannot begin write transaction: {e}");
            continue; // dropping the jobs fails their receivers
        }
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let (before, low, n_changes) = (ctx.pos, ctx.low, ctx.changes.len());
            let (n_events, n_redactions) = (ctx.events.len(), ctx.redactions.len());
            let sp = exec(&conn, "SAVEPOINT job");
            let done = job(&conn, &mut ctx);
            if !done.ok || sp.is_err() {
                ctx.pos = before;
                ctx.low = low;
                ctx.changes.truncate(n_changes);
                ctx.events.truncate(n_events);
                ctx.redactions.truncate(n_redactions);
                let _ = exec(&conn, "ROLLBACK TO job");
            }
            let _ = exec(&conn, "RELEASE job");
            answers.push(done.answer);
        }
        match exec(&conn, "COMMIT") {
            Ok(()) => {
                if ctx.pos != start_pos {
                    // In memory before the position is published, so a
                    // reader woken by it finds every event up to it.
                    recent.write().add(&mut ctx);
                    pos_tx.send_replace(ctx.pos);
                }
                for answer in answers {
                    answer(None);
                }
            }
            Err(e) => {
                tracing::error!("write batch failed to commit: {e}");
                let _ = exec(&conn, "ROLLBACK");
                ctx.pos = start_pos;
                ctx.low = start_low;
                for answer in answers {
                    answer(Some(db_err(&e)));
                }
            }
        }
    }
}

/// The newest `m.read`/`m.read.private` receipt positions of `user` in
/// `room` (the stream positions of the events they point at): unthreaded,
/// and per thread.
fn read_positions(c: &Connection, user: &str, room: &str) -> rusqlite::Result<(i64, HashMap<String, i64>)> {
    let mut floor = 0;
    let mut threads = HashMap::new();
    let mut st = c.prepare_cached(
        "SELECT r.thread_id, MAX(e.position) FROM receipts r JOIN events e ON e.event_id = r.event_id \
         WHERE r.room_id = ?1 AND r.user_id = ?2 AND r.receipt_type IN ('m.read', 'm.read.private') \
         GROUP BY r.thread_id",
    )?;
    let rows = st.query_map(params![room, user], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
    })?;
    for row in rows {
        let (thread, pos) = row?;
        let pos = pos.unwrap_or(0);
        if thread.is_empty() {
            floor = pos;
        } else {
            threads.insert(thread, pos);
        }
    }
    Ok((floor, threads))
}

/// Whether a row of `thread` at `event_position` is read, given the
/// receipts [`read_positions`] found.
fn is_read(read: &(i64, HashMap<String, i64>), thread: &str, event_position: i64) -> bool {
    let threaded = read.1.get(thread).copied().unwrap_or(0);
    event_position <= read.0.max(threaded)
}

const NOTIFICATION_COLS: &str =
    "position, user_id, room_id, event_id, event_position, thread_id, actions_json, highlight, ts";

fn notification_row(r: &Row<'_>) -> rusqlite::Result<NotificationRecord> {
    Ok(NotificationRecord {
        position: r.get(0)?,
        user_id: r.get(1)?,
        room_id: r.get(2)?,
        event_id: r.get(3)?,
        event_position: r.get(4)?,
        thread_id: r.get(5)?,
        actions_json: r.get(6)?,
        highlight: r.get::<_, i64>(7)? != 0,
        ts: r.get::<_, i64>(8)?.max(0) as u64,
        read: false,
    })
}

fn pusher_row(r: &Row<'_>) -> rusqlite::Result<PusherRecord> {
    Ok(PusherRecord {
        user_id: r.get(0)?,
        app_id: r.get(1)?,
        pushkey: r.get(2)?,
        pusher_json: r.get(3)?,
        pushkey_ts: r.get::<_, i64>(4)?.max(0) as u64,
        last_sent: r.get(5)?,
        from_event: r.get(6)?,
    })
}

const EVENT_COLS: &str = "e.position, e.event_id, e.room_id, e.event_type, e.state_key, e.sender, \
     e.origin_server_ts, e.pdu_json, e.redacted_by, e.txn_device, e.txn_id";

/// The condition on `events e` of an event served as timeline (not an
/// outlier, not rejected, not soft-failed).
const SERVED: &str = "e.outlier = 0 AND e.rejected IS NULL AND e.soft_failed = 0";

fn event_row(r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let txn_device: Option<String> = r.get(9)?;
    let txn_id: Option<String> = r.get(10)?;
    Ok(StoredEvent {
        position: r.get(0)?,
        event_id: r.get(1)?,
        room_id: r.get(2)?,
        event_type: r.get(3)?,
        state_key: r.get(4)?,
        sender: r.get(5)?,
        origin_server_ts: r.get::<_, i64>(6)? as u64,
        pdu_json: r.get(7)?,
        redacted_by: r.get(8)?,
        txn: txn_device.zip(txn_id),
    })
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        user_id: r.get(0)?,
        password_hash: r.get(1)?,
        admin: r.get(2)?,
        deactivated: r.get(3)?,
        displayname: r.get(4)?,
        avatar_url: r.get(5)?,
        created_ms: r.get::<_, i64>(6)? as u64,
    })
}

const USER_COLS: &str = "user_id, password_hash, admin, deactivated, displayname, avatar_url, created_ms";

fn collect<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, f)?;
    rows.collect()
}

/// The current (highest, not deleted) backup version of a user: version,
/// algorithm JSON, etag.
fn current_backup(c: &Connection, user_id: &str) -> rusqlite::Result<Option<(i64, String, i64)>> {
    c.prepare_cached(
        "SELECT version, algorithm_json, etag FROM backup_versions \
         WHERE user_id = ?1 AND deleted = 0 ORDER BY version DESC LIMIT 1",
    )?
    .query_row([user_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    .optional()
}

fn backup_count(c: &Connection, user_id: &str, version: i64) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT COUNT(*) FROM backup_keys WHERE user_id = ?1 AND version = ?2")?
        .query_row(params![user_id, version], |r| r.get(0))
}

/// A new etag for a version whose keys changed.
fn bump_backup_etag(c: &Connection, user_id: &str, version: i64) -> Result<i64> {
    c.query_row(
        "UPDATE backup_versions SET etag = etag + 1 WHERE user_id = ?1 AND version = ?2 RETURNING etag",
        params![user_id, version],
        |r| r.get(0),
    )
    .map_err(db_err)
}

/// The `events` row of a new event at position `p`.
fn insert_event_row(
    conn: &Connection,
    ev: &NewEvent,
    p: i64,
    txn_device: Option<&str>,
    txn_id: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO events (position, event_id, room_id, event_type, state_key, sender, \
         origin_server_ts, pdu_json, txn_device, txn_id, depth, outlier, rejected, soft_failed, \
         state_before, state_after) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
    )?
    .execute(params![
        p,
        ev.event_id,
        ev.room_id,
        ev.event_type,
        ev.state_key,
        ev.sender,
        ev.origin_server_ts as i64,
        ev.pdu_json,
        txn_device,
        txn_id,
        ev.depth,
        ev.kind == EventKind::Outlier,
        match &ev.kind {
            EventKind::Rejected(why) => Some(why.as_str()),
            _ => None,
        },
        ev.kind == EventKind::SoftFailed,
        ev.state_before,
        ev.state_after,
    ])?;
    Ok(())
}

/// Inserts one event and applies its effects; runs inside the writer.
/// `room_done`: the room's row (extremities, current group) was already
/// moved on past `ev` ([`graph::advance_linear`]).
fn insert_event(conn: &Connection, ctx: &mut WriterCtx, ev: &NewEvent, room_done: bool) -> rusqlite::Result<i64> {
    let on_stream = ev.kind.on_stream();
    // Events off the stream (backfilled, outliers, rejected, soft-failed)
    // count down from below every stored position: no stream reader ever
    // sees them as new.
    let p = if on_stream { ctx.pos + 1 } else { ctx.low - 1 };
    if let Some(room) = &ev.new_room {
        conn.prepare_cached("INSERT INTO rooms (room_id, room_version, creator) VALUES (?1, ?2, ?3)")?
            .execute(params![ev.room_id, room.room_version, room.creator])?;
    }
    let (txn_device, txn_id) = match &ev.txn {
        Some((d, t)) => (Some(d.as_str()), Some(t.as_str())),
        None => (None, None),
    };
    // A backfilled event stored before as an outlier (a join's state, an
    // auth event) takes its place in the timeline at its new position.
    let outlier_at = if ev.kind == EventKind::Backfilled {
        conn.prepare_cached("SELECT position FROM events WHERE event_id = ?1 AND outlier = 1")?
            .query_row([&ev.event_id], |r| r.get::<_, i64>(0))
            .optional()?
    } else {
        None
    };
    match outlier_at {
        Some(old) => graph::promote_outlier(conn, ev, old, p)?,
        None => {
            insert_event_row(conn, ev, p, txn_device, txn_id)?;
            graph::store_graph(conn, ev, room_done)?;
        }
    }
    if let Some(cs) = &ev.current_state {
        for (event_type, state_key, event_id) in &cs.changes {
            // The event the key now points at: this one, or one stored
            // before (chosen by state resolution, or a join's state).
            let (event_position, detail) = if *event_id == ev.event_id {
                (p, ev.membership.clone().or_else(|| ev.history_visibility.clone()))
            } else {
                conn.prepare_cached(
                    "SELECT position, COALESCE(json_extract(pdu_json, '$.content.membership'), \
                     json_extract(pdu_json, '$.content.history_visibility')) FROM events WHERE event_id = ?1",
                )?
                .query_row([event_id], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
                })?
            };
            let detail = detail.filter(|_| event_type == "m.room.member" || event_type == "m.room.history_visibility");
            conn.prepare_cached(
                "INSERT OR REPLACE INTO state_events (room_id, event_type, state_key, position, detail, event_position) \
                 VALUES (?1,?2,?3,?4,?5,?6)",
            )?
            .execute(params![ev.room_id, event_type, state_key, p, detail, event_position])?;
            conn.prepare_cached(
                "INSERT INTO current_state (room_id, event_type, state_key, position) VALUES (?1,?2,?3,?4) \
                 ON CONFLICT (room_id, event_type, state_key) DO UPDATE SET position = excluded.position",
            )?
            .execute(params![ev.room_id, event_type, state_key, event_position])?;
            if event_type == "m.room.member" {
                let membership = detail.unwrap_or_default();
                conn.prepare_cached(
                    "INSERT INTO memberships (room_id, user_id, membership, event_id, position) VALUES (?1,?2,?3,?4,?5) \
                     ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, \
                     event_id = excluded.event_id, position = excluded.position",
                )?
                .execute(params![ev.room_id, state_key, membership, event_id, p])?;
                if membership == "join" {
                    conn.prepare_cached("DELETE FROM forgotten WHERE user_id = ?1 AND room_id = ?2")?
                        .execute(params![state_key, ev.room_id])?;
                }
                if on_stream {
                    ctx.changes.push((p, StreamKey::User(state_key.clone())));
                    // Leaving a room (or being kicked or banned) stops
                    // typing there: the room's typers change at this
                    // event's position.
                    if membership != "join" {
                        let n = conn
                            .prepare_cached("DELETE FROM typing WHERE room_id = ?1 AND user_id = ?2")?
                            .execute(params![ev.room_id, state_key])?;
                        if n > 0 {
                            typing_changed(conn, ctx, &ev.room_id, p)?;
                        }
                    }
                }
            }
        }
    }
    if let Some((device, txn)) = &ev.txn {
        conn.prepare_cached(
            "INSERT INTO txns (user_id, device_id, room_id, event_type, txn_id, event_id) VALUES (?1,?2,?3,?4,?5,?6)",
        )?
        .execute(params![ev.sender, device, ev.room_id, ev.event_type, txn, ev.event_id])?;
    }
    let served = matches!(
        ev.kind,
        EventKind::Timeline | EventKind::TimelineAfterGap | EventKind::Backfilled
    );
    if let Some(rel) = ev.relation.as_ref().filter(|_| served) {
        conn.prepare_cached(
            "INSERT INTO relations (position, room_id, parent_event_id, rel_type, event_type, sender) \
             VALUES (?1,?2,?3,?4,?5,?6)",
        )?
        .execute(params![
            p,
            ev.room_id,
            rel.parent_event_id,
            rel.rel_type,
            ev.event_type,
            ev.sender
        ])?;
    }
    if let Some(text) = ev.search_text.as_ref().filter(|_| served) {
        let sql = match ev.event_type.as_str() {
            "m.room.name" => "INSERT INTO event_search (rowid, name) VALUES (?1, ?2)",
            "m.room.topic" => "INSERT INTO event_search (rowid, topic) VALUES (?1, ?2)",
            _ => "INSERT INTO event_search (rowid, body) VALUES (?1, ?2)",
        };
        conn.prepare_cached(sql)?.execute(params![p, text])?;
    }
    if let Some((target, redacted_json)) = &ev.redaction {
        conn.prepare_cached(
            "DELETE FROM event_search WHERE rowid = (SELECT position FROM events WHERE event_id = ?1)",
        )?
        .execute([target])?;
        conn.prepare_cached("UPDATE events SET pdu_json = ?1, redacted_by = ?2 WHERE event_id = ?3")?
            .execute(params![redacted_json, ev.event_id, target])?;
        // A redacted event's content, and so its relation, is gone.
        conn.prepare_cached(
            "DELETE FROM relations WHERE position = (SELECT position FROM events WHERE event_id = ?1)",
        )?
        .execute([target])?;
    }
    ctx.record_event(ev, p);
    Ok(p)
}

/// Records that the typers of `room` changed at stream position `p`
/// (announced as `Typing`).
fn typing_changed(conn: &Connection, ctx: &mut WriterCtx, room: &str, p: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO typing_rooms (room_id, position) VALUES (?1, ?2) \
         ON CONFLICT (room_id) DO UPDATE SET position = excluded.position",
    )?
    .execute(params![room, p])?;
    ctx.changes.push((p, StreamKey::Typing(room.to_owned())));
    Ok(())
}

fn presence_row(r: &Row) -> rusqlite::Result<PresenceRecord> {
    Ok(PresenceRecord {
        user_id: r.get(0)?,
        presence: r.get(1)?,
        status_msg: r.get(2)?,
        last_active_ms: r.get::<_, i64>(3)?.max(0) as u64,
        online_until_ms: r.get::<_, i64>(4)?.max(0) as u64,
        position: r.get(5)?,
    })
}

const PRESENCE_COLUMNS: &str = "user_id, presence, status_msg, last_active_ms, online_until_ms, position";

/// Records that `user`'s device list changed: the next stream position,
/// kept as the user's newest change and announced as `DeviceKeys`.
fn device_list_changed(conn: &Connection, ctx: &mut WriterCtx, user: &str) -> rusqlite::Result<i64> {
    let p = ctx.pos + 1;
    conn.prepare_cached(
        "INSERT INTO device_list_changes (user_id, position) VALUES (?1, ?2) \
         ON CONFLICT (user_id) DO UPDATE SET position = excluded.position",
    )?
    .execute(params![user, p])?;
    ctx.pos = p;
    ctx.changes.push((p, StreamKey::DeviceKeys(user.to_owned())));
    Ok(p)
}

/// Logs that the keys of `user`'s `device` changed (or the device was
/// deleted) at stream position `p`: the device list's next stream ID, as
/// `m.device_list_update` EDUs tell other servers.
fn log_device_change(conn: &Connection, user: &str, device: &str, p: i64, deleted: bool) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO device_list_log (user_id, device_id, position, deleted) VALUES (?1,?2,?3,?4)")?
        .execute(params![user, device, p, deleted])?;
    Ok(())
}

/// Remembers `position` as taken although no row keeps it (a stream key
/// alone: a revocation, a federation destination's wake-up), so positions
/// never go back across a restart (the same `meta` key as deleted
/// to-device messages).
pub(crate) fn remember_position(conn: &Connection, position: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE \
         SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
    )?
    .execute(params![DELETED_MAX, position])?;
    Ok(())
}

/// Deletes to-device messages matching `filter` (over `?1` user, `?2`
/// device, `?3` position) and remembers the highest deleted position.
fn delete_to_device(conn: &Connection, filter: &str, p: impl rusqlite::Params + Clone) -> rusqlite::Result<()> {
    let max: Option<i64> = conn
        .prepare_cached(&format!("SELECT MAX(position) FROM to_device WHERE {filter}"))?
        .query_row(p.clone(), |r| r.get(0))?;
    if let Some(max) = max {
        conn.prepare_cached(&format!("DELETE FROM to_device WHERE {filter}"))?
            .execute(p)?;
        conn.prepare_cached(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE \
             SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
        )?
        .execute(params![DELETED_MAX, max])?;
    }
    Ok(())
}

/// Deletes devices of `user` (only `only` if given; all but `keep` if
/// given) with their tokens, keys, transaction records and pending
/// to-device messages. A device list that lost keys gets a stream position.
fn purge_devices(
    conn: &Connection,
    ctx: &mut WriterCtx,
    user: &str,
    only: Option<&str>,
    keep: Option<&str>,
) -> rusqlite::Result<()> {
    const SEL: &str = "user_id = ?1 AND (?2 IS NULL OR device_id = ?2) AND (?3 IS NULL OR device_id != ?3)";
    let with_keys: Vec<String> = collect(
        conn,
        &format!("SELECT device_id FROM device_keys WHERE {SEL} ORDER BY device_id"),
        params![user, only, keep],
        |r| r.get(0),
    )?;
    let had_keys = conn
        .prepare_cached(&format!("DELETE FROM device_keys WHERE {SEL}"))?
        .execute(params![user, only, keep])?;
    conn.prepare_cached(
        "DELETE FROM key_signatures WHERE target_user = ?1 AND (?2 IS NULL OR target_key = ?2) \
         AND (?3 IS NULL OR target_key != ?3) \
         AND target_key NOT IN (SELECT value FROM cross_signing_keys c, json_each(c.key_json, '$.keys') \
                                WHERE c.user_id = ?1)",
    )?
    .execute(params![user, only, keep])?;
    for table in [
        "one_time_keys",
        "fallback_keys",
        "to_device_txns",
        "device_psks",
        "sliding_sync_connections",
        "devices",
    ] {
        conn.prepare_cached(&format!("DELETE FROM {table} WHERE {SEL}"))?
            .execute(params![user, only, keep])?;
    }
    delete_to_device(conn, SEL, params![user, only, keep])?;
    ctx.announce(StreamKey::Revoked(user.to_owned()));
    remember_position(conn, ctx.pos)?;
    if had_keys > 0 {
        let p = device_list_changed(conn, ctx, user)?;
        for device in with_keys {
            log_device_change(conn, user, &device, p, true)?;
        }
    }
    Ok(())
}

fn otk_counts(conn: &Connection, user: &str, device: &str) -> rusqlite::Result<BTreeMap<String, u64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 GROUP BY algorithm",
    )?;
    let rows = stmt.query_map(params![user, device], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}

/// The algorithm of a key ID "algorithm:id".
fn key_algorithm(key_id: &str) -> &str {
    key_id.split_once(':').map_or(key_id, |(alg, _)| alg)
}

fn store_keys(
    conn: &Connection,
    ctx: &mut WriterCtx,
    user: &str,
    device: &str,
    up: KeyUpload,
) -> Result<BTreeMap<String, u64>> {
    if let Some(keys) = up.device_keys {
        let old: Option<String> = conn
            .prepare_cached("SELECT keys_json FROM device_keys WHERE user_id = ?1 AND device_id = ?2")
            .and_then(|mut s| s.query_row(params![user, device], |r| r.get(0)).optional())
            .map_err(db_err)?;
        if old.as_deref() != Some(keys.as_str()) {
            let p = device_list_changed(conn, ctx, user).map_err(db_err)?;
            log_device_change(conn, user, device, p, false).map_err(db_err)?;
            conn.prepare_cached(
                "INSERT INTO device_keys (user_id, device_id, keys_json, position) VALUES (?1,?2,?3,?4) \
                 ON CONFLICT (user_id, device_id) DO UPDATE SET keys_json = excluded.keys_json, \
                 position = excluded.position",
            )
            .and_then(|mut s| s.execute(params![user, device, keys, p]))
            .map_err(db_err)?;
        }
    }
    for (key_id, json) in up.one_time_keys {
        let alg = key_algorithm(&key_id);
        let old: Option<String> = conn
            .prepare_cached(
                "SELECT key_json FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 \
                 AND algorithm = ?3 AND key_id = ?4",
            )
            .and_then(|mut s| s.query_row(params![user, device, alg, key_id], |r| r.get(0)).optional())
            .map_err(db_err)?;
        match old {
            Some(old) if old == json => {}
            Some(_) => {
                return Err(Error::invalid_param(format!(
                    "One-time key {key_id} already exists with other content"
                )));
            }
            None => {
                conn.prepare_cached(
                    "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, key_json) VALUES (?1,?2,?3,?4,?5)",
                )
                .and_then(|mut s| s.execute(params![user, device, alg, key_id, json]))
                .map_err(db_err)?;
            }
        }
    }
    for (key_id, json) in up.fallback_keys {
        conn.prepare_cached(
            "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key_json, used) \
             VALUES (?1,?2,?3,?4,?5,0) ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET \
             used = CASE WHEN fallback_keys.key_id = excluded.key_id AND fallback_keys.key_json = excluded.key_json \
                    THEN fallback_keys.used ELSE 0 END, \
             key_id = excluded.key_id, key_json = excluded.key_json",
        )
        .and_then(|mut s| s.execute(params![user, device, key_algorithm(&key_id), key_id, json]))
        .map_err(db_err)?;
    }
    otk_counts(conn, user, device).map_err(db_err)
}

fn claim_one(conn: &Connection, user: &str, device: &str, alg: &str) -> rusqlite::Result<Option<(String, String)>> {
    let otk: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT key_id, key_json FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 \
             AND algorithm = ?3 ORDER BY key_id LIMIT 1",
        )?
        .query_row(params![user, device, alg], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((key_id, json)) = otk {
        conn.prepare_cached(
            "DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND key_id = ?4",
        )?
        .execute(params![user, device, alg, key_id])?;
        return Ok(Some((key_id, json)));
    }
    let fallback: Option<(String, String)> = conn
        .prepare_cached(
            "UPDATE fallback_keys SET used = 1 WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 \
             RETURNING key_id, key_json",
        )?
        .query_row(params![user, device, alg], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(fallback)
}

#[async_trait]
impl Store for SqliteStore {
    fn current_position(&self) -> i64 {
        *self.position.borrow()
    }

    fn process_tag(&self) -> &str {
        &self.tag
    }

    fn subscribe_position(&self) -> watch::Receiver<i64> {
        self.position.clone()
    }

    fn changes_since(&self, since: i64) -> Option<Vec<(i64, StreamKey)>> {
        self.recent.read().changes_since(since)
    }

    fn any_change(&self, since: i64, upto: i64, pred: &mut dyn FnMut(&StreamKey) -> bool) -> Option<bool> {
        self.recent.read().any_change(since, upto, pred)
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    async fn create_user(&self, user: NewUser) -> Result<()> {
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "INSERT INTO users (user_id, password_hash, admin, created_ms) VALUES (?1,?2,?3,?4) \
                     ON CONFLICT (user_id) DO NOTHING",
                    params![user.user_id, user.password_hash, user.admin, user.created_ms as i64],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(Error::new(ErrorKind::UserInUse, "User ID already taken."));
            }
            Ok(())
        })
        .await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>> {
        let user_id = user_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE user_id = ?1"))?
                .query_row([user_id], user_row)
                .optional()
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        self.read(|c| {
            collect(
                c,
                &format!("SELECT {USER_COLS} FROM users ORDER BY user_id"),
                [],
                user_row,
            )
        })
        .await
    }

    async fn set_password_hash(&self, user_id: &str, hash: &str) -> Result<()> {
        let (u, h) = (user_id.to_owned(), hash.to_owned());
        self.write_wait(move |c, _| {
            c.execute("UPDATE users SET password_hash = ?1 WHERE user_id = ?2", params![h, u])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn deactivate_user(&self, user_id: &str) -> Result<()> {
        let u = user_id.to_owned();
        self.write_wait(move |c, ctx| {
            c.execute(
                "UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = ?1",
                [&u],
            )
            .map_err(db_err)?;
            purge_devices(c, ctx, &u, None, None).map_err(db_err)?;
            let crossed = c
                .execute("DELETE FROM cross_signing_keys WHERE user_id = ?1", [&u])
                .map_err(db_err)?;
            c.execute("DELETE FROM key_signatures WHERE target_user = ?1", [&u])
                .map_err(db_err)?;
            c.execute("DELETE FROM backup_keys WHERE user_id = ?1", [&u])
                .map_err(db_err)?;
            c.execute("UPDATE backup_versions SET deleted = 1 WHERE user_id = ?1", [&u])
                .map_err(db_err)?;
            c.execute("DELETE FROM pushers WHERE user_id = ?1", [&u])
                .map_err(db_err)?;
            if crossed > 0 {
                device_list_changed(c, ctx, &u).map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn set_profile_field(&self, user_id: &str, field: ProfileField, value: Option<String>) -> Result<()> {
        let u = user_id.to_owned();
        let col = match field {
            ProfileField::DisplayName => "displayname",
            ProfileField::AvatarUrl => "avatar_url",
        };
        self.write_wait(move |c, _| {
            c.execute(
                &format!("UPDATE users SET {col} = ?1 WHERE user_id = ?2"),
                params![value, u],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn upsert_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &[u8],
    ) -> Result<bool> {
        let (u, d, n, t) = (
            user_id.to_owned(),
            device_id.to_owned(),
            display_name.map(str::to_owned),
            token_hash.to_vec(),
        );
        self.write_wait(move |c, ctx| {
            let old: Option<Vec<u8>> = c
                .query_row(
                    "SELECT token_hash FROM devices WHERE user_id = ?1 AND device_id = ?2",
                    params![u, d],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?
                .flatten();
            c.execute(
                "INSERT INTO devices (user_id, device_id, display_name, token_hash, last_seen_ms) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT (user_id, device_id) DO UPDATE SET token_hash = excluded.token_hash, \
                 display_name = COALESCE(excluded.display_name, devices.display_name)",
                params![u, d, n, t, weft_core::now_ms() as i64],
            )
            .map_err(db_err)?;
            // The device's old token no longer holds.
            let replaced = old.is_some_and(|old| old != t);
            if replaced {
                ctx.announce(StreamKey::Revoked(u.to_owned()));
                remember_position(c, ctx.pos).map_err(db_err)?;
            }
            Ok(replaced)
        })
        .await
    }

    async fn lookup_token(&self, token_hash: &[u8]) -> Result<Option<TokenOwner>> {
        let t = token_hash.to_vec();
        self.read(move |c| {
            c.prepare_cached("SELECT user_id, device_id FROM devices WHERE token_hash = ?1")?
                .query_row([t], |r| {
                    Ok(TokenOwner {
                        user_id: r.get(0)?,
                        device_id: r.get(1)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT device_id, display_name, last_seen_ms, last_seen_ip FROM devices WHERE user_id = ?1 \
                 ORDER BY device_id",
                [u],
                |r| {
                    Ok(DeviceRecord {
                        device_id: r.get(0)?,
                        display_name: r.get(1)?,
                        last_seen_ms: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                        last_seen_ip: r.get(3)?,
                    })
                },
            )
        })
        .await
    }

    async fn touch_device(&self, user_id: &str, device_id: &str, ip: Option<&str>, ts_ms: u64) -> Result<()> {
        let (u, d, i) = (user_id.to_owned(), device_id.to_owned(), ip.map(str::to_owned));
        self.write_wait(move |c, _| {
            c.execute(
                "UPDATE devices SET last_seen_ms = ?3, last_seen_ip = COALESCE(?4, last_seen_ip) \
                 WHERE user_id = ?1 AND device_id = ?2",
                params![u, d, ts_ms as i64, i],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn set_device_display_name(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<bool> {
        let (u, d, n) = (
            user_id.to_owned(),
            device_id.to_owned(),
            display_name.map(str::to_owned),
        );
        self.write_wait(move |c, ctx| {
            let changed = c
                .execute(
                    "UPDATE devices SET display_name = ?3 WHERE user_id = ?1 AND device_id = ?2",
                    params![u, d, n],
                )
                .map_err(db_err)?;
            if changed == 0 {
                return Ok(false);
            }
            let has_keys: bool = c
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM device_keys WHERE user_id = ?1 AND device_id = ?2)",
                    params![u, d],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if has_keys {
                let p = device_list_changed(c, ctx, &u).map_err(db_err)?;
                log_device_change(c, &u, &d, p, false).map_err(db_err)?;
            }
            Ok(true)
        })
        .await
    }

    async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<()> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        self.write_wait(move |c, ctx| purge_devices(c, ctx, &u, Some(&d), None).map_err(db_err))
            .await
    }

    async fn delete_devices_except(&self, user_id: &str, keep: Option<&str>) -> Result<()> {
        let (u, k) = (user_id.to_owned(), keep.map(str::to_owned));
        self.write_wait(move |c, ctx| purge_devices(c, ctx, &u, None, k.as_deref()).map_err(db_err))
            .await
    }

    async fn set_device_psk(&self, user_id: &str, device_id: &str, identity: &str, psk: &[u8]) -> Result<()> {
        let (u, d, i, k) = (
            user_id.to_owned(),
            device_id.to_owned(),
            identity.to_owned(),
            psk.to_vec(),
        );
        self.write_wait(move |c, ctx| {
            let active: Option<bool> = c
                .query_row("SELECT deactivated FROM users WHERE user_id = ?1", [&u], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            if active != Some(false) {
                return Err(Error::new(ErrorKind::NotFound, "No such active user"));
            }
            c.execute(
                "INSERT INTO devices (user_id, device_id, last_seen_ms) VALUES (?1,?2,?3) \
                 ON CONFLICT (user_id, device_id) DO NOTHING",
                params![u, d, weft_core::now_ms() as i64],
            )
            .map_err(db_err)?;
            c.execute(
                "INSERT INTO device_psks (identity, user_id, device_id, psk, created_ms) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT (user_id, device_id) DO UPDATE SET identity = excluded.identity, psk = excluded.psk, \
                 created_ms = excluded.created_ms",
                params![i, u, d, k, weft_core::now_ms() as i64],
            )
            .map_err(db_err)?;
            // The device's old key no longer holds.
            ctx.announce(StreamKey::Revoked(u.to_owned()));
            remember_position(c, ctx.pos).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn create_backup_version(&self, user_id: &str, algorithm_json: &str) -> Result<i64> {
        let (u, a) = (user_id.to_owned(), algorithm_json.to_owned());
        self.write_wait(move |c, _| {
            // Versions are never reused, deleted ones included.
            let next: i64 = c
                .query_row(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM backup_versions WHERE user_id = ?1",
                    [&u],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            c.execute(
                "INSERT INTO backup_versions (user_id, version, algorithm_json) VALUES (?1,?2,?3)",
                params![u, next, a],
            )
            .map_err(db_err)?;
            Ok(next)
        })
        .await
    }

    async fn backup_version(&self, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            let row = match version {
                Some(v) => c
                    .prepare_cached(
                        "SELECT version, algorithm_json, etag FROM backup_versions \
                         WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                    )?
                    .query_row(params![u, v], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?,
                None => current_backup(c, &u)?,
            };
            let Some((version, algorithm_json, etag)) = row else {
                return Ok(None);
            };
            let count = backup_count(c, &u, version)?;
            Ok(Some(BackupVersion {
                version,
                algorithm_json,
                etag,
                count,
            }))
        })
        .await
    }

    async fn update_backup_version(&self, user_id: &str, version: i64, algorithm_json: &str) -> Result<bool> {
        let (u, a) = (user_id.to_owned(), algorithm_json.to_owned());
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "UPDATE backup_versions SET algorithm_json = ?3 \
                     WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                    params![u, version, a],
                )
                .map_err(db_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool> {
        let u = user_id.to_owned();
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "UPDATE backup_versions SET deleted = 1 WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                    params![u, version],
                )
                .map_err(db_err)?;
            c.execute(
                "DELETE FROM backup_keys WHERE user_id = ?1 AND version = ?2",
                params![u, version],
            )
            .map_err(db_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn put_backup_keys(&self, user_id: &str, version: i64, keys: Vec<BackupKey>) -> Result<BackupWrite> {
        let u = user_id.to_owned();
        self.write_wait(move |c, _| {
            let current = current_backup(c, &u).map_err(db_err)?;
            let etag = match current {
                Some((v, _, etag)) if v == version => etag,
                other => {
                    return Ok(BackupWrite::WrongVersion {
                        current: other.map(|(v, _, _)| v),
                    });
                }
            };
            let mut changed = false;
            for k in &keys {
                // Kept only if better than the stored copy: verified first,
                // then the lower first message index, then fewer forwards.
                let n = c
                    .prepare_cached(
                        "INSERT INTO backup_keys (user_id, version, room_id, session_id, first_message_index, \
                         forwarded_count, is_verified, key_json) VALUES (?1,?2,?3,?4,?5,?6,?7,?8) \
                         ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET \
                         first_message_index = excluded.first_message_index, \
                         forwarded_count = excluded.forwarded_count, \
                         is_verified = excluded.is_verified, key_json = excluded.key_json \
                         WHERE (excluded.is_verified, -excluded.first_message_index, -excluded.forwarded_count) \
                         > (backup_keys.is_verified, -backup_keys.first_message_index, -backup_keys.forwarded_count)",
                    )
                    .and_then(|mut st| {
                        st.execute(params![
                            u,
                            version,
                            k.room_id,
                            k.session_id,
                            k.first_message_index,
                            k.forwarded_count,
                            k.is_verified,
                            k.key_json
                        ])
                    })
                    .map_err(db_err)?;
                changed |= n > 0;
            }
            let etag = if changed {
                bump_backup_etag(c, &u, version)?
            } else {
                etag
            };
            let count = backup_count(c, &u, version).map_err(db_err)?;
            Ok(BackupWrite::Done { etag, count })
        })
        .await
    }

    async fn backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<Vec<BackupKey>> {
        let (u, r, sid) = (
            user_id.to_owned(),
            room_id.map(str::to_owned),
            session_id.map(str::to_owned),
        );
        self.read(move |c| {
            collect(
                c,
                "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, key_json \
                 FROM backup_keys WHERE user_id = ?1 AND version = ?2 \
                 AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4) \
                 ORDER BY room_id, session_id",
                params![u, version, r, sid],
                |row| {
                    Ok(BackupKey {
                        room_id: row.get(0)?,
                        session_id: row.get(1)?,
                        first_message_index: row.get(2)?,
                        forwarded_count: row.get(3)?,
                        is_verified: row.get(4)?,
                        key_json: row.get(5)?,
                    })
                },
            )
        })
        .await
    }

    async fn delete_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<BackupWrite> {
        let (u, r, sid) = (
            user_id.to_owned(),
            room_id.map(str::to_owned),
            session_id.map(str::to_owned),
        );
        self.write_wait(move |c, _| {
            let current = current_backup(c, &u).map_err(db_err)?;
            let etag = match current {
                Some((v, _, etag)) if v == version => etag,
                other => {
                    return Ok(BackupWrite::WrongVersion {
                        current: other.map(|(v, _, _)| v),
                    });
                }
            };
            let n = c
                .execute(
                    "DELETE FROM backup_keys WHERE user_id = ?1 AND version = ?2 \
                     AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)",
                    params![u, version, r, sid],
                )
                .map_err(db_err)?;
            let etag = if n > 0 { bump_backup_etag(c, &u, version)? } else { etag };
            let count = backup_count(c, &u, version).map_err(db_err)?;
            Ok(BackupWrite::Done { etag, count })
        })
        .await
    }

    async fn lookup_psk(&self, identity: &str) -> Result<Option<PskOwner>> {
        let i = identity.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT p.user_id, p.device_id, p.psk FROM device_psks p \
                 JOIN devices d ON d.user_id = p.user_id AND d.device_id = p.device_id \
                 JOIN users u ON u.user_id = p.user_id \
                 WHERE p.identity = ?1 AND u.deactivated = 0",
            )?
            .query_row([i], |r| {
                Ok(PskOwner {
                    user_id: r.get(0)?,
                    device_id: r.get(1)?,
                    psk: r.get(2)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn upload_keys(&self, user_id: &str, device_id: &str, upload: KeyUpload) -> Result<BTreeMap<String, u64>> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        self.write_wait(move |c, ctx| store_keys(c, ctx, &u, &d, upload)).await
    }

    async fn get_device_keys(&self, user_id: &str, device_ids: &[String]) -> Result<Vec<DeviceKeysRecord>> {
        let u = user_id.to_owned();
        let wanted = device_ids.to_vec();
        self.read(move |c| {
            let all = collect(
                c,
                "SELECT k.device_id, k.keys_json, d.display_name FROM device_keys k \
                 LEFT JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id \
                 WHERE k.user_id = ?1 ORDER BY k.device_id",
                [&u],
                |r| {
                    Ok(DeviceKeysRecord {
                        user_id: u.clone(),
                        device_id: r.get(0)?,
                        keys_json: r.get(1)?,
                        display_name: r.get(2)?,
                    })
                },
            )?;
            Ok(all
                .into_iter()
                .filter(|k| wanted.is_empty() || wanted.contains(&k.device_id))
                .collect())
        })
        .await
    }

    async fn one_time_key_counts(&self, user_id: &str, device_id: &str) -> Result<BTreeMap<String, u64>> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        self.read(move |c| otk_counts(c, &u, &d)).await
    }

    async fn unused_fallback_key_types(&self, user_id: &str, device_id: &str) -> Result<Vec<String>> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        self.read(move |c| {
            collect(
                c,
                "SELECT algorithm FROM fallback_keys WHERE user_id = ?1 AND device_id = ?2 AND used = 0 \
                 ORDER BY algorithm",
                params![u, d],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn claim_keys(&self, wanted: Vec<(String, String, String)>) -> Result<Vec<ClaimedKey>> {
        self.write_wait(move |c, _| {
            let mut out = Vec::new();
            for (user_id, device_id, alg) in wanted {
                if let Some((key_id, key_json)) = claim_one(c, &user_id, &device_id, &alg).map_err(db_err)? {
                    out.push(ClaimedKey {
                        user_id,
                        device_id,
                        key_id,
                        key_json,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn device_list_changes(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT ch.user_id FROM device_list_changes ch \
                 WHERE ch.position > ?2 AND ch.position <= ?3 AND (ch.user_id = ?1 OR EXISTS ( \
                   SELECT 1 FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                   WHERE a.user_id = ?1 AND a.membership = 'join' AND b.user_id = ch.user_id \
                   AND b.membership = 'join')) \
                 UNION \
                 SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = ?1 AND a.membership = 'join' AND b.membership = 'join' AND b.user_id != ?1 \
                 AND ((b.position > ?2 AND b.position <= ?3) OR (a.position > ?2 AND a.position <= ?3)) \
                 ORDER BY 1",
                params![u, since, upto],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn device_list_left(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                // Others who left a room I am in, and members of rooms I
                // left, minus everyone still sharing a joined room with me.
                "SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = ?1 AND a.membership = 'join' AND b.user_id != ?1 \
                 AND b.membership IN ('leave', 'ban') AND b.position > ?2 AND b.position <= ?3 \
                 UNION \
                 SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = ?1 AND a.membership IN ('leave', 'ban') AND a.position > ?2 \
                 AND a.position <= ?3 AND b.user_id != ?1 AND b.membership = 'join' \
                 EXCEPT \
                 SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = ?1 AND a.membership = 'join' AND b.membership = 'join' \
                 ORDER BY 1",
                params![u, since, upto],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn send_to_device(
        &self,
        sender: &str,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: Vec<NewToDevice>,
    ) -> Result<bool> {
        let (s, sd, t, x) = (
            sender.to_owned(),
            sender_device.to_owned(),
            event_type.to_owned(),
            txn_id.to_owned(),
        );
        self.write_wait(move |c, ctx| {
            let inner = |ctx: &mut WriterCtx| -> rusqlite::Result<bool> {
                let fresh = c
                    .prepare_cached(
                        "INSERT INTO to_device_txns (user_id, device_id, event_type, txn_id) VALUES (?1,?2,?3,?4) \
                         ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![s, sd, t, x])?;
                if fresh == 0 {
                    return Ok(false);
                }
                for m in messages {
                    let devices: Vec<String> = match &m.target {
                        DeviceTarget::One(d) => collect(
                            c,
                            "SELECT device_id FROM devices WHERE user_id = ?1 AND device_id = ?2",
                            params![m.user_id, d],
                            |r| r.get(0),
                        )?,
                        DeviceTarget::All => collect(
                            c,
                            "SELECT device_id FROM devices WHERE user_id = ?1 ORDER BY device_id",
                            [&m.user_id],
                            |r| r.get(0),
                        )?,
                    };
                    for d in devices {
                        let p = ctx.pos + 1;
                        c.prepare_cached(
                            "INSERT INTO to_device (position, user_id, device_id, sender, event_type, content_json) \
                             VALUES (?1,?2,?3,?4,?5,?6)",
                        )?
                        .execute(params![p, m.user_id, d, s, t, m.content_json])?;
                        ctx.pos = p;
                        ctx.changes.push((p, StreamKey::User(m.user_id.clone())));
                    }
                }
                Ok(true)
            };
            inner(ctx).map_err(db_err)
        })
        .await
    }

    async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<ToDeviceMessage>> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        let limit = limit as i64;
        self.read(move |c| {
            collect(
                c,
                "SELECT position, sender, event_type, content_json FROM to_device \
                 WHERE user_id = ?1 AND device_id = ?2 AND position > ?3 AND position <= ?4 \
                 ORDER BY position LIMIT ?5",
                params![u, d, after, upto, limit],
                |r| {
                    Ok(ToDeviceMessage {
                        position: r.get(0)?,
                        sender: r.get(1)?,
                        event_type: r.get(2)?,
                        content_json: r.get(3)?,
                    })
                },
            )
        })
        .await
    }

    async fn ack_to_device(&self, user_id: &str, device_id: &str, upto: i64) -> Result<()> {
        const ACKED: &str = "user_id = ?1 AND device_id = ?2 AND position <= ?3";
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        // Most syncs acknowledge nothing: look before queueing a write.
        let (u2, d2) = (u.clone(), d.clone());
        let any = self
            .read(move |c| {
                c.prepare_cached(&format!("SELECT 1 FROM to_device WHERE {ACKED} LIMIT 1"))?
                    .query_row(params![u2, d2, upto], |_| Ok(()))
                    .optional()
            })
            .await?;
        if any.is_none() {
            return Ok(());
        }
        self.write_wait(move |c, _| delete_to_device(c, ACKED, params![u, d, upto]).map_err(db_err))
            .await
    }

    async fn put_cross_signing_keys(&self, user_id: &str, keys: Vec<(String, String)>) -> Result<()> {
        let u = user_id.to_owned();
        self.write_wait(move |c, ctx| {
            let mut changed = false;
            for (key_type, json) in keys {
                let n = c
                    .prepare_cached(
                        "INSERT INTO cross_signing_keys (user_id, key_type, key_json) VALUES (?1,?2,?3) \
                         ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = excluded.key_json \
                         WHERE cross_signing_keys.key_json != excluded.key_json",
                    )
                    .and_then(|mut s| s.execute(params![u, key_type, json]))
                    .map_err(db_err)?;
                changed |= n > 0;
            }
            if changed {
                device_list_changed(c, ctx, &u).map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn get_cross_signing_keys(&self, user_id: &str) -> Result<Vec<(String, String)>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT key_type, key_json FROM cross_signing_keys WHERE user_id = ?1 ORDER BY key_type",
                [u],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }

    async fn add_key_signatures(&self, signatures: Vec<KeySignature>) -> Result<()> {
        self.write_wait(move |c, ctx| {
            let mut targets = std::collections::BTreeSet::new();
            for sig in signatures {
                c.prepare_cached(
                    "INSERT INTO key_signatures (target_user, target_key, signer_user, signer_key, signature) \
                     VALUES (?1,?2,?3,?4,?5) ON CONFLICT (target_user, target_key, signer_user, signer_key) \
                     DO UPDATE SET signature = excluded.signature",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        sig.target_user,
                        sig.target_key,
                        sig.signer_user,
                        sig.signer_key,
                        sig.signature
                    ])
                })
                .map_err(db_err)?;
                targets.insert((sig.target_user, sig.target_key));
            }
            let users: std::collections::BTreeSet<&String> = targets.iter().map(|(u, _)| u).collect();
            for user in users {
                let p = device_list_changed(c, ctx, user).map_err(db_err)?;
                for (_, key) in targets.iter().filter(|(u, _)| u == user) {
                    let is_device: bool = c
                        .query_row(
                            "SELECT EXISTS (SELECT 1 FROM device_keys WHERE user_id = ?1 AND device_id = ?2)",
                            params![user, key],
                            |r| r.get(0),
                        )
                        .map_err(db_err)?;
                    if is_device {
                        log_device_change(c, user, key, p, false).map_err(db_err)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn key_signatures(&self, user_id: &str) -> Result<Vec<KeySignature>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT target_user, target_key, signer_user, signer_key, signature FROM key_signatures \
                 WHERE target_user = ?1 ORDER BY target_key, signer_user, signer_key",
                [u],
                |r| {
                    Ok(KeySignature {
                        target_user: r.get(0)?,
                        target_key: r.get(1)?,
                        signer_user: r.get(2)?,
                        signer_key: r.get(3)?,
                        signature: r.get(4)?,
                    })
                },
            )
        })
        .await
    }

    async fn put_filter(&self, user_id: &str, filter_json: &str) -> Result<String> {
        let (u, f) = (user_id.to_owned(), filter_json.to_owned());
        self.write_wait(move |c, _| {
            let id: i64 = c
                .query_row(
                    "INSERT INTO filters (user_id, filter_id, filter_json) VALUES (?1, \
                     (SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = ?1), ?2) RETURNING filter_id",
                    params![u, f],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            Ok(id.to_string())
        })
        .await
    }

    async fn get_filter(&self, user_id: &str, filter_id: &str) -> Result<Option<String>> {
        let Ok(id) = filter_id.parse::<i64>() else {
            return Ok(None);
        };
        let u = user_id.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT filter_json FROM filters WHERE user_id = ?1 AND filter_id = ?2")?
                .query_row(params![u, id], |r| r.get(0))
                .optional()
        })
        .await
    }

    fn put_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content_json: &str,
    ) -> Pending<i64> {
        let (u, r, t, j) = (
            user_id.to_owned(),
            room_id.unwrap_or("").to_owned(),
            data_type.to_owned(),
            content_json.to_owned(),
        );
        self.write(move |c, ctx| upsert_account_data(c, ctx, u, &r, &t, &j))
    }

    fn edit_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        edit: AccountDataEdit,
    ) -> Pending<i64> {
        let (u, r, t) = (
            user_id.to_owned(),
            room_id.unwrap_or("").to_owned(),
            data_type.to_owned(),
        );
        self.write(move |c, ctx| {
            // Read on the writer's connection, inside its transaction: no
            // other write (of this process or another) comes in between.
            let old: Option<String> = c
                .prepare_cached(
                    "SELECT content_json FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND data_type = ?3",
                )
                .and_then(|mut s| s.query_row(params![u, r, t], |row| row.get(0)).optional())
                .map_err(db_err)?;
            // A panicking edit must not take the writer (and every later
            // write) down with it.
            let new = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || edit(old)))
                .map_err(|_| Error::internal("account data edit panicked"))??;
            upsert_account_data(c, ctx, u, &r, &t, &new)
        })
    }

    async fn get_account_data(&self, user_id: &str, room_id: Option<&str>, data_type: &str) -> Result<Option<String>> {
        let (u, r, t) = (
            user_id.to_owned(),
            room_id.unwrap_or("").to_owned(),
            data_type.to_owned(),
        );
        self.read(move |c| {
            c.prepare_cached(
                "SELECT content_json FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND data_type = ?3",
            )?
            .query_row(params![u, r, t], |r| r.get(0))
            .optional()
        })
        .await
    }

    async fn account_data_since(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<AccountDataRecord>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT room_id, data_type, content_json, position FROM account_data \
                 WHERE user_id = ?1 AND position > ?2 AND position <= ?3 ORDER BY position",
                params![u, since, upto],
                |r| {
                    let room: String = r.get(0)?;
                    Ok(AccountDataRecord {
                        room_id: (!room.is_empty()).then_some(room),
                        data_type: r.get(1)?,
                        content_json: r.get(2)?,
                        position: r.get(3)?,
                    })
                },
            )
        })
        .await
    }

    fn put_receipt(&self, r: ReceiptRecord) -> Pending<i64> {
        self.write(move |c, ctx| {
            let p = ctx.pos + 1;
            c.prepare_cached(
                "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, ts, position) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7) \
                 ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET \
                 event_id = excluded.event_id, ts = excluded.ts, position = excluded.position",
            )
            .and_then(|mut s| {
                s.execute(params![
                    r.room_id,
                    r.receipt_type,
                    r.user_id,
                    r.thread_id,
                    r.event_id,
                    r.ts as i64,
                    p
                ])
            })
            .map_err(db_err)?;
            ctx.pos = p;
            ctx.changes.push((p, StreamKey::Receipt(r.room_id)));
            Ok(p)
        })
    }

    async fn receipts_since(&self, room_id: &str, since: i64, upto: i64) -> Result<Vec<ReceiptRecord>> {
        let room = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT room_id, receipt_type, user_id, thread_id, event_id, ts, position FROM receipts \
                 WHERE room_id = ?1 AND position > ?2 AND position <= ?3 ORDER BY position",
                params![room, since, upto],
                |r| {
                    Ok(ReceiptRecord {
                        room_id: r.get(0)?,
                        receipt_type: r.get(1)?,
                        user_id: r.get(2)?,
                        thread_id: r.get(3)?,
                        event_id: r.get(4)?,
                        ts: r.get::<_, i64>(5)?.max(0) as u64,
                        position: r.get(6)?,
                    })
                },
            )
        })
        .await
    }

    fn add_notifications(&self, rows: Vec<NewNotification>, evaluated: i64) -> Pending<()> {
        if !self.push_mark.must_write(!rows.is_empty()) {
            return crate::stream::done(());
        }
        self.write(move |c, ctx| {
            for n in rows {
                let p = ctx.pos + 1;
                c.prepare_cached(
                    "INSERT INTO notifications (position, user_id, room_id, event_id, event_position, thread_id, \
                     actions_json, highlight, ts) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        p,
                        n.user_id,
                        n.room_id,
                        n.event_id,
                        n.event_position,
                        n.thread_id,
                        n.actions_json,
                        n.highlight as i64,
                        n.ts as i64
                    ])
                })
                .map_err(db_err)?;
                ctx.pos = p;
                ctx.changes.push((p, StreamKey::Notification(n.user_id, n.room_id)));
            }
            c.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('push_evaluated', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute([evaluated.to_string()]))
            .map_err(db_err)?;
            Ok(())
        })
    }

    async fn unread_counts(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<UnreadCount>> {
        let (u, room) = (user_id.to_owned(), room_id.map(str::to_owned));
        self.read(move |c| {
            let rooms = match room {
                Some(r) => vec![r],
                None => collect(
                    c,
                    "SELECT DISTINCT room_id FROM notifications WHERE user_id = ?1",
                    params![u],
                    |r| r.get(0),
                )?,
            };
            let mut out = Vec::new();
            for room in rooms {
                let read = read_positions(c, &u, &room)?;
                let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                let mut st = c.prepare_cached(
                    "SELECT thread_id, event_position, highlight FROM notifications \
                     WHERE user_id = ?1 AND room_id = ?2 AND event_position > ?3 AND thread_id != ''",
                )?;
                let rows = st.query_map(params![u, room, read.0], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)? != 0))
                })?;
                for row in rows {
                    let (thread, pos, highlight) = row?;
                    if is_read(&read, &thread, pos) {
                        continue;
                    }
                    let slot = counts.entry(thread).or_default();
                    slot.0 += 1;
                    slot.1 += highlight as u64;
                }
                out.extend(counts.into_iter().map(|(thread_id, (n, h))| UnreadCount {
                    room_id: room.clone(),
                    thread_id,
                    notifications: n,
                    highlights: h,
                }));
            }
            Ok(out)
        })
        .await
    }

    async fn notifications(
        &self,
        user_id: &str,
        before: Option<i64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<Vec<NotificationRecord>> {
        let u = user_id.to_owned();
        let before = before.unwrap_or(i64::MAX);
        self.read(move |c| {
            let sql = format!(
                "SELECT {NOTIFICATION_COLS} FROM notifications WHERE user_id = ?1 AND position < ?2 \
                 AND (?3 = 0 OR highlight = 1) ORDER BY position DESC LIMIT ?4"
            );
            let mut rows = collect(
                c,
                &sql,
                params![u, before, only_highlight as i64, limit as i64],
                notification_row,
            )?;
            let mut reads: HashMap<String, (i64, HashMap<String, i64>)> = HashMap::new();
            for n in &mut rows {
                if !reads.contains_key(&n.room_id) {
                    reads.insert(n.room_id.clone(), read_positions(c, &u, &n.room_id)?);
                }
                if let Some(read) = reads.get(&n.room_id) {
                    n.read = is_read(read, &n.thread_id, n.event_position);
                }
            }
            Ok(rows)
        })
        .await
    }

    async fn notifications_after(&self, user_id: &str, after: i64, limit: usize) -> Result<Vec<NotificationRecord>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            let sql = format!(
                "SELECT {NOTIFICATION_COLS} FROM notifications WHERE user_id = ?1 AND position > ?2 \
                 ORDER BY position LIMIT ?3"
            );
            collect(c, &sql, params![u, after, limit as i64], notification_row)
        })
        .await
    }

    async fn set_pusher(&self, p: PusherRecord, append: bool) -> Result<()> {
        self.write_wait(move |c, ctx| {
            if !append {
                c.execute(
                    "DELETE FROM pushers WHERE app_id = ?1 AND pushkey = ?2 AND user_id != ?3",
                    params![p.app_id, p.pushkey, p.user_id],
                )
                .map_err(db_err)?;
            }
            // A new pusher starts after the newest notification; a
            // replaced one keeps its place.
            c.execute(
                "INSERT INTO pushers (user_id, app_id, pushkey, pusher_json, pushkey_ts, last_sent, from_event) \
                 VALUES (?1, ?2, ?3, ?4, ?5, (SELECT COALESCE(MAX(position), 0) FROM notifications), ?6) \
                 ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET pusher_json = excluded.pusher_json, \
                 pushkey_ts = excluded.pushkey_ts",
                params![
                    p.user_id,
                    p.app_id,
                    p.pushkey,
                    p.pusher_json,
                    p.pushkey_ts as i64,
                    ctx.pos
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn delete_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
        let (u, a, k) = (user_id.to_owned(), app_id.to_owned(), pushkey.to_owned());
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "DELETE FROM pushers WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3",
                    params![u, a, k],
                )
                .map_err(db_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn pushers(&self, user_id: Option<&str>) -> Result<Vec<PusherRecord>> {
        let u = user_id.map(str::to_owned);
        self.read(move |c| {
            collect(
                c,
                "SELECT user_id, app_id, pushkey, pusher_json, pushkey_ts, last_sent, from_event FROM pushers \
                 WHERE ?1 IS NULL OR user_id = ?1 ORDER BY user_id, app_id, pushkey",
                params![u],
                pusher_row,
            )
        })
        .await
    }

    async fn pusher_sent(&self, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<()> {
        let (u, a, k) = (user_id.to_owned(), app_id.to_owned(), pushkey.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "UPDATE pushers SET last_sent = MAX(last_sent, ?4) WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3",
                params![u, a, k, position],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn events_after(&self, after: i64, upto: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        // The stream's followers (push evaluator, federation queue) read
        // just after each commit: from the in-memory tail, no query.
        if let Some(events) = self.recent.read().events_after(after, upto, limit) {
            return Ok(events);
        }
        self.read(move |c| {
            let sql = format!(
                "SELECT {EVENT_COLS} FROM events e WHERE e.position > ?1 AND e.position <= ?2 \
                 ORDER BY e.position LIMIT ?3"
            );
            collect(c, &sql, params![after, upto, limit as i64], event_row)
        })
        .await
    }

    fn set_typing(&self, room_id: &str, user_id: &str, expires_ms: Option<u64>) -> Pending<Option<i64>> {
        let (room, user) = (room_id.to_owned(), user_id.to_owned());
        self.write(move |c, ctx| {
            let now = weft_core::now_ms() as i64;
            // A row past its expiry no longer counts as typing, but its
            // removal (here or by the expiry task) is still a change.
            let row: Option<bool> = c
                .prepare_cached("SELECT expires_ms > ?3 FROM typing WHERE room_id = ?1 AND user_id = ?2")
                .and_then(|mut s| s.query_row(params![room, user, now], |r| r.get(0)).optional())
                .map_err(db_err)?;
            match expires_ms {
                Some(until) => {
                    c.prepare_cached(
                        "INSERT INTO typing (room_id, user_id, expires_ms) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (room_id, user_id) DO UPDATE SET expires_ms = excluded.expires_ms",
                    )
                    .and_then(|mut s| s.execute(params![room, user, until as i64]))
                    .map_err(db_err)?;
                    if row == Some(true) {
                        return Ok(None);
                    }
                }
                None => {
                    c.prepare_cached("DELETE FROM typing WHERE room_id = ?1 AND user_id = ?2")
                        .and_then(|mut s| s.execute(params![room, user]))
                        .map_err(db_err)?;
                    if row.is_none() {
                        return Ok(None);
                    }
                }
            }
            let p = ctx.pos + 1;
            ctx.pos = p;
            typing_changed(c, ctx, &room, p).map_err(db_err)?;
            Ok(Some(p))
        })
    }

    async fn typing(&self, room_id: &str, now_ms: u64) -> Result<(Vec<String>, i64)> {
        let room = room_id.to_owned();
        self.read(move |c| {
            let users = collect(
                c,
                "SELECT user_id FROM typing WHERE room_id = ?1 AND expires_ms > ?2 ORDER BY rowid",
                params![room, now_ms as i64],
                |r| r.get(0),
            )?;
            let position: Option<i64> = c
                .prepare_cached("SELECT position FROM typing_rooms WHERE room_id = ?1")?
                .query_row([&room], |r| r.get(0))
                .optional()?;
            Ok((users, position.unwrap_or(0)))
        })
        .await
    }

    fn expire_typing(&self, now_ms: u64) -> Pending<Vec<String>> {
        self.write(move |c, ctx| {
            let rooms: Vec<String> = collect(
                c,
                "SELECT DISTINCT room_id FROM typing WHERE expires_ms <= ?1 ORDER BY room_id",
                [now_ms as i64],
                |r| r.get(0),
            )
            .map_err(db_err)?;
            c.prepare_cached("DELETE FROM typing WHERE expires_ms <= ?1")
                .and_then(|mut s| s.execute([now_ms as i64]))
                .map_err(db_err)?;
            for room in &rooms {
                let p = ctx.pos + 1;
                ctx.pos = p;
                typing_changed(c, ctx, room, p).map_err(db_err)?;
            }
            Ok(rooms)
        })
    }

    async fn presence(&self, user_id: &str) -> Result<Option<PresenceRecord>> {
        let user = user_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {PRESENCE_COLUMNS} FROM presence WHERE user_id = ?1"))?
                .query_row([user], presence_row)
                .optional()
        })
        .await
    }

    fn edit_presence(&self, user_id: &str, edit: PresenceEdit) -> Pending<Option<i64>> {
        let user = user_id.to_owned();
        self.write(move |c, ctx| {
            let old = c
                .prepare_cached(&format!("SELECT {PRESENCE_COLUMNS} FROM presence WHERE user_id = ?1"))
                .and_then(|mut s| s.query_row([&user], presence_row).optional())
                .map_err(db_err)?;
            let old_position = old.as_ref().map(|o| o.position).unwrap_or(0);
            let edited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || edit(old)))
                .map_err(|_| Error::internal("presence edit panicked"))?;
            let Some((new, bump)) = edited else { return Ok(None) };
            let position = if bump { ctx.pos + 1 } else { old_position };
            c.prepare_cached(
                "INSERT INTO presence (user_id, presence, status_msg, last_active_ms, online_until_ms, position) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (user_id) DO UPDATE SET \
                 presence = excluded.presence, status_msg = excluded.status_msg, \
                 last_active_ms = excluded.last_active_ms, online_until_ms = excluded.online_until_ms, \
                 position = excluded.position",
            )
            .and_then(|mut s| {
                s.execute(params![
                    user,
                    new.presence,
                    new.status_msg,
                    new.last_active_ms as i64,
                    new.online_until_ms as i64,
                    position
                ])
            })
            .map_err(db_err)?;
            if !bump {
                return Ok(None);
            }
            ctx.pos = position;
            ctx.changes.push((position, StreamKey::Presence(user)));
            Ok(Some(position))
        })
    }

    async fn presence_since(&self, viewer: &str, since: i64, upto: i64) -> Result<Vec<PresenceRecord>> {
        let viewer = viewer.to_owned();
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {PRESENCE_COLUMNS} FROM presence p WHERE position > ?2 AND position <= ?3 \
                     AND (user_id = ?1 OR EXISTS (SELECT 1 FROM memberships a JOIN memberships b \
                     ON a.room_id = b.room_id WHERE a.user_id = ?1 AND a.membership = 'join' \
                     AND b.user_id = p.user_id AND b.membership = 'join')) ORDER BY position"
                ),
                params![viewer, since, upto],
                presence_row,
            )
        })
        .await
    }

    async fn share_room(&self, a: &str, b: &str) -> Result<bool> {
        let (a, b) = (a.to_owned(), b.to_owned());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM memberships x JOIN memberships y ON x.room_id = y.room_id \
                 WHERE x.user_id = ?1 AND x.membership = 'join' AND y.user_id = ?2 AND y.membership = 'join')",
            )?
            .query_row(params![a, b], |r| r.get(0))
        })
        .await
    }

    fn expire_presence(&self, now_ms: u64, idle_ms: u64) -> Pending<Vec<String>> {
        self.write(move |c, ctx| {
            let now = now_ms as i64;
            let idle = idle_ms as i64;
            // Offline first: a user both idle and gone is just gone.
            let due: Vec<(String, &'static str)> = collect(
                c,
                "SELECT user_id, CASE WHEN online_until_ms > 0 AND online_until_ms <= ?1 THEN 1 ELSE 0 END \
                 FROM presence WHERE presence != 'offline' AND ((online_until_ms > 0 AND online_until_ms <= ?1) \
                 OR (presence = 'online' AND last_active_ms + ?2 <= ?1)) ORDER BY user_id",
                params![now, idle],
                |r| {
                    Ok((
                        r.get(0)?,
                        if r.get::<_, i64>(1)? == 1 {
                            "offline"
                        } else {
                            "unavailable"
                        },
                    ))
                },
            )
            .map_err(db_err)?;
            let mut changed = Vec::new();
            for (user, state) in due {
                let p = ctx.pos + 1;
                c.prepare_cached(
                    "UPDATE presence SET presence = ?2, position = ?3, \
                     online_until_ms = CASE WHEN ?2 = 'offline' THEN 0 ELSE online_until_ms END WHERE user_id = ?1",
                )
                .and_then(|mut s| s.execute(params![user, state, p]))
                .map_err(db_err)?;
                ctx.pos = p;
                ctx.changes.push((p, StreamKey::Presence(user.clone())));
                changed.push(user);
            }
            Ok(changed)
        })
    }

    async fn next_ephemeral_deadline(&self, idle_ms: Option<u64>) -> Result<Option<u64>> {
        self.read(move |c| {
            let typing: Option<i64> = c
                .prepare_cached("SELECT MIN(expires_ms) FROM typing")?
                .query_row([], |r| r.get(0))?;
            let mut due = typing;
            if let Some(idle_ms) = idle_ms {
                let gone: Option<i64> = c
                    .prepare_cached(
                        "SELECT MIN(online_until_ms) FROM presence WHERE presence != 'offline' AND online_until_ms > 0",
                    )?
                    .query_row([], |r| r.get(0))?;
                let idle: Option<i64> = c
                    .prepare_cached("SELECT MIN(last_active_ms) + ?1 FROM presence WHERE presence = 'online'")?
                    .query_row([idle_ms as i64], |r| r.get(0))?;
                due = [due, gone, idle].into_iter().flatten().min();
            }
            Ok(due.map(|t| t.max(0) as u64))
        })
        .await
    }

    fn persist_event(&self, event: NewEvent) -> Pending<i64> {
        self.write(move |c, ctx| {
            let mut event = event;
            // A local event built on one whose write failed is refused:
            // no stored event points at a parent that is not stored.
            // A local event built on exactly the room's forward extremities
            // (the one of a linear room) moves them on in one statement;
            // those are stored events, so its prev events are stored.
            let mut advanced = event.builds_on_all_expected() && graph::advance_linear(c, &event).map_err(db_err)?;
            // Built on a view of the room that is not the stored one (see
            // `NewEvent::expect_extremities`): refused, to be rebuilt,
            // unless only messages moved the room ([`Rebase`]).
            if !advanced && event.expect_extremities.is_some() {
                let stored = graph::stored_extremities(c, &event.room_id).map_err(db_err)?;
                if !event.extremities_match(stored.as_deref()) {
                    match graph::rebased(c, &event).map_err(db_err)? {
                        Some(again) => event = again,
                        None => return Err(event.room_moved()),
                    }
                    advanced = event.builds_on_all_expected() && graph::advance_linear(c, &event).map_err(db_err)?;
                }
            }
            if event.kind == EventKind::Timeline && !advanced && !graph::check_prevs(c, &event).map_err(db_err)? {
                return Err(Error::internal(
                    "the event it follows failed to be stored; send it again",
                ));
            }
            insert_event(c, ctx, &event, advanced).map_err(db_err)
        })
    }

    async fn room_info(&self, room_id: &str) -> Result<Option<RoomRecord>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT room_id, room_version, creator FROM rooms WHERE room_id = ?1")?
                .query_row([r], |r| {
                    Ok(RoomRecord {
                        room_id: r.get(0)?,
                        room_version: r.get(1)?,
                        creator: r.get(2)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn get_event(&self, event_id: &str) -> Result<Option<StoredEvent>> {
        let id = event_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {EVENT_COLS} FROM events e WHERE e.event_id = ?1"))?
                .query_row([id], event_row)
                .optional()
        })
        .await
    }

    async fn current_state(&self, room_id: &str) -> Result<Vec<StoredEvent>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM current_state s JOIN events e ON e.position = s.position \
                     WHERE s.room_id = ?1 ORDER BY e.position"
                ),
                [r],
                event_row,
            )
        })
        .await
    }

    async fn state_at(&self, room_id: &str, pos: i64) -> Result<Vec<StoredEvent>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM (SELECT event_position AS p, MAX(position) FROM state_events \
                     WHERE room_id = ?1 AND position <= ?2 GROUP BY event_type, state_key) s \
                     JOIN events e ON e.position = s.p ORDER BY e.position"
                ),
                params![r, pos],
                event_row,
            )
        })
        .await
    }

    async fn state_changes(&self, room_id: &str, after: i64, upto: i64) -> Result<Vec<StoredEvent>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM state_events s JOIN events e ON e.position = s.event_position \
                     WHERE s.room_id = ?1 AND s.position > ?2 AND s.position <= ?3 ORDER BY s.position"
                ),
                params![r, after, upto],
                event_row,
            )
        })
        .await
    }

    async fn room_events(
        &self,
        room_id: &str,
        from: i64,
        to: i64,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        // The newest events come from memory.
        let (lo, hi) = match dir {
            Direction::Forward => (from, to),
            Direction::Backward => (to, from),
        };
        if let Some(events) = self.recent.read().room_events(room_id, lo, hi, dir, limit) {
            return Ok(events);
        }
        let r = room_id.to_owned();
        let limit = limit as i64;
        self.read(move |c| match dir {
            Direction::Forward => collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM events e WHERE e.room_id = ?1 AND e.position > ?2 \
                     AND e.position < ?3 AND {SERVED} ORDER BY e.position ASC LIMIT ?4"
                ),
                params![r, from, to, limit],
                event_row,
            ),
            Direction::Backward => collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM events e WHERE e.room_id = ?1 AND e.position < ?2 \
                     AND e.position > ?3 AND {SERVED} ORDER BY e.position DESC LIMIT ?4"
                ),
                params![r, from, to, limit],
                event_row,
            ),
        })
        .await
    }

    async fn relations(
        &self,
        room_id: &str,
        parent: &str,
        rel_type: Option<&str>,
        event_type: Option<&str>,
        from: i64,
        to: i64,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        let (room, parent) = (room_id.to_owned(), parent.to_owned());
        let (rel, ty) = (rel_type.map(str::to_owned), event_type.map(str::to_owned));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (lo, hi, order) = match dir {
            Direction::Forward => (from, to, "ASC"),
            Direction::Backward => (to, from, "DESC"),
        };
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM relations r JOIN events e ON e.position = r.position \
                     WHERE r.parent_event_id = ?1 AND r.room_id = ?2 \
                     AND (?3 IS NULL OR r.rel_type = ?3) AND (?4 IS NULL OR r.event_type = ?4) \
                     AND r.position > ?5 AND r.position < ?6 ORDER BY r.position {order} LIMIT ?7"
                ),
                params![parent, room, rel, ty, lo, hi, limit],
                event_row,
            )
        })
        .await
    }

    async fn threads(
        &self,
        room_id: &str,
        user: &str,
        only_participated: bool,
        before: i64,
        limit: usize,
    ) -> Result<Vec<ThreadRecord>> {
        let (room, user) = (room_id.to_owned(), user.to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let threads: Vec<(String, u64, i64, bool)> = collect(
                c,
                "SELECT parent_event_id, COUNT(*), MAX(position), MAX(sender = ?2) FROM relations \
                 WHERE room_id = ?1 AND rel_type = 'm.thread' GROUP BY parent_event_id \
                 HAVING MAX(position) < ?4 ORDER BY MAX(position) DESC",
                params![room, user, only_participated, before],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            let mut out = Vec::new();
            for (root_id, count, latest_position, replied) in threads {
                if out.len() as i64 >= limit {
                    break;
                }
                let root = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLS} FROM events e WHERE e.event_id = ?1 AND e.room_id = ?2"
                    ))?
                    .query_row(params![root_id, room], event_row)
                    .optional()?;
                // A reply to an event that is not here is no thread.
                let Some(root) = root else { continue };
                let participated = replied || root.sender == user;
                if only_participated && !participated {
                    continue;
                }
                out.push(ThreadRecord {
                    root,
                    count,
                    latest_position,
                    participated,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn search_events(
        &self,
        rooms: &[String],
        query: &str,
        keys: &[SearchKey],
        by_rank: bool,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<(StoredEvent, f64)>, u64)> {
        if rooms.is_empty() || keys.is_empty() {
            return Ok((vec![], 0));
        }
        let columns: Vec<&str> = keys
            .iter()
            .map(|k| match k {
                SearchKey::Body => "body",
                SearchKey::Name => "name",
                SearchKey::Topic => "topic",
            })
            .collect();
        let fts = format!("{{{}}} : ({query})", columns.join(" "));
        let rooms_json = serde_json::to_string(rooms).map_err(Error::internal)?;
        let (offset, limit) = (
            i64::try_from(offset).unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX),
        );
        let order = if by_rank {
            "s.rank, e.position DESC"
        } else {
            "e.position DESC"
        };
        self.read(move |c| {
            let count: u64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM event_search s JOIN events e ON e.position = s.rowid \
                     WHERE event_search MATCH ?1 AND e.room_id IN (SELECT value FROM json_each(?2))",
                )?
                .query_row(params![fts, rooms_json], |r| r.get(0))?;
            let found = collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS}, s.rank FROM event_search s JOIN events e ON e.position = s.rowid \
                     WHERE event_search MATCH ?1 AND e.room_id IN (SELECT value FROM json_each(?2)) \
                     ORDER BY {order} LIMIT ?3 OFFSET ?4"
                ),
                params![fts, rooms_json, limit, offset],
                |r| Ok((event_row(r)?, r.get::<_, f64>(11)?)),
            )?;
            Ok((found, count))
        })
        .await
    }

    async fn rooms_changed(&self, since: i64, upto: i64) -> Result<Vec<(String, i64)>> {
        self.read(move |c| {
            collect(
                c,
                "SELECT room_id, MAX(position) FROM events WHERE position > ?1 AND position <= ?2 GROUP BY room_id",
                params![since, upto],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }

    async fn user_memberships(&self, user_id: &str) -> Result<Vec<MembershipRecord>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT room_id, membership, event_id, position FROM memberships WHERE user_id = ?1 ORDER BY position",
                [u],
                |r| {
                    Ok(MembershipRecord {
                        room_id: r.get(0)?,
                        membership: r.get(1)?,
                        event_id: r.get(2)?,
                        position: r.get(3)?,
                    })
                },
            )
        })
        .await
    }

    async fn membership_history(&self, room_id: &str, user_id: &str) -> Result<Vec<(i64, String)>> {
        let (r, u) = (room_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            collect(
                c,
                "SELECT position, detail FROM state_events WHERE room_id = ?1 AND event_type = 'm.room.member' \
                 AND state_key = ?2 ORDER BY position",
                params![r, u],
                |r| Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.unwrap_or_default())),
            )
        })
        .await
    }

    async fn visibility_history(&self, room_id: &str) -> Result<Vec<(i64, String)>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT position, detail FROM state_events WHERE room_id = ?1 \
                 AND event_type = 'm.room.history_visibility' AND state_key = '' ORDER BY position",
                [r],
                |r| Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.unwrap_or_default())),
            )
        })
        .await
    }

    async fn txn_event(
        &self,
        user_id: &str,
        device_id: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
    ) -> Result<Option<String>> {
        let (u, d, t) = (user_id.to_owned(), device_id.to_owned(), txn_id.to_owned());
        let (r, e) = (room_id.to_owned(), event_type.to_owned());
        self.read(move |c| {
            c.prepare_cached("SELECT event_id FROM txns WHERE user_id = ?1 AND device_id = ?2 AND room_id = ?3 AND event_type = ?4 AND txn_id = ?5")?
                .query_row(params![u, d, r, e, t], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn forget_room(&self, user_id: &str, room_id: &str) -> Result<()> {
        let (u, r) = (user_id.to_owned(), room_id.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "INSERT OR IGNORE INTO forgotten (user_id, room_id) VALUES (?1, ?2)",
                params![u, r],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn is_forgotten(&self, user_id: &str, room_id: &str) -> Result<bool> {
        let (u, r) = (user_id.to_owned(), room_id.to_owned());
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM forgotten WHERE user_id = ?1 AND room_id = ?2")?
                .query_row(params![u, r], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
        .await
    }

    async fn search_users(&self, requester: &str, term: &str, limit: usize) -> Result<Vec<UserRecord>> {
        let me = requester.to_owned();
        // LIKE's own wildcards in the term match themselves.
        let pattern = format!(
            "%{}%",
            term.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            collect(
                c,
                "SELECT u.user_id, u.admin, u.displayname, u.avatar_url, u.created_ms FROM users u \
                 WHERE u.deactivated = 0 \
                 AND (lower(u.user_id) LIKE ?2 ESCAPE '\\' OR lower(COALESCE(u.displayname, '')) LIKE ?2 ESCAPE '\\') \
                 AND (u.user_id = ?1 OR EXISTS ( \
                   SELECT 1 FROM memberships m JOIN memberships mine ON mine.room_id = m.room_id \
                   WHERE m.user_id = u.user_id AND m.membership = 'join' \
                   AND mine.user_id = ?1 AND mine.membership = 'join') \
                 OR EXISTS ( \
                   SELECT 1 FROM memberships m JOIN rooms r ON r.room_id = m.room_id \
                   WHERE m.user_id = u.user_id AND m.membership = 'join' AND r.is_public = 1)) \
                 ORDER BY u.user_id LIMIT ?3",
                params![me, pattern, limit],
                |r| {
                    Ok(UserRecord {
                        user_id: r.get(0)?,
                        password_hash: None,
                        admin: r.get(1)?,
                        deactivated: false,
                        displayname: r.get(2)?,
                        avatar_url: r.get(3)?,
                        created_ms: r.get::<_, i64>(4)? as u64,
                    })
                },
            )
        })
        .await
    }

    async fn add_report(&self, report: Report) -> Result<i64> {
        self.write_wait(move |c, _| {
            c.execute(
                "INSERT INTO reports (reporter, room_id, event_id, target_user, reason, received_ms) \
                 VALUES (?1,?2,?3,?4,?5,?6)",
                params![
                    report.reporter,
                    report.room_id,
                    report.event_id,
                    report.target_user,
                    report.reason,
                    report.received_ms as i64
                ],
            )
            .map_err(db_err)?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn reports(&self, limit: usize) -> Result<Vec<Report>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            collect(
                c,
                "SELECT id, reporter, room_id, event_id, target_user, reason, received_ms FROM reports \
                 ORDER BY id DESC LIMIT ?1",
                [limit],
                |r| {
                    Ok(Report {
                        id: r.get(0)?,
                        reporter: r.get(1)?,
                        room_id: r.get(2)?,
                        event_id: r.get(3)?,
                        target_user: r.get(4)?,
                        reason: r.get(5)?,
                        received_ms: r.get::<_, i64>(6)? as u64,
                    })
                },
            )
        })
        .await
    }

    async fn public_rooms(&self) -> Result<Vec<String>> {
        self.read(|c| {
            collect(
                c,
                "SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY room_id",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn set_room_public(&self, room_id: &str, public: bool) -> Result<()> {
        let r = room_id.to_owned();
        self.write_wait(move |c, _| {
            c.execute("UPDATE rooms SET is_public = ?1 WHERE room_id = ?2", params![public, r])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn create_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
        let (a, r, u) = (alias.to_owned(), room_id.to_owned(), creator.to_owned());
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "INSERT INTO aliases (alias, room_id, creator) VALUES (?1,?2,?3) ON CONFLICT (alias) DO NOTHING",
                    params![a, r, u],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn resolve_alias(&self, alias: &str) -> Result<Option<AliasRecord>> {
        let a = alias.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT alias, room_id, creator FROM aliases WHERE alias = ?1")?
                .query_row([a], |r| {
                    Ok(AliasRecord {
                        alias: r.get(0)?,
                        room_id: r.get(1)?,
                        creator: r.get(2)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn delete_alias(&self, alias: &str) -> Result<bool> {
        let a = alias.to_owned();
        self.write_wait(move |c, _| Ok(c.execute("DELETE FROM aliases WHERE alias = ?1", [a]).map_err(db_err)? == 1))
            .await
    }

    async fn room_aliases(&self, room_id: &str) -> Result<Vec<String>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT alias FROM aliases WHERE room_id = ?1 ORDER BY alias",
                [r],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn sliding_connection(&self, user_id: &str, device_id: &str, conn_id: &str) -> Result<Option<String>> {
        let (u, d, c) = (user_id.to_owned(), device_id.to_owned(), conn_id.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT state_json FROM sliding_sync_connections \
                 WHERE user_id = ?1 AND device_id = ?2 AND conn_id = ?3",
            )?
            .query_row(params![u, d, c], |r| r.get(0))
            .optional()
        })
        .await
    }

    async fn put_sliding_connection(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        state_json: &str,
    ) -> Result<()> {
        let (u, d, c, j) = (
            user_id.to_owned(),
            device_id.to_owned(),
            conn_id.to_owned(),
            state_json.to_owned(),
        );
        let now = i64::try_from(weft_core::now_ms()).unwrap_or(i64::MAX);
        self.write_wait(move |conn, _| {
            conn.execute(
                "INSERT INTO sliding_sync_connections (user_id, device_id, conn_id, state_json, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (user_id, device_id, conn_id) \
                 DO UPDATE SET state_json = excluded.state_json, updated_ms = excluded.updated_ms",
                params![u, d, c, j, now],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn create_uia_session(&self, session_id: &str, now_ms: u64, prune_before_ms: u64) -> Result<()> {
        let id = session_id.to_owned();
        self.write_wait(move |c, _| {
            c.prepare_cached("DELETE FROM uia_sessions WHERE created_ms < ?1")
                .and_then(|mut s| s.execute([prune_before_ms.min(i64::MAX as u64) as i64]))
                .map_err(db_err)?;
            c.prepare_cached("INSERT INTO uia_sessions (session_id, created_ms) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![id, now_ms.min(i64::MAX as u64) as i64]))
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn uia_session(&self, session_id: &str, not_before_ms: u64) -> Result<Option<Vec<String>>> {
        let id = session_id.to_owned();
        let completed: Option<String> = self
            .read(move |c| {
                c.prepare_cached("SELECT completed FROM uia_sessions WHERE session_id = ?1 AND created_ms >= ?2")?
                    .query_row(params![id, not_before_ms.min(i64::MAX as u64) as i64], |r| r.get(0))
                    .optional()
            })
            .await?;
        Ok(completed.map(|c| serde_json::from_str(&c).unwrap_or_default()))
    }

    async fn uia_complete_stage(&self, session_id: &str, stage: &str) -> Result<Vec<String>> {
        let (id, stage) = (session_id.to_owned(), stage.to_owned());
        self.write_wait(move |c, _| {
            let completed: Option<String> = c
                .prepare_cached("SELECT completed FROM uia_sessions WHERE session_id = ?1")
                .and_then(|mut s| s.query_row([&id], |r| r.get(0)).optional())
                .map_err(db_err)?;
            let Some(completed) = completed else {
                return Ok(Vec::new());
            };
            let mut stages: Vec<String> = serde_json::from_str(&completed).unwrap_or_default();
            if !stages.contains(&stage) {
                stages.push(stage);
                let json = serde_json::to_string(&stages).map_err(db_err)?;
                c.prepare_cached("UPDATE uia_sessions SET completed = ?2 WHERE session_id = ?1")
                    .and_then(|mut s| s.execute(params![id, json]))
                    .map_err(db_err)?;
            }
            Ok(stages)
        })
        .await
    }

    async fn delete_uia_session(&self, session_id: &str) -> Result<()> {
        let id = session_id.to_owned();
        self.write_wait(move |c, _| {
            c.prepare_cached("DELETE FROM uia_sessions WHERE session_id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn take_rate_token(&self, bucket: &str, interval_us: i64, tolerance_us: i64) -> Result<Option<u64>> {
        let bucket = bucket.to_owned();
        self.write_wait(move |c, _| {
            // The clock is read in the writer, where the row is changed.
            let now = now_us();
            // `excluded.tat_us` is `now + interval`: the new arrival time
            // of a bucket that was full.
            let taken = c
                .prepare_cached(
                    "INSERT INTO rate_buckets (bucket, tat_us) VALUES (?1, ?2 + ?3)
                     ON CONFLICT (bucket) DO UPDATE
                     SET tat_us = max(rate_buckets.tat_us + ?3, excluded.tat_us)
                     WHERE rate_buckets.tat_us <= ?2 + ?4
                     RETURNING tat_us",
                )
                .and_then(|mut st| {
                    st.query_row(params![bucket, now, interval_us, tolerance_us], |_| Ok(()))
                        .optional()
                })
                .map_err(db_err)?;
            if taken.is_some() {
                return Ok(None);
            }
            let tat: i64 = c
                .prepare_cached("SELECT tat_us FROM rate_buckets WHERE bucket = ?1")
                .and_then(|mut st| st.query_row([&bucket], |r| r.get(0)))
                .map_err(db_err)?;
            Ok(Some(tat.saturating_sub(now).saturating_sub(tolerance_us).max(1) as u64))
        })
        .await
    }

    async fn refund_rate_token(&self, bucket: &str, interval_us: i64) -> Result<()> {
        let bucket = bucket.to_owned();
        self.write_wait(move |c, _| {
            c.prepare_cached("UPDATE rate_buckets SET tat_us = tat_us - ?2 WHERE bucket = ?1")
                .and_then(|mut st| st.execute(params![bucket, interval_us]))
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn prune_rate_buckets(&self) -> Result<u64> {
        self.write_wait(move |c, _| {
            let n = c
                .prepare_cached("DELETE FROM rate_buckets WHERE tat_us < ?1")
                .and_then(|mut st| st.execute([now_us()]))
                .map_err(db_err)?;
            Ok(n as u64)
        })
        .await
    }

    fn claim_mqtt_client(&self, key: &str, owner: &str) -> Pending<Option<String>> {
        let (key, owner) = (key.to_owned(), owner.to_owned());
        self.write(move |c, ctx| {
            let before: Option<String> = c
                .prepare_cached("SELECT owner FROM mqtt_clients WHERE client_key = ?1")
                .and_then(|mut s| s.query_row([&key], |r| r.get(0)).optional())
                .map_err(db_err)?;
            c.prepare_cached(
                "INSERT INTO mqtt_clients (client_key, owner, since_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (client_key) DO UPDATE SET owner = excluded.owner, since_ms = excluded.since_ms",
            )
            .and_then(|mut s| s.execute(params![key, owner, weft_core::now_ms() as i64]))
            .map_err(db_err)?;
            ctx.announce(StreamKey::MqttClient(key.to_owned(), format!("+{owner}")));
            remember_position(c, ctx.pos).map_err(db_err)?;
            Ok(before)
        })
    }

    fn release_mqtt_client(&self, key: &str, owner: &str) -> Pending<()> {
        let (key, owner) = (key.to_owned(), owner.to_owned());
        self.write(move |c, ctx| {
            c.prepare_cached("DELETE FROM mqtt_clients WHERE client_key = ?1 AND owner = ?2")
                .and_then(|mut s| s.execute(params![key, owner]))
                .map_err(db_err)?;
            ctx.announce(StreamKey::MqttClient(key.to_owned(), format!("-{owner}")));
            remember_position(c, ctx.pos).map_err(db_err)?;
            Ok(())
        })
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        let k = key.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([k], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn init_meta(&self, key: &str, value: &str) -> Result<bool> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                    params![k, v],
                )
                .map_err(db_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }
}
