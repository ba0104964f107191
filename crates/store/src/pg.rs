//! The PostgreSQL backend (docs/scale-out.md): the same shape as the
//! SQLite one (one writer thread per process doing group commit, reads on
//! pooled connections), made safe for several `weft serve` processes on
//! one database:
//!
//! - **Positions** come from the database. Each batch begins by locking the
//!   one row of `stream_head` (`SELECT … FOR UPDATE`), numbers its writes
//!   after the position found there, stores the new head and commits. The
//!   row lock makes batches of all processes commit one after the other in
//!   position order, so a position is never visible before a lower one: the
//!   committed head *is* the watermark, and no position is ever abandoned
//!   (a batch that fails to commit leaves the head where it was).
//! - **What each position touched** (`StreamKey`s) is written to
//!   `stream_log` in the same transaction, and the commit `NOTIFY`s
//!   `weft_stream` with the new head. Every process `LISTEN`s: a
//!   [`Follower`] reads what other processes committed into its in-memory
//!   tail ([`RecentChanges`]) and only then publishes the position, exactly
//!   as the SQLite writer does with its own batches.
//!
//! The driver is tokio-postgres, called synchronously ([`PgConn`]: each
//! connection drives itself on a runtime of its own, as the `postgres`
//! crate does, which `migrate-from-sqlite` and the tests still use): the
//! writer is a plain thread that runs each job as a closure on its
//! connection inside one transaction, as the SQLite writer does, which
//! async jobs borrowing a transaction cannot be boxed as simply; and unlike
//! the `postgres` crate's client this one can pipeline, which the writer
//! does with a batch's events. Reads run on tokio's blocking pool. No pool
//! crate is needed for a `Vec` of connections. (MSRV 1.85; rustc here is
//! 1.95.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;
use postgres::types::ToSql;
use postgres::{NoTls, Row, Statement};
use std::future::Future;
use tokio::sync::{oneshot, watch};
use weft_core::{Error, ErrorKind, Result};

use crate::*;

mod accounts;
mod appservice;
mod e2ee;
mod ephemeral;
mod federation;
mod federation_queue;
mod graph;
mod lease;
mod media;
mod misc;
mod rooms;
mod store_impl;
pub mod testing;

/// The search index's text folding, for `migrate` (which rebuilds the index
/// as the write path fills it).
pub(crate) use rooms::fold_diacritics;

/// PostgreSQL's migrations, numbered on their own (`migrations/postgres/`):
/// the first is the SQLite schema at its migration 0020.
pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_schema.sql"),
    include_str!("../migrations/postgres/0002_process_state.sql"),
    include_str!("../migrations/postgres/0003_rate_buckets.sql"),
];
/// The schema version this binary migrates a PostgreSQL database to.
pub fn pg_schema_version() -> usize {
    MIGRATIONS.len()
}

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 512;
const READERS: usize = 16;
/// The channel the commit of every batch notifies, with the new head.
const CHANNEL: &str = "weft_stream";
/// Arbitrary key of the advisory lock that serializes schema migrations
/// between processes starting at once.
pub(crate) const MIGRATION_LOCK: i64 = 0x7765_6674_0001;
/// Most connections holding a gate lock ([`GateLock`]: the media blob
/// gate, rooms' state turns) at once: a lock past it waits for one.
const GATES: usize = 8;
/// The advisory lock of the media blob gate ([`MediaStore::blob_gate`]).
/// (The leader lock is `…_0002`: `lease::LEADER_LOCK`.)
pub(crate) const BLOB_GATE_LOCK: i64 = 0x7765_6674_0003;
/// The first key of a room's state turn ([`Store::room_turn`]), whose
/// second is a hash of the room ID: the two-key form, apart from every
/// one-key lock above.
const ROOM_TURN_CLASS: i32 = 0x7765_6674;
/// Longest wait for a room's state turn. A process that holds one and
/// has stopped without closing its connection (frozen, cut off from the
/// database) keeps it until PostgreSQL notices; past this wait the others
/// build their state events without a turn, as before turns existed
/// (checked by the database all the same, only more often refused).
const ROOM_TURN_WAIT: &str = "SET lock_timeout = '5s'";

/// A session advisory lock held on a gate connection of its own for as
/// long as something (an upload, a room's state turn) needs it: not on a
/// read connection, which it would keep.
#[derive(Clone, Copy)]
pub(crate) enum GateLock {
    Shared(i64),
    Exclusive(i64),
    /// (class, object): the two-key form.
    Pair(i32, i32),
}

impl GateLock {
    fn run(self, conn: &mut PgConn, lock: bool) -> PgResult<postgres::Row> {
        match (self, lock) {
            (GateLock::Shared(k), true) => conn.query_one("SELECT pg_advisory_lock_shared($1)", &[&k]),
            (GateLock::Shared(k), false) => conn.query_one("SELECT pg_advisory_unlock_shared($1)", &[&k]),
            (GateLock::Exclusive(k), true) => conn.query_one("SELECT pg_advisory_lock($1)", &[&k]),
            (GateLock::Exclusive(k), false) => conn.query_one("SELECT pg_advisory_unlock($1)", &[&k]),
            (GateLock::Pair(a, b), true) => {
                conn.batch(ROOM_TURN_WAIT)?;
                let locked = conn.query_one("SELECT pg_advisory_lock($1, $2)", &[&a, &b]);
                // Other gate locks on this connection wait as long as it takes.
                conn.batch("SET lock_timeout = 0")?;
                locked
            }
            (GateLock::Pair(a, b), false) => conn.query_one("SELECT pg_advisory_unlock($1, $2)", &[&a, &b]),
        }
    }
}

/// A held [`GateLock`]: its connection, unlocked and pooled again on a
/// thread of its own when dropped (a connection may not be used, nor
/// dropped, on a tokio worker: it blocks on its own runtime).
pub(crate) struct GateHold {
    conn: Option<PgConn>,
    gates: Arc<Mutex<Vec<PgConn>>>,
    lock: GateLock,
    /// Given back once the connection is pooled again.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for GateHold {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        let (gates, lock, permit) = (self.gates.clone(), self.lock, self.permit.take());
        let unlock = move || {
            let _permit = permit;
            // A connection that cannot unlock is closed, which unlocks.
            if lock.run(&mut conn, false).is_ok() && !conn.is_closed() {
                gates.lock().push(conn);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(unlock)),
            Err(_) => {
                let _ = std::thread::Builder::new().name("weft-pg-gate".into()).spawn(unlock);
            }
        }
    }
}

pub(crate) type PgResult<T> = std::result::Result<T, postgres::Error>;
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

pub(crate) fn db_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("database: {e}"))
}

/// A driver error as an internal one. The driver's own message is just
/// "db error": this names the server's, with its SQLSTATE.
fn pg_err_ref(e: &postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => db_err(format_args!("{} ({})", db.message(), db.code().code())),
        None => db_err(e),
    }
}

/// A driver error as Weft's: text PostgreSQL cannot store (a NUL
/// character, which SQLite takes) is the client's bad input, not a server
/// fault; anything else is internal.
pub(crate) fn pg_err(e: postgres::Error) -> Error {
    use postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE || *c == SqlState::UNTRANSLATABLE_CHARACTER => {
            Error::new(ErrorKind::InvalidParam, "Text may not contain NUL characters")
        }
        _ => pg_err_ref(&e),
    }
}

/// An event as PostgreSQL can store it: its `text` holds no NUL (SQLite's
/// does). What is read from the content may have one (the stored JSON keeps
/// it as the escape `\u0000`, which is fine): the search text gets a space
/// instead (the index loses nothing), and a relation whose type or parent
/// has one (no event ID has) is not indexed. Everything else a client sends
/// is checked before (crates/services/src/text.rs).
pub(crate) fn storable_event(mut ev: NewEvent) -> NewEvent {
    if let Some(text) = ev.search_text.as_mut().filter(|t| t.contains('\0')) {
        *text = text.replace('\0', " ");
    }
    if ev
        .relation
        .as_ref()
        .is_some_and(|r| r.rel_type.contains('\0') || r.parent_event_id.contains('\0'))
    {
        ev.relation = None;
    }
    ev
}

/// A connection with its prepared statements (PostgreSQL prepares per
/// connection; each statement is parsed and planned once per connection).
///
/// tokio-postgres driven by a runtime of the connection's own, called from
/// plain threads (the writer, the listener, tokio's blocking pool) as the
/// `postgres` crate does it, so a job stays a synchronous closure; unlike
/// that crate's client, this one can also send several statements before
/// reading their answers ([`PgConn::pipeline`], the writer's batches).
pub(crate) struct PgConn {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    /// Notifications (`LISTEN`), received while a call drives the
    /// connection.
    notes: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    stmts: HashMap<String, Statement>,
}

/// Statements kept per connection; past this the cache starts over (SQL
/// built with a varying number of parameters would grow it forever).
const STATEMENT_CACHE: usize = 512;

impl PgConn {
    /// Connects; the error names the server (never the password).
    fn connect(url: &str) -> Result<Self> {
        Self::connect_as(url, None)
    }

    /// [`PgConn::connect`], named `application_name` in `pg_stat_activity`.
    pub(crate) fn connect_as(url: &str, application_name: Option<&str>) -> Result<Self> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| connect_err(url, e))?;
        if let Some(name) = application_name {
            config.application_name(name);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start a database connection's runtime: {e}")))?;
        let (client, mut connection) = rt.block_on(config.connect(NoTls)).map_err(|e| connect_err(url, e))?;
        let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("database connection ended: {e}");
                        break;
                    }
                }
            }
        });
        Ok(Self {
            rt,
            client,
            notes,
            stmts: HashMap::new(),
        })
    }

    fn prep(&mut self, sql: &str) -> PgResult<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.rt.block_on(self.client.prepare(sql))?;
        if self.stmts.len() >= STATEMENT_CACHE {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Runs a fixed statement; answers the rows it changed.
    pub(crate) fn execute(&mut self, sql: &str, params: Params<'_>) -> PgResult<u64> {
        let s = self.prep(sql)?;
        self.rt.block_on(self.client.execute(&s, params))
    }

    pub(crate) fn query(&mut self, sql: &str, params: Params<'_>) -> PgResult<Vec<Row>> {
        let s = self.prep(sql)?;
        self.rt.block_on(self.client.query(&s, params))
    }

    pub(crate) fn query_opt(&mut self, sql: &str, params: Params<'_>) -> PgResult<Option<Row>> {
        let s = self.prep(sql)?;
        self.rt.block_on(self.client.query_opt(&s, params))
    }

    pub(crate) fn query_one(&mut self, sql: &str, params: Params<'_>) -> PgResult<Row> {
        let s = self.prep(sql)?;
        self.rt.block_on(self.client.query_one(&s, params))
    }

    /// Runs statements that answer one row each, in order, in one round
    /// trip: every one is sent before the first answer is read. Answers
    /// their rows, or the first error (those after a failed one fail too:
    /// the transaction is aborted).
    pub(crate) fn pipeline(&mut self, statements: &[(&str, Params<'_>)]) -> PgResult<Vec<Row>> {
        let mut prepared = Vec::with_capacity(statements.len());
        for (sql, _) in statements {
            prepared.push(self.prep(sql)?);
        }
        let client = &self.client;
        let mut pending: Vec<_> = prepared
            .iter()
            .zip(statements)
            .map(|(s, (_, params))| Some(Box::pin(client.query_one(s, params))))
            .collect();
        let mut out: Vec<Option<PgResult<Row>>> = (0..statements.len()).map(|_| None).collect();
        // All polled together (a join): each sends its statement when first
        // polled, before any answer is awaited.
        self.rt.block_on(std::future::poll_fn(|cx| {
            let mut done = true;
            for (f, slot) in pending.iter_mut().zip(out.iter_mut()) {
                if let Some(fut) = f {
                    match fut.as_mut().poll(cx) {
                        std::task::Poll::Ready(r) => {
                            *slot = Some(r);
                            *f = None;
                        }
                        std::task::Poll::Pending => done = false,
                    }
                }
            }
            if done {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        }));
        out.into_iter().flatten().collect()
    }

    /// Runs a statement answering one row and then `COMMIT`, in one round
    /// trip. Should the statement fail, the `COMMIT` ends the (aborted)
    /// transaction as a rollback, and the statement's error is answered.
    pub(crate) fn query_one_then_commit(&mut self, sql: &str, params: Params<'_>) -> PgResult<()> {
        let statement = self.prep(sql)?;
        let client = &self.client;
        // Joined: both are sent before the first's answer is awaited.
        let (queried, committed) = self
            .rt
            .block_on(async { tokio::join!(client.query_one(&statement, params), client.batch_execute("COMMIT")) });
        queried.and(committed)
    }

    /// Begins a writer's batch in one round trip: the transaction, the
    /// lock of the stream head (answered: its position and low mark) and
    /// the first savepoint (`job`, see [`run_batch`]).
    fn begin_batch(&mut self) -> Result<(i64, i64)> {
        let answer =
            self.rt
                .block_on(self.client.simple_query(
                    "BEGIN; SELECT position, low FROM stream_head WHERE id = 1 FOR UPDATE; SAVEPOINT job",
                ))
                .map_err(|e| pg_err_ref(&e))?;
        for message in answer {
            if let postgres::SimpleQueryMessage::Row(row) = message {
                let num = |i: usize| row.get(i).and_then(|v| v.parse::<i64>().ok());
                if let (Some(pos), Some(low)) = (num(0), num(1)) {
                    return Ok((pos, low));
                }
            }
        }
        Err(Error::internal("the stream_head table has no row"))
    }

    /// Statements without parameters, as one round trip (`BEGIN`, …).
    pub(crate) fn batch(&mut self, sql: &str) -> PgResult<()> {
        self.rt.block_on(self.client.batch_execute(sql))
    }

    /// Waits up to `timeout` for a notification, then takes those already
    /// here; answers them all (none: the time ran out).
    fn notifications(&mut self, timeout: Duration) -> Vec<tokio_postgres::Notification> {
        let mut got = Vec::new();
        let notes = &mut self.notes;
        // Waiting drives the connection (its task delivers them).
        self.rt.block_on(async {
            if let Ok(Some(n)) = tokio::time::timeout(timeout, notes.recv()).await {
                got.push(n);
            }
        });
        while let Ok(n) = self.notes.try_recv() {
            got.push(n);
        }
        got
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// What a write job leaves for after the commit (as in the SQLite writer).
struct Done {
    ok: bool,
    answer: Box<dyn FnOnce(Option<Error>) + Send>,
}
type WriteFn = Box<dyn FnOnce(&mut PgConn, &mut WriterCtx) -> Done + Send>;

/// A job the writer may run again (a local event's write): it runs
/// without a savepoint of its own (a round trip saved per job on the hot
/// path); should it or a later one fail, the writer rolls back to the last
/// savepoint and runs the jobs since again, each in its own.
pub(crate) trait AgainJob: Send {
    /// Runs the job; false if it failed (its result is kept either way).
    fn run(&mut self, conn: &mut PgConn, ctx: &mut WriterCtx) -> bool;
    /// Answers the last run's result, or the commit's error.
    fn answer(self: Box<Self>, commit_err: Option<Error>);
    /// The event this job writes, if it can be sent with its neighbours
    /// (see [`rooms::pipelined`]).
    fn event(&self) -> Option<&NewEvent> {
        None
    }
    /// The job's event was written, pipelined, at `position`.
    fn stored_at(&mut self, _position: i64) {}
}

/// What the writer runs.
enum Job {
    /// Runs once, in a savepoint of its own.
    Once(WriteFn),
    Again(Box<dyn AgainJob>),
}

pub struct PgStore {
    /// [`Store::process_tag`], in every connection's URL.
    tag: String,
    /// Connections kept for [`MediaStore::blob_gate`] (its locks are held
    /// for an upload's length: not on a read connection), at most
    /// [`GATES`] at once.
    gates: Arc<Mutex<Vec<PgConn>>>,
    gate_permits: Arc<tokio::sync::Semaphore>,
    writer: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<PgConn>>>,
    /// One per read connection there may be ([`READERS`]).
    read_permits: Arc<tokio::sync::Semaphore>,
    /// When the push evaluator's and the federation queue reader's
    /// positions were last written.
    pub(crate) push_mark: crate::stream::ReaderMark,
    pub(crate) federation_mark: crate::stream::ReaderMark,
    url: Arc<str>,
    position: watch::Receiver<i64>,
    follower: Arc<Follower>,
    /// Stops the listener thread when the store is dropped.
    stop: Arc<AtomicBool>,
    /// Whether this process leads (started by the first
    /// [`Store::leadership`] call: the admin CLI never competes).
    lease: std::sync::OnceLock<watch::Receiver<bool>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping a `postgres::Client` blocks on the driver's runtime,
        // which panics on a tokio worker thread (where the last handle of a
        // store is usually dropped): the pooled read connections are
        // closed on a thread of their own.
        let mut pooled = std::mem::take(&mut *self.readers.lock());
        pooled.append(&mut self.gates.lock());
        if !pooled.is_empty() {
            let _ = std::thread::Builder::new()
                .name("weft-pg-close".into())
                .spawn(move || drop(pooled));
        }
    }
}

fn migrate(conn: &mut PgConn) -> PgResult<()> {
    conn.query_one("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = (|| {
        let has_meta = conn
            .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?
            .get::<_, bool>(0);
        let version: i64 = if has_meta {
            conn.query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])?
                .and_then(|r| r.get::<_, String>(0).parse().ok())
                .unwrap_or(0)
        } else {
            0
        };
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            conn.batch("BEGIN")?;
            let step = (|| {
                conn.batch(sql)?;
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', $1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&(i as i64 + 1).to_string()],
                )?;
                conn.batch("COMMIT")
            })();
            if let Err(e) = step {
                let _ = conn.batch("ROLLBACK");
                return Err(e);
            }
        }
        // Databases made before state group IDs came from the sequence
        // (a per-process counter took `MAX(id) + 1`): move it past them.
        // Once past, this never moves it again (so never back under a
        // running process's `nextval`).
        conn.query(
            "SELECT setval('state_group_ids', m) FROM (SELECT MAX(id) AS m FROM state_groups) x \
             WHERE m > (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM state_group_ids)",
            &[],
        )?;
        Ok(())
    })();
    conn.query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])?;
    result
}

impl PgStore {
    /// Connects to the database at `url` (creating or migrating its schema)
    /// and starts this process's writer and follower.
    pub fn open(url: &str) -> Result<Self> {
        // The synchronous client runs its own runtime, which may not be
        // started on a thread of the caller's.
        let url = url.to_owned();
        std::thread::spawn(move || Self::open_here(&url))
            .join()
            .map_err(|_| Error::internal("opening the database panicked"))?
    }

    fn open_here(url: &str) -> Result<Self> {
        // Every connection this store opens (and opens again) is named
        // after it in `pg_stat_activity`: another process sees whether
        // this one is still there (`claim_mqtt_client`).
        let tag = crate::process_tag();
        let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}application_name=weft%20{tag}")
        } else {
            // The `key=value` form.
            format!("{url} application_name='weft {tag}'")
        };
        let url = url.as_str();
        let mut conn = PgConn::connect(url)?;
        migrate(&mut conn).map_err(db_err)?;
        let head = conn
            .query_one("SELECT position, low FROM stream_head WHERE id = 1", &[])
            .map_err(db_err)?;
        let (pos, low): (i64, i64) = (head.get(0), head.get(1));
        let (pos_tx, pos_rx) = watch::channel(pos);
        let follower = Arc::new(Follower {
            published: Mutex::new(pos),
            recent: parking_lot::RwLock::new(RecentChanges::new(pos)),
            pos_tx,
            foreign_rooms: parking_lot::RwLock::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let url: Arc<str> = Arc::from(url);
        let (f, u) = (follower.clone(), url.clone());
        std::thread::Builder::new()
            .name("weft-pg-writer".into())
            .spawn(move || writer_loop(conn, u, rx, f, pos, low))
            .map_err(db_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let listen = PgConn::connect(&url)?;
        let (f, u, s) = (follower.clone(), url.clone(), stop.clone());
        std::thread::Builder::new()
            .name("weft-pg-listener".into())
            .spawn(move || listener_loop(listen, u, f, s))
            .map_err(db_err)?;
        Ok(Self {
            tag,
            gates: Default::default(),
            gate_permits: Arc::new(tokio::sync::Semaphore::new(GATES)),
            writer: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
            read_permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            push_mark: Default::default(),
            federation_mark: Default::default(),
            url,
            position: pos_rx,
            follower,
            stop,
            lease: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn foreign_room_writes(&self, hook: crate::ForeignRoomsHook) {
        self.follower.foreign_rooms.write().push(hook);
    }

    /// Runs `f` on a pooled read connection, on tokio's blocking pool.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PgConn) -> PgResult<T> + Send + 'static,
    ) -> Result<T> {
        // At most `READERS` connections, each kept (with its prepared
        // statements): a read waits for one rather than opening another
        // (a new connection costs a handshake and every statement's
        // preparation again, which under load cost more than the reads).
        let permit = self
            .read_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("database reads stopped"))?;
        let (pool, url) = (self.readers.clone(), self.url.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool.lock().pop();
            let mut conn = match conn {
                Some(c) => c,
                None => PgConn::connect(&url)?,
            };
            let out = f(&mut conn).map_err(pg_err);
            if !conn.is_closed() {
                pool.lock().push(conn);
            }
            out
        })
        .await
        .map_err(|e| Error::internal(format!("database read task: {e}")))?
    }

    /// Queues `f` to run inside the writer's next transaction (in its own
    /// savepoint), as [`SqliteStore`]'s writer does.
    pub(crate) fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PgConn, &mut WriterCtx) -> Result<T> + Send + 'static,
    ) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        let job: WriteFn = Box::new(move |conn, ctx| {
            let result = f(conn, ctx);
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
        let _ = self.writer.send(Job::Once(job));
        rx
    }

    fn send_job(&self, job: Job) {
        let _ = self.writer.send(job);
    }

    /// Takes `lock` on a gate connection, waiting for one of [`GATES`]
    /// and then for the lock.
    pub(crate) async fn gate_lock(&self, lock: GateLock) -> Result<GateHold> {
        let gates = self.gates.clone();
        let url = self.url.clone();
        let permit = self
            .gate_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("gate connections closed"))?;
        tokio::task::spawn_blocking(move || {
            let conn = gates.lock().pop();
            let mut conn = match conn {
                Some(c) => c,
                None => PgConn::connect(&url)?,
            };
            lock.run(&mut conn, true).map_err(pg_err)?;
            Ok(GateHold {
                conn: Some(conn),
                gates,
                lock,
                permit: Some(permit),
            })
        })
        .await
        .map_err(|e| Error::internal(format!("gate lock task: {e}")))?
    }

    /// A room's state turn ([`Store::room_turn`]): its lock key is a hash
    /// of the room ID (two rooms sharing one only take turns together).
    pub(crate) async fn room_turn_lock(&self, room_id: &str) -> Result<GateHold> {
        // FNV-1a, written out: every process, of any build, must hash a
        // room alike (std's hasher may change between Rust releases).
        let object = room_id
            .bytes()
            .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        self.gate_lock(GateLock::Pair(ROOM_TURN_CLASS, object as i32)).await
    }

    pub(crate) async fn write_wait<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PgConn, &mut WriterCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write(f)
            .await
            .map_err(|_| Error::internal("database writer stopped"))?
    }

    pub(crate) fn current(&self) -> i64 {
        *self.position.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<i64> {
        self.position.clone()
    }

    pub(crate) fn lease(&self) -> watch::Receiver<bool> {
        self.lease
            .get_or_init(|| lease::start(self.url.clone(), self.stop.clone()))
            .clone()
    }

    pub(crate) fn recent(&self) -> &parking_lot::RwLock<RecentChanges> {
        &self.follower.recent
    }
}

/// A connection failure names the server, never the password.
pub(crate) fn connect_err(url: &str, e: postgres::Error) -> Error {
    let shown = match url.parse::<postgres::Config>() {
        Ok(c) => format!(
            "{:?} database {:?} as {:?}",
            c.get_hosts(),
            c.get_dbname().unwrap_or_default(),
            c.get_user().unwrap_or_default()
        ),
        Err(_) => "the configured database.url".to_owned(),
    };
    Error::internal(format!("cannot connect to PostgreSQL at {shown}: {e}"))
}

/// Publishes stream positions in order, whoever committed them: the
/// writer its own batches, the listener those of other processes.
struct Follower {
    /// Highest position in `recent` and published (a batch boundary).
    published: Mutex<i64>,
    recent: parking_lot::RwLock<RecentChanges>,
    pos_tx: watch::Sender<i64>,
    /// Told of the rooms other processes wrote to (the room pipeline's
    /// views of them are stale).
    foreign_rooms: parking_lot::RwLock<Vec<crate::ForeignRoomsHook>>,
}

impl Follower {
    /// After the writer committed the batch (`start`, `ctx.pos`]: first
    /// whatever other processes committed before it, then the batch from
    /// memory, then the position.
    fn committed(&self, published: &mut i64, conn: &mut PgConn, start: i64, ctx: &mut WriterCtx) {
        if *published >= ctx.pos {
            // The listener read it from the database first.
            ctx.changes.clear();
            ctx.events.clear();
            ctx.redactions.clear();
            return;
        }
        if *published < start && !self.catch_up(conn, published, start) {
            return;
        }
        self.recent.write().add(ctx);
        *published = ctx.pos;
        self.pos_tx.send_replace(ctx.pos);
    }

    /// Reads the committed positions (`*published`, `upto`] from the
    /// database into the tail and publishes `upto`. False if it could not
    /// (the tail and position stay; the next notification tries again).
    fn catch_up(&self, conn: &mut PgConn, published: &mut i64, upto: i64) -> bool {
        if upto <= *published {
            return true;
        }
        match read_range(conn, *published, upto) {
            Ok(mut ctx) => {
                let hooks = self.foreign_rooms.read();
                if !hooks.is_empty() && !ctx.events.is_empty() {
                    let mut rooms: Vec<&str> = ctx.events.iter().map(|e| e.room_id.as_str()).collect();
                    rooms.sort_unstable();
                    rooms.dedup();
                    for hook in hooks.iter() {
                        hook(&rooms);
                    }
                }
                drop(hooks);
                self.recent.write().add(&mut ctx);
                *published = upto;
                self.pos_tx.send_replace(upto);
                true
            }
            Err(e) => {
                tracing::warn!("cannot read stream positions {}..={upto}: {e}", *published + 1);
                false
            }
        }
    }
}

/// What positions (`from`, `upto`] carried, read back from the database as
/// a [`WriterCtx`] that [`RecentChanges::add`] takes in.
fn read_range(conn: &mut PgConn, from: i64, upto: i64) -> PgResult<WriterCtx> {
    let mut ctx = WriterCtx {
        pos: upto,
        low: 0,
        changes: Vec::new(),
        events: Vec::new(),
        redactions: Vec::new(),
    };
    for r in conn.query(
        "SELECT position, kind, a, b FROM stream_log WHERE position > $1 AND position <= $2 ORDER BY position",
        &[&from, &upto],
    )? {
        if let Some(key) = decode_key(r.get(1), r.get(2), r.get(3)) {
            ctx.changes.push((r.get(0), key));
        }
    }
    ctx.events = conn
        .query(
            "SELECT position, event_id, room_id, event_type, state_key, sender, origin_server_ts, pdu_json, \
             redacted_by, txn_device, txn_id FROM events WHERE position > $1 AND position <= $2 ORDER BY position",
            &[&from, &upto],
        )?
        .iter()
        .map(event_row)
        .collect();
    // Redactions made in the range, of events the tail may hold unredacted.
    let ids: Vec<&str> = ctx.events.iter().map(|e| e.event_id.as_str()).collect();
    for r in conn.query(
        "SELECT event_id, pdu_json, redacted_by FROM events WHERE redacted_by = ANY($1)",
        &[&ids],
    )? {
        ctx.redactions.push((r.get(0), r.get(1), r.get(2)));
    }
    Ok(ctx)
}

/// A stored event from the columns `position, event_id, room_id,
/// event_type, state_key, sender, origin_server_ts, pdu_json, redacted_by,
/// txn_device, txn_id` (in that order).
pub(crate) fn event_row(r: &Row) -> StoredEvent {
    let txn_device: Option<String> = r.get(9);
    let txn_id: Option<String> = r.get(10);
    StoredEvent {
        position: r.get(0),
        event_id: r.get(1),
        room_id: r.get(2),
        event_type: r.get(3),
        state_key: r.get(4),
        sender: r.get(5),
        origin_server_ts: r.get::<_, i64>(6).max(0) as u64,
        pdu_json: r.get(7),
        redacted_by: r.get(8),
        txn: txn_device.zip(txn_id),
    }
}

/// `StreamKey` as a `stream_log` row: (kind, a, b).
fn encode_key(key: &StreamKey) -> (i16, &str, &str) {
    match key {
        StreamKey::Room(r) => (1, r, ""),
        StreamKey::User(u) => (2, u, ""),
        StreamKey::DeviceKeys(u) => (3, u, ""),
        StreamKey::Receipt(r) => (4, r, ""),
        StreamKey::Notification(u, r) => (5, u, r),
        StreamKey::Typing(r) => (6, r, ""),
        StreamKey::Presence(u) => (7, u, ""),
        StreamKey::Outbox(d) => (8, d, ""),
        StreamKey::Revoked(u) => (9, u, ""),
        StreamKey::MqttClient(k, o) => (10, k, o),
        StreamKey::State(r) => (11, r, ""),
    }
}

fn decode_key(kind: i16, a: String, b: String) -> Option<StreamKey> {
    Some(match kind {
        1 => StreamKey::Room(a),
        2 => StreamKey::User(a),
        3 => StreamKey::DeviceKeys(a),
        4 => StreamKey::Receipt(a),
        5 => StreamKey::Notification(a, b),
        6 => StreamKey::Typing(a),
        7 => StreamKey::Presence(a),
        8 => StreamKey::Outbox(a),
        9 => StreamKey::Revoked(a),
        10 => StreamKey::MqttClient(a, b),
        11 => StreamKey::State(a),
        _ => return None,
    })
}

/// Writes the batch's stream entries and new head, notifies the other
/// processes (delivered when the transaction commits)
/// and commits, in one round trip.
fn finish_batch(conn: &mut PgConn, ctx: &WriterCtx) -> PgResult<()> {
    let mut positions = Vec::with_capacity(ctx.changes.len());
    let (mut kinds, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for (p, key) in &ctx.changes {
        let (k, x, y) = encode_key(key);
        positions.push(*p);
        kinds.push(k);
        a.push(x);
        b.push(y);
    }
    // One round trip: the log, the head, the notification; the commit.
    conn.query_one_then_commit(
        "WITH log AS (INSERT INTO stream_log (position, kind, a, b) \
           SELECT * FROM UNNEST($1::BIGINT[], $2::SMALLINT[], $3::TEXT[], $4::TEXT[])), \
         head AS (UPDATE stream_head SET position = $5::BIGINT, low = $6::BIGINT WHERE id = 1) \
         SELECT pg_notify($7::TEXT, $8::TEXT)",
        &[
            &positions,
            &kinds,
            &a,
            &b,
            &ctx.pos,
            &ctx.low,
            &CHANNEL,
            &ctx.pos.to_string(),
        ],
    )
}

/// The writer: every job waiting, in one transaction (each in a savepoint
/// so a failing job does not undo the others), numbered after the head it
/// locked, then committed, answered and published.
fn writer_loop(mut conn: PgConn, url: Arc<str>, rx: mpsc::Receiver<Job>, follower: Arc<Follower>, pos: i64, low: i64) {
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
        if conn.is_closed() {
            match PgConn::connect(&url) {
                Ok(c) => conn = c,
                Err(e) => {
                    tracing::error!("cannot reconnect the database writer: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue; // dropping the jobs fails their receivers
                }
            }
        }
        ctx.changes.clear();
        ctx.events.clear();
        ctx.redactions.clear();
        match conn.begin_batch() {
            Ok((pos, low)) => {
                // Other processes may have moved the head on since.
                ctx.pos = ctx.pos.max(pos);
                ctx.low = ctx.low.min(low);
            }
            Err(e) => {
                tracing::error!("cannot begin write transaction: {e}");
                let _ = conn.batch("ROLLBACK");
                continue;
            }
        }
        let (start_pos, start_low) = (ctx.pos, ctx.low);
        let answers = run_batch(&mut conn, &mut ctx, batch);
        let moved = ctx.pos != start_pos || ctx.low != start_low;
        // Held across the commit: the listener, woken by this batch's own
        // notification, must not read the batch back as another process's
        // (a needless query, and this process's own rooms marked stale).
        let mut published = follower.published.lock();
        let commit = if moved {
            finish_batch(&mut conn, &ctx)
        } else {
            conn.batch("COMMIT")
        };
        match commit {
            Ok(()) => {
                if ctx.pos != start_pos {
                    // In the tail before the position is published, so a
                    // reader woken by it finds every event up to it.
                    follower.committed(&mut published, &mut conn, start_pos, &mut ctx);
                }
                drop(published);
                for answer in answers {
                    answer.give(None);
                }
            }
            Err(e) => {
                drop(published);
                tracing::error!("write batch failed to commit: {e}");
                let _ = conn.batch("ROLLBACK");
                ctx.pos = start_pos;
                ctx.low = start_low;
                for answer in answers {
                    answer.give(Some(pg_err_ref(&e)));
                }
            }
        }
    }
}

/// How a job's answer is given once the batch commits (or fails to).
enum Answer {
    Once(Box<dyn FnOnce(Option<Error>) + Send>),
    Again(Box<dyn AgainJob>),
}

impl Answer {
    fn give(self, commit_err: Option<Error>) {
        match self {
            Answer::Once(a) => a(commit_err),
            Answer::Again(j) => j.answer(commit_err),
        }
    }
}

/// Where the stream context stood (to undo a failed job's part of it).
#[derive(Clone, Copy)]
struct Mark {
    pos: i64,
    low: i64,
    changes: usize,
    events: usize,
    redactions: usize,
}

impl Mark {
    fn of(ctx: &WriterCtx) -> Self {
        Mark {
            pos: ctx.pos,
            low: ctx.low,
            changes: ctx.changes.len(),
            events: ctx.events.len(),
            redactions: ctx.redactions.len(),
        }
    }

    fn restore(self, ctx: &mut WriterCtx) {
        ctx.pos = self.pos;
        ctx.low = self.low;
        ctx.changes.truncate(self.changes);
        ctx.events.truncate(self.events);
        ctx.redactions.truncate(self.redactions);
    }
}

/// Runs a batch's jobs inside the open transaction. A failing job must not
/// undo the others (and an error aborts the whole transaction in
/// PostgreSQL), so a job runs after a savepoint: a `Once` job always in
/// its own, the `Again` jobs in a row share one; when one of those fails,
/// the writer rolls back to their savepoint and runs them again, each in
/// its own, so only the failing one is undone.
fn run_batch(conn: &mut PgConn, ctx: &mut WriterCtx, batch: Vec<Job>) -> Vec<Answer> {
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    // The `Again` jobs (indexes into `answers`) run since the savepoint
    // made at `mark`; `None`: no savepoint covers the next `Again` job.
    let mut shared: Option<(Mark, Vec<usize>)> = None;
    // Nothing ran since the last savepoint (the batch began with one).
    let mut clean = true;
    // A new savepoint releases the last in the same round trip (nesting
    // hundreds would overflow PostgreSQL's cache of a transaction's
    // subtransactions, which slows every session).
    let savepoint = |conn: &mut PgConn, clean: &mut bool| {
        if std::mem::replace(clean, true) {
            return Ok(());
        }
        conn.batch("RELEASE SAVEPOINT job; SAVEPOINT job")
    };
    let mut jobs = batch.into_iter().peekable();
    while let Some(job) = jobs.next() {
        // A row of events that can go in one round trip.
        let job = match job {
            Job::Again(first) if first.event().is_some() => {
                let mut row = vec![first];
                while let Some(Job::Again(next)) = jobs.peek() {
                    if next.event().is_none() {
                        break;
                    }
                    if let Some(Job::Again(next)) = jobs.next() {
                        row.push(next);
                    }
                }
                if row.len() == 1 {
                    row.pop().map(Job::Again)
                } else {
                    shared = None;
                    run_pipelined(conn, ctx, row, &mut answers, &mut clean);
                    None
                }
            }
            job => Some(job),
        };
        let Some(job) = job else { continue };
        match job {
            Job::Once(job) => {
                shared = None;
                let mark = Mark::of(ctx);
                let sp = savepoint(conn, &mut clean);
                let done = job(conn, ctx);
                clean = false;
                if !done.ok || sp.is_err() {
                    mark.restore(ctx);
                    clean = conn.batch("ROLLBACK TO SAVEPOINT job").is_ok();
                }
                answers.push(Answer::Once(done.answer));
            }
            Job::Again(mut job) => {
                if shared.is_none() {
                    let mark = Mark::of(ctx);
                    if savepoint(conn, &mut clean).is_err() {
                        // The transaction is unusable: the job fails, and
                        // so does the commit.
                        answers.push(Answer::Again(job));
                        continue;
                    }
                    shared = Some((mark, Vec::new()));
                }
                clean = false;
                if job.run(conn, ctx) {
                    answers.push(Answer::Again(job));
                    if let Some((_, run)) = shared.as_mut() {
                        run.push(answers.len() - 1);
                    }
                    continue;
                }
                // Undo the row since the savepoint and run each again in a
                // savepoint of its own (they succeeded before: they
                // should again), then this one.
                let Some((mark, run)) = shared.take() else { continue };
                mark.restore(ctx);
                clean = conn.batch("ROLLBACK TO SAVEPOINT job").is_ok();
                answers.push(Answer::Again(job));
                let again = run.into_iter().chain([answers.len() - 1]);
                for i in again {
                    if let Answer::Again(job) = &mut answers[i] {
                        let mark = Mark::of(ctx);
                        let sp = savepoint(conn, &mut clean);
                        clean = false;
                        if sp.is_err() || !job.run(conn, ctx) {
                            mark.restore(ctx);
                            clean = conn.batch("ROLLBACK TO SAVEPOINT job").is_ok();
                        }
                    }
                }
            }
        }
    }
    answers
}

/// Runs a row of event jobs pipelined ([`rooms::pipelined`]) after a
/// savepoint of their own; if that fails, undoes it and runs each on its
/// own, in a savepoint of its own.
fn run_pipelined(
    conn: &mut PgConn,
    ctx: &mut WriterCtx,
    mut row: Vec<Box<dyn AgainJob>>,
    answers: &mut Vec<Answer>,
    clean: &mut bool,
) {
    let savepoint = |conn: &mut PgConn, clean: &mut bool| {
        if std::mem::replace(clean, true) {
            return Ok(());
        }
        conn.batch("RELEASE SAVEPOINT job; SAVEPOINT job")
    };
    let mark = Mark::of(ctx);
    if savepoint(conn, clean).is_ok() {
        *clean = false;
        let first = ctx.pos + 1;
        let events: Vec<&NewEvent> = row.iter().filter_map(|j| j.event()).collect();
        let written = events.len() == row.len() && rooms::pipelined(conn, ctx, &events);
        if written {
            for (job, p) in row.iter_mut().zip(first..) {
                job.stored_at(p);
            }
            answers.extend(row.into_iter().map(Answer::Again));
            return;
        }
        mark.restore(ctx);
        *clean = conn.batch("ROLLBACK TO SAVEPOINT job").is_ok();
    }
    for mut job in row {
        let mark = Mark::of(ctx);
        let sp = savepoint(conn, clean);
        *clean = false;
        if sp.is_err() || !job.run(conn, ctx) {
            mark.restore(ctx);
            *clean = conn.batch("ROLLBACK TO SAVEPOINT job").is_ok();
        }
        answers.push(Answer::Again(job));
    }
}

/// Follows what other processes commit: on each notification (and every
/// second, in case one was missed while reconnecting) reads the committed
/// head and catches the tail up to it.
fn listener_loop(mut conn: PgConn, url: Arc<str>, follower: Arc<Follower>, stop: Arc<AtomicBool>) {
    let mut listening = false;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_closed() {
            std::thread::sleep(Duration::from_millis(500));
            match PgConn::connect(&url) {
                Ok(c) => {
                    conn = c;
                    listening = false;
                }
                Err(_) => continue,
            }
        }
        if !listening {
            if let Err(e) = conn.batch(&format!("LISTEN {CHANNEL}")) {
                tracing::warn!("cannot listen for stream notifications: {e}");
                continue;
            }
            listening = true;
        }
        // Wait for a notification (or a second), then take the others
        // already here: several in a row are one catch-up to the newest head.
        // Each carries the position its batch committed; when none is past
        // what is published (this process's own batches, mostly), there is
        // nothing to read. Without one for a second, the head is read.
        let noted = conn
            .notifications(Duration::from_secs(1))
            .iter()
            .map(|n| n.payload().parse::<i64>().unwrap_or(i64::MAX))
            .max();
        if noted.is_some_and(|p| p <= *follower.published.lock()) {
            continue;
        }
        let head = match conn.query_one("SELECT position FROM stream_head WHERE id = 1", &[]) {
            Ok(r) => r.get::<_, i64>(0),
            Err(e) => {
                tracing::warn!("cannot read the stream head: {e}");
                continue;
            }
        };
        let mut published = follower.published.lock();
        follower.catch_up(&mut conn, &mut published, head);
    }
}
