//! CBOR ⇄ JSON for the CoAP door.
//!
//! Decoding is written by hand rather than through `ciborium::Value`
//! because the door needs to know the width a float was sent with: a
//! reading encoded as a single-precision `21.3` must become the string
//! `"21.3"` (the shortest text that round-trips at that width), not the
//! `"21.299999237060547"` that widening to `f64` first would give. Matrix
//! event content is canonical JSON, which has no floats, so every CBOR
//! float becomes such a string, as the docs say for doors; integers beyond
//! ±(2^53−1) become decimal strings too. Encoding responses (JSON values,
//! which never hold floats here) goes through `ciborium`.

use base64::Engine;
use serde_json::{Map, Value};

/// Nesting deeper than this is refused (no stack exhaustion on hostile input).
const MAX_DEPTH: usize = 64;
const MAX_SAFE: i128 = (1i128 << 53) - 1;

#[derive(Debug, PartialEq, Eq)]
pub struct CborError(pub String);

impl std::fmt::Display for CborError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(m: &str) -> Result<T, CborError> {
    Err(CborError(m.to_owned()))
}

/// Decodes one CBOR data item (the whole payload) into JSON.
pub fn to_json(bytes: &[u8]) -> Result<Value, CborError> {
    to_json_with_keys(bytes).map(|(v, _)| v)
}

/// Like [`to_json`]; integer map keys in MSC3079's table become their
/// names (a string key wins over the same key as an integer). Also says
/// whether any such integer key was seen.
pub fn to_json_with_keys(bytes: &[u8]) -> Result<(Value, bool), CborError> {
    let mut d = Decoder {
        b: bytes,
        i: 0,
        int_keys: false,
    };
    let v = d.item(0)?;
    if d.i != bytes.len() {
        return err("trailing bytes after the CBOR item");
    }
    Ok((v, d.int_keys))
}

/// Encodes a JSON value as CBOR.
pub fn from_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail for a JSON value.
    let _ = ciborium::into_writer(v, &mut out);
    out
}

/// The shortest decimal text that reads back as the same float at the
/// width it was sent with.
pub fn float_text(v: f64, width: u8) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    match width {
        2 => {
            let h = half::f16::from_f64(v);
            // Find the fewest significant digits that round-trip at half
            // precision, then print that decimal plainly.
            for p in 0..6 {
                let s = format!("{v:.p$e}");
                if let Ok(x) = s.parse::<f64>()
                    && half::f16::from_f64(x).to_bits() == h.to_bits()
                {
                    return format!("{x}");
                }
            }
            format!("{}", h.to_f32())
        }
        4 => format!("{}", v as f32),
        _ => format!("{v}"),
    }
}

struct Decoder<'a> {
    b: &'a [u8],
    i: usize,
    int_keys: bool,
}

impl Decoder<'_> {
    fn byte(&mut self) -> Result<u8, CborError> {
        let x = *self.b.get(self.i).ok_or_else(|| CborError("truncated CBOR".into()))?;
        self.i += 1;
        Ok(x)
    }

    fn take(&mut self, n: u64) -> Result<&[u8], CborError> {
        let n = usize::try_from(n).map_err(|_| CborError("CBOR length too large".into()))?;
        if self.b.len() - self.i < n {
            return err("truncated CBOR");
        }
        let s = &self.b[self.i..self.i + n];
        self.i += n;
        Ok(s)
    }

    /// The next `N` bytes as an array (fixed-width numbers).
    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], CborError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn uint(&mut self, info: u8) -> Result<Option<u64>, CborError> {
        Ok(Some(match info {
            0..=23 => info as u64,
            24 => self.byte()? as u64,
            25 => u16::from_be_bytes(self.take_array::<2>()?) as u64,
            26 => u32::from_be_bytes(self.take_array::<4>()?) as u64,
            27 => u64::from_be_bytes(self.take_array::<8>()?),
            31 => return Ok(None),
            _ => return err("invalid CBOR additional information"),
        }))
    }

    fn is_break(&mut self) -> bool {
        if self.b.get(self.i) == Some(&0xff) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn string(&mut self, major: u8, len: Option<u64>) -> Result<Vec<u8>, CborError> {
        match len {
            Some(n) => Ok(self.take(n)?.to_vec()),
            None => {
                let mut out = Vec::new();
                while !self.is_break() {
                    let ib = self.byte()?;
                    if ib >> 5 != major || ib & 0x1f == 31 {
                        return err("invalid chunk in indefinite-length string");
                    }
                    let n = self.uint(ib & 0x1f)?;
                    // Chunks are definite-length (checked above): no recursion.
                    out.extend(self.string(major, n)?);
                }
                Ok(out)
            }
        }
    }

    fn int(n: i128) -> Value {
        if (-MAX_SAFE..=MAX_SAFE).contains(&n) {
            Value::from(n as i64)
        } else {
            Value::String(n.to_string())
        }
    }

    fn item(&mut self, depth: usize) -> Result<Value, CborError> {
        if depth > MAX_DEPTH {
            return err("CBOR nested too deeply");
        }
        let ib = self.byte()?;
        let (major, info) = (ib >> 5, ib & 0x1f);
        if major == 7 {
            return match info {
                20 => Ok(Value::Bool(false)),
                21 => Ok(Value::Bool(true)),
                22 | 23 => Ok(Value::Null),
                24 => {
                    self.byte()?;
                    Ok(Value::Null)
                }
                25 => {
                    let h = half::f16::from_bits(u16::from_be_bytes(self.take_array::<2>()?));
                    Ok(Value::String(float_text(h.to_f64(), 2)))
                }
                26 => {
                    let f = f32::from_be_bytes(self.take_array::<4>()?);
                    Ok(Value::String(float_text(f as f64, 4)))
                }
                27 => {
                    let f = f64::from_be_bytes(self.take_array::<8>()?);
                    Ok(Value::String(float_text(f, 8)))
                }
                0..=19 => Ok(Value::Null),
                _ => err("unexpected CBOR simple value or break"),
            };
        }
        let arg = self.uint(info)?;
        match major {
            0 => Ok(Self::int(
                arg.ok_or_else(|| CborError("indefinite integer".into()))? as i128
            )),
            1 => Ok(Self::int(
                -1 - arg.ok_or_else(|| CborError("indefinite integer".into()))? as i128,
            )),
            2 => {
                // Byte strings holding UTF-8 are taken as text: encoders such
                // as Perl's CBOR::XS (the talk's example) emit ASCII strings
                // as byte strings. Other bytes become base64.
                let bytes = self.string(2, arg)?;
                Ok(Value::String(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                }))
            }
            3 => {
                let bytes = self.string(3, arg)?;
                String::from_utf8(bytes)
                    .map(Value::String)
                    .map_err(|_| CborError("CBOR text string is not UTF-8".into()))
            }
            4 => {
                let mut out = Vec::new();
                match arg {
                    Some(n) => {
                        for _ in 0..n {
                            out.push(self.item(depth + 1)?);
                        }
                    }
                    None => {
                        while !self.is_break() {
                            out.push(self.item(depth + 1)?);
                        }
                    }
                }
                Ok(Value::Array(out))
            }
            5 => {
                let mut out = Map::new();
                let mut entry = |d: &mut Self| -> Result<(), CborError> {
                    let k = d.item(depth + 1)?;
                    let v = d.item(depth + 1)?;
                    match k {
                        Value::String(s) => {
                            out.insert(s, v);
                        }
                        Value::Number(n) => match n.as_i64().and_then(|i| crate::msc3079::key_name(i.into())) {
                            Some(name) => {
                                d.int_keys = true;
                                out.entry(name.to_owned()).or_insert(v);
                            }
                            None => {
                                out.insert(n.to_string(), v);
                            }
                        },
                        Value::Bool(b) => {
                            out.insert(b.to_string(), v);
                        }
                        _ => return err("unsupported CBOR map key"),
                    }
                    Ok(())
                };
                match arg {
                    Some(n) => {
                        for _ in 0..n {
                            entry(self)?;
                        }
                    }
                    None => {
                        while !self.is_break() {
                            entry(self)?;
                        }
                    }
                }
                Ok(Value::Object(out))
            }
            6 => {
                // Tags: keep the tagged value (bignums stay base64 bytes).
                self.item(depth + 1)
            }
            _ => err("invalid CBOR"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn floats_become_shortest_strings_at_their_width() {
        assert_eq!(float_text(21.5, 8), "21.5");
        assert_eq!(float_text(21.3f32 as f64, 4), "21.3");
        assert_eq!(float_text(0.1, 8), "0.1");
        assert_eq!(float_text(half::f16::from_f64(0.1).to_f64(), 2), "0.1");
        assert_eq!(float_text(-0.0, 8), "-0");
        // f64 in a CBOR map
        let mut m = std::collections::BTreeMap::new();
        m.insert("t", 21.25f64);
        assert_eq!(to_json(&enc(&m)).unwrap(), json!({"t": "21.25"}));
        // f32 in a CBOR map: 0xfa
        let bytes = [0xa1, 0x61, b't', 0xfa, 0x41, 0xaa, 0x66, 0x66];
        assert_eq!(to_json(&bytes).unwrap(), json!({"t": "21.3"}));
        // half: 0xf9 0x3c00 = 1.0
        assert_eq!(to_json(&[0xf9, 0x3c, 0x00]).unwrap(), json!("1"));
    }

    #[test]
    fn maps_ints_and_round_trip() {
        let v = json!({"msgtype": "m.text", "body": "hello", "n": -3, "a": [1, true, null], "o": {"x": "y"}});
        assert_eq!(to_json(&from_json(&v)).unwrap(), v);
        // 2^60 is beyond canonical JSON: becomes a string.
        assert_eq!(to_json(&enc(&(1u64 << 60))).unwrap(), json!("1152921504606846976"));
        // indefinite map {_ "a": 1}
        assert_eq!(to_json(&[0xbf, 0x61, b'a', 0x01, 0xff]).unwrap(), json!({"a": 1}));
        // The printf form in docs/coap.md.
        let b = b"\xa2\x67msgtype\x66m.text\x64body\x65hello";
        assert_eq!(to_json(b).unwrap(), json!({"msgtype": "m.text", "body": "hello"}));
        // Byte strings: UTF-8 taken as text (CBOR::XS), others base64.
        assert_eq!(to_json(&[0x42, b'h', b'i']).unwrap(), json!("hi"));
        assert_eq!(to_json(&[0x42, 0xff, 0x00]).unwrap(), json!("/wA="));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[][..],
            &[0xa1][..],
            &[0x7b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0x1c][..],
            &[0xa1, 0x61, b'a'][..],
            &[0x61, 0xff][..],
            &[0x01, 0x02][..],
        ] {
            assert!(to_json(bad).is_err(), "{bad:?}");
        }
        let deep = vec![0x81u8; 10_000];
        assert!(to_json(&deep).is_err());
    }
}
