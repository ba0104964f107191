//! [`FederationQueueStore`] on SQLite.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, params};

use super::{SqliteStore, collect, db_err};
use crate::federation_queue::*;
use crate::{Pending, Result};

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

fn destination_row(r: &Row<'_>) -> rusqlite::Result<DestinationRecord> {
    Ok(DestinationRecord {
        name: r.get(0)?,
        queued_pdus: to_u64(r.get(1)?),
        queued_edus: to_u64(r.get(2)?),
        retry_at_ms: to_u64(r.get(3)?),
        backoff_ms: to_u64(r.get(4)?),
        last_error: r.get(5)?,
        last_success_ms: r.get::<_, Option<i64>>(6)?.map(to_u64),
    })
}

#[async_trait]
impl FederationQueueStore for SqliteStore {
    fn queue_federation(&self, rows: Vec<NewOutboxRow>, reader_position: Option<i64>) -> Pending<()> {
        if !self
            .federation_mark
            .must_write(!rows.is_empty() || reader_position.is_none())
        {
            return crate::stream::done(());
        }
        self.write(move |c, ctx| {
            let now = to_i64(weft_core::now_ms());
            if reader_position.is_none() && !rows.is_empty() {
                ctx.announce_destinations(rows.iter().map(|r| r.destination.as_str()));
                super::remember_position(c, ctx.pos).map_err(db_err)?;
            }
            for row in rows {
                c.prepare_cached(
                    "INSERT INTO federation_outbox (destination, kind, json, queued_ms) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![row.destination, row.kind.as_str(), row.json, now]))
                .map_err(db_err)?;
            }
            if let Some(p) = reader_position {
                c.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('federation_queued', ?1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .and_then(|mut s| s.execute([p.to_string()]))
                .map_err(db_err)?;
            }
            Ok(())
        })
    }

    fn announce_destination(&self, destination: &str) -> Pending<()> {
        let d = destination.to_owned();
        self.write(move |c, ctx| {
            ctx.announce_destinations([d.as_str()]);
            super::remember_position(c, ctx.pos).map_err(db_err)?;
            Ok(())
        })
    }

    async fn outbox(&self, destination: &str, max_pdus: usize, max_edus: usize) -> Result<Vec<OutboxRecord>> {
        let dest = destination.to_owned();
        self.read(move |c| {
            let row = |r: &Row<'_>| -> rusqlite::Result<OutboxRecord> {
                let kind: String = r.get(1)?;
                Ok(OutboxRecord {
                    id: r.get(0)?,
                    kind: if kind == "pdu" {
                        OutboxKind::Pdu
                    } else {
                        OutboxKind::Edu
                    },
                    json: r.get(2)?,
                })
            };
            let sql = "SELECT id, kind, json FROM federation_outbox WHERE destination = ?1 AND kind = ?2 \
                       ORDER BY id LIMIT ?3";
            let mut rows = collect(c, sql, params![dest, "pdu", max_pdus as i64], row)?;
            rows.extend(collect(c, sql, params![dest, "edu", max_edus as i64], row)?);
            rows.sort_by_key(|r| r.id);
            Ok(rows)
        })
        .await
    }

    async fn outbox_destinations(&self) -> Result<Vec<String>> {
        self.read(|c| {
            collect(
                c,
                "SELECT DISTINCT destination FROM federation_outbox ORDER BY destination",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn outbox_sent(&self, destination: &str, ids: Vec<i64>, now_ms: u64) -> Result<()> {
        let dest = destination.to_owned();
        self.write_wait(move |c, _| {
            for id in ids {
                c.prepare_cached("DELETE FROM federation_outbox WHERE id = ?1 AND destination = ?2")
                    .and_then(|mut s| s.execute(params![id, dest]))
                    .map_err(db_err)?;
            }
            c.prepare_cached(
                "INSERT INTO destinations (name, retry_at_ms, backoff_ms, last_error, last_success_ms) \
                 VALUES (?1, 0, 0, NULL, ?2) ON CONFLICT (name) DO UPDATE SET retry_at_ms = 0, \
                 backoff_ms = 0, last_error = NULL, last_success_ms = excluded.last_success_ms",
            )
            .and_then(|mut s| s.execute(params![dest, to_i64(now_ms)]))
            .map_err(db_err)?;
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
            c.prepare_cached(
                "INSERT INTO destinations (name, retry_at_ms, backoff_ms, last_error) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO UPDATE SET retry_at_ms = excluded.retry_at_ms, \
                 backoff_ms = excluded.backoff_ms, last_error = excluded.last_error",
            )
            .and_then(|mut s| s.execute(params![dest, to_i64(retry_at_ms), to_i64(backoff_ms), error]))
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn destination(&self, name: &str) -> Result<Option<DestinationRecord>> {
        let name = name.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!("{DESTINATION_SELECT} WHERE n.name = ?1"))?
                .query_row([name], destination_row)
                .optional()
        })
        .await
    }

    async fn destinations(&self) -> Result<Vec<DestinationRecord>> {
        self.read(|c| collect(c, &format!("{DESTINATION_SELECT} ORDER BY n.name"), [], destination_row))
            .await
    }

    async fn received_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>> {
        let (origin, txn) = (origin.to_owned(), txn_id.to_owned());
        self.read(move |c| {
            c.prepare_cached("SELECT response_json FROM federation_txns_received WHERE origin = ?1 AND txn_id = ?2")?
                .query_row(params![origin, txn], |r| r.get(0))
                .optional()
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
            c.prepare_cached("DELETE FROM federation_txns_received WHERE received_ms < ?1")
                .and_then(|mut s| s.execute([to_i64(prune_before_ms)]))
                .map_err(db_err)?;
            c.prepare_cached(
                "INSERT INTO federation_txns_received (origin, txn_id, response_json, received_ms) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (origin, txn_id) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![origin, txn, json, to_i64(now_ms)]))
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }
}
