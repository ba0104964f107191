//! Application services' delivery state: how far each service's reader of
//! the stream has delivered, and the transaction it is delivering
//! (docs/appservices.md "Delivery").

use async_trait::async_trait;

use crate::Result;

/// One service's delivery state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppserviceState {
    pub id: String,
    /// Every event up to this stream position was delivered (or was of no
    /// interest to the service).
    pub position: i64,
    /// The ID the next new transaction gets.
    pub next_txn: u64,
    /// The transaction being delivered: the position it covers up to and
    /// its body (sent again as is until the service accepts it); its ID is
    /// `next_txn`.
    pub pending: Option<(i64, String)>,
    /// Not before this (ms since the epoch); 0: now.
    pub retry_at_ms: u64,
    /// The wait after the last failure; 0 after a success.
    pub backoff_ms: u64,
    pub last_error: Option<String>,
    pub last_success_ms: Option<u64>,
}

#[async_trait]
pub trait AppserviceStore: Send + Sync + 'static {
    /// The service's state; created at `position` (and answered) when it
    /// has none.
    async fn appservice_state_or_init(&self, id: &str, position: i64) -> Result<AppserviceState>;
    /// Every service's state, by ID.
    async fn appservice_states(&self) -> Result<Vec<AppserviceState>>;
    /// Nothing for the service up to `position`: its reader moves on
    /// (only while no transaction is pending).
    async fn appservice_advance(&self, id: &str, position: i64) -> Result<()>;
    /// A new transaction (ID `next_txn`) covering up to `upto`, to deliver.
    async fn appservice_begin(&self, id: &str, upto: i64, body: String) -> Result<()>;
    /// The service accepted the pending transaction: the position moves to
    /// what it covered, the next transaction gets the next ID, the backoff
    /// is cleared.
    async fn appservice_delivered(&self, id: &str, now_ms: u64) -> Result<()>;
    /// Delivering failed: why, and when to try again.
    async fn appservice_failed(&self, id: &str, error: &str, backoff_ms: u64, retry_at_ms: u64) -> Result<()>;
}
