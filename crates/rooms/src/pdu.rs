//! A parsed PDU, the shape ruma's authorization rules read.

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId, events::TimelineEventType,
};
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub event_type: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
}

#[derive(Deserialize)]
struct PduFields {
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    event_type: TimelineEventType,
    content: Box<RawValue>,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    depth: u64,
}

#[derive(Deserialize)]
struct RedactsInContent {
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    /// Parses a stored or freshly built PDU.
    pub fn parse(event_id: OwnedEventId, json: &str) -> Result<Self, serde_json::Error> {
        let f: PduFields = serde_json::from_str(json)?;
        let redacts = match f.redacts {
            Some(r) => Some(r),
            None if f.event_type == TimelineEventType::RoomRedaction => {
                serde_json::from_str::<RedactsInContent>(f.content.get())
                    .ok()
                    .and_then(|c| c.redacts)
            }
            None => None,
        };
        Ok(Self {
            event_id,
            room_id: f.room_id,
            sender: f.sender,
            origin_server_ts: f.origin_server_ts,
            event_type: f.event_type,
            content: f.content,
            state_key: f.state_key,
            prev_events: f.prev_events,
            auth_events: f.auth_events,
            redacts,
            depth: f.depth,
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.event_type
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}
