//! Room creation: the initial event sequence `/createRoom` specifies, sent
//! through the same build-authorize-persist path as every other event.

use std::sync::Arc;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId,
};
use serde_json::json;
use weft_core::{Error, Result};

use crate::{EventSpec, RoomCache, Rooms, rules_of};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// A parsed `/createRoom` request.
#[derive(Debug, Clone)]
pub struct CreateRoom {
    pub version: Option<RoomVersionId>,
    pub preset: Preset,
    pub name: Option<String>,
    pub topic: Option<String>,
    /// Everyone invited. Only this server's users get their invite event
    /// here; users of other servers (given the invitees' power level all
    /// the same) must be invited by the caller afterwards, through their
    /// server's `/invite`.
    pub invite: Vec<OwnedUserId>,
    /// Profile fields (`displayname`, `avatar_url`) of invitees for their
    /// invite events, as clients name invited members (and rooms) by them.
    pub invite_profiles: std::collections::BTreeMap<OwnedUserId, CanonicalJsonObject>,
    pub is_direct: bool,
    pub alias: Option<OwnedRoomAliasId>,
    /// (type, state_key, content) from `initial_state`.
    pub initial_state: Vec<(String, String, CanonicalJsonObject)>,
    pub creation_content: Option<CanonicalJsonObject>,
    pub power_level_content_override: Option<CanonicalJsonObject>,
    /// Profile of the creator for their join event.
    pub creator_profile: CanonicalJsonObject,
}

fn obj(v: serde_json::Value) -> Result<CanonicalJsonObject> {
    match CanonicalJsonValue::try_from(v).map_err(Error::internal)? {
        CanonicalJsonValue::Object(o) => Ok(o),
        _ => Err(Error::internal("not an object")),
    }
}

impl Rooms {
    /// Creates a room and returns its ID. All initial events are authorized
    /// like any other; the room becomes visible once all are durable.
    pub async fn create_room(&self, creator: &UserId, req: CreateRoom) -> Result<OwnedRoomId> {
        let version = req.version.clone().unwrap_or_else(|| self.default_version.clone());
        let rules = rules_of(&version)?;
        let v12 = rules.authorization.room_create_event_id_as_room_id;
        let provisional: OwnedRoomId = if v12 {
            OwnedRoomId::try_from("!pending").map_err(Error::internal)?
        } else {
            let local: String = {
                use rand::Rng;
                rand::thread_rng()
                    .sample_iter(rand::distributions::Alphanumeric)
                    .take(18)
                    .map(char::from)
                    .collect()
            };
            OwnedRoomId::try_from(format!("!{local}:{}", self.server_name)).map_err(Error::internal)?
        };
        let mut cache = RoomCache::empty(version.clone(), rules.clone(), provisional);

        let mut events: Vec<EventSpec> = Vec::new();
        let mut create = req.creation_content.clone().unwrap_or_default();
        create.remove("creator");
        create.insert("room_version".into(), CanonicalJsonValue::String(version.to_string()));
        if !rules.authorization.use_room_create_sender {
            create.insert("creator".into(), CanonicalJsonValue::String(creator.to_string()));
        }
        events.push(EventSpec::new("m.room.create", Some(String::new()), create));

        let mut member = req.creator_profile.clone();
        member.insert("membership".into(), CanonicalJsonValue::String("join".into()));
        events.push(EventSpec::new("m.room.member", Some(creator.to_string()), member));

        let mut users = serde_json::Map::new();
        if !rules.authorization.explicitly_privilege_room_creators {
            users.insert(creator.to_string(), json!(100));
        }
        if req.preset == Preset::TrustedPrivateChat {
            for u in &req.invite {
                users.insert(u.to_string(), json!(100));
            }
        }
        let mut power = obj(json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50,
                "m.room.power_levels": 100,
                "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50,
                "m.room.avatar": 50,
                "m.room.tombstone": 100,
                "m.room.server_acl": 100,
                "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": if req.preset == Preset::PublicChat { 50 } else { 0 },
            "notifications": { "room": 50 },
        }))?;
        if let Some(over) = &req.power_level_content_override {
            for (k, v) in over {
                power.insert(k.clone(), v.clone());
            }
        }
        events.push(EventSpec::new("m.room.power_levels", Some(String::new()), power));

        if let Some(alias) = &req.alias {
            events.push(EventSpec::new(
                "m.room.canonical_alias",
                Some(String::new()),
                obj(json!({ "alias": alias.as_str() }))?,
            ));
        }
        let (join_rule, guest) = match req.preset {
            Preset::PublicChat => ("public", "forbidden"),
            _ => ("invite", "can_join"),
        };
        events.push(EventSpec::new(
            "m.room.join_rules",
            Some(String::new()),
            obj(json!({ "join_rule": join_rule }))?,
        ));
        events.push(EventSpec::new(
            "m.room.history_visibility",
            Some(String::new()),
            obj(json!({ "history_visibility": "shared" }))?,
        ));
        events.push(EventSpec::new(
            "m.room.guest_access",
            Some(String::new()),
            obj(json!({ "guest_access": guest }))?,
        ));
        for (t, k, c) in &req.initial_state {
            events.push(EventSpec::new(t.clone(), Some(k.clone()), c.clone()));
        }
        if let Some(name) = &req.name {
            events.push(EventSpec::new(
                "m.room.name",
                Some(String::new()),
                obj(json!({ "name": name }))?,
            ));
        }
        if let Some(topic) = &req.topic {
            events.push(EventSpec::new(
                "m.room.topic",
                Some(String::new()),
                obj(json!({ "topic": topic }))?,
            ));
        }
        for u in req.invite.iter().filter(|u| u.server_name() == self.server_name) {
            let mut c = req.invite_profiles.get(u).cloned().unwrap_or_default();
            c.insert("membership".into(), CanonicalJsonValue::String("invite".into()));
            if req.is_direct {
                c.insert("is_direct".into(), CanonicalJsonValue::Bool(true));
            }
            events.push(EventSpec::new("m.room.member", Some(u.to_string()), c));
        }

        let mut pendings = Vec::with_capacity(events.len());
        for (i, spec) in events.into_iter().enumerate() {
            let (new_event, pdu) = self.build(&cache, creator, spec).await?;
            if i == 0 && v12 {
                cache.room_id = OwnedRoomId::try_from(new_event.room_id.clone()).map_err(Error::internal)?;
            }
            cache.advance(Arc::new(pdu), &new_event);
            pendings.push(self.store.persist_event(new_event));
        }
        for p in pendings {
            p.await.map_err(|_| Error::internal("room creation not persisted"))??;
        }
        let room_id = cache.room_id.clone();
        let mut slot = crate::Slot::default();
        *slot.cache.get_mut() = Some(cache);
        self.slots.lock().insert(room_id.clone(), Arc::new(slot));
        Ok(room_id)
    }
}
