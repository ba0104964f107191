//! File management (docs/media.md, "Files"): the files shared in a room
//! and a user's own uploads, listed with name, type, size, sender, time
//! and tags, filtered by tag, type and time, searched by name and tag.
//!
//! Tags are room state: one `org.weft.file.tags` state event per file,
//! keyed by the file event's ID, content `{"tags": [...]}`. So every
//! member (and every Matrix client) sees them, the room's power levels
//! say who may change them (`events["org.weft.file.tags"]`, else
//! `state_default`), and their history is the room's history.

use std::collections::HashMap;

use ruma::UserId;
use serde_json::{Value, json};
use weft_core::{Error, Result};
use weft_store::{MediaQuery, RoomFilesQuery, StoredEvent};

use crate::{Services, Session};

/// The state event type holding one file's tags.
pub const FILE_TAGS: &str = "org.weft.file.tags";
/// Most tags on one file, and the longest tag (bytes).
const MAX_TAGS: usize = 50;
const MAX_TAG_BYTES: usize = 100;
/// Most files in one page.
const MAX_PAGE: usize = 200;

/// What to list: all filters optional.
#[derive(Debug, Clone, Default)]
pub struct FileFilter {
    /// Files carrying this tag.
    pub tag: Option<String>,
    /// Files whose type starts with this (`image/`, `application/pdf`).
    pub mimetype: Option<String>,
    /// Sent (or uploaded) at or after / before these times, ms.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Words each found in the file's name or one of its tags (any case).
    pub search: Option<String>,
    /// `next_batch` of the previous page.
    pub from: Option<String>,
    pub limit: Option<usize>,
}

impl FileFilter {
    fn matches(&self, name: &str, mimetype: Option<&str>, tags: &[String]) -> bool {
        if let Some(t) = &self.tag
            && !tags.iter().any(|x| x == t)
        {
            return false;
        }
        if let Some(m) = &self.mimetype
            && !mimetype.is_some_and(|x| x.starts_with(m.as_str()))
        {
            return false;
        }
        if let Some(q) = &self.search {
            let name = name.to_lowercase();
            let tags: Vec<String> = tags.iter().map(|t| t.to_lowercase()).collect();
            return q
                .split_whitespace()
                .map(str::to_lowercase)
                .all(|w| name.contains(&w) || tags.iter().any(|t| t.contains(&w)));
        }
        true
    }

    fn limit(&self) -> usize {
        self.limit.unwrap_or(50).clamp(1, MAX_PAGE)
    }

    fn page_token(&self) -> Result<Option<i64>> {
        self.from
            .as_deref()
            .map(|t| t.parse::<i64>().map_err(|_| Error::invalid_param("Invalid from token")))
            .transpose()
    }
}

/// Checks the content of an `org.weft.file.tags` event: `{"tags": [...]}`
/// with at most 50 distinct non-empty strings of at most 100 bytes.
pub(crate) fn check_tags_content(content: &serde_json::Map<String, Value>) -> Result<()> {
    let bad = |m: &str| Error::bad_json(format!("{FILE_TAGS}: {m}"));
    let tags = content
        .get("tags")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("content must be {\"tags\": [strings]}"))?;
    if tags.len() > MAX_TAGS {
        return Err(bad("at most 50 tags"));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tags {
        let t = t.as_str().ok_or_else(|| bad("tags are strings"))?;
        if t.is_empty() || t.len() > MAX_TAG_BYTES || t.chars().any(char::is_control) {
            return Err(bad("a tag is 1 to 100 bytes of text"));
        }
        if !seen.insert(t) {
            return Err(bad("a tag appears twice"));
        }
    }
    Ok(())
}

/// The file an event carries: (mxc, name, mimetype, size, msgtype).
type FileFields = (String, String, Option<String>, Option<u64>, Option<String>);

fn file_of(ev: &StoredEvent) -> Option<FileFields> {
    let pdu: Value = serde_json::from_str(&ev.pdu_json).ok()?;
    let c = pdu.get("content")?;
    let url = c.get("url")?.as_str()?.to_owned();
    let name = c
        .get("filename")
        .and_then(Value::as_str)
        .or_else(|| c.get("body").and_then(Value::as_str))
        .unwrap_or("")
        .to_owned();
    let info = c.get("info");
    let mimetype = info
        .and_then(|i| i.get("mimetype"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let size = info.and_then(|i| i.get("size")).and_then(Value::as_u64);
    let msgtype = c.get("msgtype").and_then(Value::as_str).map(str::to_owned);
    Some((url, name, mimetype, size, msgtype))
}

/// The type of a file from its name's extension, for doors whose
/// messages carry no type (MQTT 3.1.1).
pub fn type_from_name(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "json" => "application/json",
        "cbor" => "application/cbor",
        "pdf" => "application/pdf",
        "mp4" => "video/mp4",
        "ogg" | "oga" => "audio/ogg",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

impl Services {
    /// Stores `bytes` as media and shares them in the room as a file
    /// message (`m.image`, `m.video`, `m.audio` or `m.file` by type) named
    /// `name`: what an MQTT device's `weft/r/{room}/f/{name}` publish
    /// does. Only a member may (`403`, and nothing stored); the message
    /// is queued as [`Services::submit_event`] queues one.
    pub async fn share_file(
        &self,
        session: &Session,
        room_id: &ruma::RoomId,
        name: &str,
        content_type: Option<&str>,
        bytes: &[u8],
    ) -> Result<crate::Submitted> {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(Error::invalid_param("A file name is 1 to 255 bytes of text"));
        }
        match self.rooms.membership(room_id, &session.user_id).await {
            Ok(Some(m)) if m == "join" => {}
            _ => return Err(Error::forbidden("You are not in this room")),
        }
        let mimetype = content_type.unwrap_or_else(|| type_from_name(name));
        let media_id = self
            .upload_media(session, Some(mimetype), Some(name), &mut &bytes[..])
            .await?;
        let msgtype = match mimetype.split('/').next() {
            Some("image") => "m.image",
            Some("video") => "m.video",
            Some("audio") => "m.audio",
            _ => "m.file",
        };
        let content = json!({
            "msgtype": msgtype,
            "body": name,
            "filename": name,
            "url": self.mxc(&media_id),
            "info": {"mimetype": mimetype, "size": bytes.len()},
        });
        self.submit_event(session, room_id, "m.room.message", None, content)
            .await
    }

    /// Before an `org.weft.file.tags` event is sent: its state key must be
    /// a file event of the room the sender may see.
    pub(crate) async fn check_tags_target(&self, user_id: &UserId, room: &str, state_key: Option<&str>) -> Result<()> {
        let Some(key) = state_key else {
            return Err(Error::bad_json(format!(
                "{FILE_TAGS} is a state event keyed by a file event's ID"
            )));
        };
        let ev = self
            .visible_event(user_id, room, key)
            .await
            .map_err(|_| Error::bad_json(format!("{FILE_TAGS}: {key} is not an event of this room")))?;
        if ev.event_type != "m.room.message" || file_of(&ev).is_none() {
            return Err(Error::bad_json(format!("{FILE_TAGS}: {key} is not a file")));
        }
        Ok(())
    }

    /// The tags of every file of a room: file event ID → tags.
    async fn room_tags(&self, room_id: &str) -> Result<HashMap<String, Vec<String>>> {
        let mut out = HashMap::new();
        for ev in self.store.current_state(room_id).await? {
            if ev.event_type != FILE_TAGS {
                continue;
            }
            let Some(key) = ev.state_key.clone() else { continue };
            let tags = serde_json::from_str::<Value>(&ev.pdu_json)
                .ok()
                .and_then(|p| p["content"]["tags"].as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect();
            out.insert(key, tags);
        }
        Ok(out)
    }

    /// `GET /_matrix/client/unstable/org.weft.files/rooms/{roomId}/files`:
    /// the files shared in a room that the user may see, newest first:
    /// `{"chunk": [...], "next_batch"?}`. Not a member (now or before):
    /// `403 M_FORBIDDEN`.
    pub async fn room_files(&self, session: &Session, room: &str, filter: &FileFilter) -> Result<Value> {
        let (room_id, view) = self.read_view(&session.user_id, room).await?;
        let tags = self.room_tags(room_id.as_str()).await?;
        let limit = filter.limit();
        let mut before = filter
            .page_token()?
            .unwrap_or(i64::MAX)
            .min(view.upto.saturating_add(1));
        let mut chunk = Vec::new();
        let mut next = None;
        loop {
            let batch = self
                .store
                .room_files(
                    room_id.as_str(),
                    RoomFilesQuery {
                        before_position: before,
                        mimetype_prefix: filter.mimetype.clone(),
                        since_ms: filter.since_ms,
                        until_ms: filter.until_ms,
                        limit: limit * 2,
                    },
                )
                .await?;
            let exhausted = batch.len() < limit * 2;
            for ev in batch {
                before = ev.position;
                if !view.visibility.can_see(ev.position) {
                    continue;
                }
                let Some((mxc, name, mimetype, size, msgtype)) = file_of(&ev) else {
                    continue;
                };
                let file_tags = tags.get(&ev.event_id).cloned().unwrap_or_default();
                if !filter.matches(&name, mimetype.as_deref(), &file_tags) {
                    continue;
                }
                chunk.push(json!({
                    "event_id": ev.event_id,
                    "mxc": mxc,
                    "name": name,
                    "mimetype": mimetype,
                    "size": size,
                    "msgtype": msgtype,
                    "sender": ev.sender,
                    "origin_server_ts": ev.origin_server_ts,
                    "tags": file_tags,
                }));
                if chunk.len() == limit {
                    next = Some(before.to_string());
                    break;
                }
            }
            if next.is_some() || exhausted {
                break;
            }
        }
        let mut out = json!({ "chunk": chunk });
        if let Some(n) = next {
            out["next_batch"] = n.into();
        }
        Ok(out)
    }

    /// `GET /_matrix/client/unstable/org.weft.files/uploads`: the user's
    /// own uploads, newest first, with the same filters (tags are a room's:
    /// an upload's tags are those of the files naming it in rooms the
    /// user is in).
    pub async fn my_uploads(&self, session: &Session, filter: &FileFilter) -> Result<Value> {
        let limit = filter.limit();
        let mut before = filter.page_token()?.map(|t| t.max(0) as u64);
        // Tags by mxc, from the user's joined rooms.
        let mut tags_by_mxc: HashMap<String, Vec<String>> = HashMap::new();
        for room in self.joined_rooms(&session.user_id).await? {
            for (event_id, t) in self.room_tags(room.as_str()).await? {
                if let Ok(Some(ev)) = self.store.get_event(&event_id).await
                    && let Some((mxc, ..)) = file_of(&ev)
                {
                    let e = tags_by_mxc.entry(mxc).or_default();
                    for tag in t {
                        if !e.contains(&tag) {
                            e.push(tag);
                        }
                    }
                }
            }
        }
        let mut chunk = Vec::new();
        let mut next = None;
        loop {
            let batch = self
                .store
                .list_media(MediaQuery {
                    uploader: Some(session.user_id.to_string()),
                    before_ms: before,
                    limit: limit * 2,
                })
                .await?;
            let exhausted = batch.len() < limit * 2;
            for m in batch {
                before = Some(m.created_ms);
                let Some(c) = m.content else { continue };
                if m.quarantined
                    || filter.since_ms.is_some_and(|t| m.created_ms < t)
                    || filter.until_ms.is_some_and(|t| m.created_ms >= t)
                {
                    continue;
                }
                let mxc = self.mxc(&m.media_id);
                let tags = tags_by_mxc.get(&mxc).cloned().unwrap_or_default();
                let name = c.filename.clone().unwrap_or_default();
                if !filter.matches(&name, c.content_type.as_deref(), &tags) {
                    continue;
                }
                chunk.push(json!({
                    "mxc": mxc,
                    "name": c.filename,
                    "mimetype": c.content_type,
                    "size": c.size,
                    "created_ts": m.created_ms,
                    "tags": tags,
                }));
                if chunk.len() == limit {
                    next = Some(m.created_ms.to_string());
                    break;
                }
            }
            if next.is_some() || exhausted {
                break;
            }
        }
        let mut out = json!({ "chunk": chunk });
        if let Some(n) = next {
            out["next_batch"] = n.into();
        }
        Ok(out)
    }
}
