//! The room pipeline's view of the network ([`weft_rooms::Remote`]): the
//! key ring's public keys, and events or states asked of a server over
//! federation. The pipeline decides what to ask; this only asks.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use ruma::api::federation::event::{get_event, get_room_state_ids};
use ruma::signatures::PublicKeyMap;
use ruma::{CanonicalJsonObject, EventId, OwnedEventId, OwnedServerName, RoomId, ServerName};
use weft_core::{Error, Result};
use weft_federation::Federation;

/// [`weft_rooms::Remote`] over the federation client.
pub struct Network<'a>(pub &'a Federation);

/// A PDU as another server sent it, as canonical JSON.
pub fn pdu_object(raw: &serde_json::value::RawValue) -> Result<CanonicalJsonObject> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(format!("Invalid PDU: {e}")))
}

#[async_trait]
impl weft_rooms::Remote for Network<'_> {
    async fn public_keys(&self, servers: BTreeSet<OwnedServerName>) -> PublicKeyMap {
        let wanted: BTreeMap<OwnedServerName, Vec<String>> = servers.into_iter().map(|s| (s, Vec::new())).collect();
        self.0.keys.public_keys(&wanted).await
    }

    async fn fetch_event(
        &self,
        origin: &ServerName,
        _room: &RoomId,
        event_id: &EventId,
    ) -> Result<CanonicalJsonObject> {
        let response = self
            .0
            .client
            .send(origin, get_event::v1::Request::new(event_id.to_owned()))
            .await?;
        pdu_object(&response.pdu)
    }

    async fn state_ids(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        let response = self
            .0
            .client
            .send(
                origin,
                get_room_state_ids::v1::Request::new(event_id.to_owned(), room_id.to_owned()),
            )
            .await?;
        Ok((response.pdu_ids, response.auth_chain_ids))
    }
}
