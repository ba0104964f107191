//! End-to-end-encryption support: device and one-time key publishing,
//! key queries and claims, device-list changes, and to-device messages.
//! The server never looks inside keys: it stores what devices upload
//! (signatures included) and hands it out again.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use weft_core::{Error, Result};
use weft_store::{DeviceTarget, KeySignature, KeyUpload, NewToDevice};

use crate::content::canonical_object;
use crate::tokens::parse_stream_token;
use crate::{Services, Session};

/// The `/keys/upload` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UploadKeysRequest {
    pub device_keys: Option<Map<String, Value>>,
    pub one_time_keys: Map<String, Value>,
    pub fallback_keys: Map<String, Value>,
    /// The name fallback keys had before they were in the spec.
    #[serde(rename = "org.matrix.msc2732.fallback_keys")]
    pub unstable_fallback_keys: Map<String, Value>,
}

/// The `/keys/query` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct QueryKeysRequest {
    pub device_keys: BTreeMap<String, Vec<String>>,
    pub timeout: Option<u64>,
}

/// The `/keys/claim` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ClaimKeysRequest {
    pub one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
    pub timeout: Option<u64>,
}

/// The `/sendToDevice` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendToDeviceRequest {
    pub messages: BTreeMap<String, BTreeMap<String, Value>>,
}

/// The `/keys/device_signing/upload` body (`auth` is the door's business).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CrossSigningUpload {
    pub master_key: Option<Map<String, Value>>,
    pub self_signing_key: Option<Map<String, Value>>,
    pub user_signing_key: Option<Map<String, Value>>,
}

/// The `/keys/signatures/upload` body: user → key ID (device ID or
/// cross-signing public key) → the signed key object.
pub type SignaturesUpload = BTreeMap<String, BTreeMap<String, Value>>;

/// The one-time key algorithm clients count on seeing, even at zero.
const SIGNED_CURVE25519: &str = "signed_curve25519";

/// Key ID → key JSON, checking IDs are "algorithm:id" and keys are objects
/// (or strings, the old unsigned curve25519 form).
fn key_list(keys: Map<String, Value>, what: &str) -> Result<Vec<(String, String)>> {
    keys.into_iter()
        .map(|(id, key)| {
            crate::text::check_text(&format!("{what} key ID"), &id)?;
            match id.split_once(':') {
                Some((alg, rest)) if !alg.is_empty() && !rest.is_empty() => {}
                _ => {
                    return Err(Error::invalid_param(format!(
                        "{what} key ID {id:?} is not algorithm:id"
                    )));
                }
            }
            if !key.is_object() && !key.is_string() {
                return Err(Error::bad_json(format!("{what} key {id} must be an object")));
            }
            let json = serde_json::to_string(&key).map_err(Error::internal)?;
            Ok((id, json))
        })
        .collect()
}

/// `{alg: n}` with `signed_curve25519` always present.
pub fn counts_json(mut counts: BTreeMap<String, u64>) -> Value {
    counts.entry(SIGNED_CURVE25519.to_owned()).or_insert(0);
    json!(counts)
}

impl Services {
    pub(crate) fn is_local_user(&self, user_id: &str) -> bool {
        user_id
            .strip_prefix('@')
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(_, server)| server == self.server_name.as_str())
    }

    /// `POST /keys/upload`: stores the session device's keys; returns the
    /// response body with its one-time key counts.
    pub async fn upload_keys(&self, session: &Session, req: UploadKeysRequest) -> Result<Value> {
        let user = session.user_id.as_str();
        let device_keys = match req.device_keys {
            None => None,
            Some(keys) => {
                if keys.get("user_id").and_then(Value::as_str) != Some(user) {
                    return Err(Error::invalid_param(
                        "device_keys.user_id does not match the access token",
                    ));
                }
                if keys.get("device_id").and_then(Value::as_str) != Some(session.device_id.as_str()) {
                    return Err(Error::invalid_param(
                        "device_keys.device_id does not match the access token",
                    ));
                }
                if !keys.get("keys").is_some_and(Value::is_object) {
                    return Err(Error::bad_json("device_keys.keys must be an object"));
                }
                if !keys.get("algorithms").is_some_and(Value::is_array) {
                    return Err(Error::bad_json("device_keys.algorithms must be an array"));
                }
                // Signatures are checked by the devices that use the keys;
                // the canonical-JSON check keeps them verifiable.
                let keys = canonical_object(Value::Object(keys))?;
                Some(serde_json::to_string(&keys).map_err(Error::internal)?)
            }
        };
        let mut fallback = req.unstable_fallback_keys;
        fallback.extend(req.fallback_keys);
        let upload = KeyUpload {
            device_keys,
            one_time_keys: key_list(req.one_time_keys, "one-time")?,
            fallback_keys: key_list(fallback, "fallback")?,
        };
        let counts = self.store.upload_keys(user, &session.device_id, upload).await;
        self.sync_memo
            .keys_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let counts = counts?;
        Ok(json!({ "one_time_key_counts": counts_json(counts) }))
    }

    /// A local user's device keys (all devices for an empty `devices`),
    /// with their display names as `unsigned.device_display_name` and the
    /// signatures uploaded later merged in, and their cross-signing keys.
    pub(crate) async fn local_user_keys(&self, user: &str, devices: &[String]) -> Result<UserKeys> {
        let signatures = self.store.key_signatures(user).await?;
        let mut out = UserKeys::default();
        for record in self.store.get_device_keys(user, devices).await? {
            let mut keys: Value = serde_json::from_str(&record.keys_json).map_err(Error::internal)?;
            merge_signatures(&mut keys, &record.device_id, &signatures);
            if let (Some(name), Some(obj)) = (record.display_name, keys.as_object_mut()) {
                obj.insert("unsigned".into(), json!({ "device_display_name": name }));
            }
            out.devices.insert(record.device_id, keys);
        }
        for (key_type, json) in self.store.get_cross_signing_keys(user).await? {
            let mut key: Value = serde_json::from_str(&json).map_err(Error::internal)?;
            if let Some(public) = public_key(&key) {
                merge_signatures(&mut key, &public, &signatures);
            }
            match key_type.as_str() {
                "master" => out.master = Some(key),
                "self_signing" => out.self_signing = Some(key),
                "user_signing" => out.user_signing = Some(key),
                _ => {}
            }
        }
        Ok(out)
    }

    /// `POST /keys/query`: device keys of the users asked for (all their
    /// devices for an empty list); users of other servers' are asked of
    /// their servers or taken from the cache (`federation_e2ee`).
    pub async fn query_keys(&self, session: &Session, req: QueryKeysRequest) -> Result<Value> {
        let mut out = Map::new();
        let (mut master, mut self_signing, mut user_signing) = (Map::new(), Map::new(), Map::new());
        let mut remote: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (user, devices) in req.device_keys {
            if !self.is_local_user(&user) {
                remote.insert(user, devices);
                continue;
            }
            let keys = self.local_user_keys(&user, &devices).await?;
            out.insert(user.clone(), Value::Object(keys.devices));
            if let Some(k) = keys.master {
                master.insert(user.clone(), k);
            }
            if let Some(k) = keys.self_signing {
                self_signing.insert(user.clone(), k);
            }
            // Only the owner sees their user-signing key.
            if let Some(k) = keys.user_signing.filter(|_| user == session.user_id.as_str()) {
                user_signing.insert(user.clone(), k);
            }
        }
        let fetched = self.remote_keys_query(remote, req.timeout).await?;
        out.extend(fetched.device_keys);
        master.extend(fetched.master_keys);
        self_signing.extend(fetched.self_signing_keys);
        Ok(json!({
            "device_keys": out,
            "failures": fetched.failures,
            "master_keys": master,
            "self_signing_keys": self_signing,
            "user_signing_keys": user_signing,
        }))
    }

    /// Whether uploading these cross-signing keys needs the user to
    /// authenticate again: only when it would replace an existing master key.
    pub async fn cross_signing_needs_auth(&self, session: &Session, req: &CrossSigningUpload) -> Result<bool> {
        let existing = self.store.get_cross_signing_keys(session.user_id.as_str()).await?;
        let Some((_, old)) = existing.iter().find(|(t, _)| t == "master") else {
            return Ok(false);
        };
        let old: Value = serde_json::from_str(old).map_err(Error::internal)?;
        Ok(match &req.master_key {
            Some(new) => public_key(&old) != public_key(&Value::Object(new.clone())),
            // Sub-keys replaced under the same master: still a key change.
            None => req.self_signing_key.is_some() || req.user_signing_key.is_some(),
        })
    }

    /// `POST /keys/device_signing/upload`, after any authentication.
    pub async fn upload_cross_signing_keys(&self, session: &Session, req: CrossSigningUpload) -> Result<Value> {
        let user = session.user_id.as_str();
        let mut keys = Vec::new();
        for (key_type, key) in [
            ("master", req.master_key),
            ("self_signing", req.self_signing_key),
            ("user_signing", req.user_signing_key),
        ] {
            let Some(key) = key else { continue };
            if key.get("user_id").and_then(Value::as_str) != Some(user) {
                return Err(Error::invalid_param(format!(
                    "{key_type} key: user_id does not match the access token"
                )));
            }
            let usage_ok = key
                .get("usage")
                .and_then(Value::as_array)
                .is_some_and(|u| u.iter().any(|v| v.as_str() == Some(key_type)));
            if !usage_ok {
                return Err(Error::invalid_param(format!(
                    "{key_type} key: usage must contain {key_type:?}"
                )));
            }
            let key = serde_json::to_value(canonical_object(Value::Object(key))?).map_err(Error::internal)?;
            if public_key(&key).is_none() {
                return Err(Error::invalid_param(format!(
                    "{key_type} key: needs exactly one ed25519 key"
                )));
            }
            keys.push((
                key_type.to_owned(),
                serde_json::to_string(&key).map_err(Error::internal)?,
            ));
        }
        if !keys.iter().any(|(t, _)| t == "master")
            && !self
                .store
                .get_cross_signing_keys(user)
                .await?
                .iter()
                .any(|(t, _)| t == "master")
        {
            return Err(Error::invalid_param("No master key uploaded"));
        }
        let public: Vec<String> = keys
            .iter()
            .filter(|(t, _)| t != "user_signing")
            .map(|(t, _)| t.clone())
            .collect();
        self.store.put_cross_signing_keys(user, keys).await?;
        if !public.is_empty() {
            self.send_signing_key_update(&session.user_id).await;
        }
        Ok(json!({}))
    }

    /// `POST /keys/signatures/upload`: stores the caller's signatures of
    /// known keys; unknown keys are reported in `failures`. Signatures are
    /// stored, not verified (the devices that rely on them verify them).
    pub async fn upload_signatures(&self, session: &Session, req: SignaturesUpload) -> Result<Value> {
        let signer = session.user_id.as_str();
        let mut failures: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
        let mut to_store = Vec::new();
        for (user, keys) in req {
            crate::text::check_text("User ID", &user)?;
            let devices: Vec<String> = if self.is_local_user(&user) {
                self.store
                    .get_device_keys(&user, &[])
                    .await?
                    .into_iter()
                    .map(|d| d.device_id)
                    .collect()
            } else {
                Vec::new()
            };
            let mut cross: Vec<String> = Vec::new();
            if self.is_local_user(&user) {
                for (_, json) in self.store.get_cross_signing_keys(&user).await? {
                    let key: Value = serde_json::from_str(&json).map_err(Error::internal)?;
                    cross.extend(public_key(&key));
                }
            }
            for (key_id, signed) in keys {
                let known = devices.contains(&key_id) || cross.contains(&key_id);
                let sigs = signed["signatures"][signer].as_object();
                let fail = |errcode: &str, error: &str| json!({ "errcode": errcode, "error": error });
                let entry = match (known, sigs) {
                    (false, _) => Some(fail("M_NOT_FOUND", "Unknown key")),
                    (true, None) => Some(fail("M_INVALID_SIGNATURE", "No signature by the uploader")),
                    (true, Some(sigs)) => {
                        for (signer_key, sig) in sigs {
                            if let Some(sig) = sig.as_str() {
                                crate::text::check_text("Signing key ID", signer_key)?;
                                crate::text::check_text("Signature", sig)?;
                                to_store.push(KeySignature {
                                    target_user: user.clone(),
                                    target_key: key_id.clone(),
                                    signer_user: signer.to_owned(),
                                    signer_key: signer_key.clone(),
                                    signature: sig.to_owned(),
                                });
                            }
                        }
                        None
                    }
                };
                if let Some(e) = entry {
                    failures.entry(user.clone()).or_default().insert(key_id, e);
                }
            }
        }
        if !to_store.is_empty() {
            self.store.add_key_signatures(to_store).await?;
        }
        Ok(json!({ "failures": failures }))
    }

    /// `POST /keys/claim`: one key per device asked for; keys of other
    /// servers' users are claimed from their servers.
    pub async fn claim_keys(&self, _session: &Session, req: ClaimKeysRequest) -> Result<Value> {
        let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) = req
            .one_time_keys
            .into_iter()
            .partition(|(user, _)| self.is_local_user(user));
        let mut out = self.claim_local_keys(local).await?;
        let (claimed, failures) = self.remote_claim_keys(remote, req.timeout).await?;
        for (user, devices) in claimed {
            out.entry(user).or_default().extend(devices);
        }
        Ok(json!({ "one_time_keys": out, "failures": failures }))
    }

    /// Claims one key of each asked device of local users (each key is
    /// handed out once; a fallback key when no one-time key is left).
    pub(crate) async fn claim_local_keys(
        &self,
        wanted: BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, BTreeMap<String, Map<String, Value>>>> {
        let wanted: Vec<(String, String, String)> = wanted
            .into_iter()
            .filter(|(user, _)| self.is_local_user(user))
            .flat_map(|(user, devices)| {
                devices
                    .into_iter()
                    .map(move |(device, alg)| (user.clone(), device, alg))
            })
            .collect();
        let mut out: BTreeMap<String, BTreeMap<String, Map<String, Value>>> = BTreeMap::new();
        let claimed = self.store.claim_keys(wanted).await;
        self.sync_memo
            .keys_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for key in claimed? {
            let value: Value = serde_json::from_str(&key.key_json).map_err(Error::internal)?;
            out.entry(key.user_id)
                .or_default()
                .entry(key.device_id)
                .or_default()
                .insert(key.key_id, value);
        }
        Ok(out)
    }

    /// `GET /keys/changes`: users (sharing a room with the caller) whose
    /// device lists changed between two sync tokens.
    pub async fn key_changes(&self, session: &Session, from: &str, to: &str) -> Result<Value> {
        let from = parse_stream_token(from)?;
        let to = parse_stream_token(to)?.min(self.store.current_position());
        let user = session.user_id.as_str();
        let (changed, left) = if to > from {
            (
                self.store.device_list_changes(user, from, to).await?,
                self.store.device_list_left(user, from, to).await?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(json!({ "changed": changed, "left": left }))
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}`.
    pub async fn send_to_device(
        &self,
        session: &Session,
        event_type: &str,
        txn_id: &str,
        req: SendToDeviceRequest,
    ) -> Result<Value> {
        crate::text::check_text("Event type", event_type)?;
        crate::text::check_text("Transaction ID", txn_id)?;
        let mut messages = Vec::new();
        let mut remote: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for (user, devices) in req.messages {
            if !self.is_local_user(&user) {
                let mut checked = BTreeMap::new();
                for (device, content) in devices {
                    checked.insert(
                        device,
                        serde_json::to_value(canonical_object(content)?).map_err(Error::internal)?,
                    );
                }
                remote.insert(user, checked);
                continue;
            }
            for (device, content) in devices {
                let content = canonical_object(content)?;
                let content_json = serde_json::to_string(&content).map_err(Error::internal)?;
                let target = if device == "*" {
                    DeviceTarget::All
                } else {
                    DeviceTarget::One(device)
                };
                messages.push(NewToDevice {
                    user_id: user.clone(),
                    target,
                    content_json,
                });
            }
        }
        let fresh = self
            .store
            .send_to_device(
                session.user_id.as_str(),
                &session.device_id,
                event_type,
                txn_id,
                messages,
            )
            .await?;
        // A retried transaction was sent before, to other servers too.
        if fresh {
            self.send_remote_to_device(session.user_id.as_str(), event_type, remote)
                .await;
        }
        Ok(json!({}))
    }
}

/// A user's keys as [`Services::local_user_keys`] answers them.
#[derive(Debug, Default)]
pub(crate) struct UserKeys {
    /// Device ID → device keys.
    pub devices: Map<String, Value>,
    pub master: Option<Value>,
    pub self_signing: Option<Value>,
    pub user_signing: Option<Value>,
}

/// The public key of a cross-signing key object: the value of its one
/// `ed25519:` entry in `keys`.
fn public_key(key: &Value) -> Option<String> {
    let keys = key.get("keys")?.as_object()?;
    let mut ed = keys.iter().filter(|(id, _)| id.starts_with("ed25519:"));
    let (_, public) = ed.next()?;
    if ed.next().is_some() {
        return None;
    }
    public.as_str().map(str::to_owned)
}

/// Adds the signatures uploaded later for `target` into `key.signatures`.
fn merge_signatures(key: &mut Value, target: &str, signatures: &[KeySignature]) {
    let Some(obj) = key.as_object_mut() else { return };
    for sig in signatures.iter().filter(|s| s.target_key == target) {
        let all = obj.entry("signatures").or_insert_with(|| json!({}));
        if let Some(all) = all.as_object_mut() {
            let by_signer = all.entry(sig.signer_user.clone()).or_insert_with(|| json!({}));
            if let Some(by_signer) = by_signer.as_object_mut() {
                by_signer.insert(sig.signer_key.clone(), json!(sig.signature));
            }
        }
    }
}
