//! What users keep on the server besides rooms: profiles (propagated to
//! their member events), filters and account data, and the public room
//! directory. Every door reaches these through here, never through the
//! store.

use ruma::directory::{PublicRoomsChunk, PublicRoomsChunkInit};
use ruma::room::{JoinRuleKind, RoomType};
use ruma::{OwnedRoomId, UInt};
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_store::ProfileField;

use crate::content::canonical_object;
use crate::filter::SyncFilter;
use crate::{Services, Session};

/// The longest display name or avatar URL, in bytes.
const MAX_PROFILE_VALUE: usize = 256 * 4;

fn profile_field(name: &str) -> Result<ProfileField> {
    match name {
        "displayname" => Ok(ProfileField::DisplayName),
        "avatar_url" => Ok(ProfileField::AvatarUrl),
        _ => Err(Error::new(
            ErrorKind::Unrecognized {
                method_not_allowed: false,
            },
            "Unknown profile field",
        )),
    }
}

/// Refuses access to another user's data.
fn own(session: &Session, user_id: &str) -> Result<()> {
    if session.user_id.as_str() != user_id {
        return Err(Error::forbidden("Cannot access another user's data"));
    }
    Ok(())
}

impl Services {
    /// A user's profile: `displayname` and `avatar_url` where set; a
    /// user of another server's is asked of that server (federation).
    pub async fn profile(&self, user_id: &str) -> Result<serde_json::Map<String, Value>> {
        match crate::federation::parse_user_id(user_id) {
            Ok(id) if id.server_name() != self.server_name => self.remote_profile(id, None).await,
            _ => {
                // An unknown user of an application service's namespace
                // is asked of the service, which may create it.
                self.user_exists_or_queried(user_id).await?;
                self.local_profile(user_id).await
            }
        }
    }

    /// An active local user's profile: `displayname` and `avatar_url`
    /// where set.
    pub(crate) async fn local_profile(&self, user_id: &str) -> Result<serde_json::Map<String, Value>> {
        let u = self
            .store
            .get_user(user_id)
            .await?
            .filter(|u| !u.deactivated)
            .ok_or_else(|| Error::not_found("Profile not found"))?;
        let mut out = serde_json::Map::new();
        if let Some(d) = u.displayname {
            out.insert("displayname".into(), d.into());
        }
        if let Some(a) = u.avatar_url {
            out.insert("avatar_url".into(), a.into());
        }
        Ok(out)
    }

    /// One field of a profile (`displayname`, `avatar_url`).
    pub async fn profile_field(&self, user_id: &str, name: &str) -> Result<Value> {
        profile_field(name)?;
        let profile = self.profile(user_id).await?;
        match profile.get(name) {
            Some(v) => Ok(json!({ name: v })),
            None => Err(Error::not_found("Profile field not set")),
        }
    }

    /// Sets (or, with `None`, clears) a field of the session user's own
    /// profile, and updates their member event in every joined room, as
    /// other homeservers do.
    pub async fn set_profile_field(
        &self,
        session: &Session,
        user_id: &str,
        name: &str,
        value: Option<String>,
    ) -> Result<()> {
        let field = profile_field(name)?;
        if user_id != session.user_id.as_str() {
            return Err(Error::forbidden("Cannot set another user's profile"));
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_PROFILE_VALUE) {
            return Err(Error::invalid_param("Value too long"));
        }
        crate::text::check_opt_text(name, value.as_deref())?;
        self.store
            .set_profile_field(session.user_id.as_str(), field, value.clone())
            .await?;
        for room in self.joined_rooms(&session.user_id).await? {
            let mut content = match self
                .state_event(&session.user_id, &room, "m.room.member", session.user_id.as_str())
                .await
            {
                Ok(ev) => serde_json::from_str::<Value>(&ev.pdu_json)
                    .ok()
                    .and_then(|v| v.get("content").cloned())
                    .unwrap_or(json!({})),
                Err(_) => continue,
            };
            match &value {
                Some(v) => content[name] = json!(v),
                None => {
                    if let Some(o) = content.as_object_mut() {
                        o.remove(name);
                    }
                }
            }
            // A room whose rules refuse the update keeps the old member event.
            let _ = self
                .send_event(
                    session,
                    &room,
                    "m.room.member",
                    Some(session.user_id.as_str()),
                    None,
                    content,
                )
                .await;
        }
        Ok(())
    }

    /// Stores a sync filter of the session's user; returns its ID.
    pub async fn put_filter(&self, session: &Session, user_id: &str, filter: Value) -> Result<String> {
        own(session, user_id)?;
        SyncFilter::parse(filter.clone())?;
        self.store.put_filter(user_id, &filter.to_string()).await
    }

    /// A stored sync filter of the session's user.
    pub async fn get_filter(&self, session: &Session, user_id: &str, filter_id: &str) -> Result<Value> {
        own(session, user_id)?;
        let f = self
            .store
            .get_filter(user_id, filter_id)
            .await?
            .ok_or_else(|| Error::not_found("Filter not found"))?;
        serde_json::from_str(&f).map_err(Error::internal)
    }

    /// Sets global (`room` `None`) or per-room account data of the
    /// session's user; not `m.push_rules` or `m.fully_read` (405
    /// `M_BAD_JSON`), which only the push rule endpoints and
    /// `/read_markers` change.
    pub async fn put_account_data(
        &self,
        session: &Session,
        user_id: &str,
        room: Option<&str>,
        data_type: &str,
        content: Value,
    ) -> Result<()> {
        own(session, user_id)?;
        crate::text::check_text("Account data type", data_type)?;
        crate::text::check_opt_text("Room ID", room)?;
        // The spec's answer for account data the server manages.
        if data_type == crate::push_rules::PUSH_RULES {
            return Err(
                Error::bad_json("m.push_rules is managed by the server: use the /pushrules endpoints").with_status(405),
            );
        }
        if data_type == crate::ephemeral::FULLY_READ {
            return Err(Error::bad_json("m.fully_read is managed by the server: use /read_markers").with_status(405));
        }
        let content = canonical_object(content)?;
        let json = serde_json::to_string(&content).map_err(Error::internal)?;
        self.store
            .put_account_data(user_id, room, data_type, &json)
            .await
            .map_err(|_| Error::internal("account data not stored"))??;
        Ok(())
    }

    /// Global or per-room account data of the session's user.
    pub async fn account_data(
        &self,
        session: &Session,
        user_id: &str,
        room: Option<&str>,
        data_type: &str,
    ) -> Result<Value> {
        own(session, user_id)?;
        let v = self
            .store
            .get_account_data(user_id, room, data_type)
            .await?
            .ok_or_else(|| Error::not_found("Account data not found"))?;
        serde_json::from_str(&v).map_err(Error::internal)
    }

    /// The public room directory: each published room's name, topic,
    /// alias, avatar, type, joined members and access settings.
    pub async fn public_rooms(&self) -> Result<Vec<PublicRoomsChunk>> {
        let mut chunk = Vec::new();
        for room_id in self.store.public_rooms().await? {
            let Ok(id) = OwnedRoomId::try_from(room_id.as_str()) else {
                continue;
            };
            let state = self.store.current_state(&room_id).await?;
            let room = room_chunk(id, &state);
            chunk.push(room);
        }
        Ok(chunk)
    }

    /// The current position of the one ordered stream.
    pub fn stream_position(&self) -> i64 {
        self.store.current_position()
    }
}

/// What the room directory (and the space hierarchy) shows of a room, from
/// its current state.
pub(crate) fn room_chunk(id: OwnedRoomId, state: &[weft_store::StoredEvent]) -> PublicRoomsChunk {
    let get = |t: &str, k: &str| -> Option<String> {
        let e = state
            .iter()
            .find(|e| e.event_type == t && e.state_key.as_deref() == Some(""))?;
        let v = serde_json::from_str::<Value>(&e.pdu_json).ok()?;
        v.get("content")?.get(k)?.as_str().map(str::to_owned)
    };
    let joined = state
        .iter()
        .filter(|e| e.event_type == "m.room.member" && crate::events::membership_of(e).as_deref() == Some("join"))
        .count();
    let mut room = PublicRoomsChunk::from(PublicRoomsChunkInit {
        num_joined_members: UInt::new_saturating(joined as u64),
        room_id: id,
        world_readable: get("m.room.history_visibility", "history_visibility").as_deref() == Some("world_readable"),
        guest_can_join: get("m.room.guest_access", "guest_access").as_deref() == Some("can_join"),
    });
    room.name = get("m.room.name", "name");
    room.topic = get("m.room.topic", "topic");
    room.canonical_alias = get("m.room.canonical_alias", "alias").and_then(|a| a.try_into().ok());
    room.avatar_url = get("m.room.avatar", "url").map(Into::into);
    room.join_rule = get("m.room.join_rules", "join_rule")
        .map(|r| JoinRuleKind::from(r.as_str()))
        .unwrap_or(JoinRuleKind::Invite);
    room.room_type = get("m.room.create", "type").map(|t| RoomType::from(t.as_str()));
    room
}
