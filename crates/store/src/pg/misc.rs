//! PostgreSQL: misc.

use super::*;

pub(super) async fn search_users(s: &PgStore, requester: &str, term: &str, limit: usize) -> Result<Vec<UserRecord>> {
    let me = requester.to_owned();
    // LIKE's own wildcards in the term match themselves. Both sides are
    // lowered (the `C` collation's lower() folds ASCII only, as SQLite's),
    // so PostgreSQL's case-sensitive LIKE finds what SQLite's does.
    let pattern = format!(
        "%{}%",
        term.to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        Ok(c.query(
            "SELECT u.user_id, u.admin, u.displayname, u.avatar_url, u.created_ms FROM users u \
             WHERE u.deactivated = 0 \
             AND (lower(u.user_id) LIKE $2 ESCAPE '\\' OR lower(COALESCE(u.displayname, '')) LIKE $2 ESCAPE '\\') \
             AND (u.user_id = $1 OR EXISTS ( \
               SELECT 1 FROM memberships m JOIN memberships mine ON mine.room_id = m.room_id \
               WHERE m.user_id = u.user_id AND m.membership = 'join' \
               AND mine.user_id = $1 AND mine.membership = 'join') \
             OR EXISTS ( \
               SELECT 1 FROM memberships m JOIN rooms r ON r.room_id = m.room_id \
               WHERE m.user_id = u.user_id AND m.membership = 'join' AND r.is_public = 1)) \
             ORDER BY u.user_id LIMIT $3",
            &[&me, &pattern, &limit],
        )?
        .iter()
        .map(|r| UserRecord {
            user_id: r.get(0),
            password_hash: None,
            admin: r.get::<_, i64>(1) != 0,
            deactivated: false,
            displayname: r.get(2),
            avatar_url: r.get(3),
            created_ms: r.get::<_, i64>(4).max(0) as u64,
        })
        .collect())
    })
    .await
}

pub(super) async fn add_report(s: &PgStore, report: Report) -> Result<i64> {
    s.write_wait(move |c, _| {
        // SQLite answers last_insert_rowid.
        let row = c
            .query_one(
                "INSERT INTO reports (reporter, room_id, event_id, target_user, reason, received_ms) \
                 VALUES ($1,$2,$3,$4,$5,$6) RETURNING id",
                &[
                    &report.reporter,
                    &report.room_id,
                    &report.event_id,
                    &report.target_user,
                    &report.reason,
                    &(report.received_ms as i64),
                ],
            )
            .map_err(pg_err)?;
        Ok(row.get(0))
    })
    .await
}

pub(super) async fn reports(s: &PgStore, limit: usize) -> Result<Vec<Report>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        Ok(c.query(
            "SELECT id, reporter, room_id, event_id, target_user, reason, received_ms FROM reports \
             ORDER BY id DESC LIMIT $1",
            &[&limit],
        )?
        .iter()
        .map(|r| Report {
            id: r.get(0),
            reporter: r.get(1),
            room_id: r.get(2),
            event_id: r.get(3),
            target_user: r.get(4),
            reason: r.get(5),
            received_ms: r.get::<_, i64>(6).max(0) as u64,
        })
        .collect())
    })
    .await
}

pub(super) async fn public_rooms(s: &PgStore) -> Result<Vec<String>> {
    s.read(|c| {
        Ok(
            c.query("SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY room_id", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        )
    })
    .await
}

pub(super) async fn set_room_public(s: &PgStore, room_id: &str, public: bool) -> Result<()> {
    let r = room_id.to_owned();
    s.write_wait(move |c, _| {
        c.execute(
            "UPDATE rooms SET is_public = $1 WHERE room_id = $2",
            &[&(public as i64), &r],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn create_alias(s: &PgStore, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
    let (a, r, u) = (alias.to_owned(), room_id.to_owned(), creator.to_owned());
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "INSERT INTO aliases (alias, room_id, creator) VALUES ($1,$2,$3) ON CONFLICT (alias) DO NOTHING",
                &[&a, &r, &u],
            )
            .map_err(pg_err)?;
        Ok(n == 1)
    })
    .await
}

pub(super) async fn resolve_alias(s: &PgStore, alias: &str) -> Result<Option<AliasRecord>> {
    let a = alias.to_owned();
    s.read(move |c| {
        Ok(
            c.query_opt("SELECT alias, room_id, creator FROM aliases WHERE alias = $1", &[&a])?
                .map(|r| AliasRecord {
                    alias: r.get(0),
                    room_id: r.get(1),
                    creator: r.get(2),
                }),
        )
    })
    .await
}

pub(super) async fn delete_alias(s: &PgStore, alias: &str) -> Result<bool> {
    let a = alias.to_owned();
    s.write_wait(move |c, _| {
        Ok(c.execute("DELETE FROM aliases WHERE alias = $1", &[&a])
            .map_err(pg_err)?
            == 1)
    })
    .await
}

pub(super) async fn room_aliases(s: &PgStore, room_id: &str) -> Result<Vec<String>> {
    let r = room_id.to_owned();
    s.read(move |c| {
        Ok(
            c.query("SELECT alias FROM aliases WHERE room_id = $1 ORDER BY alias", &[&r])?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        )
    })
    .await
}

pub(super) async fn sliding_connection(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    conn_id: &str,
) -> Result<Option<String>> {
    let (u, d, c) = (user_id.to_owned(), device_id.to_owned(), conn_id.to_owned());
    s.read(move |conn| {
        Ok(conn
            .query_opt(
                "SELECT state_json FROM sliding_sync_connections \
                 WHERE user_id = $1 AND device_id = $2 AND conn_id = $3",
                &[&u, &d, &c],
            )?
            .map(|r| r.get(0)))
    })
    .await
}

pub(super) async fn put_sliding_connection(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    conn_id: &str,
    state_json: &str,
) -> Result<()> {
    let (u, d, c, j) = (
        user_id.to_owned(),
        device_id.to_owned(),
        conn_id.to_owned(),
        state_json.to_owned(),
    );
    let now = i64::try_from(weft_core::now_ms()).unwrap_or(i64::MAX);
    s.write_wait(move |conn, _| {
        conn.execute(
            "INSERT INTO sliding_sync_connections (user_id, device_id, conn_id, state_json, updated_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, device_id, conn_id) \
             DO UPDATE SET state_json = excluded.state_json, updated_ms = excluded.updated_ms",
            &[&u, &d, &c, &j, &now],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn get_meta(s: &PgStore, key: &str) -> Result<Option<String>> {
    let k = key.to_owned();
    s.read(move |c| {
        Ok(c.query_opt("SELECT value FROM meta WHERE key = $1", &[&k])?
            .map(|r| r.get(0)))
    })
    .await
}

pub(super) async fn init_meta(s: &PgStore, key: &str, value: &str) -> Result<bool> {
    let (k, v) = (key.to_owned(), value.to_owned());
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&k, &v],
            )
            .map_err(pg_err)?;
        Ok(n > 0)
    })
    .await
}

pub(super) async fn set_meta(s: &PgStore, key: &str, value: &str) -> Result<()> {
    let (k, v) = (key.to_owned(), value.to_owned());
    s.write_wait(move |c, _| {
        c.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&k, &v],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

fn ms(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) async fn create_uia_session(s: &PgStore, session_id: &str, now_ms: u64, prune_before_ms: u64) -> Result<()> {
    let id = session_id.to_owned();
    s.write_wait(move |c, _| {
        c.execute(
            "DELETE FROM uia_sessions WHERE created_ms < $1",
            &[&ms(prune_before_ms)],
        )
        .map_err(pg_err)?;
        c.execute(
            "INSERT INTO uia_sessions (session_id, created_ms) VALUES ($1, $2)",
            &[&id, &ms(now_ms)],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn uia_session(s: &PgStore, session_id: &str, not_before_ms: u64) -> Result<Option<Vec<String>>> {
    let id = session_id.to_owned();
    let completed: Option<String> = s
        .read(move |c| {
            Ok(c.query_opt(
                "SELECT completed FROM uia_sessions WHERE session_id = $1 AND created_ms >= $2",
                &[&id, &ms(not_before_ms)],
            )?
            .map(|r| r.get(0)))
        })
        .await?;
    Ok(completed.map(|c| serde_json::from_str(&c).unwrap_or_default()))
}

pub(super) async fn uia_complete_stage(s: &PgStore, session_id: &str, stage: &str) -> Result<Vec<String>> {
    let (id, stage) = (session_id.to_owned(), stage.to_owned());
    s.write_wait(move |c, _| {
        // FOR UPDATE: two processes completing stages of one session at
        // once each see the other's.
        let Some(row) = c
            .query_opt(
                "SELECT completed FROM uia_sessions WHERE session_id = $1 FOR UPDATE",
                &[&id],
            )
            .map_err(pg_err)?
        else {
            return Ok(Vec::new());
        };
        let mut stages: Vec<String> = serde_json::from_str(&row.get::<_, String>(0)).unwrap_or_default();
        if !stages.contains(&stage) {
            stages.push(stage);
            let json = serde_json::to_string(&stages).map_err(db_err)?;
            c.execute(
                "UPDATE uia_sessions SET completed = $2 WHERE session_id = $1",
                &[&id, &json],
            )
            .map_err(pg_err)?;
        }
        Ok(stages)
    })
    .await
}

pub(super) async fn delete_uia_session(s: &PgStore, session_id: &str) -> Result<()> {
    let id = session_id.to_owned();
    s.write_wait(move |c, _| {
        c.execute("DELETE FROM uia_sessions WHERE session_id = $1", &[&id])
            .map_err(pg_err)?;
        Ok(())
    })
    .await
}

/// The database's clock in microseconds since the epoch: every process's
/// rate-limit buckets read the same clock.
macro_rules! now_us {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    };
}

pub(super) async fn take_rate_token(
    s: &PgStore,
    bucket: &str,
    interval_us: i64,
    tolerance_us: i64,
) -> Result<Option<u64>> {
    let bucket = bucket.to_owned();
    s.write_wait(move |c, _| {
        // As SQLite's: `excluded.tat_us` is `now + interval`, and the row
        // lock of the upsert orders two processes taking from one bucket.
        let taken = c
            .query_opt(
                concat!(
                    "INSERT INTO rate_buckets (bucket, tat_us) VALUES ($1, ",
                    now_us!(),
                    " + $2)
                     ON CONFLICT (bucket) DO UPDATE
                     SET tat_us = GREATEST(rate_buckets.tat_us + $2, excluded.tat_us)
                     WHERE rate_buckets.tat_us <= excluded.tat_us - $2 + $3
                     RETURNING tat_us"
                ),
                &[&bucket, &interval_us, &tolerance_us],
            )
            .map_err(pg_err)?;
        if taken.is_some() {
            return Ok(None);
        }
        let ahead: i64 = c
            .query_one(
                concat!("SELECT tat_us - ", now_us!(), " FROM rate_buckets WHERE bucket = $1"),
                &[&bucket],
            )
            .map_err(pg_err)?
            .get(0);
        Ok(Some(ahead.saturating_sub(tolerance_us).max(1) as u64))
    })
    .await
}

pub(super) async fn refund_rate_token(s: &PgStore, bucket: &str, interval_us: i64) -> Result<()> {
    let bucket = bucket.to_owned();
    s.write_wait(move |c, _| {
        c.execute(
            "UPDATE rate_buckets SET tat_us = tat_us - $2 WHERE bucket = $1",
            &[&bucket, &interval_us],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn prune_rate_buckets(s: &PgStore) -> Result<u64> {
    s.write_wait(move |c, _| {
        c.execute(concat!("DELETE FROM rate_buckets WHERE tat_us < ", now_us!()), &[])
            .map_err(pg_err)
    })
    .await
}

pub(super) fn claim_mqtt_client(s: &PgStore, key: &str, owner: &str) -> Pending<Option<String>> {
    let (key, owner) = (key.to_owned(), owner.to_owned());
    s.write(move |c, ctx| {
        // An owner whose process is gone (no connection of its store is
        // open: it crashed) is answered as none: nobody will release it.
        let before: Option<String> = c
            .query_opt(
                "SELECT owner FROM mqtt_clients m WHERE client_key = $1 AND EXISTS (SELECT 1 FROM \
                 pg_stat_activity a WHERE a.application_name = 'weft ' || split_part(m.owner, '/', 1))",
                &[&key],
            )
            .map_err(pg_err)?
            .map(|r| r.get(0));
        c.execute(
            "INSERT INTO mqtt_clients (client_key, owner, since_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (client_key) DO UPDATE SET owner = excluded.owner, since_ms = excluded.since_ms",
            &[&key, &owner, &ms(weft_core::now_ms())],
        )
        .map_err(pg_err)?;
        ctx.announce(StreamKey::MqttClient(key.to_owned(), format!("+{owner}")));
        Ok(before)
    })
}

pub(super) fn release_mqtt_client(s: &PgStore, key: &str, owner: &str) -> Pending<()> {
    let (key, owner) = (key.to_owned(), owner.to_owned());
    s.write(move |c, ctx| {
        c.execute(
            "DELETE FROM mqtt_clients WHERE client_key = $1 AND owner = $2",
            &[&key, &owner],
        )
        .map_err(pg_err)?;
        ctx.announce(StreamKey::MqttClient(key.to_owned(), format!("-{owner}")));
        Ok(())
    })
}
