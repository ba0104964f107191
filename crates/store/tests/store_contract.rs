//! The storage contract, run against the SQLite backend (and, once it
//! exists, the PostgreSQL one): ordered positions, group-committed writes,
//! state at a position, membership history, idempotency records, and the
//! in-memory record of what each position touched, end-to-end-encryption
//! keys and to-device messages.

mod common;
use common::Backend;

both!(
    concurrent_writes_get_ordered_positions_and_are_durable,
    state_at_a_position_and_membership_history,
    recent_changes_name_rooms_and_users_and_waiters_wake,
    a_failing_write_does_not_undo_its_batch_neighbours,
    device_keys_one_time_keys_claims_and_fallback,
    device_list_changes_are_scoped_to_shared_rooms,
    to_device_messages_are_positioned_idempotent_and_acked,
    cross_signing_keys_and_signatures_are_device_list_changes,
    recent_and_old_event_reads_agree_including_redactions,
    device_psks_are_found_by_identity_and_die_with_their_device,
    renaming_a_device_is_a_device_list_change_only_with_keys,
    account_data_edits_read_and_write_in_one_write,
    a_panicking_account_data_edit_does_not_stop_the_writer,
    receipts_replace_per_key_and_take_positions,
    notifications_take_positions_and_count_after_receipts,
    pushers_replace_append_and_remember_what_they_sent,
    an_event_whose_parent_failed_to_commit_is_refused,
    extremities_follow_the_dag_and_events_off_the_stream_stay_off_it,
    current_state_can_point_at_an_earlier_outlier
);

use std::sync::Arc;

use weft_store::{
    CurrentStateChange, DeviceTarget, Direction, EventKind, KeySignature, KeyUpload, NewEvent, NewRoom, NewToDevice,
    NewUser, ReceiptRecord, Store, StreamKey,
};

fn event(room: &str, n: u32, state: Option<(&str, &str, Option<&str>)>) -> NewEvent {
    let (event_type, state_key, membership) = match state {
        Some((t, k, m)) => (t.to_owned(), Some(k.to_owned()), m.map(str::to_owned)),
        None => ("org.weft.telemetry".to_owned(), None, None),
    };
    let current_state = state_key.as_ref().map(|k| CurrentStateChange {
        group: n as i64,
        changes: vec![(event_type.clone(), k.clone(), format!("$e{n}"))],
    });
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
        relation: None,
        search_text: None,
        prev_events: Vec::new(),
        auth_events: Vec::new(),
        depth: n as i64,
        kind: EventKind::Timeline,
        state_before: None,
        state_after: None,
        new_groups: Vec::new(),
        current_state,
        expect_extremities: None,
        rebase: None,
    }
}

/// Gives a test event another ID (its state change names it too).
fn renamed(mut ev: NewEvent, id: &str) -> NewEvent {
    ev.event_id = id.to_owned();
    if let Some(cs) = &mut ev.current_state {
        for change in &mut cs.changes {
            change.2 = id.to_owned();
        }
    }
    ev
}

async fn concurrent_writes_get_ordered_positions_and_are_durable(b: Backend) {
    let store = b.open();
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

    let store = b.open();
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

async fn state_at_a_position_and_membership_history(b: Backend) {
    let store = b.open();
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

async fn recent_changes_name_rooms_and_users_and_waiters_wake(b: Backend) {
    let store = b.open();
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
    let store = b.open();
    assert!(store.changes_since(start).is_none());
    assert_eq!(store.changes_since(p2), Some(vec![]));
}

async fn a_failing_write_does_not_undo_its_batch_neighbours(b: Backend) {
    let store = b.open();
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

async fn device(store: &Arc<dyn Store>, user: &str, device: &str) {
    store
        .upsert_device(user, device, Some("phone"), format!("{user}/{device}").as_bytes())
        .await
        .unwrap();
}

fn otks(ids: &[&str]) -> Vec<(String, String)> {
    ids.iter()
        .map(|id| (format!("signed_curve25519:{id}"), format!(r#"{{"key":"{id}"}}"#)))
        .collect()
}

async fn device_keys_one_time_keys_claims_and_fallback(b: Backend) {
    let store = b.open();
    device(&store, "@a:test", "D1").await;
    let start = store.current_position();
    let keys = r#"{"device_id":"D1","keys":{"ed25519:D1":"k"},"signatures":{"@a:test":{"ed25519:D1":"sig"}},"user_id":"@a:test"}"#;
    let counts = store
        .upload_keys(
            "@a:test",
            "D1",
            KeyUpload {
                device_keys: Some(keys.into()),
                one_time_keys: otks(&["A", "B"]),
                fallback_keys: vec![("signed_curve25519:F".into(), r#"{"key":"F","fallback":true}"#.into())],
            },
        )
        .await
        .unwrap();
    assert_eq!(counts.get("signed_curve25519"), Some(&2));
    // The device-key upload took a stream position, announced as DeviceKeys.
    let p1 = store.current_position();
    assert!(p1 > start);
    assert_eq!(
        store.changes_since(start).unwrap(),
        vec![(p1, StreamKey::DeviceKeys("@a:test".into()))]
    );
    // The same keys again change nothing; a one-time key ID reused with
    // other content is refused, and the whole upload with it.
    store
        .upload_keys(
            "@a:test",
            "D1",
            KeyUpload {
                device_keys: Some(keys.into()),
                one_time_keys: otks(&["A"]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(store.current_position(), p1);
    let clash = store
        .upload_keys(
            "@a:test",
            "D1",
            KeyUpload {
                one_time_keys: vec![
                    ("signed_curve25519:C".into(), "{}".into()),
                    ("signed_curve25519:A".into(), r#"{"key":"other"}"#.into()),
                ],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(clash.unwrap_err().errcode(), "M_INVALID_PARAM");
    assert_eq!(
        store
            .one_time_key_counts("@a:test", "D1")
            .await
            .unwrap()
            .get("signed_curve25519"),
        Some(&2)
    );

    let got = store.get_device_keys("@a:test", &[]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].keys_json, keys, "stored verbatim");
    assert_eq!(got[0].display_name.as_deref(), Some("phone"));
    assert!(
        store
            .get_device_keys("@a:test", &["NOPE".into()])
            .await
            .unwrap()
            .is_empty()
    );

    // Claims take one-time keys (oldest ID first), then the fallback key,
    // which stays and is marked used.
    let want = || vec![("@a:test".to_owned(), "D1".to_owned(), "signed_curve25519".to_owned())];
    assert_eq!(
        store.unused_fallback_key_types("@a:test", "D1").await.unwrap(),
        ["signed_curve25519"]
    );
    let c1 = store.claim_keys(want()).await.unwrap();
    let c2 = store.claim_keys(want()).await.unwrap();
    assert_eq!(c1[0].key_id, "signed_curve25519:A");
    assert_eq!(c2[0].key_id, "signed_curve25519:B");
    assert!(store.one_time_key_counts("@a:test", "D1").await.unwrap().is_empty());
    for _ in 0..2 {
        let f = store.claim_keys(want()).await.unwrap();
        assert_eq!(f[0].key_id, "signed_curve25519:F");
    }
    assert!(
        store
            .unused_fallback_key_types("@a:test", "D1")
            .await
            .unwrap()
            .is_empty()
    );
    // A new fallback key is unused again; nothing for unknown devices.
    store
        .upload_keys(
            "@a:test",
            "D1",
            KeyUpload {
                fallback_keys: vec![("signed_curve25519:G".into(), "{}".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.unused_fallback_key_types("@a:test", "D1").await.unwrap(),
        ["signed_curve25519"]
    );
    let none = store
        .claim_keys(vec![("@a:test".into(), "D9".into(), "signed_curve25519".into())])
        .await
        .unwrap();
    assert!(none.is_empty());

    // Deleting the device deletes its keys and is a device-list change.
    store.delete_device("@a:test", "D1").await.unwrap();
    assert!(store.get_device_keys("@a:test", &[]).await.unwrap().is_empty());
    assert!(
        store
            .unused_fallback_key_types("@a:test", "D1")
            .await
            .unwrap()
            .is_empty()
    );
    let p2 = store.current_position();
    assert!(p2 > p1);
    assert_eq!(store.device_list_changes("@a:test", p1, p2).await.unwrap(), ["@a:test"]);
}

async fn device_list_changes_are_scoped_to_shared_rooms(b: Backend) {
    let store = b.open();
    let room = "!k:test";
    store
        .persist_event(event(room, 0, Some(("m.room.create", "", None))))
        .await
        .unwrap()
        .unwrap();
    for (n, u) in [(1, "@a:test"), (2, "@b:test")] {
        store
            .persist_event(event(room, n, Some(("m.room.member", u, Some("join")))))
            .await
            .unwrap()
            .unwrap();
    }
    let p0 = store.current_position();
    for u in ["@a:test", "@b:test", "@c:test"] {
        device(&store, u, "D").await;
        store
            .upload_keys(
                u,
                "D",
                KeyUpload {
                    device_keys: Some(format!(r#"{{"user_id":"{u}"}}"#)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let p1 = store.current_position();
    // c shares no room with a: not reported to a.
    assert_eq!(
        store.device_list_changes("@a:test", p0, p1).await.unwrap(),
        ["@a:test", "@b:test"]
    );
    assert_eq!(store.device_list_changes("@c:test", p0, p1).await.unwrap(), ["@c:test"]);
    assert!(store.device_list_changes("@a:test", p1, p1).await.unwrap().is_empty());
    // c joining the room is a change for a (c's devices are now to be tracked).
    store
        .persist_event(event(room, 3, Some(("m.room.member", "@c:test", Some("join")))))
        .await
        .unwrap()
        .unwrap();
    let p2 = store.current_position();
    assert_eq!(store.device_list_changes("@a:test", p1, p2).await.unwrap(), ["@c:test"]);
    // ... and, for c, every member of the room it joined.
    assert_eq!(
        store.device_list_changes("@c:test", p1, p2).await.unwrap(),
        ["@a:test", "@b:test"]
    );
    assert!(store.device_list_left("@a:test", p0, p2).await.unwrap().is_empty());
    // b leaves: a and c share no room with b any more, and b none with them.
    store
        .persist_event(event(room, 4, Some(("m.room.member", "@b:test", Some("leave")))))
        .await
        .unwrap()
        .unwrap();
    let p3 = store.current_position();
    assert_eq!(store.device_list_left("@a:test", p2, p3).await.unwrap(), ["@b:test"]);
    assert_eq!(
        store.device_list_left("@b:test", p2, p3).await.unwrap(),
        ["@a:test", "@c:test"]
    );
    assert!(store.device_list_left("@a:test", p3, p3).await.unwrap().is_empty());
    // A user still sharing another room is not "left".
    let other = "!k2:test";
    let create = renamed(event(other, 0, Some(("m.room.create", "", None))), "$o0");
    store.persist_event(create).await.unwrap().unwrap();
    for (n, u) in [(1, "@a:test"), (2, "@c:test")] {
        let mut ev = renamed(
            event(other, n, Some(("m.room.member", u, Some("join")))),
            &format!("$o{n}"),
        );
        ev.txn = None;
        store.persist_event(ev).await.unwrap().unwrap();
    }
    let p4 = store.current_position();
    let mut leave = event(room, 5, Some(("m.room.member", "@c:test", Some("leave"))));
    leave.txn = None;
    store.persist_event(leave).await.unwrap().unwrap();
    let p5 = store.current_position();
    assert!(store.device_list_left("@a:test", p4, p5).await.unwrap().is_empty());
}

async fn to_device_messages_are_positioned_idempotent_and_acked(b: Backend) {
    let store = b.open();
    for d in ["D1", "D2"] {
        device(&store, "@b:test", d).await;
    }
    let start = store.current_position();
    let msgs = || {
        vec![
            NewToDevice {
                user_id: "@b:test".into(),
                target: DeviceTarget::All,
                content_json: r#"{"n":1}"#.into(),
            },
            NewToDevice {
                user_id: "@b:test".into(),
                target: DeviceTarget::One("GONE".into()),
                content_json: r#"{"n":2}"#.into(),
            },
        ]
    };
    assert!(store.send_to_device("@a:test", "A", "m.x", "t1", msgs()).await.unwrap());
    // Same transaction again: nothing stored.
    assert!(!store.send_to_device("@a:test", "A", "m.x", "t1", msgs()).await.unwrap());
    let p = store.current_position();
    // One position per recipient device (the unknown device got nothing),
    // each announced for the recipient user.
    assert_eq!(p, start + 2);
    assert_eq!(
        store.changes_since(start).unwrap(),
        vec![
            (start + 1, StreamKey::User("@b:test".into())),
            (start + 2, StreamKey::User("@b:test".into()))
        ]
    );
    let d1 = store.to_device_messages("@b:test", "D1", 0, p, 10).await.unwrap();
    assert_eq!(d1.len(), 1);
    assert_eq!((d1[0].sender.as_str(), d1[0].event_type.as_str()), ("@a:test", "m.x"));
    assert_eq!(d1[0].content_json, r#"{"n":1}"#);
    assert!(
        store
            .to_device_messages("@b:test", "D1", d1[0].position, p, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Acknowledging deletes only that device's messages up to the position.
    store.ack_to_device("@b:test", "D1", p).await.unwrap();
    assert!(
        store
            .to_device_messages("@b:test", "D1", 0, p, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.to_device_messages("@b:test", "D2", 0, p, 10).await.unwrap().len(),
        1
    );

    // Positions of deleted messages are not reused after a restart (nor
    // the one the deletion took to announce the revocation).
    store.delete_device("@b:test", "D2").await.unwrap();
    let before = store.current_position();
    assert_eq!(before, p + 1, "the revocation's position");
    drop(store);
    let store = b.open();
    assert_eq!(store.current_position(), before);
}

async fn cross_signing_keys_and_signatures_are_device_list_changes(b: Backend) {
    let store = b.open();
    let p0 = store.current_position();
    store
        .put_cross_signing_keys(
            "@a:test",
            vec![
                ("master".into(), r#"{"k":1}"#.into()),
                ("self_signing".into(), r#"{"k":2}"#.into()),
            ],
        )
        .await
        .unwrap();
    let p1 = store.current_position();
    assert!(p1 > p0);
    assert_eq!(store.device_list_changes("@a:test", p0, p1).await.unwrap(), ["@a:test"]);
    // The same keys again change nothing.
    store
        .put_cross_signing_keys("@a:test", vec![("master".into(), r#"{"k":1}"#.into())])
        .await
        .unwrap();
    assert_eq!(store.current_position(), p1);
    store
        .put_cross_signing_keys("@a:test", vec![("master".into(), r#"{"k":3}"#.into())])
        .await
        .unwrap();
    assert_eq!(
        store.get_cross_signing_keys("@a:test").await.unwrap(),
        vec![
            ("master".to_owned(), r#"{"k":3}"#.to_owned()),
            ("self_signing".to_owned(), r#"{"k":2}"#.to_owned())
        ]
    );
    let p2 = store.current_position();
    assert!(p2 > p1);

    let sig = |s: &str| KeySignature {
        target_user: "@a:test".into(),
        target_key: "D1".into(),
        signer_user: "@a:test".into(),
        signer_key: "ed25519:SELF".into(),
        signature: s.into(),
    };
    store.add_key_signatures(vec![sig("one")]).await.unwrap();
    store.add_key_signatures(vec![sig("two")]).await.unwrap();
    assert_eq!(store.key_signatures("@a:test").await.unwrap(), vec![sig("two")]);
    let p3 = store.current_position();
    assert_eq!(store.device_list_changes("@a:test", p2, p3).await.unwrap(), ["@a:test"]);
    // Deleting the signed device deletes the signatures of it.
    device(&store, "@a:test", "D1").await;
    store.delete_device("@a:test", "D1").await.unwrap();
    assert!(store.key_signatures("@a:test").await.unwrap().is_empty());
    // Deactivation removes the cross-signing identity, visibly.
    store.deactivate_user("@a:test").await.unwrap();
    assert!(store.get_cross_signing_keys("@a:test").await.unwrap().is_empty());
    let p4 = store.current_position();
    assert!(p4 > p3);
    assert_eq!(store.device_list_changes("@a:test", p3, p4).await.unwrap(), ["@a:test"]);
}

/// Reads of the newest events (served from memory by SQLite's store) and of
/// older ones (from the database) give the same answers, across two rooms,
/// in both directions, with a redaction applied to both.
async fn recent_and_old_event_reads_agree_including_redactions(b: Backend) {
    let store = b.open();
    let mut pending = vec![
        store.persist_event(event("!a:test", 0, Some(("m.room.create", "", None)))),
        store.persist_event({
            let mut e = renamed(event("!b:test", 0, Some(("m.room.create", "", None))), "$b0");
            e.txn = None;
            e
        }),
    ];
    // More events than the in-memory tail holds, interleaved over two rooms.
    for n in 1..6000u32 {
        let room = if n % 3 == 0 { "!b:test" } else { "!a:test" };
        let mut e = event(room, n, None);
        e.txn = None;
        pending.push(store.persist_event(e));
    }
    let mut positions = Vec::new();
    for p in pending {
        positions.push(p.await.unwrap().unwrap());
    }
    // Redact a recent event of room a.
    let mut red = event("!a:test", 6000, None);
    red.event_type = "m.room.redaction".into();
    red.txn = None;
    red.redaction = Some(("$e5998".into(), r#"{"redacted":true}"#.into()));
    let red_pos = store.persist_event(red).await.unwrap().unwrap();

    // From memory (recent) and from a reopened store (database only).
    let check = |evs: &[weft_store::StoredEvent]| {
        evs.iter()
            .map(|e| {
                (
                    e.position,
                    e.event_id.clone(),
                    e.pdu_json.clone(),
                    e.redacted_by.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let since = positions[5900];
    let fresh = store
        .room_events("!a:test", since, red_pos + 1, Direction::Forward, 50)
        .await
        .unwrap();
    let fresh_back = store
        .room_events("!b:test", i64::MAX, since, Direction::Backward, 20)
        .await
        .unwrap();
    let old = store
        .room_events("!a:test", positions[10], i64::MAX, Direction::Forward, 5)
        .await
        .unwrap();
    let fresh_after = store.events_after(since, red_pos - 3, 60).await.unwrap();
    let fresh_after_all = store.events_after(since, red_pos, 1000).await.unwrap();
    drop(store);
    let store = b.open();
    let disk_after = store.events_after(since, red_pos - 3, 60).await.unwrap();
    let disk_after_all = store.events_after(since, red_pos, 1000).await.unwrap();
    assert_eq!(check(&fresh_after), check(&disk_after));
    assert_eq!(check(&fresh_after_all), check(&disk_after_all));
    assert_eq!(fresh_after.len(), 60);
    assert_eq!(fresh_after[0].position, since + 1);
    assert!(fresh_after.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(fresh_after_all.last().map(|e| e.position), Some(red_pos));
    assert!(fresh_after_all.iter().any(|e| e.pdu_json == r#"{"redacted":true}"#));
    let disk = store
        .room_events("!a:test", since, red_pos + 1, Direction::Forward, 50)
        .await
        .unwrap();
    let disk_back = store
        .room_events("!b:test", i64::MAX, since, Direction::Backward, 20)
        .await
        .unwrap();
    assert_eq!(check(&fresh), check(&disk));
    assert_eq!(check(&fresh_back), check(&disk_back));
    assert_eq!(fresh.len(), 50);
    assert!(fresh.iter().all(|e| e.room_id == "!a:test" && e.position > since));
    assert!(fresh.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(fresh_back.len(), 20);
    assert_eq!(fresh_back[0].event_id, "$e5997", "newest of room b first");
    assert!(fresh_back.windows(2).all(|w| w[0].position > w[1].position));
    let redacted = fresh.iter().chain(disk.iter()).filter(|e| e.event_id == "$e5998");
    for e in redacted {
        assert_eq!(e.pdu_json, r#"{"redacted":true}"#);
        assert_eq!(e.redacted_by.as_deref(), Some("$e6000"));
    }
    let old_ids: Vec<_> = old.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(old_ids, ["$e10", "$e11", "$e13", "$e14", "$e16"]);
}

async fn device_psks_are_found_by_identity_and_die_with_their_device(b: Backend) {
    let store = b.open();
    for u in ["@a:test", "@b:test"] {
        store
            .create_user(NewUser {
                user_id: u.into(),
                password_hash: None,
                admin: false,
                created_ms: 1,
            })
            .await
            .unwrap();
    }
    assert!(store.lookup_psk("id-1").await.unwrap().is_none());

    // A new device is created for the key (without an access token).
    store
        .set_device_psk("@a:test", "SENSOR", "id-1", b"key-one")
        .await
        .unwrap();
    let devices = store.list_devices("@a:test").await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, "SENSOR");
    let owner = store.lookup_psk("id-1").await.unwrap().expect("psk found");
    assert_eq!(
        (owner.user_id.as_str(), owner.device_id.as_str(), owner.psk.as_slice()),
        ("@a:test", "SENSOR", b"key-one".as_slice())
    );
    assert!(!format!("{owner:?}").contains("key-one"), "Debug hides the key");

    // An existing device keeps its token; minting again replaces the key.
    device(&store, "@a:test", "PHONE").await;
    store
        .set_device_psk("@a:test", "PHONE", "id-2", b"key-two")
        .await
        .unwrap();
    store
        .set_device_psk("@a:test", "PHONE", "id-3", b"key-three")
        .await
        .unwrap();
    assert!(store.lookup_psk("id-2").await.unwrap().is_none());
    assert_eq!(store.lookup_psk("id-3").await.unwrap().unwrap().psk, b"key-three");
    assert!(store.lookup_token(b"@a:test/PHONE").await.unwrap().is_some());
    assert_eq!(store.list_devices("@a:test").await.unwrap().len(), 2);

    // Identities are unique server-wide.
    assert!(store.set_device_psk("@b:test", "X", "id-1", b"other").await.is_err());
    assert_eq!(store.lookup_psk("id-1").await.unwrap().unwrap().user_id, "@a:test");
    // No key for an unknown user.
    assert!(store.set_device_psk("@nobody:test", "X", "id-9", b"k").await.is_err());

    // Deleting a device deletes its key; deactivating deletes them all.
    store.set_device_psk("@b:test", "B1", "id-b1", b"kb1").await.unwrap();
    store.set_device_psk("@b:test", "B2", "id-b2", b"kb2").await.unwrap();
    store.delete_device("@a:test", "SENSOR").await.unwrap();
    assert!(store.lookup_psk("id-1").await.unwrap().is_none());
    assert!(store.lookup_psk("id-3").await.unwrap().is_some());
    store.delete_devices_except("@a:test", None).await.unwrap();
    assert!(store.lookup_psk("id-3").await.unwrap().is_none());
    store.deactivate_user("@b:test").await.unwrap();
    assert!(store.lookup_psk("id-b1").await.unwrap().is_none());
    assert!(store.lookup_psk("id-b2").await.unwrap().is_none());
    assert!(store.set_device_psk("@b:test", "B3", "id-b3", b"kb3").await.is_err());

    // Keys survive a restart.
    store.set_device_psk("@a:test", "S2", "id-s2", b"ks2").await.unwrap();
    drop(store);
    let store = b.open();
    assert_eq!(store.lookup_psk("id-s2").await.unwrap().unwrap().device_id, "S2");
}

async fn renaming_a_device_is_a_device_list_change_only_with_keys(b: Backend) {
    let store = b.open();
    device(&store, "@a:test", "D1").await;
    device(&store, "@a:test", "D2").await;
    let keys = r#"{"device_id":"D1","keys":{"ed25519:D1":"k"},"user_id":"@a:test"}"#;
    store
        .upload_keys(
            "@a:test",
            "D1",
            KeyUpload {
                device_keys: Some(keys.into()),
                one_time_keys: Vec::new(),
                fallback_keys: Vec::new(),
            },
        )
        .await
        .unwrap();

    // A device without keys: renamed, no stream position.
    let p0 = store.current_position();
    assert!(
        store
            .set_device_display_name("@a:test", "D2", Some("lamp"))
            .await
            .unwrap()
    );
    assert_eq!(store.current_position(), p0);
    // A device with keys: renamed, and a device-list change.
    assert!(
        store
            .set_device_display_name("@a:test", "D1", Some("sensor"))
            .await
            .unwrap()
    );
    let p1 = store.current_position();
    assert!(p1 > p0);
    assert_eq!(store.device_list_changes("@a:test", p0, p1).await.unwrap(), ["@a:test"]);
    let names: Vec<_> = store
        .list_devices("@a:test")
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.device_id, d.display_name))
        .collect();
    assert_eq!(
        names,
        [("D1".into(), Some("sensor".into())), ("D2".into(), Some("lamp".into()))]
    );
    // Another user's device, or a missing one: not found, nothing changed.
    assert!(!store.set_device_display_name("@b:test", "D1", Some("x")).await.unwrap());
    assert!(!store.set_device_display_name("@a:test", "D9", Some("x")).await.unwrap());
    assert_eq!(store.current_position(), p1);
    // Cleared.
    assert!(store.set_device_display_name("@a:test", "D2", None).await.unwrap());
    let d2 = store
        .list_devices("@a:test")
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.device_id == "D2");
    assert_eq!(d2.and_then(|d| d.display_name), None);
}

// An edit of account data sees what the last one stored: many racing
// edits are all applied; a failing one stores nothing and takes no
// position.
async fn account_data_edits_read_and_write_in_one_write(b: Backend) {
    let store = b.open();
    let count = |old: Option<String>| -> weft_core::Result<String> {
        let n: u64 = old.map_or(0, |s| s.parse().unwrap_or(0));
        Ok((n + 1).to_string())
    };
    let pending: Vec<_> = (0..50)
        .map(|_| store.edit_account_data("@dan:test", None, "org.weft.count", Box::new(count)))
        .collect();
    let mut positions = Vec::new();
    for p in pending {
        positions.push(p.await.unwrap().unwrap());
    }
    positions.dedup();
    assert_eq!(positions.len(), 50, "one position each: {positions:?}");
    let got = store
        .get_account_data("@dan:test", None, "org.weft.count")
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("50"));

    let before = store.current_position();
    let failed = store
        .edit_account_data(
            "@dan:test",
            None,
            "org.weft.count",
            Box::new(|_| Err(weft_core::Error::not_found("no"))),
        )
        .await
        .unwrap();
    assert_eq!(failed.map_err(|e| e.kind), Err(weft_core::ErrorKind::NotFound));
    assert_eq!(store.current_position(), before);
    let got = store
        .get_account_data("@dan:test", None, "org.weft.count")
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("50"));
    // Per room too: another key.
    let p = store
        .edit_account_data("@dan:test", Some("!r:test"), "org.weft.count", Box::new(count))
        .await
        .unwrap()
        .unwrap();
    assert!(p > before);
    let got = store
        .get_account_data("@dan:test", Some("!r:test"), "org.weft.count")
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("1"));
}

// An edit that panics is an error of its own; the writer goes on.
async fn a_panicking_account_data_edit_does_not_stop_the_writer(b: Backend) {
    let store = b.open();
    let got = store
        .edit_account_data(
            "@dan:test",
            None,
            "org.weft.x",
            Box::new(|_| panic!("an edit with a bug")),
        )
        .await
        .expect("answered");
    assert!(got.is_err());
    let p = store
        .put_account_data("@dan:test", None, "org.weft.x", "{}")
        .await
        .expect("answered")
        .expect("stored");
    assert_eq!(store.current_position(), p);
}

fn receipt(user: &str, receipt_type: &str, thread: &str, event_id: &str, ts: u64) -> ReceiptRecord {
    ReceiptRecord {
        room_id: "!r:test".into(),
        receipt_type: receipt_type.into(),
        user_id: user.into(),
        thread_id: thread.into(),
        event_id: event_id.into(),
        ts,
        position: 0,
    }
}

// A receipt replaces the one of the same (room, type, user, thread), takes
// a new position keyed to its room, and survives a restart (which also
// keeps positions from going back).
async fn receipts_replace_per_key_and_take_positions(b: Backend) {
    let store = b.open();
    let start = store.current_position();
    let put = |r: ReceiptRecord| store.put_receipt(r);
    let p1 = put(receipt("@a:test", "m.read", "", "$1", 10)).await.unwrap().unwrap();
    let p2 = put(receipt("@a:test", "m.read", "main", "$1", 11))
        .await
        .unwrap()
        .unwrap();
    let p3 = put(receipt("@a:test", "m.read.private", "", "$1", 12))
        .await
        .unwrap()
        .unwrap();
    let p4 = put(receipt("@a:test", "m.read", "", "$2", 13)).await.unwrap().unwrap();
    assert!(start < p1 && p1 < p2 && p2 < p3 && p3 < p4);
    let changes = store.changes_since(start).expect("in memory");
    assert_eq!(
        changes,
        [p1, p2, p3, p4]
            .map(|p| (p, StreamKey::Receipt("!r:test".into())))
            .to_vec()
    );
    let all = store.receipts_since("!r:test", 0, p4).await.unwrap();
    let got: Vec<_> = all
        .iter()
        .map(|r| {
            (
                r.receipt_type.as_str(),
                r.thread_id.as_str(),
                r.event_id.as_str(),
                r.ts,
                r.position,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("m.read", "main", "$1", 11, p2),
            ("m.read.private", "", "$1", 12, p3),
            ("m.read", "", "$2", 13, p4),
        ]
    );
    assert_eq!(store.receipts_since("!r:test", p3, p4).await.unwrap().len(), 1);
    assert!(store.receipts_since("!other:test", 0, p4).await.unwrap().is_empty());
    drop(store);
    let store = b.open();
    assert_eq!(store.current_position(), p4);
    assert_eq!(store.receipts_since("!r:test", 0, p4).await.unwrap(), all);
}

fn notification(user: &str, n: u32, event_position: i64, thread: &str, highlight: bool) -> weft_store::NewNotification {
    weft_store::NewNotification {
        user_id: user.into(),
        room_id: "!r:test".into(),
        event_id: format!("$e{n}"),
        event_position,
        thread_id: thread.into(),
        actions_json: r#"["notify"]"#.into(),
        highlight,
        ts: 1000 + n as u64,
    }
}

// Notification rows take stream positions keyed to (user, room), are
// written with the evaluated position in one write, and survive a restart
// (positions never go back); unread counts start after the newest receipt
// that applies (unthreaded, or of the row's thread); invites ('') never
// count.
async fn notifications_take_positions_and_count_after_receipts(b: Backend) {
    let store = b.open();
    let mut pos = Vec::new();
    for n in 0..5 {
        pos.push(store.persist_event(event("!r:test", n, None)).await.unwrap().unwrap());
    }
    let before = store.current_position();
    let rows = vec![
        notification("@b:test", 1, pos[1], "main", false),
        notification("@b:test", 2, pos[2], "main", true),
        notification("@b:test", 3, pos[3], "$e1", false),
        notification("@b:test", 4, pos[4], "", false),
        notification("@c:test", 4, pos[4], "main", false),
    ];
    store.add_notifications(rows, pos[4]).await.unwrap().unwrap();
    let changes = store.changes_since(before).expect("in memory");
    assert_eq!(changes.len(), 5);
    assert_eq!(
        changes[0],
        (before + 1, StreamKey::Notification("@b:test".into(), "!r:test".into()))
    );
    assert_eq!(
        store.get_meta("push_evaluated").await.unwrap(),
        Some(pos[4].to_string())
    );
    let counts = |store: &Arc<dyn Store>| {
        let store = store.clone();
        async move {
            store
                .unread_counts("@b:test", Some("!r:test"))
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.thread_id, c.notifications, c.highlights))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(counts(&store).await, vec![("$e1".into(), 1, 0), ("main".into(), 2, 1)]);
    // A threaded receipt for the thread clears it alone; an unthreaded one
    // at $e2 clears what is at or before it everywhere.
    store
        .put_receipt(receipt("@b:test", "m.read", "$e1", "$e3", 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counts(&store).await, vec![("main".into(), 2, 1)]);
    store
        .put_receipt(receipt("@b:test", "m.read.private", "", "$e2", 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counts(&store).await, Vec::<(String, u64, u64)>::new());
    let listed = store.notifications("@b:test", None, 10, false).await.unwrap();
    let got: Vec<_> = listed.iter().map(|n| (n.event_id.as_str(), n.read)).collect();
    assert_eq!(got, vec![("$e4", false), ("$e3", true), ("$e2", true), ("$e1", true)]);
    let high = store.notifications("@b:test", None, 10, true).await.unwrap();
    assert_eq!(high.len(), 1);
    let page = store
        .notifications("@b:test", Some(listed[1].position), 10, false)
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let after = store
        .notifications_after("@b:test", listed[2].position, 10)
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|n| n.event_id.as_str()).collect::<Vec<_>>(),
        vec!["$e3", "$e4"]
    );
    let last = store.current_position();
    drop(store);
    let store = b.open();
    assert_eq!(store.current_position(), last, "positions never go back");
    assert_eq!(store.unread_counts("@c:test", None).await.unwrap().len(), 1);
}

fn pusher(user: &str, key: &str) -> weft_store::PusherRecord {
    weft_store::PusherRecord {
        user_id: user.into(),
        app_id: "app".into(),
        pushkey: key.into(),
        pusher_json: "{}".into(),
        pushkey_ts: 5,
        last_sent: 0,
        from_event: 0,
    }
}

// A pusher starts after the newest notification row; setting it again
// keeps its place; the same app_id and pushkey of another user goes unless
// appended; last_sent only moves forward.
async fn pushers_replace_append_and_remember_what_they_sent(b: Backend) {
    let store = b.open();
    let p = store.persist_event(event("!r:test", 0, None)).await.unwrap().unwrap();
    store
        .add_notifications(vec![notification("@a:test", 0, p, "main", false)], p)
        .await
        .unwrap()
        .unwrap();
    let newest = store.current_position();
    store.set_pusher(pusher("@a:test", "k"), false).await.unwrap();
    let a = store.pushers(Some("@a:test")).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].last_sent, newest);
    assert_eq!(a[0].from_event, newest);
    store.pusher_sent("@a:test", "app", "k", newest + 5).await.unwrap();
    store.pusher_sent("@a:test", "app", "k", newest + 1).await.unwrap();
    store.set_pusher(pusher("@a:test", "k"), false).await.unwrap();
    assert_eq!(store.pushers(Some("@a:test")).await.unwrap()[0].last_sent, newest + 5);
    store.set_pusher(pusher("@b:test", "k"), true).await.unwrap();
    assert_eq!(store.pushers(None).await.unwrap().len(), 2);
    store.set_pusher(pusher("@b:test", "k"), false).await.unwrap();
    let all = store.pushers(None).await.unwrap();
    assert_eq!(
        all.iter().map(|p| p.user_id.as_str()).collect::<Vec<_>>(),
        vec!["@b:test"]
    );
    assert!(store.delete_pusher("@b:test", "app", "k").await.unwrap());
    assert!(!store.delete_pusher("@b:test", "app", "k").await.unwrap());
    assert!(store.pushers(None).await.unwrap().is_empty());
}

/// A bare DAG event: `prevs` are its prev events (in its PDU too, where
/// the store reads them from).
fn dag_event(room: &str, id: &str, prevs: &[&str], depth: i64, kind: EventKind) -> NewEvent {
    let mut ev = renamed(event(room, 1, None), id);
    ev.txn = None;
    ev.prev_events = prevs.iter().map(|p| p.to_string()).collect();
    ev.pdu_json = serde_json::json!({ "depth": depth, "prev_events": prevs, "auth_events": [] }).to_string();
    ev.depth = depth;
    ev.kind = kind;
    ev
}

/// An event built on one whose write failed (pipelined behind it in the
/// same batch) is refused: no stored event points at a missing parent.
async fn an_event_whose_parent_failed_to_commit_is_refused(b: Backend) {
    let store = b.open();
    let room = "!p:test";
    store
        .persist_event(event(room, 0, Some(("m.room.create", "", None))))
        .await
        .unwrap()
        .unwrap();
    // The parent re-creates the room: its write fails (the room exists).
    let mut parent = dag_event(room, "$parent", &["$e0"], 2, EventKind::Timeline);
    parent.new_room = Some(NewRoom {
        room_version: "10".into(),
        creator: "@alice:test".into(),
    });
    let child = dag_event(room, "$child", &["$parent"], 3, EventKind::Timeline);
    let sibling = dag_event(room, "$sibling", &["$e0"], 2, EventKind::Timeline);
    let (p, c, s) = (
        store.persist_event(parent),
        store.persist_event(child),
        store.persist_event(sibling),
    );
    assert!(p.await.unwrap().is_err());
    assert!(c.await.unwrap().is_err(), "the child of a failed event was stored");
    s.await.unwrap().unwrap();
    assert!(store.get_event("$child").await.unwrap().is_none());
    assert!(store.prev_events("$child").await.unwrap().is_empty());
    let ext: Vec<String> = store
        .extremities(room)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(ext, ["$sibling"]);
}

/// Forward extremities follow the DAG; events off the stream (outliers,
/// backfill, rejected) get positions below every stored one, are never
/// announced, and only backfilled ones are served as timeline.
async fn extremities_follow_the_dag_and_events_off_the_stream_stay_off_it(b: Backend) {
    let store = b.open();
    let room = "!d:test";
    store
        .persist_event(event(room, 0, Some(("m.room.create", "", None))))
        .await
        .unwrap()
        .unwrap();
    let ids = |v: Vec<(String, i64)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
    // Two branches on the create event, then a merge.
    for (id, prevs) in [("$a", &["$e0"][..]), ("$b", &["$e0"][..])] {
        store
            .persist_event(dag_event(room, id, prevs, 2, EventKind::Timeline))
            .await
            .unwrap()
            .unwrap();
    }
    let mut two = ids(store.extremities(room).await.unwrap());
    two.sort();
    assert_eq!(two, ["$a", "$b"]);
    let before = store.current_position();
    store
        .persist_event(dag_event(room, "$m", &["$a", "$b"], 3, EventKind::Timeline))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(store.extremities(room).await.unwrap()), ["$m"]);
    let mut prevs = store.prev_events("$m").await.unwrap();
    prevs.sort();
    assert_eq!(prevs, ["$a", "$b"]);
    // A remote event after a gap: its prev is unknown, it is stored anyway.
    store
        .persist_event(dag_event(room, "$far", &["$unknown"], 9, EventKind::TimelineAfterGap))
        .await
        .unwrap()
        .unwrap();
    let mut ext = ids(store.extremities(room).await.unwrap());
    ext.sort();
    assert_eq!(ext, ["$far", "$m"]);
    let top = store.current_position();
    // Off the stream: positions count down below zero.
    let mut off = Vec::new();
    for (id, kind) in [
        ("$out", EventKind::Outlier),
        ("$old", EventKind::Backfilled),
        ("$bad", EventKind::Rejected("not allowed".into())),
        ("$soft", EventKind::SoftFailed),
    ] {
        off.push(
            store
                .persist_event(dag_event(room, id, &["$e0"], 1, kind))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(off, [-1, -2, -3, -4]);
    assert_eq!(store.current_position(), top, "events off the stream moved it");
    let announced: Vec<String> = store
        .changes_since(before)
        .unwrap()
        .into_iter()
        .filter_map(|(_, k)| match k {
            StreamKey::Room(_) => None,
            other => Some(format!("{other:?}")),
        })
        .collect();
    assert!(announced.is_empty(), "{announced:?}");
    assert_eq!(store.changes_since(before).unwrap().len(), 2);
    // Served: the timeline and the backfilled event, nothing else.
    let served: Vec<String> = store
        .room_events(room, i64::MAX, i64::MIN, Direction::Backward, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(served, ["$far", "$m", "$b", "$a", "$e0", "$old"]);
    let place = store.event_place("$bad").await.unwrap().unwrap();
    assert_eq!(place.rejected.as_deref(), Some("not allowed"));
    assert!(store.event_place("$out").await.unwrap().unwrap().outlier);
    assert!(store.event_place("$soft").await.unwrap().unwrap().soft_failed);
    // Extremities unchanged by any of them.
    assert_eq!(store.extremities(room).await.unwrap().len(), 2);
    // Positions below zero survive a restart.
    drop(store);
    let store = b.open();
    let p = store
        .persist_event(dag_event(room, "$out2", &[], 1, EventKind::Outlier))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p, -5);
}

/// The current state may come to point at an event stored before (an
/// outlier from a join's state): state reads and membership follow it.
async fn current_state_can_point_at_an_earlier_outlier(b: Backend) {
    let store = b.open();
    let room = "!o:test";
    store
        .persist_event(event(room, 0, Some(("m.room.create", "", None))))
        .await
        .unwrap()
        .unwrap();
    let mut member = dag_event(room, "$bob", &[], 1, EventKind::Outlier);
    member.event_type = "m.room.member".into();
    member.state_key = Some("@bob:remote".into());
    member.pdu_json = r#"{"content":{"membership":"join"}}"#.into();
    let outlier_pos = store.persist_event(member).await.unwrap().unwrap();
    assert!(outlier_pos < 0);
    let mut join = dag_event(room, "$join", &["$e0"], 2, EventKind::Timeline);
    join.event_type = "m.room.member".into();
    join.state_key = Some("@alice:test".into());
    join.membership = Some("join".into());
    join.current_state = Some(CurrentStateChange {
        group: 7,
        changes: vec![
            ("m.room.member".into(), "@bob:remote".into(), "$bob".into()),
            ("m.room.member".into(), "@alice:test".into(), "$join".into()),
        ],
    });
    let p = store.persist_event(join).await.unwrap().unwrap();
    let mut state: Vec<String> = store
        .current_state(room)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    state.sort();
    assert_eq!(state, ["$bob", "$e0", "$join"]);
    let at: Vec<String> = store
        .state_at(room, p)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(at.len(), 3, "{at:?}");
    let changed: Vec<String> = store
        .state_changes(room, p - 1, p)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert!(changed.contains(&"$bob".to_owned()));
    assert_eq!(
        store.membership_history(room, "@bob:remote").await.unwrap(),
        [(p, "join".to_owned())]
    );
    let bob = store.user_memberships("@bob:remote").await.unwrap();
    assert_eq!(bob.len(), 1);
    assert_eq!((bob[0].membership.as_str(), bob[0].event_id.as_str()), ("join", "$bob"));
}
