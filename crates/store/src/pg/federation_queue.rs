//! PostgreSQL: the `FederationQueueStore` area (sqlite/federation_queue.rs).

use super::*;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    n.max(0) as u64
}

const DESTINATION_SELECT: &str = "SELECT n.name, \
     (SELECT COUNT(*) FROM federation_outbox o WHERE o.destination = n.name AND o.kind = 'pdu'), \
     (SELECT COUNT(*) FROM federation_outbox o WHERE o.destination = n.name AND o.kind = 'edu'), \
     COALESCE(d.retry_at_ms, 0), COALESCE(d.backoff_ms, 0), d.last_error, d.last_success_ms \
     FROM (SELECT name FROM destinations UNION SELECT DISTINCT destination FROM federation_outbox) n \
     LEFT JOIN destinations d ON d.name = n.name";

fn destination_row(r: &Row) -> DestinationRecord {
    DestinationRecord {
        name: r.get(0),
        queued_pdus: to_u64(r.get(1)),
        queued_edus: to_u64(r.get(2)),
        retry_at_ms: to_u64(r.get(3)),
        backoff_ms: to_u64(r.get(4)),
        last_error: r.get(5),
        last_success_ms: r.get::<_, Option<i64>>(6).map(to_u64),
    }
}

#[async_trait::async_trait]
impl FederationQueueStore for PgStore {
    fn queue_federation(&self, rows: Vec<NewOutboxRow>, reader_position: Option<i64>) -> Pending<()> {
        if !self
            .federation_mark
            .must_write(!rows.is_empty() || reader_position.is_none())
        {
            return crate::stream::done(());
        }
        self.write(move |c, ctx| {
            let now = to_i64(weft_core::now_ms());
            if reader_position.is_none() {
                ctx.announce_destinations(rows.iter().map(|r| r.destination.as_str()));
            }
            if !rows.is_empty() {
                // One statement for the rows; the identity numbers them in
                // the order given (`WITH ORDINALITY … ORDER BY`), which is
                // the order `outbox` reads them back in.
                let dests: Vec<&str> = rows.iter().map(|r| r.destination.as_str()).collect();
                let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
                let jsons: Vec<&str> = rows.iter().map(|r| r.json.as_str()).collect();
                c.execute(
                    "INSERT INTO federation_outbox (destination, kind, json, queued_ms) \
                     SELECT d, k, j, $4::BIGINT FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) \
                     WITH ORDINALITY AS u (d, k, j, i) ORDER BY i",
                    &[&dests, &kinds, &jsons, &now],
                )
                .map_err(pg_err)?;
            }
            if let Some(p) = reader_position {
                c.execute(
                    "INSERT INTO meta (key, value) VALUES ('federation_queued', $1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&p.to_string()],
                )
                .map_err(pg_err)?;
            }
            Ok(())
        })
    }

    fn announce_destination(&self, destination: &str) -> Pending<()> {
        let d = destination.to_owned();
        self.write(move |_, ctx| {
            ctx.announce_destinations([d.as_str()]);
            Ok(())
        })
    }

    async fn outbox(&self, destination: &str, max_pdus: usize, max_edus: usize) -> Result<Vec<OutboxRecord>> {
        let dest = destination.to_owned();
        let (pdus, edus) = (
            i64::try_from(max_pdus).unwrap_or(i64::MAX),
            i64::try_from(max_edus).unwrap_or(i64::MAX),
        );
        self.read(move |c| {
            // SQLite's two queries (oldest PDUs, oldest EDUs) in one.
            Ok(c.query(
                "(SELECT id, kind, json FROM federation_outbox WHERE destination = $1 AND kind = 'pdu' \
                  ORDER BY id LIMIT $2) \
                 UNION ALL \
                 (SELECT id, kind, json FROM federation_outbox WHERE destination = $1 AND kind = 'edu' \
                  ORDER BY id LIMIT $3) \
                 ORDER BY id",
                &[&dest, &pdus, &edus],
            )?
            .iter()
            .map(|r| OutboxRecord {
                id: r.get(0),
                kind: if r.get::<_, &str>(1) == "pdu" {
                    OutboxKind::Pdu
                } else {
                    OutboxKind::Edu
                },
                json: r.get(2),
            })
            .collect())
        })
        .await
    }

    async fn outbox_destinations(&self) -> Result<Vec<String>> {
        self.read(|c| {
            Ok(c.query(
                "SELECT DISTINCT destination FROM federation_outbox ORDER BY destination",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
        .await
    }

    async fn outbox_sent(&self, destination: &str, ids: Vec<i64>, now_ms: u64) -> Result<()> {
        let dest = destination.to_owned();
        self.write_wait(move |c, _| {
            c.execute(
                "DELETE FROM federation_outbox WHERE id = ANY($1) AND destination = $2",
                &[&ids, &dest],
            )
            .map_err(pg_err)?;
            c.execute(
                "INSERT INTO destinations (name, retry_at_ms, backoff_ms, last_error, last_success_ms) \
                 VALUES ($1, 0, 0, NULL, $2) ON CONFLICT (name) DO UPDATE SET retry_at_ms = 0, \
                 backoff_ms = 0, last_error = NULL, last_success_ms = excluded.last_success_ms",
                &[&dest, &to_i64(now_ms)],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn destination_failed(
        &self,
        destination: &str,
        error: &str,
        backoff_ms: u64,
        retry_at_ms: u64,
    ) -> Result<()> {
        let (dest, error) = (destination.to_owned(), error.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "INSERT INTO destinations (name, retry_at_ms, backoff_ms, last_error) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET retry_at_ms = excluded.retry_at_ms, \
                 backoff_ms = excluded.backoff_ms, last_error = excluded.last_error",
                &[&dest, &to_i64(retry_at_ms), &to_i64(backoff_ms), &error],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn destination(&self, name: &str) -> Result<Option<DestinationRecord>> {
        let name = name.to_owned();
        self.read(move |c| {
            Ok(
                c.query_opt(&format!("{DESTINATION_SELECT} WHERE n.name = $1"), &[&name])?
                    .map(|r| destination_row(&r)),
            )
        })
        .await
    }

    async fn destinations(&self) -> Result<Vec<DestinationRecord>> {
        self.read(|c| {
            Ok(c.query(&format!("{DESTINATION_SELECT} ORDER BY n.name"), &[])?
                .iter()
                .map(destination_row)
                .collect())
        })
        .await
    }

    async fn received_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>> {
        let (origin, txn) = (origin.to_owned(), txn_id.to_owned());
        self.read(move |c| {
            Ok(c.query_opt(
                "SELECT response_json FROM federation_txns_received WHERE origin = $1 AND txn_id = $2",
                &[&origin, &txn],
            )?
            .map(|r| r.get(0)))
        })
        .await
    }

    async fn put_received_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response_json: &str,
        now_ms: u64,
        prune_before_ms: u64,
    ) -> Result<()> {
        let (origin, txn, json) = (origin.to_owned(), txn_id.to_owned(), response_json.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "DELETE FROM federation_txns_received WHERE received_ms < $1",
                &[&to_i64(prune_before_ms)],
            )
            .map_err(pg_err)?;
            c.execute(
                "INSERT INTO federation_txns_received (origin, txn_id, response_json, received_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (origin, txn_id) DO NOTHING",
                &[&origin, &txn, &json, &to_i64(now_ms)],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }
}
