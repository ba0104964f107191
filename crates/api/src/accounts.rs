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

use crate::endpoint::Ruma;
use crate::extract::{Auth, ClientIp, JsonBody, P, Q};
use crate::{ApiResult, AppState};

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct AuthData {
    #[serde(rename = "type")]
    kind: Option<String>,
    session: Option<String>,
    token: Option<String>,
    password: Option<String>,
    identifier: Option<Identifier>,
    user: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RegisterRequest {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    inhibit_login: bool,
    auth: Option<AuthData>,
}

#[derive(Deserialize, Default)]
pub struct KindQuery {
    kind: Option<String>,
}

pub async fn register(
    State(s): State<AppState>,
    Q(q): Q<KindQuery>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> ApiResult {
    if q.kind.as_deref() == Some("guest") {
        return Err(Error::forbidden("Guest access is not allowed").into());
    }
    let stage = match s.accounts.registration_mode() {
        RegistrationMode::Disabled => return Err(Error::forbidden("Registration is disabled").into()),
        RegistrationMode::Open => "m.login.dummy",
        RegistrationMode::Token => "m.login.registration_token",
    };
    // Validate the username before asking for auth, as clients expect.
    let name = match &req.username {
        Some(u) => u.to_lowercase().eq(u).then(|| u.clone()).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidUsername,
                "User names may only contain a-z, 0-9, and . _ = - / +",
            )
        })?,
        None => weft_services::accounts::random_string(12).to_lowercase(),
    };
    if !s.accounts.is_available(&name).await? {
        return Err(Error::new(ErrorKind::UserInUse, "User ID already taken").into());
    }
    let Some(password) = req.password.clone() else {
        return Err(Error::missing_param("password is required").into());
    };
    let auth = req.auth.unwrap_or_default();
    if let Some(id) = &auth.session
        && !s.accounts.uia_known(id)
    {
        return Err(Error::new(ErrorKind::Unknown, "Unknown user-interactive auth session")
            .with_status(400)
            .into());
    }
    let session = auth.session.clone().unwrap_or_else(|| s.accounts.new_uia_session());
    let done = match auth.kind.as_deref() {
        Some("m.login.dummy") if stage == "m.login.dummy" => true,
        Some("m.login.registration_token") if stage == "m.login.registration_token" => {
            let ok = auth
                .token
                .as_deref()
                .is_some_and(|t| s.accounts.registration_token_valid(t));
            if !ok {
                let mut body = s.accounts.uia_body(&session, &[&[stage]], &[]);
                body["errcode"] = "M_FORBIDDEN".into();
                body["error"] = "Invalid registration token".into();
                return Err(Error::new(ErrorKind::Uia(body), "Invalid registration token").into());
            }
            true
        }
        _ => false,
    };
    if !done {
        let body = s.accounts.uia_body(&session, &[&[stage]], &[]);
        return Err(Error::new(ErrorKind::Uia(body), "Authentication required").into());
    }
    s.accounts.uia_finish(&session);
    let user_id = s.accounts.create_user(&name, Some(&password), false).await?;
    if req.inhibit_login {
        return Ok(Json(json!({ "user_id": user_id })));
    }
    let login = s
        .accounts
        .new_device(
            &user_id,
            req.device_id.as_deref(),
            req.initial_device_display_name.as_deref(),
        )
        .await?;
    Ok(Json(json!({
        "user_id": login.user_id,
        "device_id": login.device_id,
        "access_token": login.access_token,
        "home_server": s.server_name,
    })))
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

#[derive(Deserialize)]
pub struct LoginRequest {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

fn user_of(identifier: &Option<Identifier>, user: &Option<String>) -> Result<String, Error> {
    match (identifier, user) {
        (Some(id), _) if id.kind == "m.id.user" => id
            .user
            .clone()
            .ok_or_else(|| Error::bad_json("identifier.user is required")),
        (Some(id), _) => {
            Err(Error::new(ErrorKind::Unknown, format!("Unsupported identifier type {}", id.kind)).with_status(400))
        }
        (None, Some(u)) => Ok(u.clone()),
        (None, None) => Err(Error::bad_json("identifier is required")),
    }
}

pub async fn login(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(req): JsonBody<LoginRequest>,
) -> ApiResult {
    if req.kind != "m.login.password" {
        return Err(Error::new(ErrorKind::Unknown, "Unsupported login type")
            .with_status(400)
            .into());
    }
    let user = user_of(&req.identifier, &req.user)?;
    let password = req.password.ok_or_else(|| Error::bad_json("password is required"))?;
    let user_id = s.accounts.check_password(&user.to_lowercase(), &password, ip).await?;
    let login = s
        .accounts
        .new_device(
            &user_id,
            req.device_id.as_deref(),
            req.initial_device_display_name.as_deref(),
        )
        .await?;
    Ok(Json(json!({
        "user_id": login.user_id,
        "device_id": login.device_id,
        "access_token": login.access_token,
        "home_server": s.server_name,
        "well_known": { "m.homeserver": { "base_url": s.config.base_url() } },
    })))
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

/// Checks `m.login.password` user-interactive auth for the session's user,
/// or returns the 401 that asks for it.
pub(crate) async fn password_uia(
    s: &AppState,
    session: &weft_services::Session,
    auth: Option<AuthData>,
) -> Result<(), Error> {
    let auth = auth.unwrap_or_default();
    let uia_session = auth.session.clone().unwrap_or_else(|| s.accounts.new_uia_session());
    let ask = |errcode: Option<&str>| {
        let mut body = s.accounts.uia_body(&uia_session, &[&["m.login.password"]], &[]);
        if let Some(code) = errcode {
            body["errcode"] = code.into();
            body["error"] = "Invalid password".into();
        }
        Error::new(ErrorKind::Uia(body), "Authentication required")
    };
    if auth.kind.as_deref() != Some("m.login.password") {
        return Err(ask(None));
    }
    let user = user_of(&auth.identifier, &auth.user).unwrap_or_else(|_| session.user_id.to_string());
    let password = auth.password.unwrap_or_default();
    // Guesses here are counted against the account (the address is not
    // known in this helper).
    match s.accounts.check_password(&user, &password, None).await {
        Ok(uid) if uid == session.user_id => {
            s.accounts.uia_finish(&uia_session);
            Ok(())
        }
        Err(e) if matches!(e.kind, ErrorKind::LimitExceeded { .. }) => Err(e),
        _ => Err(ask(Some("M_FORBIDDEN"))),
    }
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
    password_uia(&s, &session, req.auth).await?;
    s.accounts.set_password(&session.user_id, &req.new_password).await?;
    if req.logout_devices {
        s.accounts
            .logout_all_except(&session.user_id, Some(&session.device_id))
            .await?;
    }
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
    password_uia(&s, &session, req.auth).await?;
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

pub async fn list_devices(State(s): State<AppState>, Auth(session): Auth) -> ApiResult {
    Ok(Json(json!({ "devices": s.accounts.devices(&session).await? })))
}

pub async fn get_device(State(s): State<AppState>, Auth(session): Auth, P(device_id): P<String>) -> ApiResult {
    Ok(Json(s.accounts.device(&session, &device_id).await?))
}
