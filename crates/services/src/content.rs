//! Checking client-supplied JSON against canonical JSON's rules.

use ruma::{CanonicalJsonObject, CanonicalJsonValue};
use weft_core::{Error, Result};

/// Converts event content to canonical JSON. Floats and integers outside
/// ±(2^53-1) are refused with `M_BAD_JSON`, as the spec requires.
pub fn canonical_object(value: serde_json::Value) -> Result<CanonicalJsonObject> {
    if !value.is_object() {
        return Err(Error::bad_json("Content must be a JSON object"));
    }
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err(Error::bad_json("Content must be a JSON object")),
        Err(e) => Err(Error::bad_json(format!(
            "Content is not canonical JSON (floats and integers beyond ±2^53 are not allowed): {e}"
        ))),
    }
}

pub use weft_json_digits::quote_non_canonical_numbers;

/// Event content for a payload arriving through a door. A JSON object is
/// taken as the content (numbers canonicalised by
/// [`quote_non_canonical_numbers`]); any other payload is wrapped: UTF-8
/// text as `{"body": text}`, anything else as `{"body_base64": …}`, both
/// with `"msgtype": "org.weft.raw"`.
pub fn door_content(payload: &[u8]) -> Result<CanonicalJsonObject> {
    use base64::Engine;
    if let Ok(text) = std::str::from_utf8(payload) {
        if text.trim_start().starts_with('{') {
            let fixed = quote_non_canonical_numbers(text);
            let value: serde_json::Value =
                serde_json::from_str(&fixed).map_err(|e| Error::new(weft_core::ErrorKind::NotJson, e.to_string()))?;
            return canonical_object(value);
        }
        return canonical_object(serde_json::json!({ "msgtype": "org.weft.raw", "body": text }));
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
    canonical_object(serde_json::json!({ "msgtype": "org.weft.raw", "body_base64": b64 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn door_payloads_are_wrapped_when_not_json_objects() {
        let c = door_content(b"hello").unwrap();
        assert_eq!(c.get("body").and_then(|v| v.as_str()), Some("hello"));
        let c = door_content(&[0xff, 0x00, 0x01]).unwrap();
        assert_eq!(c.get("body_base64").and_then(|v| v.as_str()), Some("/wAB"));
        let c = door_content(br#"{"temp": 21.5}"#).unwrap();
        assert_eq!(c.get("temp").and_then(|v| v.as_str()), Some("21.5"));
        assert!(door_content(b"{not json").is_err());
    }

    /// Found by the door_payloads fuzz target: `-0` is valid JSON but
    /// serde_json reads it as a float, so it was refused as non-canonical.
    #[test]
    fn negative_zero_is_quoted_not_refused() {
        let c = door_content(br#"{"a": -0, "b": [-0], "c": 0}"#).unwrap();
        assert_eq!(c.get("a").and_then(|v| v.as_str()), Some("-0"));
        assert_eq!(c.get("c").and_then(|v| v.as_integer()).map(i64::from), Some(0));
    }
}
