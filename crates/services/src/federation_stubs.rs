//! TEMPORARY interface stub shared by two parallel branches (removed at
//! merge): the outgoing federation queue (branch `fedsend` implements
//! `queue_edu` and deletes its stub here). The end-to-end-encryption side
//! (`device_list_update_edus`, `receive_e2ee_edu`) is `federation_e2ee`.

use ruma::ServerName;
use weft_core::{Error, Result};

use crate::Services;

impl Services {
    /// Queues an EDU for `destination`, durably: it is sent in a later
    /// transaction to that server, retried until it is accepted.
    pub async fn queue_edu(&self, destination: &ServerName, edu_type: &str, content: serde_json::Value) -> Result<()> {
        let _ = (destination, edu_type, content);
        Err(Error::internal("queue_edu: not built yet"))
    }
}
