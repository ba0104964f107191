//! Turning PDUs into the event format clients see.

use serde_json::{Map, Value};
use weft_store::StoredEvent;

/// The client format of a stored event. `viewer` is (user_id, device_id) of
/// the requesting device, to add `unsigned.transaction_id` on its own sends.
pub fn client_event(ev: &StoredEvent, viewer: Option<(&str, &str)>, now_ms: u64) -> Value {
    let mut obj: Map<String, Value> = match serde_json::from_str(&ev.pdu_json) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    };
    for k in [
        "auth_events",
        "prev_events",
        "hashes",
        "signatures",
        "depth",
        "origin",
        "membership",
        "prev_state",
    ] {
        obj.remove(k);
    }
    obj.insert("event_id".into(), Value::String(ev.event_id.clone()));
    obj.insert("room_id".into(), Value::String(ev.room_id.clone()));
    if ev.event_type == "m.room.redaction"
        && !obj.contains_key("redacts")
        && let Some(r) = obj.get("content").and_then(|c| c.get("redacts")).cloned()
    {
        obj.insert("redacts".into(), r);
    }
    let mut unsigned = match obj.remove("unsigned") {
        Some(Value::Object(u)) => u,
        _ => Map::new(),
    };
    if let Some(Value::Object(because)) = unsigned.get_mut("redacted_because") {
        for k in ["auth_events", "prev_events", "hashes", "signatures", "depth"] {
            because.remove(k);
        }
        if let Some(id) = &ev.redacted_by {
            because.entry("event_id").or_insert_with(|| Value::String(id.clone()));
        }
        because.entry("unsigned").or_insert_with(|| Value::Object(Map::new()));
    }
    unsigned.insert("age".into(), Value::from(now_ms.saturating_sub(ev.origin_server_ts)));
    if let (Some((user, device)), Some((d, t))) = (viewer, &ev.txn)
        && user == ev.sender
        && device == d
    {
        unsigned.insert("transaction_id".into(), Value::String(t.clone()));
    }
    obj.insert("unsigned".into(), Value::Object(unsigned));
    Value::Object(obj)
}

/// Stripped state (type, state_key, sender, content), as sent with invites.
pub fn strip_state(ev: &StoredEvent) -> Value {
    let content = serde_json::from_str::<Value>(&ev.pdu_json)
        .ok()
        .and_then(|v| v.get("content").cloned())
        .unwrap_or_else(|| Value::Object(Map::new()));
    serde_json::json!({
        "type": ev.event_type,
        "state_key": ev.state_key.clone().unwrap_or_default(),
        "sender": ev.sender,
        "content": content,
    })
}
