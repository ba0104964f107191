//! The key ring: our own key response (`GET /_matrix/key/v2/server`), and
//! other servers' signing keys, fetched from them
//! (`/_matrix/key/v2/server`) or, failing that, from the notaries of
//! `[federation] trusted_key_servers` (`/_matrix/key/v2/query`), each
//! response checked (it names the server asked about, and is signed by
//! the keys it lists; a notary's answer also by the notary), then kept in
//! the database (`server_keys`, `server_key_responses`) and used until its
//! `valid_until_ts`. Keys a server retired (`old_verify_keys`) and keys
//! that are no longer listed are kept too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ruma::api::federation::discovery::{ServerSigningKeys, get_remote_server_keys_batch, get_server_keys};
use ruma::serde::{Base64, Raw};
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap, PublicKeySet};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedServerName, ServerName};
use weft_core::{Error, ErrorKind, Result};
use weft_store::{FederationStore, ServerKeyRecord, ServerKeyResponse};

use crate::client::FederationClient;

/// How long our own key response says it is valid: a day, as Synapse's
/// default. Our key never changes today; once it can be rotated, other
/// servers pick up the new one within a day.
pub const OWN_KEY_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// After a failed fetch of a server's keys, how long requests needing them
/// fail without asking the network again (kept in memory).
pub const FETCH_FAILURE_BACKOFF: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    MilliSecondsSinceUnixEpoch::now().get().into()
}

/// Our keys and everyone else's.
pub struct KeyRing {
    server_name: OwnedServerName,
    key: Arc<Ed25519KeyPair>,
    store: Arc<dyn FederationStore>,
    client: Arc<FederationClient>,
    trusted: Vec<OwnedServerName>,
    /// Servers whose keys could not be fetched, until when not to try again.
    failed: Mutex<HashMap<OwnedServerName, Instant>>,
    /// One fetch per server at a time: callers needing the same server's
    /// keys wait for the fetch under way and then read what it stored.
    fetching: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyRing {
    pub fn new(
        server_name: OwnedServerName,
        key: Arc<Ed25519KeyPair>,
        store: Arc<dyn FederationStore>,
        client: Arc<FederationClient>,
        trusted_key_servers: &[String],
    ) -> Self {
        let trusted = trusted_key_servers
            .iter()
            .filter_map(|s| match OwnedServerName::try_from(s.as_str()) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!("[federation] trusted_key_servers: {s:?} is not a server name ({e}); ignored");
                    None
                }
            })
            .collect();
        Self {
            server_name,
            key,
            store,
            client,
            trusted,
            failed: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
        }
    }

    /// Our key ID, `ed25519:<version>`.
    pub fn own_key_id(&self) -> String {
        format!("ed25519:{}", self.key.version())
    }

    /// Our public key, unpadded base64.
    pub fn own_public_key(&self) -> Base64 {
        Base64::new(self.key.public_key().to_vec())
    }

    /// The body of `GET /_matrix/key/v2/server`: our server name, our key,
    /// no old keys yet, valid for [`OWN_KEY_VALIDITY`], signed by our key.
    pub fn own_keys(&self) -> Result<CanonicalJsonObject> {
        let valid_until = now_ms() + OWN_KEY_VALIDITY.as_millis() as u64;
        let value = serde_json::json!({
            "server_name": self.server_name,
            "verify_keys": { self.own_key_id(): { "key": self.own_public_key().encode() } },
            "old_verify_keys": {},
            "valid_until_ts": valid_until,
        });
        let mut object: CanonicalJsonObject = serde_json::from_value(value).map_err(Error::internal)?;
        ruma::signatures::sign_json(self.server_name.as_str(), &*self.key, &mut object).map_err(Error::internal)?;
        Ok(object)
    }

    /// Adds our signature to `object` (a notary's answer).
    pub fn sign(&self, object: &mut CanonicalJsonObject) -> Result<()> {
        ruma::signatures::sign_json(self.server_name.as_str(), &*self.key, object).map_err(Error::internal)
    }

    /// The public keys found for each wanted server and key ID (an empty
    /// list: any of its keys), fetched where not stored or where none of
    /// the server's stored keys is valid any more. Keys that could not be
    /// found are left out (and logged): the caller's verification then
    /// fails for them.
    pub async fn public_keys(&self, wanted: &BTreeMap<OwnedServerName, Vec<String>>) -> PublicKeyMap {
        let mut out = PublicKeyMap::new();
        for (server, ids) in wanted {
            match self.keys_of(server, ids).await {
                Ok(set) if !set.is_empty() => {
                    out.insert(server.to_string(), set);
                }
                Ok(_) => tracing::info!("federation: no keys {ids:?} of {server} found"),
                Err(e) => tracing::info!("federation: keys of {server}: {e}"),
            }
        }
        out
    }

    /// Verifies `object`'s signature by `server` (one of the keys it is
    /// signed with must be known and its signature valid).
    pub async fn verify_json(&self, server: &ServerName, object: &CanonicalJsonObject) -> Result<()> {
        let ids: Vec<String> = match object.get("signatures") {
            Some(CanonicalJsonValue::Object(sigs)) => match sigs.get(server.as_str()) {
                Some(CanonicalJsonValue::Object(by_key)) => by_key.keys().cloned().collect(),
                _ => vec![],
            },
            _ => vec![],
        };
        if ids.is_empty() {
            return Err(Error::new(ErrorKind::Unauthorized, format!("Not signed by {server}")));
        }
        let set = self.keys_of(server, &ids).await?;
        verify_by(server, &set, object)
    }

    /// The stored keys of `server` with the IDs `ids` (all its keys when
    /// `ids` is empty), fetched first when one is missing or none is
    /// valid now.
    pub async fn keys_of(&self, server: &ServerName, ids: &[String]) -> Result<PublicKeySet> {
        if server == self.server_name {
            let mut own = PublicKeySet::new();
            own.insert(self.own_key_id(), self.own_public_key());
            return Ok(own);
        }
        let now = now_ms();
        let fresh = |keys: &[ServerKeyRecord]| {
            let current = keys.iter().any(|k| k.expired_ts.is_none() && k.valid_until_ts > now);
            current && ids.iter().all(|id| keys.iter().any(|k| &k.key_id == id))
        };
        let stored = self.store.server_keys(server.as_str()).await?;
        if fresh(&stored) {
            return Ok(key_set(stored, ids));
        }
        // Wait for a fetch of the same server under way, then look again.
        let lock = self.fetching.lock().entry(server.to_owned()).or_default().clone();
        let _one_fetch = lock.lock().await;
        let stored = self.store.server_keys(server.as_str()).await?;
        let keys = if fresh(&stored) {
            stored
        } else {
            match self.fetch(server).await {
                Ok(()) => self.store.server_keys(server.as_str()).await?,
                // What is stored may still do (an old event's key).
                Err(e) if !stored.is_empty() => {
                    tracing::info!("federation: refetching the keys of {server}: {e}; using the stored ones");
                    stored
                }
                Err(e) => {
                    self.fetch_done(server, &lock);
                    return Err(e);
                }
            }
        };
        self.fetch_done(server, &lock);
        Ok(key_set(keys, ids))
    }

    /// Forgets `server`'s fetch lock unless others wait on it.
    fn fetch_done(&self, server: &ServerName, lock: &Arc<tokio::sync::Mutex<()>>) {
        let mut fetching = self.fetching.lock();
        // Ours, and the map's: nobody else holds it.
        if Arc::strong_count(lock) <= 2 {
            fetching.remove(server);
        }
    }

    /// Fetches `server`'s keys, from itself, else from each trusted
    /// notary in turn, and stores the first valid answer.
    pub async fn fetch(&self, server: &ServerName) -> Result<()> {
        if let Some(until) = self.failed.lock().get(server)
            && *until > Instant::now()
        {
            return Err(Error::new(
                ErrorKind::Unauthorized,
                format!("The keys of {server} could not be fetched recently; not trying again yet"),
            ));
        }
        let mut why = match self.fetch_direct(server).await {
            Ok(()) => return Ok(()),
            Err(e) => vec![e.message],
        };
        for notary in &self.trusted {
            match self.fetch_from_notary(notary, server).await {
                Ok(()) => return Ok(()),
                Err(e) => why.push(format!("notary {notary}: {}", e.message)),
            }
        }
        let now = Instant::now();
        let mut failed = self.failed.lock();
        failed.retain(|_, until| *until > now);
        failed.insert(server.to_owned(), now + FETCH_FAILURE_BACKOFF);
        Err(Error::new(
            ErrorKind::Unauthorized,
            format!("Could not fetch the keys of {server}: {}", why.join("; ")),
        ))
    }

    async fn fetch_direct(&self, server: &ServerName) -> Result<()> {
        let resp = self.client.send(server, get_server_keys::v2::Request::new()).await?;
        let stored = checked(server, &resp.server_key, None)?;
        self.store_response(stored).await
    }

    async fn fetch_from_notary(&self, notary: &ServerName, server: &ServerName) -> Result<()> {
        // The notary's own keys: stored, or from itself (never from
        // another notary).
        let mut stored = self.store.server_keys(notary.as_str()).await?;
        let now = now_ms();
        if !stored.iter().any(|k| k.expired_ts.is_none() && k.valid_until_ts > now) {
            self.fetch_direct(notary).await?;
            stored = self.store.server_keys(notary.as_str()).await?;
        }
        let notary_keys: PublicKeySet = stored
            .into_iter()
            .filter_map(|k| Some((k.key_id, Base64::parse(&k.public_key).ok()?)))
            .collect();
        let mut query = BTreeMap::new();
        query.insert(server.to_owned(), BTreeMap::new());
        let resp = self
            .client
            .send(notary, get_remote_server_keys_batch::v2::Request::new(query))
            .await?;
        let mut last = Error::not_found(format!("{notary} has no keys of {server}"));
        for raw in &resp.server_keys {
            match checked(server, raw, Some((notary, &notary_keys))) {
                Ok(stored) => return self.store_response(stored).await,
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn store_response(&self, (response, keys): (ServerKeyResponse, Vec<ServerKeyRecord>)) -> Result<()> {
        self.failed.lock().remove(response.server_name.as_str());
        self.store.put_server_keys(response, keys).await
    }

    /// The response for `server` to answer as a notary: the stored one
    /// when it is valid until at least `minimum_valid_until_ts`, else
    /// fetched anew (the stored one if that fails); ours for our own name.
    /// Signed by us as well.
    pub async fn notary_response(
        &self,
        server: &ServerName,
        minimum_valid_until_ts: Option<u64>,
    ) -> Option<Raw<ServerSigningKeys>> {
        let mut object = if server == self.server_name {
            self.own_keys().ok()?
        } else {
            let wanted = minimum_valid_until_ts.unwrap_or_else(now_ms);
            let stored = self.store.server_key_response(server.as_str()).await.ok().flatten();
            let stored = match stored {
                Some(s) if s.valid_until_ts >= wanted => Some(s),
                old => match self.fetch(server).await {
                    Ok(()) => self.store.server_key_response(server.as_str()).await.ok().flatten(),
                    Err(e) => {
                        tracing::info!("federation: notary: keys of {server}: {e}");
                        old
                    }
                },
            }?;
            let mut object: CanonicalJsonObject = serde_json::from_str(&stored.json).ok()?;
            self.sign(&mut object).ok()?;
            object
        };
        // Our own keys are signed already.
        if server == self.server_name {
            return serde_json::value::to_raw_value(&object).ok().map(Raw::from_json);
        }
        object.remove("unsigned");
        serde_json::value::to_raw_value(&object).ok().map(Raw::from_json)
    }
}

/// The keys of `keys` with the IDs `ids` (all of them when `ids` is empty).
fn key_set(keys: Vec<ServerKeyRecord>, ids: &[String]) -> PublicKeySet {
    keys.into_iter()
        .filter(|k| ids.is_empty() || ids.contains(&k.key_id))
        .filter_map(|k| Some((k.key_id, Base64::parse(&k.public_key).ok()?)))
        .collect()
}

/// Checks a key response for `server`: it names `server`, is signed by one
/// of the keys it lists (every listed key's signature that is present must
/// be valid), and, from a notary, by the notary too. Answers what to store.
fn checked(
    server: &ServerName,
    raw: &Raw<ServerSigningKeys>,
    notary: Option<(&ServerName, &PublicKeySet)>,
) -> Result<(ServerKeyResponse, Vec<ServerKeyRecord>)> {
    let bad = |why: String| Error::new(ErrorKind::Unauthorized, format!("key response for {server}: {why}"));
    let keys: ServerSigningKeys = raw.deserialize().map_err(|e| bad(format!("unreadable: {e}")))?;
    if keys.server_name != server {
        return Err(bad(format!("names another server, {}", keys.server_name)));
    }
    let object: CanonicalJsonObject =
        serde_json::from_str(raw.json().get()).map_err(|e| bad(format!("not canonical JSON: {e}")))?;
    let own: PublicKeySet = keys
        .verify_keys
        .iter()
        .map(|(id, k)| (id.to_string(), k.key.clone()))
        .collect();
    if own.is_empty() {
        return Err(bad("lists no verify keys".into()));
    }
    verify_by(server, &own, &object)?;
    if let Some((notary, notary_keys)) = notary {
        verify_by(notary, notary_keys, &object)?;
    }
    let valid_until: u64 = keys.valid_until_ts.get().into();
    let fetched = now_ms();
    let mut records: Vec<ServerKeyRecord> = keys
        .verify_keys
        .iter()
        .map(|(id, k)| ServerKeyRecord {
            server_name: server.to_string(),
            key_id: id.to_string(),
            public_key: k.key.encode(),
            valid_until_ts: valid_until,
            expired_ts: None,
            fetched_ts: fetched,
        })
        .collect();
    records.extend(keys.old_verify_keys.iter().map(|(id, k)| {
        let expired: u64 = k.expired_ts.get().into();
        ServerKeyRecord {
            server_name: server.to_string(),
            key_id: id.to_string(),
            public_key: k.key.encode(),
            valid_until_ts: expired,
            expired_ts: Some(expired),
            fetched_ts: fetched,
        }
    }));
    // Only the server's own signature is kept: a notary's is not ours to
    // pass on.
    let mut kept = object;
    if let Some(CanonicalJsonValue::Object(sigs)) = kept.get_mut("signatures") {
        sigs.retain(|entity, _| entity == server.as_str());
    }
    let json = serde_json::to_string(&kept).map_err(Error::internal)?;
    Ok((
        ServerKeyResponse {
            server_name: server.to_string(),
            json,
            valid_until_ts: valid_until,
            fetched_ts: fetched,
        },
        records,
    ))
}

/// Verifies `entity`'s signature on `object` with `keys`, ignoring other
/// entities' signatures.
fn verify_by(entity: &ServerName, keys: &PublicKeySet, object: &CanonicalJsonObject) -> Result<()> {
    let mut only = object.clone();
    match only.get_mut("signatures") {
        Some(CanonicalJsonValue::Object(sigs)) => {
            sigs.retain(|e, _| e == entity.as_str());
            if sigs.is_empty() {
                return Err(Error::new(ErrorKind::Unauthorized, format!("Not signed by {entity}")));
            }
        }
        _ => return Err(Error::new(ErrorKind::Unauthorized, "Not signed")),
    }
    let mut map = PublicKeyMap::new();
    map.insert(entity.to_string(), keys.clone());
    ruma::signatures::verify_json(&map, &only)
        .map_err(|e| Error::new(ErrorKind::Unauthorized, format!("Bad signature of {entity}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: &str) -> Ed25519KeyPair {
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.into()).unwrap()
    }

    fn response(server: &str, signer: &Ed25519KeyPair, listed: &Ed25519KeyPair) -> Raw<ServerSigningKeys> {
        let value = serde_json::json!({
            "server_name": server,
            "verify_keys": { format!("ed25519:{}", listed.version()): { "key": Base64::<ruma::serde::base64::Standard>::new(listed.public_key().to_vec()).encode() } },
            "old_verify_keys": {},
            "valid_until_ts": now_ms() + 1000,
        });
        let mut object: CanonicalJsonObject = serde_json::from_value(value).unwrap();
        ruma::signatures::sign_json(server, signer, &mut object).unwrap();
        Raw::from_json(serde_json::value::to_raw_value(&object).unwrap())
    }

    #[test]
    fn key_responses_are_checked() {
        let b: OwnedServerName = "b.example:8448".try_into().unwrap();
        let k = key("one");
        let (stored, keys) = checked(&b, &response(b.as_str(), &k, &k), None).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_id, "ed25519:one");
        assert!(stored.json.contains("signatures"));
        // Another server's name.
        let c: OwnedServerName = "c.example".try_into().unwrap();
        assert!(checked(&c, &response(b.as_str(), &k, &k), None).is_err());
        // Signed by a key it does not list (same ID, other key).
        let other = key("one");
        assert!(checked(&b, &response(b.as_str(), &other, &k), None).is_err());
    }
}
