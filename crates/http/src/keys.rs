//! End-to-end-encryption endpoints: key upload, query, claim and changes,
//! and to-device messages. Decoding and encoding only; the work is in
//! `weft_services::keys`.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use weft_core::Error;
use weft_services::keys::{ClaimKeysRequest, QueryKeysRequest, SendToDeviceRequest, UploadKeysRequest};

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
