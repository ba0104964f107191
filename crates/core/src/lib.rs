//! Shared vocabulary of Weft: the one error type every layer returns (mapped to
//! Matrix `errcode` + HTTP status here, once), the typed configuration, and
//! small helpers. It depends on nothing of ours and does no I/O beyond reading
//! the config file.

pub mod config;
pub mod error;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};

/// Milliseconds since the Unix epoch, as Matrix timestamps are.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
