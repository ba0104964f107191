//! WAL checkpoints never hold up the writer, and the WAL file stays
//! bounded under a steady stream of writes (see the store README, "WAL
//! checkpoints").

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_store::{Direction, EventKind, NewEvent, NewRoom, SqliteStore, Store};

const ROOM: &str = "!wal:test";

fn event(n: u32, body_bytes: usize) -> NewEvent {
    NewEvent {
        event_id: format!("$wal{n}"),
        room_id: ROOM.to_owned(),
        event_type: if n == 0 { "m.room.create" } else { "org.weft.telemetry" }.to_owned(),
        state_key: (n == 0).then(String::new),
        sender: "@alice:test".into(),
        origin_server_ts: 1000 + n as u64,
        pdu_json: format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(body_bytes)),
        new_room: (n == 0).then(|| NewRoom {
            room_version: "10".into(),
            creator: "@alice:test".into(),
        }),
        membership: None,
        history_visibility: None,
        txn: None,
        redaction: None,
        relation: None,
        search_text: None,
        prev_events: Vec::new(),
        auth_events: Vec::new(),
        depth: n as i64,
        kind: EventKind::Timeline,
        state_before: None,
        state_after: None,
        new_groups: Vec::new(),
        current_state: None,
        expect_extremities: None,
        rebase: None,
    }
}

/// Writes events `from..to` of `body_bytes` each, 64 in flight at a time.
async fn write(store: &Arc<dyn Store>, from: u32, to: u32, body_bytes: usize) {
    let mut n = from;
    while n < to {
        let end = to.min(n + 64);
        let pending: Vec<_> = (n..end).map(|i| store.persist_event(event(i, body_bytes))).collect();
        for p in pending {
            p.await.expect("writer alive").expect("write");
        }
        n = end;
    }
}

fn wal_len(db: &Path) -> u64 {
    std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len())
}

/// A checkpoint that takes the write lock (RESTART/TRUNCATE) waits for
/// every reader while holding it, and a write waiting for that lock
/// sleeps in SQLite's busy handler: requests stall for as long as the
/// slowest reader. Here a reader keeps a snapshot open for seconds after a
/// large WAL was written; a write must still be acknowledged at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_a_snapshot_does_not_stall_writes_through_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("weft.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, false).expect("open store"));
    // ~6,000 WAL pages: past the size at which the WAL is started over.
    write(&store, 0, 1_500, 16_000).await;

    // A reader on its own connection, holding its snapshot.
    let reader = rusqlite::Connection::open(&db).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let count: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 1_500);

    // Give the checkpointer time for a few passes while the reader is open.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for n in 1_500..1_505 {
        let started = Instant::now();
        let pos = tokio::time::timeout(Duration::from_secs(3), store.persist_event(event(n, 100)))
            .await
            .unwrap_or_else(|_| panic!("write {n} stalled for 3 s behind a checkpoint"))
            .expect("writer alive")
            .expect("write");
        assert!(pos > 0);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "write {n} took {:?}",
            started.elapsed()
        );
    }
    reader.execute_batch("COMMIT").unwrap();
    let last = store
        .room_events(ROOM, i64::MAX, 0, Direction::Backward, 1)
        .await
        .unwrap();
    assert_eq!(last[0].event_id, "$wal1504");
}

/// Under a steady stream of writes (never a quiet moment) the WAL is
/// copied back and started over from its beginning, so its file stays
/// far below the volume written; nothing acknowledged is lost across a
/// reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_reused_under_steady_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("weft.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, false).expect("open store"));
    // A steady stream of telemetry-sized events (about 2 MB of WAL every
    // 100 ms, 120 MB in all), as a busy server writes them.
    let (per_round, rounds) = (500u32, 60u32);
    let mut max_wal = 0;
    for round in 0..rounds {
        write(&store, round * per_round, (round + 1) * per_round, 2_000).await;
        max_wal = max_wal.max(wal_len(&db));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = rounds * per_round;
    assert!(
        max_wal < 48 << 20,
        "the WAL grew to {max_wal} bytes while about 120 MB went through it"
    );
    drop(store);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, false).expect("reopen store"));
    let all = store
        .room_events(ROOM, i64::MAX, 0, Direction::Backward, 100_000)
        .await
        .unwrap();
    assert_eq!(all.len() as u32, total);
    assert_eq!(all[0].event_id, format!("$wal{}", total - 1));
}
