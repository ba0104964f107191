//! An event whose content holds a NUL character (kept in the stored JSON
//! as the escape `\u0000`) is stored on both backends, though PostgreSQL's
//! text cannot hold NUL: the search text and the relation read from the
//! content are what reach text columns.

mod common;
use common::Backend;

both!(an_event_with_nul_in_its_derived_text_is_stored);

use weft_store::{EventKind, NewEvent, NewRoom, Relation, SearchKey};

fn ev(id: &str, search: Option<&str>, relation: Option<Relation>) -> NewEvent {
    NewEvent {
        event_id: id.to_owned(),
        room_id: "!r:test".into(),
        event_type: "m.room.message".into(),
        state_key: None,
        sender: "@alice:test".into(),
        origin_server_ts: 1,
        pdu_json: r#"{"content":{"body":"a\u0000b"}}"#.into(),
        new_room: (id == "$1").then(|| NewRoom {
            room_version: "10".into(),
            creator: "@alice:test".into(),
        }),
        membership: None,
        history_visibility: None,
        txn: None,
        redaction: None,
        relation,
        search_text: search.map(str::to_owned),
        prev_events: vec![],
        auth_events: vec![],
        depth: 1,
        kind: EventKind::TimelineAfterGap,
        state_before: None,
        state_after: None,
        new_groups: vec![],
        current_state: None,
        expect_extremities: None,
        rebase: None,
    }
}

async fn an_event_with_nul_in_its_derived_text_is_stored(b: Backend) {
    let store = b.open();
    let p1 = store
        .persist_event(ev("$1", Some("alpha\0beta"), None))
        .await
        .unwrap()
        .expect("search text with a NUL");
    let rel = Relation {
        rel_type: "m.thread\0".into(),
        parent_event_id: "$1".into(),
    };
    let p2 = store
        .persist_event(ev("$2", None, Some(rel)))
        .await
        .unwrap()
        .expect("a relation with a NUL");
    assert!(p2 > p1);
    let got = store.get_event("$1").await.unwrap().unwrap();
    assert_eq!(got.pdu_json, r#"{"content":{"body":"a\u0000b"}}"#);
    let (found, count) = store
        .search_events(&["!r:test".to_owned()], r#""alpha"*"#, &[SearchKey::Body], false, 0, 10)
        .await
        .unwrap();
    assert_eq!((found.len(), count), (1, 1));
    assert_eq!(found[0].0.event_id, "$1");
}
