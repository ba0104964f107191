//! Stream positions as the tokens clients see (`next_batch`, pagination
//! `from`/`to`).

use weft_core::{Error, Result};

/// Parses a pagination token: the stream position the token stands after.
pub fn parse_token(token: &str) -> Result<i64> {
    token
        .strip_prefix('s')
        .or_else(|| token.strip_prefix('t'))
        .unwrap_or(token)
        .parse::<i64>()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

pub fn make_token(pos: i64) -> String {
    format!("s{pos}")
}
