//! The storage contract, run against the SQLite backend (and, once it
//! exists, the PostgreSQL one): ordered positions, group-committed writes,
//! state at a position, membership history, idempotency records, and the
//! in-memory record of what each position touched.

use std::sync::Arc;

use weft_store::{Direction, NewEvent, NewRoom, NewUser, SqliteStore, Store, StreamKey};

fn open(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&dir.path().join("weft.db"), true).expect("open store"))
}

fn event(room: &str, n: u32, state: Option<(&str, &str, Option<&str>)>) -> NewEvent {
    let (event_type, state_key, membership) = match state {
        Some((t, k, m)) => (t.to_owned(), Some(k.to_owned()), m.map(str::to_owned)),
        None => ("org.weft.telemetry".to_owned(), None, None),
    };
    NewEvent {
        event_id: format!("$e{n}"),
        room_id: room.to_owned(),
        event_type,
        state_key,
        sender: "@alice:test".into(),
        origin_server_ts: 1000 + n as u64,
        pdu_json: format!(r#"{{"n":{n}}}"#),
        new_room: (n == 0).then(|| NewRoom {
            room_version: "10".into(),
            creator: "@alice:test".into(),
        }),
        membership,
        history_visibility: None,
        txn: Some(("DEV".into(), format!("t{n}"))),
        redaction: None,
    }
}

#[tokio::test]
async fn concurrent_writes_get_ordered_positions_and_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut pending = Vec::new();
    pending.push(store.persist_event(event("!r:test", 0, Some(("m.room.create", "", None)))));
    for n in 1..200 {
        pending.push(store.persist_event(event("!r:test", n, None)));
    }
    let mut positions = Vec::new();
    for p in pending {
        positions.push(p.await.unwrap().unwrap());
    }
    // Enqueued in order, committed in order: strictly increasing positions.
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(store.current_position(), *positions.last().unwrap());
    drop(store);

    let store = open(&dir);
    assert_eq!(store.current_position(), *positions.last().unwrap());
    let back = store
        .room_events("!r:test", i64::MAX, 0, Direction::Backward, 1000)
        .await
        .unwrap();
    assert_eq!(back.len(), 200);
    assert_eq!(back[0].event_id, "$e199");
    assert_eq!(back[199].event_id, "$e0");
    let fwd = store
        .room_events("!r:test", positions[9], i64::MAX, Direction::Forward, 5)
        .await
        .unwrap();
    let ids: Vec<_> = fwd.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, ["$e10", "$e11", "$e12", "$e13", "$e14"]);
    assert_eq!(
        store
            .txn_event("@alice:test", "DEV", "!r:test", "org.weft.telemetry", "t7")
            .await
            .unwrap()
            .as_deref(),
        Some("$e7")
    );
    assert_eq!(
        store
            .txn_event("@alice:test", "DEV", "!other:test", "org.weft.telemetry", "t7")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn state_at_a_position_and_membership_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let room = "!s:test";
    let p_create = store
        .persist_event(event(room, 0, Some(("m.room.create", "", None))))
        .await
        .unwrap()
        .unwrap();
    let p_join = store
        .persist_event(event(room, 1, Some(("m.room.member", "@bob:test", Some("join")))))
        .await
        .unwrap()
        .unwrap();
    let _ = store.persist_event(event(room, 2, None)).await.unwrap().unwrap();
    let p_leave = store
        .persist_event(event(room, 3, Some(("m.room.member", "@bob:test", Some("leave")))))
        .await
        .unwrap()
        .unwrap();

    let at_create = store.state_at(room, p_create).await.unwrap();
    assert_eq!(at_create.len(), 1);
    let at_join = store.state_at(room, p_join).await.unwrap();
    assert_eq!(
        at_join.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
        ["$e0", "$e1"]
    );
    let now = store.current_state(room).await.unwrap();
    assert_eq!(
        now.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
        ["$e0", "$e3"]
    );
    assert_eq!(
        store.membership_history(room, "@bob:test").await.unwrap(),
        vec![(p_join, "join".to_owned()), (p_leave, "leave".to_owned())]
    );
    let mine = store.user_memberships("@bob:test").await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].membership, "leave");
    let changes = store.state_changes(room, p_create, p_leave).await.unwrap();
    assert_eq!(changes.len(), 2);
}

#[tokio::test]
async fn recent_changes_name_rooms_and_users_and_waiters_wake() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let start = store.current_position();
    let mut rx = store.subscribe_position();
    let p1 = store
        .persist_event(event("!a:test", 0, Some(("m.room.create", "", None))))
        .await
        .unwrap()
        .unwrap();
    rx.changed().await.unwrap();
    assert!(*rx.borrow() >= p1);
    let p2 = store
        .put_account_data("@carol:test", None, "m.direct", "{}")
        .await
        .unwrap()
        .unwrap();
    let changes = store.changes_since(start).expect("recent changes cover the start");
    assert!(
        changes.contains(&(p1, StreamKey::Room("!a:test".into()))),
        "{changes:?}"
    );
    assert!(
        changes.contains(&(p2, StreamKey::User("@carol:test".into()))),
        "{changes:?}"
    );
    // Nothing before the process started is in memory: callers must ask the database.
    drop(store);
    let store = open(&dir);
    assert!(store.changes_since(start).is_none());
    assert_eq!(store.changes_since(p2), Some(vec![]));
}

#[tokio::test]
async fn a_failing_write_does_not_undo_its_batch_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .create_user(NewUser {
            user_id: "@x:test".into(),
            password_hash: None,
            admin: false,
            created_ms: 1,
        })
        .await
        .unwrap();
    let a = store.persist_event(event("!b:test", 0, Some(("m.room.create", "", None))));
    // Same event ID again: violates the unique index, must fail alone.
    let mut dup = event("!b:test", 0, None);
    dup.txn = None;
    dup.new_room = None;
    let b = store.persist_event(dup);
    let c = store.persist_event(event("!b:test", 1, None));
    assert!(a.await.unwrap().is_ok());
    assert!(b.await.unwrap().is_err());
    assert!(c.await.unwrap().is_ok());
    let again = store
        .create_user(NewUser {
            user_id: "@x:test".into(),
            password_hash: None,
            admin: false,
            created_ms: 1,
        })
        .await;
    assert_eq!(again.unwrap_err().errcode(), "M_USER_IN_USE");
    let evs = store
        .room_events("!b:test", i64::MAX, 0, Direction::Backward, 10)
        .await
        .unwrap();
    assert_eq!(evs.len(), 2);
}
