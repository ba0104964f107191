//! Blobs as files in the data directory: `media/blobs/ab/cd/<sha256>`.
//! An upload is written to `media/tmp/` while it is hashed, synced, and
//! renamed into place only when complete, so a crash never leaves a
//! half-written blob under its name; `media/tmp/` is emptied at start-up.

use std::io::{self, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::blob::{Blob, BlobRead, BlobStore, PutError, valid_name};

/// Reads and writes in pieces of this size: an upload is never held whole
/// in memory.
const CHUNK: usize = 64 * 1024;

/// The embedded default [`BlobStore`]: files under one directory, readable
/// by the owner only.
pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating) the store at `root`, deleting what a crash left in
    /// its `tmp/`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        make_dirs(&tmp)?;
        make_dirs(&root.join("blobs"))?;
        Ok(Self { root })
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root
            .join("blobs")
            .join(&sha256[0..2])
            .join(&sha256[2..4])
            .join(sha256)
    }
}

/// Creates `p` and its parents, owner-only.
pub(crate) fn make_dirs(p: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// Removes a temporary file when dropped.
pub(crate) struct TmpGuard(Option<PathBuf>);

/// An upload written to a temporary file and hashed.
pub(crate) struct Spooled {
    pub(crate) guard: TmpGuard,
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

/// Writes `body` (at most `max_bytes`) to a new file in `tmp_dir`, synced,
/// hashing it on the way; the file goes when the answer's guard does (or
/// at once on an error).
pub(crate) async fn spool(
    body: &mut (dyn AsyncRead + Send + Unpin),
    max_bytes: u64,
    tmp_dir: &Path,
) -> Result<Spooled, PutError> {
    let name = format!("{:032x}.part", rand::thread_rng().r#gen::<u128>());
    let path = tmp_dir.join(name);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .await?;
    let guard = TmpGuard(Some(path.clone()));
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max_bytes {
            return Err(PutError::TooLarge(max_bytes));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await?;
    }
    file.flush().await?;
    file.sync_all().await?;
    Ok(Spooled {
        guard,
        path,
        sha256: hex(&hasher.finalize()),
        size,
    })
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, body: &mut (dyn AsyncRead + Send + Unpin), max_bytes: u64) -> Result<Blob, PutError> {
        let Spooled {
            guard,
            path: tmp,
            sha256,
            size,
        } = spool(body, max_bytes, &self.root.join("tmp")).await?;
        let dest = self.path_of(&sha256);
        let parent = dest.parent().map(Path::to_path_buf);
        let moved = tokio::task::spawn_blocking(move || -> io::Result<()> {
            if let Some(parent) = &parent {
                make_dirs(parent)?;
            }
            if dest.exists() {
                // Equal bytes are kept once: the temporary copy goes.
                return Ok(());
            }
            std::fs::rename(&tmp, &dest)?;
            // The rename is durable only once the directory is synced.
            if let Some(parent) = &parent {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?;
        moved?;
        // Renamed away (nothing left to remove) or a duplicate (the copy
        // goes): the guard's remove is right either way.
        drop(guard);
        Ok(Blob { sha256, size })
    }

    async fn read(&self, sha256: &str, range: Option<(u64, u64)>) -> io::Result<Option<BlobRead>> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        let mut file = match tokio::fs::File::open(self.path_of(sha256)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let total = file.metadata().await?.len();
        let reader: Box<dyn AsyncRead + Send + Unpin> = match range {
            Some((start, end)) if start <= end && end < total => {
                file.seek(SeekFrom::Start(start)).await?;
                Box::new(file.take(end - start + 1))
            }
            Some(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "range outside the blob")),
            None => Box::new(file),
        };
        Ok(Some(BlobRead { total, reader }))
    }

    async fn size(&self, sha256: &str) -> io::Result<Option<u64>> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        match tokio::fs::metadata(self.path_of(sha256)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, sha256: &str) -> io::Result<()> {
        if !valid_name(sha256) {
            return Ok(());
        }
        match tokio::fs::remove_file(self.path_of(sha256)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(store: &FsBlobStore, sha: &str, range: Option<(u64, u64)>) -> Vec<u8> {
        let mut r = store.read(sha, range).await.unwrap().unwrap();
        let mut out = Vec::new();
        r.reader.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn put_read_range_dedupe_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path().join("media")).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let blob = store.put(&mut &data[..], 1 << 20).await.unwrap();
        assert_eq!(blob.size, 200_000);
        assert_eq!(blob.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(read_all(&store, &blob.sha256, None).await, data);
        // Readable by the owner only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path_of(&blob.sha256))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_all(&store, &blob.sha256, Some((10, 19))).await, &data[10..20]);
        // The same bytes again: the same blob, one file.
        let again = store.put(&mut &data[..], 1 << 20).await.unwrap();
        assert_eq!(again, blob);
        assert_eq!(std::fs::read_dir(dir.path().join("media/tmp")).unwrap().count(), 0);
        store.delete(&blob.sha256).await.unwrap();
        assert!(store.read(&blob.sha256, None).await.unwrap().is_none());
        // A name that is not a hash never becomes a path.
        assert!(store.read("../../etc/passwd", None).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn too_large_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let data = vec![7u8; 1001];
        let err = store.put(&mut &data[..], 1000).await.unwrap_err();
        assert!(matches!(err, PutError::TooLarge(1000)), "{err}");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(dir.path().join("blobs")).unwrap().count(), 0);
        // Exactly at the limit is fine.
        assert_eq!(store.put(&mut &data[..1000], 1000).await.unwrap().size, 1000);
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(FsBlobStore::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("tmp/abc.part"), b"half").unwrap();
        let _store = FsBlobStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
