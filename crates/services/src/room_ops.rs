//! Room operations every door shares: creating, joining and leaving rooms,
//! sending events, and reading rooms with membership and history-visibility
//! checks. Authorization of writes is left to the event pipeline's auth
//! rules; this layer adds the read checks and the spec's request semantics.

use crate::text::{check_opt_text, check_text};
use ruma::api::client::room::Visibility as RoomVisibility;
use ruma::api::client::room::create_room::{self, v3::RoomPreset};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomAliasId, OwnedRoomId, OwnedServerName, OwnedUserId,
    RoomId, UserId,
};
use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_rooms::{CreateRoom, EventSpec, Preset, Sent, Visibility, parse_room_version};
use weft_store::{Direction, StoredEvent};

use crate::content::canonical_object;
use crate::events::membership_of;
use crate::filter::EventFilter;
use crate::stream::{client_event, client_event_at};
use crate::tokens::{make_token, parse_token};
use crate::{Services, Session};

/// An `initial_state` entry of `/createRoom`.
#[derive(Debug, Deserialize)]
struct InitialState {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    state_key: String,
    content: Value,
}

/// Where a `/messages` page starts and ends, and which way it walks.
pub struct Pagination<'a> {
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub dir: ruma::api::Direction,
    pub limit: usize,
}

/// A page of `/messages`, its events in the client format the reading
/// device sees (its own transaction IDs included).
pub struct MessagesPage {
    pub chunk: Vec<Value>,
    pub start: String,
    pub end: Option<String>,
    pub state: Vec<Value>,
}

/// A page of `/messages` as stored.
struct StoredPage {
    chunk: Vec<StoredEvent>,
    start: String,
    end: Option<String>,
    state: Vec<StoredEvent>,
}

/// `/context`: an event, the events before it (newest first) and after it
/// (oldest first), tokens to paginate on from either end, and the room
/// state at the event; events in the client format.
pub struct EventContext {
    pub event: Value,
    pub events_before: Vec<Value>,
    pub events_after: Vec<Value>,
    pub start: String,
    pub end: String,
    pub state: Vec<Value>,
}

/// What a user may read of a room: events up to `upto` that `visibility` allows.
pub struct ReadView {
    pub visibility: Visibility,
    pub upto: i64,
    pub membership: Option<String>,
}

impl Services {
    fn room_id(&self, room: &str) -> Result<OwnedRoomId> {
        check_text("Room ID", room)?;
        OwnedRoomId::try_from(room).map_err(|_| Error::invalid_param("Invalid room ID"))
    }

    /// Resolves a room ID or alias to a room ID.
    pub async fn resolve_room(&self, room_or_alias: &str) -> Result<OwnedRoomId> {
        check_text("Room ID or alias", room_or_alias)?;
        if room_or_alias.starts_with('#') {
            let alias = self
                .local_alias(room_or_alias)
                .await?
                .ok_or_else(|| Error::not_found("Room alias not found"))?;
            return self.room_id(&alias.room_id);
        }
        self.room_id(room_or_alias)
    }

    /// A room ID or alias to a room ID and servers to join it through: a
    /// local alias from the database, another server's alias by asking
    /// that server (`/query/directory`).
    pub async fn resolve_room_anywhere(&self, room_or_alias: &str) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        check_text("Room ID or alias", room_or_alias)?;
        if room_or_alias.starts_with('#') {
            let alias = ruma::OwnedRoomAliasId::try_from(room_or_alias)
                .map_err(|_| Error::invalid_param("Invalid room alias"))?;
            if alias.server_name() != self.server_name {
                let answer = self
                    .federation
                    .client
                    .send(
                        alias.server_name(),
                        ruma::api::federation::query::get_room_information::v1::Request::new(alias.clone()),
                    )
                    .await?;
                let mut servers = answer.servers;
                servers.insert(0, alias.server_name().to_owned());
                return Ok((answer.room_id, servers));
            }
        }
        Ok((self.resolve_room(room_or_alias).await?, Vec::new()))
    }

    /// The server of whoever invited `user_id` to `room_id`, if the user
    /// holds an invite there.
    pub(crate) async fn pending_invite_server(
        &self,
        user_id: &UserId,
        room_id: &ruma::RoomId,
    ) -> Result<Option<OwnedServerName>> {
        let Some(m) = self
            .store
            .user_memberships(user_id.as_str())
            .await?
            .into_iter()
            .find(|m| m.room_id == room_id.as_str() && m.membership == "invite")
        else {
            return Ok(None);
        };
        let Some(ev) = self.store.get_event(&m.event_id).await? else {
            return Ok(None);
        };
        Ok(UserId::parse(ev.sender.as_str())
            .ok()
            .map(|u| u.server_name().to_owned()))
    }

    pub(crate) async fn profile_content(&self, user_id: &UserId) -> Result<CanonicalJsonObject> {
        let mut c = CanonicalJsonObject::new();
        if let Some(u) = self.store.get_user(user_id.as_str()).await? {
            if let Some(d) = u.displayname {
                c.insert("displayname".into(), CanonicalJsonValue::String(d));
            }
            if let Some(a) = u.avatar_url {
                c.insert("avatar_url".into(), CanonicalJsonValue::String(a));
            }
        }
        Ok(c)
    }

    /// `POST /createRoom`: every option of the spec's request but
    /// third-party invites (refused with `M_INVALID_PARAM`).
    pub async fn create_room(&self, session: &Session, req: create_room::v3::Request) -> Result<OwnedRoomId> {
        let version = req
            .room_version
            .as_ref()
            .map(|v| parse_room_version(v.as_str()))
            .transpose()?;
        let public = match req.visibility {
            RoomVisibility::Private => false,
            RoomVisibility::Public => true,
            _ => return Err(Error::invalid_param("visibility must be public or private")),
        };
        let preset = match &req.preset {
            Some(RoomPreset::PrivateChat) => Preset::PrivateChat,
            Some(RoomPreset::TrustedPrivateChat) => Preset::TrustedPrivateChat,
            Some(RoomPreset::PublicChat) => Preset::PublicChat,
            Some(other) => return Err(Error::invalid_param(format!("Unknown preset {:?}", other.as_str()))),
            None if public => Preset::PublicChat,
            None => Preset::PrivateChat,
        };
        if !req.invite_3pid.is_empty() {
            return Err(Error::invalid_param("Third-party invites are not supported"));
        }
        // Users of other servers are invited once the room exists, through
        // their server's `/invite` (which must sign the event): an invite
        // only sent into the room would never reach a server not in it.
        // (`create_room` makes only local users' invite events; the room's
        // power levels still count every invitee.)
        let invite = req.invite;
        let remote_invites: Vec<OwnedUserId> = invite
            .iter()
            .filter(|u| u.server_name() != self.server_name)
            .cloned()
            .collect();
        let mut invite_profiles = std::collections::BTreeMap::new();
        for u in &invite {
            if u.server_name() == self.server_name {
                invite_profiles.insert(u.clone(), self.profile_content(u).await?);
            }
        }
        let alias = match &req.room_alias_name {
            Some(local) => {
                check_text("room_alias_name", local)?;
                if local.is_empty() || local.contains(':') || local.contains('#') || local.contains(char::is_whitespace)
                {
                    return Err(Error::invalid_param("Invalid room_alias_name"));
                }
                let alias = OwnedRoomAliasId::try_from(format!("#{local}:{}", self.server_name))
                    .map_err(|_| Error::invalid_param("Invalid room_alias_name"))?;
                if self.store.resolve_alias(alias.as_str()).await?.is_some() {
                    return Err(Error::new(ErrorKind::RoomInUse, "Room alias already taken"));
                }
                self.check_alias_not_exclusive(alias.as_str(), session.user_id.as_str())?;
                Some(alias)
            }
            None => None,
        };
        let mut initial_state = Vec::new();
        for s in &req.initial_state {
            let s: InitialState = raw_json(s)?;
            initial_state.push((s.event_type, s.state_key, canonical_object(s.content)?));
        }
        let creation_content = req
            .creation_content
            .as_ref()
            .map(|c| raw_json(c).and_then(canonical_object))
            .transpose()?;
        let power_level_content_override = req
            .power_level_content_override
            .as_ref()
            .map(|c| raw_json(c).and_then(canonical_object))
            .transpose()?;
        let room_id = self
            .rooms
            .create_room(
                &session.user_id,
                CreateRoom {
                    version,
                    preset,
                    name: req.name,
                    topic: req.topic,
                    invite,
                    invite_profiles,
                    is_direct: req.is_direct,
                    alias: alias.clone(),
                    initial_state,
                    creation_content,
                    power_level_content_override,
                    creator_profile: self.profile_content(&session.user_id).await?,
                },
            )
            .await?;
        if let Some(alias) = alias
            && !self
                .store
                .create_alias(alias.as_str(), room_id.as_str(), session.user_id.as_str())
                .await?
        {
            return Err(Error::new(ErrorKind::RoomInUse, "Room alias already taken"));
        }
        if public {
            self.store.set_room_public(room_id.as_str(), true).await?;
        }
        for target in remote_invites {
            let mut content = CanonicalJsonObject::new();
            content.insert("membership".into(), CanonicalJsonValue::String("invite".into()));
            if req.is_direct {
                content.insert("is_direct".into(), CanonicalJsonValue::Bool(true));
            }
            let spec = EventSpec::new("m.room.member", Some(target.to_string()), content);
            // The room is made either way (as Synapse does); an invite its
            // server refused or did not answer can be sent again.
            if let Err(e) = self.invite_remote(&session.user_id, &room_id, &target, spec).await {
                tracing::warn!(%room_id, %target, "createRoom's invite failed: {}", e.message);
            }
        }
        Ok(room_id)
    }

    /// Joins a room by ID or alias.
    pub async fn join(&self, user_id: &UserId, room_or_alias: &str) -> Result<OwnedRoomId> {
        self.join_via(user_id, room_or_alias, &[]).await
    }

    /// Joins a room by ID or alias; a room this server is not in is joined
    /// through another server: those in `via`, the alias's, the room ID's,
    /// the inviter's.
    pub async fn join_via(
        &self,
        user_id: &UserId,
        room_or_alias: &str,
        via: &[OwnedServerName],
    ) -> Result<OwnedRoomId> {
        let (room_id, mut servers) = self.resolve_room_anywhere(room_or_alias).await?;
        servers.extend(via.iter().cloned());
        let known = self.store.room_info(room_id.as_str()).await?.is_some();
        let in_room = if known {
            self.rooms.servers_in_room(&room_id).await?
        } else {
            Default::default()
        };
        let resident = in_room.contains(&self.server_name);
        let others = !in_room.is_empty();
        if !resident && (!known || others) {
            if let Some(inviter) = self.pending_invite_server(user_id, &room_id).await? {
                servers.push(inviter);
            }
            let candidates = crate::federation_rooms::join_candidates(&room_id, &servers, None);
            if !known && candidates.iter().all(|s| *s == self.server_name) {
                return Err(Error::not_found("Room not found"));
            }
            self.join_remote(user_id, &room_id, &candidates).await?;
            return Ok(room_id);
        }
        if !known {
            return Err(Error::not_found("Room not found"));
        }
        let membership = self.rooms.membership(&room_id, user_id).await?;
        if membership.as_deref() == Some("join") {
            return Ok(room_id);
        }
        let mut content = self.profile_content(user_id).await?;
        content.insert("membership".into(), CanonicalJsonValue::String("join".into()));
        if membership.as_deref() != Some("invite")
            && let Some(authoriser) = self.restricted_join_authoriser(user_id, &room_id).await?
        {
            content.insert(
                "join_authorised_via_users_server".into(),
                CanonicalJsonValue::String(authoriser.to_string()),
            );
        }
        self.rooms
            .send(
                &room_id,
                user_id,
                EventSpec::new("m.room.member", Some(user_id.to_string()), content),
            )
            .await?;
        Ok(room_id)
    }

    /// A join to a room with a `restricted` join rule (spec: "Restricted
    /// rooms"): allowed for a joined member of one of the rule's `allow`
    /// rooms (those this server is in), and then signed for by a member of
    /// ours who may invite (`None`: the room is not restricted, the join
    /// rule decides). `M_FORBIDDEN` when the user is in none of the rooms or
    /// no member of ours can invite.
    async fn restricted_join_authoriser(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<OwnedUserId>> {
        let Some((allow, authoriser)) = self.rooms.restricted_join(room_id, &self.server_name).await? else {
            return Ok(None);
        };
        let mut allowed = false;
        for room in &allow {
            if self.store.room_info(room.as_str()).await?.is_some()
                && self.rooms.membership(room, user_id).await?.as_deref() == Some("join")
            {
                allowed = true;
                break;
            }
        }
        if !allowed {
            return Err(Error::forbidden(
                "You are not invited to this room, nor a member of a room that gives access to it",
            ));
        }
        authoriser
            .map(Some)
            .ok_or_else(|| Error::forbidden("No member of this server can let you into this room"))
    }

    /// Sends a membership change for `target` (invite, leave, kick, ban, unban).
    pub async fn set_membership(
        &self,
        sender: &UserId,
        room: &str,
        target: &str,
        membership: &str,
        reason: Option<String>,
    ) -> Result<Sent> {
        let room_id = self.room_id(room)?;
        check_text("User ID", target)?;
        let target = OwnedUserId::try_from(target).map_err(|_| Error::invalid_param("Invalid user_id"))?;
        let resident = self.store.room_info(room_id.as_str()).await?.is_some()
            && self.rooms.server_in_room(&room_id, &self.server_name).await?;
        if membership == "leave" && target == sender && !resident {
            // Refusing an invite to (or leaving) a room this server is not
            // in goes through the inviter's server.
            if let Some(server) = self.pending_invite_server(sender, &room_id).await? {
                return self.leave_remote_room(sender, &room_id, &server).await;
            }
        }
        if self.store.room_info(room_id.as_str()).await?.is_none() {
            return Err(Error::forbidden("You are not in this room"));
        }
        if membership == "invite"
            && target.server_name() == self.server_name
            && self.store.get_user(target.as_str()).await?.is_none()
        {
            return Err(Error::not_found("User does not exist"));
        }
        let current = self.rooms.membership(&room_id, &target).await?;
        if membership == "invite" && current.as_deref() == Some("join") {
            return Err(Error::forbidden("User is already in the room"));
        }
        // An invite carries the invitee's display name and avatar (when
        // they are ours), as clients name invited members and rooms by them.
        let mut content = if membership == "invite" && target.server_name() == self.server_name {
            self.profile_content(&target).await?
        } else {
            CanonicalJsonObject::new()
        };
        content.insert("membership".into(), CanonicalJsonValue::String(membership.into()));
        if let Some(r) = reason {
            content.insert("reason".into(), CanonicalJsonValue::String(r));
        }
        if membership == "leave" && target == sender && current.is_none() {
            return Err(Error::forbidden("You are not in this room"));
        }
        if membership == "invite" && target.server_name() != self.server_name {
            let spec = EventSpec::new("m.room.member", Some(target.to_string()), content);
            return self.invite_remote(sender, &room_id, &target, spec).await;
        }
        self.rooms
            .send(
                &room_id,
                sender,
                EventSpec::new("m.room.member", Some(target.to_string()), content),
            )
            .await
    }

    /// Sends a timeline or state event, idempotent per device and `txn_id`.
    pub async fn send_event(
        &self,
        session: &Session,
        room: &str,
        event_type: &str,
        state_key: Option<&str>,
        txn_id: Option<&str>,
        content: Value,
    ) -> Result<OwnedEventId> {
        self.send_event_at(session, room, event_type, state_key, txn_id, content, None)
            .await
    }

    /// [`Services::send_event`] with `origin_server_ts` set to `ts`: only an
    /// application service may (its `?ts=`); for anyone else it is ignored.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_event_at(
        &self,
        session: &Session,
        room: &str,
        event_type: &str,
        state_key: Option<&str>,
        txn_id: Option<&str>,
        content: Value,
        ts: Option<u64>,
    ) -> Result<OwnedEventId> {
        let room_id = self.room_id(room)?;
        // A transaction ID this process saw lately is looked up first (a
        // client's retry). Any other cannot have been used here, and one
        // used through another process is refused by the store (its
        // transaction IDs are unique) and answered below: the common send
        // is spared a read.
        let seen = txn_id.is_some_and(|txn| self.sent_txns.lock().note(session, room_id.as_str(), event_type, txn));
        if seen && let Some(id) = self.txn_event(session, &room_id, event_type, txn_id).await? {
            return Ok(id);
        }
        let mut spec = event_spec(session, event_type, state_key, txn_id, content)?;
        if session.appservice.is_some() {
            spec.origin_server_ts = ts;
        }
        if event_type == crate::files::FILE_TAGS {
            self.check_tags_target(&session.user_id, room_id.as_str(), state_key)
                .await?;
        }
        let sent = match self.rooms.submit(&room_id, &session.user_id, spec).await {
            Ok(submitted) => submitted.durable().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(sent) => {
                // Sending counts as activity for presence.
                self.note_active(&session.user_id).await;
                Ok(sent.event_id)
            }
            // An unknown room reads as one you are not in.
            Err(e) if e.kind == ErrorKind::NotFound => Err(Error::forbidden("You are not in this room")),
            Err(e) => {
                // A concurrent request with the same txn may have won.
                match self.txn_event(session, &room_id, event_type, txn_id).await? {
                    Some(id) => Ok(id),
                    None => Err(e),
                }
            }
        }
    }

    /// Like [`Services::send_event`] without a transaction ID, but returns
    /// once the event is authorized and queued for the store, so a door can
    /// accept its client's next message while this one commits. Await
    /// [`weft_rooms::Submitted::durable`] before acknowledging it.
    pub async fn submit_event(
        &self,
        session: &Session,
        room_id: &RoomId,
        event_type: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Result<weft_rooms::Submitted> {
        let spec = event_spec(session, event_type, state_key, None, content)?;
        if event_type == crate::files::FILE_TAGS {
            self.check_tags_target(&session.user_id, room_id.as_str(), state_key)
                .await?;
        }
        self.rooms
            .submit(room_id, &session.user_id, spec)
            .await
            .map_err(|e| match e.kind {
                ErrorKind::NotFound => Error::forbidden("You are not in this room"),
                _ => e,
            })
    }

    /// The event an earlier request with this transaction ID created, if any.
    async fn txn_event(
        &self,
        session: &Session,
        room_id: &OwnedRoomId,
        event_type: &str,
        txn_id: Option<&str>,
    ) -> Result<Option<OwnedEventId>> {
        let Some(txn) = txn_id else { return Ok(None) };
        let found = self
            .store
            .txn_event(
                session.user_id.as_str(),
                &session.device_id,
                room_id.as_str(),
                event_type,
                txn,
            )
            .await?;
        found
            .map(|id| OwnedEventId::try_from(id).map_err(Error::internal))
            .transpose()
    }

    pub async fn redact(
        &self,
        session: &Session,
        room: &str,
        event_id: &str,
        txn_id: &str,
        reason: Option<String>,
    ) -> Result<OwnedEventId> {
        let mut content = serde_json::Map::new();
        content.insert("redacts".into(), json!(event_id));
        if let Some(r) = reason {
            content.insert("reason".into(), json!(r));
        }
        self.send_event(
            session,
            room,
            "m.room.redaction",
            None,
            Some(txn_id),
            Value::Object(content),
        )
        .await
    }

    /// What `user_id` may read of a room; `M_FORBIDDEN` if nothing.
    pub async fn read_view(&self, user_id: &UserId, room: &str) -> Result<(OwnedRoomId, ReadView)> {
        let room_id = self.room_id(room)?;
        let not_member = || Error::forbidden("You are not allowed to view this room");
        if self.store.room_info(room_id.as_str()).await?.is_none() {
            return Err(not_member());
        }
        let visibility = Visibility::load(&*self.store, room_id.as_str(), user_id.as_str()).await?;
        let membership = self.rooms.membership(&room_id, user_id).await?;
        let upto = match membership.as_deref() {
            Some("join") => i64::MAX,
            _ if visibility.world_readable_now() => i64::MAX,
            Some("leave") | Some("ban") => {
                // Up to the moment they left, if they were ever joined.
                let joined_before = self
                    .store
                    .membership_history(room_id.as_str(), user_id.as_str())
                    .await?;
                if !joined_before.iter().any(|(_, m)| m == "join") {
                    return Err(not_member());
                }
                joined_before.last().map(|(p, _)| *p).unwrap_or(0)
            }
            _ => return Err(not_member()),
        };
        Ok((
            room_id,
            ReadView {
                visibility,
                upto,
                membership,
            },
        ))
    }

    /// State of a room as the user may see it (current, or when they left).
    pub async fn room_state(&self, user_id: &UserId, room: &str) -> Result<Vec<StoredEvent>> {
        let (room_id, view) = self.read_view(user_id, room).await?;
        if view.upto == i64::MAX {
            self.store.current_state(room_id.as_str()).await
        } else {
            self.store.state_at(room_id.as_str(), view.upto).await
        }
    }

    pub async fn state_event(
        &self,
        user_id: &UserId,
        room: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<StoredEvent> {
        self.room_state(user_id, room)
            .await?
            .into_iter()
            .find(|e| e.event_type == event_type && e.state_key.as_deref() == Some(state_key))
            .ok_or_else(|| Error::not_found("Event not found"))
    }

    /// One event as `session`'s device sees it (the client format), if
    /// the user may see it.
    pub async fn event(&self, session: &Session, room: &str, event_id: &str) -> Result<Value> {
        let ev = self.visible_event(&session.user_id, room, event_id).await?;
        Ok(client_event(&ev, session))
    }

    /// One event, if the user may see it.
    pub(crate) async fn visible_event(&self, user_id: &UserId, room: &str, event_id: &str) -> Result<StoredEvent> {
        // The spec answers "not found or not allowed" alike, so nothing leaks.
        let (room_id, view) = self.read_view(user_id, room).await.map_err(|e| {
            if e.kind == ErrorKind::Forbidden {
                Error::not_found("Event not found")
            } else {
                e
            }
        })?;
        let ev = self.store.get_event(event_id).await?;
        match ev {
            Some(ev)
                if ev.room_id == room_id.as_str()
                    && ev.position <= view.upto
                    && view.visibility.can_see(ev.position) =>
            {
                Ok(ev)
            }
            _ => Err(Error::not_found("Event not found")),
        }
    }

    /// `/messages`: a page of events from `from` in direction `dir`, as
    /// `session`'s device sees them.
    pub async fn messages(
        &self,
        session: &Session,
        room: &str,
        page: Pagination<'_>,
        filter: &EventFilter,
    ) -> Result<MessagesPage> {
        let page = self.stored_messages(&session.user_id, room, page, filter).await?;
        let now = weft_core::now_ms();
        let fmt = |e: &StoredEvent| client_event_at(e, session, now);
        Ok(MessagesPage {
            chunk: page.chunk.iter().map(fmt).collect(),
            start: page.start,
            end: page.end,
            state: page.state.iter().map(fmt).collect(),
        })
    }

    /// [`Services::messages`], the events as stored.
    async fn stored_messages(
        &self,
        user_id: &UserId,
        room: &str,
        page: Pagination<'_>,
        filter: &EventFilter,
    ) -> Result<StoredPage> {
        let Pagination { from, to, dir, limit } = page;
        let dir = match dir {
            ruma::api::Direction::Backward => Direction::Backward,
            ruma::api::Direction::Forward => Direction::Forward,
        };
        let (room_id, view) = self.read_view(user_id, room).await?;
        let limit = limit.clamp(1, 1000);
        let now = self.store.current_position().min(view.upto);
        let from_pos = match from {
            Some(t) => parse_token(t)?,
            None if dir == Direction::Backward => now,
            None => 0,
        };
        let to_pos = to.map(parse_token).transpose()?;
        let mut chunk = Vec::new();
        let mut cursor = from_pos.min(now);
        let mut end = None;
        // History older than this server's join of a room comes from
        // another server in it, a few pages at most per request.
        let mut backfills = 0;
        // Keep reading until the page is full or history ends; events the
        // user may not see or the filter drops do not count.
        loop {
            let batch = match dir {
                Direction::Backward => {
                    // Backfilled history lies below zero.
                    let bound = to_pos.unwrap_or(i64::MIN);
                    self.store
                        .room_events(room_id.as_str(), cursor + 1, bound, dir, limit)
                        .await?
                }
                Direction::Forward => {
                    let bound = to_pos.map(|t| t + 1).unwrap_or(i64::MAX).min(now + 1);
                    self.store
                        .room_events(room_id.as_str(), cursor, bound, dir, limit)
                        .await?
                }
            };
            let exhausted = batch.len() < limit;
            for ev in batch {
                cursor = match dir {
                    Direction::Backward => ev.position - 1,
                    Direction::Forward => ev.position,
                };
                if view.visibility.can_see(ev.position) && filter.matches(&ev) {
                    chunk.push(ev);
                    if chunk.len() == limit {
                        break;
                    }
                }
            }
            if chunk.len() == limit {
                end = Some(make_token(cursor));
                break;
            }
            if exhausted {
                if dir == Direction::Backward
                    && to_pos.is_none()
                    && backfills < 3
                    && self.backfill_room(&room_id, limit.max(20)).await.unwrap_or(0) > 0
                {
                    backfills += 1;
                    continue;
                }
                break;
            }
        }
        let state = if filter.lazy_load_members {
            let senders: std::collections::HashSet<&str> = chunk.iter().map(|e| e.sender.as_str()).collect();
            self.store
                .current_state(room_id.as_str())
                .await?
                .into_iter()
                .filter(|e| {
                    e.event_type == "m.room.member" && e.state_key.as_deref().is_some_and(|k| senders.contains(k))
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(StoredPage {
            chunk,
            start: make_token(from_pos),
            end,
            state,
        })
    }

    /// `/context`: events around one event, and the state at it. Events
    /// are in the client format without transaction IDs.
    pub async fn context(
        &self,
        user_id: &UserId,
        room: &str,
        event_id: &str,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<EventContext> {
        let ev = self.visible_event(user_id, room, event_id).await?;
        let half = limit.div_ceil(2).max(if limit == 0 { 0 } else { 1 });
        let before = if limit == 0 {
            StoredPage {
                chunk: vec![],
                start: make_token(ev.position - 1),
                end: Some(make_token(ev.position - 1)),
                state: vec![],
            }
        } else {
            self.stored_messages(
                user_id,
                room,
                Pagination {
                    from: Some(&make_token(ev.position - 1)),
                    to: None,
                    dir: ruma::api::Direction::Backward,
                    limit: half,
                },
                filter,
            )
            .await?
        };
        let after = if limit == 0 {
            StoredPage {
                chunk: vec![],
                start: make_token(ev.position),
                end: Some(make_token(ev.position)),
                state: vec![],
            }
        } else {
            self.stored_messages(
                user_id,
                room,
                Pagination {
                    from: Some(&make_token(ev.position)),
                    to: None,
                    dir: ruma::api::Direction::Forward,
                    limit: limit - half.min(limit),
                },
                filter,
            )
            .await?
        };
        let state = self.store.state_at(&ev.room_id, ev.position).await?;
        let now = weft_core::now_ms();
        let fmt = |e: &StoredEvent| weft_rooms::client_event(e, None, now);
        Ok(EventContext {
            event: fmt(&ev),
            events_before: before.chunk.iter().map(fmt).collect(),
            events_after: after.chunk.iter().map(fmt).collect(),
            start: before.end.unwrap_or_else(|| make_token(0)),
            end: after.end.unwrap_or_else(|| make_token(self.store.current_position())),
            state: state.iter().map(fmt).collect(),
        })
    }

    /// Member events of a room, optionally filtered by membership.
    async fn members(
        &self,
        user_id: &UserId,
        room: &str,
        membership: Option<&str>,
        not_membership: Option<&str>,
    ) -> Result<Vec<StoredEvent>> {
        let state = self.room_state(user_id, room).await?;
        Ok(state
            .into_iter()
            .filter(|e| e.event_type == "m.room.member")
            .filter(|e| {
                let m = membership_of(e);
                membership.is_none_or(|want| m.as_deref() == Some(want))
                    && not_membership.is_none_or(|no| m.as_deref() != Some(no))
            })
            .collect())
    }

    /// `GET /rooms/{id}/members`: the member events the caller may see, in
    /// the client format.
    pub async fn member_events(
        &self,
        session: &Session,
        room: &str,
        membership: Option<&str>,
        not_membership: Option<&str>,
    ) -> Result<Vec<Value>> {
        let members = self.members(&session.user_id, room, membership, not_membership).await?;
        Ok(members.iter().map(|e| client_event(e, session)).collect())
    }

    /// `GET /rooms/{id}/joined_members`: each joined user's member-event
    /// content (display name, avatar).
    pub async fn joined_member_contents(&self, session: &Session, room: &str) -> Result<Vec<(String, Value)>> {
        let members = self.members(&session.user_id, room, Some("join"), None).await?;
        Ok(members
            .iter()
            .filter_map(|e| {
                let user = e.state_key.clone()?;
                let content = serde_json::from_str::<Value>(&e.pdu_json)
                    .ok()
                    .and_then(|v| v.get("content").cloned())
                    .unwrap_or_else(|| json!({}));
                Some((user, content))
            })
            .collect())
    }

    /// `GET /rooms/{id}/state`: the state the caller may see, in the
    /// client format.
    pub async fn state_events(&self, session: &Session, room: &str) -> Result<Vec<Value>> {
        let state = self.room_state(&session.user_id, room).await?;
        Ok(state.iter().map(|e| client_event(e, session)).collect())
    }

    pub async fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<String>> {
        Ok(self
            .store
            .user_memberships(user_id.as_str())
            .await?
            .into_iter()
            .filter(|m| m.membership == "join")
            .map(|m| m.room_id)
            .collect())
    }

    pub async fn forget(&self, user_id: &UserId, room: &str) -> Result<()> {
        let room_id = self.room_id(room)?;
        match self.rooms.membership(&room_id, user_id).await {
            Ok(Some(m)) if m == "join" || m == "invite" => {
                Err(Error::new(ErrorKind::Unknown, "You must leave the room before forgetting it").with_status(400))
            }
            Ok(Some(_)) => self.store.forget_room(user_id.as_str(), room_id.as_str()).await,
            _ => Err(Error::not_found("You are not a member of this room")),
        }
    }

    /// The content of a state event, for `GET /rooms/{room}/state/{type}/{key}`.
    pub async fn state_content(
        &self,
        user_id: &UserId,
        room: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Value> {
        let ev = self.state_event(user_id, room, event_type, state_key).await?;
        Ok(serde_json::from_str::<Value>(&ev.pdu_json)
            .ok()
            .and_then(|mut v| v.get_mut("content").map(Value::take))
            .unwrap_or_else(|| json!({})))
    }

    /// A state event in the client format as `session`'s device sees it,
    /// for `GET /rooms/{room}/state/{type}/{key}?format=event`.
    pub async fn state_client_event(
        &self,
        session: &Session,
        room: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Value> {
        let ev = self.state_event(&session.user_id, room, event_type, state_key).await?;
        Ok(crate::stream::client_event(&ev, session))
    }

    // ---- aliases ----

    /// The room an alias of this server names.
    pub async fn alias_room(&self, alias: &str) -> Result<OwnedRoomId> {
        let record = self
            .local_alias(alias)
            .await?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        self.room_id(&record.room_id)
    }

    /// The local aliases of a room the user may read.
    pub async fn room_aliases(&self, user_id: &UserId, room: &str) -> Result<Vec<String>> {
        let (room_id, _) = self.read_view(user_id, room).await?;
        self.store.room_aliases(room_id.as_str()).await
    }

    pub async fn put_alias(&self, user_id: &UserId, alias: &str, room_id: &str) -> Result<()> {
        check_text("Room alias", alias)?;
        let alias_id = OwnedRoomAliasId::try_from(alias).map_err(|_| Error::invalid_param("Invalid room alias"))?;
        if alias_id.server_name() != self.server_name {
            return Err(Error::invalid_param("Alias must be on this server"));
        }
        self.check_alias_not_exclusive(alias_id.as_str(), user_id.as_str())?;
        let room_id = self.room_id(room_id)?;
        if self.store.room_info(room_id.as_str()).await?.is_none() {
            return Err(Error::not_found("Room not found"));
        }
        if self.rooms.membership(&room_id, user_id).await?.as_deref() != Some("join") {
            return Err(Error::forbidden("You must be in the room to give it an alias"));
        }
        if !self
            .store
            .create_alias(alias_id.as_str(), room_id.as_str(), user_id.as_str())
            .await?
        {
            return Err(Error::new(ErrorKind::Unknown, "Room alias already exists").with_status(409));
        }
        Ok(())
    }

    pub async fn delete_alias(&self, user_id: &UserId, alias: &str) -> Result<()> {
        check_text("Room alias", alias)?;
        let record = self
            .store
            .resolve_alias(alias)
            .await?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        let is_admin = self.store.get_user(user_id.as_str()).await?.is_some_and(|u| u.admin);
        if record.creator != user_id.as_str() && !is_admin {
            return Err(Error::forbidden("Only the alias creator or an admin may delete it"));
        }
        self.store.delete_alias(alias).await?;
        Ok(())
    }
}

/// A part of a typed request that ruma keeps as raw JSON, read as `T`;
/// `M_BAD_JSON` if it is not one.
fn raw_json<T: serde::de::DeserializeOwned, R>(raw: &ruma::serde::Raw<R>) -> Result<T> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(format!("Invalid request body: {e}")))
}

/// Checks what a client may send and turns it into the pipeline's request.
fn event_spec(
    session: &Session,
    event_type: &str,
    state_key: Option<&str>,
    txn_id: Option<&str>,
    content: Value,
) -> Result<EventSpec> {
    check_event_type(event_type)?;
    if let Some(key) = state_key {
        check_state_key(key)?;
    }
    check_opt_text("Transaction ID", txn_id)?;
    if matches!(event_type, "m.room.create") {
        return Err(Error::forbidden("Cannot send m.room.create"));
    }
    if event_type == crate::files::FILE_TAGS {
        match &content {
            Value::Object(m) => crate::files::check_tags_content(m)?,
            _ => return Err(Error::bad_json("Content must be a JSON object")),
        }
    }
    let mut content = canonical_object(content)?;
    check_content_size(&content)?;
    let mut redacts = None;
    if event_type == "m.room.redaction" {
        let target = content.get("redacts").and_then(|v| v.as_str()).map(str::to_owned);
        check_opt_text("redacts", target.as_deref())?;
        redacts = target.map(|t| OwnedEventId::try_from(t).map_err(|_| Error::bad_json("Invalid redacts")));
        if redacts.is_some() {
            content.remove("redacts");
        }
    }
    let redacts = redacts.transpose()?;
    Ok(EventSpec {
        event_type: event_type.to_owned(),
        state_key: state_key.map(str::to_owned),
        content,
        redacts,
        txn: txn_id.map(|t| (session.device_id.clone(), t.to_owned())),
        origin_server_ts: None,
    })
}

/// Largest event the spec allows, as a PDU (signatures and all).
pub const MAX_PDU_BYTES: usize = 65_535;
/// Longest event type and state key the spec allows, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// An event type a client may send: 1 to 255 bytes (the spec's size
/// limit) without control characters (U+0000 to U+001F, U+007F to U+009F).
/// The spec gives event types no stricter grammar (its namespaced
/// identifier grammar is for new identifiers only, and existing types use
/// capitals, `-` and more), so nothing else is refused; the doors that put
/// types into names of their own (MQTT topics) escape the rest.
pub fn check_event_type(event_type: &str) -> Result<()> {
    if event_type.is_empty() || event_type.len() > MAX_ID_BYTES {
        return Err(Error::invalid_param("Event type must be 1 to 255 bytes"));
    }
    if event_type.chars().any(char::is_control) {
        return Err(Error::invalid_param("Event type must not contain control characters"));
    }
    Ok(())
}

/// A state key a client may send: at most 255 bytes (the spec's size
/// limit), without control characters.
pub fn check_state_key(state_key: &str) -> Result<()> {
    if state_key.len() > MAX_ID_BYTES {
        return Err(Error::invalid_param("State key must be at most 255 bytes"));
    }
    if state_key.chars().any(char::is_control) {
        return Err(Error::invalid_param("State key must not contain control characters"));
    }
    Ok(())
}

/// Content that alone exceeds the PDU size limit is refused before it
/// reaches the room (`M_TOO_LARGE`); content that fits alone but not in
/// the whole event is refused the same way when the event is built.
fn check_content_size(content: &CanonicalJsonObject) -> Result<()> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, content).map_err(Error::internal)?;
    if n.0 > MAX_PDU_BYTES {
        return Err(Error::new(ErrorKind::TooLarge, "Event is too large"));
    }
    Ok(())
}

/// Hashes of the transaction IDs (with their sender, device, room and
/// event type) sent through this process lately, so a send with a new one
/// needs no database read to know it is new. Two generations of at most
/// [`SentTxns::GENERATION`] each: the older is dropped when the newer
/// fills. A hash shared by chance only costs a read. Kept in this process's
/// memory (docs/operations.md); the store's unique transaction IDs are what
/// makes a retry through another process, or after a restart, answer the
/// first event.
#[derive(Default)]
pub(crate) struct SentTxns {
    hasher: std::hash::RandomState,
    new: std::collections::HashSet<u64>,
    old: std::collections::HashSet<u64>,
}

impl SentTxns {
    const GENERATION: usize = 50_000;

    /// Notes a transaction; answers whether it was noted before.
    fn note(&mut self, session: &Session, room: &str, event_type: &str, txn: &str) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((
            session.user_id.as_str(),
            session.device_id.as_str(),
            room,
            event_type,
            txn,
        ));
        if self.new.contains(&h) || self.old.contains(&h) {
            return true;
        }
        if self.new.len() >= Self::GENERATION {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert(h);
        false
    }
}
