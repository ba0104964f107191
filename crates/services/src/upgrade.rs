//! Room upgrades (`POST /rooms/{roomId}/upgrade`): a new room of the
//! requested version that carries the old room's transferable state, a
//! tombstone in the old room pointing to it, and the old room's power
//! levels raised so ordinary members can no longer talk or invite there.

use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde_json::{Map, Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_rooms::{CreateRoom, EventSpec, Preset, parse_room_version};

use crate::content::canonical_object;
use crate::{Services, Session};

/// State copied from the old room into the new one, in this order.
const TRANSFERRED: [&str; 9] = [
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.pinned_events",
];

/// Whether a room version gives its creators unlimited power (v12 on).
fn privileges_creators(version: &RoomVersionId) -> bool {
    version
        .rules()
        .is_some_and(|r| r.authorization.explicitly_privilege_room_creators)
}

/// Changes a power-levels content's `users` map (made an empty one if
/// missing or not a map).
fn with_users(pl: &mut Map<String, Value>, f: impl FnOnce(&mut Map<String, Value>)) {
    let mut users = match pl.remove("users") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    f(&mut users);
    pl.insert("users".into(), Value::Object(users));
}

impl Services {
    /// A state event's content in the room's current state (empty state key).
    async fn current_content(&self, room_id: &RoomId, event_type: &str) -> Result<Option<(OwnedUserId, Value)>> {
        Ok(self
            .rooms
            .state_event(room_id, event_type, "")
            .await?
            .and_then(|p| Some((p.sender.clone(), serde_json::from_str::<Value>(p.content.get()).ok()?))))
    }

    /// `POST /rooms/{roomId}/upgrade`: the caller must be joined and have
    /// the power to send `m.room.tombstone`. Creates the replacement room
    /// with `new_version` (one `/createRoom` accepts, else
    /// `M_UNSUPPORTED_ROOM_VERSION`), copying the transferable state and the
    /// power levels, with `predecessor` in its create event; then sends the
    /// tombstone in the old room and raises its `events_default` and
    /// `invite` to at least 50 (and above `users_default`).
    pub async fn upgrade_room(
        &self,
        session: &Session,
        room: &str,
        new_version: &str,
        additional_creators: Vec<OwnedUserId>,
    ) -> Result<OwnedRoomId> {
        let version = parse_room_version(new_version)?;
        let room_id = OwnedRoomId::try_from(room).map_err(|_| Error::invalid_param("Invalid room ID"))?;
        let user = &session.user_id;
        let not_in = || Error::forbidden("You are not in this room");
        let membership = match self.rooms.membership(&room_id, user).await {
            Err(e) if e.kind == ErrorKind::NotFound => return Err(not_in()),
            m => m?,
        };
        if membership.as_deref() != Some("join") {
            return Err(not_in());
        }
        let (may, latest) = self.rooms.state_power(&room_id, user, "m.room.tombstone").await?;
        if !may {
            return Err(Error::forbidden("You don't have permission to upgrade this room"));
        }
        let old_version = self.rooms.room_version(&room_id).await?;

        // The create event: predecessor, room type and federation flag.
        let (creator, old_create) = self
            .current_content(&room_id, "m.room.create")
            .await?
            .ok_or_else(|| Error::internal("room without a create event"))?;
        let mut create = Map::new();
        let mut predecessor = json!({ "room_id": room_id });
        if let Some(latest) = latest {
            predecessor["event_id"] = latest.to_string().into();
        }
        create.insert("predecessor".into(), predecessor);
        for key in ["type", "m.federate"] {
            if let Some(v) = old_create.get(key) {
                create.insert(key.into(), v.clone());
            }
        }
        let new_privileged = privileges_creators(&version);
        if new_privileged && !additional_creators.is_empty() {
            create.insert("additional_creators".into(), json!(additional_creators));
        }

        // Power levels: the old ones, adjusted to how each version treats
        // creators; the upgrader holds at least 100 while the new room's
        // state is sent (versions before 12), the old levels are restored after.
        let old_pl = self.current_content(&room_id, "m.room.power_levels").await?;
        let (restored, initial) = match old_pl {
            Some((_, Value::Object(mut pl))) => {
                let creators = if privileges_creators(&old_version) {
                    let mut creators = vec![creator.to_string()];
                    if let Some(Value::Array(more)) = old_create.get("additional_creators") {
                        creators.extend(more.iter().filter_map(|v| v.as_str().map(str::to_owned)));
                    }
                    creators
                } else {
                    Vec::new()
                };
                with_users(&mut pl, |users| {
                    if new_privileged {
                        users.remove(user.as_str());
                        for c in &additional_creators {
                            users.remove(c.as_str());
                        }
                    } else {
                        // The old room's creators were all-powerful: they
                        // keep the highest ordinary level.
                        for c in creators {
                            users.insert(c, json!(100));
                        }
                    }
                });
                let mut initial = pl.clone();
                if !new_privileged {
                    with_users(&mut initial, |users| {
                        let own = users.get(user.as_str()).and_then(Value::as_i64).unwrap_or(0);
                        users.insert(user.to_string(), json!(own.max(100)));
                    });
                }
                (Some(pl), Some(initial))
            }
            _ => (None, None),
        };

        let mut initial_state = Vec::new();
        for t in TRANSFERRED {
            if let Some((_, content)) = self.current_content(&room_id, t).await? {
                initial_state.push((t.to_owned(), String::new(), canonical_object(content)?));
            }
        }
        let new_room = self
            .rooms
            .create_room(
                user,
                CreateRoom {
                    version: Some(version),
                    preset: Preset::PrivateChat,
                    name: None,
                    topic: None,
                    invite: Vec::new(),
                    invite_profiles: Default::default(),
                    is_direct: false,
                    alias: None,
                    initial_state,
                    creation_content: Some(canonical_object(Value::Object(create))?),
                    power_level_content_override: initial
                        .clone()
                        .map(|pl| canonical_object(Value::Object(pl)))
                        .transpose()?,
                    creator_profile: self.profile_content(user).await?,
                },
            )
            .await?;
        if let Some(restored) = restored
            && Some(&restored) != initial.as_ref()
        {
            self.send_state(&new_room, user, "m.room.power_levels", Value::Object(restored))
                .await?;
        }

        self.send_state(
            &room_id,
            user,
            "m.room.tombstone",
            json!({ "body": "This room has been replaced", "replacement_room": new_room }),
        )
        .await?;

        // Ordinary members can no longer talk or invite in the old room.
        if let Some((_, Value::Object(mut pl))) = self.current_content(&room_id, "m.room.power_levels").await? {
            let users_default = pl.get("users_default").and_then(Value::as_i64).unwrap_or(0);
            let floor = users_default.saturating_add(1).max(50);
            let mut changed = false;
            for key in ["events_default", "invite"] {
                let now = pl.get(key).and_then(Value::as_i64).unwrap_or(0);
                if now < floor {
                    pl.insert(key.into(), json!(floor));
                    changed = true;
                }
            }
            if changed
                && let Err(e) = self
                    .send_state(&room_id, user, "m.room.power_levels", Value::Object(pl))
                    .await
            {
                // The tombstone is sent; an upgrader without the power to
                // change power levels leaves them as they are.
                tracing::warn!("restricting the old room {room_id} after its upgrade: {}", e.message);
            }
        }
        Ok(new_room)
    }

    async fn send_state(&self, room_id: &RoomId, sender: &UserId, event_type: &str, content: Value) -> Result<()> {
        self.rooms
            .send(
                room_id,
                sender,
                EventSpec::new(event_type, Some(String::new()), canonical_object(content)?),
            )
            .await
            .map(|_| ())
    }
}
