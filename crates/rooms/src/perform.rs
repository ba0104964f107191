//! Perform: local actions that involve other servers. Joining a room this
//! server is not in goes through a resident server (`make_join` answers a
//! template, this server signs it, `send_join` answers the room's state);
//! the HTTP calls are the federation service's, the room work is here.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, ServerName, UserId,
};
use weft_core::{Error, ErrorKind, Result};

use crate::cache::RoomCache;
use crate::input::{Arrival, Outcome, Remote, StateIds};
use crate::{Pdu, Rooms, Sent, rules_of};

impl Rooms {
    /// The unsigned event `user` (of another server) would send to change
    /// their membership to `membership` now (`/make_join`,
    /// `/make_leave`): refused with `M_FORBIDDEN` when the room's rules do
    /// not allow it.
    pub async fn membership_template(
        &self,
        room_id: &RoomId,
        user: &UserId,
        membership: &str,
    ) -> Result<(RoomVersionId, CanonicalJsonObject)> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        let cache = guard.as_ref().ok_or_else(|| Error::not_found("Unknown room"))?;
        let mut content = CanonicalJsonObject::new();
        content.insert("membership".into(), CanonicalJsonValue::String(membership.to_owned()));
        let (mut obj, _) = self.proto(cache, user, "m.room.member", Some(user.as_str()), content, None)?;
        // Checked as if sent: the template itself has no ID yet.
        obj.insert(
            "origin".into(),
            CanonicalJsonValue::String(self.server_name.to_string()),
        );
        let json = serde_json::to_string(&obj).map_err(Error::internal)?;
        let id = OwnedEventId::try_from("$template").map_err(Error::internal)?;
        let pdu = Pdu::parse(id, &json).map_err(|e| Error::bad_json(e.to_string()))?;
        self.authorize(cache, &pdu)?;
        obj.remove("origin");
        Ok((cache.version.clone(), obj))
    }

    /// Signs a membership template another server made for one of our
    /// users; answers its ID and the signed event.
    pub fn sign_template(
        &self,
        version: &RoomVersionId,
        mut template: CanonicalJsonObject,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        let rules = rules_of(version)?;
        for key in ["signatures", "hashes", "unsigned", "event_id"] {
            template.remove(key);
        }
        template.insert(
            "origin_server_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(weft_core::now_ms()).map_err(Error::internal)?),
        );
        let (id, _) = self.sign(&rules, &mut template)?;
        Ok((id, template))
    }

    /// Checks the signatures and hash of an event of a room this server
    /// may not know (an invite): answers its ID and the event (redacted
    /// if its content hash did not match).
    pub async fn check_event(
        &self,
        version: &RoomVersionId,
        room_id: &RoomId,
        object: CanonicalJsonObject,
        remote: &dyn Remote,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        let cache = RoomCache::empty(version.clone(), rules_of(version)?, room_id.to_owned());
        let checked = self.verify_pdu(&cache, object, remote).await?;
        Ok((checked.event_id, checked.object))
    }

    /// Adds this server's signature to another server's event (an invite
    /// of one of our users).
    pub fn countersign(&self, version: &RoomVersionId, object: &mut CanonicalJsonObject) -> Result<()> {
        let rules = rules_of(version)?;
        ruma::signatures::sign_event(self.server_name.as_str(), &*self.key, object, &rules.redaction)
            .map_err(Error::internal)
    }

    /// Builds, signs and authorizes an event as [`Rooms::send`] does, but
    /// does not store it (an invite of another server's user, which that
    /// server signs first; it comes back through [`Rooms::input_pdu`]).
    pub async fn build_unsent(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        spec: crate::EventSpec,
    ) -> Result<(OwnedEventId, CanonicalJsonObject)> {
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        self.fresh(room_id, &slot, &mut guard).await?;
        let cache = guard.as_ref().ok_or_else(|| Error::not_found("Unknown room"))?;
        let (ev, pdu) = self.build(cache, sender, spec).await?;
        let object: CanonicalJsonObject = serde_json::from_str(&ev.pdu_json).map_err(Error::internal)?;
        Ok((pdu.event_id, object))
    }

    /// Our user's join of a room this server is not in, once a resident
    /// server `origin` accepted it: the room's state and auth chain from
    /// its answer are checked and stored (as outliers), then the join with
    /// that state before it. The room's view starts there.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete_remote_join(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        join: CanonicalJsonObject,
        state: Vec<CanonicalJsonObject>,
        auth_chain: Vec<CanonicalJsonObject>,
        origin: &ServerName,
        remote: &dyn Remote,
    ) -> Result<Sent> {
        let rules = rules_of(version)?;
        let hash = ruma::signatures::reference_hash(&join, &rules).map_err(|e| Error::bad_json(e.to_string()))?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?;
        let slot = self.slot(room_id);
        let mut guard = slot.cache.lock().await;
        let known = match guard.as_ref() {
            Some(_) => true,
            None => self.store.room_info(room_id.as_str()).await?.is_some(),
        };
        if known {
            // Already resident: the join is an ordinary remote event.
            drop(guard);
            return match self.input_pdu(room_id, join, origin, Arrival::New, remote).await? {
                Outcome::Accepted(position) => Ok(Sent { event_id, position }),
                Outcome::Known => {
                    let position = self
                        .store
                        .event_place(event_id.as_str())
                        .await?
                        .map(|p| p.position)
                        .unwrap_or_default();
                    Ok(Sent { event_id, position })
                }
                Outcome::SoftFailed(why) | Outcome::Rejected(why) => Err(Error::forbidden(why)),
            };
        }
        let mut cache = RoomCache::empty(version.clone(), rules.clone(), room_id.to_owned());
        // The auth chain and the state, oldest first, as outliers.
        let mut outliers: Vec<CanonicalJsonObject> = auth_chain.into_iter().chain(state.iter().cloned()).collect();
        outliers.sort_by_key(|o| o.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap_or(0));
        let mut fetches = 0;
        for o in outliers {
            // One bad event does not spoil the join: it is left out.
            if let Err(e) = self
                .input_locked(&mut cache, o, origin, Arrival::Outlier, remote, &mut fetches, None)
                .await
            {
                tracing::info!(%room_id, %origin, "left out of the joined room's state: {e}");
            }
        }
        let mut before = StateIds::new();
        for o in &state {
            let (Ok(hash), Some(t), Some(key)) = (
                ruma::signatures::reference_hash(o, &rules),
                o.get("type").and_then(|t| t.as_str()),
                o.get("state_key").and_then(|k| k.as_str()),
            ) else {
                continue;
            };
            let Ok(id) = OwnedEventId::try_from(format!("${hash}")) else {
                continue;
            };
            // Only state that was stored and not rejected.
            if let Some(p) = self.store.event_place(id.as_str()).await?
                && p.rejected.is_none()
            {
                before.insert((t.to_owned(), key.to_owned()), id);
            }
        }
        if !before.contains_key(&("m.room.create".to_owned(), String::new())) {
            return Err(Error::new(
                ErrorKind::Unknown,
                format!("{origin} sent a room state without its create event"),
            ));
        }
        let outcome = self
            .input_locked(
                &mut cache,
                join,
                origin,
                Arrival::New,
                remote,
                &mut fetches,
                Some(before),
            )
            .await;
        match outcome {
            Ok(Outcome::Accepted(position)) => {
                *guard = Some(cache);
                Ok(Sent { event_id, position })
            }
            Ok(Outcome::SoftFailed(why) | Outcome::Rejected(why)) => {
                Err(Error::forbidden(format!("The join was not allowed: {why}")))
            }
            Ok(Outcome::Known) => Err(Error::internal("join already stored")),
            Err(e) => Err(e),
        }
    }
}

/// A room ID in a remote answer.
pub fn room_id_of(obj: &CanonicalJsonObject) -> Option<OwnedRoomId> {
    obj.get("room_id")
        .and_then(|r| r.as_str())
        .and_then(|r| OwnedRoomId::try_from(r).ok())
}
