//! Device readings carry decimals (`21.50`); canonical JSON, which Matrix
//! events use, has no floats. Weft's doors and `weft-bridge-mqtt` keep such
//! numbers as strings of exactly the digits sent. One crate so both apply
//! the same rule (the bridge does not depend on the server's crates).

/// Rewrites a JSON text so that every number with a fraction or exponent
/// (or an integer beyond canonical JSON's ±(2^53−1), or `-0`) becomes a string
/// holding exactly the digits the device sent: `{"t": 21.50}` becomes
/// `{"t": "21.50"}`. Doors (CoAP, MQTT, WebSocket) accept readings this
/// way; the HTTP Client-Server API keeps refusing floats as the spec says.
///
/// Written by hand because a parse-then-print round trip through `f64`
/// would lose the exact decimal text (`21.50`, `0.1000000000000000055`).
pub fn quote_non_canonical_numbers(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let mut i = 0;
    let mut last = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string, honouring escapes.
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
                // `-0` is quoted too: serde_json reads it as the float -0.0.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_become_exact_strings_and_integers_stay() {
        let t = r#"{"a": 21.50, "b": -3, "c": [1e3, "x\"1.5", 7], "d": 9007199254740993, "e": {"f": -0.0}}"#;
        let v: serde_json::Value = serde_json::from_str(&quote_non_canonical_numbers(t)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": "21.50", "b": -3, "c": ["1e3", "x\"1.5", 7], "d": "9007199254740993", "e": {"f": "-0.0"}})
        );
    }
}
