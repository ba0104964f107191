//! [`MediaStore`] on SQLite.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, params};

use super::{EVENT_COLS, SqliteStore, collect, db_err, event_row};
use crate::Result;
use crate::media::*;

const MEDIA_COLS: &str =
    "media_id, uploader, created_ms, sha256, size, content_type, filename, pending_until_ms, quarantined";

fn media_row(r: &Row<'_>) -> rusqlite::Result<MediaRecord> {
    let sha256: Option<String> = r.get(3)?;
    Ok(MediaRecord {
        media_id: r.get(0)?,
        uploader: r.get(1)?,
        created_ms: r.get::<_, i64>(2)? as u64,
        content: match sha256 {
            Some(sha256) => Some(MediaContent {
                sha256,
                size: r.get::<_, i64>(4)? as u64,
                content_type: r.get(5)?,
                filename: r.get(6)?,
            }),
            None => None,
        },
        pending_until_ms: r.get::<_, Option<i64>>(7)?.map(|t| t as u64),
        quarantined: r.get(8)?,
    })
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl MediaStore for SqliteStore {
    async fn blob_gate(&self, exclusive: bool) -> Result<BlobGate> {
        let gate = self.blob_gate.clone();
        Ok(BlobGate(if exclusive {
            Box::new(gate.write_owned().await)
        } else {
            Box::new(gate.read_owned().await)
        }))
    }

    async fn create_media(&self, m: MediaRecord) -> Result<()> {
        self.write_wait(move |c, _| {
            let content = m.content.as_ref();
            c.execute(
                &format!("INSERT INTO media ({MEDIA_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)"),
                params![
                    m.media_id,
                    m.uploader,
                    to_i64(m.created_ms),
                    content.map(|c| &c.sha256),
                    to_i64(content.map_or(0, |c| c.size)),
                    content.and_then(|c| c.content_type.as_ref()),
                    content.and_then(|c| c.filename.as_ref()),
                    m.pending_until_ms.map(to_i64),
                    m.quarantined
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>> {
        let id = media_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {MEDIA_COLS} FROM media WHERE media_id = ?1"))?
                .query_row([id], media_row)
                .optional()
        })
        .await
    }

    async fn complete_media(&self, media_id: &str, uploader: &str, content: MediaContent, now_ms: u64) -> Result<bool> {
        let (id, uploader) = (media_id.to_owned(), uploader.to_owned());
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "UPDATE media SET sha256 = ?3, size = ?4, content_type = ?5, filename = ?6, \
                     pending_until_ms = NULL \
                     WHERE media_id = ?1 AND uploader = ?2 AND sha256 IS NULL AND pending_until_ms >= ?7",
                    params![
                        id,
                        uploader,
                        content.sha256,
                        to_i64(content.size),
                        content.content_type,
                        content.filename,
                        to_i64(now_ms)
                    ],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn media_usage(&self, uploader: &str, now_ms: u64) -> Result<MediaUsage> {
        let uploader = uploader.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT COUNT(sha256), COALESCE(SUM(size), 0), \
                 COUNT(*) FILTER (WHERE sha256 IS NULL AND pending_until_ms >= ?2) \
                 FROM media WHERE uploader = ?1",
            )?
            .query_row(params![uploader, to_i64(now_ms)], |r| {
                Ok(MediaUsage {
                    items: r.get::<_, i64>(0)? as u64,
                    bytes: r.get::<_, i64>(1)? as u64,
                    pending: r.get::<_, i64>(2)? as u64,
                })
            })
        })
        .await
    }

    async fn list_media(&self, q: MediaQuery) -> Result<Vec<MediaRecord>> {
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {MEDIA_COLS} FROM media WHERE (?1 IS NULL OR uploader = ?1) \
                     AND (?2 IS NULL OR created_ms < ?2) ORDER BY created_ms DESC, media_id LIMIT ?3"
                ),
                params![
                    q.uploader,
                    q.before_ms.map(to_i64),
                    i64::try_from(q.limit).unwrap_or(i64::MAX)
                ],
                media_row,
            )
        })
        .await
    }

    async fn set_quarantined(&self, media_id: &str, quarantined: bool) -> Result<bool> {
        let id = media_id.to_owned();
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "UPDATE media SET quarantined = ?2 WHERE media_id = ?1",
                    params![id, quarantined],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn delete_media(&self, media_ids: Vec<String>) -> Result<Vec<String>> {
        self.write_wait(move |c, _| {
            let mut blobs = Vec::new();
            for id in &media_ids {
                let mut shas: Vec<String> = collect(
                    c,
                    "SELECT sha256 FROM media WHERE media_id = ?1 AND sha256 IS NOT NULL \
                     UNION SELECT sha256 FROM media_thumbnails WHERE media_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
                c.execute("DELETE FROM media_thumbnails WHERE media_id = ?1", [id])
                    .map_err(db_err)?;
                c.execute("DELETE FROM media WHERE media_id = ?1", [id])
                    .map_err(db_err)?;
                blobs.append(&mut shas);
            }
            blobs.sort();
            blobs.dedup();
            let mut unused = Vec::new();
            for sha in blobs {
                let used: bool = c
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM media WHERE sha256 = ?1) \
                         OR EXISTS (SELECT 1 FROM media_thumbnails WHERE sha256 = ?1)",
                    )
                    .and_then(|mut s| s.query_row([&sha], |r| r.get(0)))
                    .map_err(db_err)?;
                if !used {
                    unused.push(sha);
                }
            }
            Ok(unused)
        })
        .await
    }

    async fn thumbnail(
        &self,
        media_id: &str,
        width: u32,
        height: u32,
        method: &str,
    ) -> Result<Option<ThumbnailRecord>> {
        let (id, method) = (media_id.to_owned(), method.to_owned());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT sha256, size, content_type FROM media_thumbnails \
                 WHERE media_id = ?1 AND width = ?2 AND height = ?3 AND method = ?4",
            )?
            .query_row(params![id, width, height, method], |r| {
                Ok(ThumbnailRecord {
                    media_id: id.clone(),
                    width,
                    height,
                    method: method.clone(),
                    sha256: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    content_type: r.get(2)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn put_thumbnail(&self, t: ThumbnailRecord) -> Result<()> {
        self.write_wait(move |c, _| {
            c.execute(
                "INSERT OR REPLACE INTO media_thumbnails \
                 (media_id, width, height, method, sha256, size, content_type) VALUES (?1,?2,?3,?4,?5,?6,?7)",
                params![
                    t.media_id,
                    t.width,
                    t.height,
                    t.method,
                    t.sha256,
                    to_i64(t.size),
                    t.content_type
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn media_stats(&self) -> Result<MediaStats> {
        self.read(|c| {
            let (items, bytes, quarantined, pending) = c
                .prepare_cached(
                    "SELECT COUNT(sha256), COALESCE(SUM(size), 0), \
                     COUNT(*) FILTER (WHERE quarantined != 0), COUNT(*) FILTER (WHERE sha256 IS NULL) FROM media",
                )?
                .query_row([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?;
            let (blobs, blob_bytes) = c
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM \
                     (SELECT sha256, MAX(size) AS size FROM media WHERE sha256 IS NOT NULL GROUP BY sha256)",
                )?
                .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            let (thumbnails, thumbnail_bytes) = c
                .prepare_cached("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM media_thumbnails")?
                .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            let u = |n: i64| n.max(0) as u64;
            Ok(MediaStats {
                items: u(items),
                bytes: u(bytes),
                blobs: u(blobs),
                blob_bytes: u(blob_bytes),
                thumbnails: u(thumbnails),
                thumbnail_bytes: u(thumbnail_bytes),
                quarantined: u(quarantined),
                pending: u(pending),
            })
        })
        .await
    }

    async fn room_files(&self, room_id: &str, q: RoomFilesQuery) -> Result<Vec<crate::StoredEvent>> {
        let room = room_id.to_owned();
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {EVENT_COLS} FROM events e WHERE e.room_id = ?1 AND e.position < ?2 \
                     AND e.event_type = 'm.room.message' AND json_extract(e.pdu_json, '$.content.url') IS NOT NULL \
                     AND e.redacted_by IS NULL \
                     AND (?3 IS NULL OR json_extract(e.pdu_json, '$.content.info.mimetype') LIKE ?3 || '%') \
                     AND (?4 IS NULL OR e.origin_server_ts >= ?4) AND (?5 IS NULL OR e.origin_server_ts < ?5) \
                     ORDER BY e.position DESC LIMIT ?6"
                ),
                params![
                    room,
                    q.before_position,
                    q.mimetype_prefix.map(|p| p.replace(['%', '_'], "")),
                    q.since_ms.map(to_i64),
                    q.until_ms.map(to_i64),
                    i64::try_from(q.limit).unwrap_or(i64::MAX)
                ],
                event_row,
            )
        })
        .await
    }
}
