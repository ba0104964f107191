//! PostgreSQL: the `FederationStore` area.

use super::*;

#[async_trait::async_trait]
impl FederationStore for PgStore {
    async fn put_server_keys(&self, response: ServerKeyResponse, keys: Vec<ServerKeyRecord>) -> Result<()> {
        let _ = (response, keys);
        Err(not_yet("put_server_keys"))
    }

    async fn server_keys(&self, server_name: &str) -> Result<Vec<ServerKeyRecord>> {
        let _ = (server_name,);
        Err(not_yet("server_keys"))
    }

    async fn server_key_response(&self, server_name: &str) -> Result<Option<ServerKeyResponse>> {
        let _ = (server_name,);
        Err(not_yet("server_key_response"))
    }
}
