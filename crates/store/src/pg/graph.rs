//! PostgreSQL: the `RoomGraphStore` area, and the writer's part of the
//! DAG (as sqlite/graph.rs; its migration step `fill_state_groups` has no
//! counterpart: PostgreSQL databases start at the DAG schema).

use super::rooms::{Built, EVENT_COLS, GroupRows, PDU_JSON};
use super::*;

/// The elements of the JSON array at `key` of `events e`'s PDU as text,
/// nothing when it is missing or no array (SQLite's `json_each` iterates
/// an object's values too; PostgreSQL's function would fail on one: a
/// rejected event's PDU may hold anything).
fn pdu_array(key: &str) -> String {
    format!(
        "json_array_elements_text(CASE WHEN json_typeof({PDU_JSON} -> '{key}') = 'array' \
         THEN {PDU_JSON} -> '{key}' END)"
    )
}

#[async_trait::async_trait]
impl RoomGraphStore for PgStore {
    async fn max_state_group(&self) -> Result<i64> {
        self.read(|c| {
            Ok(c.query_one("SELECT COALESCE(MAX(id), 0) FROM state_groups", &[])?
                .get(0))
        })
        .await
    }

    async fn reserve_state_groups(&self, n: i64) -> Result<Vec<i64>> {
        self.read(move |c| {
            Ok(c.query(
                "SELECT nextval('state_group_ids') FROM generate_series(1, $1::BIGINT)",
                &[&n],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
        .await
    }

    async fn extremities(&self, room_id: &str) -> Result<Vec<(String, i64)>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            // `extremities` is written by serde_json from stored event IDs
            // (no `\u0000`: TEXT cannot hold one).
            Ok(c.query(
                "SELECT e.event_id, e.depth FROM rooms r \
                 CROSS JOIN LATERAL json_array_elements_text(r.extremities::json) AS x(v) \
                 JOIN events e ON e.event_id = x.v \
                 WHERE r.room_id = $1 ORDER BY e.depth DESC, e.position DESC",
                &[&r],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
        .await
    }

    async fn room_state_group(&self, room_id: &str) -> Result<Option<(i64, i64)>> {
        let r = room_id.to_owned();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT g.id, g.chain FROM rooms r JOIN state_groups g ON g.id = r.state_group WHERE r.room_id = $1",
                &[&r],
            )?
            .map(|r| (r.get(0), r.get(1))))
        })
        .await
    }

    async fn state_group(&self, group: i64) -> Result<StateMap> {
        self.read(move |c| read_group(c, group)).await
    }

    async fn event_place(&self, event_id: &str) -> Result<Option<EventPlace>> {
        let id = event_id.to_owned();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT room_id, position, depth, outlier, rejected, soft_failed, state_before, state_after \
                 FROM events WHERE event_id = $1",
                &[&id],
            )?
            .map(|r| EventPlace {
                room_id: r.get(0),
                position: r.get(1),
                depth: r.get(2),
                outlier: r.get::<_, i64>(3) != 0,
                rejected: r.get(4),
                soft_failed: r.get::<_, i64>(5) != 0,
                state_before: r.get(6),
                state_after: r.get(7),
            }))
        })
        .await
    }

    async fn state_group_chain(&self, group: i64) -> Result<Option<i64>> {
        self.read(move |c| {
            Ok(c.query_opt("SELECT chain FROM state_groups WHERE id = $1", &[&group])?
                .map(|r| r.get(0)))
        })
        .await
    }

    async fn auth_chain(&self, event_ids: Vec<String>) -> Result<Vec<String>> {
        let auth = pdu_array("auth_events");
        self.read(move |c| {
            Ok(c.query(
                &format!(
                    "WITH RECURSIVE chain(id) AS ( \
                         SELECT a FROM events e, {auth} AS a WHERE e.event_id = ANY($1) \
                         UNION SELECT a FROM chain JOIN events e ON e.event_id = chain.id, {auth} AS a) \
                     SELECT id FROM chain"
                ),
                &[&event_ids],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
        .await
    }

    async fn events_by_id(&self, event_ids: Vec<String>) -> Result<Vec<crate::StoredEvent>> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |c| {
            Ok(c.query(
                &format!("SELECT {EVENT_COLS} FROM events e WHERE e.event_id = ANY($1)"),
                &[&event_ids],
            )?
            .iter()
            .map(event_row)
            .collect())
        })
        .await
    }

    async fn prev_events(&self, event_id: &str) -> Result<Vec<String>> {
        let id = event_id.to_owned();
        let prevs = pdu_array("prev_events");
        self.read(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT p FROM events e, {prevs} WITH ORDINALITY AS x(p, n) WHERE e.event_id = $1 ORDER BY x.n"
                ),
                &[&id],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
        .await
    }

    fn remote_membership(
        &self,
        event: crate::NewEvent,
        user_id: String,
        membership: String,
        stripped_state: Option<String>,
    ) -> crate::Pending<i64> {
        self.write(move |c, ctx| remote_membership_job(c, ctx, event, user_id, membership, stripped_state))
    }

    async fn remote_invite_state(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        let (r, u) = (room_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT state_json FROM remote_invites WHERE room_id = $1 AND user_id = $2",
                &[&r, &u],
            )?
            .map(|r| r.get(0)))
        })
        .await
    }
}

/// The write of [`RoomGraphStore::remote_membership`].
fn remote_membership_job(
    c: &mut PgConn,
    ctx: &mut WriterCtx,
    event: NewEvent,
    user_id: String,
    membership: String,
    stripped_state: Option<String>,
) -> Result<i64> {
    let mut event = event;
    event.kind = EventKind::Outlier;
    event.current_state = None;
    let stored = c
        .query_opt("SELECT 1 FROM events WHERE event_id = $1", &[&event.event_id])
        .map_err(pg_err)?
        .is_some();
    if !stored {
        super::rooms::insert_event(c, ctx, &event, false)?;
    }
    let p = ctx.pos + 1;
    // The membership, and the invite's stripped state kept (or dropped).
    c.execute(
        "WITH m AS (INSERT INTO memberships (room_id, user_id, membership, event_id, position) \
           VALUES ($1::TEXT, $2::TEXT, $3::TEXT, $4::TEXT, $5::BIGINT) \
           ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, \
           event_id = excluded.event_id, position = excluded.position), \
         kept AS (INSERT INTO remote_invites (room_id, user_id, state_json) \
           SELECT $1::TEXT, $2::TEXT, $6::TEXT WHERE $6::TEXT IS NOT NULL \
           ON CONFLICT (room_id, user_id) DO UPDATE SET state_json = excluded.state_json) \
         DELETE FROM remote_invites WHERE $6::TEXT IS NULL AND room_id = $1::TEXT AND user_id = $2::TEXT",
        &[
            &event.room_id,
            &user_id,
            &membership,
            &event.event_id,
            &p,
            &stripped_state,
        ],
    )
    .map_err(pg_err)?;
    ctx.pos = p;
    ctx.changes.push((p, crate::StreamKey::User(user_id.clone())));
    Ok(p)
}

/// The full state of `group`: its deltas down to the snapshot, newest
/// winning, in one query.
pub(crate) fn read_group(c: &mut PgConn, group: i64) -> PgResult<StateMap> {
    let rows = c.query(
        "WITH RECURSIVE chain(id, prev, n) AS ( \
             SELECT id, prev_group, 0 FROM state_groups WHERE id = $1 \
             UNION ALL SELECT g.id, g.prev_group, chain.n + 1 FROM state_groups g JOIN chain ON g.id = chain.prev) \
         SELECT s.event_type, s.state_key, s.event_id FROM chain \
         JOIN state_group_entries s ON s.group_id = chain.id ORDER BY chain.n DESC",
        &[&group],
    )?;
    let mut state = StateMap::new();
    for r in rows {
        state.insert((r.get(0), r.get(1)), r.get(2));
    }
    Ok(state)
}

/// The DAG part of storing `ev` (its row already inserted, with its state
/// groups) when its room was not moved on as a linear one: the edges to
/// prev events not stored (yet), and, for a new timeline event, the
/// room's forward extremities. An event's own edges are its PDU's
/// `prev_events` and `auth_events`; no row is written for them. Answers
/// whether every prev event is stored (SQLite's `check_prevs`, which a
/// `Timeline` event must pass), asked in the same statement.
pub(crate) fn store_graph(c: &mut PgConn, ev: &NewEvent) -> PgResult<bool> {
    // An event from another server may follow events this one has not
    // got: remember those edges, the only ones whose target may come
    // later. A local event's prev events are stored (checked). Stored at
    // last: the events that follow it no longer dangle. An event something
    // already points at (fetched late) is no extremity. (Nothing can point
    // at a new local event: its ID was just made, and it goes out to other
    // servers only once stored.)
    let remote = ev.kind != EventKind::Timeline;
    let row = c.query_one(
        "WITH gone AS (DELETE FROM dangling_prevs WHERE $4::BOOLEAN AND prev_id = $1::TEXT RETURNING 1), \
         dangling AS (INSERT INTO dangling_prevs (prev_id, event_id) \
           SELECT DISTINCT x, $1::TEXT FROM UNNEST($2::TEXT[]) AS x \
           WHERE $4::BOOLEAN AND NOT EXISTS (SELECT 1 FROM events WHERE event_id = x) ON CONFLICT DO NOTHING) \
         SELECT EXISTS (SELECT 1 FROM gone), (SELECT extremities FROM rooms WHERE room_id = $3::TEXT), \
           NOT EXISTS (SELECT 1 FROM UNNEST($2::TEXT[]) AS x WHERE NOT EXISTS (SELECT 1 FROM events WHERE event_id = x))",
        &[&ev.event_id, &ev.prev_events, &ev.room_id, &remote],
    )?;
    let (pointed_at, current, prevs_stored): (bool, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
    if ev.kind.on_stream() {
        let mut extremities: Vec<String> = current
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default();
        extremities.retain(|id| !ev.prev_events.contains(id));
        if !pointed_at && !extremities.contains(&ev.event_id) {
            extremities.push(ev.event_id.clone());
        }
        let json = serde_json::to_string(&extremities).unwrap_or_else(|_| "[]".to_owned());
        c.execute(
            "UPDATE rooms SET extremities = $1, state_group = COALESCE($2, state_group) WHERE room_id = $3",
            &[&json, &ev.current_state.as_ref().map(|cs| cs.group), &ev.room_id],
        )?;
    } else if let Some(cs) = &ev.current_state {
        c.execute(
            "UPDATE rooms SET state_group = $1 WHERE room_id = $2",
            &[&cs.group, &ev.room_id],
        )?;
    }
    Ok(prevs_stored)
}

/// A backfilled event stored before as an outlier (at `old`) takes its
/// place in the timeline at `p`: its row moves, with the state before and
/// after it, and the current state's references to it follow. Its edges
/// are stored already.
pub(crate) fn promote_outlier(c: &mut PgConn, ev: &NewEvent, old: i64, p: i64) -> PgResult<()> {
    let groups = GroupRows::new(&ev.new_groups);
    let mut b = Built::new();
    let room = b.p(&ev.room_id, "TEXT");
    let (pos, old) = (b.p(&p, "BIGINT"), b.p(&old, "BIGINT"));
    let (before, after) = (b.p(&ev.state_before, "BIGINT"), b.p(&ev.state_after, "BIGINT"));
    groups.add(&mut b, &room);
    b.cte(
        "moved",
        format!(
            "UPDATE events SET position = {pos}, outlier = 0, state_before = {before}, state_after = {after} \
             WHERE position = {old}"
        ),
    );
    b.cte(
        "current",
        format!("UPDATE current_state SET position = {pos} WHERE room_id = {room} AND position = {old}"),
    );
    b.cte(
        "logged",
        format!("UPDATE state_events SET event_position = {pos} WHERE room_id = {room} AND event_position = {old}"),
    );
    c.query_one(&b.sql("SELECT 1"), &b.params)?;
    Ok(())
}
