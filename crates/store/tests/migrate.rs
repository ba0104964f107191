//! `weft_store::migrate`: a SQLite store filled through the Store API is
//! copied into PostgreSQL; the PostgreSQL store then answers every area's
//! reads as the SQLite one did (same event IDs and positions, same sync
//! reads, search finds the same), every copied table holds the same rows,
//! the stream and the ID counters continue past what was copied, and the
//! refusals (target not empty, old SQLite schema) write nothing.
//! Skipped (with a note) when PostgreSQL is unreachable and `CI` is unset.

use std::path::Path;
use std::sync::Arc;

use weft_store::migrate::{SQLITE_TABLES, TablePlan, migrate_sqlite_to_postgres};
use weft_store::pg_testing::PgTestDb;
use weft_store::*;

const ROOM: &str = "!r:test";
const ALICE: &str = "@alice:test";
const BOB: &str = "@bob:test";

fn ev(id: &str, prev: &str, depth: i64) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        room_id: ROOM.to_owned(),
        event_type: "m.room.message".into(),
        state_key: None,
        sender: ALICE.into(),
        origin_server_ts: 1000 + depth as u64,
        pdu_json: serde_json::json!({
            "depth": depth, "prev_events": [prev], "auth_events": ["$c"], "content": { "n": id }
        })
        .to_string(),
        new_room: None,
        membership: None,
        history_visibility: None,
        txn: None,
        redaction: None,
        relation: None,
        search_text: None,
        prev_events: if prev.is_empty() { vec![] } else { vec![prev.to_owned()] },
        auth_events: vec!["$c".into()],
        depth,
        kind: EventKind::Timeline,
        state_before: None,
        state_after: None,
        new_groups: Vec::new(),
        current_state: None,
        expect_extremities: None,
        rebase: None,
    }
}

/// A message with `body` as its content and search text, as rooms makes it.
fn msg(id: &str, prev: &str, depth: i64, body: &str) -> NewEvent {
    let mut e = ev(id, prev, depth);
    e.pdu_json = serde_json::json!({
        "depth": depth, "prev_events": [prev], "auth_events": ["$c"],
        "content": { "msgtype": "m.text", "body": body }
    })
    .to_string();
    e.search_text = Some(body.to_owned());
    e
}

fn state(mut e: NewEvent, t: &str, k: &str, group: i64, prev_group: Option<i64>) -> NewEvent {
    e.event_type = t.to_owned();
    e.state_key = Some(k.to_owned());
    e.state_after = Some(group);
    e.new_groups = vec![NewStateGroup {
        id: group,
        prev_group,
        chain: prev_group.map_or(0, |_| 1),
        entries: vec![(t.to_owned(), k.to_owned(), e.event_id.clone())],
    }];
    e.current_state = Some(CurrentStateChange {
        group,
        changes: vec![(t.to_owned(), k.to_owned(), e.event_id.clone())],
    });
    e
}

async fn put(store: &Arc<dyn Store>, e: NewEvent) -> i64 {
    store.persist_event(e).await.unwrap().unwrap()
}

/// Fills a store through the Store API: accounts, devices with tokens and a
/// PSK, a room with state, messages, a thread, a redaction, an outlier,
/// search text, receipts, account data, keys, to-device messages, media,
/// reports, push, typing, presence, backup, the federation queue.
async fn fill(store: &Arc<dyn Store>) {
    for u in [ALICE, BOB] {
        store
            .create_user(NewUser {
                user_id: u.into(),
                password_hash: Some(format!("hash-of-{u}")),
                admin: u == ALICE,
                created_ms: 5,
            })
            .await
            .unwrap();
    }
    store
        .set_profile_field(ALICE, ProfileField::DisplayName, Some("Alice Ä".into()))
        .await
        .unwrap();
    store
        .upsert_device(ALICE, "DEVA", Some("Phone"), &[1u8; 32])
        .await
        .unwrap();
    store.upsert_device(BOB, "DEVB", None, &[2u8; 32]).await.unwrap();
    store.touch_device(ALICE, "DEVA", Some("192.0.2.1"), 77).await.unwrap();
    store
        .set_device_psk(BOB, "SENSOR", "psk-id-1", b"\x00\x01secret")
        .await
        .unwrap();
    store.put_filter(ALICE, r#"{"room":{}}"#).await.unwrap();
    store
        .put_account_data(ALICE, None, "m.push_rules", r#"{"global":{}}"#)
        .await
        .unwrap()
        .unwrap();

    // The room: create, alice joins, topic, messages (one with a
    // transaction ID, one in a thread), a redacted one, an outlier.
    let mut c = state(ev("$c", "", 1), "m.room.create", "", 1, None);
    c.new_room = Some(NewRoom {
        room_version: "10".into(),
        creator: ALICE.into(),
    });
    put(store, c).await;
    let mut join = state(ev("$join", "$c", 2), "m.room.member", ALICE, 2, Some(1));
    join.membership = Some("join".into());
    put(store, join).await;
    let mut topic = state(ev("$topic", "$join", 3), "m.room.topic", "", 3, Some(2));
    topic.pdu_json = r#"{"depth":3,"prev_events":["$join"],"content":{"topic":"Weather station"}}"#.into();
    topic.search_text = Some("Weather station".into());
    put(store, topic).await;
    let mut m1 = msg("$m1", "$topic", 4, "Héllo wörld at the café");
    m1.txn = Some(("DEVA".into(), "txn-1".into()));
    put(store, m1).await;
    let mut reply = msg("$m2", "$m1", 5, "thread reply about rain");
    reply.relation = Some(Relation {
        rel_type: "m.thread".into(),
        parent_event_id: "$m1".into(),
    });
    put(store, reply).await;
    put(store, msg("$secret", "$m2", 6, "secretword here")).await;
    let mut red = ev("$red", "$secret", 7);
    red.event_type = "m.room.redaction".into();
    red.redaction = Some(("$secret".into(), r#"{"content":{},"redacted":true}"#.into()));
    put(store, red).await;
    let mut out = msg("$out", "$c", 2, "outlier text");
    out.kind = EventKind::Outlier;
    out.search_text = None;
    put(store, out).await;
    put(store, msg("$m3", "$red", 8, "last words")).await;

    store.set_room_public(ROOM, true).await.unwrap();
    assert!(store.create_alias("#weather:test", ROOM, ALICE).await.unwrap());
    store
        .put_account_data(ALICE, Some(ROOM), "m.tag", r#"{"tags":{"u.x":{}}}"#)
        .await
        .unwrap()
        .unwrap();
    store
        .put_receipt(ReceiptRecord {
            room_id: ROOM.into(),
            receipt_type: "m.read".into(),
            user_id: ALICE.into(),
            thread_id: String::new(),
            event_id: "$m3".into(),
            ts: 99,
            position: 0,
        })
        .await
        .unwrap()
        .unwrap();
    store.forget_room(BOB, "!gone:test").await.unwrap();

    // Keys.
    store
        .upload_keys(
            ALICE,
            "DEVA",
            KeyUpload {
                device_keys: Some(r#"{"device_id":"DEVA","keys":{"ed25519:DEVA":"k"}}"#.into()),
                one_time_keys: vec![
                    ("signed_curve25519:A1".into(), r#"{"key":"a1"}"#.into()),
                    ("signed_curve25519:A2".into(), r#"{"key":"a2"}"#.into()),
                ],
                fallback_keys: vec![("signed_curve25519:F1".into(), r#"{"key":"f1"}"#.into())],
            },
        )
        .await
        .unwrap();
    store
        .put_cross_signing_keys(ALICE, vec![("master".into(), r#"{"keys":{"ed25519:m":"m"}}"#.into())])
        .await
        .unwrap();
    store
        .add_key_signatures(vec![KeySignature {
            target_user: ALICE.into(),
            target_key: "DEVA".into(),
            signer_user: ALICE.into(),
            signer_key: "ed25519:m".into(),
            signature: "sig".into(),
        }])
        .await
        .unwrap();
    store
        .send_to_device(
            ALICE,
            "DEVA",
            "m.room_key_request",
            "td-1",
            vec![NewToDevice {
                user_id: BOB.into(),
                target: DeviceTarget::One("DEVB".into()),
                content_json: r#"{"x":1}"#.into(),
            }],
        )
        .await
        .unwrap();
    let v = store
        .create_backup_version(ALICE, r#"{"algorithm":"a"}"#)
        .await
        .unwrap();
    store
        .put_backup_keys(
            ALICE,
            v,
            vec![BackupKey {
                room_id: ROOM.into(),
                session_id: "s1".into(),
                first_message_index: 0,
                forwarded_count: 1,
                is_verified: true,
                key_json: r#"{"session_data":{}}"#.into(),
            }],
        )
        .await
        .unwrap();

    // Media rows (the bytes are the blob store's, not the database's).
    store
        .create_media(MediaRecord {
            media_id: "MEDIA1".into(),
            uploader: ALICE.into(),
            created_ms: 10,
            content: Some(MediaContent {
                sha256: "ab".repeat(32),
                size: 3,
                content_type: Some("image/png".into()),
                filename: Some("a.png".into()),
            }),
            pending_until_ms: None,
            quarantined: false,
        })
        .await
        .unwrap();
    store
        .put_thumbnail(ThumbnailRecord {
            media_id: "MEDIA1".into(),
            width: 32,
            height: 32,
            method: "scale".into(),
            sha256: "cd".repeat(32),
            size: 2,
            content_type: "image/png".into(),
        })
        .await
        .unwrap();
    store
        .add_report(Report {
            id: 0,
            reporter: BOB.into(),
            room_id: Some(ROOM.into()),
            event_id: Some("$m1".into()),
            target_user: None,
            reason: Some("spam".into()),
            received_ms: 50,
        })
        .await
        .unwrap();

    // Push, typing, presence.
    let m3 = store.get_event("$m3").await.unwrap().unwrap().position;
    store
        .add_notifications(
            vec![NewNotification {
                user_id: BOB.into(),
                room_id: ROOM.into(),
                event_id: "$m3".into(),
                event_position: m3,
                thread_id: "main".into(),
                actions_json: r#"["notify"]"#.into(),
                highlight: true,
                ts: 60,
            }],
            m3,
        )
        .await
        .unwrap()
        .unwrap();
    let far = u64::MAX / 4;
    store.set_typing(ROOM, BOB, Some(far)).await.unwrap().unwrap();
    store.set_typing(ROOM, ALICE, Some(far)).await.unwrap().unwrap();
    store
        .edit_presence(
            ALICE,
            Box::new(|_| {
                Some((
                    PresenceRecord {
                        user_id: ALICE.into(),
                        presence: "online".into(),
                        status_msg: Some("here".into()),
                        last_active_ms: 70,
                        online_until_ms: 0,
                        position: 0,
                    },
                    true,
                ))
            }),
        )
        .await
        .unwrap()
        .unwrap();

    // Two outbox rows, both sent: the table is empty, but their IDs must
    // not be handed out again.
    store
        .queue_federation(
            vec![
                NewOutboxRow {
                    destination: "remote.test".into(),
                    kind: OutboxKind::Edu,
                    json: r#"{"edu_type":"m.typing","content":{}}"#.into(),
                },
                NewOutboxRow {
                    destination: "remote.test".into(),
                    kind: OutboxKind::Edu,
                    json: r#"{"edu_type":"m.typing","content":{}}"#.into(),
                },
            ],
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<i64> = store
        .outbox("remote.test", 10, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids.len(), 2);
    store.outbox_sent("remote.test", ids, 80).await.unwrap();
    store.set_meta("custom_key", "custom value").await.unwrap();
}

/// What the store answers in every area, as text to compare.
async fn answers(store: &Arc<dyn Store>) -> Vec<String> {
    let mut out = Vec::new();
    let mut say = |area: &str, v: String| out.push(format!("{area}: {v}"));
    let head = store.current_position();
    say("position", head.to_string());
    say("users", format!("{:?}", store.list_users().await.unwrap()));
    say(
        "token alice",
        format!("{:?}", store.lookup_token(&[1u8; 32]).await.unwrap()),
    );
    say(
        "token bob",
        format!("{:?}", store.lookup_token(&[2u8; 32]).await.unwrap()),
    );
    say(
        "devices alice",
        format!("{:?}", store.list_devices(ALICE).await.unwrap()),
    );
    say("devices bob", format!("{:?}", store.list_devices(BOB).await.unwrap()));
    let psk = store
        .lookup_psk("psk-id-1")
        .await
        .unwrap()
        .map(|p| (p.user_id, p.device_id, p.psk));
    say("psk", format!("{psk:?}"));
    say("filter", format!("{:?}", store.get_filter(ALICE, "0").await.unwrap()));
    say(
        "account data",
        format!("{:?}", store.account_data_since(ALICE, 0, head).await.unwrap()),
    );
    say("room", format!("{:?}", store.room_info(ROOM).await.unwrap()));
    for id in ["$c", "$join", "$topic", "$m1", "$m2", "$secret", "$red", "$out", "$m3"] {
        say(id, format!("{:?}", store.get_event(id).await.unwrap()));
    }
    say("state", format!("{:?}", store.current_state(ROOM).await.unwrap()));
    say("state at 3", format!("{:?}", store.state_at(ROOM, 3).await.unwrap()));
    say(
        "timeline",
        format!(
            "{:?}",
            store
                .room_events(ROOM, i64::MIN, i64::MAX, Direction::Forward, 100)
                .await
                .unwrap()
                .iter()
                .map(|e| (e.position, e.event_id.clone()))
                .collect::<Vec<_>>()
        ),
    );
    say(
        "events after 0",
        format!("{:?}", store.events_after(0, head, 100).await.unwrap()),
    );
    say(
        "rooms changed",
        format!("{:?}", store.rooms_changed(0, head).await.unwrap()),
    );
    say(
        "memberships",
        format!("{:?}", store.user_memberships(ALICE).await.unwrap()),
    );
    say(
        "membership history",
        format!("{:?}", store.membership_history(ROOM, ALICE).await.unwrap()),
    );
    say(
        "txn",
        format!(
            "{:?}",
            store
                .txn_event(ALICE, "DEVA", ROOM, "m.room.message", "txn-1")
                .await
                .unwrap()
        ),
    );
    say(
        "relations",
        format!(
            "{:?}",
            store
                .relations(ROOM, "$m1", None, None, i64::MIN, i64::MAX, Direction::Forward, 10)
                .await
                .unwrap()
                .iter()
                .map(|e| e.event_id.clone())
                .collect::<Vec<_>>()
        ),
    );
    say(
        "threads",
        format!("{:?}", store.threads(ROOM, ALICE, false, i64::MAX, 10).await.unwrap()),
    );
    let rooms = vec![ROOM.to_owned()];
    for q in [
        "\"cafe\"*",
        "\"hello\"*",
        "\"weather\"*",
        "\"secretword\"*",
        "\"rain\"*",
        "\"outlier\"*",
    ] {
        let (found, count) = store
            .search_events(
                &rooms,
                q,
                &[SearchKey::Body, SearchKey::Name, SearchKey::Topic],
                false,
                0,
                10,
            )
            .await
            .unwrap();
        let ids: Vec<_> = found.iter().map(|(e, _)| (e.position, e.event_id.clone())).collect();
        say(&format!("search {q}"), format!("{ids:?} of {count}"));
    }
    say("public", format!("{:?}", store.public_rooms().await.unwrap()));
    say(
        "alias",
        format!("{:?}", store.resolve_alias("#weather:test").await.unwrap()),
    );
    say(
        "receipts",
        format!("{:?}", store.receipts_since(ROOM, 0, head).await.unwrap()),
    );
    say(
        "forgotten",
        format!("{:?}", store.is_forgotten(BOB, "!gone:test").await.unwrap()),
    );
    say(
        "device keys",
        format!("{:?}", store.get_device_keys(ALICE, &[]).await.unwrap()),
    );
    say(
        "otk counts",
        format!("{:?}", store.one_time_key_counts(ALICE, "DEVA").await.unwrap()),
    );
    say(
        "fallback",
        format!("{:?}", store.unused_fallback_key_types(ALICE, "DEVA").await.unwrap()),
    );
    say(
        "cross-signing",
        format!("{:?}", store.get_cross_signing_keys(ALICE).await.unwrap()),
    );
    say(
        "signatures",
        format!("{:?}", store.key_signatures(ALICE).await.unwrap()),
    );
    say(
        "device list changes",
        format!("{:?}", store.device_list_changes(ALICE, 0, head).await.unwrap()),
    );
    say(
        "to-device",
        format!(
            "{:?}",
            store.to_device_messages(BOB, "DEVB", 0, head, 10).await.unwrap()
        ),
    );
    say(
        "backup",
        format!("{:?}", store.backup_version(ALICE, None).await.unwrap()),
    );
    say(
        "backup keys",
        format!("{:?}", store.backup_keys(ALICE, 1, None, None).await.unwrap()),
    );
    say("media", format!("{:?}", store.media("MEDIA1").await.unwrap()));
    say(
        "thumbnail",
        format!("{:?}", store.thumbnail("MEDIA1", 32, 32, "scale").await.unwrap()),
    );
    say("reports", format!("{:?}", store.reports(10).await.unwrap()));
    say("unread", format!("{:?}", store.unread_counts(BOB, None).await.unwrap()));
    say(
        "notifications",
        format!("{:?}", store.notifications(BOB, None, 10, false).await.unwrap()),
    );
    say("typing", format!("{:?}", store.typing(ROOM, 0).await.unwrap()));
    say("presence", format!("{:?}", store.presence(ALICE).await.unwrap()));
    say("destinations", format!("{:?}", store.destinations().await.unwrap()));
    for key in ["custom_key", "push_evaluated"] {
        say(key, format!("{:?}", store.get_meta(key).await.unwrap()));
    }
    say(
        "max state group",
        format!("{:?}", store.max_state_group().await.unwrap()),
    );
    out
}

/// Every row of every copied table, each value as text (`\x…` for bytes),
/// sorted.
fn sqlite_rows(path: &Path, table: &str, cols: &[String]) -> Vec<Vec<Option<String>>> {
    let c = rusqlite::Connection::open(path).unwrap();
    let select = cols
        .iter()
        .map(|c| {
            format!("CASE typeof(\"{c}\") WHEN 'blob' THEN '\\x' || lower(hex(\"{c}\")) ELSE CAST(\"{c}\" AS TEXT) END")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut st = c.prepare(&format!("SELECT {select} FROM \"{table}\"")).unwrap();
    let mut rows: Vec<Vec<Option<String>>> = st
        .query_map([], |r| (0..cols.len()).map(|i| r.get::<_, Option<String>>(i)).collect())
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows.sort();
    rows
}

fn pg_rows(url: &str, table: &str, cols: &[String]) -> Vec<Vec<Option<String>>> {
    let (url, table, cols) = (url.to_owned(), table.to_owned(), cols.to_vec());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let select = cols
            .iter()
            .map(|c| format!("\"{c}\"::text"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut rows: Vec<Vec<Option<String>>> = c
            .query(&format!("SELECT {select} FROM \"{table}\""), &[])
            .unwrap()
            .iter()
            .map(|r| (0..cols.len()).map(|i| r.get::<_, Option<String>>(i)).collect())
            .collect();
        rows.sort();
        rows
    })
    .join()
    .unwrap()
}

fn sqlite_cols(path: &Path, table: &str) -> Vec<String> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Runs SQL on PostgreSQL off the test's runtime; answers the first
/// column of each row as text.
fn pg_query(url: &str, sql: &str) -> Vec<Option<String>> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query(sql.as_str(), &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, Option<String>>(0))
            .collect()
    })
    .join()
    .unwrap()
}

/// Copies the SQLite database at `from` to `to` as SQLite reads it (its
/// WAL included): the store dropped just before may still be closing its
/// connection, so the main file alone can lag behind (a plain file copy
/// then made this test fail now and then under load).
fn copy_sqlite(from: &Path, to: &Path) {
    rusqlite::Connection::open(from)
        .unwrap()
        .execute("VACUUM INTO ?1", [to.to_str().unwrap()])
        .unwrap();
}

fn migrate(sqlite: &Path, url: &str) -> weft_core::Result<weft_store::migrate::MigrationReport> {
    let (s, u) = (sqlite.to_owned(), url.to_owned());
    std::thread::spawn(move || migrate_sqlite_to_postgres(&s, &u, &mut |_| {}))
        .join()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_store_answers_as_the_sqlite_one_did() {
    let Some(db) = PgTestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weft.db");
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, true).unwrap());
    fill(&sqlite).await;
    let before = answers(&sqlite).await;
    let head = sqlite.current_position();
    drop(sqlite);

    let report = migrate(&path, &db.url).expect("migration");
    assert_eq!(report.stream_head, head);
    assert_eq!(report.search_skipped, 0);
    assert!(report.rows > 40, "{report:?}");

    // Every copied table: the same rows, value for value.
    for (table, plan) in SQLITE_TABLES {
        if *plan != TablePlan::Copy {
            continue;
        }
        let cols = sqlite_cols(&path, table);
        assert_eq!(
            sqlite_rows(&path, table, &cols),
            pg_rows(&db.url, table, &cols),
            "table {table}"
        );
    }
    // The few tables the fill must have reached, so the comparison above
    // compared something.
    for t in [
        "events",
        "devices",
        "device_psks",
        "state_groups",
        "event_search",
        "typing",
        "relations",
    ] {
        let n = pg_query(&db.url, &format!("SELECT COUNT(*)::text FROM {t}"));
        assert_ne!(n, [Some("0".to_owned())], "{t} is empty");
    }
    // PostgreSQL's own schema version, not SQLite's.
    assert_eq!(
        pg_query(&db.url, "SELECT value FROM meta WHERE key = 'schema_version'"),
        [Some(weft_store::pg_schema_version().to_string())]
    );

    let pg: Arc<dyn Store> = Arc::new(PgStore::open(&db.url).unwrap());
    let after = answers(&pg).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a);
    }
    assert_eq!(before.len(), after.len());
    // Search found what it should (not just the same nothing on both).
    let found = |q: &str| {
        before
            .iter()
            .find(|l| l.starts_with(&format!("search \"{q}\"*")))
            .unwrap()
            .clone()
    };
    assert!(found("cafe").contains("$m1"), "{}", found("cafe"));
    assert!(found("weather").contains("$topic"));
    assert!(
        found("secretword").ends_with("[] of 0"),
        "a redacted event is not found"
    );
    assert!(found("outlier").ends_with("[] of 0"));

    // The stream and the counters continue past what was copied.
    assert_eq!(pg.current_position(), head);
    let p = put(&pg, msg("$after", "$m3", 9, "after the move")).await;
    assert_eq!(p, head + 1, "the next event takes the next position");
    let id = pg
        .add_report(Report {
            id: 0,
            reporter: BOB.into(),
            room_id: None,
            event_id: None,
            target_user: Some(ALICE.into()),
            reason: None,
            received_ms: 90,
        })
        .await
        .unwrap();
    assert_eq!(id, 2, "report IDs continue");
    pg.queue_federation(
        vec![NewOutboxRow {
            destination: "remote.test".into(),
            kind: OutboxKind::Edu,
            json: "{}".into(),
        }],
        None,
    )
    .await
    .unwrap()
    .unwrap();
    let ids: Vec<i64> = pg
        .outbox("remote.test", 10, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, [3], "an outbox ID SQLite handed out (and deleted) is not reused");
    assert_eq!(
        pg_query(&db.url, "SELECT last_value::text FROM state_group_ids"),
        [pg.max_state_group().await.unwrap().to_string()].map(Some),
        "the state group sequence continues after the copied groups"
    );
    let (found, _) = pg
        .search_events(&[ROOM.to_owned()], "\"after\"*", &[SearchKey::Body], false, 0, 10)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    drop(pg);

    // Migrating again: the target holds data now. Refused, nothing written.
    let count = || pg_query(&db.url, "SELECT COUNT(*)::text FROM events");
    let events_before = count();
    let err = migrate(&path, &db.url).unwrap_err();
    assert!(err.message.contains("not empty"), "{}", err.message);
    assert_eq!(count(), events_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_write_nothing() {
    let Some(db) = PgTestDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weft.db");
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, true).unwrap());
    fill(&sqlite).await;
    drop(sqlite);

    // No database file: refused (and none is created).
    let missing = dir.path().join("none.db");
    let err = migrate(&missing, &db.url).unwrap_err();
    assert!(err.message.contains("no SQLite database"), "{}", err.message);
    assert!(!missing.exists());

    // An older SQLite schema: refused before anything reaches PostgreSQL,
    // whose database stays without even a schema.
    let old = dir.path().join("old.db");
    copy_sqlite(&path, &old);
    rusqlite::Connection::open(&old)
        .unwrap()
        .pragma_update(None, "user_version", 19)
        .unwrap();
    let err = migrate(&old, &db.url).unwrap_err();
    assert!(err.message.contains("schema version 19"), "{}", err.message);
    assert_eq!(pg_query(&db.url, "SELECT to_regclass('meta')::text"), [None]);

    // A table nobody planned for: refused, nothing written.
    let odd = dir.path().join("odd.db");
    copy_sqlite(&path, &odd);
    rusqlite::Connection::open(&odd)
        .unwrap()
        .execute_batch("CREATE TABLE future_feature (x INTEGER)")
        .unwrap();
    let err = migrate(&odd, &db.url).unwrap_err();
    assert!(err.message.contains("future_feature"), "{}", err.message);
    assert_eq!(pg_query(&db.url, "SELECT to_regclass('meta')::text"), [None]);

    // A NUL in text (SQLite stores it, PostgreSQL cannot): refused with the
    // place named, and the transaction (schema included) rolled back.
    let nul = dir.path().join("nul.db");
    copy_sqlite(&path, &nul);
    rusqlite::Connection::open(&nul)
        .unwrap()
        .execute("UPDATE users SET displayname = ?1 WHERE user_id = ?2", ["a\0b", BOB])
        .unwrap();
    let err = migrate(&nul, &db.url).unwrap_err();
    assert!(
        err.message.contains("users") && err.message.contains("displayname") && err.message.contains("NUL"),
        "{}",
        err.message
    );
    assert_eq!(pg_query(&db.url, "SELECT to_regclass('meta')::text"), [None]);

    // A target some process already wrote to: refused, its data untouched.
    let pg: Arc<dyn Store> = Arc::new(PgStore::open(&db.url).unwrap());
    pg.create_user(NewUser {
        user_id: "@carol:test".into(),
        password_hash: None,
        admin: false,
        created_ms: 1,
    })
    .await
    .unwrap();
    drop(pg);
    let err = migrate(&path, &db.url).unwrap_err();
    assert!(
        err.message.contains("not empty") && err.message.contains("users"),
        "{}",
        err.message
    );
    assert_eq!(
        pg_query(&db.url, "SELECT string_agg(user_id, ',') FROM users"),
        [Some("@carol:test".to_owned())]
    );

    // An empty PostgreSQL database with the schema a server made (and
    // nothing else) is a fine target.
    let fresh = PgTestDb::create().unwrap();
    drop(PgStore::open(&fresh.url).unwrap());
    migrate(&path, &fresh.url).expect("a schema-only database is empty");
}
