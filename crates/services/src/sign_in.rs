//! Registration and login, and user-interactive auth (UIA) for what needs
//! the password again (password change, deactivation, replacing
//! cross-signing keys). Every door and the admin CLI go through here, so
//! the rules (registration mode and tokens, username rules, the
//! failed-login limit) are the same everywhere.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::config::RegistrationMode;
use weft_core::{Error, ErrorKind, Result};

use crate::{Services, Session};

/// The `auth` object of a user-interactive request.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(default)]
pub struct AuthData {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub session: Option<String>,
    pub token: Option<String>,
    pub password: Option<String>,
    pub identifier: Option<Identifier>,
    pub user: Option<String>,
}

/// Who a login or password stage names (`m.id.user`).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(default)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub user: Option<String>,
}

/// The `/register` body.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct Registration {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub auth: Option<AuthData>,
}

/// The `/login` body.
#[derive(Debug, Deserialize)]
pub struct Login {
    #[serde(rename = "type")]
    pub kind: String,
    pub identifier: Option<Identifier>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
}

/// The user a login names: `identifier` (`m.id.user`) or the legacy `user`.
fn user_of(identifier: &Option<Identifier>, user: &Option<String>) -> Result<String> {
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

impl Services {
    /// `POST /register`: the next UIA stage (as the 401 error), or the new
    /// account (and its first device unless `inhibit_login`).
    pub async fn register(&self, guest: bool, req: Registration) -> Result<Value> {
        if guest {
            return Err(Error::forbidden("Guest access is not allowed"));
        }
        let stage = match self.accounts.registration_mode() {
            RegistrationMode::Disabled => return Err(Error::forbidden("Registration is disabled")),
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
            None => crate::accounts::random_string(12).to_lowercase(),
        };
        if !self.accounts.is_available(&name).await? {
            return Err(Error::new(ErrorKind::UserInUse, "User ID already taken"));
        }
        // A name an application service reserved is its alone.
        self.check_user_not_exclusive(self.accounts.user_id_for(&name)?.as_str(), None)?;
        let Some(password) = req.password.clone() else {
            return Err(Error::missing_param("password is required"));
        };
        let auth = req.auth.unwrap_or_default();
        if let Some(id) = &auth.session
            && !self.accounts.uia_known(id).await?
        {
            return Err(Error::new(ErrorKind::Unknown, "Unknown user-interactive auth session").with_status(400));
        }
        let session = match auth.session.clone() {
            Some(s) => s,
            None => self.accounts.new_uia_session().await?,
        };
        let done = match auth.kind.as_deref() {
            Some("m.login.dummy") if stage == "m.login.dummy" => true,
            Some("m.login.registration_token") if stage == "m.login.registration_token" => {
                let ok = auth
                    .token
                    .as_deref()
                    .is_some_and(|t| self.accounts.registration_token_valid(t));
                if !ok {
                    let mut body = self.accounts.uia_body(&session, &[&[stage]], &[]);
                    body["errcode"] = "M_FORBIDDEN".into();
                    body["error"] = "Invalid registration token".into();
                    return Err(Error::new(ErrorKind::Uia(body), "Invalid registration token"));
                }
                true
            }
            _ => false,
        };
        if !done {
            let body = self.accounts.uia_body(&session, &[&[stage]], &[]);
            return Err(Error::new(ErrorKind::Uia(body), "Authentication required"));
        }
        self.accounts.uia_finish(&session).await?;
        let user_id = self.accounts.create_user(&name, Some(&password), false).await?;
        if req.inhibit_login {
            return Ok(json!({ "user_id": user_id }));
        }
        self.sign_in(
            &user_id,
            req.device_id.as_deref(),
            req.initial_device_display_name.as_deref(),
        )
        .await
    }

    /// A new (or named) device of the user and the answer that hands the
    /// client its access token.
    async fn sign_in(
        &self,
        user_id: &ruma::UserId,
        device_id: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<Value> {
        let login = self.accounts.new_device(user_id, device_id, display_name).await?;
        Ok(json!({
            "user_id": login.user_id,
            "device_id": login.device_id,
            "access_token": login.access_token,
            "home_server": self.server_name,
        }))
    }

    /// `POST /login` with `m.login.password`, from the client at `ip` (for
    /// the failed-login limit): a new device and its access token.
    ///
    /// With `m.login.application_service`, the request must carry a
    /// service's `as_token` (`appservice`), and the user must be in its
    /// namespace.
    pub async fn login(
        &self,
        req: Login,
        appservice: Option<&crate::appservice::AppService>,
        ip: Option<IpAddr>,
    ) -> Result<Value> {
        let user_id = match req.kind.as_str() {
            "m.login.password" => {
                let user = user_of(&req.identifier, &req.user)?;
                let password = req.password.ok_or_else(|| Error::bad_json("password is required"))?;
                self.accounts
                    .check_password(&user.to_lowercase(), &password, ip)
                    .await?
            }
            "m.login.application_service" => {
                let Some(service) = appservice else {
                    return Err(Error::new(
                        ErrorKind::MissingToken,
                        "m.login.application_service needs the application service's token",
                    ));
                };
                let user = user_of(&req.identifier, &req.user)?;
                self.login_appservice_user(service, &user.to_lowercase()).await?
            }
            _ => return Err(Error::new(ErrorKind::Unknown, "Unsupported login type").with_status(400)),
        };
        let mut answer = self
            .sign_in(
                &user_id,
                req.device_id.as_deref(),
                req.initial_device_display_name.as_deref(),
            )
            .await?;
        answer["well_known"] = json!({ "m.homeserver": { "base_url": self.config.base_url() } });
        Ok(answer)
    }

    /// Checks `m.login.password` user-interactive auth for the session's
    /// user, or returns the 401 that asks for it.
    pub async fn password_uia(&self, session: &Session, auth: Option<AuthData>) -> Result<()> {
        let auth = auth.unwrap_or_default();
        let uia_session = match auth.session.clone() {
            Some(s) => s,
            None => self.accounts.new_uia_session().await?,
        };
        let ask = |errcode: Option<&str>| {
            let mut body = self.accounts.uia_body(&uia_session, &[&["m.login.password"]], &[]);
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
        // known here).
        match self.accounts.check_password(&user, &password, None).await {
            Ok(uid) if uid == session.user_id => {
                self.accounts.uia_finish(&uia_session).await?;
                Ok(())
            }
            Err(e) if matches!(e.kind, ErrorKind::LimitExceeded { .. }) => Err(e),
            _ => Err(ask(Some("M_FORBIDDEN"))),
        }
    }

    /// `POST /account/password`: after password UIA, sets the new
    /// password and (unless told not to) logs out every other device,
    /// ending their open connections.
    pub async fn change_password(
        &self,
        session: &Session,
        new_password: &str,
        logout_devices: bool,
        auth: Option<AuthData>,
    ) -> Result<()> {
        self.password_uia(session, auth).await?;
        self.accounts.set_password(&session.user_id, new_password).await?;
        if logout_devices {
            self.accounts
                .logout_all_except(&session.user_id, Some(&session.device_id))
                .await?;
        }
        Ok(())
    }
}
