//! PostgreSQL: rooms — the event write path ([`persist_event`] and what
//! [`insert_event`] does) and the room reads.
//!
//! Every statement is a round trip to the server (SQLite's were function
//! calls), so the write path merges what SQLite runs as several small
//! statements per event into one statement of data-modifying CTEs: the
//! event's row, its room, state groups, transaction ID, relation, search
//! row, redaction, state changes (state log, current state, memberships)
//! and the linear room's extremities move on in one round trip. The parts
//! touch different rows, so running them against one snapshot (as CTEs
//! do) gives what SQLite's statements in sequence give; what must see an
//! earlier part's effect (the general DAG update of a room that is not
//! linear, a promoted outlier) runs as its own statement before or after.

use postgres::types::ToSql;

use super::*;

/// The 11 columns [`event_row`] reads, of `events e`.
pub(crate) const EVENT_COLS: &str = "e.position, e.event_id, e.room_id, e.event_type, e.state_key, e.sender, \
     e.origin_server_ts, e.pdu_json, e.redacted_by, e.txn_device, e.txn_id";

/// The condition on `events e` of an event served as timeline (not an
/// outlier, not rejected, not soft-failed).
const SERVED: &str = "e.outlier = 0 AND e.rejected IS NULL AND e.soft_failed = 0";

/// `pdu_json` of `events e` as `json`. Every PostgreSQL JSON function
/// fails on a document holding a `\u0000` escape; replacing it by
/// `\u0001` keeps the JSON valid with the same keys and nulls (see the
/// schema's comment on `events_files`).
pub(crate) const PDU_JSON: &str = r"replace(e.pdu_json, '\u0000', '\u0001')::json";

/// A statement built from parts, its parameters numbered as they are
/// added (every reference written with its type, so the server never has
/// to infer one).
pub(super) struct Built<'a> {
    ctes: Vec<String>,
    pub(super) params: Vec<&'a (dyn ToSql + Sync)>,
    /// Each parameter's reference with its type (`$n::TYPE`).
    typed: Vec<String>,
}

impl<'a> Built<'a> {
    pub(super) fn new() -> Self {
        Self {
            ctes: Vec::new(),
            params: Vec::new(),
            typed: Vec::new(),
        }
    }

    /// Adds a parameter; answers its reference (`$n::TYPE`).
    pub(super) fn p(&mut self, v: &'a (dyn ToSql + Sync), ty: &str) -> String {
        self.params.push(v);
        let r = format!("${}::{ty}", self.params.len());
        self.typed.push(r.clone());
        r
    }

    pub(super) fn cte(&mut self, name: &str, body: String) {
        self.ctes.push(format!("{name} AS ({body})"));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ctes.is_empty()
    }

    pub(super) fn sql(&self, select: &str) -> String {
        if self.ctes.is_empty() {
            select.to_owned()
        } else {
            // Every parameter named once with its type, even one no part
            // of this statement uses (PostgreSQL must know each type; an
            // unreferenced CTE is parsed, never run).
            format!(
                "WITH params AS (SELECT {}), {} {select}",
                self.typed.join(", "),
                self.ctes.join(", ")
            )
        }
    }
}

pub(super) fn persist_event(s: &PgStore, event: NewEvent) -> Pending<i64> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.send_job(Job::Again(Box::new(EventJob {
        pipelinable: pipelinable(&event),
        event,
        result: None,
        tx,
    })));
    rx
}

/// A local event's write, the hot path: an [`AgainJob`] the writer runs
/// alone, or with the events queued next to it in one round trip
/// ([`pipelined`]).
struct EventJob {
    event: NewEvent,
    /// [`pipelinable`], asked once: the writer looks several times.
    pipelinable: bool,
    result: Option<Result<i64>>,
    tx: tokio::sync::oneshot::Sender<Result<i64>>,
}

impl AgainJob for EventJob {
    fn run(&mut self, conn: &mut PgConn, ctx: &mut WriterCtx) -> bool {
        // A local event built on one whose write failed is refused: no
        // stored event points at a parent that is not stored. A local
        // event built on exactly the room's forward extremities (the one
        // of a linear room) moves them on in the event's own statement;
        // those are stored events, so its prev events are stored. (The
        // check of the others' prev events comes with the DAG update
        // after the event's row: failing, the job's savepoint undoes it.)
        let mut r = insert_event(conn, ctx, &self.event, true);
        if r.as_ref().is_err_and(|e| e.kind == ErrorKind::RoomMoved)
            && let Some(rebased) = rebased(conn, &self.event)
        {
            // Another process moved the room on by messages only: this
            // event goes on top of them, rather than back to its builder
            // to lose the race again (`Rebase`). Under the stream-head
            // lock nothing moves the room meanwhile.
            r = conn
                .batch("ROLLBACK TO SAVEPOINT job")
                .map_err(pg_err)
                .and_then(|()| insert_event(conn, ctx, &rebased, true));
            self.event = rebased;
        }
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn answer(self: Box<Self>, commit_err: Option<Error>) {
        let result = match commit_err {
            Some(e) => Err(e),
            None => self
                .result
                .unwrap_or_else(|| Err(Error::internal("write job never ran"))),
        };
        let _ = self.tx.send(result);
    }

    fn event(&self) -> Option<&NewEvent> {
        Some(&self.event).filter(|_| self.pipelinable)
    }

    fn stored_at(&mut self, position: i64) {
        self.result = Some(Ok(position));
    }
}

/// `ev`, refused because its room moved, built again on the room as stored
/// if it may be ([`NewEvent::rebaseable`]) and every other event it names
/// is stored ([`NewEvent::names`]).
fn rebased(c: &mut PgConn, ev: &NewEvent) -> Option<NewEvent> {
    ev.rebase.as_ref()?;
    let row = c
        .query_opt(
            "SELECT r.extremities, r.state_group, (SELECT max(e.depth) FROM events e \
             WHERE e.event_id IN (SELECT jsonb_array_elements_text(r.extremities::jsonb))) \
             FROM rooms r WHERE r.room_id = $1",
            &[&ev.room_id],
        )
        .ok()??;
    let again = ev.rebased_on(row.get::<_, &str>(0), row.get(1), row.get(2))?;
    let stored: bool = c
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM unnest($1::text[]) a(id) \
             WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.id))",
            &[&again.names()],
        )
        .ok()?
        .get(0);
    stored.then_some(again)
}

/// Whether an event's whole write is its one statement when it moves the
/// room on ([`insert_event`] has nothing more to do than note it): a
/// timeline event of a linear room built on its extremities, changing no
/// membership (which may stop typing). Such events are sent together.
fn pipelinable(ev: &NewEvent) -> bool {
    let row = EventRow::new(ev, 0, true, true);
    ev.kind == EventKind::Timeline && row.advances() && !row.changes_members()
}

/// Writes a row of [`pipelinable`] events, numbered on from `ctx.pos`, in
/// one round trip. True if every one moved its room on (they are then
/// recorded in `ctx`); false if any failed or found its room moved (the
/// caller undoes them all and runs each on its own, which handles those).
pub(crate) fn pipelined(c: &mut PgConn, ctx: &mut WriterCtx, events: &[&NewEvent]) -> bool {
    let first = ctx.pos + 1;
    let rows: Vec<EventRow> = events
        .iter()
        .zip(first..)
        .map(|(ev, p)| EventRow::new(ev, p, true, true))
        .collect();
    let Some(statements) = rows.iter().map(|r| r.statement()).collect::<Option<Vec<_>>>() else {
        return false;
    };
    let sent: Vec<(&str, Params<'_>)> = statements
        .iter()
        .map(|(sql, b)| (sql.as_str(), &b.params[..]))
        .collect();
    let all_moved_on = match c.pipeline(&sent) {
        Ok(answers) => answers
            .iter()
            .map(EventRow::answer)
            .all(|(advanced, typing)| advanced && typing == 0),
        Err(e) => {
            tracing::debug!("a pipelined event write failed, writing each alone: {e}");
            false
        }
    };
    if all_moved_on {
        for (ev, p) in events.iter().zip(first..) {
            ctx.record_event(ev, p);
        }
    }
    all_moved_on
}

/// Inserts one event and applies its effects; runs inside the writer.
/// `linear`: a `Timeline` event may move the room's extremities on in the
/// event's own statement (SQLite's `graph::advance_linear`), and its prev
/// events must be stored; false for [`RoomGraphStore::remote_membership`].
pub(crate) fn insert_event(c: &mut PgConn, ctx: &mut WriterCtx, ev: &NewEvent, linear: bool) -> Result<i64> {
    let on_stream = ev.kind.on_stream();
    // Events off the stream (backfilled, outliers, rejected, soft-failed)
    // count down from below every stored position: no stream reader ever
    // sees them as new.
    let p = if on_stream { ctx.pos + 1 } else { ctx.low - 1 };
    // A backfilled event stored before as an outlier (a join's state, an
    // auth event) takes its place in the timeline at its new position.
    let outlier_at = if ev.kind == EventKind::Backfilled {
        c.query_opt(
            "SELECT position FROM events WHERE event_id = $1 AND outlier = 1",
            &[&ev.event_id],
        )
        .map_err(pg_err)?
        .map(|r| r.get::<_, i64>(0))
    } else {
        None
    };
    if let Some(old) = outlier_at {
        super::graph::promote_outlier(c, ev, old, p).map_err(pg_err)?;
    }
    let (advanced, typing_stopped) = write_event(c, ev, p, outlier_at.is_none(), linear).map_err(pg_err)?;
    // Built on a view of the room that is not the stored one (see
    // `NewEvent::expect_extremities`; another process wrote to the room):
    // refused, to be rebuilt (the job's savepoint undoes the statement).
    if !advanced && ev.expect_extremities.is_some() {
        let stored: Option<String> = c
            .query_opt("SELECT extremities FROM rooms WHERE room_id = $1", &[&ev.room_id])
            .map_err(pg_err)?
            .map(|r| r.get(0));
        if !ev.extremities_match(stored.as_deref()) {
            return Err(ev.room_moved());
        }
    }
    if outlier_at.is_none() && !advanced {
        let prevs_stored = super::graph::store_graph(c, ev).map_err(pg_err)?;
        if linear && ev.kind == EventKind::Timeline && !prevs_stored {
            return Err(Error::internal(
                "the event it follows failed to be stored; send it again",
            ));
        }
    }
    if on_stream {
        if let Some(cs) = &ev.current_state {
            for (event_type, state_key, _) in &cs.changes {
                if event_type == "m.room.member" {
                    ctx.changes.push((p, StreamKey::User(state_key.clone())));
                }
            }
        }
        // Leaving a room (or being kicked or banned) stops typing there:
        // the room's typers change at this event's position. (SQLite
        // announces it once per leaver who was typing; once is the same
        // news.)
        if typing_stopped > 0 {
            super::ephemeral::typing_changed(c, ctx, &ev.room_id, p).map_err(pg_err)?;
        }
    }
    ctx.record_event(ev, p);
    Ok(p)
}

/// The event's statement: its row (unless `insert_row` is false: a
/// promoted outlier's row is there), room, state groups, transaction ID,
/// relation, search row, redaction, state changes and, for a linear
/// `Timeline` event, the room's extremities. Answers whether the
/// extremities moved on and how many typing users it stopped.
fn write_event(c: &mut PgConn, ev: &NewEvent, p: i64, insert_row: bool, linear: bool) -> PgResult<(bool, i64)> {
    let row = EventRow::new(ev, p, insert_row, linear);
    let Some((sql, b)) = row.statement() else {
        // A promoted outlier with nothing else to write.
        return Ok((false, 0));
    };
    let answer = c.query_one(&sql, &b.params)?;
    Ok(EventRow::answer(&answer))
}

/// What an event's statement is built from ([`write_event`]), kept so the
/// writer can build the statements of several events before it sends them
/// ([`pipelinable`]).
pub(super) struct EventRow<'e> {
    ev: &'e NewEvent,
    p: i64,
    insert_row: bool,
    ts: i64,
    outlier: i64,
    soft_failed: i64,
    rejected: Option<&'e str>,
    txn_device: Option<&'e str>,
    txn_id: Option<&'e str>,
    groups: GroupRows<'e>,
    served: bool,
    group: Option<i64>,
    /// The linear room's extremities, as `advance_linear` compares them:
    /// (expected, new).
    advance: Option<(String, String)>,
    changes: StateRows<'e>,
    search_text: Option<String>,
}

impl<'e> EventRow<'e> {
    pub(super) fn new(ev: &'e NewEvent, p: i64, insert_row: bool, linear: bool) -> Self {
        let (txn_device, txn_id) = match &ev.txn {
            Some((d, t)) => (Some(d.as_str()), Some(t.as_str())),
            None => (None, None),
        };
        let advance =
            if linear && ev.kind == EventKind::Timeline && !ev.prev_events.is_empty() && ev.builds_on_all_expected() {
                serde_json::to_string(&ev.prev_events)
                    .ok()
                    .zip(serde_json::to_string(&[&ev.event_id]).ok())
            } else {
                None
            };
        EventRow {
            ev,
            p,
            insert_row,
            ts: ev.origin_server_ts as i64,
            outlier: (ev.kind == EventKind::Outlier) as i64,
            soft_failed: (ev.kind == EventKind::SoftFailed) as i64,
            rejected: match &ev.kind {
                EventKind::Rejected(why) => Some(why.as_str()),
                _ => None,
            },
            txn_device,
            txn_id,
            groups: GroupRows::new(&ev.new_groups),
            served: matches!(
                ev.kind,
                EventKind::Timeline | EventKind::TimelineAfterGap | EventKind::Backfilled
            ),
            group: ev.current_state.as_ref().map(|cs| cs.group),
            advance,
            changes: StateRows::new(ev),
            search_text: ev.search_text.as_deref().map(fold_diacritics),
        }
    }

    /// Whether the statement moves a linear room's extremities on.
    pub(super) fn advances(&self) -> bool {
        self.advance.is_some()
    }

    /// Whether the statement may stop typing (a membership change).
    pub(super) fn changes_members(&self) -> bool {
        self.changes.members
    }

    /// The statement's answer: whether the extremities moved on, and how
    /// many typing users it stopped.
    pub(super) fn answer(row: &Row) -> (bool, i64) {
        (row.get(0), row.get(1))
    }

    /// The statement and its parameters (`None`: nothing to write).
    pub(super) fn statement(&self) -> Option<(String, Built<'_>)> {
        let ev = self.ev;
        let (ts, outlier, soft_failed, rejected) = (&self.ts, &self.outlier, &self.soft_failed, &self.rejected);
        let (txn_device, txn_id) = (&self.txn_device, &self.txn_id);
        let (groups, served, group, advance) = (&self.groups, self.served, &self.group, &self.advance);
        let (changes, search_text, insert_row) = (&self.changes, &self.search_text, self.insert_row);
        let mut b = Built::new();
        let room = b.p(&ev.room_id, "TEXT");
        let pos = b.p(&self.p, "BIGINT");
        let id = b.p(&ev.event_id, "TEXT");
        if let Some(new_room) = &ev.new_room {
            let (v, cr) = (b.p(&new_room.room_version, "TEXT"), b.p(&new_room.creator, "TEXT"));
            b.cte(
                "ins_room",
                format!("INSERT INTO rooms (room_id, room_version, creator) VALUES ({room}, {v}, {cr})"),
            );
        }
        if insert_row {
            let cols = [
                b.p(&ev.event_type, "TEXT"),
                b.p(&ev.state_key, "TEXT"),
                b.p(&ev.sender, "TEXT"),
                b.p(ts, "BIGINT"),
                b.p(&ev.pdu_json, "TEXT"),
                b.p(txn_device, "TEXT"),
                b.p(txn_id, "TEXT"),
                b.p(&ev.depth, "BIGINT"),
                b.p(outlier, "BIGINT"),
                b.p(rejected, "TEXT"),
                b.p(soft_failed, "BIGINT"),
                b.p(&ev.state_before, "BIGINT"),
                b.p(&ev.state_after, "BIGINT"),
            ]
            .join(", ");
            b.cte(
                "ins_event",
                format!(
                    "INSERT INTO events (position, event_id, room_id, event_type, state_key, sender, \
                 origin_server_ts, pdu_json, txn_device, txn_id, depth, outlier, rejected, soft_failed, \
                 state_before, state_after) VALUES ({pos}, {id}, {room}, {cols})"
                ),
            );
            groups.add(&mut b, &room);
        }
        if let Some((d, t)) = &ev.txn {
            let vals = [
                b.p(&ev.sender, "TEXT"),
                b.p(d, "TEXT"),
                b.p(&ev.event_type, "TEXT"),
                b.p(t, "TEXT"),
            ];
            b.cte(
                "ins_txn",
                format!(
                    "INSERT INTO txns (user_id, device_id, room_id, event_type, txn_id, event_id) \
                 VALUES ({}, {}, {room}, {}, {}, {id})",
                    vals[0], vals[1], vals[2], vals[3]
                ),
            );
        }
        if let Some(rel) = ev.relation.as_ref().filter(|_| served) {
            let vals = [
                b.p(&rel.parent_event_id, "TEXT"),
                b.p(&rel.rel_type, "TEXT"),
                b.p(&ev.event_type, "TEXT"),
                b.p(&ev.sender, "TEXT"),
            ];
            b.cte(
                "ins_rel",
                format!(
                    "INSERT INTO relations (position, room_id, parent_event_id, rel_type, event_type, sender) \
                 VALUES ({pos}, {room}, {}, {}, {}, {})",
                    vals[0], vals[1], vals[2], vals[3]
                ),
            );
        }
        if let Some(text) = search_text.as_ref().filter(|_| served) {
            let column = match ev.event_type.as_str() {
                "m.room.name" => "name",
                "m.room.topic" => "topic",
                _ => "body",
            };
            let text = b.p(text, "TEXT");
            b.cte(
                "ins_search",
                format!("INSERT INTO event_search (position, {column}) VALUES ({pos}, {text})"),
            );
        }
        if let Some((target, redacted_json)) = &ev.redaction {
            let target = b.p(target, "TEXT");
            let json = b.p(redacted_json, "TEXT");
            b.cte(
                "red_search",
                format!(
                    "DELETE FROM event_search WHERE position = (SELECT position FROM events WHERE event_id = {target})"
                ),
            );
            b.cte(
                "red_event",
                format!("UPDATE events SET pdu_json = {json}, redacted_by = {id} WHERE event_id = {target}"),
            );
            // A redacted event's content, and so its relation, is gone.
            b.cte(
                "red_rel",
                format!(
                    "DELETE FROM relations WHERE position = (SELECT position FROM events WHERE event_id = {target})"
                ),
            );
        }
        let typing = changes.add(&mut b, &room, &pos, &id, ev.kind.on_stream());
        let advanced = match advance {
            Some((expected, new)) => {
                let (expected, new, g) = (b.p(expected, "TEXT"), b.p(new, "TEXT"), b.p(group, "BIGINT"));
                b.cte(
                    "adv",
                    format!(
                        "UPDATE rooms SET extremities = {new}, state_group = COALESCE({g}, state_group) \
                     WHERE room_id = {room} AND extremities = {expected} RETURNING 1"
                    ),
                );
                "EXISTS (SELECT 1 FROM adv)"
            }
            None => "false",
        };
        let typing = if typing {
            "(SELECT COUNT(*) FROM st_typing)"
        } else {
            "0::BIGINT"
        };
        if b.is_empty() {
            return None;
        }
        let sql = b.sql(&format!("SELECT {advanced}, {typing}"));
        Some((sql, b))
    }
}

/// New state groups as column arrays, for one `INSERT … SELECT FROM UNNEST`.
pub(crate) struct GroupRows<'a> {
    ids: Vec<i64>,
    prevs: Vec<Option<i64>>,
    chains: Vec<i64>,
    entry_groups: Vec<i64>,
    types: Vec<&'a str>,
    keys: Vec<&'a str>,
    events: Vec<&'a str>,
}

impl<'a> GroupRows<'a> {
    pub(crate) fn new(groups: &'a [NewStateGroup]) -> Self {
        let mut rows = GroupRows {
            ids: Vec::new(),
            prevs: Vec::new(),
            chains: Vec::new(),
            entry_groups: Vec::new(),
            types: Vec::new(),
            keys: Vec::new(),
            events: Vec::new(),
        };
        for g in groups {
            rows.ids.push(g.id);
            rows.prevs.push(g.prev_group);
            rows.chains.push(g.chain);
            for (t, k, id) in &g.entries {
                rows.entry_groups.push(g.id);
                rows.types.push(t);
                rows.keys.push(k);
                rows.events.push(id);
            }
        }
        rows
    }

    /// The CTEs inserting the groups (of the room `room`, a reference).
    pub(super) fn add<'b>(&'b self, b: &mut Built<'b>, room: &str) {
        if self.ids.is_empty() {
            return;
        }
        let (ids, prevs, chains) = (
            b.p(&self.ids, "BIGINT[]"),
            b.p(&self.prevs, "BIGINT[]"),
            b.p(&self.chains, "BIGINT[]"),
        );
        b.cte(
            "ins_groups",
            format!(
                "INSERT INTO state_groups (id, room_id, prev_group, chain) \
                 SELECT g, {room}, pg, ch FROM UNNEST({ids}, {prevs}, {chains}) AS x(g, pg, ch)"
            ),
        );
        if self.entry_groups.is_empty() {
            return;
        }
        let (g, t, k, e) = (
            b.p(&self.entry_groups, "BIGINT[]"),
            b.p(&self.types, "TEXT[]"),
            b.p(&self.keys, "TEXT[]"),
            b.p(&self.events, "TEXT[]"),
        );
        b.cte(
            "ins_entries",
            format!(
                "INSERT INTO state_group_entries (group_id, event_type, state_key, event_id) \
                 SELECT * FROM UNNEST({g}, {t}, {k}, {e})"
            ),
        );
    }
}

/// The event's changes of the current state, as column arrays.
struct StateRows<'a> {
    types: Vec<&'a str>,
    keys: Vec<&'a str>,
    events: Vec<&'a str>,
    /// The detail of a key pointing at this event: its membership (or
    /// history visibility).
    own_detail: Option<&'a str>,
    members: bool,
}

impl<'a> StateRows<'a> {
    fn new(ev: &'a NewEvent) -> Self {
        let mut rows = StateRows {
            types: Vec::new(),
            keys: Vec::new(),
            events: Vec::new(),
            own_detail: ev.membership.as_deref().or(ev.history_visibility.as_deref()),
            members: false,
        };
        if let Some(cs) = &ev.current_state {
            // One row per key (the last change of a key wins, as in
            // SQLite's loop): an upsert may not touch a row twice. (A
            // join's state may change thousands of keys at once.)
            let mut seen: HashMap<(&str, &str), usize> = HashMap::with_capacity(cs.changes.len());
            for (t, k, id) in &cs.changes {
                if let Some(&i) = seen.get(&(t.as_str(), k.as_str())) {
                    rows.events[i] = id;
                    continue;
                }
                seen.insert((t, k), rows.types.len());
                rows.members |= t == "m.room.member";
                rows.types.push(t);
                rows.keys.push(k);
                rows.events.push(id);
            }
        }
        rows
    }

    /// The CTEs of the state changes: the state log, the current state,
    /// memberships (a join un-forgets the room; leaving stops typing, on
    /// the stream). The key's event is this one (`id`, at `pos`) or one
    /// stored before (a missing one leaves the current state's position
    /// NULL: the statement fails, as SQLite's lookup does). Answers whether
    /// `st_typing` (the typing rows deleted) exists.
    fn add<'b>(&'b self, b: &mut Built<'b>, room: &str, pos: &str, id: &str, on_stream: bool) -> bool {
        if self.types.is_empty() {
            return false;
        }
        let (t, k, e) = (
            b.p(&self.types, "TEXT[]"),
            b.p(&self.keys, "TEXT[]"),
            b.p(&self.events, "TEXT[]"),
        );
        let own = b.p(&self.own_detail, "TEXT");
        b.cte(
            "ch",
            format!(
                "SELECT c.t, c.k, c.id, CASE WHEN c.id = {id} THEN {pos} ELSE e.position END AS ep, \
                 CASE WHEN c.t IN ('m.room.member', 'm.room.history_visibility') THEN \
                   CASE WHEN c.id = {id} THEN {own} ELSE COALESCE({PDU_JSON} -> 'content' ->> 'membership', \
                   {PDU_JSON} -> 'content' ->> 'history_visibility') END END AS detail \
                 FROM UNNEST({t}, {k}, {e}) AS c(t, k, id) LEFT JOIN events e ON e.event_id = c.id AND c.id <> {id}"
            ),
        );
        b.cte(
            "st_log",
            format!(
                "INSERT INTO state_events (room_id, event_type, state_key, position, detail, event_position) \
                 SELECT {room}, t, k, {pos}, detail, ep FROM ch \
                 ON CONFLICT (room_id, event_type, state_key, position) \
                 DO UPDATE SET detail = excluded.detail, event_position = excluded.event_position"
            ),
        );
        b.cte(
            "st_current",
            format!(
                "INSERT INTO current_state (room_id, event_type, state_key, position) \
                 SELECT {room}, t, k, ep FROM ch \
                 ON CONFLICT (room_id, event_type, state_key) DO UPDATE SET position = excluded.position"
            ),
        );
        if !self.members {
            return false;
        }
        b.cte(
            "st_members",
            format!(
                "INSERT INTO memberships (room_id, user_id, membership, event_id, position) \
                 SELECT {room}, k, COALESCE(detail, ''), id, {pos} FROM ch WHERE t = 'm.room.member' \
                 ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, \
                 event_id = excluded.event_id, position = excluded.position"
            ),
        );
        b.cte(
            "st_forgotten",
            format!(
                "DELETE FROM forgotten WHERE room_id = {room} AND user_id IN \
                 (SELECT k FROM ch WHERE t = 'm.room.member' AND detail = 'join')"
            ),
        );
        if !on_stream {
            return false;
        }
        b.cte(
            "st_typing",
            format!(
                "DELETE FROM typing WHERE room_id = {room} AND user_id IN \
                 (SELECT k FROM ch WHERE t = 'm.room.member' AND COALESCE(detail, '') <> 'join') RETURNING 1"
            ),
        );
        true
    }
}

pub(super) async fn room_info(s: &PgStore, room_id: &str) -> Result<Option<RoomRecord>> {
    let r = room_id.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            "SELECT room_id, room_version, creator FROM rooms WHERE room_id = $1",
            &[&r],
        )?
        .map(|r| RoomRecord {
            room_id: r.get(0),
            room_version: r.get(1),
            creator: r.get(2),
        }))
    })
    .await
}

pub(super) async fn get_event(s: &PgStore, event_id: &str) -> Result<Option<StoredEvent>> {
    let id = event_id.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            &format!("SELECT {EVENT_COLS} FROM events e WHERE e.event_id = $1"),
            &[&id],
        )?
        .map(|r| event_row(&r)))
    })
    .await
}

fn events(rows: Vec<Row>) -> Vec<StoredEvent> {
    rows.iter().map(event_row).collect()
}

pub(super) async fn current_state(s: &PgStore, room_id: &str) -> Result<Vec<StoredEvent>> {
    let r = room_id.to_owned();
    s.read(move |c| {
        Ok(events(c.query(
            &format!(
                "SELECT {EVENT_COLS} FROM current_state s JOIN events e ON e.position = s.position \
                 WHERE s.room_id = $1 ORDER BY e.position"
            ),
            &[&r],
        )?))
    })
    .await
}

pub(super) async fn state_at(s: &PgStore, room_id: &str, pos: i64) -> Result<Vec<StoredEvent>> {
    let r = room_id.to_owned();
    s.read(move |c| {
        // Per key, the newest change at or before `pos` (SQLite: the bare
        // column of `MAX(position)`).
        Ok(events(c.query(
            &format!(
                "SELECT {EVENT_COLS} FROM (SELECT DISTINCT ON (event_type, state_key) event_position AS p \
                 FROM state_events WHERE room_id = $1 AND position <= $2 \
                 ORDER BY event_type, state_key, position DESC) s \
                 JOIN events e ON e.position = s.p ORDER BY e.position"
            ),
            &[&r, &pos],
        )?))
    })
    .await
}

pub(super) async fn state_changes(s: &PgStore, room_id: &str, after: i64, upto: i64) -> Result<Vec<StoredEvent>> {
    let r = room_id.to_owned();
    s.read(move |c| {
        Ok(events(c.query(
            &format!(
                "SELECT {EVENT_COLS} FROM state_events s JOIN events e ON e.position = s.event_position \
                 WHERE s.room_id = $1 AND s.position > $2 AND s.position <= $3 ORDER BY s.position"
            ),
            &[&r, &after, &upto],
        )?))
    })
    .await
}

pub(super) async fn room_events(
    s: &PgStore,
    room_id: &str,
    from: i64,
    to: i64,
    dir: Direction,
    limit: usize,
) -> Result<Vec<StoredEvent>> {
    // The newest events come from memory.
    let (lo, hi) = match dir {
        Direction::Forward => (from, to),
        Direction::Backward => (to, from),
    };
    if let Some(events) = s.recent().read().room_events(room_id, lo, hi, dir, limit) {
        return Ok(events);
    }
    let r = room_id.to_owned();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        let sql = match dir {
            Direction::Forward => format!(
                "SELECT {EVENT_COLS} FROM events e WHERE e.room_id = $1 AND e.position > $2 \
                 AND e.position < $3 AND {SERVED} ORDER BY e.position ASC LIMIT $4"
            ),
            Direction::Backward => format!(
                "SELECT {EVENT_COLS} FROM events e WHERE e.room_id = $1 AND e.position < $2 \
                 AND e.position > $3 AND {SERVED} ORDER BY e.position DESC LIMIT $4"
            ),
        };
        Ok(events(c.query(&sql, &[&r, &from, &to, &limit])?))
    })
    .await
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn relations(
    s: &PgStore,
    room_id: &str,
    parent: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    from: i64,
    to: i64,
    dir: Direction,
    limit: usize,
) -> Result<Vec<StoredEvent>> {
    let (room, parent) = (room_id.to_owned(), parent.to_owned());
    let (rel, ty) = (rel_type.map(str::to_owned), event_type.map(str::to_owned));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let (lo, hi, order) = match dir {
        Direction::Forward => (from, to, "ASC"),
        Direction::Backward => (to, from, "DESC"),
    };
    s.read(move |c| {
        Ok(events(c.query(
            &format!(
                "SELECT {EVENT_COLS} FROM relations r JOIN events e ON e.position = r.position \
                 WHERE r.parent_event_id = $1 AND r.room_id = $2 \
                 AND ($3::TEXT IS NULL OR r.rel_type = $3::TEXT) AND ($4::TEXT IS NULL OR r.event_type = $4::TEXT) \
                 AND r.position > $5 AND r.position < $6 ORDER BY r.position {order} LIMIT $7"
            ),
            &[&parent, &room, &rel, &ty, &lo, &hi, &limit],
        )?))
    })
    .await
}

pub(super) async fn threads(
    s: &PgStore,
    room_id: &str,
    user: &str,
    only_participated: bool,
    before: i64,
    limit: usize,
) -> Result<Vec<ThreadRecord>> {
    let (room, user) = (room_id.to_owned(), user.to_owned());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        // One query (SQLite looks each root up in turn): the threads with
        // their root here, newest reply first. A reply to an event that is
        // not here is no thread.
        let rows = c.query(
            &format!(
                "SELECT {EVENT_COLS}, t.n, t.latest, t.replied FROM ( \
                   SELECT parent_event_id, COUNT(*) AS n, MAX(position) AS latest, bool_or(sender = $2) AS replied \
                   FROM relations WHERE room_id = $1 AND rel_type = 'm.thread' GROUP BY parent_event_id \
                   HAVING MAX(position) < $3) t \
                 JOIN events e ON e.event_id = t.parent_event_id AND e.room_id = $1 \
                 WHERE NOT $4 OR t.replied OR e.sender = $2 \
                 ORDER BY t.latest DESC LIMIT $5"
            ),
            &[&room, &user, &before, &only_participated, &limit],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                let root = event_row(r);
                let participated = r.get::<_, bool>(13) || root.sender == user;
                ThreadRecord {
                    root,
                    count: r.get::<_, i64>(11).max(0) as u64,
                    latest_position: r.get(12),
                    participated,
                }
            })
            .collect())
    })
    .await
}

/// Text as the search index holds it: without diacritics (`é` → `e`), as
/// FTS5's `remove_diacritics` folds them on SQLite (PostgreSQL's
/// `unaccent` is an extension a database may not have). Applied to the
/// stored text and to the query's words alike.
pub(crate) fn fold_diacritics(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    use unicode_normalization::char::is_combining_mark;
    text.nfd().filter(|c| !is_combining_mark(*c)).nfc().collect()
}

/// services' FTS5 query (`"w1"* "w2"*`: every word required, as a prefix)
/// as a `to_tsquery` text: `'w1':* & 'w2':*`.
fn ts_query(fts: &str) -> String {
    fts.split('"')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty())
        .map(|w| format!("'{}':*", fold_diacritics(w).replace('\\', "\\\\").replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(" & ")
}

/// Full-text search (FTS5 on SQLite, a `tsvector` here): results differ
/// from SQLite's at the edges: PostgreSQL's parser splits words its own
/// way (`simple` configuration: lower-cased, no stemming, no stop words;
/// diacritics are folded before, see [`fold_diacritics`]); the rank is
/// `-ts_rank` (lower is better, as FTS5's bm25 `rank`), not bm25.
#[allow(clippy::too_many_arguments)]
pub(super) async fn search_events(
    s: &PgStore,
    rooms: &[String],
    query: &str,
    keys: &[SearchKey],
    by_rank: bool,
    offset: usize,
    limit: usize,
) -> Result<(Vec<(StoredEvent, f64)>, u64)> {
    let tsq = ts_query(query);
    if rooms.is_empty() || keys.is_empty() || tsq.is_empty() {
        return Ok((vec![], 0));
    }
    // FTS5's column filter `{body name topic}`: a row holds one of them.
    let columns = keys
        .iter()
        .map(|k| match k {
            SearchKey::Body => "s.body IS NOT NULL",
            SearchKey::Name => "s.name IS NOT NULL",
            SearchKey::Topic => "s.topic IS NOT NULL",
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    let rooms = rooms.to_vec();
    let (offset, limit) = (
        i64::try_from(offset).unwrap_or(i64::MAX),
        i64::try_from(limit).unwrap_or(i64::MAX),
    );
    let order = if by_rank {
        "rank, e.position DESC"
    } else {
        "e.position DESC"
    };
    s.read(move |c| {
        let filter = format!(
            "FROM event_search s JOIN events e ON e.position = s.position \
             WHERE s.tsv @@ to_tsquery('simple', $1) AND ({columns}) AND e.room_id = ANY($2)"
        );
        let count: i64 = c
            .query_one(&format!("SELECT COUNT(*) {filter}"), &[&tsq, &rooms])?
            .get(0);
        let found = c
            .query(
                &format!(
                    "SELECT {EVENT_COLS}, -ts_rank(s.tsv, to_tsquery('simple', $1))::float8 AS rank {filter} \
                     ORDER BY {order} LIMIT $3 OFFSET $4"
                ),
                &[&tsq, &rooms, &limit, &offset],
            )?
            .iter()
            .map(|r| (event_row(r), r.get::<_, f64>(11)))
            .collect();
        Ok((found, count.max(0) as u64))
    })
    .await
}

pub(super) async fn rooms_changed(s: &PgStore, since: i64, upto: i64) -> Result<Vec<(String, i64)>> {
    s.read(move |c| {
        Ok(c.query(
            "SELECT room_id, MAX(position) FROM events WHERE position > $1 AND position <= $2 GROUP BY room_id",
            &[&since, &upto],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    })
    .await
}

pub(super) async fn user_memberships(s: &PgStore, user_id: &str) -> Result<Vec<MembershipRecord>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT room_id, membership, event_id, position FROM memberships WHERE user_id = $1 ORDER BY position",
            &[&u],
        )?
        .iter()
        .map(|r| MembershipRecord {
            room_id: r.get(0),
            membership: r.get(1),
            event_id: r.get(2),
            position: r.get(3),
        })
        .collect())
    })
    .await
}

fn history(rows: Vec<Row>) -> Vec<(i64, String)> {
    rows.iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect()
}

pub(super) async fn membership_history(s: &PgStore, room_id: &str, user_id: &str) -> Result<Vec<(i64, String)>> {
    let (r, u) = (room_id.to_owned(), user_id.to_owned());
    s.read(move |c| {
        Ok(history(c.query(
            "SELECT position, detail FROM state_events WHERE room_id = $1 AND event_type = 'm.room.member' \
             AND state_key = $2 ORDER BY position",
            &[&r, &u],
        )?))
    })
    .await
}

pub(super) async fn visibility_history(s: &PgStore, room_id: &str) -> Result<Vec<(i64, String)>> {
    let r = room_id.to_owned();
    s.read(move |c| {
        Ok(history(c.query(
            "SELECT position, detail FROM state_events WHERE room_id = $1 \
             AND event_type = 'm.room.history_visibility' AND state_key = '' ORDER BY position",
            &[&r],
        )?))
    })
    .await
}

pub(super) async fn txn_event(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    room_id: &str,
    event_type: &str,
    txn_id: &str,
) -> Result<Option<String>> {
    let (u, d, t) = (user_id.to_owned(), device_id.to_owned(), txn_id.to_owned());
    let (r, e) = (room_id.to_owned(), event_type.to_owned());
    s.read(move |c| {
        Ok(c.query_opt(
            "SELECT event_id FROM txns WHERE user_id = $1 AND device_id = $2 AND room_id = $3 \
             AND event_type = $4 AND txn_id = $5",
            &[&u, &d, &r, &e, &t],
        )?
        .map(|r| r.get(0)))
    })
    .await
}

pub(super) async fn forget_room(s: &PgStore, user_id: &str, room_id: &str) -> Result<()> {
    let (u, r) = (user_id.to_owned(), room_id.to_owned());
    s.write_wait(move |c, _| {
        c.execute(
            "INSERT INTO forgotten (user_id, room_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&u, &r],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn is_forgotten(s: &PgStore, user_id: &str, room_id: &str) -> Result<bool> {
    let (u, r) = (user_id.to_owned(), room_id.to_owned());
    s.read(move |c| {
        Ok(
            c.query_opt("SELECT 1 FROM forgotten WHERE user_id = $1 AND room_id = $2", &[&u, &r])?
                .is_some(),
        )
    })
    .await
}
