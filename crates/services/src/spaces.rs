//! Spaces: the hierarchy of rooms below a space (`GET /rooms/{id}/hierarchy`),
//! walked breadth first through `m.space.child` state events. A room is
//! shown if the caller is joined to it or may peek at it (its join rule is
//! `public` or its history is world-readable); rooms this server does not
//! hold are left out (federation will fetch them).

use std::collections::{HashSet, VecDeque};

use ruma::OwnedRoomId;
use serde_json::{Value, json};
use weft_core::{Error, Result};

use crate::user_data::room_chunk;
use crate::{Services, Session};

/// The most rooms one page returns; also the default.
pub const MAX_ROOMS: usize = 50;
/// How deep the walk goes at most.
pub const MAX_DEPTH: usize = 10;

/// A page of the hierarchy: each room's summary with its `children_state`.
#[derive(Debug, Clone, Default)]
pub struct HierarchyPage {
    pub rooms: Vec<Value>,
    pub next_batch: Option<String>,
}

impl Services {
    pub async fn hierarchy(
        &self,
        session: &Session,
        root: &str,
        from: Option<&str>,
        limit: Option<usize>,
        max_depth: Option<usize>,
        suggested_only: bool,
    ) -> Result<HierarchyPage> {
        let root = OwnedRoomId::try_from(root).map_err(|_| Error::invalid_param("Invalid room ID"))?;
        let skip = match from {
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| Error::invalid_param("Invalid from token"))?,
            None => 0,
        };
        let limit = limit.unwrap_or(MAX_ROOMS).clamp(1, MAX_ROOMS);
        let max_depth = max_depth.unwrap_or(MAX_DEPTH).min(MAX_DEPTH);
        let mut seen = HashSet::from([root.clone()]);
        let mut queue = VecDeque::from([(root.clone(), 0usize)]);
        let mut shown = 0usize;
        let mut page = HierarchyPage::default();
        while let Some((room_id, depth)) = queue.pop_front() {
            let Some(mut chunk) = self.peekable_room(session, &room_id).await? else {
                if room_id == root {
                    return Err(Error::forbidden("You may not see this space"));
                }
                continue;
            };
            let state = self.store.current_state(room_id.as_str()).await?;
            let mut children = Vec::new();
            for e in state.iter().filter(|e| e.event_type == "m.space.child") {
                let Ok(pdu) = serde_json::from_str::<Value>(&e.pdu_json) else {
                    continue;
                };
                let content = pdu.get("content").cloned().unwrap_or_else(|| json!({}));
                // A child without `via` is no child (the spec's removal).
                if content.get("via").and_then(Value::as_array).is_none_or(Vec::is_empty) {
                    continue;
                }
                if suggested_only && content.get("suggested").and_then(Value::as_bool) != Some(true) {
                    continue;
                }
                let Some(child) = e.state_key.as_deref().and_then(|k| OwnedRoomId::try_from(k).ok()) else {
                    continue;
                };
                children.push(json!({
                    "type": "m.space.child",
                    "state_key": child.as_str(),
                    "content": content,
                    "sender": e.sender,
                    "origin_server_ts": e.origin_server_ts,
                }));
                if depth < max_depth && seen.insert(child.clone()) {
                    queue.push_back((child, depth + 1));
                }
            }
            shown += 1;
            if shown <= skip {
                continue;
            }
            if page.rooms.len() == limit {
                page.next_batch = Some((skip + limit).to_string());
                break;
            }
            chunk["children_state"] = Value::Array(children);
            page.rooms.push(chunk);
        }
        Ok(page)
    }

    /// A room's summary if the caller may see it: joined, or a room anyone
    /// may peek at. `None` for rooms not held here.
    async fn peekable_room(&self, session: &Session, room_id: &OwnedRoomId) -> Result<Option<Value>> {
        if self.store.room_info(room_id.as_str()).await?.is_none() {
            return Ok(None);
        }
        let state = self.store.current_state(room_id.as_str()).await?;
        let chunk = room_chunk(room_id.clone(), &state);
        let joined = self.rooms.membership(room_id, &session.user_id).await?.as_deref() == Some("join");
        let public = chunk.join_rule == ruma::room::JoinRuleKind::Public;
        if !(joined || public || chunk.world_readable) {
            return Ok(None);
        }
        serde_json::to_value(&chunk).map(Some).map_err(Error::internal)
    }
}
