//! End-to-end encryption across servers, and the simple federation
//! queries: what other servers ask of ours (device lists, device keys,
//! one-time key claims, aliases, the room directory, OpenID tokens), what
//! our users' requests ask of theirs (keys of their users, key claims,
//! to-device messages, their room directory), and the EDUs carrying
//! device-list and cross-signing changes both ways.
//!
//! Device lists of other servers' users are cached (migration 0018) only
//! while such a user shares a room with one of ours: then their server
//! tells us of every change (`m.device_list_update`, `m.signing_key_update`)
//! and the cache stays true. An update whose `prev_id` does not follow the
//! cached list's stream ID marks the list stale; it is fetched again
//! (`/user/devices`) at once, or at the next key query if that fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ruma::api::federation::device::get_devices;
use ruma::api::federation::directory::get_public_rooms_filtered;
use ruma::api::federation::keys::{claim_keys, get_keys};
use ruma::directory::{Filter, PublicRoomsChunk, RoomNetwork};
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UInt, UserId};
use serde_json::{Map, Value, json};
use weft_core::{Error, ErrorKind, Result};
use weft_store::{DeviceUpdateOutcome, RemoteDevice, RemoteDeviceList, RemoteDeviceUpdate};

use crate::Services;
use crate::accounts::random_string;

/// How long a key query or claim waits for other servers when the client
/// names no timeout.
const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a resync of a stale device list (on an incoming update) may take.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an OpenID token is valid.
pub const OPENID_TOKEN_SECS: u64 = 3600;

/// Keys of other servers' users, as `/keys/query` merges them in.
#[derive(Debug, Default)]
pub(crate) struct RemoteKeys {
    pub device_keys: Map<String, Value>,
    pub master_keys: Map<String, Value>,
    pub self_signing_keys: Map<String, Value>,
    /// Server → why it could not be asked.
    pub failures: Map<String, Value>,
}

/// One page of the public room directory.
#[derive(Debug)]
pub struct PublicRoomsPage {
    pub chunk: Vec<PublicRoomsChunk>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total: u64,
}

fn failure(e: &dyn std::fmt::Display) -> Value {
    json!({ "status": 503, "message": e.to_string() })
}

fn remote_timeout(ms: Option<u64>) -> Duration {
    ms.map(|ms| Duration::from_millis(ms.clamp(1, 60_000)))
        .unwrap_or(DEFAULT_REMOTE_TIMEOUT)
}

/// The devices of a cached list as `/keys/query` answers them (only
/// `wanted` ones, all for none), display names as
/// `unsigned.device_display_name`.
fn devices_json(list: &RemoteDeviceList, wanted: &[String]) -> Map<String, Value> {
    let mut out = Map::new();
    for d in &list.devices {
        if !wanted.is_empty() && !wanted.contains(&d.device_id) {
            continue;
        }
        let Some(mut keys) = d
            .keys_json
            .as_deref()
            .and_then(|k| serde_json::from_str::<Value>(k).ok())
        else {
            continue;
        };
        if let (Some(name), Some(obj)) = (&d.display_name, keys.as_object_mut()) {
            obj.entry("unsigned")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|u| u.entry("device_display_name").or_insert_with(|| json!(name)));
        }
        out.insert(d.device_id.clone(), keys);
    }
    out
}

/// A key object of another server's user is kept only when it names that
/// user (a server may only speak for its own users).
fn key_of(user: &UserId, key: &serde_json::value::RawValue) -> Option<(Value, String)> {
    let value: Value = serde_json::from_str(key.get()).ok()?;
    (value.get("user_id").and_then(Value::as_str) == Some(user.as_str())).then(|| {
        let json = value.to_string();
        (value, json)
    })
}

impl Services {
    fn check_local(&self, user_id: &UserId, origin: &ServerName) -> Result<()> {
        if user_id.server_name() != self.server_name {
            return Err(Error::invalid_param(format!(
                "{user_id} is not a user of this server (asked by {origin})"
            )));
        }
        Ok(())
    }

    /// The other servers with a joined member in a room where local user
    /// `user_id` is joined.
    pub(crate) async fn servers_sharing_room(&self, user_id: &UserId) -> Result<BTreeSet<OwnedServerName>> {
        let mut out = BTreeSet::new();
        for room in self.joined_rooms(user_id).await? {
            let Ok(room_id) = RoomId::parse(&room) else { continue };
            out.extend(self.rooms.servers_in_room(&room_id).await?);
        }
        out.remove(&self.server_name);
        Ok(out)
    }

    /// Whether another server's user shares a joined room with a local
    /// user (then their server tells us of changes to their devices).
    async fn tracked(&self, user_id: &UserId) -> Result<bool> {
        for m in self.store.user_memberships(user_id.as_str()).await? {
            if m.membership != "join" {
                continue;
            }
            let Ok(room_id) = RoomId::parse(&m.room_id) else {
                continue;
            };
            if self.rooms.servers_in_room(&room_id).await?.contains(&self.server_name) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    // ---- asked by other servers ----

    /// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's
    /// devices with keys, the device list's stream ID, and the master and
    /// self-signing keys.
    pub async fn federation_user_devices(&self, origin: &ServerName, user_id: &UserId) -> Result<Value> {
        self.check_local(user_id, origin)?;
        if self.store.get_user(user_id.as_str()).await?.is_none() {
            return Err(Error::not_found("Unknown user"));
        }
        let stream_id = self.store.device_list_stream_id(user_id.as_str()).await?;
        let keys = self.local_user_keys(user_id.as_str(), &[]).await?;
        let devices: Vec<Value> = keys
            .devices
            .into_iter()
            .map(|(device_id, mut keys)| {
                let name = keys
                    .as_object_mut()
                    .and_then(|k| k.remove("unsigned"))
                    .and_then(|u| u.get("device_display_name").cloned());
                let mut d = json!({ "device_id": device_id, "keys": keys });
                if let Some(name) = name {
                    d["device_display_name"] = name;
                }
                d
            })
            .collect();
        let mut out = json!({ "user_id": user_id, "stream_id": stream_id, "devices": devices });
        if let Some(k) = keys.master {
            out["master_key"] = k;
        }
        if let Some(k) = keys.self_signing {
            out["self_signing_key"] = k;
        }
        Ok(out)
    }

    /// `POST /_matrix/federation/v1/user/keys/query`: device keys (all a
    /// user's for an empty list) and master and self-signing keys of local
    /// users; `400 M_INVALID_PARAM` when a user of another server is asked.
    pub async fn federation_query_keys(
        &self,
        origin: &ServerName,
        wanted: BTreeMap<OwnedUserId, Vec<String>>,
    ) -> Result<Value> {
        let (mut devices, mut master, mut self_signing) = (Map::new(), Map::new(), Map::new());
        for user in wanted.keys() {
            self.check_local(user, origin)?;
        }
        for (user, wanted) in wanted {
            let keys = self.local_user_keys(user.as_str(), &wanted).await?;
            devices.insert(user.to_string(), Value::Object(keys.devices));
            if let Some(k) = keys.master {
                master.insert(user.to_string(), k);
            }
            if let Some(k) = keys.self_signing {
                self_signing.insert(user.to_string(), k);
            }
        }
        Ok(json!({ "device_keys": devices, "master_keys": master, "self_signing_keys": self_signing }))
    }

    /// `POST /_matrix/federation/v1/user/keys/claim`: one key of each
    /// asked device of local users, as local claims take them (each once).
    pub async fn federation_claim_keys(
        &self,
        origin: &ServerName,
        wanted: BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Value> {
        for user in wanted.keys() {
            let user = crate::federation::parse_user_id(user)?;
            self.check_local(user, origin)?;
        }
        let claimed = self.claim_local_keys(wanted).await?;
        Ok(json!({ "one_time_keys": claimed }))
    }

    /// `GET /_matrix/federation/v1/query/directory`: the room a local alias
    /// names and the servers in it (ours first).
    pub async fn federation_query_directory(
        &self,
        origin: &ServerName,
        alias: &ruma::RoomAliasId,
    ) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() != self.server_name {
            return Err(Error::invalid_param(format!(
                "{alias} is not an alias of this server (asked by {origin})"
            )));
        }
        let room_id = self.alias_room(alias.as_str()).await?;
        let mut servers = vec![self.server_name.clone()];
        servers.extend(
            self.rooms
                .servers_in_room(&room_id)
                .await?
                .into_iter()
                .filter(|s| *s != self.server_name),
        );
        Ok((room_id, servers))
    }

    /// `GET /directory/room/{roomAlias}`: the room an alias names and
    /// servers to join it through (ours first for a local alias); another
    /// server's alias is asked of that server (`/query/directory`).
    pub async fn alias_directory(&self, alias: &ruma::RoomAliasId) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() != self.server_name {
            return self.resolve_room_anywhere(alias.as_str()).await;
        }
        self.federation_query_directory(&self.server_name, alias).await
    }

    /// One page of the local public room directory: rooms whose name,
    /// topic or canonical alias contain `term` (case-insensitive), `limit`
    /// of them after `since` (a `next_batch`/`prev_batch` of an earlier page).
    pub async fn public_rooms_page(
        &self,
        limit: Option<u64>,
        since: Option<&str>,
        term: Option<&str>,
    ) -> Result<PublicRoomsPage> {
        let mut rooms = self.public_rooms().await?;
        if let Some(term) = term.map(str::to_lowercase).filter(|t| !t.is_empty()) {
            rooms.retain(|r| {
                [
                    r.name.as_deref(),
                    r.topic.as_deref(),
                    r.canonical_alias.as_ref().map(|a| a.as_str()),
                ]
                .into_iter()
                .flatten()
                .any(|s| s.to_lowercase().contains(&term))
            });
        }
        let total = rooms.len() as u64;
        let start = match since {
            None => 0,
            Some(s) => s
                .strip_prefix('o')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::invalid_param("Invalid since token"))?,
        }
        .min(rooms.len());
        let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX).max(1));
        let end = start.saturating_add(limit).min(rooms.len());
        let chunk: Vec<PublicRoomsChunk> = rooms.drain(start..end).collect();
        Ok(PublicRoomsPage {
            chunk,
            next_batch: (end < total as usize).then(|| format!("o{end}")),
            prev_batch: (start > 0).then(|| format!("o{}", start.saturating_sub(limit))),
            total,
        })
    }

    /// `GET /_matrix/federation/v1/openid/userinfo`: the local user an
    /// OpenID token (not expired) was issued to; `401 M_UNKNOWN_TOKEN`
    /// otherwise.
    pub async fn openid_userinfo(&self, token: &str) -> Result<OwnedUserId> {
        let user = self
            .store
            .openid_token_user(token, weft_core::now_ms())
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::UnknownToken { soft_logout: false },
                    "Unknown or expired OpenID token",
                )
            })?;
        OwnedUserId::try_from(user).map_err(Error::internal)
    }

    /// `POST /user/{userId}/openid/request_token`: a new OpenID token for
    /// the caller (only for themselves), valid [`OPENID_TOKEN_SECS`].
    /// Answers the token and its lifetime in seconds.
    pub async fn request_openid_token(&self, session: &crate::Session, user_id: &UserId) -> Result<(String, u64)> {
        if user_id != session.user_id {
            return Err(Error::forbidden("Cannot request an OpenID token for another user"));
        }
        let token = random_string(32);
        let expires = weft_core::now_ms() + OPENID_TOKEN_SECS * 1000;
        self.store.put_openid_token(&token, user_id.as_str(), expires).await?;
        Ok((token, OPENID_TOKEN_SECS))
    }

    // ---- asking other servers ----

    /// Keys of other servers' users for `/keys/query`: from the cache when
    /// it is trusted (the user shares a room with ours and the list is not
    /// stale), else one `/user/keys/query` per server, all at once, each
    /// within the timeout; servers that fail are in `failures`.
    pub(crate) async fn remote_keys_query(
        &self,
        wanted: BTreeMap<String, Vec<String>>,
        timeout_ms: Option<u64>,
    ) -> Result<RemoteKeys> {
        let mut out = RemoteKeys::default();
        let mut by_server: BTreeMap<OwnedServerName, Vec<(OwnedUserId, Vec<String>)>> = BTreeMap::new();
        for (user, devices) in wanted {
            let Ok(user) = OwnedUserId::try_from(user) else {
                continue;
            };
            by_server
                .entry(user.server_name().to_owned())
                .or_default()
                .push((user, devices));
        }
        if by_server.is_empty() {
            return Ok(out);
        }
        let timeout = remote_timeout(timeout_ms);
        let asks = by_server.into_iter().map(|(server, users)| async move {
            let result = self.keys_of_server(&server, &users, timeout).await;
            (server, result)
        });
        for (server, result) in futures_util::future::join_all(asks).await {
            match result {
                Ok((lists, failed)) => {
                    for (list, wanted) in lists {
                        out.device_keys
                            .insert(list.user_id.clone(), Value::Object(devices_json(&list, &wanted)));
                        for (key_type, json) in &list.cross_signing {
                            let Ok(key) = serde_json::from_str::<Value>(json) else {
                                continue;
                            };
                            match key_type.as_str() {
                                "master" => out.master_keys.insert(list.user_id.clone(), key),
                                "self_signing" => out.self_signing_keys.insert(list.user_id.clone(), key),
                                _ => None,
                            };
                        }
                    }
                    if let Some(e) = failed {
                        out.failures.insert(server.to_string(), e);
                    }
                }
                Err(e) => {
                    out.failures.insert(server.to_string(), failure(&e));
                }
            }
        }
        Ok(out)
    }

    /// The device lists of `users` (all of one server) with the devices
    /// each asked for, and the server's failure if it was asked and failed
    /// (cached lists, even stale ones, are answered then).
    #[allow(clippy::type_complexity)]
    async fn keys_of_server(
        &self,
        server: &ServerName,
        users: &[(OwnedUserId, Vec<String>)],
        timeout: Duration,
    ) -> Result<(Vec<(RemoteDeviceList, Vec<String>)>, Option<Value>)> {
        let mut lists = Vec::new();
        let mut ask: Vec<(&OwnedUserId, &Vec<String>, bool, Option<RemoteDeviceList>)> = Vec::new();
        for (user, devices) in users {
            let cached = self.store.remote_device_list(user.as_str()).await?;
            let tracked = self.tracked(user).await?;
            match cached {
                Some(list) if tracked && !list.stale => lists.push((list, devices.clone())),
                cached => ask.push((user, devices, tracked, cached)),
            }
        }
        if ask.is_empty() {
            return Ok((lists, None));
        }
        // Whole lists are asked for, so that they can be cached.
        let request = get_keys::v1::Request::new(ask.iter().map(|(u, ..)| ((*u).clone(), Vec::new())).collect());
        let answer = tokio::time::timeout(timeout, self.federation.client.send(server, request)).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return self.fall_back(lists, ask, failure(&e)),
            Err(_) => return self.fall_back(lists, ask, failure(&"Timed out")),
        };
        for (user, devices, tracked, cached) in ask {
            let mut list = RemoteDeviceList {
                user_id: user.to_string(),
                stream_id: None,
                stale: false,
                fetched_ms: weft_core::now_ms(),
                devices: Vec::new(),
                cross_signing: Vec::new(),
            };
            for (device_id, keys) in response.device_keys.get(user).into_iter().flatten() {
                let Some((value, json)) = key_of(user, keys.json()) else {
                    continue;
                };
                if value.get("device_id").and_then(Value::as_str) != Some(device_id.as_str()) {
                    continue;
                }
                list.devices.push(RemoteDevice {
                    device_id: device_id.to_string(),
                    keys_json: Some(json),
                    display_name: None,
                });
            }
            for (key_type, keys) in [
                ("master", &response.master_keys),
                ("self_signing", &response.self_signing_keys),
            ] {
                if let Some((_, json)) = keys.get(user).and_then(|k| key_of(user, k.json())) {
                    list.cross_signing.push((key_type.to_owned(), json));
                }
            }
            if tracked {
                self.store.put_remote_device_list(list.clone(), false).await?;
            } else if cached.is_some() {
                // Not told of its changes any more: never trusted again.
                self.store.mark_remote_device_list_stale(user.as_str()).await?;
            }
            lists.push((list, devices.clone()));
        }
        Ok((lists, None))
    }

    #[allow(clippy::type_complexity)]
    fn fall_back(
        &self,
        mut lists: Vec<(RemoteDeviceList, Vec<String>)>,
        ask: Vec<(&OwnedUserId, &Vec<String>, bool, Option<RemoteDeviceList>)>,
        failed: Value,
    ) -> Result<(Vec<(RemoteDeviceList, Vec<String>)>, Option<Value>)> {
        for (_, devices, _, cached) in ask {
            if let Some(list) = cached {
                lists.push((list, devices.clone()));
            }
        }
        Ok((lists, Some(failed)))
    }

    /// Fetches another server's user's whole device list again
    /// (`/user/devices`) and caches it with its stream ID, announcing the
    /// change to local users sharing a room.
    pub(crate) async fn resync_device_list(&self, user_id: &UserId) -> Result<()> {
        let request = get_devices::v1::Request::new(user_id.to_owned());
        let response = tokio::time::timeout(
            RESYNC_TIMEOUT,
            self.federation.client.send(user_id.server_name(), request),
        )
        .await
        .map_err(|_| Error::new(ErrorKind::Unknown, "Timed out"))??;
        if response.user_id != user_id {
            return Err(Error::bad_json("/user/devices answered another user"));
        }
        let mut list = RemoteDeviceList {
            user_id: user_id.to_string(),
            stream_id: Some(i64::try_from(u64::from(response.stream_id)).unwrap_or(i64::MAX)),
            stale: false,
            fetched_ms: weft_core::now_ms(),
            devices: Vec::new(),
            cross_signing: Vec::new(),
        };
        for d in response.devices {
            let Some((value, json)) = key_of(user_id, d.keys.json()) else {
                continue;
            };
            if value.get("device_id").and_then(Value::as_str) != Some(d.device_id.as_str()) {
                continue;
            }
            list.devices.push(RemoteDevice {
                device_id: d.device_id.to_string(),
                keys_json: Some(json),
                display_name: d.device_display_name,
            });
        }
        for (key_type, key) in [
            ("master", response.master_key),
            ("self_signing", response.self_signing_key),
        ] {
            if let Some((_, json)) = key.and_then(|k| key_of(user_id, k.json())) {
                list.cross_signing.push((key_type.to_owned(), json));
            }
        }
        self.store.put_remote_device_list(list, true).await
    }

    /// One-time keys of other servers' users for `/keys/claim`: one
    /// `/user/keys/claim` per server, all at once, within the timeout.
    #[allow(clippy::type_complexity)]
    pub(crate) async fn remote_claim_keys(
        &self,
        wanted: BTreeMap<String, BTreeMap<String, String>>,
        timeout_ms: Option<u64>,
    ) -> Result<(
        BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
        Map<String, Value>,
    )> {
        let mut by_server: BTreeMap<OwnedServerName, claim_keys::v1::OneTimeKeyClaims> = BTreeMap::new();
        for (user, devices) in wanted {
            let Ok(user) = OwnedUserId::try_from(user) else {
                continue;
            };
            let devices = devices
                .into_iter()
                .map(|(d, alg)| (d.into(), alg.as_str().into()))
                .collect();
            by_server
                .entry(user.server_name().to_owned())
                .or_default()
                .insert(user, devices);
        }
        let timeout = remote_timeout(timeout_ms);
        let asks = by_server.into_iter().map(|(server, claims)| async move {
            let request = claim_keys::v1::Request::new(claims.clone());
            let answer = tokio::time::timeout(timeout, self.federation.client.send(&server, request)).await;
            (server, claims, answer)
        });
        let (mut out, mut failures) = (BTreeMap::new(), Map::new());
        for (server, claims, answer) in futures_util::future::join_all(asks).await {
            let response = match answer {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    failures.insert(server.to_string(), failure(&e));
                    continue;
                }
                Err(_) => {
                    failures.insert(server.to_string(), failure(&"Timed out"));
                    continue;
                }
            };
            // Only keys of the users and devices asked for.
            for (user, devices) in response.one_time_keys {
                let Some(asked) = claims.get(&user) else { continue };
                for (device, keys) in devices {
                    if !asked.contains_key(&device) {
                        continue;
                    }
                    let keys: Map<String, Value> = keys
                        .into_iter()
                        .filter_map(|(id, k)| Some((id.to_string(), serde_json::from_str(k.json().get()).ok()?)))
                        .collect();
                    let entry: &mut BTreeMap<String, Map<String, Value>> = out.entry(user.to_string()).or_default();
                    entry.insert(device.to_string(), keys);
                }
            }
        }
        Ok((out, failures))
    }

    /// Sends to-device messages for other servers' users: one
    /// `m.direct_to_device` EDU per server through the outgoing queue.
    /// A failure to queue is logged (the local part of the request stands).
    pub(crate) async fn send_remote_to_device(
        &self,
        sender: &str,
        event_type: &str,
        messages: BTreeMap<String, BTreeMap<String, Value>>,
    ) {
        let mut by_server: BTreeMap<OwnedServerName, Map<String, Value>> = BTreeMap::new();
        for (user, devices) in messages {
            let Ok(user) = OwnedUserId::try_from(user) else {
                continue;
            };
            by_server
                .entry(user.server_name().to_owned())
                .or_default()
                .insert(user.to_string(), json!(devices));
        }
        for (server, messages) in by_server {
            let content = json!({
                "sender": sender,
                "type": event_type,
                "message_id": random_string(24),
                "messages": messages,
            });
            if let Err(e) = self.queue_edu(&server, "m.direct_to_device", content).await {
                tracing::warn!(%server, error = %e, "could not queue to-device messages");
            }
        }
    }

    /// Tells the servers sharing a room with local user `user_id` of their
    /// master and self-signing keys (`m.signing_key_update`). Failures to
    /// queue are logged.
    pub(crate) async fn send_signing_key_update(&self, user_id: &UserId) {
        let result = async {
            let servers = self.servers_sharing_room(user_id).await?;
            if servers.is_empty() {
                return Ok(());
            }
            let keys = self.local_user_keys(user_id.as_str(), &[]).await?;
            let mut content = json!({ "user_id": user_id });
            if let Some(k) = keys.master {
                content["master_key"] = k;
            }
            if let Some(k) = keys.self_signing {
                content["self_signing_key"] = k;
            }
            for server in servers {
                if let Err(e) = self.queue_edu(&server, "m.signing_key_update", content.clone()).await {
                    tracing::warn!(%server, error = %e, "could not queue a signing key update");
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(user = %user_id, error = %e, "could not send a signing key update");
        }
    }

    /// `GET /publicRooms?server=...` for another server: its directory,
    /// asked over federation.
    pub async fn remote_public_rooms(
        &self,
        server: &ServerName,
        limit: Option<UInt>,
        since: Option<String>,
        term: Option<String>,
    ) -> Result<PublicRoomsPage> {
        let mut request = get_public_rooms_filtered::v1::Request::new();
        request.limit = limit;
        request.since = since;
        request.room_network = RoomNetwork::Matrix;
        let mut filter = Filter::new();
        filter.generic_search_term = term;
        request.filter = filter;
        let response = self.federation.client.send(server, request).await?;
        let total = response
            .total_room_count_estimate
            .map_or(response.chunk.len() as u64, u64::from);
        Ok(PublicRoomsPage {
            chunk: response.chunk,
            next_batch: response.next_batch,
            prev_batch: response.prev_batch,
            total,
        })
    }

    // ---- EDUs ----

    /// The `m.device_list_update` EDUs to send because the device list of
    /// local user `user_id` changed at stream position `position`: one per
    /// device changed there (deleted ones with `deleted: true`) for each
    /// server sharing a room with the user (destination, EDU content).
    /// `stream_id` grows with each change of the user's devices and
    /// `prev_id` names the change before it. Called by the outgoing
    /// queue's stream reader for each `StreamKey::DeviceKeys` of a local
    /// user.
    pub async fn device_list_update_edus(
        &self,
        user_id: &UserId,
        position: i64,
    ) -> Result<Vec<(OwnedServerName, Value)>> {
        if user_id.server_name() != self.server_name {
            return Ok(Vec::new());
        }
        let changes = self.store.device_list_log(user_id.as_str(), position).await?;
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let servers = self.servers_sharing_room(user_id).await?;
        if servers.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = self.local_user_keys(user_id.as_str(), &[]).await?;
        let mut out = Vec::new();
        for change in changes {
            let mut content = json!({
                "user_id": user_id,
                "device_id": change.device_id,
                "stream_id": change.stream_id,
                "prev_id": change.prev_id.into_iter().collect::<Vec<_>>(),
            });
            match keys.devices.get_mut(&change.device_id) {
                Some(device) if !change.deleted => {
                    let name = device
                        .as_object_mut()
                        .and_then(|k| k.remove("unsigned"))
                        .and_then(|u| u.get("device_display_name").cloned());
                    if let Some(name) = name {
                        content["device_display_name"] = name;
                    }
                    content["keys"] = device.clone();
                }
                _ => content["deleted"] = json!(true),
            }
            for server in &servers {
                out.push((server.clone(), content.clone()));
            }
        }
        Ok(out)
    }

    /// Takes in an end-to-end-encryption EDU from `origin`'s transaction:
    /// `m.device_list_update`, `m.signing_key_update`,
    /// `m.direct_to_device`. Called by the incoming `/send` handler. EDUs
    /// about users of a server other than `origin`, or malformed, are
    /// dropped (logged); others types are ignored.
    pub async fn receive_e2ee_edu(&self, origin: &ServerName, edu_type: &str, content: Value) -> Result<()> {
        let sender_field = match edu_type {
            "m.direct_to_device" => "sender",
            "m.device_list_update" | "m.signing_key_update" => "user_id",
            _ => return Ok(()),
        };
        let Some(user) = content
            .get(sender_field)
            .and_then(Value::as_str)
            .and_then(|u| UserId::parse(u).ok())
        else {
            tracing::warn!(%origin, edu_type, "EDU without a valid {sender_field}: dropped");
            return Ok(());
        };
        if user.server_name() != origin || origin == self.server_name {
            tracing::warn!(%origin, %user, edu_type, "EDU about another server's user: dropped");
            return Ok(());
        }
        match edu_type {
            "m.direct_to_device" => self.receive_to_device(origin, &user, content).await,
            "m.device_list_update" => self.receive_device_list_update(&user, content).await,
            _ => self.receive_signing_key_update(&user, content).await,
        }
    }

    async fn receive_to_device(&self, origin: &ServerName, sender: &UserId, content: Value) -> Result<()> {
        let (Some(event_type), Some(message_id), Some(messages)) = (
            content.get("type").and_then(Value::as_str),
            content.get("message_id").and_then(Value::as_str),
            content.get("messages").and_then(Value::as_object),
        ) else {
            tracing::warn!(%origin, "malformed m.direct_to_device: dropped");
            return Ok(());
        };
        let mut out = Vec::new();
        for (user, devices) in messages {
            if !self.is_local_user(user) {
                continue;
            }
            let Some(devices) = devices.as_object() else { continue };
            for (device, message) in devices {
                if !message.is_object() {
                    continue;
                }
                out.push(weft_store::NewToDevice {
                    user_id: user.clone(),
                    target: if device == "*" {
                        weft_store::DeviceTarget::All
                    } else {
                        weft_store::DeviceTarget::One(device.clone())
                    },
                    content_json: message.to_string(),
                });
            }
        }
        // The message ID makes a repeated EDU (a retried transaction) a
        // repeat of the same to-device transaction, stored once.
        self.store
            .send_to_device(
                sender.as_str(),
                &format!("federation:{origin}"),
                event_type,
                message_id,
                out,
            )
            .await?;
        Ok(())
    }

    async fn receive_device_list_update(&self, user: &UserId, content: Value) -> Result<()> {
        let number = |v: &Value| v.as_i64().filter(|n| *n >= 0);
        let (Some(device_id), Some(stream_id)) = (
            content.get("device_id").and_then(Value::as_str),
            content.get("stream_id").and_then(number),
        ) else {
            tracing::warn!(%user, "malformed m.device_list_update: dropped");
            return Ok(());
        };
        let prev_ids = content
            .get("prev_id")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(number).collect())
            .unwrap_or_default();
        let deleted = content.get("deleted").and_then(Value::as_bool).unwrap_or(false);
        let keys_json = content
            .get("keys")
            .filter(|k| {
                k.get("user_id").and_then(Value::as_str) == Some(user.as_str())
                    && k.get("device_id").and_then(Value::as_str) == Some(device_id)
            })
            .map(Value::to_string);
        let update = RemoteDeviceUpdate {
            user_id: user.to_string(),
            device_id: device_id.to_owned(),
            stream_id,
            prev_ids,
            deleted,
            keys_json,
            display_name: content
                .get("device_display_name")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        if self.store.apply_remote_device_update(update).await? == DeviceUpdateOutcome::Stale
            && let Err(e) = self.resync_device_list(user).await
        {
            tracing::info!(%user, error = %e, "device list resync failed: stays stale until the next query");
        }
        Ok(())
    }

    async fn receive_signing_key_update(&self, user: &UserId, content: Value) -> Result<()> {
        let mut keys = Vec::new();
        for (field, key_type) in [("master_key", "master"), ("self_signing_key", "self_signing")] {
            if let Some(key) = content.get(field)
                && key.get("user_id").and_then(Value::as_str) == Some(user.as_str())
            {
                keys.push((key_type.to_owned(), key.to_string()));
            }
        }
        self.store.put_remote_cross_signing_keys(user.as_str(), keys).await?;
        Ok(())
    }
}
