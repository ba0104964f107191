//! Application services (docs/appservices.md): their registrations, the
//! rules for what they may do (their `as_token`, masquerading as users of
//! their namespace, exclusive namespaces), and the queries and pings sent
//! to them. Delivery of events to them is in [`crate::appservice_push`].
//!
//! Registrations are read once at start-up from the files listed in
//! `[appservice] registration_files` (Synapse's YAML format); a malformed
//! file, or two registrations sharing an `id`, `as_token` or `hs_token`,
//! stops the server with a message naming the file.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;
use ruma::{OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use weft_core::config::AppserviceConfig;
use weft_core::{Error, ErrorKind, Result};

use crate::{Services, Session};

/// A registration file as Synapse reads it. Keys Weft does not know are
/// ignored, as Synapse does. (ruma's `Registration` has no place for the
/// MSC flags below and cannot be extended.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub id: String,
    /// Where the service listens; `null` (or absent): it gets no traffic.
    #[serde(default)]
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    pub sender_localpart: String,
    #[serde(default)]
    pub namespaces: Namespaces,
    /// Whether the users it masquerades as are rate-limited (its own
    /// sender never is). Default: true.
    #[serde(default)]
    pub rate_limited: Option<bool>,
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    /// MSC2409: typing, receipts and presence are pushed too.
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// MSC2409's unstable name for `receive_ephemeral`.
    #[serde(default, rename = "de.sorunome.msc2409.push_ephemeral")]
    pub push_ephemeral: bool,
    /// MSC3202: device list changes (`changed` and `left`), one-time key
    /// counts and unused fallback key types come in transactions.
    #[serde(default, rename = "org.matrix.msc3202")]
    pub msc3202: bool,
    /// MSC4190: the service creates its users' devices with `PUT
    /// /devices/{id}` and deletes them without user-interactive auth; it
    /// cannot log its users in (`M_APPSERVICE_LOGIN_UNSUPPORTED`).
    #[serde(default, rename = "io.element.msc4190")]
    pub msc4190: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Namespaces {
    #[serde(default)]
    pub users: Vec<Namespace>,
    #[serde(default)]
    pub aliases: Vec<Namespace>,
    #[serde(default)]
    pub rooms: Vec<Namespace>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Namespace {
    #[serde(default)]
    pub exclusive: bool,
    pub regex: String,
}

/// A namespace's compiled regex. As Synapse, a value is in the namespace
/// when the regex matches at its start.
#[derive(Debug)]
struct Pattern {
    exclusive: bool,
    regex: Regex,
}

fn compile(list: &[Namespace], what: &str) -> std::result::Result<Vec<Pattern>, String> {
    list.iter()
        .map(|ns| {
            Regex::new(&format!("^(?:{})", ns.regex))
                .map(|regex| Pattern {
                    exclusive: ns.exclusive,
                    regex,
                })
                .map_err(|e| format!("namespaces.{what}: invalid regex {:?}: {e}", ns.regex))
        })
        .collect()
}

fn matches(list: &[Pattern], value: &str, exclusive_only: bool) -> bool {
    list.iter()
        .any(|p| (!exclusive_only || p.exclusive) && p.regex.is_match(value))
}

/// A registered application service.
#[derive(Debug)]
pub struct AppService {
    pub registration: Registration,
    /// The file it was read from.
    pub file: String,
    /// `@sender_localpart:server`.
    pub sender: OwnedUserId,
    users: Vec<Pattern>,
    aliases: Vec<Pattern>,
    rooms: Vec<Pattern>,
}

impl AppService {
    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// Whether it asked for ephemeral events (MSC2409).
    pub fn wants_ephemeral(&self) -> bool {
        self.registration.receive_ephemeral || self.registration.push_ephemeral
    }

    /// Whether `user_id` is its sender or in its users namespace.
    pub fn is_interested_in_user(&self, user_id: &str) -> bool {
        self.sender == user_id || matches(&self.users, user_id, false)
    }

    /// Whether `user_id` is in its users namespace exclusively.
    pub fn claims_user(&self, user_id: &str) -> bool {
        self.sender == user_id || matches(&self.users, user_id, true)
    }

    pub fn is_interested_in_alias(&self, alias: &str) -> bool {
        matches(&self.aliases, alias, false)
    }

    pub fn claims_alias(&self, alias: &str) -> bool {
        matches(&self.aliases, alias, true)
    }

    pub fn is_interested_in_room(&self, room_id: &str) -> bool {
        matches(&self.rooms, room_id, false)
    }

    /// Whether calls as `user_id` through this service are rate-limited:
    /// never for its sender, for the others unless `rate_limited: false`.
    pub fn rate_limits(&self, user_id: &str) -> bool {
        self.sender != user_id && self.registration.rate_limited != Some(false)
    }

    fn from_registration(
        registration: Registration,
        file: String,
        server_name: &ServerName,
    ) -> std::result::Result<Self, String> {
        let r = &registration;
        for (key, v) in [
            ("id", &r.id),
            ("as_token", &r.as_token),
            ("hs_token", &r.hs_token),
            ("sender_localpart", &r.sender_localpart),
        ] {
            if v.trim().is_empty() {
                return Err(format!("{key} must not be empty"));
            }
        }
        if let Some(url) = &r.url {
            let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            if !ok {
                return Err(format!("url {url:?} is not an http(s) URL"));
            }
        }
        let sender = UserId::parse(format!("@{}:{server_name}", r.sender_localpart)).map_err(|e| {
            format!(
                "sender_localpart {:?} is not a valid user ID localpart: {e}",
                r.sender_localpart
            )
        })?;
        let users = compile(&r.namespaces.users, "users")?;
        let aliases = compile(&r.namespaces.aliases, "aliases")?;
        let rooms = compile(&r.namespaces.rooms, "rooms")?;
        Ok(Self {
            registration,
            file,
            sender,
            users,
            aliases,
            rooms,
        })
    }
}

/// Every registered service, and the HTTP client that talks to them.
pub struct AppServices {
    list: Vec<Arc<AppService>>,
    pub(crate) http: reqwest::Client,
}

impl AppServices {
    /// Reads the registration files of `config` (relative paths in
    /// `data_dir`). Errors name the file and what is wrong with it.
    pub fn load(config: &AppserviceConfig, data_dir: Option<&Path>, server_name: &ServerName) -> Result<Self> {
        let mut list: Vec<Arc<AppService>> = Vec::new();
        for file in &config.registration_files {
            let path = match data_dir {
                Some(dir) if Path::new(file).is_relative() => dir.join(file),
                _ => Path::new(file).to_path_buf(),
            };
            let fail = |why: String| Error::internal(format!("appservice registration {}: {why}", path.display()));
            let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("cannot read it: {e}")))?;
            let registration: Registration =
                serde_saphyr::from_str(&text).map_err(|e| fail(format!("not a valid registration: {e}")))?;
            let service =
                AppService::from_registration(registration, path.display().to_string(), server_name).map_err(fail)?;
            for other in &list {
                let (a, b) = (&service.registration, &other.registration);
                let clash = if a.id == b.id {
                    Some("id")
                } else if a.as_token == b.as_token {
                    Some("as_token")
                } else if a.hs_token == b.hs_token {
                    Some("hs_token")
                } else {
                    None
                };
                if let Some(key) = clash {
                    return Err(fail(format!("its {key} is also the {key} of {}", other.file)));
                }
            }
            list.push(Arc::new(service));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.request_timeout_secs.max(1)))
            .build()
            .map_err(|e| Error::internal(format!("appservice HTTP client: {e}")))?;
        Ok(Self { list, http })
    }

    pub fn all(&self) -> &[Arc<AppService>] {
        &self.list
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<AppService>> {
        self.list.iter().find(|s| s.id() == id)
    }

    /// The service whose `as_token` this is. Every token is compared, in
    /// constant time, whatever matches.
    pub fn by_token(&self, token: &str) -> Option<Arc<AppService>> {
        let mut found = None;
        for s in &self.list {
            if bool::from(s.registration.as_token.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(s.clone());
            }
        }
        found
    }

    /// A service claiming `user_id` exclusively.
    pub fn claiming_user(&self, user_id: &str) -> Option<&Arc<AppService>> {
        self.list.iter().find(|s| s.claims_user(user_id))
    }

    /// A service claiming `alias` exclusively.
    pub fn claiming_alias(&self, alias: &str) -> Option<&Arc<AppService>> {
        self.list.iter().find(|s| s.claims_alias(alias))
    }
}

/// A service's registration and delivery state, as `weft appservice list`
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppserviceInfo {
    pub id: String,
    pub file: String,
    pub url: Option<String>,
    pub sender: String,
    pub users: Vec<String>,
    pub aliases: Vec<String>,
    pub rooms: Vec<String>,
    pub rate_limited: bool,
    pub ephemeral: bool,
    pub state: Option<weft_store::AppserviceState>,
}

impl Services {
    /// The session a request carrying a service's `as_token` acts as: its
    /// sender, or the user named by `?user_id=` (`masquerade`), who must be
    /// in its users namespace (`403 M_FORBIDDEN` otherwise) and registered.
    /// The sender exists implicitly: it is created when first used.
    ///
    /// With `device` (`?org.matrix.msc3202.device_id=`, MSC3202 device
    /// masquerading) the session is that device of the user, which must
    /// exist (`403 M_FORBIDDEN` otherwise).
    pub async fn appservice_session(
        &self,
        service: &AppService,
        masquerade: Option<&str>,
        device: Option<&str>,
    ) -> Result<Session> {
        let user_id = match masquerade {
            None => service.sender.clone(),
            Some(u) => UserId::parse(u).map_err(|_| Error::invalid_param("Invalid user_id"))?,
        };
        if user_id != service.sender {
            if user_id.server_name() != self.server_name || !service.is_interested_in_user(user_id.as_str()) {
                return Err(Error::forbidden(
                    "Application service cannot masquerade as this user (not in its namespace)",
                ));
            }
            match self.store.get_user(user_id.as_str()).await? {
                None => return Err(Error::forbidden("Application service has not registered this user")),
                Some(u) if u.deactivated => {
                    return Err(Error::new(ErrorKind::UserDeactivated, "This account is deactivated"));
                }
                Some(_) => {}
            }
        } else if self.store.get_user(user_id.as_str()).await?.is_none() {
            match self.accounts.create_user(user_id.localpart(), None, false).await {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::UserInUse => {}
                Err(e) => return Err(e),
            }
        }
        let device_id = match device {
            Some(d) => {
                let devices = self.store.list_devices(user_id.as_str()).await?;
                if !devices.iter().any(|x| x.device_id == d) {
                    return Err(Error::forbidden("The user has no such device"));
                }
                d.to_owned()
            }
            None => format!("appservice:{}", service.id()),
        };
        Ok(Session {
            device_id,
            user_id,
            appservice: Some(service.id().to_owned()),
        })
    }

    /// Resolves an access token (with the request's `?user_id=`, for an
    /// application service's token) to its session: a service's
    /// `as_token`, or a device's access token.
    pub async fn authenticate(
        &self,
        token: &str,
        masquerade: Option<&str>,
        device: Option<&str>,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Session> {
        if let Some(service) = self.appservices.by_token(token) {
            return self.appservice_session(&service, masquerade, device).await;
        }
        self.accounts.authenticate(token, ip).await
    }

    /// Whether `session` is an application service with MSC4190 (device
    /// management for its users) on.
    pub(crate) fn acts_with_msc4190(&self, session: &Session) -> bool {
        session
            .appservice
            .as_deref()
            .and_then(|id| self.appservices.by_id(id))
            .is_some_and(|s| s.registration.msc4190)
    }

    /// Whether a call by `session` is left out of the rate limits: one by
    /// an application service that is not rate-limited.
    pub fn exempt_from_rate_limits(&self, session: &Session) -> bool {
        session
            .appservice
            .as_deref()
            .and_then(|id| self.appservices.by_id(id))
            .is_some_and(|s| !s.rate_limits(session.user_id.as_str()))
    }

    /// `M_EXCLUSIVE` when `user_id` is claimed exclusively by an
    /// application service other than `by` (a person registering, or a
    /// service outside its namespace).
    pub fn check_user_not_exclusive(&self, user_id: &str, by: Option<&AppService>) -> Result<()> {
        match self.appservices.claiming_user(user_id) {
            Some(s) if by.is_none_or(|b| b.id() != s.id()) => Err(Error::new(
                ErrorKind::Exclusive,
                "This user ID is reserved by an application service",
            )),
            _ => Ok(()),
        }
    }

    /// `M_EXCLUSIVE` when `alias` is claimed exclusively by a service and
    /// `user_id` is neither its sender nor in its users namespace.
    pub fn check_alias_not_exclusive(&self, alias: &str, user_id: &str) -> Result<()> {
        match self.appservices.claiming_alias(alias) {
            Some(s) if !s.is_interested_in_user(user_id) => Err(Error::new(
                ErrorKind::Exclusive,
                "This room alias is reserved by an application service",
            )),
            _ => Ok(()),
        }
    }

    /// `GET /register/available`: `M_EXCLUSIVE` for a name an application
    /// service holds exclusively, else whether it is free.
    pub async fn username_available(&self, name: &str) -> Result<bool> {
        if let Ok(user_id) = self.accounts.user_id_for(name) {
            self.check_user_not_exclusive(user_id.as_str(), None)?;
        }
        self.accounts.is_available(name).await
    }

    /// `POST /register` with `type: m.login.application_service`: the
    /// service registers a user of its users namespace (`M_EXCLUSIVE`
    /// outside it); no password. Answers as `/register` does.
    pub async fn register_appservice_user(
        &self,
        service: &AppService,
        username: Option<&str>,
        device_id: Option<&str>,
        display_name: Option<&str>,
        inhibit_login: bool,
    ) -> Result<Value> {
        if service.registration.msc4190 && !inhibit_login {
            return Err(Error::new(
                ErrorKind::AppserviceLoginUnsupported,
                "This application service manages its users' devices (MSC4190): set inhibit_login",
            ));
        }
        let name = username.ok_or_else(|| Error::missing_param("username is required"))?;
        let name = name
            .strip_prefix('@')
            .map_or(name, |n| n.split(':').next().unwrap_or(n));
        let user_id = self.accounts.user_id_for(name)?;
        if !service.is_interested_in_user(user_id.as_str()) {
            return Err(Error::new(
                ErrorKind::Exclusive,
                "This user ID is not in the application service's namespace",
            ));
        }
        self.check_user_not_exclusive(user_id.as_str(), Some(service))?;
        if !self.accounts.is_available(name).await? {
            return Err(Error::new(ErrorKind::UserInUse, "User ID already taken"));
        }
        let user_id = self.accounts.create_user(name, None, false).await?;
        if inhibit_login {
            return Ok(json!({ "user_id": user_id }));
        }
        let login = self.accounts.new_device(&user_id, device_id, display_name).await?;
        Ok(json!({
            "user_id": login.user_id,
            "device_id": login.device_id,
            "access_token": login.access_token,
            "home_server": self.server_name,
        }))
    }

    /// `POST /login` with `type: m.login.application_service`: a device of
    /// a user in the service's namespace.
    /// A service with MSC4190 on creates its users' devices with `PUT
    /// /devices/{id}` instead: `400 M_APPSERVICE_LOGIN_UNSUPPORTED`.
    pub async fn login_appservice_user(&self, service: &AppService, user: &str) -> Result<OwnedUserId> {
        if service.registration.msc4190 {
            return Err(Error::new(
                ErrorKind::AppserviceLoginUnsupported,
                "This application service manages its users' devices (MSC4190): it cannot log them in",
            ));
        }
        let user_id = if user.starts_with('@') {
            UserId::parse(user).map_err(|_| Error::invalid_param("Invalid user ID"))?
        } else {
            self.accounts.user_id_for(user)?
        };
        if user_id.server_name() != self.server_name || !service.is_interested_in_user(user_id.as_str()) {
            return Err(Error::forbidden(
                "This user is not in the application service's namespace",
            ));
        }
        match self.store.get_user(user_id.as_str()).await? {
            Some(u) if !u.deactivated => {}
            Some(_) => return Err(Error::new(ErrorKind::UserDeactivated, "This account is deactivated")),
            None => return Err(Error::forbidden("No such user")),
        }
        Ok(user_id)
    }

    /// `POST /appservice/{id}/ping` by the service itself: pings its
    /// `/_matrix/app/v1/ping`; answers how long that took.
    pub async fn ping_appservice(
        &self,
        caller: &AppService,
        id: &str,
        transaction_id: Option<&str>,
    ) -> Result<Duration> {
        if caller.id() != id {
            return Err(Error::forbidden("This is another application service's ID"));
        }
        let Some(url) = &caller.registration.url else {
            return Err(Error::new(
                ErrorKind::Ping {
                    errcode: "M_URL_NOT_SET",
                    status: None,
                    body: None,
                },
                "The application service has no URL",
            ));
        };
        let mut body = json!({});
        if let Some(t) = transaction_id {
            body["transaction_id"] = json!(t);
        }
        let started = Instant::now();
        let sent = self
            .appservices
            .http
            .post(format!("{}/_matrix/app/v1/ping", url.trim_end_matches('/')))
            .bearer_auth(&caller.registration.hs_token)
            .json(&body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(Error::new(
                    ErrorKind::Ping {
                        errcode: "M_CONNECTION_TIMEOUT",
                        status: None,
                        body: None,
                    },
                    "The application service did not answer in time",
                ));
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Ping {
                        errcode: "M_CONNECTION_FAILED",
                        status: None,
                        body: None,
                    },
                    format!("Cannot reach the application service: {e}"),
                ));
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Ping {
                    errcode: "M_BAD_STATUS",
                    status: Some(status.as_u16()),
                    body: Some(text),
                },
                format!("The application service answered {status}"),
            ));
        }
        Ok(started.elapsed())
    }

    /// A local alias from the database or, when it has none, from the
    /// application services interested in it (`GET
    /// /_matrix/app/v1/rooms/{alias}`): one that answers 200 has created
    /// it meanwhile, and it is read again.
    pub async fn local_alias(&self, alias: &str) -> Result<Option<weft_store::AliasRecord>> {
        if let Some(found) = self.store.resolve_alias(alias).await? {
            return Ok(Some(found));
        }
        for service in self.appservices.all() {
            if !service.is_interested_in_alias(alias) {
                continue;
            }
            if self.query_appservice(service, "rooms", alias).await {
                return self.store.resolve_alias(alias).await;
            }
        }
        Ok(None)
    }

    /// Whether a user of an application service's namespace exists now:
    /// one that does not is asked of the service (`GET
    /// /_matrix/app/v1/users/{userId}`), which may create it.
    pub async fn user_exists_or_queried(&self, user_id: &str) -> Result<bool> {
        if self.store.get_user(user_id).await?.is_some() {
            return Ok(true);
        }
        for service in self.appservices.all() {
            if service.is_interested_in_user(user_id) && self.query_appservice(service, "users", user_id).await {
                return Ok(self.store.get_user(user_id).await?.is_some());
            }
        }
        Ok(false)
    }

    /// Asks a service about an alias (`rooms`) or user (`users`): whether
    /// it answered 2xx. A service that is down answers no.
    async fn query_appservice(&self, service: &AppService, kind: &str, id: &str) -> bool {
        let Some(url) = &service.registration.url else {
            return false;
        };
        let Ok(mut target) = reqwest::Url::parse(&format!("{}/_matrix/app/v1/{kind}/", url.trim_end_matches('/')))
        else {
            return false;
        };
        if let Ok(mut segments) = target.path_segments_mut() {
            segments.pop_if_empty().push(id);
        }
        match self
            .appservices
            .http
            .get(target)
            .bearer_auth(&service.registration.hs_token)
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(e) => {
                tracing::info!("appservice {}: query for {id} failed: {e}", service.id());
                false
            }
        }
    }

    /// `GET {url}/_matrix/app/v1/thirdparty/{kind}[/{protocol}]?query`
    /// of each of `services`: the JSON answers of those that answered 2xx
    /// (one that is down or answers nonsense is left out).
    async fn thirdparty_ask(
        &self,
        services: Vec<&Arc<AppService>>,
        kind: &str,
        protocol: Option<&str>,
        query: &[(String, String)],
    ) -> Vec<Value> {
        let mut out = Vec::new();
        for service in services {
            let Some(url) = &service.registration.url else {
                continue;
            };
            let Ok(mut target) = reqwest::Url::parse(&format!(
                "{}/_matrix/app/v1/thirdparty/{kind}",
                url.trim_end_matches('/')
            )) else {
                continue;
            };
            if let Some(p) = protocol
                && let Ok(mut segments) = target.path_segments_mut()
            {
                segments.push(p);
            }
            let answer = self
                .appservices
                .http
                .get(target)
                .query(query)
                .bearer_auth(&service.registration.hs_token)
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                    Ok(v) => out.push(v),
                    Err(e) => tracing::info!("appservice {}: thirdparty {kind}: {e}", service.id()),
                },
                Ok(r) => tracing::info!("appservice {}: thirdparty {kind}: {}", service.id(), r.status()),
                Err(e) => tracing::info!("appservice {}: thirdparty {kind}: {e}", service.id()),
            }
        }
        out
    }

    fn services_with_protocol(&self, protocol: &str) -> Vec<&Arc<AppService>> {
        self.appservices
            .all()
            .iter()
            .filter(|s| {
                s.registration
                    .protocols
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|x| x == protocol))
            })
            .collect()
    }

    /// `GET /thirdparty/protocol/{protocol}`: the protocol as the services
    /// offering it describe it, their `instances` put together
    /// (`404 M_NOT_FOUND` when none does or answers).
    pub async fn thirdparty_protocol(&self, protocol: &str) -> Result<Value> {
        let answers = self
            .thirdparty_ask(self.services_with_protocol(protocol), "protocol", Some(protocol), &[])
            .await;
        let mut merged: Option<Value> = None;
        for a in answers {
            match &mut merged {
                None => merged = Some(a),
                Some(m) => {
                    let more = a["instances"].as_array().cloned().unwrap_or_default();
                    if let Some(list) = m["instances"].as_array_mut() {
                        list.extend(more);
                    }
                }
            }
        }
        merged.ok_or_else(|| Error::not_found(format!("No application service offers protocol {protocol}")))
    }

    /// `GET /thirdparty/protocols`: every protocol a registered service
    /// offers and answers for.
    pub async fn thirdparty_protocols(&self) -> Result<std::collections::BTreeMap<String, Value>> {
        let mut names: Vec<&str> = self
            .appservices
            .all()
            .iter()
            .flat_map(|s| s.registration.protocols.iter().flatten().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut out = std::collections::BTreeMap::new();
        for name in names {
            if let Ok(p) = self.thirdparty_protocol(name).await {
                out.insert(name.to_owned(), p);
            }
        }
        Ok(out)
    }

    /// `GET /thirdparty/location/{protocol}` and `/thirdparty/user/{protocol}`
    /// (`kind` `location` or `user`): what the services offering the
    /// protocol answer for the fields, put together.
    pub async fn thirdparty_lookup(
        &self,
        kind: &str,
        protocol: &str,
        fields: &[(String, String)],
    ) -> Result<Vec<Value>> {
        let answers = self
            .thirdparty_ask(self.services_with_protocol(protocol), kind, Some(protocol), fields)
            .await;
        Ok(answers
            .into_iter()
            .flat_map(|a| a.as_array().cloned().unwrap_or_default())
            .collect())
    }

    /// `GET /thirdparty/location?alias=` and `/thirdparty/user?userid=`:
    /// asked of the services interested in the alias or user.
    pub async fn thirdparty_reverse(&self, kind: &str, id: &str) -> Result<Vec<Value>> {
        let (services, key): (Vec<&Arc<AppService>>, &str) = if kind == "location" {
            (
                self.appservices
                    .all()
                    .iter()
                    .filter(|s| s.is_interested_in_alias(id))
                    .collect(),
                "alias",
            )
        } else {
            (
                self.appservices
                    .all()
                    .iter()
                    .filter(|s| s.is_interested_in_user(id))
                    .collect(),
                "userid",
            )
        };
        let answers = self
            .thirdparty_ask(services, kind, None, &[(key.to_owned(), id.to_owned())])
            .await;
        Ok(answers
            .into_iter()
            .flat_map(|a| a.as_array().cloned().unwrap_or_default())
            .collect())
    }

    /// Every registered service with its delivery state (`weft appservice
    /// list`).
    pub async fn appservice_list(&self) -> Result<Vec<AppserviceInfo>> {
        let states = self.store.appservice_states().await?;
        Ok(self
            .appservices
            .all()
            .iter()
            .map(|s| {
                let r = &s.registration;
                let regexes = |l: &[Namespace]| {
                    l.iter()
                        .map(|n| format!("{}{}", n.regex, if n.exclusive { " (exclusive)" } else { "" }))
                        .collect()
                };
                AppserviceInfo {
                    id: r.id.clone(),
                    file: s.file.clone(),
                    url: r.url.clone(),
                    sender: s.sender.to_string(),
                    users: regexes(&r.namespaces.users),
                    aliases: regexes(&r.namespaces.aliases),
                    rooms: regexes(&r.namespaces.rooms),
                    rate_limited: r.rate_limited != Some(false),
                    ephemeral: s.wants_ephemeral(),
                    state: states.iter().find(|st| st.id == r.id).cloned(),
                }
            })
            .collect())
    }
}
