//! Rooms across servers: what other servers may read of our rooms (events,
//! state, auth chains, history), the membership handshakes they start here
//! (`make_join`/`send_join`, `make_leave`/`send_leave`), and our users'
//! joins of rooms this server is not in. Rules: a server reads a room only
//! while one of its users is in it, and each event only as its history
//! visibility allows; a server acts only for its own users.

use ruma::api::federation::membership::{
    create_join_event, create_leave_event, prepare_join_event, prepare_leave_event,
};
use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
};
use serde_json::value::RawValue;
use weft_core::{Error, ErrorKind, Result};
use weft_rooms::{Arrival, Outcome, SUPPORTED_VERSIONS};
use weft_store::StoredEvent;

use crate::Services;
use crate::federation_remote::{Network, pdu_object};

/// A stored event as a PDU to hand to another server.
pub fn raw_pdu(ev: &StoredEvent) -> Result<Box<RawValue>> {
    RawValue::from_string(ev.pdu_json.clone()).map_err(Error::internal)
}

/// What `/send_join` answers: the state before the join, the auth chain of
/// that state and the join, and the servers in the room.
pub struct JoinAnswer {
    pub state: Vec<Box<RawValue>>,
    pub auth_chain: Vec<Box<RawValue>>,
    pub servers_in_room: Vec<String>,
}

impl Services {
    /// `origin` may read `room_id`: the room is ours and one of its users
    /// is joined (`403 M_FORBIDDEN` otherwise).
    async fn readable_by(&self, origin: &ServerName, room_id: &RoomId) -> Result<()> {
        if self.store.room_info(room_id.as_str()).await?.is_none()
            || !self.rooms.server_in_room(room_id, origin).await?
        {
            return Err(Error::forbidden(format!("{origin} is not in room {room_id}")));
        }
        self.acl_allows(room_id, origin).await
    }

    /// Stored events as PDUs, those `origin` may see.
    async fn visible_pdus(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        events: Vec<StoredEvent>,
    ) -> Result<Vec<Box<RawValue>>> {
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let Ok(id) = OwnedEventId::try_from(ev.event_id.as_str()) else {
                continue;
            };
            if self.rooms.server_can_see(room_id, &id, origin).await.unwrap_or(false) {
                out.push(raw_pdu(&ev)?);
            }
        }
        Ok(out)
    }

    /// `GET /event/{eventId}`: one event, if `origin` is in its room and
    /// may see it.
    pub async fn federation_event(&self, origin: &ServerName, event_id: &EventId) -> Result<Box<RawValue>> {
        let ev = self
            .store
            .get_event(event_id.as_str())
            .await?
            .ok_or_else(|| Error::not_found("Unknown event"))?;
        let room_id = OwnedRoomId::try_from(ev.room_id.as_str()).map_err(Error::internal)?;
        self.readable_by(origin, &room_id).await?;
        let place = self.store.event_place(event_id.as_str()).await?;
        // Outliers and auth events are served too: the state and auth
        // chains other servers check with are made of them.
        let visible = match place {
            Some(p) if p.outlier || p.rejected.is_some() => true,
            _ => self.rooms.server_can_see(&room_id, event_id, origin).await?,
        };
        if !visible {
            return Err(Error::forbidden("You may not see this event"));
        }
        raw_pdu(&ev)
    }

    /// `GET /state_ids/{roomId}?event_id=`: the state before the event and
    /// its auth chain, as IDs.
    pub async fn federation_state_ids(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<OwnedEventId>, Vec<OwnedEventId>)> {
        self.readable_by(origin, room_id).await?;
        self.rooms.state_ids_at(room_id, event_id).await
    }

    /// `GET /state/{roomId}?event_id=`: as [`Services::federation_state_ids`], the events.
    pub async fn federation_state(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<Box<RawValue>>, Vec<Box<RawValue>>)> {
        let (state, chain) = self.federation_state_ids(origin, room_id, event_id).await?;
        Ok((self.pdus(&state).await?, self.pdus(&chain).await?))
    }

    async fn pdus(&self, ids: &[OwnedEventId]) -> Result<Vec<Box<RawValue>>> {
        self.rooms.events_by_id(ids).await?.iter().map(raw_pdu).collect()
    }

    /// `GET /event_auth/{roomId}/{eventId}`: the event's auth chain.
    pub async fn federation_event_auth(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Vec<Box<RawValue>>> {
        self.readable_by(origin, room_id).await?;
        let chain = self.rooms.event_auth(room_id, event_id).await?;
        self.pdus(&chain).await
    }

    /// `GET /backfill/{roomId}?v=&limit=`: history before and including
    /// `from`, as far as `origin` may see it.
    pub async fn federation_backfill(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<Box<RawValue>>> {
        self.readable_by(origin, room_id).await?;
        let events = self.rooms.backfill(room_id, from, limit).await?;
        self.visible_pdus(origin, room_id, events).await
    }

    /// `POST /get_missing_events/{roomId}`.
    pub async fn federation_missing_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: i64,
    ) -> Result<Vec<Box<RawValue>>> {
        self.readable_by(origin, room_id).await?;
        let events = self
            .rooms
            .missing_events(room_id, earliest, latest, limit, min_depth)
            .await?;
        self.visible_pdus(origin, room_id, events).await
    }

    /// `GET /make_join/{roomId}/{userId}?ver=`: the join event template for
    /// `origin`'s user, in a room version it supports.
    pub async fn federation_make_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
        supported: Option<&[RoomVersionId]>,
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        if user_id.server_name() != origin {
            return Err(Error::forbidden(format!("{origin} cannot act for {user_id}")));
        }
        if self.store.room_info(room_id.as_str()).await?.is_none() {
            return Err(Error::not_found(format!("This server does not know room {room_id}")));
        }
        let version = self.rooms.room_version(room_id).await?;
        if let Some(supported) = supported
            && !supported.contains(&version)
        {
            return Err(Error::new(
                ErrorKind::IncompatibleRoomVersion {
                    room_version: version.to_string(),
                },
                format!("Your server does not support room version {version}"),
            ));
        }
        self.acl_allows(room_id, origin).await?;
        let (version, template) = self.rooms.membership_template(room_id, user_id, membership).await?;
        let raw = serde_json::value::to_raw_value(&template).map_err(Error::internal)?;
        Ok((version, raw))
    }

    /// `PUT /send_join` and `/send_leave` (v2): takes in `origin`'s signed
    /// membership event; for a join, answers the room's state before it.
    pub async fn federation_send_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        pdu: &RawValue,
        membership: &str,
    ) -> Result<Option<JoinAnswer>> {
        let object = pdu_object(pdu)?;
        let field = |k: &str| object.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let content_membership = membership_in(&object);
        let Some(sender) = field("sender").and_then(|s| UserId::parse(s).ok()) else {
            return Err(Error::bad_json("The event has no valid sender"));
        };
        if sender.server_name() != origin {
            return Err(Error::forbidden(format!("{origin} cannot act for the event's sender")));
        }
        if field("type").as_deref() != Some("m.room.member")
            || field("state_key").as_deref() != Some(sender.as_str())
            || content_membership != Some(membership)
            || field("room_id").as_deref().is_some_and(|r| r != room_id.as_str())
        {
            return Err(Error::bad_json(format!("Not a {membership} event of the sender")));
        }
        if self.store.room_info(room_id.as_str()).await?.is_none() {
            return Err(Error::not_found(format!("This server does not know room {room_id}")));
        }
        self.acl_allows(room_id, origin).await?;
        let version = self.rooms.room_version(room_id).await?;
        let rules = version.rules().ok_or_else(|| Error::internal("unknown room version"))?;
        let hash = ruma::signatures::reference_hash(&object, &rules).map_err(|e| Error::bad_json(e.to_string()))?;
        if event_id.as_str() != format!("${hash}") {
            return Err(Error::bad_json("The event ID does not match the event"));
        }
        let outcome = self
            .rooms
            .input_pdu(room_id, object, origin, Arrival::New, &Network(&self.federation))
            .await?;
        match outcome {
            Outcome::Accepted(_) => {
                // The other servers in the room hear of it through us.
                if let Err(e) = self.forward_pdu(room_id, event_id, origin).await {
                    tracing::warn!(%room_id, %event_id, "cannot forward the {membership}: {}", e.message);
                }
            }
            Outcome::Known => {}
            Outcome::SoftFailed(why) | Outcome::Rejected(why) => {
                return Err(Error::forbidden(format!("The {membership} was not allowed: {why}")));
            }
        }
        if membership != "join" {
            return Ok(None);
        }
        let (state, mut chain) = self.rooms.state_ids_at(room_id, event_id).await?;
        chain.extend(self.rooms.auth_chain_ids(&[event_id.to_owned()]).await?);
        chain.sort();
        chain.dedup();
        Ok(Some(JoinAnswer {
            state: self.pdus(&state).await?,
            auth_chain: self.pdus(&chain).await?,
            servers_in_room: self
                .rooms
                .servers_in_room(room_id)
                .await?
                .into_iter()
                .map(|s| s.to_string())
                .collect(),
        }))
    }

    /// Whether the room's server ACL lets `server` in (`403` otherwise).
    pub(crate) async fn acl_allows(&self, room_id: &RoomId, server: &ServerName) -> Result<()> {
        let Some(acl) = self.rooms.state_event(room_id, "m.room.server_acl", "").await? else {
            return Ok(());
        };
        let content: ruma::events::room::server_acl::RoomServerAclEventContent =
            serde_json::from_str(acl.content.get()).map_err(Error::internal)?;
        if content.is_allowed(server) {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "{server} is banned from room {room_id} by its server ACL"
            )))
        }
    }

    /// Our user joins a room this server is not in, through one of
    /// `servers` (tried in order): `make_join`, sign, `send_join`, then
    /// the room's state and the join are checked and stored.
    pub async fn join_remote(&self, user_id: &UserId, room_id: &RoomId, servers: &[OwnedServerName]) -> Result<()> {
        let versions: Vec<RoomVersionId> = SUPPORTED_VERSIONS
            .iter()
            .filter_map(|v| RoomVersionId::try_from(*v).ok())
            .collect();
        let mut last = Error::not_found("No server to join the room through");
        for server in servers.iter().filter(|s| **s != self.server_name) {
            match self.join_through(user_id, room_id, server, &versions).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(%room_id, %server, "joining through {server} failed: {}", e.message);
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn join_through(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        server: &ServerName,
        versions: &[RoomVersionId],
    ) -> Result<()> {
        let mut make = prepare_join_event::v1::Request::new(room_id.to_owned(), user_id.to_owned());
        make.ver = versions.to_vec();
        let made = self.federation.client.send(server, make).await?;
        let version = made.room_version.unwrap_or(RoomVersionId::V1);
        if !versions.contains(&version) {
            return Err(Error::new(
                ErrorKind::UnsupportedRoomVersion,
                format!("Room version {version} is not supported"),
            ));
        }
        let mut template: CanonicalJsonObject = pdu_object(&made.event)?;
        // Our profile in the join, as for local joins.
        let profile = self.profile_content(user_id).await?;
        if let Some(ruma::CanonicalJsonValue::Object(content)) = template.get_mut("content") {
            for (k, v) in profile {
                content.entry(k).or_insert(v);
            }
        }
        let (event_id, join) = self.rooms.sign_template(&version, template)?;
        let raw = serde_json::value::to_raw_value(&join).map_err(Error::internal)?;
        let sent = self
            .federation
            .client
            .send(
                server,
                create_join_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw),
            )
            .await?;
        let answer = sent.room_state;
        let state = answer.state.iter().map(|r| pdu_object(r)).collect::<Result<Vec<_>>>()?;
        let chain = answer
            .auth_chain
            .iter()
            .map(|r| pdu_object(r))
            .collect::<Result<Vec<_>>>()?;
        self.rooms
            .complete_remote_join(
                room_id,
                &version,
                join,
                state,
                chain,
                server,
                &Network(&self.federation),
            )
            .await?;
        Ok(())
    }

    /// Our user leaves (or refuses an invite to) a room this server is not
    /// in, through `server`: `make_leave`, sign, `send_leave`.
    pub async fn leave_remote(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        server: &ServerName,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        let made = self
            .federation
            .client
            .send(
                server,
                prepare_leave_event::v1::Request::new(room_id.to_owned(), user_id.to_owned()),
            )
            .await?;
        let version = made.room_version.unwrap_or(RoomVersionId::V1);
        let template = pdu_object(&made.event)?;
        let (event_id, leave) = self.rooms.sign_template(&version, template)?;
        let raw = serde_json::value::to_raw_value(&leave).map_err(Error::internal)?;
        self.federation
            .client
            .send(
                server,
                create_leave_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw),
            )
            .await?;
        Ok((event_id, leave))
    }
}

impl Services {
    /// Fetches older history of a room this server joined late from a
    /// server in the room (`/backfill` before our earliest timeline event),
    /// storing it below the stream. Answers how many events were added
    /// (0: no gap, or no server answered).
    pub(crate) async fn backfill_room(&self, room_id: &RoomId, limit: usize) -> Result<usize> {
        let Some(earliest) = self
            .store
            .room_events(room_id.as_str(), i64::MIN, i64::MAX, weft_store::Direction::Forward, 1)
            .await?
            .pop()
        else {
            return Ok(0);
        };
        let mut missing = Vec::new();
        for prev in self.store.prev_events(&earliest.event_id).await? {
            let held = self.store.event_place(&prev).await?;
            if held.is_none_or(|p| p.outlier) {
                missing.extend(OwnedEventId::try_from(prev).ok());
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let servers = self.rooms.servers_in_room(room_id).await?;
        let limit = ruma::UInt::try_from(limit.min(weft_rooms::MAX_HISTORY_EVENTS) as u64).unwrap_or_default();
        for server in servers.iter().filter(|s| **s != self.server_name) {
            let request = ruma::api::federation::backfill::get_backfill::v1::Request::new(
                room_id.to_owned(),
                missing.clone(),
                limit,
            );
            let pdus = match self.federation.client.send(server, request).await {
                Ok(r) => r.pdus,
                Err(e) => {
                    tracing::info!(%room_id, %server, "backfill failed: {}", e.message);
                    continue;
                }
            };
            let mut events: Vec<(i64, CanonicalJsonObject)> = pdus
                .iter()
                .filter_map(|r| pdu_object(r).ok())
                .map(|o| {
                    (
                        o.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap_or(0),
                        o,
                    )
                })
                .collect();
            // Newest first: each gets a lower position than the last.
            events.sort_by_key(|e| std::cmp::Reverse(e.0));
            let mut added = 0;
            for (_, o) in events {
                match self
                    .rooms
                    .input_pdu(room_id, o, server, Arrival::Backfill, &Network(&self.federation))
                    .await
                {
                    Ok(Outcome::Accepted(_)) => added += 1,
                    Ok(_) => {}
                    Err(e) => tracing::info!(%room_id, %server, "a backfilled event was refused: {}", e.message),
                }
            }
            return Ok(added);
        }
        Ok(0)
    }
}

impl Services {
    /// Our user invites a user of another server: the invite is built and
    /// checked here, signed by the invitee's server (`/invite`), then
    /// stored and sent into the room like any event.
    pub(crate) async fn invite_remote(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &UserId,
        spec: weft_rooms::EventSpec,
    ) -> Result<weft_rooms::Sent> {
        let (event_id, object) = self.rooms.build_unsent(room_id, sender, spec).await?;
        let version = self.rooms.room_version(room_id).await?;
        let stripped: Vec<ruma::api::federation::membership::RawStrippedState> = self
            .store
            .current_state(room_id.as_str())
            .await?
            .iter()
            .filter(|e| {
                crate::sync::STRIPPED_STATE_TYPES.contains(&e.event_type.as_str())
                    || (e.event_type == "m.room.member" && e.state_key.as_deref() == Some(sender.as_str()))
            })
            .filter_map(|e| raw_pdu(e).ok())
            .map(ruma::api::federation::membership::RawStrippedState::Pdu)
            .collect();
        let raw = serde_json::value::to_raw_value(&object).map_err(Error::internal)?;
        let request = ruma::api::federation::membership::create_invite::v2::Request::new(
            room_id.to_owned(),
            event_id.clone(),
            version.clone(),
            raw,
            stripped,
        );
        let answer = self.federation.client.send(target.server_name(), request).await?;
        let signed = pdu_object(&answer.event)?;
        // The same event, now with the invitee's server's signature too.
        let rules = version.rules().ok_or_else(|| Error::internal("unknown room version"))?;
        let hash = ruma::signatures::reference_hash(&signed, &rules).map_err(|e| Error::bad_json(e.to_string()))?;
        if format!("${hash}") != event_id.as_str() {
            return Err(Error::new(
                ErrorKind::RemoteUnreachable,
                format!("{} answered the invite with another event", target.server_name()),
            ));
        }
        let server_signed = signed
            .get("signatures")
            .and_then(|s| s.as_object())
            .is_some_and(|s| s.contains_key(target.server_name().as_str()));
        if !server_signed {
            return Err(Error::new(
                ErrorKind::RemoteUnreachable,
                format!("{} did not sign the invite", target.server_name()),
            ));
        }
        let origin = self.server_name.clone();
        match self
            .rooms
            .input_pdu(room_id, signed, &origin, Arrival::New, &Network(&self.federation))
            .await?
        {
            Outcome::Accepted(position) => Ok(weft_rooms::Sent { event_id, position }),
            Outcome::Known => Ok(weft_rooms::Sent { event_id, position: 0 }),
            Outcome::SoftFailed(why) | Outcome::Rejected(why) => Err(Error::forbidden(why)),
        }
    }

    /// `PUT /invite/{roomId}/{eventId}` (v2): another server invites one of
    /// our users. The invite is checked, signed by us and kept (for a room
    /// this server is not in, with the room's stripped state for `/sync`).
    pub async fn federation_invite(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        version: &RoomVersionId,
        event: &RawValue,
        invite_room_state: &[ruma::api::federation::membership::RawStrippedState],
    ) -> Result<Box<RawValue>> {
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(Error::new(
                ErrorKind::IncompatibleRoomVersion {
                    room_version: version.to_string(),
                },
                format!("Room version {version} is not supported"),
            ));
        }
        let object = pdu_object(event)?;
        let (checked_id, mut object) = self
            .rooms
            .check_event(version, room_id, object, &Network(&self.federation))
            .await?;
        if checked_id != event_id {
            return Err(Error::bad_json("The event ID does not match the event"));
        }
        let field = |k: &str| object.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let membership = membership_in(&object);
        let sender = field("sender").and_then(|s| UserId::parse(s).ok());
        let target = field("state_key").and_then(|s| UserId::parse(s).ok());
        let (Some(sender), Some(target)) = (sender, target) else {
            return Err(Error::bad_json("Not an invite"));
        };
        if field("type").as_deref() != Some("m.room.member")
            || membership != Some("invite")
            || field("room_id").as_deref() != Some(room_id.as_str())
        {
            return Err(Error::bad_json("Not an invite"));
        }
        if sender.server_name() != origin {
            return Err(Error::forbidden(format!("{origin} cannot invite for {sender}")));
        }
        if target.server_name() != self.server_name {
            return Err(Error::invalid_param(format!("{target} is not a user of this server")));
        }
        match self.store.get_user(target.as_str()).await? {
            Some(u) if !u.deactivated => {}
            _ => return Err(Error::not_found(format!("{target} does not exist"))),
        }
        if self.store.room_info(room_id.as_str()).await?.is_some() {
            self.acl_allows(room_id, origin).await?;
        }
        self.rooms.countersign(version, &mut object)?;
        let json = serde_json::to_string(&object).map_err(Error::internal)?;
        let resident = self.store.room_info(room_id.as_str()).await?.is_some()
            && self.rooms.server_in_room(room_id, &self.server_name).await?;
        if resident {
            // A room we are in: the invite is an event of it, as any other.
            match self
                .rooms
                .input_pdu(
                    room_id,
                    object.clone(),
                    origin,
                    Arrival::New,
                    &Network(&self.federation),
                )
                .await?
            {
                Outcome::Accepted(_) | Outcome::Known => {}
                Outcome::SoftFailed(why) | Outcome::Rejected(why) => {
                    return Err(Error::forbidden(format!("The invite is not allowed: {why}")));
                }
            }
        } else {
            // What the invited user is shown of the room.
            let mut stripped: Vec<serde_json::Value> = invite_room_state
                .iter()
                .filter_map(|s| {
                    let raw = match s {
                        ruma::api::federation::membership::RawStrippedState::Pdu(p) => p.get(),
                        #[allow(deprecated)]
                        ruma::api::federation::membership::RawStrippedState::Stripped(r) => r.json().get(),
                        _ => return None,
                    };
                    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
                    Some(serde_json::json!({
                        "type": v.get("type")?,
                        "state_key": v.get("state_key")?,
                        "sender": v.get("sender")?,
                        "content": v.get("content")?,
                    }))
                })
                .collect();
            stripped.push(serde_json::json!({
                "type": "m.room.member",
                "state_key": target.as_str(),
                "sender": sender.as_str(),
                "content": object.get("content"),
            }));
            let event = remote_member_event(event_id, room_id, &target, &object, json.clone(), "invite");
            self.store
                .remote_membership(
                    event,
                    target.to_string(),
                    "invite".into(),
                    Some(serde_json::to_string(&stripped).map_err(Error::internal)?),
                )
                .await
                .map_err(|_| Error::internal("invite was not stored"))??;
        }
        RawValue::from_string(json).map_err(Error::internal)
    }

    /// Our user refuses an invite to a room this server is not in (or
    /// leaves it), through the inviter's server.
    pub(crate) async fn leave_remote_room(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        server: &ServerName,
    ) -> Result<weft_rooms::Sent> {
        let (event_id, leave) = self.leave_remote(user_id, room_id, server).await?;
        let json = serde_json::to_string(&leave).map_err(Error::internal)?;
        let event = remote_member_event(&event_id, room_id, user_id, &leave, json, "leave");
        let position = self
            .store
            .remote_membership(event, user_id.to_string(), "leave".into(), None)
            .await
            .map_err(|_| Error::internal("leave was not stored"))??;
        Ok(weft_rooms::Sent { event_id, position })
    }
}

/// `content.membership` of a member event.
fn membership_in(object: &CanonicalJsonObject) -> Option<&str> {
    object
        .get("content")
        .and_then(|c| c.as_object())
        .and_then(|c| c.get("membership"))
        .and_then(|m| m.as_str())
}

/// A member event of another server's room, stored as an outlier for
/// [`weft_store::RoomGraphStore::remote_membership`].
fn remote_member_event(
    event_id: &EventId,
    room_id: &RoomId,
    target: &UserId,
    object: &CanonicalJsonObject,
    pdu_json: String,
    membership: &str,
) -> weft_store::NewEvent {
    let int = |k: &str| object.get(k).and_then(|d| d.as_integer()).map(i64::from);
    weft_store::NewEvent {
        event_id: event_id.to_string(),
        room_id: room_id.to_string(),
        event_type: "m.room.member".into(),
        state_key: Some(target.to_string()),
        sender: object
            .get("sender")
            .and_then(|s| s.as_str())
            .unwrap_or(target.as_str())
            .to_owned(),
        origin_server_ts: int("origin_server_ts")
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or_default(),
        pdu_json,
        new_room: None,
        membership: Some(membership.into()),
        history_visibility: None,
        txn: None,
        redaction: None,
        relation: None,
        search_text: None,
        prev_events: Vec::new(),
        auth_events: Vec::new(),
        depth: int("depth").unwrap_or(0),
        kind: weft_store::EventKind::Outlier,
        state_before: None,
        state_after: None,
        new_groups: Vec::new(),
        current_state: None,
        expect_extremities: None,
        rebase: None,
    }
}

/// The servers to try to join a room through: those named, the alias's
/// server, and the room ID's server (room versions before 12).
pub fn join_candidates(
    room_id: &RoomId,
    named: &[OwnedServerName],
    alias_server: Option<&ServerName>,
) -> Vec<OwnedServerName> {
    let mut out: Vec<OwnedServerName> = Vec::new();
    let mut push = |s: &ServerName| {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    };
    for s in named {
        push(s);
    }
    if let Some(s) = alias_server {
        push(s);
    }
    if let Some(s) = room_id.server_name() {
        push(s);
    }
    out
}
