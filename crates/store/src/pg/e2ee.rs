//! PostgreSQL: the `E2eeFederationStore` area.

use super::*;

#[async_trait::async_trait]
impl E2eeFederationStore for PgStore {
    async fn device_list_log(&self, user_id: &str, position: i64) -> Result<Vec<DeviceListChange>> {
        let _ = (user_id, position);
        Err(not_yet("device_list_log"))
    }

    async fn device_list_stream_id(&self, user_id: &str) -> Result<i64> {
        let _ = (user_id,);
        Err(not_yet("device_list_stream_id"))
    }

    async fn remote_device_list(&self, user_id: &str) -> Result<Option<RemoteDeviceList>> {
        let _ = (user_id,);
        Err(not_yet("remote_device_list"))
    }

    async fn put_remote_device_list(&self, list: RemoteDeviceList, announce: bool) -> Result<()> {
        let _ = (list, announce);
        Err(not_yet("put_remote_device_list"))
    }

    async fn apply_remote_device_update(&self, update: RemoteDeviceUpdate) -> Result<DeviceUpdateOutcome> {
        let _ = (update,);
        Err(not_yet("apply_remote_device_update"))
    }

    async fn put_remote_cross_signing_keys(&self, user_id: &str, keys: Vec<(String, String)>) -> Result<bool> {
        let _ = (user_id, keys);
        Err(not_yet("put_remote_cross_signing_keys"))
    }

    async fn mark_remote_device_list_stale(&self, user_id: &str) -> Result<()> {
        let _ = (user_id,);
        Err(not_yet("mark_remote_device_list_stale"))
    }

    async fn put_openid_token(&self, token: &str, user_id: &str, expires_ms: u64) -> Result<()> {
        let _ = (token, user_id, expires_ms);
        Err(not_yet("put_openid_token"))
    }

    async fn openid_token_user(&self, token: &str, now_ms: u64) -> Result<Option<String>> {
        let _ = (token, now_ms);
        Err(not_yet("openid_token_user"))
    }
}
