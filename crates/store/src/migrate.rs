//! `weft migrate-from-sqlite`: copies an embedded (SQLite) deployment's
//! database into an empty PostgreSQL database (docs/scale-out.md "Moving an
//! embedded deployment"). Only the store knows both schemas, so the copy
//! lives here; the binary holds the data directory's lock around it.
//!
//! What it guarantees:
//! - **All or nothing.** Everything on PostgreSQL (the schema too, when the
//!   database is empty) is written in one transaction; any refusal or
//!   failure rolls it back, leaving the target as it was.
//! - **Refusals** (nothing written): the target holds data (any row in any
//!   table, or a stream head past 0), the SQLite schema is not the one this
//!   binary's migrations end at, a table or column that this file does not
//!   know, a value PostgreSQL cannot store (a NUL character in text, text
//!   that is not UTF-8).
//! - **Rows as they are**: event IDs, stream positions (negative ones of
//!   backfilled events too), token hashes, keys, state group IDs. Then the
//!   stream continues where SQLite's would have: `stream_head` is set to
//!   SQLite's highest position ([`crate::sqlite::MAX_POSITION_SQL`], the
//!   same expression the SQLite store starts from), `low` to its lowest
//!   off-stream position, the `state_group_ids` sequence and every identity
//!   column past the largest value copied (or ever handed out, for
//!   SQLite's `AUTOINCREMENT` tables: `sqlite_sequence`).
//!
//! Every SQLite table is in [`SQLITE_TABLES`] with what happens to it; a
//! table that is not makes the migration refuse (and the unit test below
//! fail), so a later migration cannot be forgotten here. Likewise every
//! PostgreSQL table must be a copy target or in [`PG_ONLY_TABLES`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use weft_core::{Error, Result};

/// What the migration does with one SQLite table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablePlan {
    /// Every row, column by column (the column sets must be equal, apart
    /// from [`PG_ONLY_COLUMNS`]), in rowid order.
    Copy,
    /// `meta`: every key but `schema_version` (PostgreSQL keeps its own:
    /// its migrations are numbered apart from SQLite's); a key PostgreSQL's
    /// schema already wrote (`push_evaluated`) takes SQLite's value.
    Meta,
    /// `event_search`: rebuilt from the events (see [`copy_search`]).
    Search,
    /// Not copied; the reason is in [`SQLITE_TABLES`].
    Skip,
}

/// Every table of a SQLite database at the latest migration, in the order
/// they are copied (parents before the tables whose foreign keys name them:
/// `devices` before `device_psks`, `media` before `media_thumbnails`).
pub const SQLITE_TABLES: &[(&str, TablePlan)] = &[
    ("meta", TablePlan::Meta),
    ("users", TablePlan::Copy),
    ("devices", TablePlan::Copy),
    ("filters", TablePlan::Copy),
    ("account_data", TablePlan::Copy),
    ("rooms", TablePlan::Copy),
    ("events", TablePlan::Copy),
    ("state_events", TablePlan::Copy),
    ("current_state", TablePlan::Copy),
    ("memberships", TablePlan::Copy),
    ("txns", TablePlan::Copy),
    ("forgotten", TablePlan::Copy),
    ("aliases", TablePlan::Copy),
    ("device_keys", TablePlan::Copy),
    ("device_list_changes", TablePlan::Copy),
    ("one_time_keys", TablePlan::Copy),
    ("fallback_keys", TablePlan::Copy),
    ("to_device", TablePlan::Copy),
    ("to_device_txns", TablePlan::Copy),
    ("cross_signing_keys", TablePlan::Copy),
    ("key_signatures", TablePlan::Copy),
    ("device_psks", TablePlan::Copy),
    ("backup_versions", TablePlan::Copy),
    ("backup_keys", TablePlan::Copy),
    ("reports", TablePlan::Copy),
    ("relations", TablePlan::Copy),
    // An FTS5 table: contentless (the text is not stored, only the index),
    // so it cannot be copied; rebuilt from the events it indexes.
    ("event_search", TablePlan::Search),
    // FTS5's own storage of `event_search` (its inverted index, document
    // sizes, configuration): SQLite's format, meaningless to PostgreSQL,
    // whose index (`tsv`, GIN) fills itself from the rebuilt rows.
    ("event_search_data", TablePlan::Skip),
    ("event_search_idx", TablePlan::Skip),
    ("event_search_docsize", TablePlan::Skip),
    ("event_search_config", TablePlan::Skip),
    ("event_search_content", TablePlan::Skip),
    ("receipts", TablePlan::Copy),
    // Copied in rowid order: PostgreSQL's `typing.id` (the identity that
    // stands in for SQLite's rowid, the order of a room's typers) is drawn
    // in that order.
    ("typing", TablePlan::Copy),
    ("typing_rooms", TablePlan::Copy),
    ("presence", TablePlan::Copy),
    ("notifications", TablePlan::Copy),
    ("pushers", TablePlan::Copy),
    ("sliding_sync_connections", TablePlan::Copy),
    ("media", TablePlan::Copy),
    ("media_thumbnails", TablePlan::Copy),
    ("server_keys", TablePlan::Copy),
    ("server_key_responses", TablePlan::Copy),
    ("state_groups", TablePlan::Copy),
    ("state_group_entries", TablePlan::Copy),
    ("remote_invites", TablePlan::Copy),
    ("federation_outbox", TablePlan::Copy),
    ("destinations", TablePlan::Copy),
    ("federation_txns_received", TablePlan::Copy),
    ("device_list_log", TablePlan::Copy),
    ("remote_device_lists", TablePlan::Copy),
    ("remote_device_keys", TablePlan::Copy),
    ("remote_cross_signing_keys", TablePlan::Copy),
    ("openid_tokens", TablePlan::Copy),
    ("dangling_prevs", TablePlan::Copy),
    ("appservice_state", TablePlan::Copy),
    // SQLite's record of the highest ID each AUTOINCREMENT table
    // (`reports`, `federation_outbox`, `device_list_log`) ever handed out:
    // not a table of ours, but read to set those identities past it (IDs
    // are never reused: federation transaction IDs are made of outbox IDs).
    ("sqlite_sequence", TablePlan::Skip),
    // Statistics `ANALYZE` / `PRAGMA optimize` may leave: SQLite's planner's.
    ("sqlite_stat1", TablePlan::Skip),
    ("sqlite_stat4", TablePlan::Skip),
    // Migration 0021: user-interactive auth sessions (a flow in progress
    // goes on after the move) and the MQTT door's live client IDs. The
    // server is stopped while migrating, so any claim left there is of a
    // connection that is gone: copied, it would only make that client's
    // next connect wait for a release that never comes.
    ("uia_sessions", TablePlan::Copy),
    ("mqtt_clients", TablePlan::Skip),
    // Migration 0022: the sign-in rate-limit buckets. Copied, so an
    // account or address that was being limited stays limited after the
    // move (a row is at most a few minutes' worth of waiting).
    ("rate_buckets", TablePlan::Copy),
];

/// PostgreSQL tables with no SQLite twin, and what the migration does with
/// them.
pub const PG_ONLY_TABLES: &[&str] = &[
    // One row: set to SQLite's highest stream position (and `low` to its
    // lowest off-stream one), so the stream continues where it was.
    "stream_head",
    // What each position touched, for other processes' in-memory tails
    // (crates/store/src/pg.rs `Follower`): left empty. A process starts its
    // tail at the head (`RecentChanges::new`), as SQLite's does after a
    // restart, and only reads the log past the head it started at; older
    // positions are answered from the tables, as after any restart.
    "stream_log",
];

/// PostgreSQL-only columns of copied tables: left to their default.
pub const PG_ONLY_COLUMNS: &[(&str, &str)] = &[
    // The identity standing in for SQLite's rowid (see `typing` above).
    ("typing", "id"),
    // Generated from body, name and topic.
    ("event_search", "tsv"),
];

/// What was copied.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// Rows written per PostgreSQL table, in copy order.
    pub tables: Vec<(String, u64)>,
    /// All rows written.
    pub rows: u64,
    /// The stream position PostgreSQL continues from.
    pub stream_head: i64,
    /// Search rows whose event no longer yields text (not indexed).
    pub search_skipped: u64,
}

/// Copies the SQLite database at `sqlite` into the empty PostgreSQL
/// database at `url` (see the module documentation). `progress` gets one
/// line per table. Blocking: call it off any async runtime's threads.
/// The caller makes sure no server uses `sqlite` meanwhile (the binary
/// holds the data directory's lock).
pub fn migrate_sqlite_to_postgres(sqlite: &Path, url: &str, progress: &mut dyn FnMut(&str)) -> Result<MigrationReport> {
    let src = open_source(sqlite)?;
    check_source_tables(&src)?;
    // One snapshot of the source for the whole copy.
    src.execute_batch("BEGIN").map_err(sqlite_err)?;
    let mut pg = postgres::Client::connect(url, postgres::NoTls).map_err(|e| crate::pg::connect_err(url, e))?;
    let result = (|| {
        let mut tx = pg.transaction().map_err(pg_err)?;
        prepare_target(&mut tx)?;
        let report = copy_all(&src, &mut tx, progress)?;
        tx.commit().map_err(pg_err)?;
        Ok(report)
    })();
    let _ = src.execute_batch("COMMIT");
    result
}

fn sqlite_err(e: rusqlite::Error) -> Error {
    Error::internal(format!("SQLite: {e}"))
}

fn pg_err(e: postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::internal(format!("PostgreSQL: {} ({})", db.message(), db.code().code())),
        None => Error::internal(format!("PostgreSQL: {e}")),
    }
}

/// Opens the SQLite database (never creating one) and checks its schema is
/// this binary's latest.
fn open_source(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        return Err(Error::internal(format!(
            "no SQLite database at {} (see database.sqlite_path)",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(sqlite_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sqlite_err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sqlite_err)?;
    let latest = crate::sqlite::MIGRATIONS.len() as i64;
    if version != latest {
        let what = if version < latest {
            "older: start `weft serve` on it once with this version (still on SQLite) to upgrade it, stop it, then migrate"
        } else {
            "newer: use the weft version that made it"
        };
        return Err(Error::internal(format!(
            "the SQLite database {} is at schema version {version}, this weft's latest is {latest} ({what})",
            path.display()
        )));
    }
    Ok(conn)
}

/// The tables of the SQLite database (`sqlite_master`, no indexes).
pub fn sqlite_tables(conn: &Connection) -> Result<Vec<String>> {
    sqlite_names(
        conn,
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
    )
}

/// The first column of every row `sql` answers, as text.
fn sqlite_names(conn: &Connection, sql: &str) -> Result<Vec<String>> {
    let mut st = conn.prepare(sql).map_err(sqlite_err)?;
    let names = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(sqlite_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sqlite_err)?;
    Ok(names)
}

fn plan_of(table: &str) -> Option<TablePlan> {
    SQLITE_TABLES.iter().find(|(t, _)| *t == table).map(|(_, p)| *p)
}

/// Refuses a source with a table [`SQLITE_TABLES`] does not list.
fn check_source_tables(conn: &Connection) -> Result<()> {
    let unknown: Vec<String> = sqlite_tables(conn)?
        .into_iter()
        .filter(|t| plan_of(t).is_none())
        .collect();
    if !unknown.is_empty() {
        return Err(Error::internal(format!(
            "the SQLite database has tables this migration does not know: {} (crates/store/src/migrate.rs SQLITE_TABLES)",
            unknown.join(", ")
        )));
    }
    Ok(())
}

/// Creates or completes PostgreSQL's schema inside the migration's
/// transaction, then refuses a target holding any data.
fn prepare_target(tx: &mut postgres::Transaction<'_>) -> Result<()> {
    // Serializes with a `weft serve` migrating the same database at start.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&crate::pg::MIGRATION_LOCK])
        .map_err(pg_err)?;
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .map_err(pg_err)?
        .get(0);
    let version: i64 = if has_meta {
        tx.query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
            .map_err(pg_err)?
            .and_then(|r| r.get::<_, String>(0).parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let migrations = crate::pg::MIGRATIONS;
    if version > migrations.len() as i64 {
        return Err(Error::internal(format!(
            "the PostgreSQL database is at schema version {version}, newer than this weft's {}",
            migrations.len()
        )));
    }
    for (i, sql) in migrations.iter().enumerate().skip(version.max(0) as usize) {
        tx.batch_execute(sql).map_err(pg_err)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&(i as i64 + 1).to_string()],
        )
        .map_err(pg_err)?;
    }
    // A process serving this database would write meanwhile: its writer
    // locks this row for each batch, so it waits until the copy commits.
    tx.batch_execute("LOCK TABLE stream_head IN EXCLUSIVE MODE")
        .map_err(pg_err)?;
    let head: i64 = tx
        .query_one("SELECT position FROM stream_head WHERE id = 1", &[])
        .map_err(pg_err)?
        .get(0);
    let mut holding = Vec::new();
    if head != 0 {
        holding.push(format!("stream_head (position {head})"));
    }
    for table in pg_tables(tx)? {
        if table == "stream_head" {
            continue;
        }
        let sql = if table == "meta" {
            // What the schema itself writes is no data.
            "SELECT EXISTS (SELECT 1 FROM meta WHERE key <> 'schema_version' \
             AND NOT (key = 'push_evaluated' AND value = '0'))"
                .to_owned()
        } else {
            format!("SELECT EXISTS (SELECT 1 FROM \"{table}\")")
        };
        if tx.query_one(sql.as_str(), &[]).map_err(pg_err)?.get::<_, bool>(0) {
            holding.push(table);
        }
    }
    if !holding.is_empty() {
        return Err(Error::internal(format!(
            "the PostgreSQL database is not empty ({} hold data): migrate into a new, empty database",
            holding.join(", ")
        )));
    }
    Ok(())
}

/// The tables of PostgreSQL's schema (the connection's current schema).
fn pg_tables(tx: &mut postgres::Transaction<'_>) -> Result<Vec<String>> {
    Ok(tx
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name",
            &[],
        )
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A PostgreSQL column: name, type, whether it is generated.
struct PgColumn {
    name: String,
    ty: Type,
    generated: bool,
}

fn pg_columns(tx: &mut postgres::Transaction<'_>, table: &str) -> Result<Vec<PgColumn>> {
    let rows = tx
        .query(
            "SELECT column_name::text, data_type::text, is_generated::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .map_err(pg_err)?;
    rows.iter()
        .map(|r| {
            let (name, data_type, generated): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let ty = match data_type.as_str() {
                "bigint" => Type::INT8,
                "text" => Type::TEXT,
                "bytea" => Type::BYTEA,
                "double precision" => Type::FLOAT8,
                "smallint" => Type::INT2,
                "tsvector" => Type::TS_VECTOR,
                other => {
                    return Err(Error::internal(format!(
                        "PostgreSQL column {table}.{name} has type {other}, which this migration does not copy"
                    )));
                }
            };
            Ok(PgColumn {
                name,
                ty,
                generated: generated != "NEVER",
            })
        })
        .collect()
}

fn sqlite_columns(src: &Connection, table: &str) -> Result<Vec<String>> {
    sqlite_names(
        src,
        &format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
    )
}

/// One value on its way to PostgreSQL, already of the column's type.
#[derive(Debug)]
enum Val {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) if *ty == Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
            Val::Int(i) => i.to_sql(ty, out),
            Val::Float(f) => f.to_sql(ty, out),
            Val::Text(s) => s.to_sql(ty, out),
            Val::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT2, Type::INT8, Type::FLOAT8, Type::TEXT, Type::BYTEA].contains(ty)
    }

    to_sql_checked!();
}

/// A SQLite value as PostgreSQL's column type wants it; `where_` names the
/// row for the error.
fn convert(v: ValueRef<'_>, ty: &Type, where_: &dyn Fn() -> String) -> Result<Val> {
    let bad = |what: &str| Error::internal(format!("{}: {what}", where_()));
    Ok(match (v, ty) {
        (ValueRef::Null, _) => Val::Null,
        (ValueRef::Integer(i), t) if *t == Type::INT8 || *t == Type::INT2 => Val::Int(i),
        (ValueRef::Integer(i), t) if *t == Type::FLOAT8 => Val::Float(i as f64),
        (ValueRef::Real(f), t) if *t == Type::FLOAT8 => Val::Float(f),
        (ValueRef::Text(b), t) if *t == Type::TEXT => {
            let s = std::str::from_utf8(b).map_err(|_| bad("text that is not UTF-8"))?;
            if s.contains('\0') {
                return Err(bad(
                    "text with a NUL character, which PostgreSQL cannot store; change or delete it on SQLite first",
                ));
            }
            Val::Text(s.to_owned())
        }
        (ValueRef::Integer(i), t) if *t == Type::TEXT => Val::Text(i.to_string()),
        (ValueRef::Blob(b) | ValueRef::Text(b), t) if *t == Type::BYTEA => Val::Bytes(b.to_vec()),
        (ValueRef::Text(b), t) if *t == Type::INT8 || *t == Type::INT2 => {
            match std::str::from_utf8(b).ok().and_then(|s| s.trim().parse().ok()) {
                Some(i) => Val::Int(i),
                None => return Err(bad("text where PostgreSQL has an integer column")),
            }
        }
        (v, t) => return Err(bad(&format!("a {:?} value for a {t} column", v.data_type()))),
    })
}

fn has_rowid(src: &Connection, table: &str) -> bool {
    src.prepare(&format!("SELECT rowid FROM \"{table}\" LIMIT 0")).is_ok()
}

fn copy_all(
    src: &Connection,
    tx: &mut postgres::Transaction<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<MigrationReport> {
    let mut report = MigrationReport::default();
    let present: BTreeSet<String> = sqlite_tables(src)?.into_iter().collect();
    let pg_tables: BTreeSet<String> = pg_tables(tx)?.into_iter().collect();
    // Every PostgreSQL table is a copy target, a twin of a SQLite table
    // deliberately left empty (`mqtt_clients`), or PostgreSQL's own.
    let targets: BTreeSet<&str> = SQLITE_TABLES
        .iter()
        .filter(|(t, p)| *p != TablePlan::Skip || *t == "mqtt_clients")
        .map(|(t, _)| *t)
        .collect();
    let unknown: Vec<&String> = pg_tables
        .iter()
        .filter(|t| !targets.contains(t.as_str()) && !PG_ONLY_TABLES.contains(&t.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::internal(format!(
            "PostgreSQL has tables this migration does not know: {unknown:?} (crates/store/src/migrate.rs)"
        )));
    }
    for (table, plan) in SQLITE_TABLES {
        if !present.contains(*table) {
            if *plan == TablePlan::Skip {
                continue;
            }
            return Err(Error::internal(format!("the SQLite database has no table {table}")));
        }
        let started = Instant::now();
        let rows = match plan {
            TablePlan::Skip => continue,
            TablePlan::Meta => copy_meta(src, tx)?,
            TablePlan::Copy => copy_table(src, tx, table)?,
            TablePlan::Search => {
                let (rows, skipped) = copy_search(src, tx)?;
                report.search_skipped = skipped;
                rows
            }
        };
        progress(&format!(
            "  {table}: {rows} rows ({} ms)",
            started.elapsed().as_millis()
        ));
        report.rows += rows;
        report.tables.push(((*table).to_owned(), rows));
    }
    report.stream_head = set_counters(src, tx)?;
    Ok(report)
}

fn copy_meta(src: &Connection, tx: &mut postgres::Transaction<'_>) -> Result<u64> {
    let mut st = src
        .prepare("SELECT key, value FROM meta WHERE key <> 'schema_version' ORDER BY key")
        .map_err(sqlite_err)?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(sqlite_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sqlite_err)?;
    for (key, value) in &rows {
        if key.contains('\0') || value.contains('\0') {
            return Err(Error::internal(format!("meta {key:?}: text with a NUL character")));
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[key, value],
        )
        .map_err(pg_err)?;
    }
    Ok(rows.len() as u64)
}

/// Copies one table with binary `COPY`, in rowid order.
fn copy_table(src: &Connection, tx: &mut postgres::Transaction<'_>, table: &str) -> Result<u64> {
    let s_cols = sqlite_columns(src, table)?;
    let p_cols = pg_columns(tx, table)?;
    if p_cols.is_empty() {
        return Err(Error::internal(format!("PostgreSQL has no table {table}")));
    }
    let pg_only = |c: &str| PG_ONLY_COLUMNS.contains(&(table, c));
    let s_set: BTreeSet<&str> = s_cols.iter().map(String::as_str).collect();
    let p_set: BTreeSet<&str> = p_cols
        .iter()
        .filter(|c| !c.generated && !pg_only(&c.name))
        .map(|c| c.name.as_str())
        .collect();
    if s_set != p_set {
        return Err(Error::internal(format!(
            "table {table}: SQLite's columns {s_set:?} differ from PostgreSQL's {p_set:?}"
        )));
    }
    let types_by_name: BTreeMap<&str, &Type> = p_cols.iter().map(|c| (c.name.as_str(), &c.ty)).collect();
    let types: Vec<Type> = s_cols.iter().map(|c| types_by_name[c.as_str()].clone()).collect();
    let col_list = s_cols.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
    let order = if has_rowid(src, table) { " ORDER BY rowid" } else { "" };
    let mut st = src
        .prepare(&format!("SELECT {col_list} FROM \"{table}\"{order}"))
        .map_err(sqlite_err)?;
    let sink = tx
        .copy_in(&format!("COPY \"{table}\" ({col_list}) FROM STDIN (FORMAT binary)"))
        .map_err(pg_err)?;
    let mut writer = BinaryCopyInWriter::new(sink, &types);
    let mut rows = st.query([]).map_err(sqlite_err)?;
    let mut n = 0u64;
    let mut vals = Vec::with_capacity(types.len());
    while let Some(row) = rows.next().map_err(sqlite_err)? {
        n += 1;
        vals.clear();
        for (i, ty) in types.iter().enumerate() {
            let v = row.get_ref(i).map_err(sqlite_err)?;
            let where_ = || format!("table {table}, row {n}, column {}", s_cols[i]);
            vals.push(convert(v, ty, &where_)?);
        }
        writer.write_raw(vals.iter()).map_err(pg_err)?;
    }
    let written = writer.finish().map_err(pg_err)?;
    if written != n {
        return Err(Error::internal(format!(
            "table {table}: read {n} rows from SQLite, PostgreSQL took {written}"
        )));
    }
    Ok(written)
}

/// `event_search`: SQLite's is contentless FTS5 (the text is not kept), so
/// the rows are rebuilt from the events they index, the way the write path
/// makes them (crates/rooms `derived_fields`: `content.body` of a
/// message, `content.name` / `content.topic` of a room name / topic, a
/// non-empty string), folded as PostgreSQL's write path folds them
/// (`fold_diacritics`). Which events are indexed is SQLite's own answer:
/// the FTS5 table's rowids (the write path indexes only timeline events
/// with text, and a redaction deletes the row), so the index holds on
/// PostgreSQL exactly what it held on SQLite.
fn copy_search(src: &Connection, tx: &mut postgres::Transaction<'_>) -> Result<(u64, u64)> {
    let mut st = src
        .prepare(
            "SELECT e.position, e.event_type, e.pdu_json FROM events e \
             WHERE e.position IN (SELECT rowid FROM event_search) ORDER BY e.position",
        )
        .map_err(sqlite_err)?;
    let sink = tx
        .copy_in("COPY event_search (position, body, name, topic) FROM STDIN (FORMAT binary)")
        .map_err(pg_err)?;
    let types = [Type::INT8, Type::TEXT, Type::TEXT, Type::TEXT];
    let mut writer = BinaryCopyInWriter::new(sink, &types);
    let mut rows = st.query([]).map_err(sqlite_err)?;
    let mut skipped = 0u64;
    while let Some(row) = rows.next().map_err(sqlite_err)? {
        let position: i64 = row.get(0).map_err(sqlite_err)?;
        let event_type: String = row.get(1).map_err(sqlite_err)?;
        let pdu_json: String = row.get(2).map_err(sqlite_err)?;
        let (column, key) = match event_type.as_str() {
            "m.room.name" => (2, "name"),
            "m.room.topic" => (3, "topic"),
            _ => (1, "body"),
        };
        let text = serde_json::from_str::<serde_json::Value>(&pdu_json)
            .ok()
            .and_then(|pdu| pdu.get("content")?.get(key)?.as_str().map(str::to_owned))
            .filter(|t| !t.is_empty());
        let Some(text) = text else {
            skipped += 1;
            continue;
        };
        // PostgreSQL text cannot hold NUL; the search index loses nothing
        // by a space there.
        let text = crate::pg::fold_diacritics(&text).replace('\0', " ");
        let mut vals = [Val::Int(position), Val::Null, Val::Null, Val::Null];
        vals[column] = Val::Text(text);
        writer.write_raw(vals.iter()).map_err(pg_err)?;
    }
    let written = writer.finish().map_err(pg_err)?;
    Ok((written, skipped))
}

/// Sets the stream head, the state group sequence and every identity past
/// what was copied; answers the stream head.
fn set_counters(src: &Connection, tx: &mut postgres::Transaction<'_>) -> Result<i64> {
    let head: i64 = src
        .query_row(crate::sqlite::MAX_POSITION_SQL, [crate::sqlite::DELETED_MAX], |r| {
            r.get(0)
        })
        .map_err(sqlite_err)?;
    let low: i64 = src
        .query_row(crate::sqlite::MIN_POSITION_SQL, [], |r| r.get(0))
        .map_err(sqlite_err)?;
    tx.execute(
        "UPDATE stream_head SET position = $1, low = $2 WHERE id = 1",
        &[&head, &low],
    )
    .map_err(pg_err)?;
    // SQLite's AUTOINCREMENT high-water marks (absent when no such table
    // ever had a row).
    let mut autoinc: BTreeMap<String, i64> = BTreeMap::new();
    let has_seq: bool = src
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence')",
            [],
            |r| r.get(0),
        )
        .map_err(sqlite_err)?;
    if has_seq {
        let mut st = src
            .prepare("SELECT name, seq FROM sqlite_sequence")
            .map_err(sqlite_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(sqlite_err)?;
        for r in rows {
            let (name, seq) = r.map_err(sqlite_err)?;
            autoinc.insert(name, seq);
        }
    }
    let identities = tx
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND is_identity = 'YES' ORDER BY table_name",
            &[],
        )
        .map_err(pg_err)?;
    for r in identities {
        let (table, column): (String, String) = (r.get(0), r.get(1));
        let max: Option<i64> = tx
            .query_one(&format!("SELECT MAX(\"{column}\") FROM \"{table}\""), &[])
            .map_err(pg_err)?
            .get(0);
        let top = max.into_iter().chain(autoinc.get(&table).copied()).max();
        if let Some(top) = top.filter(|t| *t >= 1) {
            tx.execute(
                "SELECT setval(pg_get_serial_sequence($1, $2), $3)",
                &[&format!("\"{table}\""), &column, &top],
            )
            .map_err(pg_err)?;
        }
    }
    let max_group: Option<i64> = tx
        .query_one("SELECT MAX(id) FROM state_groups", &[])
        .map_err(pg_err)?
        .get(0);
    if let Some(g) = max_group.filter(|g| *g >= 1) {
        tx.execute("SELECT setval('state_group_ids', $1)", &[&g])
            .map_err(pg_err)?;
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table a fresh SQLite database has is either copied or
    /// deliberately skipped: a new migration adding a table fails here
    /// until [`SQLITE_TABLES`] says what happens to it.
    /// The tables of a fresh SQLite database with every migration applied
    /// (what a new data directory holds).
    fn tables_of_fresh_database(path: &Path) -> Vec<String> {
        drop(crate::SqliteStore::open(path, false).unwrap());
        sqlite_tables(&Connection::open(path).unwrap()).unwrap()
    }

    #[test]
    fn every_sqlite_table_has_a_plan() {
        let dir = tempfile::tempdir().unwrap();
        let tables = tables_of_fresh_database(&dir.path().join("weft.db"));
        let unknown: Vec<&String> = tables.iter().filter(|t| plan_of(t).is_none()).collect();
        assert!(
            unknown.is_empty(),
            "SQLite tables without a plan in SQLITE_TABLES: {unknown:?}"
        );
        // And the plan names no table twice.
        let mut seen = BTreeSet::new();
        for (t, _) in SQLITE_TABLES {
            assert!(seen.insert(*t), "{t} listed twice");
        }
        // Every copied table exists on a fresh database (a renamed table
        // is not silently skipped).
        for (t, plan) in SQLITE_TABLES {
            if *plan != TablePlan::Skip {
                assert!(tables.iter().any(|x| x == t), "{t} is planned but does not exist");
            }
        }
    }
}
