//! End-to-end-encryption support: device and one-time key publishing,
//! key queries and claims, device-list changes, and to-device messages.
//! The server never looks inside keys: it stores what devices upload
//! (signatures included) and hands it out again.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use weft_core::{Error, Result};
use weft_store::{DeviceTarget, KeyUpload, NewToDevice};

use crate::content::canonical_object;
use crate::room_ops::parse_token;
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

/// The one-time key algorithm clients count on seeing, even at zero.
const SIGNED_CURVE25519: &str = "signed_curve25519";

/// Key ID → key JSON, checking IDs are "algorithm:id" and keys are objects
/// (or strings, the old unsigned curve25519 form).
fn key_list(keys: Map<String, Value>, what: &str) -> Result<Vec<(String, String)>> {
    keys.into_iter()
        .map(|(id, key)| {
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
    fn is_local_user(&self, user_id: &str) -> bool {
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
        let counts = self.store.upload_keys(user, &session.device_id, upload).await?;
        Ok(json!({ "one_time_key_counts": counts_json(counts) }))
    }

    /// `POST /keys/query`: device keys of the users asked for (all their
    /// devices for an empty list).
    pub async fn query_keys(&self, _session: &Session, req: QueryKeysRequest) -> Result<Value> {
        let mut out = Map::new();
        for (user, devices) in req.device_keys {
            if !self.is_local_user(&user) {
                continue; // no federation: remote users have no keys here
            }
            let mut by_device = Map::new();
            for record in self.store.get_device_keys(&user, &devices).await? {
                let mut keys: Value = serde_json::from_str(&record.keys_json).map_err(Error::internal)?;
                if let (Some(name), Some(obj)) = (record.display_name, keys.as_object_mut()) {
                    obj.insert("unsigned".into(), json!({ "device_display_name": name }));
                }
                by_device.insert(record.device_id, keys);
            }
            out.insert(user, Value::Object(by_device));
        }
        Ok(json!({
            "device_keys": out,
            "failures": {},
            "master_keys": {},
            "self_signing_keys": {},
            "user_signing_keys": {},
        }))
    }

    /// `POST /keys/claim`: one key per device asked for.
    pub async fn claim_keys(&self, _session: &Session, req: ClaimKeysRequest) -> Result<Value> {
        let wanted: Vec<(String, String, String)> = req
            .one_time_keys
            .into_iter()
            .filter(|(user, _)| self.is_local_user(user))
            .flat_map(|(user, devices)| {
                devices
                    .into_iter()
                    .map(move |(device, alg)| (user.clone(), device, alg))
            })
            .collect();
        let mut out: BTreeMap<String, BTreeMap<String, Map<String, Value>>> = BTreeMap::new();
        for key in self.store.claim_keys(wanted).await? {
            let value: Value = serde_json::from_str(&key.key_json).map_err(Error::internal)?;
            out.entry(key.user_id)
                .or_default()
                .entry(key.device_id)
                .or_default()
                .insert(key.key_id, value);
        }
        Ok(json!({ "one_time_keys": out, "failures": {} }))
    }

    /// `GET /keys/changes`: users (sharing a room with the caller) whose
    /// device lists changed between two sync tokens.
    pub async fn key_changes(&self, session: &Session, from: &str, to: &str) -> Result<Value> {
        let from = parse_token(from)?;
        let to = parse_token(to)?.min(self.store.current_position());
        let changed = if to > from {
            self.store
                .device_list_changes(session.user_id.as_str(), from, to)
                .await?
        } else {
            Vec::new()
        };
        Ok(json!({ "changed": changed, "left": [] }))
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}`.
    pub async fn send_to_device(
        &self,
        session: &Session,
        event_type: &str,
        txn_id: &str,
        req: SendToDeviceRequest,
    ) -> Result<Value> {
        let mut messages = Vec::new();
        for (user, devices) in req.messages {
            if !self.is_local_user(&user) {
                continue; // no federation yet
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
        self.store
            .send_to_device(
                session.user_id.as_str(),
                &session.device_id,
                event_type,
                txn_id,
                messages,
            )
            .await?;
        Ok(json!({}))
    }
}
