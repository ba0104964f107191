//! Rows of the outgoing federation queue (PDUs and EDUs waiting for a
//! destination to accept them), each destination's delivery state, and
//! the transactions received from other servers with the answers given.

use async_trait::async_trait;

use crate::{Pending, Result};

/// What a queue row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    Pdu,
    Edu,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Pdu => "pdu",
            OutboxKind::Edu => "edu",
        }
    }
}

/// A row to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutboxRow {
    pub destination: String,
    pub kind: OutboxKind,
    /// The PDU as stored, or `{"edu_type": …, "content": …}`.
    pub json: String,
}

/// A queued row as read back, `id` giving its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub id: i64,
    pub kind: OutboxKind,
    pub json: String,
}

/// A destination as `weft federation destinations` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DestinationRecord {
    pub name: String,
    pub queued_pdus: u64,
    pub queued_edus: u64,
    /// Not before this (ms since the epoch); 0: now.
    pub retry_at_ms: u64,
    /// The wait after the last failure; 0 after a success.
    pub backoff_ms: u64,
    pub last_error: Option<String>,
    pub last_success_ms: Option<u64>,
}

#[async_trait]
pub trait FederationQueueStore: Send + Sync + 'static {
    /// Adds rows to the queue; with `reader_position`, the outgoing queue's
    /// stream reader's new position (`meta` `federation_queued`) in the
    /// same write. Without it (rows queued by anyone but the reader, on any
    /// process), each destination of the rows gets a stream position
    /// ([`crate::StreamKey::Outbox`]) that wakes its sender on the process
    /// that leads.
    fn queue_federation(&self, rows: Vec<NewOutboxRow>, reader_position: Option<i64>) -> Pending<()>;
    /// A stream position ([`crate::StreamKey::Outbox`]) that makes the
    /// leading process's sender for `destination` look at it now.
    fn announce_destination(&self, destination: &str) -> Pending<()>;
    /// The oldest rows for `destination`: at most `max_pdus` PDUs and
    /// `max_edus` EDUs, in `id` order.
    async fn outbox(&self, destination: &str, max_pdus: usize, max_edus: usize) -> Result<Vec<OutboxRecord>>;
    /// Destinations with queued rows.
    async fn outbox_destinations(&self) -> Result<Vec<String>>;
    /// The destination accepted a transaction of these rows: they are
    /// deleted, its backoff is cleared and `now_ms` is its last success.
    async fn outbox_sent(&self, destination: &str, ids: Vec<i64>, now_ms: u64) -> Result<()>;
    /// A transaction to `destination` failed: why, and when to try again.
    async fn destination_failed(&self, destination: &str, error: &str, backoff_ms: u64, retry_at_ms: u64)
    -> Result<()>;
    /// One destination's state (`None`: never tried, nothing queued).
    async fn destination(&self, name: &str) -> Result<Option<DestinationRecord>>;
    /// Every destination tried or with queued rows, by name.
    async fn destinations(&self) -> Result<Vec<DestinationRecord>>;
    /// The answer given to transaction `txn_id` of `origin`, if stored.
    async fn received_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>>;
    /// Stores the answer to a transaction; rows received before
    /// `prune_before_ms` are deleted in the same write.
    async fn put_received_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response_json: &str,
        now_ms: u64,
        prune_before_ms: u64,
    ) -> Result<()>;
}
