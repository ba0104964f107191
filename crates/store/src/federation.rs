//! Rows of federation: other servers' signing keys, as the key ring
//! (`weft-federation`) fetched and verified them.

use async_trait::async_trait;

use crate::Result;

/// One signing key of another server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeyRecord {
    pub server_name: String,
    /// `ed25519:abc123`
    pub key_id: String,
    /// Unpadded base64 of the public key.
    pub public_key: String,
    /// Until when it may verify signatures (ms since the epoch).
    pub valid_until_ts: u64,
    /// When the server retired it (`old_verify_keys`), if it did.
    pub expired_ts: Option<u64>,
    pub fetched_ts: u64,
}

/// A server's key response as it signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeyResponse {
    pub server_name: String,
    /// The JSON object, signatures included.
    pub json: String,
    pub valid_until_ts: u64,
    pub fetched_ts: u64,
}

#[async_trait]
pub trait FederationStore: Send + Sync + 'static {
    /// Stores a verified key response: its keys are added or updated
    /// (keys not in it are kept), and it replaces the server's stored
    /// response.
    async fn put_server_keys(&self, response: ServerKeyResponse, keys: Vec<ServerKeyRecord>) -> Result<()>;
    /// Every key stored for `server_name`, expired ones too.
    async fn server_keys(&self, server_name: &str) -> Result<Vec<ServerKeyRecord>>;
    /// The newest stored response of `server_name`.
    async fn server_key_response(&self, server_name: &str) -> Result<Option<ServerKeyResponse>>;
}
