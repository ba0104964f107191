//! PostgreSQL: the `FederationStore` area (sqlite/federation.rs).

use super::*;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl FederationStore for PgStore {
    async fn put_server_keys(&self, response: ServerKeyResponse, keys: Vec<ServerKeyRecord>) -> Result<()> {
        self.write_wait(move |c, _| {
            // One statement for all keys. A key may come twice (in
            // `verify_keys` and `old_verify_keys`): SQLite upserts one
            // after the other, the last one staying; PostgreSQL refuses
            // to update a row twice in one statement, so only the last of
            // each is sent.
            let mut last: HashMap<(&str, &str), usize> = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                last.insert((k.server_name.as_str(), k.key_id.as_str()), i);
            }
            let keys: Vec<&ServerKeyRecord> = keys
                .iter()
                .enumerate()
                .filter(|(i, k)| last.get(&(k.server_name.as_str(), k.key_id.as_str())) == Some(i))
                .map(|(_, k)| k)
                .collect();
            if !keys.is_empty() {
                let servers: Vec<&str> = keys.iter().map(|k| k.server_name.as_str()).collect();
                let ids: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
                let public: Vec<&str> = keys.iter().map(|k| k.public_key.as_str()).collect();
                let valid: Vec<i64> = keys.iter().map(|k| to_i64(k.valid_until_ts)).collect();
                let expired: Vec<Option<i64>> = keys.iter().map(|k| k.expired_ts.map(to_i64)).collect();
                let fetched: Vec<i64> = keys.iter().map(|k| to_i64(k.fetched_ts)).collect();
                c.execute(
                    "INSERT INTO server_keys \
                     (server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts) \
                     SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], \
                     $6::BIGINT[]) \
                     ON CONFLICT (server_name, key_id) DO UPDATE SET public_key = excluded.public_key, \
                     valid_until_ts = excluded.valid_until_ts, expired_ts = excluded.expired_ts, \
                     fetched_ts = excluded.fetched_ts",
                    &[&servers, &ids, &public, &valid, &expired, &fetched],
                )
                .map_err(pg_err)?;
            }
            c.execute(
                "INSERT INTO server_key_responses (server_name, json, valid_until_ts, fetched_ts) \
                 VALUES ($1,$2,$3,$4) ON CONFLICT (server_name) DO UPDATE SET json = excluded.json, \
                 valid_until_ts = excluded.valid_until_ts, fetched_ts = excluded.fetched_ts",
                &[
                    &response.server_name,
                    &response.json,
                    &to_i64(response.valid_until_ts),
                    &to_i64(response.fetched_ts),
                ],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn server_keys(&self, server_name: &str) -> Result<Vec<ServerKeyRecord>> {
        let name = server_name.to_owned();
        self.read(move |c| {
            Ok(c.query(
                "SELECT server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts \
                 FROM server_keys WHERE server_name = $1 ORDER BY key_id",
                &[&name],
            )?
            .iter()
            .map(|r| ServerKeyRecord {
                server_name: r.get(0),
                key_id: r.get(1),
                public_key: r.get(2),
                valid_until_ts: r.get::<_, i64>(3).max(0) as u64,
                expired_ts: r.get::<_, Option<i64>>(4).map(|t| t.max(0) as u64),
                fetched_ts: r.get::<_, i64>(5).max(0) as u64,
            })
            .collect())
        })
        .await
    }

    async fn server_key_response(&self, server_name: &str) -> Result<Option<ServerKeyResponse>> {
        let name = server_name.to_owned();
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT server_name, json, valid_until_ts, fetched_ts FROM server_key_responses \
                 WHERE server_name = $1",
                &[&name],
            )?
            .map(|r| ServerKeyResponse {
                server_name: r.get(0),
                json: r.get(1),
                valid_until_ts: r.get::<_, i64>(2).max(0) as u64,
                fetched_ts: r.get::<_, i64>(3).max(0) as u64,
            }))
        })
        .await
    }
}
