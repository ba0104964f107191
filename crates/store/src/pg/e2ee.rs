//! PostgreSQL: the `E2eeFederationStore` area — the log of local device
//! changes, the cached device lists and cross-signing keys of other
//! servers' users, OpenID tokens. A port of `sqlite/e2ee.rs`.

use super::accounts::device_list_changed;
use super::*;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The cached list row of `user`: (stream ID, stale).
fn list_row(c: &mut PgConn, user: &str) -> PgResult<Option<(Option<i64>, bool)>> {
    Ok(c.query_opt(
        "SELECT stream_id, stale FROM remote_device_lists WHERE user_id = $1",
        &[&user],
    )?
    .map(|r| (r.get(0), r.get::<_, i64>(1) != 0)))
}

fn announce(c: &mut PgConn, ctx: &mut WriterCtx, user: &str) -> Result<()> {
    device_list_changed(c, ctx, user).map_err(pg_err)?;
    Ok(())
}

#[async_trait::async_trait]
impl E2eeFederationStore for PgStore {
    async fn device_list_log(&self, user_id: &str, position: i64) -> Result<Vec<DeviceListChange>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            Ok(c.query(
                "SELECT l.stream_id, (SELECT MAX(p.stream_id) FROM device_list_log p \
                       WHERE p.user_id = l.user_id AND p.stream_id < l.stream_id), l.device_id, l.deleted \
                     FROM device_list_log l WHERE l.user_id = $1 AND l.position = $2 ORDER BY l.stream_id",
                &[&u, &position],
            )?
            .iter()
            .map(|r| DeviceListChange {
                stream_id: r.get(0),
                prev_id: r.get(1),
                device_id: r.get(2),
                deleted: r.get::<_, i64>(3) != 0,
            })
            .collect())
        })
        .await
    }

    async fn device_list_stream_id(&self, user_id: &str) -> Result<i64> {
        let u = user_id.to_owned();
        self.read(move |c| {
            Ok(c.query_one(
                "SELECT COALESCE(MAX(stream_id), 0) FROM device_list_log WHERE user_id = $1",
                &[&u],
            )?
            .get(0))
        })
        .await
    }

    async fn remote_device_list(&self, user_id: &str) -> Result<Option<RemoteDeviceList>> {
        let u = user_id.to_owned();
        self.read(move |c| {
            let row = c
                .query_opt(
                    "SELECT stream_id, stale, fetched_ms FROM remote_device_lists WHERE user_id = $1",
                    &[&u],
                )?
                .map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, i64>(1) != 0, r.get::<_, i64>(2)));
            let Some((stream_id, stale, fetched_ms)) = row else {
                return Ok(None);
            };
            let devices = c
                .query(
                    "SELECT device_id, keys_json, display_name FROM remote_device_keys WHERE user_id = $1 \
                     ORDER BY device_id",
                    &[&u],
                )?
                .iter()
                .map(|r| RemoteDevice {
                    device_id: r.get(0),
                    keys_json: r.get(1),
                    display_name: r.get(2),
                })
                .collect();
            let cross_signing = c
                .query(
                    "SELECT key_type, key_json FROM remote_cross_signing_keys WHERE user_id = $1 ORDER BY key_type",
                    &[&u],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            Ok(Some(RemoteDeviceList {
                user_id: u.clone(),
                stream_id,
                stale,
                fetched_ms: fetched_ms.max(0) as u64,
                devices,
                cross_signing,
            }))
        })
        .await
    }

    async fn put_remote_device_list(&self, list: RemoteDeviceList, announce_it: bool) -> Result<()> {
        self.write_wait(move |c, ctx| {
            let u = &list.user_id;
            c.execute(
                "INSERT INTO remote_device_lists (user_id, stream_id, stale, fetched_ms) VALUES ($1,$2,0,$3) \
                 ON CONFLICT (user_id) DO UPDATE SET stream_id = excluded.stream_id, stale = 0, \
                 fetched_ms = excluded.fetched_ms",
                &[u, &list.stream_id, &to_i64(list.fetched_ms)],
            )
            .map_err(pg_err)?;
            c.execute("DELETE FROM remote_device_keys WHERE user_id = $1", &[u])
                .map_err(pg_err)?;
            c.execute("DELETE FROM remote_cross_signing_keys WHERE user_id = $1", &[u])
                .map_err(pg_err)?;
            // One insert per table (a user may have many devices; SQLite
            // inserts them one by one). A device ID twice fails, as there.
            if !list.devices.is_empty() {
                let ids: Vec<&str> = list.devices.iter().map(|d| d.device_id.as_str()).collect();
                let keys: Vec<Option<&str>> = list.devices.iter().map(|d| d.keys_json.as_deref()).collect();
                let names: Vec<Option<&str>> = list.devices.iter().map(|d| d.display_name.as_deref()).collect();
                c.execute(
                    "INSERT INTO remote_device_keys (user_id, device_id, keys_json, display_name) \
                     SELECT $1::TEXT, d, k, n FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[]) AS x(d, k, n)",
                    &[u, &ids, &keys, &names],
                )
                .map_err(pg_err)?;
            }
            if !list.cross_signing.is_empty() {
                let types: Vec<&str> = list.cross_signing.iter().map(|(t, _)| t.as_str()).collect();
                let jsons: Vec<&str> = list.cross_signing.iter().map(|(_, j)| j.as_str()).collect();
                c.execute(
                    "INSERT INTO remote_cross_signing_keys (user_id, key_type, key_json) \
                     SELECT $1::TEXT, t, j FROM UNNEST($2::TEXT[], $3::TEXT[]) AS x(t, j)",
                    &[u, &types, &jsons],
                )
                .map_err(pg_err)?;
            }
            if announce_it {
                announce(c, ctx, u)?;
            }
            Ok(())
        })
        .await
    }

    async fn apply_remote_device_update(&self, up: RemoteDeviceUpdate) -> Result<DeviceUpdateOutcome> {
        self.write_wait(move |c, ctx| {
            let u = &up.user_id;
            let Some((stream_id, stale)) = list_row(c, u).map_err(pg_err)? else {
                announce(c, ctx, u)?;
                return Ok(DeviceUpdateOutcome::NotCached);
            };
            if !stale && stream_id.is_some_and(|s| s >= up.stream_id) {
                return Ok(DeviceUpdateOutcome::Old);
            }
            let follows = stream_id.is_some_and(|s| up.prev_ids.contains(&s));
            if stale || !follows {
                c.execute("UPDATE remote_device_lists SET stale = 1 WHERE user_id = $1", &[u])
                    .map_err(pg_err)?;
                announce(c, ctx, u)?;
                return Ok(DeviceUpdateOutcome::Stale);
            }
            if up.deleted {
                c.execute(
                    "DELETE FROM remote_device_keys WHERE user_id = $1 AND device_id = $2",
                    &[u, &up.device_id],
                )
                .map_err(pg_err)?;
            } else {
                c.execute(
                    "INSERT INTO remote_device_keys (user_id, device_id, keys_json, display_name) \
                     VALUES ($1,$2,$3,$4) ON CONFLICT (user_id, device_id) DO UPDATE SET \
                     keys_json = COALESCE(excluded.keys_json, remote_device_keys.keys_json), \
                     display_name = excluded.display_name",
                    &[u, &up.device_id, &up.keys_json, &up.display_name],
                )
                .map_err(pg_err)?;
            }
            c.execute(
                "UPDATE remote_device_lists SET stream_id = $2 WHERE user_id = $1",
                &[u, &up.stream_id],
            )
            .map_err(pg_err)?;
            announce(c, ctx, u)?;
            Ok(DeviceUpdateOutcome::Applied)
        })
        .await
    }

    async fn put_remote_cross_signing_keys(&self, user_id: &str, keys: Vec<(String, String)>) -> Result<bool> {
        let u = user_id.to_owned();
        self.write_wait(move |c, ctx| {
            let cached = list_row(c, &u).map_err(pg_err)?.is_some();
            if cached {
                for (key_type, json) in &keys {
                    c.execute(
                        "INSERT INTO remote_cross_signing_keys (user_id, key_type, key_json) VALUES ($1,$2,$3) \
                         ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = excluded.key_json",
                        &[&u, key_type, json],
                    )
                    .map_err(pg_err)?;
                }
            }
            announce(c, ctx, &u)?;
            Ok(cached)
        })
        .await
    }

    async fn mark_remote_device_list_stale(&self, user_id: &str) -> Result<()> {
        let u = user_id.to_owned();
        self.write_wait(move |c, _| {
            c.execute("UPDATE remote_device_lists SET stale = 1 WHERE user_id = $1", &[&u])
                .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn put_openid_token(&self, token: &str, user_id: &str, expires_ms: u64) -> Result<()> {
        let (t, u) = (token.to_owned(), user_id.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "DELETE FROM openid_tokens WHERE expires_ms < $1",
                &[&to_i64(weft_core::now_ms())],
            )
            .map_err(pg_err)?;
            c.execute(
                "INSERT INTO openid_tokens (token, user_id, expires_ms) VALUES ($1,$2,$3)",
                &[&t, &u, &to_i64(expires_ms)],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn openid_token_user(&self, token: &str, now_ms: u64) -> Result<Option<String>> {
        let t = token.to_owned();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT user_id FROM openid_tokens WHERE token = $1 AND expires_ms > $2",
                &[&t, &to_i64(now_ms)],
            )?
            .map(|r| r.get(0)))
        })
        .await
    }
}
