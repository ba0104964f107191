//! TEMPORARY stubs (the merger deletes this file): typing and unread
//! counts are being built on other branches under these exact names.

use serde_json::Value;
use weft_core::Result;

use crate::Services;

impl Services {
    /// The room's `m.typing` event (stub: none).
    pub async fn typing_event(&self, _room_id: &str) -> Result<Option<Value>> {
        Ok(None)
    }
}
