//! End-to-end-encryption endpoints: key upload, query, claim and changes,
//! cross-signing keys and signatures, and to-device messages. Decoding and encoding only; the work is in
//! `weft_services::keys`.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use weft_core::Error;
use weft_services::keys::{
    ClaimKeysRequest, CrossSigningUpload, QueryKeysRequest, SendToDeviceRequest, SignaturesUpload, UploadKeysRequest,
};

use ruma::api::client::keys::{claim_keys, get_key_changes, get_keys, upload_keys};
use ruma::api::client::to_device::send_event_to_device;

use crate::accounts::{AuthData, password_uia};
use crate::endpoint::{Ruma, bad_json, convert, field};
use crate::extract::{Auth, JsonBody};
use crate::{ApiResult, AppState};

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

pub async fn query(s: AppState, req: Ruma<get_keys::v3::Request>) -> Result<get_keys::v3::Response, Error> {
    let query = QueryKeysRequest {
        device_keys: convert(&req.body.device_keys)?,
        timeout: req.body.timeout.map(|t| t.as_millis() as u64),
    };
    let mut out = s.query_keys(&req.caller, query).await?;
    let mut resp = get_keys::v3::Response::new();
    resp.failures = field(&mut out, "failures")?;
    resp.device_keys = field(&mut out, "device_keys")?;
    resp.master_keys = field(&mut out, "master_keys")?;
    resp.self_signing_keys = field(&mut out, "self_signing_keys")?;
    resp.user_signing_keys = field(&mut out, "user_signing_keys")?;
    Ok(resp)
}

pub async fn claim(s: AppState, req: Ruma<claim_keys::v3::Request>) -> Result<claim_keys::v3::Response, Error> {
    let claim = ClaimKeysRequest {
        one_time_keys: convert(&req.body.one_time_keys)?,
        timeout: req.body.timeout.map(|t| t.as_millis() as u64),
    };
    let mut out = s.claim_keys(&req.caller, claim).await?;
    let mut resp = claim_keys::v3::Response::new(field(&mut out, "one_time_keys")?);
    resp.failures = field(&mut out, "failures")?;
    Ok(resp)
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

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeviceSigningBody {
    #[serde(flatten)]
    keys: CrossSigningUpload,
    auth: Option<AuthData>,
}

/// Replacing existing cross-signing keys needs `m.login.password` UIA; the
/// first upload does not.
pub async fn device_signing_upload(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(body): JsonBody<DeviceSigningBody>,
) -> ApiResult {
    if s.cross_signing_needs_auth(&session, &body.keys).await? {
        password_uia(&s, &session, body.auth).await?;
    }
    Ok(Json(s.upload_cross_signing_keys(&session, body.keys).await?))
}

pub async fn signatures_upload(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(body): JsonBody<SignaturesUpload>,
) -> ApiResult {
    Ok(Json(s.upload_signatures(&session, body).await?))
}
