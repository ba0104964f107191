//! End-to-end-encryption endpoints: key upload, query, claim and changes,
//! cross-signing keys and signatures, and to-device messages. Decoding and encoding only; the work is in
//! `weft_services::keys`.

use weft_core::Error;
use weft_services::keys::{
    ClaimKeysRequest, CrossSigningUpload, QueryKeysRequest, SendToDeviceRequest, SignaturesUpload, UploadKeysRequest,
};

use ruma::api::client::keys::claim_keys::v3::OneTimeKeys;
use ruma::api::client::keys::{
    claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys,
};
use ruma::api::client::to_device::send_event_to_device;
use ruma::encryption::{CrossSigningKey, DeviceKeys};
use ruma::serde::Raw;
use ruma::{OwnedDeviceId, OwnedUserId};
use std::collections::BTreeMap;

use crate::AppState;
use crate::endpoint::{Full, Ruma, bad_json, convert, field};
use weft_services::sign_in::AuthData;

pub async fn upload(s: AppState, req: Ruma<upload_keys::v3::Request>) -> Result<upload_keys::v3::Response, Error> {
    let body = req.body;
    let upload = UploadKeysRequest {
        device_keys: body
            .device_keys
            .map(|k| serde_json::from_str(k.json().get()))
            .transpose()
            .map_err(bad_json)?,
        one_time_keys: convert(&body.one_time_keys)?,
        fallback_keys: convert(&body.fallback_keys)?,
        unstable_fallback_keys: Default::default(),
    };
    let mut out = s.upload_keys(&req.caller, upload).await?;
    Ok(upload_keys::v3::Response::new(field(&mut out, "one_time_key_counts")?))
}

/// The `/keys/query` answer with every field, empty ones included.
#[derive(serde::Serialize)]
pub struct QueryKeysAnswer {
    failures: BTreeMap<String, serde_json::Value>,
    device_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Raw<DeviceKeys>>>,
    master_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
    self_signing_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
    user_signing_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
}

pub async fn query(s: AppState, req: Ruma<get_keys::v3::Request>) -> Result<Full<QueryKeysAnswer>, Error> {
    let query = QueryKeysRequest {
        device_keys: convert(&req.body.device_keys)?,
        timeout: req.body.timeout.map(|t| t.as_millis() as u64),
    };
    let mut out = s.query_keys(&req.caller, query).await?;
    Ok(Full(QueryKeysAnswer {
        failures: field(&mut out, "failures")?,
        device_keys: field(&mut out, "device_keys")?,
        master_keys: field(&mut out, "master_keys")?,
        self_signing_keys: field(&mut out, "self_signing_keys")?,
        user_signing_keys: field(&mut out, "user_signing_keys")?,
    }))
}

/// The `/keys/claim` answer with every field, empty ones included.
#[derive(serde::Serialize)]
pub struct ClaimKeysAnswer {
    failures: BTreeMap<String, serde_json::Value>,
    one_time_keys: BTreeMap<OwnedUserId, OneTimeKeys>,
}

pub async fn claim(s: AppState, req: Ruma<claim_keys::v3::Request>) -> Result<Full<ClaimKeysAnswer>, Error> {
    let claim = ClaimKeysRequest {
        one_time_keys: convert(&req.body.one_time_keys)?,
        timeout: req.body.timeout.map(|t| t.as_millis() as u64),
    };
    let mut out = s.claim_keys(&req.caller, claim).await?;
    Ok(Full(ClaimKeysAnswer {
        failures: field(&mut out, "failures")?,
        one_time_keys: field(&mut out, "one_time_keys")?,
    }))
}

pub async fn changes(
    s: AppState,
    req: Ruma<get_key_changes::v3::Request>,
) -> Result<get_key_changes::v3::Response, Error> {
    let mut out = s.key_changes(&req.caller, &req.body.from, &req.body.to).await?;
    Ok(get_key_changes::v3::Response::new(
        field(&mut out, "changed")?,
        field(&mut out, "left")?,
    ))
}

pub async fn send_to_device(
    s: AppState,
    req: Ruma<send_event_to_device::v3::Request>,
) -> Result<send_event_to_device::v3::Response, Error> {
    let body = req.body;
    let messages = SendToDeviceRequest {
        messages: convert(&body.messages)?,
    };
    s.send_to_device(
        &req.caller,
        &body.event_type.to_string(),
        body.txn_id.as_str(),
        messages,
    )
    .await?;
    Ok(send_event_to_device::v3::Response::new())
}

/// Replacing existing cross-signing keys needs `m.login.password` UIA; the
/// first upload does not.
pub async fn device_signing_upload(
    s: AppState,
    req: Ruma<upload_signing_keys::v3::Request>,
) -> Result<upload_signing_keys::v3::Response, Error> {
    let b = req.body;
    let keys = CrossSigningUpload {
        master_key: object(b.master_key.as_ref())?,
        self_signing_key: object(b.self_signing_key.as_ref())?,
        user_signing_key: object(b.user_signing_key.as_ref())?,
    };
    if s.cross_signing_needs_auth(&req.caller, &keys).await? {
        let auth: Option<AuthData> = b.auth.as_ref().map(convert).transpose()?;
        s.password_uia(&req.caller, auth).await?;
    }
    s.upload_cross_signing_keys(&req.caller, keys).await?;
    Ok(upload_signing_keys::v3::Response::new())
}

/// A key ruma keeps as raw JSON, as the JSON object the services take.
fn object<T>(key: Option<&Raw<T>>) -> Result<Option<serde_json::Map<String, serde_json::Value>>, Error> {
    key.map(|k| serde_json::from_str(k.json().get()).map_err(bad_json))
        .transpose()
}

/// The `/keys/signatures/upload` answer with `failures` always present
/// (ruma leaves it out when empty).
#[derive(serde::Serialize)]
pub struct SignaturesAnswer {
    failures: BTreeMap<OwnedUserId, BTreeMap<String, upload_signatures::v3::Failure>>,
}

pub async fn signatures_upload(
    s: AppState,
    req: Ruma<upload_signatures::v3::Request>,
) -> Result<Full<SignaturesAnswer>, Error> {
    let signed: SignaturesUpload = convert(&req.body.signed_keys)?;
    let mut out = s.upload_signatures(&req.caller, signed).await?;
    Ok(Full(SignaturesAnswer {
        failures: field(&mut out, "failures")?,
    }))
}
