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

use crate::accounts::{AuthData, password_uia};

use crate::extract::{Auth, JsonBody, P, Q};
use crate::{ApiResult, AppState};

pub async fn upload(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(req): JsonBody<UploadKeysRequest>,
) -> ApiResult {
    Ok(Json(s.upload_keys(&session, req).await?))
}

pub async fn query(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(req): JsonBody<QueryKeysRequest>,
) -> ApiResult {
    Ok(Json(s.query_keys(&session, req).await?))
}

pub async fn claim(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(req): JsonBody<ClaimKeysRequest>,
) -> ApiResult {
    Ok(Json(s.claim_keys(&session, req).await?))
}

#[derive(Deserialize)]
pub struct ChangesQuery {
    from: Option<String>,
    to: Option<String>,
}

pub async fn changes(State(s): State<AppState>, Auth(session): Auth, Q(q): Q<ChangesQuery>) -> ApiResult {
    let from = q.from.ok_or_else(|| Error::missing_param("Missing `from`"))?;
    let to = q.to.ok_or_else(|| Error::missing_param("Missing `to`"))?;
    Ok(Json(s.key_changes(&session, &from, &to).await?))
}

pub async fn send_to_device(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((event_type, txn_id)): P<(String, String)>,
    JsonBody(req): JsonBody<SendToDeviceRequest>,
) -> ApiResult {
    Ok(Json(s.send_to_device(&session, &event_type, &txn_id, req).await?))
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
