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

/// Rewrites a JSON text so that every number canonical JSON cannot hold
/// becomes a string of exactly its digits (the same rule as Weft's doors).
pub fn quote_non_canonical_numbers(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let mut i = 0;
    let mut last = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    i += 1;
                }
                let token = &text[start..i];
                let integer_ok = token
                    .parse::<i64>()
                    .is_ok_and(|n| n.unsigned_abs() < (1u64 << 53) && !(n == 0 && token.starts_with('-')));
                if !integer_ok {
                    out.push_str(&text[last..start]);
                    out.push('"');
                    out.push_str(token);
                    out.push('"');
                    last = i;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[last.min(text.len())..]);
    out
}

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
