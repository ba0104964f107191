//! PostgreSQL: ephemeral (account data, receipts, push, typing, presence).

use super::*;

/// Stores account data (`room` empty: global) at the next stream position.
pub(crate) fn upsert_account_data(
    c: &mut PgConn,
    ctx: &mut WriterCtx,
    user: String,
    room: &str,
    data_type: &str,
    json: &str,
) -> Result<i64> {
    let p = ctx.pos + 1;
    c.execute(
        "INSERT INTO account_data (user_id, room_id, data_type, content_json, position) VALUES ($1,$2,$3,$4,$5) \
         ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content_json = excluded.content_json, \
         position = excluded.position",
        &[&user, &room, &data_type, &json, &p],
    )
    .map_err(pg_err)?;
    ctx.pos = p;
    ctx.changes.push((p, StreamKey::User(user)));
    Ok(p)
}

pub(super) fn put_account_data(
    s: &PgStore,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    content_json: &str,
) -> Pending<i64> {
    let (u, r, t, j) = (
        user_id.to_owned(),
        room_id.unwrap_or("").to_owned(),
        data_type.to_owned(),
        content_json.to_owned(),
    );
    s.write(move |c, ctx| upsert_account_data(c, ctx, u, &r, &t, &j))
}

pub(super) fn edit_account_data(
    s: &PgStore,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    edit: AccountDataEdit,
) -> Pending<i64> {
    let (u, r, t) = (
        user_id.to_owned(),
        room_id.unwrap_or("").to_owned(),
        data_type.to_owned(),
    );
    s.write(move |c, ctx| {
        // Read on the writer's connection, inside its transaction (which
        // holds the stream_head row lock): no other write, of this process
        // or another, comes in between.
        let old: Option<String> = c
            .query_opt(
                "SELECT content_json FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3",
                &[&u, &r, &t],
            )
            .map_err(pg_err)?
            .map(|row| row.get(0));
        // A panicking edit must not take the writer (and every later
        // write) down with it.
        let new = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || edit(old)))
            .map_err(|_| Error::internal("account data edit panicked"))??;
        upsert_account_data(c, ctx, u, &r, &t, &new)
    })
}

pub(super) async fn get_account_data(
    s: &PgStore,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
) -> Result<Option<String>> {
    let (u, r, t) = (
        user_id.to_owned(),
        room_id.unwrap_or("").to_owned(),
        data_type.to_owned(),
    );
    s.read(move |c| {
        Ok(c.query_opt(
            "SELECT content_json FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3",
            &[&u, &r, &t],
        )?
        .map(|row| row.get(0)))
    })
    .await
}

pub(super) async fn account_data_since(
    s: &PgStore,
    user_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<AccountDataRecord>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT room_id, data_type, content_json, position FROM account_data \
             WHERE user_id = $1 AND position > $2 AND position <= $3 ORDER BY position",
            &[&u, &since, &upto],
        )?
        .iter()
        .map(|r| {
            let room: String = r.get(0);
            AccountDataRecord {
                room_id: (!room.is_empty()).then_some(room),
                data_type: r.get(1),
                content_json: r.get(2),
                position: r.get(3),
            }
        })
        .collect())
    })
    .await
}

pub(super) fn put_receipt(s: &PgStore, r: ReceiptRecord) -> Pending<i64> {
    s.write(move |c, ctx| {
        let p = ctx.pos + 1;
        c.execute(
            "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, ts, position) \
             VALUES ($1,$2,$3,$4,$5,$6,$7) \
             ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET \
             event_id = excluded.event_id, ts = excluded.ts, position = excluded.position",
            &[
                &r.room_id,
                &r.receipt_type,
                &r.user_id,
                &r.thread_id,
                &r.event_id,
                &(r.ts as i64),
                &p,
            ],
        )
        .map_err(pg_err)?;
        ctx.pos = p;
        ctx.changes.push((p, StreamKey::Receipt(r.room_id)));
        Ok(p)
    })
}

pub(super) async fn receipts_since(s: &PgStore, room_id: &str, since: i64, upto: i64) -> Result<Vec<ReceiptRecord>> {
    let room = room_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT room_id, receipt_type, user_id, thread_id, event_id, ts, position FROM receipts \
             WHERE room_id = $1 AND position > $2 AND position <= $3 ORDER BY position",
            &[&room, &since, &upto],
        )?
        .iter()
        .map(|r| ReceiptRecord {
            room_id: r.get(0),
            receipt_type: r.get(1),
            user_id: r.get(2),
            thread_id: r.get(3),
            event_id: r.get(4),
            ts: r.get::<_, i64>(5).max(0) as u64,
            position: r.get(6),
        })
        .collect())
    })
    .await
}

/// What a user has read in a room: the position of the newest unthreaded
/// read receipt, and per thread.
type ReadPositions = (i64, HashMap<String, i64>);

/// The newest `m.read`/`m.read.private` receipt positions (the stream
/// positions of the events they point at) of `user` in each of `rooms`:
/// unthreaded, and per thread. One query for all the rooms (SQLite asks
/// per room).
fn read_positions(c: &mut PgConn, user: &str, rooms: &[&str]) -> PgResult<HashMap<String, ReadPositions>> {
    let mut out: HashMap<String, ReadPositions> = HashMap::new();
    for row in c.query(
        "SELECT r.room_id, r.thread_id, MAX(e.position) FROM receipts r JOIN events e ON e.event_id = r.event_id \
         WHERE r.room_id = ANY($1) AND r.user_id = $2 AND r.receipt_type IN ('m.read', 'm.read.private') \
         GROUP BY r.room_id, r.thread_id",
        &[&rooms, &user],
    )? {
        let (room, thread): (String, String) = (row.get(0), row.get(1));
        let pos = row.get::<_, Option<i64>>(2).unwrap_or(0);
        let slot = out.entry(room).or_default();
        if thread.is_empty() {
            slot.0 = pos;
        } else {
            slot.1.insert(thread, pos);
        }
    }
    Ok(out)
}

/// Whether a row of `thread` at `event_position` is read, given the
/// receipts [`read_positions`] found.
fn is_read(read: &ReadPositions, thread: &str, event_position: i64) -> bool {
    let threaded = read.1.get(thread).copied().unwrap_or(0);
    event_position <= read.0.max(threaded)
}

const NOTIFICATION_COLS: &str =
    "position, user_id, room_id, event_id, event_position, thread_id, actions_json, highlight, ts";

fn notification_row(r: &Row) -> NotificationRecord {
    NotificationRecord {
        position: r.get(0),
        user_id: r.get(1),
        room_id: r.get(2),
        event_id: r.get(3),
        event_position: r.get(4),
        thread_id: r.get(5),
        actions_json: r.get(6),
        highlight: r.get::<_, i64>(7) != 0,
        ts: r.get::<_, i64>(8).max(0) as u64,
        read: false,
    }
}

fn pusher_row(r: &Row) -> PusherRecord {
    PusherRecord {
        user_id: r.get(0),
        app_id: r.get(1),
        pushkey: r.get(2),
        pusher_json: r.get(3),
        pushkey_ts: r.get::<_, i64>(4).max(0) as u64,
        last_sent: r.get(5),
        from_event: r.get(6),
    }
}

pub(super) fn add_notifications(s: &PgStore, rows: Vec<NewNotification>, evaluated: i64) -> Pending<()> {
    if !s.push_mark.must_write(!rows.is_empty()) {
        return crate::stream::done(());
    }
    s.write(move |c, ctx| {
        // One statement for the batch (the push evaluator's hot path).
        let n = rows.len();
        let mut positions = Vec::with_capacity(n);
        let (mut users, mut rooms, mut events) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut event_positions, mut threads) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut actions, mut highlights, mut ts) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for (i, row) in rows.iter().enumerate() {
            positions.push(ctx.pos + 1 + i as i64);
            users.push(row.user_id.as_str());
            rooms.push(row.room_id.as_str());
            events.push(row.event_id.as_str());
            event_positions.push(row.event_position);
            threads.push(row.thread_id.as_str());
            actions.push(row.actions_json.as_str());
            highlights.push(row.highlight as i64);
            ts.push(row.ts as i64);
        }
        if n > 0 {
            c.execute(
                "INSERT INTO notifications (position, user_id, room_id, event_id, event_position, thread_id, \
                 actions_json, highlight, ts) SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], \
                 $4::TEXT[], $5::BIGINT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::BIGINT[])",
                &[
                    &positions,
                    &users,
                    &rooms,
                    &events,
                    &event_positions,
                    &threads,
                    &actions,
                    &highlights,
                    &ts,
                ],
            )
            .map_err(pg_err)?;
        }
        for (p, row) in positions.into_iter().zip(rows) {
            ctx.pos = p;
            ctx.changes.push((p, StreamKey::Notification(row.user_id, row.room_id)));
        }
        c.execute(
            "INSERT INTO meta (key, value) VALUES ('push_evaluated', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&evaluated.to_string()],
        )
        .map_err(pg_err)?;
        Ok(())
    })
}

pub(super) async fn unread_counts(s: &PgStore, user_id: &str, room_id: Option<&str>) -> Result<Vec<UnreadCount>> {
    let (u, room) = (user_id.to_owned(), room_id.map(str::to_owned));
    s.read(move |c| {
        // SQLite asks per room (the rooms, then per room its receipts and
        // rows); here one query: a row is unread past the newest receipt
        // that applies to it, unthreaded or of its thread (`is_read`).
        // Invites (thread '') never count.
        let rows = c.query(
            "WITH reads AS ( \
               SELECT r.room_id, r.thread_id, MAX(e.position) AS pos FROM receipts r \
               JOIN events e ON e.event_id = r.event_id \
               WHERE r.user_id = $1 AND ($2::TEXT IS NULL OR r.room_id = $2::TEXT) \
               AND r.receipt_type IN ('m.read', 'm.read.private') GROUP BY r.room_id, r.thread_id) \
             SELECT n.room_id, n.thread_id, COUNT(*), SUM(n.highlight)::BIGINT FROM notifications n \
             LEFT JOIN reads f ON f.room_id = n.room_id AND f.thread_id = '' \
             LEFT JOIN reads t ON t.room_id = n.room_id AND t.thread_id = n.thread_id \
             WHERE n.user_id = $1 AND ($2::TEXT IS NULL OR n.room_id = $2::TEXT) AND n.thread_id != '' \
             AND n.event_position > GREATEST(COALESCE(f.pos, 0), COALESCE(t.pos, 0)) \
             GROUP BY n.room_id, n.thread_id ORDER BY n.room_id, n.thread_id",
            &[&u, &room],
        )?;
        Ok(rows
            .iter()
            .map(|r| UnreadCount {
                room_id: r.get(0),
                thread_id: r.get(1),
                notifications: r.get::<_, i64>(2).max(0) as u64,
                highlights: r.get::<_, i64>(3).max(0) as u64,
            })
            .collect())
    })
    .await
}

pub(super) async fn notifications(
    s: &PgStore,
    user_id: &str,
    before: Option<i64>,
    limit: usize,
    only_highlight: bool,
) -> Result<Vec<NotificationRecord>> {
    let u = user_id.to_owned();
    let before = before.unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        let sql = format!(
            "SELECT {NOTIFICATION_COLS} FROM notifications WHERE user_id = $1 AND position < $2 \
             AND ($3::BIGINT = 0 OR highlight = 1) ORDER BY position DESC LIMIT $4"
        );
        let mut rows: Vec<NotificationRecord> = c
            .query(&sql, &[&u, &before, &(only_highlight as i64), &limit])?
            .iter()
            .map(notification_row)
            .collect();
        let mut rooms: Vec<&str> = rows.iter().map(|n| n.room_id.as_str()).collect();
        rooms.sort_unstable();
        rooms.dedup();
        if rooms.is_empty() {
            return Ok(rows);
        }
        let reads = read_positions(c, &u, &rooms)?;
        for n in &mut rows {
            if let Some(read) = reads.get(&n.room_id) {
                n.read = is_read(read, &n.thread_id, n.event_position);
            }
        }
        Ok(rows)
    })
    .await
}

pub(super) async fn notifications_after(
    s: &PgStore,
    user_id: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<NotificationRecord>> {
    let u = user_id.to_owned();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        let sql = format!(
            "SELECT {NOTIFICATION_COLS} FROM notifications WHERE user_id = $1 AND position > $2 \
             ORDER BY position LIMIT $3"
        );
        Ok(c.query(&sql, &[&u, &after, &limit])?
            .iter()
            .map(notification_row)
            .collect())
    })
    .await
}

pub(super) async fn set_pusher(s: &PgStore, p: PusherRecord, append: bool) -> Result<()> {
    s.write_wait(move |c, ctx| {
        if !append {
            c.execute(
                "DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id != $3",
                &[&p.app_id, &p.pushkey, &p.user_id],
            )
            .map_err(pg_err)?;
        }
        // A new pusher starts after the newest notification; a replaced
        // one keeps its place.
        c.execute(
            "INSERT INTO pushers (user_id, app_id, pushkey, pusher_json, pushkey_ts, last_sent, from_event) \
             VALUES ($1, $2, $3, $4, $5, (SELECT COALESCE(MAX(position), 0) FROM notifications), $6) \
             ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET pusher_json = excluded.pusher_json, \
             pushkey_ts = excluded.pushkey_ts",
            &[
                &p.user_id,
                &p.app_id,
                &p.pushkey,
                &p.pusher_json,
                &(p.pushkey_ts as i64),
                &ctx.pos,
            ],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn delete_pusher(s: &PgStore, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
    let (u, a, k) = (user_id.to_owned(), app_id.to_owned(), pushkey.to_owned());
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3",
                &[&u, &a, &k],
            )
            .map_err(pg_err)?;
        Ok(n > 0)
    })
    .await
}

pub(super) async fn pushers(s: &PgStore, user_id: Option<&str>) -> Result<Vec<PusherRecord>> {
    let u = user_id.map(str::to_owned);
    s.read(move |c| {
        Ok(c.query(
            "SELECT user_id, app_id, pushkey, pusher_json, pushkey_ts, last_sent, from_event FROM pushers \
             WHERE $1::TEXT IS NULL OR user_id = $1::TEXT ORDER BY user_id, app_id, pushkey",
            &[&u],
        )?
        .iter()
        .map(pusher_row)
        .collect())
    })
    .await
}

pub(super) async fn pusher_sent(s: &PgStore, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<()> {
    let (u, a, k) = (user_id.to_owned(), app_id.to_owned(), pushkey.to_owned());
    s.write_wait(move |c, _| {
        c.execute(
            "UPDATE pushers SET last_sent = GREATEST(last_sent, $4) WHERE user_id = $1 AND app_id = $2 AND pushkey = $3",
            &[&u, &a, &k, &position],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn events_after(s: &PgStore, after: i64, upto: i64, limit: usize) -> Result<Vec<StoredEvent>> {
    // The stream's followers (push evaluator, federation queue) read just
    // after each commit: from the in-memory tail, no query.
    if let Some(events) = s.recent().read().events_after(after, upto, limit) {
        return Ok(events);
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        Ok(c.query(
            "SELECT e.position, e.event_id, e.room_id, e.event_type, e.state_key, e.sender, e.origin_server_ts, \
             e.pdu_json, e.redacted_by, e.txn_device, e.txn_id FROM events e \
             WHERE e.position > $1 AND e.position <= $2 ORDER BY e.position LIMIT $3",
            &[&after, &upto, &limit],
        )?
        .iter()
        .map(event_row)
        .collect())
    })
    .await
}

/// Records that the typers of `room` changed at stream position `p`
/// (announced as `Typing`).
pub(crate) fn typing_changed(c: &mut PgConn, ctx: &mut WriterCtx, room: &str, p: i64) -> PgResult<()> {
    c.execute(
        "INSERT INTO typing_rooms (room_id, position) VALUES ($1, $2) \
         ON CONFLICT (room_id) DO UPDATE SET position = excluded.position",
        &[&room, &p],
    )?;
    ctx.changes.push((p, StreamKey::Typing(room.to_owned())));
    Ok(())
}

pub(super) fn set_typing(s: &PgStore, room_id: &str, user_id: &str, expires_ms: Option<u64>) -> Pending<Option<i64>> {
    let (room, user) = (room_id.to_owned(), user_id.to_owned());
    s.write(move |c, ctx| {
        let now = weft_core::now_ms() as i64;
        // A row past its expiry no longer counts as typing, but its
        // removal (here or by the expiry task) is still a change.
        let row: Option<bool> = c
            .query_opt(
                "SELECT expires_ms > $3 FROM typing WHERE room_id = $1 AND user_id = $2",
                &[&room, &user, &now],
            )
            .map_err(pg_err)?
            .map(|r| r.get(0));
        match expires_ms {
            Some(until) => {
                // The upsert keeps a row's `id`, so a typer keeps their
                // place in the room's list (SQLite keeps the rowid).
                c.execute(
                    "INSERT INTO typing (room_id, user_id, expires_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (room_id, user_id) DO UPDATE SET expires_ms = excluded.expires_ms",
                    &[&room, &user, &(until as i64)],
                )
                .map_err(pg_err)?;
                if row == Some(true) {
                    return Ok(None);
                }
            }
            None => {
                c.execute(
                    "DELETE FROM typing WHERE room_id = $1 AND user_id = $2",
                    &[&room, &user],
                )
                .map_err(pg_err)?;
                if row.is_none() {
                    return Ok(None);
                }
            }
        }
        let p = ctx.pos + 1;
        ctx.pos = p;
        typing_changed(c, ctx, &room, p).map_err(pg_err)?;
        Ok(Some(p))
    })
}

pub(super) async fn typing(s: &PgStore, room_id: &str, now_ms: u64) -> Result<(Vec<String>, i64)> {
    let room = room_id.to_owned();
    s.read(move |c| {
        // `id` stands for SQLite's rowid: the order they started typing.
        let users = c
            .query(
                "SELECT user_id FROM typing WHERE room_id = $1 AND expires_ms > $2 ORDER BY id",
                &[&room, &(now_ms as i64)],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let position: Option<i64> = c
            .query_opt("SELECT position FROM typing_rooms WHERE room_id = $1", &[&room])?
            .map(|r| r.get(0));
        Ok((users, position.unwrap_or(0)))
    })
    .await
}

pub(super) fn expire_typing(s: &PgStore, now_ms: u64) -> Pending<Vec<String>> {
    s.write(move |c, ctx| {
        let now = now_ms as i64;
        let rooms: Vec<String> = c
            .query(
                "SELECT DISTINCT room_id FROM typing WHERE expires_ms <= $1 ORDER BY room_id",
                &[&now],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if rooms.is_empty() {
            return Ok(rooms);
        }
        c.execute("DELETE FROM typing WHERE expires_ms <= $1", &[&now])
            .map_err(pg_err)?;
        let positions: Vec<i64> = (1..=rooms.len() as i64).map(|i| ctx.pos + i).collect();
        c.execute(
            "INSERT INTO typing_rooms (room_id, position) SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[]) \
             ON CONFLICT (room_id) DO UPDATE SET position = excluded.position",
            &[&rooms, &positions],
        )
        .map_err(pg_err)?;
        for (room, p) in rooms.iter().zip(positions) {
            ctx.pos = p;
            ctx.changes.push((p, StreamKey::Typing(room.clone())));
        }
        Ok(rooms)
    })
}

const PRESENCE_COLUMNS: &str = "user_id, presence, status_msg, last_active_ms, online_until_ms, position";

fn presence_row(r: &Row) -> PresenceRecord {
    PresenceRecord {
        user_id: r.get(0),
        presence: r.get(1),
        status_msg: r.get(2),
        last_active_ms: r.get::<_, i64>(3).max(0) as u64,
        online_until_ms: r.get::<_, i64>(4).max(0) as u64,
        position: r.get(5),
    }
}

pub(super) async fn presence(s: &PgStore, user_id: &str) -> Result<Option<PresenceRecord>> {
    let user = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            &format!("SELECT {PRESENCE_COLUMNS} FROM presence WHERE user_id = $1"),
            &[&user],
        )?
        .map(|r| presence_row(&r)))
    })
    .await
}

pub(super) fn edit_presence(s: &PgStore, user_id: &str, edit: PresenceEdit) -> Pending<Option<i64>> {
    let user = user_id.to_owned();
    s.write(move |c, ctx| {
        let old = c
            .query_opt(
                &format!("SELECT {PRESENCE_COLUMNS} FROM presence WHERE user_id = $1"),
                &[&user],
            )
            .map_err(pg_err)?
            .map(|r| presence_row(&r));
        let old_position = old.as_ref().map(|o| o.position).unwrap_or(0);
        let edited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || edit(old)))
            .map_err(|_| Error::internal("presence edit panicked"))?;
        let Some((new, bump)) = edited else { return Ok(None) };
        let position = if bump { ctx.pos + 1 } else { old_position };
        c.execute(
            "INSERT INTO presence (user_id, presence, status_msg, last_active_ms, online_until_ms, position) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id) DO UPDATE SET \
             presence = excluded.presence, status_msg = excluded.status_msg, \
             last_active_ms = excluded.last_active_ms, online_until_ms = excluded.online_until_ms, \
             position = excluded.position",
            &[
                &user,
                &new.presence,
                &new.status_msg,
                &(new.last_active_ms as i64),
                &(new.online_until_ms as i64),
                &position,
            ],
        )
        .map_err(pg_err)?;
        if !bump {
            return Ok(None);
        }
        ctx.pos = position;
        ctx.changes.push((position, StreamKey::Presence(user)));
        Ok(Some(position))
    })
}

pub(super) async fn presence_since(s: &PgStore, viewer: &str, since: i64, upto: i64) -> Result<Vec<PresenceRecord>> {
    let viewer = viewer.to_owned();
    s.read(move |c| {
        Ok(c.query(
            &format!(
                "SELECT {PRESENCE_COLUMNS} FROM presence p WHERE position > $2 AND position <= $3 \
                 AND (user_id = $1 OR EXISTS (SELECT 1 FROM memberships a JOIN memberships b \
                 ON a.room_id = b.room_id WHERE a.user_id = $1 AND a.membership = 'join' \
                 AND b.user_id = p.user_id AND b.membership = 'join')) ORDER BY position"
            ),
            &[&viewer, &since, &upto],
        )?
        .iter()
        .map(presence_row)
        .collect())
    })
    .await
}

pub(super) async fn share_room(s: &PgStore, a: &str, b: &str) -> Result<bool> {
    let (a, b) = (a.to_owned(), b.to_owned());
    s.read(move |c| {
        Ok(c.query_one(
            "SELECT EXISTS (SELECT 1 FROM memberships x JOIN memberships y ON x.room_id = y.room_id \
             WHERE x.user_id = $1 AND x.membership = 'join' AND y.user_id = $2 AND y.membership = 'join')",
            &[&a, &b],
        )?
        .get(0))
    })
    .await
}

pub(super) fn expire_presence(s: &PgStore, now_ms: u64, idle_ms: u64) -> Pending<Vec<String>> {
    s.write(move |c, ctx| {
        let now = now_ms as i64;
        let idle = idle_ms as i64;
        // Offline first: a user both idle and gone is just gone.
        let due: Vec<(String, &'static str)> = c
            .query(
                "SELECT user_id, online_until_ms > 0 AND online_until_ms <= $1 \
                 FROM presence WHERE presence != 'offline' AND ((online_until_ms > 0 AND online_until_ms <= $1) \
                 OR (presence = 'online' AND last_active_ms + $2 <= $1)) ORDER BY user_id",
                &[&now, &idle],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| (r.get(0), if r.get::<_, bool>(1) { "offline" } else { "unavailable" }))
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for all of them (SQLite updates each).
        let positions: Vec<i64> = (1..=due.len() as i64).map(|i| ctx.pos + i).collect();
        let users: Vec<&str> = due.iter().map(|(u, _)| u.as_str()).collect();
        let states: Vec<&str> = due.iter().map(|(_, s)| *s).collect();
        c.execute(
            "UPDATE presence p SET presence = d.state, position = d.pos, \
             online_until_ms = CASE WHEN d.state = 'offline' THEN 0 ELSE p.online_until_ms END \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS d(user_id, state, pos) \
             WHERE p.user_id = d.user_id",
            &[&users, &states, &positions],
        )
        .map_err(pg_err)?;
        let mut changed = Vec::with_capacity(due.len());
        for ((user, _), p) in due.into_iter().zip(positions) {
            ctx.pos = p;
            ctx.changes.push((p, StreamKey::Presence(user.clone())));
            changed.push(user);
        }
        Ok(changed)
    })
}

pub(super) async fn next_ephemeral_deadline(s: &PgStore, idle_ms: Option<u64>) -> Result<Option<u64>> {
    s.read(move |c| {
        let due: Option<i64> = match idle_ms {
            None => c.query_one("SELECT MIN(expires_ms) FROM typing", &[])?.get(0),
            // One round trip for the three (SQLite asks each).
            Some(idle_ms) => c
                .query_one(
                    "SELECT LEAST((SELECT MIN(expires_ms) FROM typing), \
                     (SELECT MIN(online_until_ms) FROM presence WHERE presence != 'offline' AND online_until_ms > 0), \
                     (SELECT MIN(last_active_ms) + $1::BIGINT FROM presence WHERE presence = 'online'))",
                    &[&(idle_ms as i64)],
                )?
                .get(0),
        };
        Ok(due.map(|t| t.max(0) as u64))
    })
    .await
}
