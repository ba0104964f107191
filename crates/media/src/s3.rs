//! Blobs in an S3-compatible bucket (`media.backend = "s3"`), for several
//! Weft processes sharing one deployment: key `blobs/<sha256>`. An upload
//! is spooled to the local `media/tmp/` while it is hashed (so its name is
//! known before it is stored and an oversized one never reaches the
//! bucket), then put: whole when small, as a multipart upload when large.
//! S3 makes an object visible only once complete, so no reader sees half
//! a blob. The client is the Apache Arrow project's `object_store` crate
//! (maintained, S3 signing and multipart built in).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::blob::{Blob, BlobRead, BlobStore, PutError, valid_name};
use crate::fs::{Spooled, make_dirs, spool};

/// Uploads up to this size are one PUT; larger ones go in parts of it.
const PART: usize = 8 * 1024 * 1024;

/// Where the bucket is and how to sign for it.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `https://s3.example.org` or `http://127.0.0.1:9000`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

pub struct S3BlobStore {
    store: Arc<dyn ObjectStore>,
    tmp: PathBuf,
}

fn key(sha256: &str) -> Key {
    Key::from(format!("blobs/{sha256}"))
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3BlobStore {
    /// A store on `cfg`'s bucket, spooling uploads in `tmp_dir` (emptied).
    pub fn open(cfg: &S3Config, tmp_dir: impl Into<PathBuf>) -> io::Result<Self> {
        let tmp = tmp_dir.into();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        make_dirs(&tmp)?;
        let store = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .build()
            .map_err(io::Error::other)?;
        Ok(Self {
            store: Arc::new(store),
            tmp,
        })
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, body: &mut (dyn AsyncRead + Send + Unpin), max_bytes: u64) -> Result<Blob, PutError> {
        let Spooled {
            guard,
            path,
            sha256,
            size,
        } = spool(body, max_bytes, &self.tmp).await?;
        let k = key(&sha256);
        match self.store.head(&k).await {
            // Equal bytes are kept once.
            Ok(_) => {
                drop(guard);
                return Ok(Blob { sha256, size });
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(PutError::Io(io::Error::other(e))),
        }
        let mut file = tokio::fs::File::open(&path).await?;
        if size as usize <= PART {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await?;
            self.store
                .put(&k, PutPayload::from(bytes))
                .await
                .map_err(|e| PutError::Io(io::Error::other(e)))?;
        } else {
            let upload = self
                .store
                .put_multipart(&k)
                .await
                .map_err(|e| PutError::Io(io::Error::other(e)))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; 1024 * 1024];
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                writer.write(&buf[..n]);
            }
            writer.finish().await.map_err(|e| PutError::Io(io::Error::other(e)))?;
        }
        drop(guard);
        Ok(Blob { sha256, size })
    }

    async fn read(&self, sha256: &str, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        let opts = GetOptions {
            range: range.map(|(a, b)| GetRange::Bounded(a..b + 1)),
            ..Default::default()
        };
        let got = match self.store.get_opts(&key(sha256), opts).await {
            Ok(g) => g,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(io::Error::other(e)),
        };
        let total = got.meta.size;
        let stream = got.into_stream().map_err(io::Error::other);
        Ok(Some(BlobRead {
            total,
            reader: Box::new(tokio_util::io::StreamReader::new(stream)),
        }))
    }

    async fn size(&self, sha256: &str) -> io::Result<Option<u64>> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        match self.store.head(&key(sha256)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    async fn delete(&self, sha256: &str) -> io::Result<()> {
        if !valid_name(sha256) {
            return Ok(());
        }
        match self.store.delete(&key(sha256)).await {
            Err(e) if !not_found(&e) => Err(io::Error::other(e)),
            _ => Ok(()),
        }
    }
}
