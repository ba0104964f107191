//! Stream positions as the tokens clients see (`next_batch`, pagination
//! `from`/`to`).

use weft_core::{Error, Result};

/// Parses a pagination token: the stream position the token stands after.
/// Below zero are the positions of history fetched from other servers
/// (backfill), which `/messages` pages through.
pub fn parse_token(token: &str) -> Result<i64> {
    token
        .strip_prefix('s')
        .or_else(|| token.strip_prefix('t'))
        .unwrap_or(token)
        .parse::<i64>()
        .ok()
        .filter(|p| *p > i64::MIN)
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

pub fn make_token(pos: i64) -> String {
    format!("s{pos}")
}

/// Parses a token of a stream reader (`/sync`, device list changes): as
/// [`parse_token`], never below the stream's start.
pub fn parse_stream_token(token: &str) -> Result<i64> {
    Ok(parse_token(token)?.max(0))
}
