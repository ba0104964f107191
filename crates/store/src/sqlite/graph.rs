//! [`RoomGraphStore`] on SQLite, the writer's part of the DAG, and the
//! migration step that gives rooms stored before the DAG their state
//! groups.

use std::collections::HashMap;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{EVENT_COLS, SqliteStore, collect, event_row};
use crate::Result;
use crate::graph::*;
use crate::types::{NewEvent, NewStateGroup, StoredEvent};

/// A new group past this many deltas is a snapshot.
pub const MAX_CHAIN: i64 = 100;

#[async_trait]
impl RoomGraphStore for SqliteStore {
    async fn max_state_group(&self) -> Result<i64> {
        self.read(|c| c.query_row("SELECT COALESCE(MAX(id), 0) FROM state_groups", [], |r| r.get(0)))
            .await
    }

    async fn reserve_state_groups(&self, n: i64) -> Result<Vec<i64>> {
        // One process writes an SQLite database: a counter started past
        // the highest stored group is enough.
        let last = self
            .state_groups
            .get_or_try_init(|| async {
                Ok::<_, weft_core::Error>(std::sync::atomic::AtomicI64::new(self.max_state_group().await?))
            })
            .await?;
        let first = last.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + 1;
        Ok((first..first + n).collect())
    }

    async fn extremities(&self, room_id: &str) -> Result<Vec<(String, i64)>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT e.event_id, e.depth FROM rooms r, json_each(r.extremities) x \
                 JOIN events e ON e.event_id = x.value \
                 WHERE r.room_id = ?1 ORDER BY e.depth DESC, e.position DESC",
            )?;
            let rows = stmt.query_map([r], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn room_state_group(&self, room_id: &str) -> Result<Option<(i64, i64)>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT g.id, g.chain FROM rooms r JOIN state_groups g ON g.id = r.state_group WHERE r.room_id = ?1",
            )?
            .query_row([r], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })
        .await
    }

    async fn state_group(&self, group: i64) -> Result<StateMap> {
        self.read(move |c| read_group(c, group)).await
    }

    async fn event_place(&self, event_id: &str) -> Result<Option<EventPlace>> {
        let id = event_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT room_id, position, depth, outlier, rejected, soft_failed, state_before, state_after \
                 FROM events WHERE event_id = ?1",
            )?
            .query_row([id], |r| {
                Ok(EventPlace {
                    room_id: r.get(0)?,
                    position: r.get(1)?,
                    depth: r.get(2)?,
                    outlier: r.get(3)?,
                    rejected: r.get(4)?,
                    soft_failed: r.get(5)?,
                    state_before: r.get(6)?,
                    state_after: r.get(7)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn state_group_chain(&self, group: i64) -> Result<Option<i64>> {
        self.read(move |c| {
            c.prepare_cached("SELECT chain FROM state_groups WHERE id = ?1")?
                .query_row([group], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn auth_chain(&self, event_ids: Vec<String>) -> Result<Vec<String>> {
        let ids = serde_json::to_string(&event_ids).unwrap_or_default();
        self.read(move |c| {
            collect(
                c,
                "WITH RECURSIVE chain(id) AS ( \
                     SELECT a.value FROM events e, json_each(e.pdu_json, '$.auth_events') a \
                     WHERE e.event_id IN (SELECT value FROM json_each(?1)) \
                     UNION SELECT a.value FROM chain JOIN events e ON e.event_id = chain.id, \
                     json_each(e.pdu_json, '$.auth_events') a) \
                 SELECT id FROM chain",
                [ids],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn events_by_id(&self, event_ids: Vec<String>) -> Result<Vec<StoredEvent>> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(&event_ids).unwrap_or_default();
        self.read(move |c| {
            collect(
                c,
                &format!("SELECT {EVENT_COLS} FROM events e WHERE e.event_id IN (SELECT value FROM json_each(?1))"),
                [ids],
                event_row,
            )
        })
        .await
    }

    fn remote_membership(
        &self,
        event: NewEvent,
        user_id: String,
        membership: String,
        stripped_state: Option<String>,
    ) -> crate::Pending<i64> {
        self.write(move |c, ctx| {
            remote_membership_job(c, ctx, event, user_id, membership, stripped_state).map_err(super::db_err)
        })
    }

    async fn remote_invite_state(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        let (r, u) = (room_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            c.prepare_cached("SELECT state_json FROM remote_invites WHERE room_id = ?1 AND user_id = ?2")?
                .query_row(params![r, u], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn prev_events(&self, event_id: &str) -> Result<Vec<String>> {
        let id = event_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                "SELECT p.value FROM events e, json_each(e.pdu_json, '$.prev_events') p WHERE e.event_id = ?1",
                [id],
                |r| r.get(0),
            )
        })
        .await
    }
}

/// The write of [`RoomGraphStore::remote_membership`].
fn remote_membership_job(
    c: &Connection,
    ctx: &mut super::WriterCtx,
    event: NewEvent,
    user_id: String,
    membership: String,
    stripped_state: Option<String>,
) -> rusqlite::Result<i64> {
    let mut event = event;
    event.kind = crate::EventKind::Outlier;
    event.current_state = None;
    if c.prepare_cached("SELECT 1 FROM events WHERE event_id = ?1")?
        .query_row([&event.event_id], |_| Ok(()))
        .optional()?
        .is_none()
    {
        super::insert_event(c, ctx, &event, false)?;
    }
    let p = ctx.pos + 1;
    c.prepare_cached(
        "INSERT INTO memberships (room_id, user_id, membership, event_id, position) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, \
                 event_id = excluded.event_id, position = excluded.position",
    )?
    .execute(params![event.room_id, user_id, membership, event.event_id, p])?;
    match &stripped_state {
        Some(state) => c
            .prepare_cached("INSERT OR REPLACE INTO remote_invites (room_id, user_id, state_json) VALUES (?1, ?2, ?3)")?
            .execute(params![event.room_id, user_id, state])?,
        None => c
            .prepare_cached("DELETE FROM remote_invites WHERE room_id = ?1 AND user_id = ?2")?
            .execute(params![event.room_id, user_id])?,
    };
    ctx.pos = p;
    ctx.changes.push((p, crate::StreamKey::User(user_id.clone())));
    Ok(p)
}

/// The full state of `group`: its deltas down to the snapshot, newest
/// winning, in one query.
pub(crate) fn read_group(c: &Connection, group: i64) -> rusqlite::Result<StateMap> {
    let mut stmt = c.prepare_cached(
        "WITH RECURSIVE chain(id, prev, n) AS ( \
             SELECT id, prev_group, 0 FROM state_groups WHERE id = ?1 \
             UNION ALL SELECT g.id, g.prev_group, chain.n + 1 FROM state_groups g JOIN chain ON g.id = chain.prev) \
         SELECT s.event_type, s.state_key, s.event_id FROM chain \
         JOIN state_group_entries s ON s.group_id = chain.id ORDER BY chain.n DESC",
    )?;
    let mut state = StateMap::new();
    let rows = stmt.query_map([group], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
    for row in rows {
        let (key, id) = row?;
        state.insert(key, id);
    }
    Ok(state)
}

fn insert_group(c: &Connection, room_id: &str, g: &NewStateGroup) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO state_groups (id, room_id, prev_group, chain) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![g.id, room_id, g.prev_group, g.chain])?;
    let mut entry = c.prepare_cached(
        "INSERT INTO state_group_entries (group_id, event_type, state_key, event_id) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (t, k, id) in &g.entries {
        entry.execute(params![g.id, t, k, id])?;
    }
    Ok(())
}

/// The DAG part of storing `ev` (already inserted at `position`): its
/// state groups, the edges to prev events not stored (yet), and, for a new
/// timeline event, the room's forward extremities. An event's own edges
/// are its PDU's `prev_events` and `auth_events`; no row is written for
/// them (migration 0019). (That a `Timeline` event's prev events are
/// stored is checked by [`check_prevs`] first.)
/// `room_done`: [`advance_linear`] already moved the room's row on.
pub(crate) fn store_graph(c: &Connection, ev: &NewEvent, room_done: bool) -> rusqlite::Result<()> {
    for g in &ev.new_groups {
        insert_group(c, &ev.room_id, g)?;
    }
    if room_done {
        return Ok(());
    }
    // An event from another server may follow events this one has not
    // got: remember those edges, the only ones whose target may come
    // later. A local event's prev events are stored (`check_prevs`).
    if ev.kind != crate::EventKind::Timeline {
        let mut known = c.prepare_cached("SELECT 1 FROM events WHERE event_id = ?1")?;
        let mut dangling =
            c.prepare_cached("INSERT OR IGNORE INTO dangling_prevs (prev_id, event_id) VALUES (?1, ?2)")?;
        for prev in &ev.prev_events {
            if known.query_row([prev], |_| Ok(())).optional()?.is_none() {
                dangling.execute(params![prev, ev.event_id])?;
            }
        }
    }
    // Stored at last: the events that follow it no longer dangle. An
    // event something already points at (fetched late) is no extremity.
    // (Nothing can point at a new local event: its ID was just made, and
    // it goes out to other servers only once stored.)
    let pointed_at = ev.kind != crate::EventKind::Timeline
        && c.prepare_cached("DELETE FROM dangling_prevs WHERE prev_id = ?1")?
            .execute([&ev.event_id])?
            > 0;
    if ev.kind.on_stream() {
        let current: Option<String> = c
            .prepare_cached("SELECT extremities FROM rooms WHERE room_id = ?1")?
            .query_row([&ev.room_id], |r| r.get(0))
            .optional()?;
        let mut extremities: Vec<String> = current
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default();
        extremities.retain(|id| !ev.prev_events.contains(id));
        if !pointed_at && !extremities.contains(&ev.event_id) {
            extremities.push(ev.event_id.clone());
        }
        let json = serde_json::to_string(&extremities).unwrap_or_else(|_| "[]".to_owned());
        c.prepare_cached(
            "UPDATE rooms SET extremities = ?1, state_group = COALESCE(?2, state_group) WHERE room_id = ?3",
        )?
        .execute(params![json, ev.current_state.as_ref().map(|cs| cs.group), ev.room_id])?;
    } else if let Some(cs) = &ev.current_state {
        c.prepare_cached("UPDATE rooms SET state_group = ?1 WHERE room_id = ?2")?
            .execute(params![cs.group, ev.room_id])?;
    }
    Ok(())
}

/// A backfilled event stored before as an outlier (at `old`) takes its
/// place in the timeline at `p`: its row moves, with the state before and
/// after it, and the current state's references to it follow. Its edges
/// are stored already.
pub(crate) fn promote_outlier(c: &Connection, ev: &NewEvent, old: i64, p: i64) -> rusqlite::Result<()> {
    for g in &ev.new_groups {
        insert_group(c, &ev.room_id, g)?;
    }
    c.prepare_cached(
        "UPDATE events SET position = ?1, outlier = 0, state_before = ?2, state_after = ?3 WHERE position = ?4",
    )?
    .execute(params![p, ev.state_before, ev.state_after, old])?;
    c.prepare_cached("UPDATE current_state SET position = ?1 WHERE room_id = ?2 AND position = ?3")?
        .execute(params![p, ev.room_id, old])?;
    c.prepare_cached("UPDATE state_events SET event_position = ?1 WHERE room_id = ?2 AND event_position = ?3")?
        .execute(params![p, ev.room_id, old])?;
    Ok(())
}

/// For a local event (`Timeline`) whose prev events are exactly the
/// room's forward extremities, as stored (the linear room's one): makes
/// it the room's one extremity and its current group the event's, in one
/// statement. Answers whether it did; else [`store_graph`] does the
/// general update.
pub(crate) fn advance_linear(c: &Connection, ev: &NewEvent) -> rusqlite::Result<bool> {
    if ev.kind != crate::EventKind::Timeline || ev.prev_events.is_empty() {
        return Ok(false);
    }
    let (Ok(expected), Ok(new)) = (
        serde_json::to_string(&ev.prev_events),
        serde_json::to_string(&[&ev.event_id]),
    ) else {
        return Ok(false);
    };
    let n = c
        .prepare_cached(
            "UPDATE rooms SET extremities = ?1, state_group = COALESCE(?2, state_group) \
             WHERE room_id = ?3 AND extremities = ?4",
        )?
        .execute(params![
            new,
            ev.current_state.as_ref().map(|cs| cs.group),
            ev.room_id,
            expected
        ])?;
    Ok(n == 1)
}

/// A room's forward extremities as stored (a JSON array), if the room is.
pub(crate) fn stored_extremities(c: &Connection, room_id: &str) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT extremities FROM rooms WHERE room_id = ?1")?
        .query_row([room_id], |r| r.get(0))
        .optional()
}

/// `ev`, refused because its room moved, built again on the room as stored
/// if it may be ([`NewEvent::rebaseable`], [`crate::Rebase`]) and every
/// other event it names is stored ([`NewEvent::names`]).
pub(crate) fn rebased(c: &Connection, ev: &NewEvent) -> rusqlite::Result<Option<NewEvent>> {
    if ev.rebase.is_none() {
        return Ok(None);
    }
    let row: Option<(String, Option<i64>, Option<i64>)> = c
        .prepare_cached(
            "SELECT r.extremities, r.state_group, (SELECT max(e.depth) FROM events e \
             WHERE e.event_id IN (SELECT value FROM json_each(r.extremities))) \
             FROM rooms r WHERE r.room_id = ?1",
        )?
        .query_row([&ev.room_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some(again) = row.and_then(|(extremities, group, depth)| ev.rebased_on(&extremities, group, depth)) else {
        return Ok(None);
    };
    Ok(all_stored(c, again.names())?.then_some(again))
}

/// Whether every prev event of `ev` is stored (or earlier in this
/// transaction).
pub(crate) fn check_prevs(c: &Connection, ev: &NewEvent) -> rusqlite::Result<bool> {
    all_stored(c, ev.prev_events.iter().map(String::as_str))
}

/// Whether every one of the events `ids` is stored.
fn all_stored<'a>(c: &Connection, ids: impl IntoIterator<Item = &'a str>) -> rusqlite::Result<bool> {
    let mut known = c.prepare_cached("SELECT 1 FROM events WHERE event_id = ?1")?;
    for id in ids {
        if !known.exists([id])? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Migration step after `0016_room_dag.sql`: every room stored before the
/// DAG was a chain, so replaying its events in stream order gives each its
/// state before and after, a group per state event (a snapshot every
/// [`MAX_CHAIN`]), and the room its current group.
pub(crate) fn fill_state_groups(c: &Connection) -> rusqlite::Result<()> {
    struct Room {
        group: Option<i64>,
        chain: i64,
        state: HashMap<(String, String), String>,
    }
    let mut rooms: HashMap<String, Room> = HashMap::new();
    let mut next_group = 0i64;
    let mut stmt =
        c.prepare("SELECT position, room_id, event_type, state_key, event_id FROM events ORDER BY position")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut set = c.prepare("UPDATE events SET state_before = ?1, state_after = ?2 WHERE position = ?3")?;
    for row in rows {
        let (position, room_id, event_type, state_key, event_id) = row?;
        let room = rooms.entry(room_id.clone()).or_insert_with(|| Room {
            group: None,
            chain: 0,
            state: HashMap::new(),
        });
        let before = room.group;
        if let Some(key) = state_key {
            room.state.insert((event_type.clone(), key.clone()), event_id.clone());
            next_group += 1;
            let group = match before {
                Some(prev) if room.chain < MAX_CHAIN => NewStateGroup {
                    id: next_group,
                    prev_group: Some(prev),
                    chain: room.chain + 1,
                    entries: vec![(event_type, key, event_id)],
                },
                _ => NewStateGroup {
                    id: next_group,
                    prev_group: None,
                    chain: 0,
                    entries: room
                        .state
                        .iter()
                        .map(|((t, k), id)| (t.clone(), k.clone(), id.clone()))
                        .collect(),
                },
            };
            insert_group(c, &room_id, &group)?;
            room.group = Some(group.id);
            room.chain = group.chain;
        }
        set.execute(params![before, room.group, position])?;
    }
    let mut current = c.prepare("UPDATE rooms SET state_group = ?1 WHERE room_id = ?2")?;
    for (room_id, room) in &rooms {
        current.execute(params![room.group, room_id])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of the schema before the DAG, with one linear room of
    /// 401 events (every third one a state event), migrated: edges,
    /// depths, the extremity and the state groups come out as the chain
    /// implies.
    #[test]
    fn rooms_stored_before_the_dag_are_migrated_to_it() {
        let mut c = Connection::open_in_memory().unwrap();
        let dag_at = super::super::MIGRATIONS
            .iter()
            .position(|m| *m == super::super::DAG_MIGRATION)
            .unwrap();
        for sql in &super::super::MIGRATIONS[..dag_at] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", dag_at as i64).unwrap();
        c.execute(
            "INSERT INTO rooms (room_id, room_version, creator) VALUES ('!r:t', '10', '@a:t')",
            [],
        )
        .unwrap();
        let mut expected = StateMap::new();
        let mut state_events = 0;
        for n in 1..=401i64 {
            let (t, key) = match n {
                1 => ("m.room.create", Some(String::new())),
                n if n % 3 == 0 => ("m.room.member", Some(format!("@u{}:t", n % 150))),
                _ => ("m.room.message", None),
            };
            let id = format!("$e{n}");
            if let Some(k) = &key {
                expected.insert((t.to_owned(), k.clone()), id.clone());
                state_events += 1;
            }
            let prevs = if n == 1 {
                "[]".to_owned()
            } else {
                format!(r#"["$e{}"]"#, n - 1)
            };
            let pdu = format!(r#"{{"depth":{n},"prev_events":{prevs},"content":{{}}}}"#);
            c.execute(
                "INSERT INTO events (position, event_id, room_id, event_type, state_key, sender, origin_server_ts, pdu_json) \
                 VALUES (?1, ?2, '!r:t', ?3, ?4, '@a:t', 0, ?5)",
                params![n, id, t, key, pdu],
            )
            .unwrap();
        }
        super::super::migrate(&mut c).unwrap();

        let one = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
        // (The edges live in the PDUs since migration 0019; nothing dangles.)
        assert_eq!(one("SELECT COUNT(*) FROM dangling_prevs"), 0);
        assert_eq!(one("SELECT depth FROM events WHERE event_id = '$e77'"), 77);
        let ext: String = c
            .query_row("SELECT extremities FROM rooms WHERE room_id = '!r:t'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ext, r#"["$e401"]"#);
        assert_eq!(one("SELECT COUNT(*) FROM state_groups"), state_events);
        assert!(one("SELECT MAX(chain) FROM state_groups") <= MAX_CHAIN);
        assert!(one("SELECT COUNT(*) FROM state_groups WHERE prev_group IS NULL") >= 2);
        let current = one("SELECT state_group FROM rooms WHERE room_id = '!r:t'");
        assert_eq!(read_group(&c, current).unwrap(), expected);
        // A message's state before and after are the group of the state
        // event before it; a state event's after is its own group.
        let (b, a): (i64, i64) = c
            .query_row(
                "SELECT state_before, state_after FROM events WHERE event_id = '$e401'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((b, a), (current, current));
        let (b, a): (i64, i64) = c
            .query_row(
                "SELECT state_before, state_after FROM events WHERE event_id = '$e150'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_ne!(b, a);
        let at_150 = read_group(&c, a).unwrap();
        assert_eq!(
            at_150
                .get(&("m.room.member".into(), "@u0:t".into()))
                .map(String::as_str),
            Some("$e150")
        );
        assert_eq!(at_150.len(), 1 + 50);
    }

    /// A database of the schema before migration 0019 (edges, auth edges
    /// and extremities in their own tables), migrated: the extremities
    /// move into the rooms row, the only edge whose target is missing is
    /// kept, and prev events, auth chains and extremities read as before,
    /// also once the missing event comes.
    #[tokio::test]
    async fn dag_tables_before_0019_are_compacted() {
        use crate::{EventKind, NewEvent, RoomGraphStore, Store};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.db");
        {
            let c = Connection::open(&path).unwrap();
            // Every migration before 0019 (the one that compacts).
            let before = super::super::MIGRATIONS
                .iter()
                .position(|m| m.contains("CREATE TABLE dangling_prevs"))
                .unwrap();
            for (i, sql) in super::super::MIGRATIONS[..before].iter().enumerate() {
                c.execute_batch(sql).unwrap();
                if *sql == super::super::DAG_MIGRATION {
                    fill_state_groups(&c).unwrap();
                }
                c.pragma_update(None, "user_version", (i + 1) as i64).unwrap();
            }
            c.execute_batch(
                "INSERT INTO rooms (room_id, room_version, creator) VALUES ('!r:t', '10', '@a:t'), ('!q:t', '10', '@a:t');
                 INSERT INTO events (position, event_id, room_id, event_type, state_key, sender, origin_server_ts, pdu_json, depth)
                 VALUES (1, '$c', '!r:t', 'm.room.create', '', '@a:t', 0, '{\"prev_events\":[],\"auth_events\":[]}', 1),
                        (2, '$j', '!r:t', 'm.room.member', '@a:t', '@a:t', 0, '{\"prev_events\":[\"$c\"],\"auth_events\":[\"$c\"]}', 2),
                        (3, '$a', '!r:t', 'm', NULL, '@a:t', 0, '{\"prev_events\":[\"$j\"],\"auth_events\":[\"$c\",\"$j\"]}', 3),
                        (4, '$b', '!r:t', 'm', NULL, '@b:u', 0, '{\"prev_events\":[\"$j\"],\"auth_events\":[\"$c\",\"$j\"]}', 3),
                        (5, '$far', '!r:t', 'm', NULL, '@b:u', 0, '{\"prev_events\":[\"$gap\"],\"auth_events\":[\"$c\",\"$j\"]}', 9);
                 INSERT INTO event_edges (event_id, prev_id) VALUES ('$j', '$c'), ('$a', '$j'), ('$b', '$j'), ('$far', '$gap');
                 INSERT INTO event_auth (event_id, auth_id) VALUES ('$j', '$c'), ('$a', '$c'), ('$a', '$j'),
                     ('$b', '$c'), ('$b', '$j'), ('$far', '$c'), ('$far', '$j');
                 INSERT INTO room_extremities (room_id, event_id) VALUES ('!r:t', '$a'), ('!r:t', '$b'), ('!r:t', '$far');",
            )
            .unwrap();
        }
        let store = super::super::SqliteStore::open(&path, true).unwrap();
        {
            let c = Connection::open(&path).unwrap();
            let tables: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('event_edges', 'event_auth', 'room_extremities')",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(tables, 0);
            let dangling: Vec<(String, String)> = c
                .prepare("SELECT prev_id, event_id FROM dangling_prevs")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert_eq!(dangling, [("$gap".to_owned(), "$far".to_owned())]);
            let q: String = c
                .query_row("SELECT extremities FROM rooms WHERE room_id = '!q:t'", [], |r| r.get(0))
                .unwrap();
            assert_eq!(q, "[]");
        }
        let ext = store.extremities("!r:t").await.unwrap();
        assert_eq!(
            ext,
            [("$far".to_owned(), 9), ("$b".to_owned(), 3), ("$a".to_owned(), 3)]
        );
        assert!(store.extremities("!q:t").await.unwrap().is_empty());
        assert_eq!(store.prev_events("$a").await.unwrap(), ["$j"]);
        let mut chain = store.auth_chain(vec!["$a".into(), "$far".into()]).await.unwrap();
        chain.sort();
        assert_eq!(chain, ["$c", "$j"]);
        // The missing event arrives (fetched late, as timeline after a
        // gap): it is no extremity, and no longer dangles.
        let gap = NewEvent {
            event_id: "$gap".into(),
            room_id: "!r:t".into(),
            event_type: "m".into(),
            state_key: None,
            sender: "@b:u".into(),
            origin_server_ts: 0,
            pdu_json: r#"{"prev_events":["$j"],"auth_events":["$c","$j"]}"#.into(),
            new_room: None,
            membership: None,
            history_visibility: None,
            txn: None,
            redaction: None,
            relation: None,
            search_text: None,
            prev_events: vec!["$j".into()],
            auth_events: vec!["$c".into(), "$j".into()],
            depth: 8,
            kind: EventKind::TimelineAfterGap,
            state_before: None,
            state_after: None,
            new_groups: Vec::new(),
            current_state: None,
            expect_extremities: None,
            rebase: None,
        };
        store.persist_event(gap).await.unwrap().unwrap();
        let ext: Vec<String> = store
            .extremities("!r:t")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(ext, ["$far", "$b", "$a"]);
        let c = Connection::open(&path).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM dangling_prevs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
