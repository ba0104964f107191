//! Rows of the media repository: which media ID names which blob, who
//! uploaded it, and its thumbnails. The bytes themselves are the media
//! crate's (`weft-media`).

use async_trait::async_trait;

use crate::Result;

/// One media item (`mxc://{server}/{media_id}`), local to this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRecord {
    pub media_id: String,
    pub uploader: String,
    pub created_ms: u64,
    /// `None` while an asynchronous upload (`/media/v1/create`) waits for
    /// its bytes.
    pub content: Option<MediaContent>,
    /// Until when a pending item may receive its bytes.
    pub pending_until_ms: Option<u64>,
    pub quarantined: bool,
}

/// What an uploaded item holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaContent {
    pub sha256: String,
    pub size: u64,
    pub content_type: Option<String>,
    pub filename: Option<String>,
}

/// A stored thumbnail of a media item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThumbnailRecord {
    pub media_id: String,
    pub width: u32,
    pub height: u32,
    /// `scale` or `crop`.
    pub method: String,
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
}

/// Which media items to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct MediaQuery {
    pub uploader: Option<String>,
    /// Only items created before this time.
    pub before_ms: Option<u64>,
    pub limit: usize,
}

/// What one user keeps in the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaUsage {
    /// Uploaded items.
    pub items: u64,
    /// Their bytes (each item counted, even when its blob is shared).
    pub bytes: u64,
    /// Items created but not uploaded yet, within their time.
    pub pending: u64,
}

/// The whole repository in numbers (`weft media stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MediaStats {
    /// Uploaded items and their bytes (each item counted).
    pub items: u64,
    pub bytes: u64,
    /// Distinct blobs of items and their bytes (what the disk holds,
    /// thumbnails aside).
    pub blobs: u64,
    pub blob_bytes: u64,
    pub thumbnails: u64,
    pub thumbnail_bytes: u64,
    pub quarantined: u64,
    /// Created items still waiting for their bytes (expired ones too).
    pub pending: u64,
}

/// Which of a room's files to read, newest first.
#[derive(Debug, Clone, Default)]
pub struct RoomFilesQuery {
    /// Only events before this stream position.
    pub before_position: i64,
    /// Only files whose `info.mimetype` starts with this (`image/`).
    pub mimetype_prefix: Option<String>,
    /// Only events sent at or after / before these times (ms).
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: usize,
}

/// A hold on the blob gate ([`MediaStore::blob_gate`]): released when
/// dropped.
pub struct BlobGate(pub Box<dyn Send + Sync>);

#[async_trait]
pub trait MediaStore: Send + Sync + 'static {
    /// Records a new item (uploaded or pending).
    async fn create_media(&self, media: MediaRecord) -> Result<()>;
    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>>;
    /// Gives a pending item its bytes, if it is `uploader`'s, still pending
    /// and within its time at `now_ms`: answers whether it did.
    async fn complete_media(&self, media_id: &str, uploader: &str, content: MediaContent, now_ms: u64) -> Result<bool>;
    async fn media_usage(&self, uploader: &str, now_ms: u64) -> Result<MediaUsage>;
    async fn list_media(&self, query: MediaQuery) -> Result<Vec<MediaRecord>>;
    async fn set_quarantined(&self, media_id: &str, quarantined: bool) -> Result<bool>;
    /// Deletes items and their thumbnails; answers the blobs no row names
    /// any longer (the caller deletes those from the blob store).
    async fn delete_media(&self, media_ids: Vec<String>) -> Result<Vec<String>>;
    /// Takes the blob gate, for every process on the database: uploads
    /// hold it shared from storing their blob until their row names it,
    /// deletions alone from deleting rows until the blobs they left unused
    /// are gone, so a deletion never removes a blob an upload of the same
    /// bytes (through any process) is about to name. Released when the
    /// answer is dropped. SQLite: a lock in the one process; PostgreSQL: a
    /// session advisory lock on a connection of its own (a process that
    /// dies releases it with its connection).
    async fn blob_gate(&self, exclusive: bool) -> Result<BlobGate>;
    async fn thumbnail(&self, media_id: &str, width: u32, height: u32, method: &str)
    -> Result<Option<ThumbnailRecord>>;
    async fn put_thumbnail(&self, thumbnail: ThumbnailRecord) -> Result<()>;
    async fn media_stats(&self) -> Result<MediaStats>;
    /// Message events of a room that carry a file (`content.url`), not
    /// redacted, newest first.
    async fn room_files(&self, room_id: &str, query: RoomFilesQuery) -> Result<Vec<crate::StoredEvent>>;
}
