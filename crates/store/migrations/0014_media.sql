-- Weft schema: the media repository. A media item names a blob (its
-- bytes, content-addressed by SHA-256, kept by the media crate's blob
-- store, not here); equal bytes uploaded twice are two items, one blob.
CREATE TABLE media (
    media_id TEXT PRIMARY KEY,
    uploader TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    -- NULL until the bytes are uploaded (`/media/v1/create`, then
    -- `PUT /upload/{server}/{id}` before `pending_until_ms`).
    sha256 TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    content_type TEXT,
    filename TEXT,
    pending_until_ms INTEGER,
    quarantined INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX media_by_uploader ON media (uploader, created_ms);
CREATE INDEX media_by_created ON media (created_ms);
CREATE INDEX media_by_sha256 ON media (sha256);

-- Thumbnails, generated once on first request and kept.
CREATE TABLE media_thumbnails (
    media_id TEXT NOT NULL REFERENCES media (media_id) ON DELETE CASCADE,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    method TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    PRIMARY KEY (media_id, width, height, method)
);
CREATE INDEX media_thumbnails_by_sha256 ON media_thumbnails (sha256);

-- Files shared in rooms: message events naming an mxc:// URL. A partial
-- index on an expression of the stored event, so listing a room's files
-- reads only them (not the room's telemetry) and the write path stays as
-- it was.
CREATE INDEX events_files ON events (room_id, position)
    WHERE event_type = 'm.room.message' AND json_extract(pdu_json, '$.content.url') IS NOT NULL;
