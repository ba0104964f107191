//! [`FederationStore`] on SQLite.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, db_err};
use crate::Result;
use crate::federation::*;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl FederationStore for SqliteStore {
    async fn put_server_keys(&self, response: ServerKeyResponse, keys: Vec<ServerKeyRecord>) -> Result<()> {
        self.write_wait(move |c, _| {
            for k in &keys {
                c.execute(
                    "INSERT INTO server_keys \
                     (server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts) \
                     VALUES (?1,?2,?3,?4,?5,?6) \
                     ON CONFLICT (server_name, key_id) DO UPDATE SET public_key = ?3, \
                     valid_until_ts = ?4, expired_ts = ?5, fetched_ts = ?6",
                    params![
                        k.server_name,
                        k.key_id,
                        k.public_key,
                        to_i64(k.valid_until_ts),
                        k.expired_ts.map(to_i64),
                        to_i64(k.fetched_ts)
                    ],
                )
                .map_err(db_err)?;
            }
            c.execute(
                "INSERT INTO server_key_responses (server_name, json, valid_until_ts, fetched_ts) \
                 VALUES (?1,?2,?3,?4) ON CONFLICT (server_name) DO UPDATE SET json = ?2, \
                 valid_until_ts = ?3, fetched_ts = ?4",
                params![
                    response.server_name,
                    response.json,
                    to_i64(response.valid_until_ts),
                    to_i64(response.fetched_ts)
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn server_keys(&self, server_name: &str) -> Result<Vec<ServerKeyRecord>> {
        let name = server_name.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts \
                 FROM server_keys WHERE server_name = ?1 ORDER BY key_id",
            )?;
            let rows = stmt.query_map([name], |r| {
                Ok(ServerKeyRecord {
                    server_name: r.get(0)?,
                    key_id: r.get(1)?,
                    public_key: r.get(2)?,
                    valid_until_ts: r.get::<_, i64>(3)?.max(0) as u64,
                    expired_ts: r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
                    fetched_ts: r.get::<_, i64>(5)?.max(0) as u64,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn server_key_response(&self, server_name: &str) -> Result<Option<ServerKeyResponse>> {
        let name = server_name.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT server_name, json, valid_until_ts, fetched_ts FROM server_key_responses \
                 WHERE server_name = ?1",
            )?
            .query_row([name], |r| {
                Ok(ServerKeyResponse {
                    server_name: r.get(0)?,
                    json: r.get(1)?,
                    valid_until_ts: r.get::<_, i64>(2)?.max(0) as u64,
                    fetched_ts: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })
            .optional()
        })
        .await
    }
}
