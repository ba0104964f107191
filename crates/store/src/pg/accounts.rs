//! PostgreSQL: accounts — users and profiles, devices and access tokens,
//! DTLS pre-shared keys, key backup, end-to-end keys (device keys,
//! one-time and fallback keys, claims), device-list changes, to-device
//! messages, cross-signing keys and signatures, filters. A port of the
//! SQLite statements of the same methods (`sqlite.rs`).

use std::collections::{BTreeMap, BTreeSet};

use super::*;

pub(super) async fn create_user(s: &PgStore, user: NewUser) -> Result<()> {
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "INSERT INTO users (user_id, password_hash, admin, created_ms) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT (user_id) DO NOTHING",
                &[
                    &user.user_id,
                    &user.password_hash,
                    &(user.admin as i64),
                    &(user.created_ms as i64),
                ],
            )
            .map_err(pg_err)?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UserInUse, "User ID already taken."));
        }
        Ok(())
    })
    .await
}

pub(super) async fn get_user(s: &PgStore, user_id: &str) -> Result<Option<UserRecord>> {
    let user_id = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            &format!("SELECT {USER_COLS} FROM users WHERE user_id = $1"),
            &[&user_id],
        )?
        .map(|r| user_row(&r)))
    })
    .await
}

const USER_COLS: &str = "user_id, password_hash, admin, deactivated, displayname, avatar_url, created_ms";

/// A user from the columns of [`USER_COLS`] (flags are BIGINT 0/1).
fn user_row(r: &Row) -> UserRecord {
    UserRecord {
        user_id: r.get(0),
        password_hash: r.get(1),
        admin: r.get::<_, i64>(2) != 0,
        deactivated: r.get::<_, i64>(3) != 0,
        displayname: r.get(4),
        avatar_url: r.get(5),
        created_ms: r.get::<_, i64>(6).max(0) as u64,
    }
}

/// The current (highest, not deleted) backup version of a user: version,
/// algorithm JSON, etag.
fn current_backup(c: &mut PgConn, user_id: &str) -> PgResult<Option<(i64, String, i64)>> {
    Ok(c.query_opt(
        "SELECT version, algorithm_json, etag FROM backup_versions \
         WHERE user_id = $1 AND deleted = 0 ORDER BY version DESC LIMIT 1",
        &[&user_id],
    )?
    .map(|r| (r.get(0), r.get(1), r.get(2))))
}

fn backup_count(c: &mut PgConn, user_id: &str, version: i64) -> PgResult<u64> {
    let n: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM backup_keys WHERE user_id = $1 AND version = $2",
            &[&user_id, &version],
        )?
        .get(0);
    Ok(n.max(0) as u64)
}

/// A new etag for a version whose keys changed.
fn bump_backup_etag(c: &mut PgConn, user_id: &str, version: i64) -> Result<i64> {
    Ok(c.query_one(
        "UPDATE backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2 RETURNING etag",
        &[&user_id, &version],
    )
    .map_err(pg_err)?
    .get(0))
}

/// Records that `user`'s device list changed: the next stream position,
/// kept as the user's newest change and announced as `DeviceKeys`.
pub(crate) fn device_list_changed(c: &mut PgConn, ctx: &mut WriterCtx, user: &str) -> PgResult<i64> {
    let p = ctx.pos + 1;
    c.execute(
        "INSERT INTO device_list_changes (user_id, position) VALUES ($1, $2) \
         ON CONFLICT (user_id) DO UPDATE SET position = excluded.position",
        &[&user, &p],
    )?;
    ctx.pos = p;
    ctx.changes.push((p, StreamKey::DeviceKeys(user.to_owned())));
    Ok(p)
}

/// Logs that the keys of `user`'s `devices` changed (or the devices were
/// deleted) at stream position `p`: each gets the device list's next
/// stream ID, in the order given, as `m.device_list_update` EDUs tell
/// other servers. One statement for all of them.
pub(crate) fn log_device_changes(
    c: &mut PgConn,
    user: &str,
    devices: &[String],
    p: i64,
    deleted: bool,
) -> PgResult<()> {
    if devices.is_empty() {
        return Ok(());
    }
    // Identity values are drawn in the order the rows reach the insert.
    c.execute(
        "INSERT INTO device_list_log (user_id, device_id, position, deleted) \
         SELECT $1::TEXT, d, $3::BIGINT, $4::BIGINT FROM UNNEST($2::TEXT[]) WITH ORDINALITY AS x(d, i) ORDER BY i",
        &[&user, &devices, &p, &(deleted as i64)],
    )?;
    Ok(())
}

/// Deletes to-device messages matching `filter` (over `$1` user, `$2`
/// device, `$3` position or device).
///
/// SQLite also remembers the highest deleted position in `meta` (its
/// positions come from `MAX(position)` of the tables at startup, so
/// deleting the newest rows would hand them out again). Not needed here:
/// the `stream_head` row keeps the position whatever is deleted.
fn delete_to_device(c: &mut PgConn, filter: &str, p: Params<'_>) -> PgResult<()> {
    c.execute(&format!("DELETE FROM to_device WHERE {filter}"), p)?;
    Ok(())
}

/// Deletes devices of `user` (only `only` if given; all but `keep` if
/// given) with their tokens, keys, transaction records and pending
/// to-device messages. A device list that lost keys gets a stream position.
fn purge_devices(
    c: &mut PgConn,
    ctx: &mut WriterCtx,
    user: &str,
    only: Option<&str>,
    keep: Option<&str>,
) -> PgResult<()> {
    const SEL: &str =
        "user_id = $1 AND ($2::TEXT IS NULL OR device_id = $2::TEXT) AND ($3::TEXT IS NULL OR device_id != $3::TEXT)";
    let with_keys: Vec<String> = c
        .query(
            &format!("DELETE FROM device_keys WHERE {SEL} RETURNING device_id"),
            &[&user, &only, &keep],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    // Signatures of the deleted devices, except of keys that are also a
    // cross-signing key's public key (SQLite: `json_each(key_json, '$.keys')`).
    // `replace` turns a `\u0000` escape, on which every PostgreSQL JSON
    // function fails, into `\u0001`. A `keys` that is not an object counts
    // as no keys here (json_each_text would fail the statement; SQLite's
    // json_each would take an array's elements): services/src/keys.rs only
    // stores cross-signing keys whose `keys` is an object.
    c.execute(
        "DELETE FROM key_signatures WHERE target_user = $1 AND ($2::TEXT IS NULL OR target_key = $2::TEXT) \
         AND ($3::TEXT IS NULL OR target_key != $3::TEXT) \
         AND target_key NOT IN (SELECT k.value FROM cross_signing_keys cs \
             CROSS JOIN LATERAL (SELECT replace(cs.key_json, '\\u0000', '\\u0001')::json -> 'keys' AS keys) j \
             CROSS JOIN LATERAL json_each_text(CASE WHEN json_typeof(j.keys) = 'object' THEN j.keys END) k \
             WHERE cs.user_id = $1)",
        &[&user, &only, &keep],
    )?;
    for table in [
        "one_time_keys",
        "fallback_keys",
        "to_device_txns",
        "device_psks",
        "sliding_sync_connections",
        "devices",
    ] {
        c.execute(&format!("DELETE FROM {table} WHERE {SEL}"), &[&user, &only, &keep])?;
    }
    delete_to_device(c, SEL, &[&user, &only, &keep])?;
    ctx.announce(StreamKey::Revoked(user.to_owned()));
    if !with_keys.is_empty() {
        let p = device_list_changed(c, ctx, user)?;
        log_device_changes(c, user, &with_keys, p, true)?;
    }
    Ok(())
}

fn otk_counts(c: &mut PgConn, user: &str, device: &str) -> PgResult<BTreeMap<String, u64>> {
    Ok(c.query(
        "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm",
        &[&user, &device],
    )?
    .iter()
    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
    .collect())
}

/// The algorithm of a key ID "algorithm:id".
fn key_algorithm(key_id: &str) -> &str {
    key_id.split_once(':').map_or(key_id, |(alg, _)| alg)
}

fn store_keys(
    c: &mut PgConn,
    ctx: &mut WriterCtx,
    user: &str,
    device: &str,
    up: KeyUpload,
) -> Result<BTreeMap<String, u64>> {
    if let Some(keys) = up.device_keys {
        let old: Option<String> = c
            .query_opt(
                "SELECT keys_json FROM device_keys WHERE user_id = $1 AND device_id = $2",
                &[&user, &device],
            )
            .map_err(pg_err)?
            .map(|r| r.get(0));
        if old.as_deref() != Some(keys.as_str()) {
            let p = device_list_changed(c, ctx, user).map_err(pg_err)?;
            log_device_changes(c, user, &[device.to_owned()], p, false).map_err(pg_err)?;
            c.execute(
                "INSERT INTO device_keys (user_id, device_id, keys_json, position) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT (user_id, device_id) DO UPDATE SET keys_json = excluded.keys_json, \
                 position = excluded.position",
                &[&user, &device, &keys, &p],
            )
            .map_err(pg_err)?;
        }
    }
    if !up.one_time_keys.is_empty() {
        // One read of the keys already stored under the uploaded IDs and one
        // insert of the new ones (SQLite looks up and inserts key by key).
        // A key ID again with the same content is no change; with other
        // content (stored, or earlier in this upload) it refuses the upload.
        let ids: Vec<&str> = up.one_time_keys.iter().map(|(id, _)| id.as_str()).collect();
        let mut known: BTreeMap<String, String> = c
            .query(
                "SELECT key_id, key_json FROM one_time_keys WHERE user_id = $1 AND device_id = $2 \
                 AND key_id = ANY($3::TEXT[])",
                &[&user, &device, &ids],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let (mut algs, mut new_ids, mut jsons) = (Vec::new(), Vec::new(), Vec::new());
        for (key_id, json) in &up.one_time_keys {
            match known.get(key_id) {
                Some(old) if old == json => {}
                Some(_) => {
                    return Err(Error::invalid_param(format!(
                        "One-time key {key_id} already exists with other content"
                    )));
                }
                None => {
                    known.insert(key_id.clone(), json.clone());
                    algs.push(key_algorithm(key_id));
                    new_ids.push(key_id.as_str());
                    jsons.push(json.as_str());
                }
            }
        }
        if !new_ids.is_empty() {
            c.execute(
                "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, key_json) \
                 SELECT $1::TEXT, $2::TEXT, a, k, j FROM UNNEST($3::TEXT[], $4::TEXT[], $5::TEXT[]) AS x(a, k, j)",
                &[&user, &device, &algs, &new_ids, &jsons],
            )
            .map_err(pg_err)?;
        }
    }
    for (key_id, json) in up.fallback_keys {
        c.execute(
            "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key_json, used) \
             VALUES ($1,$2,$3,$4,$5,0) ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET \
             used = CASE WHEN fallback_keys.key_id = excluded.key_id AND fallback_keys.key_json = excluded.key_json \
                    THEN fallback_keys.used ELSE 0 END, \
             key_id = excluded.key_id, key_json = excluded.key_json",
            &[&user, &device, &key_algorithm(&key_id), &key_id, &json],
        )
        .map_err(pg_err)?;
    }
    otk_counts(c, user, device).map_err(pg_err)
}

pub(super) async fn list_users(s: &PgStore) -> Result<Vec<UserRecord>> {
    s.read(|c| {
        Ok(
            c.query(&format!("SELECT {USER_COLS} FROM users ORDER BY user_id"), &[])?
                .iter()
                .map(user_row)
                .collect(),
        )
    })
    .await
}

pub(super) async fn set_password_hash(s: &PgStore, user_id: &str, hash: &str) -> Result<()> {
    let (u, h) = (user_id.to_owned(), hash.to_owned());
    s.write_wait(move |c, _| {
        c.execute("UPDATE users SET password_hash = $1 WHERE user_id = $2", &[&h, &u])
            .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn deactivate_user(s: &PgStore, user_id: &str) -> Result<()> {
    let u = user_id.to_owned();
    s.write_wait(move |c, ctx| {
        c.execute(
            "UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = $1",
            &[&u],
        )
        .map_err(pg_err)?;
        purge_devices(c, ctx, &u, None, None).map_err(pg_err)?;
        let crossed = c
            .execute("DELETE FROM cross_signing_keys WHERE user_id = $1", &[&u])
            .map_err(pg_err)?;
        c.execute("DELETE FROM key_signatures WHERE target_user = $1", &[&u])
            .map_err(pg_err)?;
        c.execute("DELETE FROM backup_keys WHERE user_id = $1", &[&u])
            .map_err(pg_err)?;
        c.execute("UPDATE backup_versions SET deleted = 1 WHERE user_id = $1", &[&u])
            .map_err(pg_err)?;
        c.execute("DELETE FROM pushers WHERE user_id = $1", &[&u])
            .map_err(pg_err)?;
        if crossed > 0 {
            device_list_changed(c, ctx, &u).map_err(pg_err)?;
        }
        Ok(())
    })
    .await
}

pub(super) async fn set_profile_field(
    s: &PgStore,
    user_id: &str,
    field: ProfileField,
    value: Option<String>,
) -> Result<()> {
    let u = user_id.to_owned();
    let col = match field {
        ProfileField::DisplayName => "displayname",
        ProfileField::AvatarUrl => "avatar_url",
    };
    s.write_wait(move |c, _| {
        c.execute(
            &format!("UPDATE users SET {col} = $1 WHERE user_id = $2"),
            &[&value, &u],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn upsert_device(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
    token_hash: &[u8],
) -> Result<bool> {
    let (u, d, n, t) = (
        user_id.to_owned(),
        device_id.to_owned(),
        display_name.map(str::to_owned),
        token_hash.to_vec(),
    );
    s.write_wait(move |c, ctx| {
        let old: Option<Vec<u8>> = c
            .query_opt(
                "SELECT token_hash FROM devices WHERE user_id = $1 AND device_id = $2",
                &[&u, &d],
            )
            .map_err(pg_err)?
            .and_then(|r| r.get(0));
        c.execute(
            "INSERT INTO devices (user_id, device_id, display_name, token_hash, last_seen_ms) VALUES ($1,$2,$3,$4,$5) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET token_hash = excluded.token_hash, \
             display_name = COALESCE(excluded.display_name, devices.display_name)",
            &[&u, &d, &n, &t, &(weft_core::now_ms() as i64)],
        )
        .map_err(pg_err)?;
        // The device's old token no longer holds: every process forgets it.
        let replaced = old.is_some_and(|old| old != t);
        if replaced {
            ctx.announce(StreamKey::Revoked(u.to_owned()));
        }
        Ok(replaced)
    })
    .await
}

pub(super) async fn lookup_token(s: &PgStore, token_hash: &[u8]) -> Result<Option<TokenOwner>> {
    let t = token_hash.to_vec();
    s.read(move |c| {
        Ok(
            c.query_opt("SELECT user_id, device_id FROM devices WHERE token_hash = $1", &[&t])?
                .map(|r| TokenOwner {
                    user_id: r.get(0),
                    device_id: r.get(1),
                }),
        )
    })
    .await
}

pub(super) async fn list_devices(s: &PgStore, user_id: &str) -> Result<Vec<DeviceRecord>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT device_id, display_name, last_seen_ms, last_seen_ip FROM devices WHERE user_id = $1 \
                 ORDER BY device_id",
            &[&u],
        )?
        .iter()
        .map(|r| DeviceRecord {
            device_id: r.get(0),
            display_name: r.get(1),
            last_seen_ms: r.get::<_, Option<i64>>(2).map(|v| v.max(0) as u64),
            last_seen_ip: r.get(3),
        })
        .collect())
    })
    .await
}

pub(super) async fn touch_device(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    ip: Option<&str>,
    ts_ms: u64,
) -> Result<()> {
    let (u, d, i) = (user_id.to_owned(), device_id.to_owned(), ip.map(str::to_owned));
    s.write_wait(move |c, _| {
        c.execute(
            "UPDATE devices SET last_seen_ms = $3, last_seen_ip = COALESCE($4::TEXT, last_seen_ip) \
             WHERE user_id = $1 AND device_id = $2",
            &[&u, &d, &(ts_ms as i64), &i],
        )
        .map_err(pg_err)?;
        Ok(())
    })
    .await
}

pub(super) async fn set_device_display_name(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
) -> Result<bool> {
    let (u, d, n) = (
        user_id.to_owned(),
        device_id.to_owned(),
        display_name.map(str::to_owned),
    );
    s.write_wait(move |c, ctx| {
        let changed = c
            .execute(
                "UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2",
                &[&u, &d, &n],
            )
            .map_err(pg_err)?;
        if changed == 0 {
            return Ok(false);
        }
        let has_keys: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM device_keys WHERE user_id = $1 AND device_id = $2)",
                &[&u, &d],
            )
            .map_err(pg_err)?
            .get(0);
        if has_keys {
            let p = device_list_changed(c, ctx, &u).map_err(pg_err)?;
            log_device_changes(c, &u, &[d], p, false).map_err(pg_err)?;
        }
        Ok(true)
    })
    .await
}

pub(super) async fn delete_device(s: &PgStore, user_id: &str, device_id: &str) -> Result<()> {
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    s.write_wait(move |c, ctx| purge_devices(c, ctx, &u, Some(&d), None).map_err(pg_err))
        .await
}

pub(super) async fn delete_devices_except(s: &PgStore, user_id: &str, keep: Option<&str>) -> Result<()> {
    let (u, k) = (user_id.to_owned(), keep.map(str::to_owned));
    s.write_wait(move |c, ctx| purge_devices(c, ctx, &u, None, k.as_deref()).map_err(pg_err))
        .await
}

pub(super) async fn set_device_psk(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    identity: &str,
    psk: &[u8],
) -> Result<()> {
    let (u, d, i, k) = (
        user_id.to_owned(),
        device_id.to_owned(),
        identity.to_owned(),
        psk.to_vec(),
    );
    s.write_wait(move |c, ctx| {
        let deactivated: Option<i64> = c
            .query_opt("SELECT deactivated FROM users WHERE user_id = $1", &[&u])
            .map_err(pg_err)?
            .map(|r| r.get(0));
        if deactivated != Some(0) {
            return Err(Error::new(ErrorKind::NotFound, "No such active user"));
        }
        let now = weft_core::now_ms() as i64;
        c.execute(
            "INSERT INTO devices (user_id, device_id, last_seen_ms) VALUES ($1,$2,$3) \
             ON CONFLICT (user_id, device_id) DO NOTHING",
            &[&u, &d, &now],
        )
        .map_err(pg_err)?;
        c.execute(
            "INSERT INTO device_psks (identity, user_id, device_id, psk, created_ms) VALUES ($1,$2,$3,$4,$5) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET identity = excluded.identity, psk = excluded.psk, \
             created_ms = excluded.created_ms",
            &[&i, &u, &d, &k, &now],
        )
        .map_err(pg_err)?;
        // The device's old key no longer holds.
        ctx.announce(StreamKey::Revoked(u.to_owned()));
        Ok(())
    })
    .await
}

pub(super) async fn lookup_psk(s: &PgStore, identity: &str) -> Result<Option<PskOwner>> {
    let i = identity.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            "SELECT p.user_id, p.device_id, p.psk FROM device_psks p \
                 JOIN devices d ON d.user_id = p.user_id AND d.device_id = p.device_id \
                 JOIN users u ON u.user_id = p.user_id \
                 WHERE p.identity = $1 AND u.deactivated = 0",
            &[&i],
        )?
        .map(|r| PskOwner {
            user_id: r.get(0),
            device_id: r.get(1),
            psk: r.get(2),
        }))
    })
    .await
}

pub(super) async fn create_backup_version(s: &PgStore, user_id: &str, algorithm_json: &str) -> Result<i64> {
    let (u, a) = (user_id.to_owned(), algorithm_json.to_owned());
    s.write_wait(move |c, _| {
        // Versions are never reused, deleted ones included.
        let next: i64 = c
            .query_one(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM backup_versions WHERE user_id = $1",
                &[&u],
            )
            .map_err(pg_err)?
            .get(0);
        c.execute(
            "INSERT INTO backup_versions (user_id, version, algorithm_json) VALUES ($1,$2,$3)",
            &[&u, &next, &a],
        )
        .map_err(pg_err)?;
        Ok(next)
    })
    .await
}

pub(super) async fn backup_version(s: &PgStore, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        let row = match version {
            Some(v) => c
                .query_opt(
                    "SELECT version, algorithm_json, etag FROM backup_versions \
                     WHERE user_id = $1 AND version = $2 AND deleted = 0",
                    &[&u, &v],
                )?
                .map(|r| (r.get(0), r.get(1), r.get(2))),
            None => current_backup(c, &u)?,
        };
        let Some((version, algorithm_json, etag)) = row else {
            return Ok(None);
        };
        let count = backup_count(c, &u, version)?;
        Ok(Some(BackupVersion {
            version,
            algorithm_json,
            etag,
            count,
        }))
    })
    .await
}

pub(super) async fn update_backup_version(
    s: &PgStore,
    user_id: &str,
    version: i64,
    algorithm_json: &str,
) -> Result<bool> {
    let (u, a) = (user_id.to_owned(), algorithm_json.to_owned());
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "UPDATE backup_versions SET algorithm_json = $3 \
                 WHERE user_id = $1 AND version = $2 AND deleted = 0",
                &[&u, &version, &a],
            )
            .map_err(pg_err)?;
        Ok(n > 0)
    })
    .await
}

pub(super) async fn delete_backup_version(s: &PgStore, user_id: &str, version: i64) -> Result<bool> {
    let u = user_id.to_owned();
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "UPDATE backup_versions SET deleted = 1 WHERE user_id = $1 AND version = $2 AND deleted = 0",
                &[&u, &version],
            )
            .map_err(pg_err)?;
        c.execute(
            "DELETE FROM backup_keys WHERE user_id = $1 AND version = $2",
            &[&u, &version],
        )
        .map_err(pg_err)?;
        Ok(n > 0)
    })
    .await
}

/// The order in which a backed-up session is better than another: verified
/// first, then the lower first message index, then fewer forwards.
fn backup_rank(k: &BackupKey) -> (bool, i64, i64) {
    (
        k.is_verified,
        k.first_message_index.saturating_neg(),
        k.forwarded_count.saturating_neg(),
    )
}

pub(super) async fn put_backup_keys(
    s: &PgStore,
    user_id: &str,
    version: i64,
    keys: Vec<BackupKey>,
) -> Result<BackupWrite> {
    let u = user_id.to_owned();
    s.write_wait(move |c, _| {
        let current = current_backup(c, &u).map_err(pg_err)?;
        let etag = match current {
            Some((v, _, etag)) if v == version => etag,
            other => {
                return Ok(BackupWrite::WrongVersion {
                    current: other.map(|(v, _, _)| v),
                });
            }
        };
        // One insert for all keys (an upload can hold thousands). A session
        // twice in one upload: the best copy, the first of equals, as
        // SQLite's key-by-key "replace only if better" ends with (and one
        // statement may not update a row twice).
        let mut best: BTreeMap<(&str, &str), &BackupKey> = BTreeMap::new();
        for k in &keys {
            let slot = best.entry((k.room_id.as_str(), k.session_id.as_str())).or_insert(k);
            if backup_rank(k) > backup_rank(slot) {
                *slot = k;
            }
        }
        let mut changed = false;
        if !best.is_empty() {
            let (mut rooms, mut sessions, mut indexes) = (Vec::new(), Vec::new(), Vec::new());
            let (mut forwards, mut verified, mut jsons) = (Vec::new(), Vec::new(), Vec::new());
            for k in best.values() {
                rooms.push(k.room_id.as_str());
                sessions.push(k.session_id.as_str());
                indexes.push(k.first_message_index);
                forwards.push(k.forwarded_count);
                verified.push(k.is_verified as i64);
                jsons.push(k.key_json.as_str());
            }
            // Kept only if better than the stored copy: verified first,
            // then the lower first message index, then fewer forwards.
            let n = c
                .execute(
                    "INSERT INTO backup_keys (user_id, version, room_id, session_id, first_message_index, \
                     forwarded_count, is_verified, key_json) \
                     SELECT $1::TEXT, $2::BIGINT, r, s, f, n, v, k \
                     FROM UNNEST($3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::TEXT[]) \
                     AS x(r, s, f, n, v, k) \
                     ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET \
                     first_message_index = excluded.first_message_index, \
                     forwarded_count = excluded.forwarded_count, \
                     is_verified = excluded.is_verified, key_json = excluded.key_json \
                     WHERE (excluded.is_verified, -excluded.first_message_index, -excluded.forwarded_count) \
                     > (backup_keys.is_verified, -backup_keys.first_message_index, -backup_keys.forwarded_count)",
                    &[&u, &version, &rooms, &sessions, &indexes, &forwards, &verified, &jsons],
                )
                .map_err(pg_err)?;
            changed = n > 0;
        }
        let etag = if changed {
            bump_backup_etag(c, &u, version)?
        } else {
            etag
        };
        let count = backup_count(c, &u, version).map_err(pg_err)?;
        Ok(BackupWrite::Done { etag, count })
    })
    .await
}

pub(super) async fn backup_keys(
    s: &PgStore,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<Vec<BackupKey>> {
    let (u, r, sid) = (
        user_id.to_owned(),
        room_id.map(str::to_owned),
        session_id.map(str::to_owned),
    );
    s.read(move |c| {
        Ok(c.query(
            "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, key_json \
                 FROM backup_keys WHERE user_id = $1 AND version = $2 \
                 AND ($3::TEXT IS NULL OR room_id = $3::TEXT) AND ($4::TEXT IS NULL OR session_id = $4::TEXT) \
                 ORDER BY room_id, session_id",
            &[&u, &version, &r, &sid],
        )?
        .iter()
        .map(|row| BackupKey {
            room_id: row.get(0),
            session_id: row.get(1),
            first_message_index: row.get(2),
            forwarded_count: row.get(3),
            is_verified: row.get::<_, i64>(4) != 0,
            key_json: row.get(5),
        })
        .collect())
    })
    .await
}

pub(super) async fn delete_backup_keys(
    s: &PgStore,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<BackupWrite> {
    let (u, r, sid) = (
        user_id.to_owned(),
        room_id.map(str::to_owned),
        session_id.map(str::to_owned),
    );
    s.write_wait(move |c, _| {
        let current = current_backup(c, &u).map_err(pg_err)?;
        let etag = match current {
            Some((v, _, etag)) if v == version => etag,
            other => {
                return Ok(BackupWrite::WrongVersion {
                    current: other.map(|(v, _, _)| v),
                });
            }
        };
        let n = c
            .execute(
                "DELETE FROM backup_keys WHERE user_id = $1 AND version = $2 \
                 AND ($3::TEXT IS NULL OR room_id = $3::TEXT) AND ($4::TEXT IS NULL OR session_id = $4::TEXT)",
                &[&u, &version, &r, &sid],
            )
            .map_err(pg_err)?;
        let etag = if n > 0 { bump_backup_etag(c, &u, version)? } else { etag };
        let count = backup_count(c, &u, version).map_err(pg_err)?;
        Ok(BackupWrite::Done { etag, count })
    })
    .await
}

pub(super) async fn upload_keys(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    upload: KeyUpload,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    s.write_wait(move |c, ctx| store_keys(c, ctx, &u, &d, upload)).await
}

pub(super) async fn get_device_keys(
    s: &PgStore,
    user_id: &str,
    device_ids: &[String],
) -> Result<Vec<DeviceKeysRecord>> {
    let u = user_id.to_owned();
    let wanted = device_ids.to_vec();
    s.read(move |c| {
        // No device IDs: all of the user's devices.
        Ok(c.query(
            "SELECT k.device_id, k.keys_json, d.display_name FROM device_keys k \
                 LEFT JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id \
                 WHERE k.user_id = $1 AND (cardinality($2::TEXT[]) = 0 OR k.device_id = ANY($2::TEXT[])) \
                 ORDER BY k.device_id",
            &[&u, &wanted],
        )?
        .iter()
        .map(|r| DeviceKeysRecord {
            user_id: u.clone(),
            device_id: r.get(0),
            keys_json: r.get(1),
            display_name: r.get(2),
        })
        .collect())
    })
    .await
}

pub(super) async fn one_time_key_counts(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    s.read(move |c| otk_counts(c, &u, &d)).await
}

pub(super) async fn unused_fallback_key_types(s: &PgStore, user_id: &str, device_id: &str) -> Result<Vec<String>> {
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    s.read(move |c| {
        Ok(c.query(
            "SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 AND used = 0 \
                 ORDER BY algorithm",
            &[&u, &d],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
    })
    .await
}

/// Claims keys in one statement (SQLite claims them one by one): the n-th
/// request for the same (user, device, algorithm) takes that device's n-th
/// one-time key by key ID (deleted); a request left without one takes the
/// device's fallback key of the algorithm (marked used, kept). Answers in
/// the order of the requests, skipping those that got nothing. Safe as one
/// snapshot: write batches of every process run one after the other
/// (`stream_head` row lock), so nothing else claims in between.
const CLAIM: &str = "\
WITH w AS ( \
    SELECT u, d, a, i, row_number() OVER (PARTITION BY u, d, a ORDER BY i) AS n \
    FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) WITH ORDINALITY AS x(u, d, a, i)), \
picked AS ( \
    SELECT w.i, k.user_id, k.device_id, k.algorithm, k.key_id, k.key_json FROM w \
    JOIN (SELECT user_id, device_id, algorithm, key_id, key_json, \
                 row_number() OVER (PARTITION BY user_id, device_id, algorithm ORDER BY key_id) AS n \
          FROM one_time_keys WHERE (user_id, device_id, algorithm) IN (SELECT u, d, a FROM w)) k \
      ON k.user_id = w.u AND k.device_id = w.d AND k.algorithm = w.a AND k.n = w.n), \
gone AS ( \
    DELETE FROM one_time_keys o USING picked p \
    WHERE o.user_id = p.user_id AND o.device_id = p.device_id AND o.algorithm = p.algorithm \
    AND o.key_id = p.key_id), \
fallback AS ( \
    UPDATE fallback_keys f SET used = 1 \
    WHERE (f.user_id, f.device_id, f.algorithm) IN \
          (SELECT u, d, a FROM w WHERE i NOT IN (SELECT i FROM picked)) \
    RETURNING f.user_id, f.device_id, f.algorithm, f.key_id, f.key_json) \
SELECT w.u, w.d, COALESCE(p.key_id, f.key_id), COALESCE(p.key_json, f.key_json) \
FROM w LEFT JOIN picked p ON p.i = w.i \
LEFT JOIN fallback f ON p.i IS NULL AND f.user_id = w.u AND f.device_id = w.d AND f.algorithm = w.a \
WHERE p.i IS NOT NULL OR f.key_id IS NOT NULL \
ORDER BY w.i";

pub(super) async fn claim_keys(s: &PgStore, wanted: Vec<(String, String, String)>) -> Result<Vec<ClaimedKey>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    s.write_wait(move |c, _| {
        let (mut users, mut devices, mut algs) = (Vec::new(), Vec::new(), Vec::new());
        for (u, d, a) in &wanted {
            users.push(u.as_str());
            devices.push(d.as_str());
            algs.push(a.as_str());
        }
        Ok(c.query(CLAIM, &[&users, &devices, &algs])
            .map_err(pg_err)?
            .iter()
            .map(|r| ClaimedKey {
                user_id: r.get(0),
                device_id: r.get(1),
                key_id: r.get(2),
                key_json: r.get(3),
            })
            .collect())
    })
    .await
}

pub(super) async fn device_list_changes(s: &PgStore, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT ch.user_id FROM device_list_changes ch \
                 WHERE ch.position > $2 AND ch.position <= $3 AND (ch.user_id = $1 OR EXISTS ( \
                   SELECT 1 FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                   WHERE a.user_id = $1 AND a.membership = 'join' AND b.user_id = ch.user_id \
                   AND b.membership = 'join')) \
                 UNION \
                 SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = $1 AND a.membership = 'join' AND b.membership = 'join' AND b.user_id != $1 \
                 AND ((b.position > $2 AND b.position <= $3) OR (a.position > $2 AND a.position <= $3)) \
                 ORDER BY 1",
            &[&u, &since, &upto],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
    })
    .await
}

pub(super) async fn device_list_left(s: &PgStore, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            // Others who left a room I am in, and members of rooms I
            // left, minus everyone still sharing a joined room with me.
            // (UNION and EXCEPT bind alike, left to right, as in SQLite.)
            "SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = $1 AND a.membership = 'join' AND b.user_id != $1 \
                 AND b.membership IN ('leave', 'ban') AND b.position > $2 AND b.position <= $3 \
                 UNION \
                 SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = $1 AND a.membership IN ('leave', 'ban') AND a.position > $2 \
                 AND a.position <= $3 AND b.user_id != $1 AND b.membership = 'join' \
                 EXCEPT \
                 SELECT b.user_id FROM memberships a JOIN memberships b ON b.room_id = a.room_id \
                 WHERE a.user_id = $1 AND a.membership = 'join' AND b.membership = 'join' \
                 ORDER BY 1",
            &[&u, &since, &upto],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
    })
    .await
}

pub(super) async fn send_to_device(
    s: &PgStore,
    sender: &str,
    sender_device: &str,
    event_type: &str,
    txn_id: &str,
    messages: Vec<NewToDevice>,
) -> Result<bool> {
    let (sn, sd, t, x) = (
        sender.to_owned(),
        sender_device.to_owned(),
        event_type.to_owned(),
        txn_id.to_owned(),
    );
    s.write_wait(move |c, ctx| {
        let fresh = c
            .execute(
                "INSERT INTO to_device_txns (user_id, device_id, event_type, txn_id) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT DO NOTHING",
                &[&sn, &sd, &t, &x],
            )
            .map_err(pg_err)?;
        if fresh == 0 {
            return Ok(false);
        }
        // The devices of every recipient in one read, the messages in one
        // insert (SQLite reads and inserts per message and device); the
        // positions are the same: message by message, devices in ID order.
        let users: Vec<&str> = messages.iter().map(|m| m.user_id.as_str()).collect();
        let mut devices: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in c
            .query(
                "SELECT user_id, device_id FROM devices WHERE user_id = ANY($1::TEXT[]) ORDER BY user_id, device_id",
                &[&users],
            )
            .map_err(pg_err)?
        {
            devices.entry(r.get(0)).or_default().push(r.get(1));
        }
        let (mut positions, mut to_users, mut to_devices, mut contents) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for m in &messages {
            let Some(theirs) = devices.get(&m.user_id) else {
                continue;
            };
            for d in theirs {
                if let DeviceTarget::One(one) = &m.target
                    && one != d
                {
                    continue;
                }
                let p = ctx.pos + 1;
                positions.push(p);
                to_users.push(m.user_id.as_str());
                to_devices.push(d.as_str());
                contents.push(m.content_json.as_str());
                ctx.pos = p;
                ctx.changes.push((p, StreamKey::User(m.user_id.clone())));
            }
        }
        if !positions.is_empty() {
            c.execute(
                "INSERT INTO to_device (position, user_id, device_id, sender, event_type, content_json) \
                 SELECT p, u, d, $5::TEXT, $6::TEXT, j FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) \
                 AS x(p, u, d, j)",
                &[&positions, &to_users, &to_devices, &contents, &sn, &t],
            )
            .map_err(pg_err)?;
        }
        Ok(true)
    })
    .await
}

pub(super) async fn to_device_messages(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    after: i64,
    upto: i64,
    limit: usize,
) -> Result<Vec<ToDeviceMessage>> {
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    s.read(move |c| {
        Ok(c.query(
            "SELECT position, sender, event_type, content_json FROM to_device \
                 WHERE user_id = $1 AND device_id = $2 AND position > $3 AND position <= $4 \
                 ORDER BY position LIMIT $5",
            &[&u, &d, &after, &upto, &limit],
        )?
        .iter()
        .map(|r| ToDeviceMessage {
            position: r.get(0),
            sender: r.get(1),
            event_type: r.get(2),
            content_json: r.get(3),
        })
        .collect())
    })
    .await
}

pub(super) async fn ack_to_device(s: &PgStore, user_id: &str, device_id: &str, upto: i64) -> Result<()> {
    const ACKED: &str = "user_id = $1 AND device_id = $2 AND position <= $3";
    let (u, d) = (user_id.to_owned(), device_id.to_owned());
    // Most syncs acknowledge nothing: look before queueing a write.
    let (u2, d2) = (u.clone(), d.clone());
    let any = s
        .read(move |c| {
            Ok(c.query_opt(
                &format!("SELECT 1 FROM to_device WHERE {ACKED} LIMIT 1"),
                &[&u2, &d2, &upto],
            )?
            .is_some())
        })
        .await?;
    if !any {
        return Ok(());
    }
    s.write_wait(move |c, _| delete_to_device(c, ACKED, &[&u, &d, &upto]).map_err(pg_err))
        .await
}

pub(super) async fn put_cross_signing_keys(s: &PgStore, user_id: &str, keys: Vec<(String, String)>) -> Result<()> {
    let u = user_id.to_owned();
    s.write_wait(move |c, ctx| {
        let mut changed = false;
        for (key_type, json) in keys {
            let n = c
                .execute(
                    "INSERT INTO cross_signing_keys (user_id, key_type, key_json) VALUES ($1,$2,$3) \
                     ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = excluded.key_json \
                     WHERE cross_signing_keys.key_json != excluded.key_json",
                    &[&u, &key_type, &json],
                )
                .map_err(pg_err)?;
            changed |= n > 0;
        }
        if changed {
            device_list_changed(c, ctx, &u).map_err(pg_err)?;
        }
        Ok(())
    })
    .await
}

pub(super) async fn get_cross_signing_keys(s: &PgStore, user_id: &str) -> Result<Vec<(String, String)>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT key_type, key_json FROM cross_signing_keys WHERE user_id = $1 ORDER BY key_type",
            &[&u],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    })
    .await
}

pub(super) async fn add_key_signatures(s: &PgStore, signatures: Vec<KeySignature>) -> Result<()> {
    s.write_wait(move |c, ctx| {
        // One insert for all; a signature given twice: the last (as
        // SQLite's one-by-one upserts leave it).
        let mut latest: BTreeMap<(&str, &str, &str, &str), &str> = BTreeMap::new();
        for sig in &signatures {
            latest.insert(
                (
                    sig.target_user.as_str(),
                    sig.target_key.as_str(),
                    sig.signer_user.as_str(),
                    sig.signer_key.as_str(),
                ),
                sig.signature.as_str(),
            );
        }
        if latest.is_empty() {
            return Ok(());
        }
        let mut cols: [Vec<&str>; 5] = Default::default();
        for ((tu, tk, su, sk), sig) in &latest {
            for (col, v) in cols.iter_mut().zip([*tu, *tk, *su, *sk, *sig]) {
                col.push(v);
            }
        }
        let [target_users, target_keys, signer_users, signer_keys, sigs] = &cols;
        c.execute(
            "INSERT INTO key_signatures (target_user, target_key, signer_user, signer_key, signature) \
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[]) \
             ON CONFLICT (target_user, target_key, signer_user, signer_key) \
             DO UPDATE SET signature = excluded.signature",
            &[target_users, target_keys, signer_users, signer_keys, sigs],
        )
        .map_err(pg_err)?;
        // Each target user's list changed; the signed keys that are devices
        // (not cross-signing keys) are logged as changes of those devices.
        let mut targets: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for &(tu, tk, _, _) in latest.keys() {
            let keys = targets.entry(tu).or_default();
            if keys.last() != Some(&tk) {
                keys.push(tk);
            }
        }
        for (user, keys) in targets {
            let p = device_list_changed(c, ctx, user).map_err(pg_err)?;
            let devices: Vec<String> = c
                .query(
                    "SELECT device_id FROM device_keys WHERE user_id = $1 AND device_id = ANY($2::TEXT[]) \
                     ORDER BY device_id",
                    &[&user, &keys],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            log_device_changes(c, user, &devices, p, false).map_err(pg_err)?;
        }
        Ok(())
    })
    .await
}

pub(super) async fn key_signatures(s: &PgStore, user_id: &str) -> Result<Vec<KeySignature>> {
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query(
            "SELECT target_user, target_key, signer_user, signer_key, signature FROM key_signatures \
                 WHERE target_user = $1 ORDER BY target_key, signer_user, signer_key",
            &[&u],
        )?
        .iter()
        .map(|r| KeySignature {
            target_user: r.get(0),
            target_key: r.get(1),
            signer_user: r.get(2),
            signer_key: r.get(3),
            signature: r.get(4),
        })
        .collect())
    })
    .await
}

pub(super) async fn put_filter(s: &PgStore, user_id: &str, filter_json: &str) -> Result<String> {
    let (u, f) = (user_id.to_owned(), filter_json.to_owned());
    s.write_wait(move |c, _| {
        let id: i64 = c
            .query_one(
                "INSERT INTO filters (user_id, filter_id, filter_json) VALUES ($1, \
                 (SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = $1), $2) RETURNING filter_id",
                &[&u, &f],
            )
            .map_err(pg_err)?
            .get(0);
        Ok(id.to_string())
    })
    .await
}

pub(super) async fn get_filter(s: &PgStore, user_id: &str, filter_id: &str) -> Result<Option<String>> {
    let Ok(id) = filter_id.parse::<i64>() else {
        return Ok(None);
    };
    let u = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            "SELECT filter_json FROM filters WHERE user_id = $1 AND filter_id = $2",
            &[&u, &id],
        )?
        .map(|r| r.get(0)))
    })
    .await
}
