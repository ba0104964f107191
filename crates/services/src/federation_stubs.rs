//! TEMPORARY interface stubs shared by two parallel branches (removed at
//! merge): the outgoing federation queue (branch `fedsend` implements
//! `queue_edu` and deletes its stub here) and end-to-end encryption over
//! federation (branch `fede2ee` implements `device_list_update_edus` and
//! `receive_e2ee_edu` and deletes their stubs here).

use ruma::{OwnedServerName, ServerName, UserId};
use weft_core::Result;

use crate::Services;

impl Services {
    /// The `m.device_list_update` EDUs to send because the device list of
    /// local user `user_id` changed at stream position `position`: one per
    /// server sharing a room with the user (destination, EDU content).
    /// Called by the outgoing queue's stream reader for each
    /// `StreamKey::DeviceKeys` of a local user.
    pub async fn device_list_update_edus(
        &self,
        user_id: &UserId,
        position: i64,
    ) -> Result<Vec<(OwnedServerName, serde_json::Value)>> {
        let _ = (user_id, position);
        Ok(Vec::new())
    }

    /// Takes in an end-to-end-encryption EDU from `origin`'s transaction:
    /// `m.device_list_update`, `m.signing_key_update`,
    /// `m.direct_to_device`. Called by the incoming `/send` handler.
    pub async fn receive_e2ee_edu(
        &self,
        origin: &ServerName,
        edu_type: &str,
        content: serde_json::Value,
    ) -> Result<()> {
        let _ = (origin, edu_type, content);
        Ok(())
    }
}
