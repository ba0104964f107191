//! Accounts: registration (with user-interactive auth), login, logout,
//! passwords, deactivation, profiles and devices.

use std::collections::BTreeMap;

use ruma::api::auth_scheme::AccessToken;
use ruma::api::client::account::{
    change_password, check_registration_token_validity, deactivate, get_username_availability, register, whoami,
};
use ruma::api::client::device::{delete_device, delete_devices, get_device, get_devices, update_device};
use ruma::api::client::profile::{get_profile, get_profile_field, set_profile_field};
use ruma::api::client::session::{get_login_types, login, logout, logout_all};
use ruma::api::error::FromHttpRequestError;
use ruma::api::{IncomingRequest, Metadata};
use ruma::profile::ProfileFieldValue;
use ruma::{OwnedDeviceId, OwnedUserId};
use serde_json::Value;
use weft_core::config::RegistrationMode;
use weft_core::{Error, ErrorKind};
use weft_services::sign_in::{AuthData, Login, Registration};

use crate::AppState;
use crate::endpoint::{Ruma, WithAuth, convert, field};

/// Ruma's request `R` with its user-interactive `auth` object read by the
/// services' reader instead of ruma's: ruma requires `identifier` in an
/// `m.login.password` stage, while clients (and Weft before) also send the
/// legacy `user` or name no user at all (then the session's user is meant),
/// and a registration-token stage without its token gets the UIA 401 again.
pub struct Uia<R> {
    pub request: R,
    pub auth: Option<AuthData>,
}

impl<R: Metadata> Metadata for Uia<R> {
    const METHOD: axum::http::Method = R::METHOD;
    const RATE_LIMITED: bool = R::RATE_LIMITED;
    type Authentication = R::Authentication;
    type PathBuilder = R::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = R::PATH_BUILDER;
}

impl<R: IncomingRequest> IncomingRequest for Uia<R> {
    type EndpointError = R::EndpointError;
    type OutgoingResponse = R::OutgoingResponse;

    fn try_from_http_request<B: AsRef<[u8]>, S: AsRef<str>>(
        req: axum::http::Request<B>,
        path_args: &[S],
    ) -> Result<Self, FromHttpRequestError> {
        Self::check_request_method(req.method())?;
        let (parts, body) = req.into_parts();
        // No body at all reads as `{}`, as ruma's own readers take it (a
        // client's first `DELETE /devices/{id}` often has none).
        let body = body.as_ref();
        let mut fields: serde_json::Map<String, Value> =
            serde_json::from_slice(if body.is_empty() { b"{}" } else { body })?;
        let auth = match fields.remove("auth") {
            None | Some(Value::Null) => None,
            Some(auth) => Some(serde_json::from_value::<AuthData>(auth)?),
        };
        let rest = serde_json::to_vec(&fields)?;
        let request = R::try_from_http_request(axum::http::Request::from_parts(parts, rest), path_args)?;
        Ok(Self { request, auth })
    }
}

pub async fn register(s: AppState, req: Ruma<Uia<register::v3::Request>>) -> Result<register::v3::Response, Error> {
    let Uia { request: b, auth } = req.body;
    if b.login_type == Some(register::LoginType::ApplicationService) {
        let Some(service) = req.caller else {
            return Err(Error::new(
                ErrorKind::MissingToken,
                "m.login.application_service needs the application service's token",
            ));
        };
        let mut answer = s
            .register_appservice_user(
                &service,
                b.username.as_deref(),
                b.device_id.as_ref().map(|d| d.as_str()),
                b.initial_device_display_name.as_deref(),
                b.inhibit_login,
            )
            .await?;
        let mut resp = register::v3::Response::new(
            field::<Option<OwnedUserId>>(&mut answer, "user_id")?
                .ok_or_else(|| Error::internal("registration without a user ID"))?,
        );
        resp.access_token = field(&mut answer, "access_token")?;
        resp.device_id = field::<Option<OwnedDeviceId>>(&mut answer, "device_id")?;
        return Ok(resp);
    }
    let guest = b.kind == register::RegistrationKind::Guest;
    let registration = Registration {
        username: b.username,
        password: b.password,
        device_id: b.device_id.map(String::from),
        initial_device_display_name: b.initial_device_display_name,
        inhibit_login: b.inhibit_login,
        auth,
    };
    let mut answer = s.register(guest, registration).await?;
    let mut resp = register::v3::Response::new(
        field::<Option<OwnedUserId>>(&mut answer, "user_id")?
            .ok_or_else(|| Error::internal("registration without a user ID"))?,
    );
    resp.access_token = field(&mut answer, "access_token")?;
    resp.device_id = field::<Option<OwnedDeviceId>>(&mut answer, "device_id")?;
    Ok(resp)
}

pub async fn register_available(
    s: AppState,
    req: Ruma<get_username_availability::v3::Request>,
) -> Result<get_username_availability::v3::Response, Error> {
    if s.username_available(&req.body.username).await? {
        Ok(get_username_availability::v3::Response::new(true))
    } else {
        Err(Error::new(ErrorKind::UserInUse, "User ID already taken"))
    }
}

pub async fn token_validity(
    s: AppState,
    req: Ruma<check_registration_token_validity::v1::Request>,
) -> Result<check_registration_token_validity::v1::Response, Error> {
    if s.accounts.registration_mode() != RegistrationMode::Token {
        return Err(Error::forbidden("Registration tokens are not in use"));
    }
    Ok(check_registration_token_validity::v1::Response::new(
        s.accounts.registration_token_valid(&req.body.token),
    ))
}

pub async fn login_flows(
    _: AppState,
    _: Ruma<get_login_types::v3::Request>,
) -> Result<get_login_types::v3::Response, Error> {
    use get_login_types::v3::{LoginType, PasswordLoginType};
    Ok(get_login_types::v3::Response::new(vec![
        LoginType::Password(PasswordLoginType::new()),
        LoginType::ApplicationService(get_login_types::v3::ApplicationServiceLoginType::new()),
    ]))
}

/// ruma's `POST /login` request, read only once the body is known to be
/// an object with a string `type`: ruma's reader panics on an object
/// without one.
pub struct LoginRequest(login::v3::Request);

impl Metadata for LoginRequest {
    const METHOD: axum::http::Method = login::v3::Request::METHOD;
    const RATE_LIMITED: bool = login::v3::Request::RATE_LIMITED;
    type Authentication = <login::v3::Request as Metadata>::Authentication;
    type PathBuilder = <login::v3::Request as Metadata>::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = login::v3::Request::PATH_BUILDER;
}

impl IncomingRequest for LoginRequest {
    type EndpointError = <login::v3::Request as IncomingRequest>::EndpointError;
    type OutgoingResponse = login::v3::Response;

    fn try_from_http_request<B: AsRef<[u8]>, S: AsRef<str>>(
        req: axum::http::Request<B>,
        path_args: &[S],
    ) -> Result<Self, FromHttpRequestError> {
        #[derive(serde::Deserialize)]
        struct Typed {
            #[serde(rename = "type")]
            _kind: String,
        }
        Self::check_request_method(req.method())?;
        serde_json::from_slice::<Typed>(req.body().as_ref())?;
        Ok(Self(login::v3::Request::try_from_http_request(req, path_args)?))
    }
}

/// `POST /login`: the login type, user (`identifier` or the legacy `user`)
/// and password are checked by the services, from the client's address
/// (for the failed-login limits).
#[allow(deprecated)] // `home_server`: still sent, older clients read it
pub async fn login(s: AppState, req: Ruma<LoginRequest>) -> Result<login::v3::Response, Error> {
    let b = req.body.0;
    let mut info: serde_json::Map<String, Value> = convert(&b.login_info)?;
    info.insert(
        "device_id".into(),
        serde_json::to_value(&b.device_id).map_err(Error::internal)?,
    );
    info.insert(
        "initial_device_display_name".into(),
        b.initial_device_display_name.into(),
    );
    let login: Login = convert(&info)?;
    let mut answer = s.login(login, req.caller.as_deref(), req.peer.map(|p| p.ip())).await?;
    let user_id: Option<OwnedUserId> = field(&mut answer, "user_id")?;
    let device_id: Option<OwnedDeviceId> = field(&mut answer, "device_id")?;
    let (Some(user_id), Some(device_id)) = (user_id, device_id) else {
        return Err(Error::internal("login without a user or device ID"));
    };
    let mut resp = login::v3::Response::new(user_id, field(&mut answer, "access_token")?, device_id);
    resp.home_server = field(&mut answer, "home_server")?;
    resp.well_known = field(&mut answer, "well_known")?;
    Ok(resp)
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

pub async fn change_password(
    s: AppState,
    req: Ruma<WithAuth<AccessToken, Uia<change_password::v3::Request>>>,
) -> Result<change_password::v3::Response, Error> {
    let Uia { request: b, auth } = req.body.request;
    s.change_password(&req.caller, &b.new_password, b.logout_devices, auth)
        .await?;
    Ok(change_password::v3::Response::new())
}

pub async fn deactivate(
    s: AppState,
    req: Ruma<WithAuth<AccessToken, Uia<deactivate::v3::Request>>>,
) -> Result<deactivate::v3::Response, Error> {
    let session = req.caller;
    s.password_uia(&session, req.body.request.auth).await?;
    s.deactivate_account(&session.user_id).await?;
    Ok(deactivate::v3::Response::new(
        ruma::api::client::account::ThirdPartyIdRemovalStatus::NoSupport,
    ))
}

pub async fn get_profile(s: AppState, req: Ruma<get_profile::v3::Request>) -> Result<get_profile::v3::Response, Error> {
    Ok(s.profile(req.body.user_id.as_str()).await?.into_iter().collect())
}

pub async fn get_profile_field(
    s: AppState,
    req: Ruma<get_profile_field::v3::Request>,
) -> Result<get_profile_field::v3::Response, Error> {
    let name = req.body.field.as_str();
    let mut answer = s.profile_field(req.body.user_id.as_str(), name).await?;
    let value = answer.get_mut(name).map(Value::take).unwrap_or_default();
    Ok(get_profile_field::v3::Response::new(
        ProfileFieldValue::new(name, value).map_err(Error::internal)?,
    ))
}

/// `PUT /profile/{user_id}/{field}`: ruma's endpoint, with the body read
/// by Weft, as ruma's request cannot express clearing a field (the field
/// `null` or left out).
pub struct SetProfileField {
    user_id: OwnedUserId,
    field: String,
    /// The field's new value; `None` clears it.
    value: Option<String>,
}

impl Metadata for SetProfileField {
    const METHOD: axum::http::Method = set_profile_field::v3::Request::METHOD;
    const RATE_LIMITED: bool = set_profile_field::v3::Request::RATE_LIMITED;
    type Authentication = <set_profile_field::v3::Request as Metadata>::Authentication;
    type PathBuilder = <set_profile_field::v3::Request as Metadata>::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = set_profile_field::v3::Request::PATH_BUILDER;
}

impl IncomingRequest for SetProfileField {
    type EndpointError = <set_profile_field::v3::Request as IncomingRequest>::EndpointError;
    type OutgoingResponse = set_profile_field::v3::Response;

    fn try_from_http_request<B: AsRef<[u8]>, S: AsRef<str>>(
        req: axum::http::Request<B>,
        path_args: &[S],
    ) -> Result<Self, FromHttpRequestError> {
        Self::check_request_method(req.method())?;
        let [user_id, field] = path_args else {
            return Err(serde_json::Error::io(std::io::Error::other("expected two path parameters")).into());
        };
        let user_id = OwnedUserId::try_from(user_id.as_ref())?;
        let field = field.as_ref().to_owned();
        let mut body: BTreeMap<String, Value> = serde_json::from_slice(req.body().as_ref())?;
        let value = match body.remove(&field) {
            Some(Value::String(v)) => Some(v),
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(
                    <serde_json::Error as serde::de::Error>::custom(format!("{field} must be a string")).into(),
                );
            }
        };
        Ok(Self { user_id, field, value })
    }
}

pub async fn put_profile_field(
    s: AppState,
    req: Ruma<SetProfileField>,
) -> Result<set_profile_field::v3::Response, Error> {
    let b = req.body;
    s.set_profile_field(&req.caller, b.user_id.as_str(), &b.field, b.value)
        .await?;
    Ok(set_profile_field::v3::Response::new())
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

pub async fn update_device(
    s: AppState,
    req: Ruma<update_device::v3::Request>,
) -> Result<update_device::v3::Response, Error> {
    let b = req.body;
    s.rename_device(&req.caller, b.device_id.as_str(), b.display_name.as_deref())
        .await?;
    Ok(update_device::v3::Response::new())
}

pub async fn delete_device(
    s: AppState,
    req: Ruma<Uia<delete_device::v3::Request>>,
) -> Result<delete_device::v3::Response, Error> {
    let Uia { request: b, auth } = req.body;
    s.delete_devices(&req.caller, &[b.device_id.to_string()], auth).await?;
    Ok(delete_device::v3::Response::new())
}

pub async fn delete_devices(
    s: AppState,
    req: Ruma<Uia<delete_devices::v3::Request>>,
) -> Result<delete_devices::v3::Response, Error> {
    let Uia { request: b, auth } = req.body;
    let devices: Vec<String> = b.devices.iter().map(ToString::to_string).collect();
    s.delete_devices(&req.caller, &devices, auth).await?;
    Ok(delete_devices::v3::Response::new())
}

/// `POST /user/{userId}/openid/request_token`: an OpenID token other
/// servers check through `/openid/userinfo`.
pub async fn openid_token(
    s: AppState,
    req: Ruma<ruma::api::client::account::request_openid_token::v3::Request>,
) -> Result<ruma::api::client::account::request_openid_token::v3::Response, Error> {
    let (token, secs) = s.request_openid_token(&req.caller, &req.body.user_id).await?;
    Ok(ruma::api::client::account::request_openid_token::v3::Response::new(
        token,
        ruma::authentication::TokenType::Bearer,
        s.server_name.clone(),
        std::time::Duration::from_secs(secs),
    ))
}
