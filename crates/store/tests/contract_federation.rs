//! Rows of federation and its neighbours, on both backends: other servers'
//! signing keys, the outgoing queue (rows per kind in queue order, the
//! reader's position), destinations' delivery state, received
//! transactions, application services' delivery state, and the media
//! repository's totals and a room's files (what media_rows.rs leaves out).

mod common;
use common::Backend;
use std::sync::Arc;

both!(
    server_keys_are_upserted_and_the_response_replaced,
    the_outbox_gives_the_oldest_rows_per_kind_in_queue_order,
    destinations_record_failures_and_successes,
    received_transactions_are_kept_once_and_pruned,
    appservice_delivery_state_moves_through_a_transaction,
    media_stats_count_items_blobs_thumbnails_and_pending,
    room_files_are_unredacted_messages_with_a_url_filtered,
    rows_queued_outside_the_reader_wake_their_destinations_on_every_store,
    one_leader_per_database_and_another_takes_over
);

use weft_store::{
    AppserviceState, DestinationRecord, EventKind, MediaContent, MediaRecord, MediaStats, NewEvent, NewOutboxRow,
    NewRoom, OutboxKind, RoomFilesQuery, ServerKeyRecord, ServerKeyResponse, Store, StreamKey, ThumbnailRecord,
};

fn key(server: &str, id: &str, public: &str, valid: u64, expired: Option<u64>, fetched: u64) -> ServerKeyRecord {
    ServerKeyRecord {
        server_name: server.into(),
        key_id: id.into(),
        public_key: public.into(),
        valid_until_ts: valid,
        expired_ts: expired,
        fetched_ts: fetched,
    }
}

fn response(server: &str, json: &str, valid: u64, fetched: u64) -> ServerKeyResponse {
    ServerKeyResponse {
        server_name: server.into(),
        json: json.into(),
        valid_until_ts: valid,
        fetched_ts: fetched,
    }
}

async fn server_keys_are_upserted_and_the_response_replaced(b: Backend) {
    let store = b.open();
    assert!(store.server_keys("one.test").await.unwrap().is_empty());
    assert!(store.server_key_response("one.test").await.unwrap().is_none());

    // ed25519:b comes twice (current, then retired): the last one stays.
    store
        .put_server_keys(
            response("one.test", r#"{"v":1}"#, 5000, 100),
            vec![
                key("one.test", "ed25519:b", "BBB", 5000, None, 100),
                key("one.test", "ed25519:a", "AAA", 5000, None, 100),
                key("one.test", "ed25519:b", "BBB", 4000, Some(3000), 100),
            ],
        )
        .await
        .unwrap();
    store
        .put_server_keys(
            response("two.test", r#"{"v":"two"}"#, 9000, 100),
            vec![key("two.test", "ed25519:x", "XXX", 9000, None, 100)],
        )
        .await
        .unwrap();
    assert_eq!(
        store.server_keys("one.test").await.unwrap(),
        [
            key("one.test", "ed25519:a", "AAA", 5000, None, 100),
            key("one.test", "ed25519:b", "BBB", 4000, Some(3000), 100),
        ]
    );

    // A newer response updates the keys it has and keeps the others.
    store
        .put_server_keys(
            response("one.test", r#"{"v":2}"#, 8000, 200),
            vec![key("one.test", "ed25519:a", "AA2", 8000, None, 200)],
        )
        .await
        .unwrap();
    assert_eq!(
        store.server_keys("one.test").await.unwrap(),
        [
            key("one.test", "ed25519:a", "AA2", 8000, None, 200),
            key("one.test", "ed25519:b", "BBB", 4000, Some(3000), 100),
        ]
    );
    assert_eq!(
        store.server_key_response("one.test").await.unwrap(),
        Some(response("one.test", r#"{"v":2}"#, 8000, 200))
    );
    assert_eq!(
        store.server_key_response("two.test").await.unwrap(),
        Some(response("two.test", r#"{"v":"two"}"#, 9000, 100))
    );
    // A response without keys is stored too.
    store
        .put_server_keys(response("three.test", "{}", 1, 2), vec![])
        .await
        .unwrap();
    assert_eq!(
        store.server_key_response("three.test").await.unwrap(),
        Some(response("three.test", "{}", 1, 2))
    );
    assert!(store.server_keys("three.test").await.unwrap().is_empty());
}

fn row(dest: &str, kind: OutboxKind, json: &str) -> NewOutboxRow {
    NewOutboxRow {
        destination: dest.into(),
        kind,
        json: json.into(),
    }
}

async fn the_outbox_gives_the_oldest_rows_per_kind_in_queue_order(b: Backend) {
    use OutboxKind::{Edu, Pdu};
    let store = b.open();
    assert!(store.outbox_destinations().await.unwrap().is_empty());
    store
        .queue_federation(
            vec![
                row("b.test", Pdu, "p1"),
                row("b.test", Edu, "e1"),
                row("a.test", Pdu, "a1"),
                row("b.test", Pdu, "p2"),
                row("b.test", Edu, "e2"),
                row("b.test", Pdu, "p3"),
            ],
            Some(42),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.get_meta("federation_queued").await.unwrap().as_deref(),
        Some("42")
    );
    // Without a reader position the stored one stays.
    store
        .queue_federation(vec![row("b.test", Edu, "e3")], None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.get_meta("federation_queued").await.unwrap().as_deref(),
        Some("42")
    );
    // Only a position: written at most once a second (a crash re-reads
    // at most that second's events, which queued nothing before either).
    store.queue_federation(vec![], Some(50)).await.unwrap().unwrap();
    let stored = store.get_meta("federation_queued").await.unwrap();
    assert!(matches!(stored.as_deref(), Some("42") | Some("50")), "{stored:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    store.queue_federation(vec![], Some(60)).await.unwrap().unwrap();
    assert_eq!(
        store.get_meta("federation_queued").await.unwrap().as_deref(),
        Some("60")
    );

    assert_eq!(store.outbox_destinations().await.unwrap(), ["a.test", "b.test"]);
    let all = store.outbox("b.test", 10, 10).await.unwrap();
    let shown = |v: &[weft_store::OutboxRecord]| v.iter().map(|r| (r.kind, r.json.clone())).collect::<Vec<_>>();
    assert_eq!(
        shown(&all),
        [
            (Pdu, "p1".into()),
            (Edu, "e1".into()),
            (Pdu, "p2".into()),
            (Edu, "e2".into()),
            (Pdu, "p3".into()),
            (Edu, "e3".into()),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    // The oldest two PDUs and the oldest EDU, in id order.
    assert_eq!(
        shown(&store.outbox("b.test", 2, 1).await.unwrap()),
        [(Pdu, "p1".into()), (Edu, "e1".into()), (Pdu, "p2".into())]
    );
    assert_eq!(
        shown(&store.outbox("b.test", 0, 2).await.unwrap()),
        [(Edu, "e1".into()), (Edu, "e2".into())]
    );
    assert_eq!(
        shown(&store.outbox("a.test", usize::MAX, usize::MAX).await.unwrap()),
        [(Pdu, "a1".into())]
    );
    assert!(store.outbox("c.test", 10, 10).await.unwrap().is_empty());
}

fn destination(name: &str, pdus: u64, edus: u64, retry: u64, backoff: u64) -> DestinationRecord {
    DestinationRecord {
        name: name.into(),
        queued_pdus: pdus,
        queued_edus: edus,
        retry_at_ms: retry,
        backoff_ms: backoff,
        last_error: None,
        last_success_ms: None,
    }
}

async fn destinations_record_failures_and_successes(b: Backend) {
    use OutboxKind::{Edu, Pdu};
    let store = b.open();
    assert!(store.destination("b.test").await.unwrap().is_none());
    assert!(store.destinations().await.unwrap().is_empty());
    store
        .queue_federation(
            vec![
                row("b.test", Pdu, "p1"),
                row("b.test", Pdu, "p2"),
                row("b.test", Edu, "e1"),
                row("c.test", Pdu, "c1"),
            ],
            None,
        )
        .await
        .unwrap()
        .unwrap();
    // Queued, never tried.
    assert_eq!(
        store.destination("b.test").await.unwrap(),
        Some(destination("b.test", 2, 1, 0, 0))
    );
    store
        .destination_failed("b.test", "connection refused", 1000, 5000)
        .await
        .unwrap();
    // Tried, nothing queued.
    store
        .destination_failed("a.test", "no such host", 60, 70)
        .await
        .unwrap();
    let failed_b = DestinationRecord {
        last_error: Some("connection refused".into()),
        ..destination("b.test", 2, 1, 5000, 1000)
    };
    let failed_a = DestinationRecord {
        last_error: Some("no such host".into()),
        ..destination("a.test", 0, 0, 70, 60)
    };
    assert_eq!(
        store.destinations().await.unwrap(),
        [failed_a.clone(), failed_b.clone(), destination("c.test", 1, 0, 0, 0)]
    );

    // b accepts p1 and e1; c's row is not b's to delete.
    let b_rows = store.outbox("b.test", 10, 10).await.unwrap();
    let c_rows = store.outbox("c.test", 10, 10).await.unwrap();
    let sent = vec![b_rows[0].id, b_rows[2].id, c_rows[0].id];
    store.outbox_sent("b.test", sent, 777).await.unwrap();
    let left: Vec<String> = store
        .outbox("b.test", 10, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.json)
        .collect();
    assert_eq!(left, ["p2"]);
    assert_eq!(store.outbox("c.test", 10, 10).await.unwrap(), c_rows);
    assert_eq!(
        store.destination("b.test").await.unwrap(),
        Some(DestinationRecord {
            last_success_ms: Some(777),
            ..destination("b.test", 1, 0, 0, 0)
        })
    );
    // A later failure keeps the last success.
    store.destination_failed("b.test", "timeout", 2000, 9000).await.unwrap();
    assert_eq!(
        store.destination("b.test").await.unwrap(),
        Some(DestinationRecord {
            last_error: Some("timeout".into()),
            last_success_ms: Some(777),
            ..destination("b.test", 1, 0, 9000, 2000)
        })
    );
    // A success of a destination never failed, with nothing sent.
    store.outbox_sent("d.test", vec![], 5).await.unwrap();
    assert_eq!(
        store.destination("d.test").await.unwrap(),
        Some(DestinationRecord {
            last_success_ms: Some(5),
            ..destination("d.test", 0, 0, 0, 0)
        })
    );
    assert_eq!(store.outbox_destinations().await.unwrap(), ["b.test", "c.test"]);
}

async fn received_transactions_are_kept_once_and_pruned(b: Backend) {
    let store = b.open();
    assert!(store.received_txn("one.test", "t1").await.unwrap().is_none());
    store
        .put_received_txn("one.test", "t1", r#"{"pdus":{}}"#, 100, 0)
        .await
        .unwrap();
    // The first answer stays.
    store
        .put_received_txn("one.test", "t1", r#"{"other":1}"#, 110, 0)
        .await
        .unwrap();
    store.put_received_txn("two.test", "t1", "{}", 120, 0).await.unwrap();
    assert_eq!(
        store.received_txn("one.test", "t1").await.unwrap().as_deref(),
        Some(r#"{"pdus":{}}"#)
    );
    assert_eq!(
        store.received_txn("two.test", "t1").await.unwrap().as_deref(),
        Some("{}")
    );
    assert!(store.received_txn("one.test", "t2").await.unwrap().is_none());
    // Storing t2 at 200 prunes what came before 115: one.test's t1 only.
    store
        .put_received_txn("one.test", "t2", r#"{"t":2}"#, 200, 115)
        .await
        .unwrap();
    assert!(store.received_txn("one.test", "t1").await.unwrap().is_none());
    assert_eq!(
        store.received_txn("two.test", "t1").await.unwrap().as_deref(),
        Some("{}")
    );
    assert_eq!(
        store.received_txn("one.test", "t2").await.unwrap().as_deref(),
        Some(r#"{"t":2}"#)
    );
}

fn fresh(id: &str, position: i64) -> AppserviceState {
    AppserviceState {
        id: id.into(),
        position,
        next_txn: 1,
        pending: None,
        retry_at_ms: 0,
        backoff_ms: 0,
        last_error: None,
        last_success_ms: None,
    }
}

async fn appservice_delivery_state_moves_through_a_transaction(b: Backend) {
    let store = b.open();
    assert!(store.appservice_states().await.unwrap().is_empty());
    assert_eq!(
        store.appservice_state_or_init("bridge", 10).await.unwrap(),
        fresh("bridge", 10)
    );
    // Already there: kept as it is.
    assert_eq!(
        store.appservice_state_or_init("bridge", 99).await.unwrap(),
        fresh("bridge", 10)
    );
    store.appservice_state_or_init("alpha", 3).await.unwrap();

    store.appservice_advance("bridge", 20).await.unwrap();
    // Never backwards.
    store.appservice_advance("bridge", 15).await.unwrap();
    assert_eq!(
        store.appservice_state_or_init("bridge", 0).await.unwrap(),
        fresh("bridge", 20)
    );

    store
        .appservice_begin("bridge", 30, r#"{"events":[1]}"#.into())
        .await
        .unwrap();
    // Not while a transaction is pending.
    store.appservice_advance("bridge", 40).await.unwrap();
    store
        .appservice_failed("bridge", "503 from the bridge", 2000, 8000)
        .await
        .unwrap();
    let pending = AppserviceState {
        pending: Some((30, r#"{"events":[1]}"#.into())),
        retry_at_ms: 8000,
        backoff_ms: 2000,
        last_error: Some("503 from the bridge".into()),
        ..fresh("bridge", 20)
    };
    assert_eq!(
        store.appservice_states().await.unwrap(),
        [fresh("alpha", 3), pending.clone()]
    );

    store.appservice_delivered("bridge", 9000).await.unwrap();
    let delivered = AppserviceState {
        next_txn: 2,
        last_success_ms: Some(9000),
        ..fresh("bridge", 30)
    };
    assert_eq!(
        store.appservice_states().await.unwrap(),
        [fresh("alpha", 3), delivered.clone()]
    );
    // Delivered with nothing pending: the position stays, the ID moves on.
    store.appservice_delivered("alpha", 1).await.unwrap();
    assert_eq!(
        store.appservice_state_or_init("alpha", 0).await.unwrap(),
        AppserviceState {
            next_txn: 2,
            last_success_ms: Some(1),
            ..fresh("alpha", 3)
        }
    );
    store.appservice_advance("bridge", 45).await.unwrap();
    assert_eq!(store.appservice_states().await.unwrap()[1].position, 45);
}

fn media(id: &str, sha: Option<&str>, size: u64) -> MediaRecord {
    MediaRecord {
        media_id: id.into(),
        uploader: "@a:t".into(),
        created_ms: 10,
        content: sha.map(|s| MediaContent {
            sha256: s.repeat(64),
            size,
            content_type: None,
            filename: None,
        }),
        pending_until_ms: sha.is_none().then_some(1000),
        quarantined: false,
    }
}

async fn media_stats_count_items_blobs_thumbnails_and_pending(b: Backend) {
    let store = b.open();
    assert_eq!(store.media_stats().await.unwrap(), MediaStats::default());
    store.create_media(media("A", Some("a"), 100)).await.unwrap();
    store.create_media(media("B", Some("a"), 100)).await.unwrap();
    store.create_media(media("C", Some("c"), 7)).await.unwrap();
    store.create_media(media("P", None, 0)).await.unwrap();
    store.create_media(media("Q", None, 0)).await.unwrap();
    assert!(store.set_quarantined("C", true).await.unwrap());
    assert!(!store.set_quarantined("nope", true).await.unwrap());
    for (w, size) in [(32, 5), (64, 11)] {
        store
            .put_thumbnail(ThumbnailRecord {
                media_id: "A".into(),
                width: w,
                height: w,
                method: "scale".into(),
                sha256: format!("{w}").repeat(32),
                size,
                content_type: "image/png".into(),
            })
            .await
            .unwrap();
    }
    // The same thumbnail again replaces it.
    let again = ThumbnailRecord {
        media_id: "A".into(),
        width: 64,
        height: 64,
        method: "scale".into(),
        sha256: "9".repeat(64),
        size: 13,
        content_type: "image/webp".into(),
    };
    store.put_thumbnail(again.clone()).await.unwrap();
    assert_eq!(store.thumbnail("A", 64, 64, "scale").await.unwrap(), Some(again));
    assert_eq!(
        store.media_stats().await.unwrap(),
        MediaStats {
            items: 3,
            bytes: 207,
            blobs: 2,
            blob_bytes: 107,
            thumbnails: 2,
            thumbnail_bytes: 18,
            quarantined: 1,
            pending: 2,
        }
    );
}

/// A message event `{id}{n}` in `room`, sent at `1000 + n`, with this
/// content (`n == 0` creates the room instead).
fn message(room: &str, id: &str, n: u32, content: &str) -> NewEvent {
    let create = n == 0;
    let event_id = format!("{id}{n}");
    let event_type = if create { "m.room.create" } else { "m.room.message" };
    NewEvent {
        event_id: event_id.clone(),
        room_id: room.to_owned(),
        event_type: event_type.into(),
        state_key: create.then(String::new),
        sender: "@alice:test".into(),
        origin_server_ts: 1000 + n as u64,
        pdu_json: format!(r#"{{"type":"{event_type}","content":{content}}}"#),
        new_room: create.then(|| NewRoom {
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
        current_state: create.then(|| weft_store::CurrentStateChange {
            group: 0,
            changes: vec![("m.room.create".into(), String::new(), event_id)],
        }),
        expect_extremities: None,
        rebase: None,
    }
}

async fn room_files_are_unredacted_messages_with_a_url_filtered(b: Backend) {
    let store = b.open();
    let room = "!files:test";
    let contents = [
        r#"{}"#,
        r#"{"msgtype":"m.image","url":"mxc://t/1","info":{"mimetype":"image/png"}}"#,
        r#"{"msgtype":"m.text","body":"no file"}"#,
        r#"{"msgtype":"m.file","url":"mxc://t/3","info":{"mimetype":"application/pdf"}}"#,
        r#"{"msgtype":"m.image","url":"mxc://t/4","info":{"mimetype":"IMAGE/JPEG"}}"#,
        r#"{"msgtype":"m.text","url":null}"#,
        // A \u0000 escape elsewhere in the event does not hide it.
        r#"{"msgtype":"m.image","body":"a\u0000b","url":"mxc://t/6","info":{"mimetype":"image/gif"}}"#,
        r#"{"msgtype":"m.file","url":"mxc://t/7"}"#,
        r#"{"msgtype":"m.image","url":"mxc://t/8","info":{"mimetype":"image/webp"}}"#,
        r#"{"msgtype":"m.file","url":"mxc://t/9","info":{"mimetype":"imagery"}}"#,
    ];
    let mut positions = Vec::new();
    for (n, content) in contents.iter().enumerate() {
        positions.push(
            store
                .persist_event(message(room, "$f", n as u32, content))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Redact 8.
    let mut red = message(room, "$f", 10, "{}");
    red.event_type = "m.room.redaction".into();
    red.redaction = Some(("$f8".into(), r#"{"type":"m.room.message","content":{}}"#.into()));
    let red_pos = store.persist_event(red).await.unwrap().unwrap();
    // Another room's file.
    store
        .persist_event(message("!other:test", "$o", 0, "{}"))
        .await
        .unwrap()
        .unwrap();
    let other = message(
        "!other:test",
        "$o",
        1,
        r#"{"url":"mxc://t/o","info":{"mimetype":"image/png"}}"#,
    );
    store.persist_event(other).await.unwrap().unwrap();

    let ids = |v: Vec<weft_store::StoredEvent>| v.into_iter().map(|e| e.event_id).collect::<Vec<_>>();
    let q = |prefix: Option<&str>| RoomFilesQuery {
        before_position: i64::MAX,
        mimetype_prefix: prefix.map(str::to_owned),
        since_ms: None,
        until_ms: None,
        limit: 100,
    };
    let all = store.room_files(room, q(None)).await.unwrap();
    assert_eq!(all[0].position, positions[9]);
    assert!(all[0].position < red_pos);
    assert_eq!(ids(all), ["$f9", "$f7", "$f6", "$f4", "$f3", "$f1"]);
    // By mimetype prefix, ignoring ASCII case; `%` and `_` are no wildcards.
    assert_eq!(
        ids(store.room_files(room, q(Some("image/"))).await.unwrap()),
        ["$f6", "$f4", "$f1"]
    );
    assert_eq!(
        ids(store.room_files(room, q(Some("Image"))).await.unwrap()),
        ["$f9", "$f6", "$f4", "$f1"]
    );
    assert_eq!(
        ids(store.room_files(room, q(Some("im%age/_"))).await.unwrap()),
        ["$f6", "$f4", "$f1"]
    );
    assert!(store.room_files(room, q(Some("im%e/"))).await.unwrap().is_empty());
    assert!(store.room_files(room, q(Some("ima_e/"))).await.unwrap().is_empty());
    assert!(store.room_files(room, q(Some("video/"))).await.unwrap().is_empty());
    // Before a position, in a time window, limited.
    let older = RoomFilesQuery {
        before_position: positions[6],
        limit: 2,
        ..q(None)
    };
    assert_eq!(ids(store.room_files(room, older).await.unwrap()), ["$f4", "$f3"]);
    let window = RoomFilesQuery {
        since_ms: Some(1003),
        until_ms: Some(1007),
        ..q(None)
    };
    assert_eq!(
        ids(store.room_files(room, window).await.unwrap()),
        ["$f6", "$f4", "$f3"]
    );
    assert_eq!(ids(store.room_files("!other:test", q(None)).await.unwrap()), ["$o1"]);
}

// Rows queued by anyone but the queue reader (and a destination that came
// back) get a stream position naming their destination, once per
// destination and write, which every store on the database sees: the
// leading process's senders are woken by it. The reader's own rows are
// not announced.
async fn rows_queued_outside_the_reader_wake_their_destinations_on_every_store(b: Backend) {
    let a = b.open();
    let other = b.open();
    let before = a.current_position();
    a.queue_federation(
        vec![
            row("x.org", OutboxKind::Edu, "{}"),
            row("x.org", OutboxKind::Pdu, "{}"),
            row("y.org", OutboxKind::Edu, "{}"),
        ],
        None,
    )
    .await
    .unwrap()
    .unwrap();
    a.queue_federation(vec![row("z.org", OutboxKind::Pdu, "{}")], Some(1))
        .await
        .unwrap()
        .unwrap();
    a.announce_destination("w.org").await.unwrap().unwrap();
    let upto = a.current_position();
    assert_eq!(upto, before + 3);
    let outbox = |s: &Arc<dyn Store>| -> Vec<String> {
        s.changes_since(before)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, k)| match k {
                StreamKey::Outbox(d) => Some(d),
                _ => None,
            })
            .collect()
    };
    assert_eq!(outbox(&a), ["x.org", "y.org", "w.org"]);
    if matches!(b, Backend::Postgres(_)) {
        let mut rx = other.subscribe_position();
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.wait_for(|p| *p >= upto))
            .await
            .expect("the other store follows")
            .unwrap();
        assert_eq!(outbox(&other), ["x.org", "y.org", "w.org"]);
    }
    // Positions without rows are not taken again after a restart.
    drop(other);
    drop(a);
    assert_eq!(b.open().current_position(), upto);
}

// On SQLite the one store leads at once. On PostgreSQL exactly one of two
// stores on a database leads. When the leader's lock connection is killed
// (`pg_terminate_backend`), it stops leading before the other starts;
// when the new leader's store is closed, the first leads again.
async fn one_leader_per_database_and_another_takes_over(b: Backend) {
    use std::time::{Duration, Instant};
    let a = b.open();
    let mut la = a.leadership();
    let url = match &b {
        Backend::Sqlite(_) => {
            assert!(*la.borrow());
            return;
        }
        Backend::Postgres(db) => db.url.clone(),
    };
    tokio::time::timeout(Duration::from_secs(15), la.wait_for(|l| *l))
        .await
        .expect("the first store leads")
        .unwrap();
    let other = b.open();
    let lo = other.leadership();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!*lo.borrow(), "the second store does not lead while the first does");
    assert!(*la.borrow(), "the first store still leads");

    // Kill the session holding the lock (in this database).
    let killed = tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query_one(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 30565 AND l.objid = 1718878210 \
             AND d.datname = current_database()",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
    })
    .await
    .unwrap();
    assert_eq!(killed, 1, "one session holds the leader lock");
    let (mut la2, mut lo2) = (la.clone(), lo.clone());
    let lost = tokio::spawn(async move {
        la2.wait_for(|l| !*l).await.unwrap();
        Instant::now()
    });
    let gained = tokio::spawn(async move {
        lo2.wait_for(|l| *l).await.unwrap();
        Instant::now()
    });
    let lost = tokio::time::timeout(Duration::from_secs(15), lost)
        .await
        .expect("the first store stops leading")
        .unwrap();
    let gained = tokio::time::timeout(Duration::from_secs(15), gained)
        .await
        .expect("the second store takes over")
        .unwrap();
    assert!(lost < gained, "the old leader stopped before the new one started");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*la.borrow(), "one leader at a time");
    assert!(*lo.borrow());

    // The new leader's store is closed: the first leads again.
    drop(lo);
    drop(other);
    tokio::time::timeout(Duration::from_secs(15), la.wait_for(|l| *l))
        .await
        .expect("the first store leads again")
        .unwrap();
}
