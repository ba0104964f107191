//! The storage interface every backend implements: the data directory
//! today, an S3-compatible bucket for several processes (docs/media.md).

use std::io;

use async_trait::async_trait;
use tokio::io::AsyncRead;

/// A stored blob: the lowercase hex SHA-256 of its bytes names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub sha256: String,
    pub size: u64,
}

/// An open blob, positioned at the start of the requested range.
pub struct BlobRead {
    /// The whole blob's length.
    pub total: u64,
    /// The bytes of the requested range (or the whole blob).
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The body was longer than allowed; nothing was kept.
    #[error("the upload is larger than {0} bytes")]
    TooLarge(u64),
    /// Reading the body failed (the client went away) or writing failed;
    /// nothing was kept.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Content-addressed blob storage. A put is atomic: a reader never sees a
/// half-written blob, and a crash or a failed or oversized upload leaves
/// no blob behind. Equal bytes are kept once.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Streams `body` into the store, reading at most `max_bytes` bytes
    /// (one more and the put fails with [`PutError::TooLarge`]).
    async fn put(&self, body: &mut (dyn AsyncRead + Send + Unpin), max_bytes: u64) -> Result<Blob, PutError>;

    /// Opens the blob named `sha256`; `range` is an inclusive byte range
    /// already checked against the blob's length by the caller, or `None`
    /// for the whole blob. `Ok(None)`: no such blob.
    async fn read(&self, sha256: &str, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>>;

    /// The length of the blob, `None` if absent.
    async fn size(&self, sha256: &str) -> io::Result<Option<u64>>;

    /// Deletes the blob (no error if absent). The caller makes sure no
    /// media item still names it.
    async fn delete(&self, sha256: &str) -> io::Result<()>;
}

/// Whether `s` can name a blob: 64 lowercase hex digits. Everything that
/// turns a name into a path or key checks this first.
pub(crate) fn valid_name(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
