//! PostgreSQL: the `AppserviceStore` area (sqlite/appservice.rs).

use super::*;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    n.max(0) as u64
}

const SELECT: &str = "SELECT id, position, next_txn, pending_upto, pending_body, retry_at_ms, backoff_ms, \
                      last_error, last_success_ms FROM appservice_state";

fn state_row(r: &Row) -> AppserviceState {
    let upto: Option<i64> = r.get(3);
    let body: Option<String> = r.get(4);
    AppserviceState {
        id: r.get(0),
        position: r.get(1),
        next_txn: to_u64(r.get(2)),
        pending: upto.zip(body),
        retry_at_ms: to_u64(r.get(5)),
        backoff_ms: to_u64(r.get(6)),
        last_error: r.get(7),
        last_success_ms: r.get::<_, Option<i64>>(8).map(to_u64),
    }
}

#[async_trait::async_trait]
impl AppserviceStore for PgStore {
    async fn appservice_state_or_init(&self, id: &str, position: i64) -> Result<AppserviceState> {
        let id = id.to_owned();
        self.write_wait(move |c, _| {
            c.execute(
                "INSERT INTO appservice_state (id, position) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&id, &position],
            )
            .map_err(pg_err)?;
            c.query_opt(&format!("{SELECT} WHERE id = $1"), &[&id])
                .map_err(pg_err)?
                .map(|r| state_row(&r))
                .ok_or_else(|| Error::internal("appservice state missing"))
        })
        .await
    }

    async fn appservice_states(&self) -> Result<Vec<AppserviceState>> {
        self.read(move |c| {
            Ok(c.query(&format!("{SELECT} ORDER BY id"), &[])?
                .iter()
                .map(state_row)
                .collect())
        })
        .await
    }

    async fn appservice_advance(&self, id: &str, position: i64) -> Result<()> {
        let id = id.to_owned();
        self.write_wait(move |c, _| {
            c.execute(
                "UPDATE appservice_state SET position = GREATEST(position, $2) WHERE id = $1 AND pending_upto IS NULL",
                &[&id, &position],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn appservice_begin(&self, id: &str, upto: i64, body: String) -> Result<()> {
        let id = id.to_owned();
        self.write_wait(move |c, _| {
            c.execute(
                "UPDATE appservice_state SET pending_upto = $2, pending_body = $3 WHERE id = $1",
                &[&id, &upto, &body],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn appservice_delivered(&self, id: &str, now_ms: u64) -> Result<()> {
        let id = id.to_owned();
        self.write_wait(move |c, _| {
            c.execute(
                "UPDATE appservice_state SET position = COALESCE(pending_upto, position), \
                 next_txn = next_txn + 1, pending_upto = NULL, pending_body = NULL, retry_at_ms = 0, \
                 backoff_ms = 0, last_error = NULL, last_success_ms = $2 WHERE id = $1",
                &[&id, &to_i64(now_ms)],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn appservice_failed(&self, id: &str, error: &str, backoff_ms: u64, retry_at_ms: u64) -> Result<()> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.write_wait(move |c, _| {
            c.execute(
                "UPDATE appservice_state SET last_error = $2, backoff_ms = $3, retry_at_ms = $4 WHERE id = $1",
                &[&id, &error, &to_i64(backoff_ms), &to_i64(retry_at_ms)],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }
}
