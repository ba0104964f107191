//! Accounts: registration (with user-interactive auth), login, logout,
//! passwords, deactivation, profiles and devices.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::config::RegistrationMode;
use weft_core::{Error, ErrorKind};

use ruma::api::client::account::whoami;
use ruma::api::client::session::{logout, logout_all};

use weft_services::sign_in::{AuthData, Login, Registration};

use ruma::api::client::device::{get_device, get_devices};

use crate::endpoint::{Ruma, convert};
use crate::extract::{Auth, ClientIp, JsonBody, P, Q};
use crate::{ApiResult, AppState};

#[derive(Deserialize, Default)]
pub struct KindQuery {
    kind: Option<String>,
}

pub async fn register(
    State(s): State<AppState>,
    Q(q): Q<KindQuery>,
    JsonBody(req): JsonBody<Registration>,
) -> ApiResult {
    Ok(Json(s.register(q.kind.as_deref() == Some("guest"), req).await?))
}

#[derive(Deserialize)]
pub struct UsernameQuery {
    username: String,
}

pub async fn register_available(State(s): State<AppState>, Q(q): Q<UsernameQuery>) -> ApiResult {
    if s.accounts.is_available(&q.username).await? {
        Ok(Json(json!({ "available": true })))
    } else {
        Err(Error::new(ErrorKind::UserInUse, "User ID already taken").into())
    }
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: String,
}

pub async fn token_validity(State(s): State<AppState>, Q(q): Q<TokenQuery>) -> ApiResult {
    if s.accounts.registration_mode() != RegistrationMode::Token {
        return Err(Error::forbidden("Registration tokens are not in use").into());
    }
    Ok(Json(json!({ "valid": s.accounts.registration_token_valid(&q.token) })))
}

pub async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

pub async fn login(State(s): State<AppState>, ClientIp(ip): ClientIp, JsonBody(req): JsonBody<Login>) -> ApiResult {
    Ok(Json(s.login(req, ip).await?))
}

pub async fn whoami(_: AppState, req: Ruma<whoami::v3::Request>) -> Result<whoami::v3::Response, Error> {
    let mut resp = whoami::v3::Response::new(req.caller.user_id, false);
    resp.device_id = Some(req.caller.device_id.into());
    Ok(resp)
}

pub async fn logout(s: AppState, req: Ruma<logout::v3::Request>) -> Result<logout::v3::Response, Error> {
    s.accounts.logout(&req.caller).await?;
    Ok(logout::v3::Response::new())
}

pub async fn logout_all(s: AppState, req: Ruma<logout_all::v3::Request>) -> Result<logout_all::v3::Response, Error> {
    s.accounts.logout_all(&req.caller.user_id).await?;
    Ok(logout_all::v3::Response::new())
}

#[derive(Deserialize)]
pub struct PasswordRequest {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
    auth: Option<AuthData>,
}

fn yes() -> bool {
    true
}

pub async fn change_password(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(req): JsonBody<PasswordRequest>,
) -> ApiResult {
    s.change_password(&session, &req.new_password, req.logout_devices, req.auth)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeactivateRequest {
    auth: Option<AuthData>,
}

pub async fn deactivate(
    State(s): State<AppState>,
    Auth(session): Auth,
    JsonBody(req): JsonBody<DeactivateRequest>,
) -> ApiResult {
    s.password_uia(&session, req.auth).await?;
    s.deactivate_account(&session.user_id).await?;
    Ok(Json(json!({ "id_server_unbind_result": "no-support" })))
}

pub async fn get_profile(State(s): State<AppState>, P(user_id): P<String>) -> ApiResult {
    Ok(Json(Value::Object(s.profile(&user_id).await?)))
}

pub async fn get_profile_field(State(s): State<AppState>, P((user_id, name)): P<(String, String)>) -> ApiResult {
    Ok(Json(s.profile_field(&user_id, &name).await?))
}

pub async fn put_profile_field(
    State(s): State<AppState>,
    Auth(session): Auth,
    P((user_id, name)): P<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult {
    let value = match body.get(&name) {
        Some(Value::String(v)) => Some(v.clone()),
        Some(Value::Null) | None => None,
        Some(_) => return Err(Error::bad_json(format!("{name} must be a string")).into()),
    };
    s.set_profile_field(&session, &user_id, &name, value).await?;
    Ok(Json(json!({})))
}

pub async fn list_devices(
    s: AppState,
    req: Ruma<get_devices::v3::Request>,
) -> Result<get_devices::v3::Response, Error> {
    Ok(get_devices::v3::Response::new(convert(
        &s.accounts.devices(&req.caller).await?,
    )?))
}

pub async fn get_device(s: AppState, req: Ruma<get_device::v3::Request>) -> Result<get_device::v3::Response, Error> {
    let device = s.accounts.device(&req.caller, req.body.device_id.as_str()).await?;
    Ok(get_device::v3::Response::new(convert(&device)?))
}
