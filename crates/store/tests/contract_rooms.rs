//! The storage contract of the room area not covered by store_contract.rs:
//! room and event reads, relations and threads, full-text search, state
//! groups and the DAG reads, outliers promoted by backfill, remote
//! memberships. Each case runs against SQLite and PostgreSQL.

mod common;
use common::Backend;

both!(
    room_turns_are_one_process_at_a_time_and_waited_for_at_most_five_seconds,
    room_and_event_reads_and_forgetting,
    relations_and_threads_follow_replies_and_redactions,
    search_finds_word_prefixes_in_the_keys_asked,
    state_groups_and_dag_reads,
    a_backfilled_outlier_takes_its_place_in_the_timeline,
    remote_memberships_keep_the_invite_state,
    a_late_prev_event_is_no_extremity,
    a_state_change_naming_a_missing_event_fails_alone,
    a_large_state_change_keeps_the_last_change_of_a_key,
    an_event_built_on_a_stale_view_of_the_room_is_refused,
    state_group_ids_are_reserved_once,
    a_failing_event_in_a_batch_undoes_only_itself,
    the_stream_names_the_state_changes_of_a_room,
    a_message_on_a_room_moved_by_messages_is_built_again_on_it,
);

use std::sync::Arc;

use weft_store::{
    CurrentStateChange, Direction, EventKind, NewEvent, NewRoom, NewStateGroup, Relation, SearchKey, Store, StreamKey,
};

const ROOM: &str = "!r:test";

/// A message event `id` of `ROOM` on `prevs` (also in its PDU, with `auth`).
fn ev(id: &str, prevs: &[&str], auth: &[&str], depth: i64) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        room_id: ROOM.to_owned(),
        event_type: "m.room.message".into(),
        state_key: None,
        sender: "@alice:test".into(),
        origin_server_ts: 1000 + depth as u64,
        pdu_json: serde_json::json!({
            "depth": depth, "prev_events": prevs, "auth_events": auth, "content": { "n": id }
        })
        .to_string(),
        new_room: None,
        membership: None,
        history_visibility: None,
        txn: None,
        redaction: None,
        relation: None,
        search_text: None,
        prev_events: prevs.iter().map(|p| p.to_string()).collect(),
        auth_events: auth.iter().map(|p| p.to_string()).collect(),
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

/// Makes `e` a state event of (`t`, `k`) changing the current state to
/// group `group`.
fn state(mut e: NewEvent, t: &str, k: &str, group: i64) -> NewEvent {
    e.event_type = t.to_owned();
    e.state_key = Some(k.to_owned());
    e.current_state = Some(CurrentStateChange {
        group,
        changes: vec![(t.to_owned(), k.to_owned(), e.event_id.clone())],
    });
    e
}

/// The room's create event `$c` (state group 1, a snapshot).
fn create() -> NewEvent {
    let mut c = state(ev("$c", &[], &[], 1), "m.room.create", "", 1);
    c.new_room = Some(NewRoom {
        room_version: "10".into(),
        creator: "@alice:test".into(),
    });
    c.state_after = Some(1);
    c.new_groups = vec![NewStateGroup {
        id: 1,
        prev_group: None,
        chain: 0,
        entries: vec![("m.room.create".into(), "".into(), "$c".into())],
    }];
    c
}

async fn put(store: &Arc<dyn Store>, e: NewEvent) -> i64 {
    store.persist_event(e).await.unwrap().unwrap()
}

fn ids(evs: &[weft_store::StoredEvent]) -> Vec<&str> {
    evs.iter().map(|e| e.event_id.as_str()).collect()
}

async fn room_and_event_reads_and_forgetting(b: Backend) {
    let store = b.open();
    let start = store.current_position();
    let p_c = put(&store, create()).await;
    let mut m = ev("$m", &["$c"], &["$c"], 2);
    m.txn = Some(("DEV".into(), "t1".into()));
    let p_m = put(&store, m).await;
    let mut other = ev("$o", &[], &[], 1);
    other.room_id = "!other:test".into();
    other.new_room = Some(NewRoom {
        room_version: "11".into(),
        creator: "@bob:test".into(),
    });
    let p_o = put(&store, other).await;

    let info = store.room_info(ROOM).await.unwrap().unwrap();
    assert_eq!(
        (info.room_id.as_str(), info.room_version.as_str(), info.creator.as_str()),
        (ROOM, "10", "@alice:test")
    );
    assert_eq!(
        store.room_info("!other:test").await.unwrap().unwrap().room_version,
        "11"
    );
    assert!(store.room_info("!none:test").await.unwrap().is_none());

    let got = store.get_event("$m").await.unwrap().unwrap();
    assert_eq!(got.position, p_m);
    assert_eq!(got.room_id, ROOM);
    assert_eq!(got.event_type, "m.room.message");
    assert_eq!(got.state_key, None);
    assert_eq!(got.sender, "@alice:test");
    assert_eq!(got.origin_server_ts, 1002);
    assert!(got.pdu_json.contains(r#""n":"$m""#), "{}", got.pdu_json);
    assert_eq!(got.txn, Some(("DEV".to_owned(), "t1".to_owned())));
    assert_eq!(got.redacted_by, None);
    assert_eq!(
        store.get_event("$c").await.unwrap().unwrap().state_key.as_deref(),
        Some("")
    );
    assert!(store.get_event("$none").await.unwrap().is_none());
    // The transaction ID is per event type.
    assert_eq!(
        store
            .txn_event("@alice:test", "DEV", ROOM, "m.room.message", "t1")
            .await
            .unwrap()
            .as_deref(),
        Some("$m")
    );
    assert!(
        store
            .txn_event("@alice:test", "DEV", ROOM, "m.room.topic", "t1")
            .await
            .unwrap()
            .is_none()
    );

    let mut changed = store.rooms_changed(start, p_o).await.unwrap();
    changed.sort();
    assert_eq!(changed, [("!other:test".to_owned(), p_o), (ROOM.to_owned(), p_m)]);
    assert_eq!(store.rooms_changed(p_c, p_m).await.unwrap(), [(ROOM.to_owned(), p_m)]);
    assert!(store.rooms_changed(p_o, p_o + 10).await.unwrap().is_empty());

    // History visibility: this event's value, then another's from its PDU.
    let mut hv = state(ev("$hv1", &["$m"], &["$c"], 3), "m.room.history_visibility", "", 3);
    hv.history_visibility = Some("shared".into());
    let p_hv1 = put(&store, hv).await;
    let mut hv2 = state(ev("$hv2", &["$hv1"], &["$c"], 4), "m.room.history_visibility", "", 4);
    hv2.pdu_json = r#"{"content":{"history_visibility":"joined"},"prev_events":["$hv1"]}"#.into();
    hv2.kind = EventKind::Outlier;
    hv2.current_state = None;
    put(&store, hv2).await;
    let mut points = ev("$msg", &["$hv1"], &["$c"], 4);
    points.current_state = Some(CurrentStateChange {
        group: 5,
        changes: vec![("m.room.history_visibility".into(), "".into(), "$hv2".into())],
    });
    let p_points = put(&store, points).await;
    assert_eq!(
        store.visibility_history(ROOM).await.unwrap(),
        [(p_hv1, "shared".to_owned()), (p_points, "joined".to_owned())]
    );
    assert!(store.visibility_history("!other:test").await.unwrap().is_empty());

    // Forgetting: per user and room, idempotent, undone by joining again.
    assert!(!store.is_forgotten("@bob:test", ROOM).await.unwrap());
    store.forget_room("@bob:test", ROOM).await.unwrap();
    store.forget_room("@bob:test", ROOM).await.unwrap();
    assert!(store.is_forgotten("@bob:test", ROOM).await.unwrap());
    assert!(!store.is_forgotten("@bob:test", "!other:test").await.unwrap());
    assert!(!store.is_forgotten("@carol:test", ROOM).await.unwrap());
    let mut leave = state(ev("$leave", &["$msg"], &["$c"], 5), "m.room.member", "@bob:test", 6);
    leave.membership = Some("leave".into());
    put(&store, leave).await;
    assert!(
        store.is_forgotten("@bob:test", ROOM).await.unwrap(),
        "leaving kept it forgotten"
    );
    let mut join = state(ev("$join", &["$leave"], &["$c"], 6), "m.room.member", "@bob:test", 7);
    join.membership = Some("join".into());
    let p_join = put(&store, join).await;
    assert!(!store.is_forgotten("@bob:test", ROOM).await.unwrap());
    let bob = store.user_memberships("@bob:test").await.unwrap();
    assert_eq!(bob.len(), 1);
    assert_eq!(
        (bob[0].membership.as_str(), bob[0].event_id.as_str(), bob[0].position),
        ("join", "$join", p_join)
    );
    // Membership changes name the user on the stream.
    let changes = store.changes_since(p_points).unwrap();
    assert!(
        changes.contains(&(p_join, StreamKey::User("@bob:test".into()))),
        "{changes:?}"
    );
}

async fn relations_and_threads_follow_replies_and_redactions(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    let mut prev = "$c".to_owned();
    let mut depth = 1;
    let mut positions = std::collections::HashMap::new();
    // (id, sender, relation (rel_type, parent), event type)
    type Step = (
        &'static str,
        &'static str,
        Option<(&'static str, &'static str)>,
        &'static str,
    );
    let script: [Step; 8] = [
        ("$root", "@alice:test", None, "m.room.message"),
        ("$t1", "@bob:test", Some(("m.thread", "$root")), "m.room.message"),
        ("$t2", "@alice:test", Some(("m.thread", "$root")), "m.room.message"),
        ("$a1", "@carol:test", Some(("m.annotation", "$root")), "m.reaction"),
        ("$root2", "@bob:test", None, "m.room.message"),
        ("$t3", "@bob:test", Some(("m.thread", "$root2")), "m.room.message"),
        ("$lost", "@bob:test", Some(("m.thread", "$missing")), "m.room.message"),
        ("$e1", "@carol:test", Some(("m.replace", "$root2")), "m.room.message"),
    ];
    for (id, sender, rel, ty) in script {
        depth += 1;
        let mut e = ev(id, &[&prev], &["$c"], depth);
        e.sender = sender.into();
        e.event_type = ty.into();
        e.relation = rel.map(|(t, p)| Relation {
            rel_type: t.into(),
            parent_event_id: p.into(),
        });
        positions.insert(id, put(&store, e).await);
        prev = id.to_owned();
    }
    // An outlier's relation is not indexed.
    let mut out = ev("$out", &["$c"], &["$c"], 2);
    out.kind = EventKind::Outlier;
    out.relation = Some(Relation {
        rel_type: "m.thread".into(),
        parent_event_id: "$root".into(),
    });
    put(&store, out).await;

    let rel = |rel_type: Option<&'static str>, ty: Option<&'static str>, dir: Direction, limit: usize| {
        let store = store.clone();
        async move {
            let (from, to) = match dir {
                Direction::Forward => (0, i64::MAX),
                Direction::Backward => (i64::MAX, 0),
            };
            let evs = store
                .relations(ROOM, "$root", rel_type, ty, from, to, dir, limit)
                .await
                .unwrap();
            evs.into_iter().map(|e| e.event_id).collect::<Vec<_>>()
        }
    };
    assert_eq!(rel(None, None, Direction::Forward, 10).await, ["$t1", "$t2", "$a1"]);
    assert_eq!(
        rel(Some("m.thread"), None, Direction::Forward, 10).await,
        ["$t1", "$t2"]
    );
    assert_eq!(rel(None, Some("m.reaction"), Direction::Forward, 10).await, ["$a1"]);
    assert_eq!(
        rel(Some("m.thread"), Some("m.reaction"), Direction::Forward, 10).await,
        Vec::<String>::new()
    );
    assert_eq!(rel(None, None, Direction::Backward, 2).await, ["$a1", "$t2"]);
    // Bounds are exclusive.
    let mid = store
        .relations(
            ROOM,
            "$root",
            None,
            None,
            positions["$t1"],
            positions["$a1"],
            Direction::Forward,
            10,
        )
        .await
        .unwrap();
    assert_eq!(ids(&mid), ["$t2"]);
    assert!(
        store
            .relations("!other:test", "$root", None, None, 0, i64::MAX, Direction::Forward, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let threads = |user: &'static str, only: bool, before: i64, limit: usize| {
        let store = store.clone();
        async move {
            store
                .threads(ROOM, user, only, before, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|t| (t.root.event_id, t.count, t.latest_position, t.participated))
                .collect::<Vec<_>>()
        }
    };
    let (t2, t3) = (positions["$t2"], positions["$t3"]);
    assert_eq!(
        threads("@carol:test", false, i64::MAX, 10).await,
        [("$root2".to_owned(), 1, t3, false), ("$root".to_owned(), 2, t2, false)]
    );
    assert_eq!(
        threads("@alice:test", true, i64::MAX, 10).await,
        [("$root".to_owned(), 2, t2, true)]
    );
    assert_eq!(
        threads("@bob:test", true, i64::MAX, 10).await,
        [("$root2".to_owned(), 1, t3, true), ("$root".to_owned(), 2, t2, true)]
    );
    assert_eq!(
        threads("@bob:test", false, t3, 10).await,
        [("$root".to_owned(), 2, t2, true)]
    );
    assert_eq!(
        threads("@bob:test", false, i64::MAX, 1).await,
        [("$root2".to_owned(), 1, t3, true)]
    );

    // A redacted reply is no relation any more.
    let mut red = ev("$red", &["$e1"], &["$c"], 20);
    red.event_type = "m.room.redaction".into();
    red.redaction = Some(("$t1".into(), r#"{"redacted":1}"#.into()));
    put(&store, red).await;
    assert_eq!(rel(None, None, Direction::Forward, 10).await, ["$t2", "$a1"]);
    assert_eq!(
        threads("@bob:test", true, i64::MAX, 10).await,
        [("$root2".to_owned(), 1, t3, true)],
        "bob's only reply to $root is gone"
    );
    let t1 = store.get_event("$t1").await.unwrap().unwrap();
    assert_eq!(t1.pdu_json, r#"{"redacted":1}"#);
    assert_eq!(t1.redacted_by.as_deref(), Some("$red"));
}

async fn search_finds_word_prefixes_in_the_keys_asked(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    let texts = [
        ("$s1", "m.room.message", "Hello brave world"),
        ("$s2", "m.room.message", "help wanted"),
        ("$n", "m.room.name", "Helpful room"),
        ("$tp", "m.room.topic", "about hellos"),
        ("$s3", "m.room.message", "nothing here"),
    ];
    let mut prev = "$c";
    for (n, (id, ty, text)) in texts.iter().enumerate() {
        let mut e = ev(id, &[prev], &["$c"], 2 + n as i64);
        e.event_type = (*ty).into();
        e.search_text = Some((*text).into());
        put(&store, e).await;
        prev = *id;
    }
    let mut out = ev("$so", &["$c"], &["$c"], 2);
    out.kind = EventKind::Outlier;
    out.search_text = Some("hello outlier".into());
    put(&store, out).await;
    let rooms = vec![ROOM.to_owned()];
    let search = |q: &'static str, keys: Vec<SearchKey>, by_rank: bool, offset: usize, limit: usize| {
        let (store, rooms) = (store.clone(), rooms.clone());
        async move {
            let (found, count) = store
                .search_events(&rooms, q, &keys, by_rank, offset, limit)
                .await
                .unwrap();
            (found.into_iter().map(|(e, _)| e.event_id).collect::<Vec<_>>(), count)
        }
    };
    use SearchKey::*;
    assert_eq!(
        search(r#""hel"*"#, vec![Body], false, 0, 10).await,
        (vec!["$s2".to_owned(), "$s1".to_owned()], 2)
    );
    assert_eq!(
        search(r#""hel"*"#, vec![Name, Topic], false, 0, 10).await,
        (vec!["$tp".to_owned(), "$n".to_owned()], 2)
    );
    assert_eq!(search(r#""hel"*"#, vec![Body, Name, Topic], false, 0, 10).await.1, 4);
    assert_eq!(
        search(r#""hel"* "wor"*"#, vec![Body], false, 0, 10).await,
        (vec!["$s1".to_owned()], 1)
    );
    assert_eq!(
        search(r#""hel"*"#, vec![Body], false, 1, 1).await,
        (vec!["$s1".to_owned()], 2)
    );
    assert_eq!(search(r#""xyz"*"#, vec![Body], false, 0, 10).await, (vec![], 0));
    // Ranked: every match, best (lowest rank) first.
    let (found, count) = store
        .search_events(&rooms, r#""hel"*"#, &[Body, Name, Topic], true, 0, 10)
        .await
        .unwrap();
    assert_eq!(count, 4);
    let mut got: Vec<&str> = found.iter().map(|(e, _)| e.event_id.as_str()).collect();
    got.sort();
    assert_eq!(got, ["$n", "$s1", "$s2", "$tp"]);
    assert!(found.windows(2).all(|w| w[0].1 <= w[1].1), "{found:?}");
    assert!(found.iter().all(|(_, rank)| rank.is_finite()));
    // Other rooms, no rooms, no keys: nothing.
    let (found, count) = store
        .search_events(&["!other:test".to_owned()], r#""hel"*"#, &[Body], false, 0, 10)
        .await
        .unwrap();
    assert!(found.is_empty() && count == 0);
    assert_eq!(
        store
            .search_events(&[], r#""hel"*"#, &[Body], false, 0, 10)
            .await
            .unwrap()
            .1,
        0
    );
    assert_eq!(
        store
            .search_events(&rooms, r#""hel"*"#, &[], false, 0, 10)
            .await
            .unwrap()
            .1,
        0
    );
    // A redacted event is found no more.
    let mut red = ev("$red", &["$s3"], &["$c"], 9);
    red.event_type = "m.room.redaction".into();
    red.redaction = Some(("$s1".into(), "{}".into()));
    put(&store, red).await;
    assert_eq!(search(r#""wor"*"#, vec![Body], false, 0, 10).await, (vec![], 0));
    assert_eq!(
        search(r#""hel"*"#, vec![Body], false, 0, 10).await,
        (vec!["$s2".to_owned()], 1)
    );
}

async fn state_groups_and_dag_reads(b: Backend) {
    let store = b.open();
    assert_eq!(store.max_state_group().await.unwrap(), 0);
    put(&store, create()).await;
    let mut join = state(ev("$j", &["$c"], &["$c"], 2), "m.room.member", "@alice:test", 2);
    join.membership = Some("join".into());
    join.state_before = Some(1);
    join.state_after = Some(2);
    join.new_groups = vec![NewStateGroup {
        id: 2,
        prev_group: Some(1),
        chain: 1,
        entries: vec![("m.room.member".into(), "@alice:test".into(), "$j".into())],
    }];
    put(&store, join).await;
    // A message on the join (the linear room moves on), then the name
    // changing the state twice in one delta group.
    let mut m = ev("$m", &["$j"], &["$c", "$j"], 3);
    m.state_before = Some(2);
    m.state_after = Some(2);
    let p_m = put(&store, m).await;
    let mut name = state(ev("$name", &["$m"], &["$c", "$j"], 4), "m.room.name", "", 3);
    name.state_before = Some(2);
    name.state_after = Some(3);
    name.new_groups = vec![NewStateGroup {
        id: 3,
        prev_group: Some(2),
        chain: 2,
        entries: vec![
            ("m.room.name".into(), "".into(), "$name".into()),
            ("m.room.member".into(), "@alice:test".into(), "$j".into()),
        ],
    }];
    put(&store, name).await;

    assert_eq!(store.max_state_group().await.unwrap(), 3);
    assert_eq!(store.room_state_group(ROOM).await.unwrap(), Some((3, 2)));
    assert!(store.room_state_group("!none:test").await.unwrap().is_none());
    assert_eq!(store.state_group_chain(2).await.unwrap(), Some(1));
    assert_eq!(store.state_group_chain(9).await.unwrap(), None);
    let g3 = store.state_group(3).await.unwrap();
    let expected: Vec<((String, String), String)> = vec![
        (("m.room.create".into(), "".into()), "$c".into()),
        (("m.room.member".into(), "@alice:test".into()), "$j".into()),
        (("m.room.name".into(), "".into()), "$name".into()),
    ];
    assert_eq!(g3.into_iter().collect::<Vec<_>>(), expected);
    assert_eq!(store.state_group(1).await.unwrap().len(), 1);
    assert!(store.state_group(42).await.unwrap().is_empty());

    let place = store.event_place("$m").await.unwrap().unwrap();
    assert_eq!((place.room_id.as_str(), place.position, place.depth), (ROOM, p_m, 3));
    assert_eq!((place.state_before, place.state_after), (Some(2), Some(2)));
    assert!(!place.outlier && !place.soft_failed && place.rejected.is_none());
    assert!(store.event_place("$none").await.unwrap().is_none());

    assert_eq!(store.extremities(ROOM).await.unwrap(), [("$name".to_owned(), 4)]);
    assert_eq!(store.prev_events("$name").await.unwrap(), ["$m"]);
    assert!(store.prev_events("$c").await.unwrap().is_empty());
    assert!(store.prev_events("$none").await.unwrap().is_empty());
    let mut chain = store.auth_chain(vec!["$name".into()]).await.unwrap();
    chain.sort();
    assert_eq!(chain, ["$c", "$j"]);
    assert!(store.auth_chain(vec!["$c".into()]).await.unwrap().is_empty());
    // A (rejected) PDU whose edges are no arrays is read without an
    // error (what it answers is not part of the contract).
    let mut odd = ev("$odd", &["$c"], &[], 2);
    odd.kind = EventKind::Rejected("bad".into());
    odd.pdu_json = r#"{"auth_events":{"a":"$c"},"prev_events":"$c"}"#.into();
    put(&store, odd).await;
    store.prev_events("$odd").await.unwrap();
    store.auth_chain(vec!["$odd".into()]).await.unwrap();
    let mut by_id = store
        .events_by_id(vec!["$m".into(), "$c".into(), "$none".into()])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect::<Vec<_>>();
    by_id.sort();
    assert_eq!(by_id, ["$c", "$m"]);
    assert!(store.events_by_id(vec![]).await.unwrap().is_empty());
    // The current state follows the groups' events.
    let now = store.current_state(ROOM).await.unwrap();
    assert_eq!(ids(&now), ["$c", "$j", "$name"]);
}

async fn a_backfilled_outlier_takes_its_place_in_the_timeline(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    // Bob's join arrives first as an outlier (a join's state) ...
    let mut bob = state(ev("$bob", &["$c"], &["$c"], 2), "m.room.member", "@bob:remote", 0);
    bob.current_state = None;
    bob.kind = EventKind::Outlier;
    bob.sender = "@bob:remote".into();
    bob.pdu_json = r#"{"content":{"membership":"join"},"prev_events":["$c"],"auth_events":["$c"]}"#.into();
    let p_out = put(&store, bob.clone()).await;
    assert!(p_out < 0);
    // ... the current state points at it ...
    let mut m = ev("$m", &["$c"], &["$c"], 3);
    m.current_state = Some(CurrentStateChange {
        group: 2,
        changes: vec![("m.room.member".into(), "@bob:remote".into(), "$bob".into())],
    });
    let p_m = put(&store, m).await;
    assert!(
        ids(&store
            .room_events(ROOM, i64::MAX, i64::MIN, Direction::Backward, 10)
            .await
            .unwrap())
        .iter()
        .all(|id| *id != "$bob")
    );
    // ... and backfill brings it as a timeline event (with search text,
    // as a name or topic has).
    bob.kind = EventKind::Backfilled;
    bob.search_text = Some("bob joins".into());
    bob.state_before = Some(1);
    bob.state_after = Some(4);
    bob.new_groups = vec![NewStateGroup {
        id: 4,
        prev_group: Some(1),
        chain: 1,
        entries: vec![("m.room.member".into(), "@bob:remote".into(), "$bob".into())],
    }];
    let p_back = put(&store, bob).await;
    assert!(p_back < p_out, "{p_back} {p_out}");
    let got = store.get_event("$bob").await.unwrap().unwrap();
    assert_eq!(got.position, p_back);
    let place = store.event_place("$bob").await.unwrap().unwrap();
    assert!(!place.outlier);
    assert_eq!((place.state_before, place.state_after), (Some(1), Some(4)));
    assert_eq!(store.state_group(4).await.unwrap().len(), 2);
    let state = store.current_state(ROOM).await.unwrap();
    assert_eq!(
        ids(&state),
        ["$bob", "$c"],
        "ordered by position: the backfilled one is below"
    );
    assert_eq!(ids(&store.state_at(ROOM, p_m).await.unwrap()), ["$bob", "$c"]);
    assert_eq!(ids(&store.state_changes(ROOM, p_m - 1, p_m).await.unwrap()), ["$bob"]);
    assert_eq!(
        ids(&store
            .room_events(ROOM, i64::MAX, i64::MIN, Direction::Backward, 10)
            .await
            .unwrap()),
        ["$m", "$c", "$bob"]
    );
    // Still one row: a later outlier position is not taken by it.
    assert_eq!(store.events_by_id(vec!["$bob".into()]).await.unwrap().len(), 1);
}

async fn remote_memberships_keep_the_invite_state(b: Backend) {
    let store = b.open();
    let invite = |id: &str| {
        let mut e = ev(id, &["$far"], &["$far"], 5);
        e.room_id = "!remote:far".into();
        e.event_type = "m.room.member".into();
        e.state_key = Some("@alice:test".into());
        e.sender = "@bob:far".into();
        e
    };
    let before = store.current_position();
    let p1 = store
        .remote_membership(
            invite("$inv"),
            "@alice:test".into(),
            "invite".into(),
            Some(r#"[{"type":"m.room.name"}]"#.into()),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p1, before + 1);
    assert_eq!(
        store
            .remote_invite_state("!remote:far", "@alice:test")
            .await
            .unwrap()
            .as_deref(),
        Some(r#"[{"type":"m.room.name"}]"#)
    );
    assert!(
        store
            .remote_invite_state("!remote:far", "@bob:far")
            .await
            .unwrap()
            .is_none()
    );
    let place = store.event_place("$inv").await.unwrap().unwrap();
    assert!(place.outlier && place.position < 0);
    let mine = store.user_memberships("@alice:test").await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (
            mine[0].room_id.as_str(),
            mine[0].membership.as_str(),
            mine[0].event_id.as_str(),
            mine[0].position
        ),
        ("!remote:far", "invite", "$inv", p1)
    );
    assert!(
        store
            .changes_since(before)
            .unwrap()
            .contains(&(p1, StreamKey::User("@alice:test".into())))
    );
    // The same event again (a retry) is stored once; a new invite state replaces the old.
    let p2 = store
        .remote_membership(invite("$inv"), "@alice:test".into(), "invite".into(), Some("[]".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p2, p1 + 1);
    assert_eq!(
        store
            .remote_invite_state("!remote:far", "@alice:test")
            .await
            .unwrap()
            .as_deref(),
        Some("[]")
    );
    // Rejecting drops it.
    let p3 = store
        .remote_membership(invite("$rej"), "@alice:test".into(), "leave".into(), None)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .remote_invite_state("!remote:far", "@alice:test")
            .await
            .unwrap()
            .is_none()
    );
    let mine = store.user_memberships("@alice:test").await.unwrap();
    assert_eq!(
        (mine[0].membership.as_str(), mine[0].event_id.as_str(), mine[0].position),
        ("leave", "$rej", p3)
    );
    // Outliers: not in the room's timeline, no room moved.
    assert!(
        store
            .room_events("!remote:far", i64::MAX, i64::MIN, Direction::Backward, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.extremities("!remote:far").await.unwrap().is_empty());
}

async fn a_late_prev_event_is_no_extremity(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    let mut far = ev("$far", &["$gap"], &["$c"], 9);
    far.kind = EventKind::TimelineAfterGap;
    put(&store, far).await;
    let ext = |v: Vec<(String, i64)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$far", "$c"]);
    // The missing event comes (fetched late): it is followed already.
    let mut gap = ev("$gap", &["$c"], &["$c"], 8);
    gap.kind = EventKind::TimelineAfterGap;
    put(&store, gap).await;
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$far"]);
    // A local event on the extremity moves the linear room on.
    let p = put(&store, ev("$next", &["$far"], &["$c"], 10)).await;
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$next"]);
    assert_eq!(store.prev_events("$next").await.unwrap(), ["$far"]);
    // A local event on a stored event that is no extremity forks the room.
    put(&store, ev("$fork", &["$gap"], &["$c"], 9)).await;
    let mut two = ext(store.extremities(ROOM).await.unwrap());
    two.sort();
    assert_eq!(two, ["$fork", "$next"]);
    // A local event on an event never stored is refused.
    assert!(
        store
            .persist_event(ev("$orphan", &["$never"], &["$c"], 11))
            .await
            .unwrap()
            .is_err()
    );
    assert!(store.get_event("$orphan").await.unwrap().is_none());
    assert!(store.current_position() > p);
}

async fn a_state_change_naming_a_missing_event_fails_alone(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    let mut bad = ev("$bad", &["$c"], &["$c"], 2);
    bad.current_state = Some(CurrentStateChange {
        group: 2,
        changes: vec![("m.room.member".into(), "@x:test".into(), "$nowhere".into())],
    });
    let first = store.persist_event(bad);
    let second = store.persist_event(ev("$ok", &["$c"], &["$c"], 2));
    assert!(first.await.unwrap().is_err());
    second.await.unwrap().unwrap();
    assert!(store.get_event("$bad").await.unwrap().is_none());
    assert!(store.user_memberships("@x:test").await.unwrap().is_empty());
    assert_eq!(ids(&store.current_state(ROOM).await.unwrap()), ["$c"]);
    assert_eq!(store.extremities(ROOM).await.unwrap(), [("$ok".to_owned(), 2)]);
}

/// A join's state may change thousands of keys at once; a key named twice
/// ends at its last change (as SQLite's loop leaves it).
async fn a_large_state_change_keeps_the_last_change_of_a_key(b: Backend) {
    let store = b.open();
    let p_c = put(&store, create()).await;
    let mut big = state(ev("$big", &["$c"], &["$c"], 2), "m.room.member", "@u0:test", 2);
    big.membership = Some("join".into());
    let mut changes: Vec<(String, String, String)> = (0..2000)
        .map(|i| ("m.room.member".to_owned(), format!("@u{i}:test"), "$big".to_owned()))
        .collect();
    changes.push(("m.room.member".into(), "@u5:test".into(), "$c".into()));
    big.current_state = Some(CurrentStateChange { group: 2, changes });
    let p = put(&store, big).await;
    // One row per key: the create event's, 1999 at $big, @u5's at $c.
    let now = store.current_state(ROOM).await.unwrap();
    assert_eq!(now.len(), 2001);
    assert_eq!(now.iter().filter(|e| e.event_id == "$big").count(), 1999);
    assert_eq!(now.iter().filter(|e| e.event_id == "$c").count(), 2);
    let mine = store.user_memberships("@u7:test").await.unwrap();
    assert_eq!(
        (mine[0].membership.as_str(), mine[0].event_id.as_str(), mine[0].position),
        ("join", "$big", p)
    );
    let u5 = store.user_memberships("@u5:test").await.unwrap();
    assert_eq!((u5[0].membership.as_str(), u5[0].event_id.as_str()), ("", "$c"));
    assert_eq!(
        store.membership_history(ROOM, "@u5:test").await.unwrap(),
        [(p, String::new())]
    );
    assert_eq!(
        store.membership_history(ROOM, "@u1999:test").await.unwrap(),
        [(p, "join".to_owned())]
    );
    assert_eq!(store.state_changes(ROOM, p_c, p).await.unwrap().len(), 2000);
    let at = store.state_at(ROOM, p).await.unwrap();
    assert_eq!(at.len(), 2001);
    assert_eq!(at.iter().filter(|e| e.event_id == "$c").count(), 2);
}

/// `expect_extremities`: another process wrote to the room since the
/// event's builder read it; the event is refused (`RoomMoved`), nothing
/// of it stored, and the same event built on the right view goes in.
async fn an_event_built_on_a_stale_view_of_the_room_is_refused(b: Backend) {
    let store = b.open();
    let expecting = |mut e: NewEvent, ext: &[&str]| {
        e.expect_extremities = Some(ext.iter().map(|x| x.to_string()).collect());
        e
    };
    let mut c = create();
    c.expect_extremities = Some(Vec::new());
    put(&store, c).await;
    // Two writers saw the room at `$c`; the first one wins.
    put(&store, expecting(ev("$a", &["$c"], &["$c"], 2), &["$c"])).await;
    let before = store.current_position();
    let stale = store
        .persist_event(expecting(ev("$b", &["$c"], &["$c"], 2), &["$c"]))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(stale.kind, weft_core::ErrorKind::RoomMoved, "{stale:?}");
    assert!(store.get_event("$b").await.unwrap().is_none());
    assert_eq!(store.current_position(), before);
    let ext = |v: Vec<(String, i64)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$a"]);
    // A state event on a stale view changes no state either.
    let st = state(expecting(ev("$s", &["$c"], &["$c"], 2), &["$c"]), "m.room.topic", "", 2);
    assert_eq!(
        store.persist_event(st).await.unwrap().unwrap_err().kind,
        weft_core::ErrorKind::RoomMoved
    );
    assert!(
        store
            .current_state(ROOM)
            .await
            .unwrap()
            .iter()
            .all(|e| e.event_type != "m.room.topic")
    );
    // Rebuilt on the room as stored, it goes in.
    put(&store, expecting(ev("$b", &["$a"], &["$c"], 3), &["$a"])).await;
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$b"]);
    // A view with more extremities than the event builds on: checked as a
    // set, whatever the order.
    let mut far = ev("$far", &["$gap"], &["$c"], 9);
    far.kind = EventKind::TimelineAfterGap;
    put(&store, far).await;
    put(&store, expecting(ev("$m", &["$far"], &["$c"], 10), &["$far", "$b"])).await;
    let mut two = ext(store.extremities(ROOM).await.unwrap());
    two.sort();
    assert_eq!(two, ["$b", "$m"]);
    assert_eq!(
        store
            .persist_event(expecting(ev("$x", &["$m"], &["$c"], 11), &["$m"]))
            .await
            .unwrap()
            .unwrap_err()
            .kind,
        weft_core::ErrorKind::RoomMoved
    );
    put(&store, expecting(ev("$x", &["$m", "$b"], &["$c"], 11), &["$b", "$m"])).await;
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$x"]);
}

/// State group IDs handed out are never handed out again, and start past
/// the stored ones (on PostgreSQL, a database whose groups were numbered
/// before the sequence was used is caught up when a process opens it).
async fn state_group_ids_are_reserved_once(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    drop(store);
    let store = b.open();
    let mut all = Vec::new();
    for n in [1, 5, 3] {
        let got = store.reserve_state_groups(n).await.unwrap();
        assert_eq!(got.len() as i64, n);
        all.extend(got);
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len(), "{all:?}");
    assert!(all.iter().all(|&g| g > 1), "{all:?}");
}

/// Events queued together commit in one batch; one that fails there (a
/// duplicate event ID: a database error; a stale view: refused after its
/// statement ran) is undone alone, the others keep their places.
async fn a_failing_event_in_a_batch_undoes_only_itself(b: Backend) {
    let store = b.open();
    put(&store, create()).await;
    let mut m1 = ev("$m1", &["$c"], &["$c"], 2);
    m1.search_text = Some("first".into());
    let m1 = store.persist_event(m1);
    // A duplicate of the create event's ID.
    let dup = store.persist_event(ev("$c", &["$m1"], &["$c"], 3));
    let m2 = store.persist_event(ev("$m2", &["$m1"], &["$c"], 3));
    let mut stale = ev("$stale", &["$m2"], &["$c"], 4);
    stale.expect_extremities = Some(vec!["$m1".into()]);
    let stale = store.persist_event(stale);
    let mut m3 = ev("$m3", &["$m2"], &["$c"], 4);
    m3.search_text = Some("third".into());
    let m3 = store.persist_event(m3);
    let p1 = m1.await.unwrap().unwrap();
    assert!(dup.await.unwrap().is_err());
    let p2 = m2.await.unwrap().unwrap();
    assert_eq!(stale.await.unwrap().unwrap_err().kind, weft_core::ErrorKind::RoomMoved);
    let p3 = m3.await.unwrap().unwrap();
    assert!(p1 < p2 && p2 < p3, "{p1} {p2} {p3}");
    assert!(store.get_event("$stale").await.unwrap().is_none());
    let ext = |v: Vec<(String, i64)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$m3"]);
    for (id, p) in [("$m1", p1), ("$m2", p2), ("$m3", p3)] {
        assert_eq!(store.get_event(id).await.unwrap().unwrap().position, p);
    }
    let c = store.get_event("$c").await.unwrap().unwrap();
    assert_eq!(c.event_type, "m.room.create");
    // The events' other rows went in once (search), the failed ones' none.
    let (hits, total) = store
        .search_events(&[ROOM.to_owned()], r#""third""#, &[SearchKey::Body], false, 0, 10)
        .await
        .unwrap();
    assert_eq!((hits.len(), total), (1, 1));
    assert_eq!(store.current_position(), p3);
}

/// A state change of a room is a `StreamKey::State` at its event's
/// position (besides the `Room` key every event has); a message is not.
/// `any_change` answers from the same record as `changes_since`.
async fn the_stream_names_the_state_changes_of_a_room(b: Backend) {
    let store = b.open();
    let start = store.current_position();
    let c = put(&store, create()).await;
    let mut m = ev("$m", &["$c"], &["$c"], 2);
    m.state_before = Some(1);
    m.state_after = Some(1);
    let mp = put(&store, m).await;
    let is_state = |k: &StreamKey| *k == StreamKey::State(ROOM.into());
    let state_at: Vec<i64> = store
        .changes_since(start)
        .unwrap()
        .iter()
        .filter(|(_, k)| is_state(k))
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(state_at, [c]);
    assert_eq!(store.any_change(start, mp, &mut |k| is_state(k)), Some(true));
    assert_eq!(store.any_change(c, mp, &mut |k| is_state(k)), Some(false));
    assert_eq!(
        store.any_change(c, mp, &mut |k| *k == StreamKey::Room(ROOM.into())),
        Some(true)
    );
    // Not before the record's start.
    assert_eq!(store.any_change(start - 1, mp, &mut |_| true), None);
}

/// A [`weft_store::Rebase`] as the room service's: the same event on the
/// new prev events and depth, under a new ID (`$x` → `$x+`). It notes what
/// it was asked.
struct Renamer(std::sync::Mutex<Vec<(String, Vec<String>, i64)>>);

impl weft_store::Rebase for Renamer {
    fn rebase(&self, ev: &NewEvent, extremities: &[String], max_depth: i64) -> Option<NewEvent> {
        self.0
            .lock()
            .unwrap()
            .push((ev.event_id.clone(), extremities.to_vec(), max_depth));
        let prevs: Vec<&str> = extremities.iter().map(String::as_str).collect();
        let mut again = ev.clone();
        again.event_id = format!("{}+", ev.event_id);
        again.pdu_json = serde_json::json!({
            "depth": max_depth + 1, "prev_events": prevs, "auth_events": ev.auth_events, "content": { "n": ev.event_id }
        })
        .to_string();
        again.prev_events = extremities.to_vec();
        again.depth = max_depth + 1;
        again.expect_extremities = Some(extremities.to_vec());
        Some(again)
    }
}

/// `NewEvent::rebase`: a message built on a stale view of a room that
/// only messages moved on since (its state group is the room's) is built
/// again on the room's extremities by the writer and stored, in the place
/// of the refusal, and so is a state event; a state change since, an
/// auth event built again meanwhile, or a snapshot group is still refused
/// (`RoomMoved`).
async fn a_message_on_a_room_moved_by_messages_is_built_again_on_it(b: Backend) {
    let store = b.open();
    let renamer = Arc::new(Renamer(Default::default()));
    let rebasing = |mut e: NewEvent, ext: &[&str], group: i64| {
        e.expect_extremities = Some(ext.iter().map(|x| x.to_string()).collect());
        e.state_before = Some(group);
        e.state_after = Some(group);
        e.rebase = Some(weft_store::Rebaser(renamer.clone()));
        e
    };
    put(&store, create()).await;
    // Another process's message `$a` went in first; `$b` was built on `$c`.
    put(&store, ev("$a", &["$c"], &["$c"], 2)).await;
    let p_b = put(&store, rebasing(ev("$b", &["$c"], &["$c"], 2), &["$c"], 1)).await;
    assert_eq!(
        *renamer.0.lock().unwrap(),
        [("$b".to_owned(), vec!["$a".to_owned()], 2)]
    );
    assert!(store.get_event("$b").await.unwrap().is_none());
    let b2 = store.get_event("$b+").await.unwrap().unwrap();
    assert_eq!(b2.position, p_b);
    let ext = |v: Vec<(String, i64)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$b+"]);
    assert_eq!(store.extremities(ROOM).await.unwrap()[0].1, 3);
    // A chain built on the stale view: each goes on top of the last.
    let p_d = put(&store, rebasing(ev("$d", &["$b"], &["$c"], 3), &["$b"], 1)).await;
    assert!(p_d > p_b);
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$d+"]);
    // The room's state changed since the view (group 2): refused.
    let mut topic = state(ev("$t", &["$d+"], &["$c"], 5), "m.room.topic", "", 2);
    topic.new_groups = vec![NewStateGroup {
        id: 2,
        prev_group: Some(1),
        chain: 1,
        entries: vec![("m.room.topic".into(), "".into(), "$t".into())],
    }];
    topic.state_before = Some(1);
    topic.state_after = Some(2);
    put(&store, topic).await;
    let asked = renamer.0.lock().unwrap().len();
    let stale = store
        .persist_event(rebasing(ev("$e", &["$d+"], &["$c"], 5), &["$d+"], 1))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(stale.kind, weft_core::ErrorKind::RoomMoved, "{stale:?}");
    assert_eq!(renamer.0.lock().unwrap().len(), asked, "not asked");
    assert!(store.get_event("$e+").await.unwrap().is_none());
    // A state event on a view that only messages made stale (the room's
    // group is still 2): built again too, its new group and the current
    // state naming it by its new ID.
    let asked = renamer.0.lock().unwrap().len();
    let name = |id: &str, prevs: &[&str], group: i64| {
        let mut st = rebasing(state(ev(id, prevs, &["$c"], 5), "m.room.name", "", group), prevs, 2);
        st.state_after = Some(group);
        st.new_groups = vec![NewStateGroup {
            id: group,
            prev_group: Some(2),
            chain: 2,
            entries: vec![("m.room.name".into(), "".into(), id.into())],
        }];
        st
    };
    put(&store, ev("$f", &["$t"], &["$c"], 6)).await;
    let p_s = put(&store, name("$s", &["$t"], 3)).await;
    assert_eq!(renamer.0.lock().unwrap().len(), asked + 1);
    assert!(store.get_event("$s").await.unwrap().is_none());
    assert_eq!(store.get_event("$s+").await.unwrap().unwrap().position, p_s);
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$s+"]);
    let named = |evs: Vec<weft_store::StoredEvent>| {
        evs.into_iter()
            .filter(|e| e.event_type == "m.room.name")
            .map(|e| e.event_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(named(store.current_state(ROOM).await.unwrap()), ["$s+"]);
    assert_eq!(named(store.state_at(ROOM, p_s).await.unwrap()), ["$s+"]);
    // One built on `$s` by its process, with `$s` (never stored) among
    // its auth events: the state is group 3 all the same, but it goes
    // back to its builder.
    put(&store, ev("$g", &["$s+"], &["$c"], 7)).await;
    let mut on_old = rebasing(ev("$h", &["$s"], &["$c", "$s"], 7), &["$s"], 3);
    on_old.state_before = Some(3);
    let refused = store.persist_event(on_old).await.unwrap().unwrap_err();
    assert_eq!(refused.kind, weft_core::ErrorKind::RoomMoved, "{refused:?}");
    assert!(store.get_event("$h+").await.unwrap().is_none());
    // A state event whose new group is a snapshot (the whole state):
    // built again when every event it names is stored, refused when one
    // is not; one on a state group that is not the room's, refused.
    let snapshot = |id: &str, topic: &str, group: i64| {
        let mut st = name(id, &["$s+"], group);
        st.state_before = Some(3);
        st.new_groups[0].prev_group = None;
        st.new_groups[0].chain = 0;
        for (t, e) in [("m.room.create", "$c"), ("m.room.topic", topic), ("m.room.name", "$s+")] {
            st.new_groups[0].entries.push((t.into(), "".into(), e.into()));
        }
        st.new_groups[0].entries.retain(|e| e.0 != "m.room.name" || e.2 == id);
        st
    };
    for st in [snapshot("$i", "$t0", 4), name("$j", &["$s+"], 5)] {
        let refused = store.persist_event(st).await.unwrap().unwrap_err();
        assert_eq!(refused.kind, weft_core::ErrorKind::RoomMoved, "{refused:?}");
    }
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$g"]);
    let p_k = put(&store, snapshot("$k", "$t", 6)).await;
    assert_eq!(ext(store.extremities(ROOM).await.unwrap()), ["$k+"]);
    let mut at_k: Vec<(String, String)> = store
        .state_at(ROOM, p_k)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_type, e.event_id))
        .collect();
    at_k.sort();
    assert_eq!(
        at_k,
        [
            ("m.room.create".to_owned(), "$c".to_owned()),
            ("m.room.name".to_owned(), "$k+".to_owned()),
            ("m.room.topic".to_owned(), "$t".to_owned())
        ]
    );
}

// A room's state turn (`Store::room_turn`): none on SQLite (one process).
// On PostgreSQL one store (process) at a time holds a room's turn; others
// wait for it, take other rooms' turns at once, and give up after 5 s of
// waiting for one whose holder does not give it back.
async fn room_turns_are_one_process_at_a_time_and_waited_for_at_most_five_seconds(b: Backend) {
    use std::time::{Duration, Instant};
    let a = b.open();
    let Some(held) = a.room_turn("!r:t").await.unwrap() else {
        assert!(matches!(b, Backend::Sqlite(_)), "only SQLite has no turns");
        return;
    };
    let other = b.open();
    let quick = Instant::now();
    let elsewhere = other.room_turn("!s:t").await.unwrap().expect("a turn");
    assert!(quick.elapsed() < Duration::from_secs(2), "another room's turn is free");
    drop(elsewhere);
    // Given back while the other waits: it gets it.
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let turn = other.room_turn("!r:t").await;
            (turn.map(|t| t.is_some()), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the turn is held");
    drop(held);
    let (got, waited) = waiter.await.unwrap();
    assert!(got.unwrap(), "the turn once given back");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Held and never given back: the wait ends with an error after 5 s.
    let _held = a.room_turn("!r:t").await;
    // (The waiter's turn was dropped with its answer: `a` takes it again.)
    let started = Instant::now();
    let stuck = other.room_turn("!r:t").await;
    let waited = started.elapsed();
    assert!(stuck.is_err(), "no turn while another holds it");
    assert!(
        waited >= Duration::from_millis(4_500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}
