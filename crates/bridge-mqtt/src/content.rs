//! MQTT payloads as event content, with the conventions of Weft's own doors
//! (docs/mqtt.md, "Payloads in"): a JSON object is the content, its numbers
//! with a fraction or exponent (and integers beyond ±(2^53−1), and `-0`)
//! kept as strings of exactly the digits sent, since canonical JSON has no
//! floats (`{"temp": 21.50}` → `{"temp": "21.50"}`); any other UTF-8
//! payload is `{"msgtype": "org.weft.raw", "body": "…"}`, anything else
//! `{"msgtype": "org.weft.raw", "body_base64": "…"}`. Unlike the door, a
//! malformed JSON object is not refused (the broker has already taken it):
//! it is kept as raw text.

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// The content for a payload (always a JSON object).
pub fn payload_content(payload: &[u8]) -> Map<String, Value> {
    if let Ok(text) = std::str::from_utf8(payload) {
        if text.trim_start().starts_with('{')
            && let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&quote_non_canonical_numbers(text))
        {
            return o;
        }
        return as_object(json!({ "msgtype": "org.weft.raw", "body": text }));
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
    as_object(json!({ "msgtype": "org.weft.raw", "body_base64": b64 }))
}

fn as_object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}

pub use weft_json_digits::quote_non_canonical_numbers;

/// A command's value as a JSON value: JSON when it parses as a number,
/// boolean, object or array (numbers as canonical JSON allows), else the
/// text as a string (`ON` → `"ON"`, `42` → `42`, `21.5` → `21.5`).
pub fn command_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Object(_) | Value::Array(_) | Value::Null)) => v,
        _ => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_follow_the_doors_conventions() {
        let c = payload_content(br#"{"temperature": 21.50, "linkquality": 120, "state": "ON"}"#);
        assert_eq!(
            Value::Object(c),
            json!({"temperature": "21.50", "linkquality": 120, "state": "ON"})
        );
        let c = payload_content(b"Online");
        assert_eq!(Value::Object(c), json!({"msgtype": "org.weft.raw", "body": "Online"}));
        let c = payload_content(&[0xff, 0, 1]);
        assert_eq!(
            Value::Object(c),
            json!({"msgtype": "org.weft.raw", "body_base64": "/wAB"})
        );
        let c = payload_content(b"{broken");
        assert_eq!(Value::Object(c), json!({"msgtype": "org.weft.raw", "body": "{broken"}));
    }

    #[test]
    fn command_values() {
        assert_eq!(command_value("ON"), json!("ON"));
        assert_eq!(command_value("42"), json!(42));
        assert_eq!(command_value("true"), json!(true));
        assert_eq!(command_value("{\"a\":1}"), json!({"a": 1}));
    }
}
