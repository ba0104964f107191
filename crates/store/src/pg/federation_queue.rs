//! PostgreSQL: the `FederationQueueStore` area.

use super::*;

#[async_trait::async_trait]
impl FederationQueueStore for PgStore {
    fn queue_federation(&self, rows: Vec<NewOutboxRow>, reader_position: Option<i64>) -> Pending<()> {
        let _ = (rows, reader_position);
        self.write(|_, _| Err(not_yet("queue_federation")))
    }

    async fn outbox(&self, destination: &str, max_pdus: usize, max_edus: usize) -> Result<Vec<OutboxRecord>> {
        let _ = (destination, max_pdus, max_edus);
        Err(not_yet("outbox"))
    }

    async fn outbox_destinations(&self) -> Result<Vec<String>> {
        Err(not_yet("outbox_destinations"))
    }

    async fn outbox_sent(&self, destination: &str, ids: Vec<i64>, now_ms: u64) -> Result<()> {
        let _ = (destination, ids, now_ms);
        Err(not_yet("outbox_sent"))
    }

    async fn destination_failed(
        &self,
        destination: &str,
        error: &str,
        backoff_ms: u64,
        retry_at_ms: u64,
    ) -> Result<()> {
        let _ = (destination, error, backoff_ms, retry_at_ms);
        Err(not_yet("destination_failed"))
    }

    async fn destination(&self, name: &str) -> Result<Option<DestinationRecord>> {
        let _ = (name,);
        Err(not_yet("destination"))
    }

    async fn destinations(&self) -> Result<Vec<DestinationRecord>> {
        Err(not_yet("destinations"))
    }

    async fn received_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>> {
        let _ = (origin, txn_id);
        Err(not_yet("received_txn"))
    }

    async fn put_received_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response_json: &str,
        now_ms: u64,
        prune_before_ms: u64,
    ) -> Result<()> {
        let _ = (origin, txn_id, response_json, now_ms, prune_before_ms);
        Err(not_yet("put_received_txn"))
    }
}
