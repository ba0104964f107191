//! The storage contract of the ephemeral and miscellaneous methods (account
//! data, typing, presence, push, aliases, reports, sliding sync
//! connections, user search, the room directory), run against both
//! backends. The cases up to `aliases_reports_and_sliding_connections` need
//! no persisted event; the last ones persist rooms and memberships.

mod common;
use common::Backend;

both!(
    account_data_since_lists_global_and_room_data_in_order,
    typing_starts_renews_stops_and_expires_in_start_order,
    presence_edits_bump_or_keep_positions_and_expire,
    notifications_list_page_follow_and_count_per_room,
    pushers_start_after_the_newest_notification_and_list_in_order,
    search_users_escapes_like_and_ignores_ascii_case,
    aliases_reports_and_sliding_connections,
    events_after_reads_the_tail_and_the_database,
    rooms_memberships_directory_search_and_presence_visibility,
    unread_counts_and_read_flags_follow_each_rooms_receipts,
);

use std::sync::Arc;

use weft_store::{
    CurrentStateChange, EventKind, NewEvent, NewNotification, NewRoom, NewUser, PresenceRecord, PusherRecord, Report,
    Store, StreamKey,
};

async fn account_data_since_lists_global_and_room_data_in_order(b: Backend) {
    let store = b.open();
    let start = store.current_position();
    let put = |room: Option<&str>, t: &str, json: &str| store.put_account_data("@a:test", room, t, json);
    let p1 = put(None, "m.direct", r#"{"v":1}"#).await.unwrap().unwrap();
    let p2 = put(Some("!r:test"), "m.tag", r#"{"tags":{}}"#).await.unwrap().unwrap();
    let p3 = put(None, "m.push_rules", "{}").await.unwrap().unwrap();
    // Replacing moves the entry to its new position.
    let p4 = put(None, "m.direct", r#"{"v":2}"#).await.unwrap().unwrap();
    store
        .put_account_data("@other:test", None, "m.direct", "{}")
        .await
        .unwrap()
        .unwrap();
    assert!(start < p1 && p1 < p2 && p2 < p3 && p3 < p4);
    let changes = store.changes_since(start).expect("in memory");
    assert_eq!(
        changes[..4],
        [p1, p2, p3, p4].map(|p| (p, StreamKey::User("@a:test".into())))
    );
    let rows = |all: Vec<weft_store::AccountDataRecord>| {
        all.into_iter()
            .map(|r| (r.room_id, r.data_type, r.content_json, r.position))
            .collect::<Vec<_>>()
    };
    let all = rows(store.account_data_since("@a:test", 0, p4).await.unwrap());
    let got: Vec<_> = all
        .iter()
        .map(|(room, t, json, p)| (room.as_deref(), t.as_str(), json.as_str(), *p))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some("!r:test"), "m.tag", r#"{"tags":{}}"#, p2),
            (None, "m.push_rules", "{}", p3),
            (None, "m.direct", r#"{"v":2}"#, p4),
        ]
    );
    // (since, upto]: both ends.
    let mid = store.account_data_since("@a:test", p2, p3).await.unwrap();
    assert_eq!(mid.len(), 1);
    assert_eq!(mid[0].data_type, "m.push_rules");
    assert!(
        store
            .account_data_since("@a:test", p4, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .account_data_since("@nobody:test", 0, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    // Global and room data of the same type are distinct.
    assert_eq!(
        store
            .get_account_data("@a:test", Some("!r:test"), "m.direct")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .get_account_data("@a:test", None, "m.direct")
            .await
            .unwrap()
            .as_deref(),
        Some(r#"{"v":2}"#)
    );
    drop(store);
    let store = b.open();
    assert_eq!(rows(store.account_data_since("@a:test", 0, p4).await.unwrap()), all);
}

async fn typing_starts_renews_stops_and_expires_in_start_order(b: Backend) {
    let store = b.open();
    let now = weft_core::now_ms();
    let later = now + 60_000;
    let start = store.current_position();
    assert_eq!(store.typing("!r:test", now).await.unwrap(), (vec![], 0));
    assert_eq!(store.next_ephemeral_deadline(None).await.unwrap(), None);
    let set = |user: &str, until: Option<u64>| store.set_typing("!r:test", user, until);
    let pc = set("@c:test", Some(later)).await.unwrap().unwrap().expect("a start");
    let pa = set("@a:test", Some(later + 5))
        .await
        .unwrap()
        .unwrap()
        .expect("a start");
    let pb = set("@b:test", Some(later)).await.unwrap().unwrap().expect("a start");
    assert!(start < pc && pc < pa && pa < pb);
    // Renewing takes no position and keeps the typer's place.
    assert_eq!(set("@c:test", Some(later + 10)).await.unwrap().unwrap(), None);
    assert_eq!(store.current_position(), pb);
    let (users, p) = store.typing("!r:test", now).await.unwrap();
    assert_eq!(users, vec!["@c:test", "@a:test", "@b:test"]);
    assert_eq!(p, pb);
    // Stopping: a change; stopping again: none.
    let stop = set("@a:test", None).await.unwrap().unwrap().expect("a stop");
    assert!(stop > pb);
    assert_eq!(set("@a:test", None).await.unwrap().unwrap(), None);
    assert_eq!(
        store.typing("!r:test", now).await.unwrap(),
        (vec!["@c:test".to_owned(), "@b:test".to_owned()], stop)
    );
    // Who is past their expiry does not type (at `now_ms` of the reader).
    assert_eq!(
        store.typing("!r:test", later).await.unwrap().0,
        vec!["@c:test".to_owned()]
    );
    // A row already expired that types again is a start.
    let other = store
        .set_typing("!s:test", "@d:test", Some(5))
        .await
        .unwrap()
        .unwrap()
        .expect("a start");
    assert_eq!(
        store.typing("!s:test", now).await.unwrap(),
        (Vec::<String>::new(), other)
    );
    assert_eq!(store.next_ephemeral_deadline(None).await.unwrap(), Some(5));
    let again = store
        .set_typing("!s:test", "@d:test", Some(10))
        .await
        .unwrap()
        .unwrap()
        .expect("expired: typing again is a change");
    assert!(again > other);
    let changes = store.changes_since(start).expect("in memory");
    assert_eq!(
        changes.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>(),
        ["!r:test", "!r:test", "!r:test", "!r:test", "!s:test", "!s:test"]
            .map(|r| StreamKey::Typing(r.into()))
            .to_vec()
    );
    // Expiry at `later`: @b (at later) and @d go; each room changes once.
    let before = store.current_position();
    let rooms = store.expire_typing(later).await.unwrap().unwrap();
    assert_eq!(rooms, vec!["!r:test", "!s:test"]);
    let changes = store.changes_since(before).expect("in memory");
    assert_eq!(
        changes,
        vec![
            (before + 1, StreamKey::Typing("!r:test".into())),
            (before + 2, StreamKey::Typing("!s:test".into())),
        ]
    );
    assert_eq!(
        store.typing("!r:test", now).await.unwrap(),
        (vec!["@c:test".to_owned()], before + 1)
    );
    assert_eq!(store.typing("!s:test", 0).await.unwrap(), (vec![], before + 2));
    assert_eq!(store.next_ephemeral_deadline(None).await.unwrap(), Some(later + 10));
    // Nothing due: no positions.
    assert!(store.expire_typing(later).await.unwrap().unwrap().is_empty());
    assert_eq!(store.current_position(), before + 2);
}

fn presence(user: &str, state: &str, last_active_ms: u64, online_until_ms: u64) -> PresenceRecord {
    PresenceRecord {
        user_id: user.into(),
        presence: state.into(),
        status_msg: None,
        last_active_ms,
        online_until_ms,
        position: 0,
    }
}

async fn presence_edits_bump_or_keep_positions_and_expire(b: Backend) {
    let store = b.open();
    let start = store.current_position();
    assert_eq!(store.presence("@a:test").await.unwrap(), None);
    // An edit answering None writes nothing.
    let none = store
        .edit_presence(
            "@a:test",
            Box::new(|old| {
                assert!(old.is_none());
                None
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(none, None);
    assert_eq!(store.presence("@a:test").await.unwrap(), None);
    let edit =
        |user: &str, rec: PresenceRecord, bump: bool| store.edit_presence(user, Box::new(move |_| Some((rec, bump))));
    let mut a = presence("@a:test", "online", 1_000, 0);
    a.status_msg = Some("hi".into());
    let pa = edit("@a:test", a.clone(), true)
        .await
        .unwrap()
        .unwrap()
        .expect("bumped");
    assert!(pa > start);
    let got = store.presence("@a:test").await.unwrap().expect("stored");
    assert_eq!(
        got,
        PresenceRecord {
            position: pa,
            ..a.clone()
        }
    );
    // Not bumped: stored, keeps its position, takes none.
    let quiet = presence("@a:test", "online", 2_000, 0);
    assert_eq!(edit("@a:test", quiet.clone(), false).await.unwrap().unwrap(), None);
    assert_eq!(store.current_position(), pa);
    assert_eq!(
        store.presence("@a:test").await.unwrap(),
        Some(PresenceRecord { position: pa, ..quiet })
    );
    // The edit sees the stored record.
    let seen = store
        .edit_presence(
            "@a:test",
            Box::new(|old| {
                let old = old.expect("stored");
                assert_eq!(old.last_active_ms, 2_000);
                None
            }),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, None);
    // A panicking edit fails alone.
    let panicked = store
        .edit_presence("@a:test", Box::new(|_| panic!("an edit with a bug")))
        .await
        .unwrap();
    assert!(panicked.is_err());
    let pb = edit("@b:test", presence("@b:test", "online", 1_000, 50_000), true)
        .await
        .unwrap()
        .unwrap()
        .expect("bumped");
    let pc = edit("@c:test", presence("@c:test", "unavailable", 10, 40_000), true)
        .await
        .unwrap()
        .unwrap()
        .expect("bumped");
    let pd = edit("@d:test", presence("@d:test", "offline", 10, 0), true)
        .await
        .unwrap()
        .unwrap()
        .expect("bumped");
    let changes = store.changes_since(start).expect("in memory");
    assert_eq!(
        changes,
        vec![
            (pa, StreamKey::Presence("@a:test".into())),
            (pb, StreamKey::Presence("@b:test".into())),
            (pc, StreamKey::Presence("@c:test".into())),
            (pd, StreamKey::Presence("@d:test".into())),
        ]
    );
    // Without shared rooms a viewer sees their own presence only.
    let own = store.presence_since("@a:test", 0, pd).await.unwrap();
    assert_eq!(
        own.iter().map(|p| (p.user_id.as_str(), p.position)).collect::<Vec<_>>(),
        vec![("@a:test", pa)]
    );
    assert!(store.presence_since("@a:test", pa, pd).await.unwrap().is_empty());
    // Deadlines: typing none; presence: @c gone at 40_000, @b at 50_000;
    // online @a idle at 2_000 + idle, @b at 1_000 + idle.
    assert_eq!(store.next_ephemeral_deadline(None).await.unwrap(), None);
    assert_eq!(
        store.next_ephemeral_deadline(Some(100_000)).await.unwrap(),
        Some(40_000)
    );
    assert_eq!(store.next_ephemeral_deadline(Some(10_000)).await.unwrap(), Some(11_000));
    // At 11_500 with idle 10_000: @b idle (unavailable); @a not yet.
    let before = store.current_position();
    let changed = store.expire_presence(11_500, 10_000).await.unwrap().unwrap();
    assert_eq!(changed, vec!["@b:test"]);
    let b_now = store.presence("@b:test").await.unwrap().expect("stored");
    assert_eq!(
        (b_now.presence.as_str(), b_now.online_until_ms, b_now.position),
        ("unavailable", 50_000, before + 1)
    );
    // At 60_000: @a idle; @b and @c gone (offline first, their deadline
    // cleared); @d already offline.
    let changed = store.expire_presence(60_000, 10_000).await.unwrap().unwrap();
    assert_eq!(changed, vec!["@a:test", "@b:test", "@c:test"]);
    let mut got = Vec::new();
    for u in ["@a:test", "@b:test", "@c:test", "@d:test"] {
        let p = store.presence(u).await.unwrap().expect("stored");
        got.push((p.presence, p.online_until_ms, p.position));
    }
    assert_eq!(
        got,
        vec![
            ("unavailable".to_owned(), 0, before + 2),
            ("offline".to_owned(), 0, before + 3),
            ("offline".to_owned(), 0, before + 4),
            ("offline".to_owned(), 0, pd),
        ]
    );
    assert_eq!(
        store.changes_since(before).expect("in memory"),
        vec![
            (before + 1, StreamKey::Presence("@b:test".into())),
            (before + 2, StreamKey::Presence("@a:test".into())),
            (before + 3, StreamKey::Presence("@b:test".into())),
            (before + 4, StreamKey::Presence("@c:test".into())),
        ]
    );
    assert!(store.expire_presence(60_000, 10_000).await.unwrap().unwrap().is_empty());
    assert_eq!(store.next_ephemeral_deadline(Some(10_000)).await.unwrap(), None);
    drop(store);
    let store = b.open();
    assert_eq!(
        store.presence("@a:test").await.unwrap().map(|p| p.position),
        Some(before + 2)
    );
}

fn notification(user: &str, room: &str, n: u32, thread: &str, highlight: bool) -> NewNotification {
    NewNotification {
        user_id: user.into(),
        room_id: room.into(),
        event_id: format!("$e{n}"),
        event_position: 100 + n as i64,
        thread_id: thread.into(),
        actions_json: format!(r#"["notify",{{"n":{n}}}]"#),
        highlight,
        ts: 1000 + n as u64,
    }
}

// Without read receipts on stored events every row is unread (a receipt
// for an event the server does not have reads nothing).
async fn notifications_list_page_follow_and_count_per_room(b: Backend) {
    let store = b.open();
    let before = store.current_position();
    // No rows: just the evaluated position, no stream position.
    store.add_notifications(Vec::new(), 7).await.unwrap().unwrap();
    assert_eq!(store.current_position(), before);
    assert_eq!(store.get_meta("push_evaluated").await.unwrap().as_deref(), Some("7"));
    let rows = vec![
        notification("@u:test", "!b:test", 1, "main", false),
        notification("@u:test", "!a:test", 2, "main", true),
        notification("@u:test", "!b:test", 3, "$t", true),
        notification("@u:test", "!a:test", 4, "", false),
        notification("@v:test", "!a:test", 5, "main", false),
        notification("@u:test", "!b:test", 6, "main", false),
    ];
    store.add_notifications(rows, 42).await.unwrap().unwrap();
    assert_eq!(store.current_position(), before + 6);
    assert_eq!(store.get_meta("push_evaluated").await.unwrap().as_deref(), Some("42"));
    let changes = store.changes_since(before).expect("in memory");
    let keys: Vec<_> = [
        ("@u:test", "!b:test"),
        ("@u:test", "!a:test"),
        ("@u:test", "!b:test"),
        ("@u:test", "!a:test"),
        ("@v:test", "!a:test"),
        ("@u:test", "!b:test"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (u, r))| (before + 1 + i as i64, StreamKey::Notification((*u).into(), (*r).into())))
    .collect();
    assert_eq!(changes, keys);
    store
        .put_receipt(weft_store::ReceiptRecord {
            room_id: "!b:test".into(),
            receipt_type: "m.read".into(),
            user_id: "@u:test".into(),
            thread_id: String::new(),
            event_id: "$not-here".into(),
            ts: 1,
            position: 0,
        })
        .await
        .unwrap()
        .unwrap();
    let mut counts: Vec<_> = store
        .unread_counts("@u:test", None)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.room_id, c.thread_id, c.notifications, c.highlights))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        vec![
            ("!a:test".into(), "main".into(), 1, 1),
            ("!b:test".into(), "$t".into(), 1, 1),
            ("!b:test".into(), "main".into(), 2, 0),
        ]
    );
    let b_only: Vec<_> = store
        .unread_counts("@u:test", Some("!b:test"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.room_id, c.thread_id, c.notifications, c.highlights))
        .collect();
    assert_eq!(
        b_only,
        vec![
            ("!b:test".into(), "$t".into(), 1, 1),
            ("!b:test".into(), "main".into(), 2, 0),
        ]
    );
    assert!(store.unread_counts("@nobody:test", None).await.unwrap().is_empty());
    // Newest first, all fields, none read.
    let listed = store.notifications("@u:test", None, 10, false).await.unwrap();
    let got: Vec<_> = listed
        .iter()
        .map(|n| (n.event_id.as_str(), n.room_id.as_str(), n.read))
        .collect();
    assert_eq!(
        got,
        vec![
            ("$e6", "!b:test", false),
            ("$e4", "!a:test", false),
            ("$e3", "!b:test", false),
            ("$e2", "!a:test", false),
            ("$e1", "!b:test", false),
        ]
    );
    let e3 = &listed[2];
    assert_eq!(
        (
            e3.position,
            e3.user_id.as_str(),
            e3.event_position,
            e3.thread_id.as_str(),
            e3.actions_json.as_str(),
            e3.highlight,
            e3.ts
        ),
        (before + 3, "@u:test", 103, "$t", r#"["notify",{"n":3}]"#, true, 1003)
    );
    // Pages: before a position, a limit, highlights only.
    let page = store
        .notifications("@u:test", Some(e3.position), 1, false)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|n| n.event_id.as_str()).collect::<Vec<_>>(),
        vec!["$e2"]
    );
    let high = store.notifications("@u:test", None, 10, true).await.unwrap();
    assert_eq!(
        high.iter().map(|n| n.event_id.as_str()).collect::<Vec<_>>(),
        vec!["$e3", "$e2"]
    );
    let after = store.notifications_after("@u:test", before + 2, 2).await.unwrap();
    assert_eq!(
        after.iter().map(|n| n.event_id.as_str()).collect::<Vec<_>>(),
        vec!["$e3", "$e4"]
    );
    assert!(
        store
            .notifications_after("@u:test", before + 6, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.notifications("@v:test", None, 10, false).await.unwrap().len(), 1);
}

fn pusher(user: &str, app: &str, key: &str) -> PusherRecord {
    PusherRecord {
        user_id: user.into(),
        app_id: app.into(),
        pushkey: key.into(),
        pusher_json: format!(r#"{{"k":"{key}"}}"#),
        pushkey_ts: 5,
        last_sent: 0,
        from_event: 0,
    }
}

async fn pushers_start_after_the_newest_notification_and_list_in_order(b: Backend) {
    let store = b.open();
    // Before any notification: from position 0, and from the stream's head.
    store
        .put_account_data("@z:test", None, "x", "{}")
        .await
        .unwrap()
        .unwrap();
    let head = store.current_position();
    store.set_pusher(pusher("@b:test", "app2", "k1"), false).await.unwrap();
    let got = store.pushers(None).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].last_sent, got[0].from_event, got[0].pushkey_ts), (0, head, 5));
    store
        .add_notifications(vec![notification("@a:test", "!r:test", 1, "main", false)], 1)
        .await
        .unwrap()
        .unwrap();
    let newest = store.current_position();
    store.set_pusher(pusher("@b:test", "app1", "k2"), false).await.unwrap();
    store.set_pusher(pusher("@a:test", "app2", "k1"), true).await.unwrap();
    store.set_pusher(pusher("@b:test", "app1", "k1"), false).await.unwrap();
    let all = store.pushers(None).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|p| (p.user_id.as_str(), p.app_id.as_str(), p.pushkey.as_str(), p.last_sent))
            .collect::<Vec<_>>(),
        vec![
            ("@a:test", "app2", "k1", newest),
            ("@b:test", "app1", "k1", newest),
            ("@b:test", "app1", "k2", newest),
            ("@b:test", "app2", "k1", 0),
        ]
    );
    assert_eq!(all[1].pusher_json, r#"{"k":"k1"}"#);
    let b_only = store.pushers(Some("@b:test")).await.unwrap();
    assert_eq!(b_only.len(), 3);
    // Replacing updates the JSON and timestamp, keeps the place.
    let mut changed = pusher("@b:test", "app2", "k1");
    changed.pusher_json = r#"{"new":true}"#.into();
    changed.pushkey_ts = 9;
    store.pusher_sent("@b:test", "app2", "k1", 3).await.unwrap();
    store.set_pusher(changed, false).await.unwrap();
    let again = store.pushers(Some("@b:test")).await.unwrap();
    let p = again.iter().find(|p| p.app_id == "app2").expect("kept");
    assert_eq!(
        (p.pusher_json.as_str(), p.pushkey_ts, p.last_sent, p.from_event),
        (r#"{"new":true}"#, 9, 3, head)
    );
    // Not appended: @a's pusher of the same app and key went.
    assert_eq!(
        store
            .pushers(None)
            .await
            .unwrap()
            .iter()
            .map(|p| (p.user_id.as_str(), p.app_id.as_str(), p.pushkey.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("@b:test", "app1", "k1"),
            ("@b:test", "app1", "k2"),
            ("@b:test", "app2", "k1")
        ]
    );
    // Unknown pushers: no-ops.
    store.pusher_sent("@nobody:test", "app2", "k1", 99).await.unwrap();
    assert!(!store.delete_pusher("@nobody:test", "app2", "k1").await.unwrap());
    assert_eq!(store.pushers(None).await.unwrap().len(), 3);
}

async fn user(store: &Arc<dyn Store>, id: &str) {
    store
        .create_user(NewUser {
            user_id: id.into(),
            password_hash: None,
            admin: id.to_lowercase().contains("admin"),
            created_ms: 77,
        })
        .await
        .unwrap();
}

// The requester always finds themselves: no room needed.
async fn search_users_escapes_like_and_ignores_ascii_case(b: Backend) {
    let store = b.open();
    for id in ["@Admin_1:test", "@ab%c:test", "@abxc:test", "@Ébc:test"] {
        user(&store, id).await;
    }
    let ids = |found: Vec<weft_store::UserRecord>| found.into_iter().map(|u| u.user_id).collect::<Vec<_>>();
    let me = store.search_users("@Admin_1:test", "ADMIN", 10).await.unwrap();
    assert_eq!(me.len(), 1);
    assert_eq!(
        (me[0].user_id.as_str(), me[0].admin, me[0].deactivated, me[0].created_ms),
        ("@Admin_1:test", true, false, 77)
    );
    assert!(me[0].password_hash.is_none());
    // `_` and `%` match themselves only.
    assert_eq!(
        ids(store.search_users("@Admin_1:test", "n_1", 10).await.unwrap()),
        vec!["@Admin_1:test"]
    );
    assert!(store.search_users("@Admin_1:test", "n_x", 10).await.unwrap().is_empty());
    assert!(store.search_users("@Admin_1:test", "a%1", 10).await.unwrap().is_empty());
    assert_eq!(
        ids(store.search_users("@ab%c:test", "B%C", 10).await.unwrap()),
        vec!["@ab%c:test"]
    );
    assert!(store.search_users("@abxc:test", "b%c", 10).await.unwrap().is_empty());
    assert!(store.search_users("@abxc:test", "\\", 10).await.unwrap().is_empty());
    // Case folds for ASCII only, on both backends (SQLite's lower() and
    // LIKE, PostgreSQL's lower() under COLLATE "C").
    assert!(store.search_users("@Ébc:test", "ébc", 10).await.unwrap().is_empty());
    assert_eq!(ids(store.search_users("@Ébc:test", "ÉBC", 10).await.unwrap()).len(), 0);
    assert_eq!(
        ids(store.search_users("@Ébc:test", "BC", 10).await.unwrap()),
        vec!["@Ébc:test"]
    );
    // Other users who share no room are not found; a limit of 0 finds none.
    assert!(store.search_users("@abxc:test", "ab", 0).await.unwrap().is_empty());
    assert_eq!(
        ids(store.search_users("@abxc:test", "ab", 10).await.unwrap()),
        vec!["@abxc:test"]
    );
}

async fn aliases_reports_and_sliding_connections(b: Backend) {
    let store = b.open();
    // Aliases (no room row needed).
    assert!(store.create_alias("#b:test", "!r:test", "@a:test").await.unwrap());
    assert!(!store.create_alias("#b:test", "!other:test", "@x:test").await.unwrap());
    assert!(store.create_alias("#a:test", "!r:test", "@c:test").await.unwrap());
    assert!(store.create_alias("#z:test", "!s:test", "@c:test").await.unwrap());
    let got = store.resolve_alias("#b:test").await.unwrap().expect("exists");
    assert_eq!(
        (got.alias.as_str(), got.room_id.as_str(), got.creator.as_str()),
        ("#b:test", "!r:test", "@a:test")
    );
    assert!(store.resolve_alias("#B:test").await.unwrap().is_none(), "case matters");
    assert_eq!(store.room_aliases("!r:test").await.unwrap(), vec!["#a:test", "#b:test"]);
    assert!(store.delete_alias("#b:test").await.unwrap());
    assert!(!store.delete_alias("#b:test").await.unwrap());
    assert!(store.resolve_alias("#b:test").await.unwrap().is_none());
    assert_eq!(store.room_aliases("!r:test").await.unwrap(), vec!["#a:test"]);
    assert!(store.room_aliases("!none:test").await.unwrap().is_empty());
    // Reports: IDs increase; listed newest first.
    assert!(store.reports(10).await.unwrap().is_empty());
    let report = |n: u64, room: Option<&str>| Report {
        id: 0,
        reporter: format!("@r{n}:test"),
        room_id: room.map(str::to_owned),
        event_id: room.map(|_| format!("$e{n}")),
        target_user: room.is_none().then(|| "@bad:test".to_owned()),
        reason: (n != 2).then(|| format!("reason {n}")),
        received_ms: 1000 + n,
    };
    let r1 = store.add_report(report(1, Some("!r:test"))).await.unwrap();
    let r2 = store.add_report(report(2, None)).await.unwrap();
    let r3 = store.add_report(report(3, Some("!s:test"))).await.unwrap();
    assert!(r1 < r2 && r2 < r3);
    let listed = store.reports(2).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[0],
        Report {
            id: r3,
            ..report(3, Some("!s:test"))
        }
    );
    assert_eq!(
        listed[1],
        Report {
            id: r2,
            ..report(2, None)
        }
    );
    assert_eq!(store.reports(10).await.unwrap().len(), 3);
    // Sliding sync connections: per (user, device, connection).
    assert_eq!(store.sliding_connection("@a:test", "D", "c1").await.unwrap(), None);
    store
        .put_sliding_connection("@a:test", "D", "c1", r#"{"v":1}"#)
        .await
        .unwrap();
    store
        .put_sliding_connection("@a:test", "D", "c2", r#"{"v":2}"#)
        .await
        .unwrap();
    store
        .put_sliding_connection("@a:test", "D", "c1", r#"{"v":3}"#)
        .await
        .unwrap();
    assert_eq!(
        store.sliding_connection("@a:test", "D", "c1").await.unwrap().as_deref(),
        Some(r#"{"v":3}"#)
    );
    assert_eq!(
        store.sliding_connection("@a:test", "D", "c2").await.unwrap().as_deref(),
        Some(r#"{"v":2}"#)
    );
    assert_eq!(store.sliding_connection("@a:test", "E", "c1").await.unwrap(), None);
    drop(store);
    let store = b.open();
    assert_eq!(
        store.sliding_connection("@a:test", "D", "c1").await.unwrap().as_deref(),
        Some(r#"{"v":3}"#)
    );
    assert_eq!(store.reports(10).await.unwrap().len(), 3);
    assert_eq!(store.room_aliases("!s:test").await.unwrap(), vec!["#z:test"]);
}

/// An event of `room` with ID `id` (`create`: the room's first), a
/// membership when `member` is (user, membership).
fn event(room: &str, id: &str, n: u32, create: bool, member: Option<(&str, &str)>) -> NewEvent {
    let (event_type, state_key) = match (create, member) {
        (true, _) => ("m.room.create".to_owned(), Some(String::new())),
        (false, Some((u, _))) => ("m.room.member".to_owned(), Some(u.to_owned())),
        (false, None) => ("m.room.message".to_owned(), None),
    };
    let current_state = state_key.as_ref().map(|k| CurrentStateChange {
        group: n as i64,
        changes: vec![(event_type.clone(), k.clone(), id.to_owned())],
    });
    NewEvent {
        event_id: id.to_owned(),
        room_id: room.to_owned(),
        event_type,
        state_key,
        sender: member.map_or("@alice:test", |(u, _)| u).to_owned(),
        origin_server_ts: 1000 + n as u64,
        pdu_json: format!(r#"{{"n":{n}}}"#),
        new_room: create.then(|| NewRoom {
            room_version: "10".into(),
            creator: "@alice:test".into(),
        }),
        membership: member.map(|(_, m)| m.to_owned()),
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
        current_state,
        expect_extremities: None,
        rebase: None,
    }
}

// Needs persist_event (rooms area).
async fn events_after_reads_the_tail_and_the_database(b: Backend) {
    let store = b.open();
    let start = store.current_position();
    let mut positions = vec![
        store
            .persist_event(event("!r:test", "$c", 0, true, None))
            .await
            .unwrap()
            .unwrap(),
    ];
    for n in 1..6 {
        positions.push(
            store
                .persist_event(event("!r:test", &format!("$m{n}"), n, false, None))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let head = store.current_position();
    let ids = |evs: Vec<weft_store::StoredEvent>| evs.into_iter().map(|e| (e.position, e.event_id)).collect::<Vec<_>>();
    let all = store.events_after(start, head, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[2].pdu_json, r#"{"n":2}"#);
    let want: Vec<_> = positions
        .iter()
        .zip(["$c", "$m1", "$m2", "$m3", "$m4", "$m5"])
        .map(|(p, id)| (*p, id.to_owned()))
        .collect();
    assert_eq!(ids(all.clone()), want);
    assert_eq!(all[0].state_key.as_deref(), Some(""));
    assert_eq!(all[1].sender, "@alice:test");
    let window = ids(store.events_after(positions[1], positions[4], 2).await.unwrap());
    assert_eq!(window, want[2..4].to_vec());
    // Reopened: the tail is empty, the database answers the same.
    drop(store);
    let store = b.open();
    let full = |evs: Vec<weft_store::StoredEvent>| {
        evs.into_iter()
            .map(|e| {
                (
                    e.position,
                    e.event_id,
                    e.room_id,
                    e.event_type,
                    e.state_key,
                    e.sender,
                    e.origin_server_ts,
                    e.pdu_json,
                    e.redacted_by,
                    e.txn,
                )
            })
            .collect::<Vec<_>>()
    };
    let again = store.events_after(start, head, 100).await.unwrap();
    assert_eq!(full(again), full(all));
    let window2 = ids(store.events_after(positions[1], positions[4], 2).await.unwrap());
    assert_eq!(window2, window);
    assert!(store.events_after(head, head, 10).await.unwrap().is_empty());
}

// Needs persist_event (rooms area): rooms and memberships.
async fn rooms_memberships_directory_search_and_presence_visibility(b: Backend) {
    let store = b.open();
    for id in ["@alice:test", "@bob:test", "@carol:test", "@dave:test"] {
        user(&store, id).await;
    }
    let persist = |ev: NewEvent| store.persist_event(ev);
    persist(event("!pub:test", "$p0", 0, true, None))
        .await
        .unwrap()
        .unwrap();
    persist(event("!pub:test", "$p1", 1, false, Some(("@alice:test", "join"))))
        .await
        .unwrap()
        .unwrap();
    persist(event("!pub:test", "$p2", 2, false, Some(("@carol:test", "join"))))
        .await
        .unwrap()
        .unwrap();
    persist(event("!priv:test", "$q0", 10, true, None))
        .await
        .unwrap()
        .unwrap();
    persist(event("!priv:test", "$q1", 11, false, Some(("@alice:test", "join"))))
        .await
        .unwrap()
        .unwrap();
    persist(event("!priv:test", "$q2", 12, false, Some(("@bob:test", "join"))))
        .await
        .unwrap()
        .unwrap();
    persist(event("!priv:test", "$q3", 13, false, Some(("@dave:test", "invite"))))
        .await
        .unwrap()
        .unwrap();
    assert!(store.share_room("@alice:test", "@bob:test").await.unwrap());
    assert!(store.share_room("@bob:test", "@alice:test").await.unwrap());
    assert!(!store.share_room("@bob:test", "@carol:test").await.unwrap());
    assert!(
        !store.share_room("@alice:test", "@dave:test").await.unwrap(),
        "invited only"
    );
    // The directory.
    assert!(store.public_rooms().await.unwrap().is_empty());
    store.set_room_public("!pub:test", true).await.unwrap();
    store.set_room_public("!priv:test", true).await.unwrap();
    assert_eq!(store.public_rooms().await.unwrap(), vec!["!priv:test", "!pub:test"]);
    store.set_room_public("!priv:test", false).await.unwrap();
    assert_eq!(store.public_rooms().await.unwrap(), vec!["!pub:test"]);
    // Search: shared rooms, or joined to a public room.
    let ids = |found: Vec<weft_store::UserRecord>| found.into_iter().map(|u| u.user_id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.search_users("@bob:test", "test", 10).await.unwrap()),
        vec!["@alice:test", "@bob:test", "@carol:test"]
    );
    assert_eq!(
        ids(store.search_users("@dave:test", "test", 10).await.unwrap()),
        vec!["@alice:test", "@carol:test", "@dave:test"]
    );
    assert_eq!(
        ids(store.search_users("@dave:test", "test", 2).await.unwrap()),
        vec!["@alice:test", "@carol:test"]
    );
    // Presence: a viewer sees who shares a joined room with them.
    let start = store.current_position();
    let mut pos = Vec::new();
    for u in ["@alice:test", "@bob:test", "@carol:test", "@dave:test"] {
        let rec = PresenceRecord {
            user_id: u.into(),
            presence: "online".into(),
            status_msg: None,
            last_active_ms: 1,
            online_until_ms: 0,
            position: 0,
        };
        pos.push(
            store
                .edit_presence(u, Box::new(move |_| Some((rec, true))))
                .await
                .unwrap()
                .unwrap()
                .expect("bumped"),
        );
    }
    let seen = |viewer: &'static str| {
        let store = store.clone();
        async move {
            store
                .presence_since(viewer, start, i64::MAX)
                .await
                .unwrap()
                .into_iter()
                .map(|p| (p.user_id, p.position))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        seen("@bob:test").await,
        vec![("@alice:test".into(), pos[0]), ("@bob:test".into(), pos[1])]
    );
    assert_eq!(
        seen("@alice:test").await,
        vec![
            ("@alice:test".into(), pos[0]),
            ("@bob:test".into(), pos[1]),
            ("@carol:test".into(), pos[2]),
        ]
    );
    assert_eq!(seen("@dave:test").await, vec![("@dave:test".into(), pos[3])]);
}

fn receipt(room: &str, user: &str, receipt_type: &str, thread: &str, event_id: &str) -> weft_store::ReceiptRecord {
    weft_store::ReceiptRecord {
        room_id: room.into(),
        receipt_type: receipt_type.into(),
        user_id: user.into(),
        thread_id: thread.into(),
        event_id: event_id.into(),
        ts: 1,
        position: 0,
    }
}

// Needs persist_event (rooms area): receipts count at the position of the
// event they point at. A room's receipts (unthreaded or of a thread) read
// that room's rows only; other users' receipts and other receipt types
// read nothing.
async fn unread_counts_and_read_flags_follow_each_rooms_receipts(b: Backend) {
    let store = b.open();
    let mut pos = std::collections::HashMap::new();
    for (i, (room, id)) in [
        ("!a:test", "$a0"),
        ("!b:test", "$b0"),
        ("!a:test", "$a1"),
        ("!b:test", "$b1"),
        ("!a:test", "$a2"),
        ("!b:test", "$b2"),
        ("!a:test", "$a3"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = store
            .persist_event(event(room, id, i as u32, id.ends_with('0'), None))
            .await
            .unwrap()
            .unwrap();
        pos.insert(id, p);
    }
    let row = |room: &str, id: &str, thread: &str, highlight: bool| NewNotification {
        user_id: "@u:test".into(),
        room_id: room.into(),
        event_id: id.into(),
        event_position: pos[id],
        thread_id: thread.into(),
        actions_json: "[]".into(),
        highlight,
        ts: 5,
    };
    store
        .add_notifications(
            vec![
                row("!a:test", "$a1", "main", false),
                row("!b:test", "$b1", "main", false),
                row("!a:test", "$a2", "$t", false),
                row("!b:test", "$b2", "$t", true),
                row("!a:test", "$a3", "main", true),
            ],
            pos["$a3"],
        )
        .await
        .unwrap()
        .unwrap();
    for r in [
        receipt("!a:test", "@u:test", "m.read", "", "$a2"),
        receipt("!a:test", "@u:test", "m.read.private", "$t", "$a3"),
        receipt("!b:test", "@u:test", "m.read", "main", "$b1"),
        receipt("!b:test", "@v:test", "m.read", "", "$b2"),
        receipt("!b:test", "@u:test", "m.fully_read", "", "$b2"),
    ] {
        store.put_receipt(r).await.unwrap().unwrap();
    }
    let counts = |room: Option<&'static str>| {
        let store = store.clone();
        async move {
            let mut got: Vec<_> = store
                .unread_counts("@u:test", room)
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.room_id, c.thread_id, c.notifications, c.highlights))
                .collect();
            got.sort();
            got
        }
    };
    assert_eq!(
        counts(None).await,
        vec![
            ("!a:test".into(), "main".into(), 1, 1),
            ("!b:test".into(), "$t".into(), 1, 1),
        ]
    );
    assert_eq!(
        counts(Some("!b:test")).await,
        vec![("!b:test".into(), "$t".into(), 1, 1)]
    );
    let listed = store.notifications("@u:test", None, 10, false).await.unwrap();
    assert_eq!(
        listed.iter().map(|n| (n.event_id.as_str(), n.read)).collect::<Vec<_>>(),
        vec![
            ("$a3", false),
            ("$b2", false),
            ("$a2", true),
            ("$b1", true),
            ("$a1", true),
        ]
    );
    // Reading the rest of !b: its unthreaded receipt at $b2.
    store
        .put_receipt(receipt("!b:test", "@u:test", "m.read", "", "$b2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counts(None).await, vec![("!a:test".into(), "main".into(), 1, 1)]);
    let high = store.notifications("@u:test", None, 10, true).await.unwrap();
    assert_eq!(
        high.iter().map(|n| (n.event_id.as_str(), n.read)).collect::<Vec<_>>(),
        vec![("$a3", false), ("$b2", true)]
    );
}
