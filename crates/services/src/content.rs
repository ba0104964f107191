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
