//! PostgreSQL: the `MediaStore` area (sqlite/media.rs).

use super::*;

const MEDIA_COLS: &str =
    "media_id, uploader, created_ms, sha256, size, content_type, filename, pending_until_ms, quarantined";

/// The event columns [`event_row`] reads, of `events e`.
const FILE_EVENT_COLS: &str = "e.position, e.event_id, e.room_id, e.event_type, e.state_key, e.sender, \
     e.origin_server_ts, e.pdu_json, e.redacted_by, e.txn_device, e.txn_id";

/// A media item from the columns of [`MEDIA_COLS`] (`quarantined` is a
/// BIGINT 0/1).
fn media_row(r: &Row) -> MediaRecord {
    let sha256: Option<String> = r.get(3);
    MediaRecord {
        media_id: r.get(0),
        uploader: r.get(1),
        created_ms: r.get::<_, i64>(2) as u64,
        content: sha256.map(|sha256| MediaContent {
            sha256,
            size: r.get::<_, i64>(4) as u64,
            content_type: r.get(5),
            filename: r.get(6),
        }),
        pending_until_ms: r.get::<_, Option<i64>>(7).map(|t| t as u64),
        quarantined: r.get::<_, i64>(8) != 0,
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl MediaStore for PgStore {
    async fn blob_gate(&self, exclusive: bool) -> Result<BlobGate> {
        let lock = if exclusive {
            GateLock::Exclusive(BLOB_GATE_LOCK)
        } else {
            GateLock::Shared(BLOB_GATE_LOCK)
        };
        Ok(BlobGate(Box::new(self.gate_lock(lock).await?)))
    }

    async fn create_media(&self, m: MediaRecord) -> Result<()> {
        self.write_wait(move |c, _| {
            let content = m.content.as_ref();
            c.execute(
                &format!("INSERT INTO media ({MEDIA_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"),
                &[
                    &m.media_id,
                    &m.uploader,
                    &to_i64(m.created_ms),
                    &content.map(|c| &c.sha256),
                    &to_i64(content.map_or(0, |c| c.size)),
                    &content.and_then(|c| c.content_type.as_ref()),
                    &content.and_then(|c| c.filename.as_ref()),
                    &m.pending_until_ms.map(to_i64),
                    &(m.quarantined as i64),
                ],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>> {
        let id = media_id.to_owned();
        self.read(move |c| {
            Ok(
                c.query_opt(&format!("SELECT {MEDIA_COLS} FROM media WHERE media_id = $1"), &[&id])?
                    .map(|r| media_row(&r)),
            )
        })
        .await
    }

    async fn complete_media(&self, media_id: &str, uploader: &str, content: MediaContent, now_ms: u64) -> Result<bool> {
        let (id, uploader) = (media_id.to_owned(), uploader.to_owned());
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "UPDATE media SET sha256 = $3, size = $4, content_type = $5, filename = $6, \
                     pending_until_ms = NULL \
                     WHERE media_id = $1 AND uploader = $2 AND sha256 IS NULL AND pending_until_ms >= $7",
                    &[
                        &id,
                        &uploader,
                        &content.sha256,
                        &to_i64(content.size),
                        &content.content_type,
                        &content.filename,
                        &to_i64(now_ms),
                    ],
                )
                .map_err(pg_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn media_usage(&self, uploader: &str, now_ms: u64) -> Result<MediaUsage> {
        let uploader = uploader.to_owned();
        self.read(move |c| {
            // SUM of a BIGINT is NUMERIC in PostgreSQL: cast back.
            let r = c.query_one(
                "SELECT COUNT(sha256), COALESCE(SUM(size), 0)::BIGINT, \
                 COUNT(*) FILTER (WHERE sha256 IS NULL AND pending_until_ms >= $2) \
                 FROM media WHERE uploader = $1",
                &[&uploader, &to_i64(now_ms)],
            )?;
            Ok(MediaUsage {
                items: r.get::<_, i64>(0) as u64,
                bytes: r.get::<_, i64>(1) as u64,
                pending: r.get::<_, i64>(2) as u64,
            })
        })
        .await
    }

    async fn list_media(&self, q: MediaQuery) -> Result<Vec<MediaRecord>> {
        self.read(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {MEDIA_COLS} FROM media WHERE ($1::TEXT IS NULL OR uploader = $1) \
                     AND ($2::BIGINT IS NULL OR created_ms < $2) ORDER BY created_ms DESC, media_id LIMIT $3"
                ),
                &[&q.uploader, &q.before_ms.map(to_i64), &limit(q.limit)],
            )?
            .iter()
            .map(media_row)
            .collect())
        })
        .await
    }

    async fn set_quarantined(&self, media_id: &str, quarantined: bool) -> Result<bool> {
        let id = media_id.to_owned();
        self.write_wait(move |c, _| {
            let n = c
                .execute(
                    "UPDATE media SET quarantined = $2 WHERE media_id = $1",
                    &[&id, &(quarantined as i64)],
                )
                .map_err(pg_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn delete_media(&self, media_ids: Vec<String>) -> Result<Vec<String>> {
        self.write_wait(move |c, _| {
            // The blobs the deleted rows named (three statements for any
            // number of items; SQLite loops per item).
            let mut blobs: Vec<String> = c
                .query(
                    "DELETE FROM media_thumbnails WHERE media_id = ANY($1) RETURNING sha256",
                    &[&media_ids],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for r in c
                .query(
                    "DELETE FROM media WHERE media_id = ANY($1) RETURNING sha256",
                    &[&media_ids],
                )
                .map_err(pg_err)?
            {
                if let Some(sha) = r.get::<_, Option<String>>(0) {
                    blobs.push(sha);
                }
            }
            blobs.sort();
            blobs.dedup();
            if blobs.is_empty() {
                return Ok(blobs);
            }
            // Those another row still names stay.
            let used: std::collections::HashSet<String> = c
                .query(
                    "SELECT sha256 FROM media WHERE sha256 = ANY($1) \
                     UNION SELECT sha256 FROM media_thumbnails WHERE sha256 = ANY($1)",
                    &[&blobs],
                )
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            blobs.retain(|sha| !used.contains(sha));
            Ok(blobs)
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
            Ok(c.query_opt(
                "SELECT sha256, size, content_type FROM media_thumbnails \
                 WHERE media_id = $1 AND width = $2 AND height = $3 AND method = $4",
                &[&id, &i64::from(width), &i64::from(height), &method],
            )?
            .map(|r| ThumbnailRecord {
                media_id: id,
                width,
                height,
                method,
                sha256: r.get(0),
                size: r.get::<_, i64>(1) as u64,
                content_type: r.get(2),
            }))
        })
        .await
    }

    async fn put_thumbnail(&self, t: ThumbnailRecord) -> Result<()> {
        self.write_wait(move |c, _| {
            // SQLite: INSERT OR REPLACE.
            c.execute(
                "INSERT INTO media_thumbnails \
                 (media_id, width, height, method, sha256, size, content_type) VALUES ($1,$2,$3,$4,$5,$6,$7) \
                 ON CONFLICT (media_id, width, height, method) DO UPDATE SET sha256 = excluded.sha256, \
                 size = excluded.size, content_type = excluded.content_type",
                &[
                    &t.media_id,
                    &i64::from(t.width),
                    &i64::from(t.height),
                    &t.method,
                    &t.sha256,
                    &to_i64(t.size),
                    &t.content_type,
                ],
            )
            .map_err(pg_err)?;
            Ok(())
        })
        .await
    }

    async fn media_stats(&self) -> Result<MediaStats> {
        self.read(|c| {
            // One round trip for SQLite's three queries; SUMs cast back
            // from NUMERIC.
            let r = c.query_one(
                "SELECT m.items, m.bytes, m.quarantined, m.pending, b.blobs, b.blob_bytes, t.thumbnails, \
                 t.thumbnail_bytes FROM \
                 (SELECT COUNT(sha256) AS items, COALESCE(SUM(size), 0)::BIGINT AS bytes, \
                  COUNT(*) FILTER (WHERE quarantined != 0) AS quarantined, \
                  COUNT(*) FILTER (WHERE sha256 IS NULL) AS pending FROM media) m, \
                 (SELECT COUNT(*) AS blobs, COALESCE(SUM(size), 0)::BIGINT AS blob_bytes FROM \
                  (SELECT sha256, MAX(size) AS size FROM media WHERE sha256 IS NOT NULL GROUP BY sha256) s) b, \
                 (SELECT COUNT(*) AS thumbnails, COALESCE(SUM(size), 0)::BIGINT AS thumbnail_bytes \
                  FROM media_thumbnails) t",
                &[],
            )?;
            let u = |i: usize| r.get::<_, i64>(i).max(0) as u64;
            Ok(MediaStats {
                items: u(0),
                bytes: u(1),
                quarantined: u(2),
                pending: u(3),
                blobs: u(4),
                blob_bytes: u(5),
                thumbnails: u(6),
                thumbnail_bytes: u(7),
            })
        })
        .await
    }

    async fn room_files(&self, room_id: &str, q: RoomFilesQuery) -> Result<Vec<crate::StoredEvent>> {
        let room = room_id.to_owned();
        // SQLite's LIKE ignores ASCII case and has no escape character;
        // `COLLATE "C" ILIKE … ESCAPE ''` does the same (the C collation
        // folds ASCII only). `%` and `_` are taken out of the prefix, as
        // on SQLite. The first two conditions on the event repeat the
        // partial index `events_files` word for word (the planner uses it
        // only then); `replace` keeps a `\u0000` escape in an event from
        // failing the JSON cast (0001_schema.sql).
        let prefix = q.mimetype_prefix.map(|p| p.replace(['%', '_'], ""));
        self.read(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {FILE_EVENT_COLS} FROM events e WHERE e.room_id = $1 AND e.position < $2 \
                     AND e.event_type = 'm.room.message' \
                     AND json_typeof(replace(e.pdu_json, '\\u0000', '\\u0001')::json -> 'content' -> 'url') <> 'null' \
                     AND e.redacted_by IS NULL \
                     AND ($3::TEXT IS NULL OR \
                      ((replace(e.pdu_json, '\\u0000', '\\u0001')::json -> 'content' -> 'info' ->> 'mimetype') \
                       COLLATE \"C\" ILIKE ($3 || '%') ESCAPE '')) \
                     AND ($4::BIGINT IS NULL OR e.origin_server_ts >= $4) \
                     AND ($5::BIGINT IS NULL OR e.origin_server_ts < $5) \
                     ORDER BY e.position DESC LIMIT $6"
                ),
                &[
                    &room,
                    &q.before_position,
                    &prefix,
                    &q.since_ms.map(to_i64),
                    &q.until_ms.map(to_i64),
                    &limit(q.limit),
                ],
            )?
            .iter()
            .map(event_row)
            .collect())
        })
        .await
    }
}
