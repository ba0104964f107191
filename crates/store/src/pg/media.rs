//! PostgreSQL: the `MediaStore` area.

use super::*;

#[async_trait::async_trait]
impl MediaStore for PgStore {
    async fn create_media(&self, media: MediaRecord) -> Result<()> {
        let _ = (media,);
        Err(not_yet("create_media"))
    }

    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>> {
        let _ = (media_id,);
        Err(not_yet("media"))
    }

    async fn complete_media(&self, media_id: &str, uploader: &str, content: MediaContent, now_ms: u64) -> Result<bool> {
        let _ = (media_id, uploader, content, now_ms);
        Err(not_yet("complete_media"))
    }

    async fn media_usage(&self, uploader: &str, now_ms: u64) -> Result<MediaUsage> {
        let _ = (uploader, now_ms);
        Err(not_yet("media_usage"))
    }

    async fn list_media(&self, query: MediaQuery) -> Result<Vec<MediaRecord>> {
        let _ = (query,);
        Err(not_yet("list_media"))
    }

    async fn set_quarantined(&self, media_id: &str, quarantined: bool) -> Result<bool> {
        let _ = (media_id, quarantined);
        Err(not_yet("set_quarantined"))
    }

    async fn delete_media(&self, media_ids: Vec<String>) -> Result<Vec<String>> {
        let _ = (media_ids,);
        Err(not_yet("delete_media"))
    }

    async fn thumbnail(
        &self,
        media_id: &str,
        width: u32,
        height: u32,
        method: &str,
    ) -> Result<Option<ThumbnailRecord>> {
        let _ = (media_id, width, height, method);
        Err(not_yet("thumbnail"))
    }

    async fn put_thumbnail(&self, thumbnail: ThumbnailRecord) -> Result<()> {
        let _ = (thumbnail,);
        Err(not_yet("put_thumbnail"))
    }

    async fn media_stats(&self) -> Result<MediaStats> {
        Err(not_yet("media_stats"))
    }

    async fn room_files(&self, room_id: &str, query: RoomFilesQuery) -> Result<Vec<crate::StoredEvent>> {
        let _ = (room_id, query);
        Err(not_yet("room_files"))
    }
}
