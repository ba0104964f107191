//! Small readers of stored events.

use serde_json::Value;
use weft_store::StoredEvent;

/// The `membership` of a member event.
pub fn membership_of(ev: &StoredEvent) -> Option<String> {
    serde_json::from_str::<Value>(&ev.pdu_json)
        .ok()
        .and_then(|v| v.get("content")?.get("membership")?.as_str().map(str::to_owned))
}
