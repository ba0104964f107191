//! PostgreSQL: the `AppserviceStore` area.

use super::*;

#[async_trait::async_trait]
impl AppserviceStore for PgStore {
    async fn appservice_state_or_init(&self, id: &str, position: i64) -> Result<AppserviceState> {
        let _ = (id, position);
        Err(not_yet("appservice_state_or_init"))
    }

    async fn appservice_states(&self) -> Result<Vec<AppserviceState>> {
        Err(not_yet("appservice_states"))
    }

    async fn appservice_advance(&self, id: &str, position: i64) -> Result<()> {
        let _ = (id, position);
        Err(not_yet("appservice_advance"))
    }

    async fn appservice_begin(&self, id: &str, upto: i64, body: String) -> Result<()> {
        let _ = (id, upto, body);
        Err(not_yet("appservice_begin"))
    }

    async fn appservice_delivered(&self, id: &str, now_ms: u64) -> Result<()> {
        let _ = (id, now_ms);
        Err(not_yet("appservice_delivered"))
    }

    async fn appservice_failed(&self, id: &str, error: &str, backoff_ms: u64, retry_at_ms: u64) -> Result<()> {
        let _ = (id, error, backoff_ms, retry_at_ms);
        Err(not_yet("appservice_failed"))
    }
}
