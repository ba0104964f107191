//! The media repository (docs/media.md): uploads streamed into the blob
//! store under a random media ID, downloads with byte ranges, cached
//! thumbnails, quotas, quarantine and deletion. Every door (HTTP, CoAP,
//! the admin CLI) goes through these functions.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand::distributions::Alphanumeric;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use weft_core::{Error, ErrorKind, Result, now_ms};
pub use weft_media::thumbnail::Method;
use weft_media::thumbnail::{self, Bounds, ThumbnailError};
use weft_media::{BlobStore, PutError};
use weft_store::{MediaContent, MediaQuery, MediaRecord, MediaUsage, ThumbnailRecord};

use crate::{Services, Session};

/// How often a download of a pending item looks again for its bytes.
const PENDING_POLL: Duration = Duration::from_millis(250);
/// The longest a download waits for a pending item's bytes.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(20);

/// The media repository's own parts of [`Services`].
pub struct Media {
    pub(crate) blobs: Arc<dyn BlobStore>,
    thumbnailing: Semaphore,
}

impl Media {
    pub fn new(blobs: Arc<dyn BlobStore>, thumbnail_concurrency: usize) -> Self {
        Self {
            blobs,
            thumbnailing: Semaphore::new(thumbnail_concurrency.max(1)),
        }
    }
}

/// A media item ready to be read: what to tell the client about it and
/// which blob holds it.
#[derive(Debug, Clone)]
pub struct MediaFile {
    pub content_type: String,
    pub filename: Option<String>,
    pub size: u64,
    sha256: String,
    /// The row's media ID: the ID itself for local media,
    /// `{server}/{id}` for a cached remote item ([`remote_key`]).
    key: String,
}

/// The media row of a cached item of another server: `{server}/{id}`,
/// which no local media ID can be (they have no `/`).
fn remote_key(server: &str, media_id: &str) -> String {
    format!("{server}/{media_id}")
}

/// Whether `id` can be a media ID (the spec's `[A-Za-z0-9_-]`).
fn valid_media_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An open media item or thumbnail.
pub struct MediaStream {
    pub total: u64,
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
}

/// What a client asks a thumbnail to be.
#[derive(Debug, Clone, Copy)]
pub struct ThumbnailSpec {
    pub width: u32,
    pub height: u32,
    pub method: Method,
}

/// The largest thumbnail side served (clients ask for 32 to 800).
const MAX_THUMBNAIL_SIDE: u32 = 2048;

/// The blob store `media.backend` names: `fs` (`media/` in the data
/// directory, the default) or `s3` (spooling uploads in `media/tmp/`).
pub fn open_blobs(config: &weft_core::Config, data_dir: &std::path::Path) -> Result<Arc<dyn BlobStore>> {
    let media = data_dir.join("media");
    let m = &config.media;
    match m.backend.as_str() {
        "fs" => {
            let store = weft_media::FsBlobStore::open(&media)
                .map_err(|e| Error::internal(format!("media directory {}: {e}", media.display())))?;
            Ok(Arc::new(store))
        }
        "s3" => {
            if m.s3_endpoint.is_empty() || m.s3_bucket.is_empty() {
                return Err(Error::internal(
                    "media.backend = \"s3\" needs media.s3_endpoint and media.s3_bucket",
                ));
            }
            let cfg = weft_media::S3Config {
                endpoint: m.s3_endpoint.clone(),
                bucket: m.s3_bucket.clone(),
                region: m.s3_region.clone(),
                access_key_id: m.s3_access_key_id.clone(),
                secret_access_key: m.s3_secret_access_key.clone(),
            };
            let store = weft_media::S3BlobStore::open(&cfg, media.join("tmp"))
                .map_err(|e| Error::internal(format!("media S3 bucket {}: {e}", m.s3_bucket)))?;
            Ok(Arc::new(store))
        }
        other => Err(Error::internal(format!("unknown media.backend {other:?} (fs or s3)"))),
    }
}

fn new_media_id() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

impl Services {
    /// `mxc://{server}/{id}`.
    pub fn mxc(&self, media_id: &str) -> String {
        format!("mxc://{}/{media_id}", self.server_name)
    }

    /// `POST /_matrix/media/v3/upload`: streams `body` into the repository
    /// and answers the new media ID. Over `media.max_upload_bytes` (or the
    /// user's remaining quota): `413 M_TOO_LARGE` and nothing kept.
    pub async fn upload_media(
        &self,
        session: &Session,
        content_type: Option<&str>,
        filename: Option<&str>,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<String> {
        let (content, _gate) = self.store_upload(session, content_type, filename, body).await?;
        let media_id = new_media_id();
        self.store
            .create_media(MediaRecord {
                media_id: media_id.clone(),
                uploader: session.user_id.to_string(),
                created_ms: now_ms(),
                content: Some(content),
                pending_until_ms: None,
                quarantined: false,
            })
            .await?;
        Ok(media_id)
    }

    /// `POST /_matrix/media/v1/create`: a media ID whose bytes come later
    /// (by [`Services::upload_pending_media`]); answers it and until when
    /// it waits. At most `media.max_pending_uploads` wait per user
    /// (`429 M_LIMIT_EXCEEDED`).
    pub async fn create_pending_media(&self, session: &Session) -> Result<(String, u64)> {
        let now = now_ms();
        let usage = self.store.media_usage(session.user_id.as_str(), now).await?;
        if usage.pending >= self.config.media.max_pending_uploads {
            return Err(Error::new(
                ErrorKind::LimitExceeded { retry_after_ms: 60_000 },
                "Too many media IDs waiting for their upload",
            ));
        }
        let until = now.saturating_add(self.config.media.pending_ttl_secs.saturating_mul(1000));
        let media_id = new_media_id();
        self.store
            .create_media(MediaRecord {
                media_id: media_id.clone(),
                uploader: session.user_id.to_string(),
                created_ms: now,
                content: None,
                pending_until_ms: Some(until),
                quarantined: false,
            })
            .await?;
        Ok((media_id, until))
    }

    /// `PUT /_matrix/media/v3/upload/{server}/{id}`: the bytes of a media
    /// ID from [`Services::create_pending_media`]. Only its creator, only
    /// within its time (`403 M_FORBIDDEN`), only once (`409
    /// M_CANNOT_OVERWRITE_MEDIA`).
    pub async fn upload_pending_media(
        &self,
        session: &Session,
        server: &str,
        media_id: &str,
        content_type: Option<&str>,
        filename: Option<&str>,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<()> {
        let item = self.local_item(server, media_id).await?;
        if item.uploader != session.user_id.as_str() {
            return Err(Error::forbidden("This media ID is not yours to upload to"));
        }
        if item.content.is_some() {
            return Err(Error::new(
                ErrorKind::CannotOverwriteMedia,
                "This media ID already has its content",
            ));
        }
        if item.pending_until_ms.is_none_or(|t| t < now_ms()) {
            return Err(Error::forbidden("This media ID expired before its upload"));
        }
        let (content, _gate) = self.store_upload(session, content_type, filename, body).await?;
        if self
            .store
            .complete_media(media_id, session.user_id.as_str(), content.clone(), now_ms())
            .await?
        {
            return Ok(());
        }
        // Another upload to the same ID won, or the time ran out meanwhile.
        // The blob stays: equal bytes may be another item's.
        match self.store.media(media_id).await?.and_then(|m| m.content) {
            Some(_) => Err(Error::new(
                ErrorKind::CannotOverwriteMedia,
                "This media ID already has its content",
            )),
            None => Err(Error::forbidden("This media ID expired before its upload")),
        }
    }

    /// Streams an upload into the blob store within the size limit and
    /// the uploader's quota, then takes the blob gate (shared, for every
    /// process: [`weft_store::MediaStore::blob_gate`]) for the caller to
    /// hold until its row names the blob. The gate is not held while the
    /// bytes come in (a slow client would hold it, and the connection
    /// behind it, for as long as it likes): a deletion may have removed
    /// an equal blob meanwhile, which the check under the gate finds
    /// (`503`: the client sends the upload again).
    async fn store_upload(
        &self,
        session: &Session,
        content_type: Option<&str>,
        filename: Option<&str>,
        body: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<(MediaContent, weft_store::BlobGate)> {
        crate::text::check_opt_text("Content-Type", content_type)?;
        crate::text::check_opt_text("filename", filename)?;
        let cfg = &self.config.media;
        let mut limit = cfg.max_upload_bytes;
        let mut quota_bound = false;
        if cfg.quota_bytes_per_user > 0 {
            let used = self.store.media_usage(session.user_id.as_str(), now_ms()).await?.bytes;
            let left = cfg.quota_bytes_per_user.saturating_sub(used);
            if left < limit {
                limit = left;
                quota_bound = true;
            }
        }
        let blob = match self.media.blobs.put(body, limit).await {
            Ok(b) => b,
            Err(PutError::TooLarge(_)) if quota_bound => {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "Over your media quota of {} bytes: {limit} bytes left",
                        cfg.quota_bytes_per_user
                    ),
                ));
            }
            Err(PutError::TooLarge(n)) => {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!("Uploads are limited to {n} bytes"),
                ));
            }
            Err(PutError::Io(e)) => {
                // Most often the client went away mid-upload.
                return Err(Error::bad_json(format!("The upload could not be read: {e}")));
            }
        };
        let gate = self.store.blob_gate(false).await?;
        match self.media.blobs.size(&blob.sha256).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Error::new(
                    ErrorKind::Unknown,
                    "Equal bytes were deleted while this upload came in: send it again",
                )
                .with_status(503));
            }
            Err(e) => return Err(Error::internal(format!("media blob store: {e}"))),
        }
        let content = MediaContent {
            sha256: blob.sha256,
            size: blob.size,
            content_type: content_type.map(str::to_owned),
            filename: filename.map(str::to_owned),
        };
        Ok((content, gate))
    }

    /// A local media item, or `404 M_NOT_FOUND` (also for other servers'
    /// media: [`Services::media_file`] fetches those).
    async fn local_item(&self, server: &str, media_id: &str) -> Result<MediaRecord> {
        if server != self.server_name.as_str() {
            return Err(Error::not_found("No such media on this server"));
        }
        match self.store.media(media_id).await? {
            Some(m) if !m.quarantined => Ok(m),
            _ => Err(Error::not_found("No such media")),
        }
    }

    /// The item behind `mxc://{server}/{id}`, waiting up to `wait` for the
    /// bytes of one still pending (`504 M_NOT_YET_UPLOADED` after). Media
    /// of another server comes from this server's cache, or is fetched
    /// from its server over federation and kept ([`Services::remote_media_file`]).
    pub async fn media_file(&self, server: &str, media_id: &str, wait: Duration) -> Result<MediaFile> {
        if server != self.server_name.as_str() {
            return self.remote_media_file(server, media_id, wait).await;
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_PENDING_WAIT);
        loop {
            let item = self.local_item(server, media_id).await?;
            if let Some(c) = item.content {
                return Ok(MediaFile {
                    content_type: c.content_type.unwrap_or_else(|| "application/octet-stream".into()),
                    filename: c.filename,
                    size: c.size,
                    sha256: c.sha256,
                    key: item.media_id,
                });
            }
            if item.pending_until_ms.is_none_or(|t| t < now_ms()) {
                return Err(Error::not_found("No such media"));
            }
            if tokio::time::Instant::now() + PENDING_POLL > deadline {
                return Err(Error::new(
                    ErrorKind::NotYetUploaded,
                    "The media has not been uploaded yet",
                ));
            }
            tokio::time::sleep(PENDING_POLL).await;
        }
    }

    /// Opens `file` at `range` (inclusive, within the file: the caller
    /// checked it against `file.size`).
    pub async fn media_read(&self, file: &MediaFile, range: Option<(u64, u64)>) -> Result<MediaStream> {
        match self.media.blobs.read(&file.sha256, range).await {
            Ok(Some(r)) => Ok(MediaStream {
                total: r.total,
                reader: r.reader,
            }),
            Ok(None) => Err(Error::not_found("The media's content is gone")),
            Err(e) => Err(Error::internal(format!("media read: {e}"))),
        }
    }

    /// A thumbnail of the item, generated on first request and kept.
    /// Images of other types, or larger than
    /// `media.max_thumbnail_source_bytes`, or hostile (bombs), are refused
    /// with `400 M_UNKNOWN`... as the spec has no better code; a bad size
    /// is `400 M_INVALID_PARAM`.
    pub async fn media_thumbnail(
        &self,
        server: &str,
        media_id: &str,
        spec: ThumbnailSpec,
        wait: Duration,
    ) -> Result<MediaFile> {
        if spec.width == 0 || spec.height == 0 || spec.width > MAX_THUMBNAIL_SIDE || spec.height > MAX_THUMBNAIL_SIDE {
            return Err(Error::invalid_param(format!(
                "width and height must be between 1 and {MAX_THUMBNAIL_SIDE}"
            )));
        }
        let file = self.media_file(server, media_id, wait).await?;
        let method = match spec.method {
            Method::Scale => "scale",
            Method::Crop => "crop",
        };
        let cached = |t: ThumbnailRecord| MediaFile {
            content_type: t.content_type,
            filename: None,
            size: t.size,
            sha256: t.sha256,
            key: file.key.clone(),
        };
        let media_id = file.key.as_str();
        if let Some(t) = self.store.thumbnail(media_id, spec.width, spec.height, method).await? {
            return Ok(cached(t));
        }
        if !thumbnail::can_thumbnail(&file.content_type) {
            return Err(Error::new(ErrorKind::Unknown, "This media cannot be thumbnailed").with_status(400));
        }
        if file.size > self.config.media.max_thumbnail_source_bytes {
            return Err(Error::new(ErrorKind::Unknown, "This image is too large to thumbnail").with_status(400));
        }
        let _permit = self
            .media
            .thumbnailing
            .acquire()
            .await
            .map_err(|_| Error::internal("thumbnailing stopped"))?;
        // Another request may have made it while this one waited.
        if let Some(t) = self.store.thumbnail(media_id, spec.width, spec.height, method).await? {
            return Ok(cached(t));
        }
        let mut source = Vec::with_capacity(usize::try_from(file.size).unwrap_or(0));
        self.media_read(&file, None)
            .await?
            .reader
            .read_to_end(&mut source)
            .await
            .map_err(|e| Error::internal(format!("media read: {e}")))?;
        let made = tokio::task::spawn_blocking(move || {
            thumbnail::thumbnail(&source, spec.width, spec.height, spec.method, Bounds::default())
        })
        .await
        .map_err(|e| Error::internal(format!("thumbnailer: {e}")))?;
        let thumb = match made {
            Ok(t) => t,
            Err(e @ (ThumbnailError::Unsupported | ThumbnailError::TooLarge(..) | ThumbnailError::Broken(_))) => {
                return Err(
                    Error::new(ErrorKind::Unknown, format!("Cannot thumbnail this image: {e}")).with_status(400),
                );
            }
            Err(ThumbnailError::BadSize) => return Err(Error::invalid_param("width and height must be positive")),
        };
        let _gate = self.store.blob_gate(false).await?;
        let blob = self
            .media
            .blobs
            .put(&mut &thumb.bytes[..], u64::MAX)
            .await
            .map_err(|e| Error::internal(format!("thumbnail store: {e}")))?;
        let record = ThumbnailRecord {
            media_id: media_id.to_owned(),
            width: spec.width,
            height: spec.height,
            method: method.to_owned(),
            sha256: blob.sha256,
            size: blob.size,
            content_type: thumb.content_type.to_owned(),
        };
        self.store.put_thumbnail(record.clone()).await?;
        Ok(cached(record))
    }

    /// What `user` keeps in the repository.
    pub async fn media_usage(&self, user: &str) -> Result<MediaUsage> {
        self.store.media_usage(user, now_ms()).await
    }

    /// Media items, newest first (for `weft media list` and a user's own
    /// list).
    pub async fn list_media(&self, query: MediaQuery) -> Result<Vec<MediaRecord>> {
        self.store.list_media(query).await
    }

    /// Quarantines (or releases) an item: a quarantined item is served to
    /// no one (`404`). Answers whether the item exists.
    pub async fn quarantine_media(&self, media_id: &str, quarantined: bool) -> Result<bool> {
        self.store.set_quarantined(media_id, quarantined).await
    }

    /// Deletes items, their thumbnails and the blobs no other item uses.
    pub async fn delete_media(&self, media_ids: Vec<String>) -> Result<usize> {
        let n = media_ids.len();
        let _gate = self.store.blob_gate(true).await?;
        let unused = self.store.delete_media(media_ids).await?;
        for sha in unused {
            if let Err(e) = self.media.blobs.delete(&sha).await {
                tracing::warn!(%sha, "media blob not deleted: {e}");
            }
        }
        Ok(n)
    }

    /// Deletes the items created more than `older_than_ms` ago and/or
    /// uploaded by `uploader` (at least one of the two must be given).
    pub async fn purge_media(&self, older_than_ms: Option<u64>, uploader: Option<String>) -> Result<usize> {
        if older_than_ms.is_none() && uploader.is_none() {
            return Err(Error::invalid_param("Say which media: --older-than, --user, or both"));
        }
        let before_ms = older_than_ms.map(|age| now_ms().saturating_sub(age));
        let mut deleted = 0;
        loop {
            let batch = self
                .store
                .list_media(MediaQuery {
                    uploader: uploader.clone(),
                    // With only a user, everything of theirs (up to now).
                    before_ms: Some(before_ms.unwrap_or(u64::MAX)),
                    limit: 500,
                })
                .await?;
            if batch.is_empty() {
                return Ok(deleted);
            }
            deleted += self
                .delete_media(batch.into_iter().map(|m| m.media_id).collect())
                .await?;
        }
    }

    /// The media ID of `mxc://{this server}/{id}`, or of a bare ID.
    pub fn local_media_id(&self, media: &str) -> Result<String> {
        let id = match media.strip_prefix("mxc://") {
            Some(rest) => {
                let (server, id) = rest
                    .split_once('/')
                    .ok_or_else(|| Error::invalid_param(format!("{media} is not an mxc:// URI")))?;
                if server != self.server_name.as_str() {
                    return Err(Error::invalid_param(format!("{media} is not media of this server")));
                }
                id
            }
            None => media,
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(Error::invalid_param(format!("{media} is not a media ID")));
        }
        Ok(id.to_owned())
    }
}

/// For other servers a pending item does not exist yet: `404`.
fn pending_is_missing(e: Error) -> Error {
    match e.kind {
        ErrorKind::NotYetUploaded => Error::not_found("No such media"),
        _ => e,
    }
}

/// What the federation media endpoints answer: a local item's bytes and
/// what to say about them.
pub struct FederationMedia {
    pub bytes: Vec<u8>,
    pub content_type: String,
    pub filename: Option<String>,
}

impl Services {
    /// An item of another server: from the cache (a row keyed
    /// `{server}/{id}`), else fetched from `server` over federation
    /// (signed, at most `media.max_upload_bytes`), kept in the blob store
    /// and the cache. A remote that is down or answers garbage: `502`; one
    /// that has no such item, or `[federation] enabled` off: `404
    /// M_NOT_FOUND`.
    pub async fn remote_media_file(&self, server: &str, media_id: &str, wait: Duration) -> Result<MediaFile> {
        if !self.config.federation.enabled {
            return Err(Error::not_found(
                "Media of other servers is not fetched: federation is off on this server",
            ));
        }
        let name = ruma::ServerName::parse(server).map_err(|_| Error::not_found("No such media"))?;
        if !valid_media_id(media_id) {
            return Err(Error::not_found("No such media"));
        }
        let key = remote_key(server, media_id);
        if let Some(file) = self.cached_remote(&key).await? {
            return Ok(file);
        }
        use ruma::api::federation::authenticated_media::{FileOrLocation, get_content};
        let mut request = get_content::v1::Request::new(media_id.to_owned());
        request.timeout_ms = wait.min(MAX_PENDING_WAIT);
        let max = self.config.media.max_upload_bytes;
        // The multipart framing and the metadata part on top of the bytes.
        let cap = usize::try_from(max.saturating_add(64 * 1024)).unwrap_or(usize::MAX);
        let answer = self.federation.client.send_capped(&name, request, cap).await?;
        let content = match answer.content {
            FileOrLocation::File(c) => c,
            FileOrLocation::Location(_) => {
                return Err(Error::new(
                    ErrorKind::RemoteUnreachable,
                    format!("{server} answered with a redirect for its media, which Weft does not follow"),
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::RemoteUnreachable,
                    format!("{server} answered with media Weft cannot read"),
                ));
            }
        };
        if content.file.len() as u64 > max {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("{server}'s media is larger than this server's limit of {max} bytes"),
            )
            .with_status(502));
        }
        let filename = content.content_disposition.and_then(|d| d.filename);
        let _gate = self.store.blob_gate(false).await?;
        let blob = self
            .media
            .blobs
            .put(&mut &content.file[..], max)
            .await
            .map_err(|e| Error::internal(format!("remote media store: {e}")))?;
        let record = MediaRecord {
            media_id: key.clone(),
            uploader: server.to_owned(),
            created_ms: now_ms(),
            content: Some(MediaContent {
                sha256: blob.sha256,
                size: blob.size,
                content_type: content.content_type,
                filename,
            }),
            pending_until_ms: None,
            quarantined: false,
        };
        if let Err(e) = self.store.create_media(record).await {
            // Another request for the same item stored it first.
            if let Some(file) = self.cached_remote(&key).await? {
                return Ok(file);
            }
            return Err(e);
        }
        self.cached_remote(&key)
            .await?
            .ok_or_else(|| Error::not_found("No such media"))
    }

    /// The cached remote item stored under `key`; a quarantined one is
    /// `404`.
    async fn cached_remote(&self, key: &str) -> Result<Option<MediaFile>> {
        match self.store.media(key).await? {
            Some(m) if m.quarantined => Err(Error::not_found("No such media")),
            Some(MediaRecord {
                media_id,
                content: Some(c),
                ..
            }) => Ok(Some(MediaFile {
                content_type: c.content_type.unwrap_or_else(|| "application/octet-stream".into()),
                filename: c.filename,
                size: c.size,
                sha256: c.sha256,
                key: media_id,
            })),
            _ => Ok(None),
        }
    }

    /// `GET /_matrix/federation/v1/media/download/{mediaId}`: a local
    /// item for another server (cached remote items are not passed on:
    /// `404`, as are quarantined, pending and unknown ones).
    pub async fn federation_media(&self, media_id: &str) -> Result<FederationMedia> {
        if !valid_media_id(media_id) {
            return Err(Error::not_found("No such media"));
        }
        let file = self
            .media_file(self.server_name.as_str(), media_id, Duration::ZERO)
            .await
            .map_err(pending_is_missing)?;
        self.federation_bytes(file).await
    }

    /// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`: a thumbnail
    /// of a local item, made and kept as for clients.
    pub async fn federation_thumbnail(&self, media_id: &str, spec: ThumbnailSpec) -> Result<FederationMedia> {
        if !valid_media_id(media_id) {
            return Err(Error::not_found("No such media"));
        }
        let file = self
            .media_thumbnail(self.server_name.as_str(), media_id, spec, Duration::ZERO)
            .await
            .map_err(pending_is_missing)?;
        self.federation_bytes(file).await
    }

    async fn federation_bytes(&self, file: MediaFile) -> Result<FederationMedia> {
        let mut bytes = Vec::with_capacity(usize::try_from(file.size).unwrap_or(0));
        self.media_read(&file, None)
            .await?
            .reader
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| Error::internal(format!("media read: {e}")))?;
        Ok(FederationMedia {
            bytes,
            content_type: file.content_type,
            filename: file.filename,
        })
    }
}
