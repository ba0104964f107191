//! Declaring an endpoint, and the one extractor every endpoint is reached
//! through.
//!
//! An endpoint is declared by one line in `typed_routes` (crate root):
//! `routes.add::<R>(RateClass::…, handler)`. Its method, its paths under
//! every version prefix and who may call it come from the request type's
//! ruma [`Metadata`]; the rate-limit class is the line's own. Paths the
//! metadata lacks (the empty-state-key forms of the state endpoints) are
//! named on the line: `routes.add_at(&[path, …], …)`. Endpoints ruma has
//! no request type for get one of ours (module `own`), declared the same
//! way. The handler
//! gets a [`Ruma<R>`] (the typed request and the caller) and returns the
//! typed response or an [`Error`].

use std::collections::BTreeSet;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use bytes::BytesMut;
use ruma::OwnedServerName;
use ruma::api::auth_scheme::{
    AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional, AuthScheme, NoAccessToken,
    NoAuthentication,
};
use ruma::api::error::{DeserializationError, FromHttpRequestError};
use ruma::api::federation::authentication::ServerSignatures;
use ruma::api::path_builder::PathBuilder;
use ruma::api::{IncomingRequest, Metadata, OutgoingResponse};
use weft_core::{Error, ErrorKind};
use weft_services::Session;
use weft_services::appservice::AppService;

use crate::AppState;
use crate::extract::{ApiError, TokenChecked, access_token, percent_decode, read_limited};

/// The prefixes every Client-Server endpoint is served under: the current
/// one, the pre-1.1 one, and the original `api/v1` of the talk's CoAP form.
pub const CLIENT_PREFIXES: [&str; 3] = ["/_matrix/client/v3", "/_matrix/client/r0", "/_matrix/client/api/v1"];

/// A session a door authenticated itself (a CoAP device on a DTLS session
/// with its pre-shared key), handed to the layer as a request extension.
/// Only in-process callers can set extensions, so no client can forge it.
#[derive(Clone)]
pub struct Authenticated(pub Session);

/// How an endpoint's calls are rate-limited (docs/client-server-api.md,
/// "Rate limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateClass {
    /// Each call takes one token from the caller's bucket: the user's once
    /// authenticated, the client IP's before (taken by the IP layer).
    Caller,
    /// Signing in (`/login`, `/register` and its checks): as [`Caller`],
    /// and each call also takes one token from the client address's
    /// sign-in bucket (`[rate_limit]` login_per_second/login_burst), with
    /// or without a session. Failed password checks are limited further,
    /// per address and per account, by the services.
    ///
    /// [`Caller`]: RateClass::Caller
    Login,
}

/// What the server needs of a caller, for each of ruma's authentication
/// schemes: the session for endpoints that need an access token, maybe one
/// where it is optional, nothing where there is none.
pub trait CallerAuth: AuthScheme {
    type Caller: Send + Sync + 'static;

    /// Whether the caller is known only with the body: an `X-Matrix`
    /// signature covers it. Then [`CallerAuth::signed_caller`] decides
    /// once the body is read, and [`CallerAuth::caller`] is not called;
    /// otherwise the caller is checked on the head, before the body.
    const SIGNS_BODY: bool = false;

    fn caller(parts: &Parts, s: &AppState) -> impl Future<Output = Result<Self::Caller, Error>> + Send;

    /// The caller of a request whose signature covers its body
    /// ([`CallerAuth::SIGNS_BODY`]).
    fn signed_caller(
        parts: &Parts,
        body: &[u8],
        s: &AppState,
    ) -> impl Future<Output = Result<Self::Caller, Error>> + Send {
        let _ = (parts, body, s);
        async { Err(Error::internal("this endpoint's callers sign no body")) }
    }

    /// The user to charge a call to, if authenticated.
    fn user(caller: &Self::Caller) -> Option<&Session>;
}

/// The session of a request: one a door authenticated itself, or the one
/// its access token (header or query) names. Records the device as seen
/// (time and client address) either way.
pub(crate) async fn session_of(parts: &Parts, s: &AppState) -> Result<Option<Session>, Error> {
    let ip = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let session = if let Some(Authenticated(session)) = parts.extensions.get::<Authenticated>() {
        session.clone()
    } else if let Some(TokenChecked(checked)) = parts.extensions.get::<TokenChecked>() {
        // Resolved (once) by the rate-limit layer.
        checked.clone()?
    } else {
        match access_token(parts) {
            Some(token) => {
                s.authenticate(
                    &token,
                    query_param(&parts.uri, "user_id").as_deref(),
                    query_param(&parts.uri, MASQUERADE_DEVICE).as_deref(),
                    ip,
                )
                .await?
            }
            None => return Ok(None),
        }
    };
    // An application service acting has no device to mark.
    if session.appservice.is_none() {
        s.accounts.touch_device(&session, ip).await;
    }
    Ok(Some(session))
}

impl CallerAuth for AccessToken {
    type Caller = Session;

    async fn caller(parts: &Parts, s: &AppState) -> Result<Session, Error> {
        session_of(parts, s)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))
    }

    fn user(caller: &Session) -> Option<&Session> {
        Some(caller)
    }
}

impl CallerAuth for AccessTokenOptional {
    type Caller = Option<Session>;

    async fn caller(parts: &Parts, s: &AppState) -> Result<Option<Session>, Error> {
        session_of(parts, s).await
    }

    fn user(caller: &Option<Session>) -> Option<&Session> {
        caller.as_ref()
    }
}

/// Endpoints anyone may call; a token sent along is ignored.
macro_rules! no_caller {
    ($($scheme:ty),*) => {$(
        impl CallerAuth for $scheme {
            type Caller = ();

            async fn caller(_: &Parts, _: &AppState) -> Result<(), Error> {
                Ok(())
            }

            fn user(_: &()) -> Option<&Session> {
                None
            }
        }
    )*};
}
no_caller!(NoAuthentication, NoAccessToken);

/// Endpoints an application service may call with its `as_token`
/// (`/register`, `/login`): the service, if the request carries the token
/// of one; any other token is not looked at.
impl CallerAuth for AppserviceTokenOptional {
    type Caller = Option<Arc<AppService>>;

    async fn caller(parts: &Parts, s: &AppState) -> Result<Self::Caller, Error> {
        Ok(access_token(parts).and_then(|t| s.appservices.by_token(&t)))
    }

    fn user(_: &Self::Caller) -> Option<&Session> {
        None
    }
}

/// Endpoints only an application service calls (`/appservice/{id}/ping`).
impl CallerAuth for AppserviceToken {
    type Caller = Arc<AppService>;

    async fn caller(parts: &Parts, s: &AppState) -> Result<Self::Caller, Error> {
        let token = access_token(parts).ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))?;
        s.appservices.by_token(&token).ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownToken { soft_logout: false },
                "Unknown application service token",
            )
        })
    }

    fn user(_: &Self::Caller) -> Option<&Session> {
        None
    }
}

/// The query parameter naming the device an application service acts as
/// (MSC3202 device masquerading).
pub const MASQUERADE_DEVICE: &str = "org.matrix.msc3202.device_id";

/// The value of query parameter `key` (percent-decoded), if present.
pub fn query_param(uri: &axum::http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// The server that sent a federation request, as its verified `X-Matrix`
/// signature proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(pub OwnedServerName);

/// Federation endpoints: the origin server, verified by the services
/// against the `X-Matrix` header, the method, the URI and the body
/// (`401 M_UNAUTHORIZED` otherwise), and charged to its rate-limit bucket.
impl CallerAuth for ServerSignatures {
    type Caller = Origin;
    const SIGNS_BODY: bool = true;

    async fn caller(_: &Parts, _: &AppState) -> Result<Origin, Error> {
        Err(Error::internal("a signed request's caller needs its body"))
    }

    async fn signed_caller(parts: &Parts, body: &[u8], s: &AppState) -> Result<Origin, Error> {
        let mut request = axum::http::Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.headers_mut() = parts.headers.clone();
        s.federation_origin(&request).await.map(Origin)
    }

    fn user(_: &Origin) -> Option<&Session> {
        None
    }
}

/// Ruma's request `R` declared with another authentication scheme `A`:
/// an endpoint ruma lets be called without an access token only for forms
/// Weft does not offer (password change by e-mail token) needs one here,
/// so the 401 comes before the body is read, as everywhere else; one that
/// takes an optional token (`/versions`) takes none, so a stale token
/// does not make it fail.
pub struct WithAuth<A, R> {
    pub request: R,
    scheme: PhantomData<fn() -> A>,
}

impl<A: AuthScheme, R: Metadata> Metadata for WithAuth<A, R> {
    const METHOD: axum::http::Method = R::METHOD;
    const RATE_LIMITED: bool = R::RATE_LIMITED;
    type Authentication = A;
    type PathBuilder = R::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = R::PATH_BUILDER;
}

impl<A: AuthScheme, R: IncomingRequest> IncomingRequest for WithAuth<A, R> {
    type EndpointError = R::EndpointError;
    type OutgoingResponse = R::OutgoingResponse;

    fn try_from_http_request<B: AsRef<[u8]>, S: AsRef<str>>(
        req: axum::http::Request<B>,
        path_args: &[S],
    ) -> Result<Self, FromHttpRequestError> {
        Ok(Self {
            request: R::try_from_http_request(req, path_args)?,
            scheme: PhantomData,
        })
    }
}

/// A typed request and who sent it: the one extractor of the layer.
pub struct Ruma<R: Metadata>
where
    R::Authentication: CallerAuth,
{
    pub body: R,
    pub caller: <R::Authentication as CallerAuth>::Caller,
    /// The client's address, when the door knows it.
    pub peer: Option<SocketAddr>,
}

impl<R> FromRequest<AppState> for Ruma<R>
where
    R: IncomingRequest + Send + 'static,
    R::Authentication: CallerAuth,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &AppState) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let head = Head::<R>::read(parts, s).await?;
        let bytes = read_limited(Body::new(body), s.config.limits.max_body_bytes).await?;
        Ok(head.with_body(bytes, s).await?)
    }
}

/// A request's head, its caller checked (so a 401 comes before the body
/// is read), waiting for its body.
pub(crate) struct Head<R: Metadata>
where
    R::Authentication: CallerAuth,
{
    parts: Parts,
    args: Vec<String>,
    /// `None` until the body is read, for a caller who signs it.
    caller: Option<<R::Authentication as CallerAuth>::Caller>,
    peer: Option<SocketAddr>,
}

impl<R> Head<R>
where
    R: IncomingRequest,
    R::Authentication: CallerAuth,
{
    pub(crate) async fn read(mut parts: Parts, s: &AppState) -> Result<Self, Error> {
        let caller = if <R::Authentication as CallerAuth>::SIGNS_BODY {
            None
        } else {
            Some(<R::Authentication as CallerAuth>::caller(&parts, s).await?)
        };
        let args: Vec<String> = RawPathParams::from_request_parts(&mut parts, s)
            .await
            .map_err(|e| Error::invalid_param(format!("Invalid path: {e}")))?
            .iter()
            .map(|(_, v)| v.to_owned())
            .collect();
        // No stored text holds a NUL (crates/services/src/text.rs): a path
        // naming one names nothing, and is refused alike on every backend
        // (SQLite would look it up and find nothing, PostgreSQL refuse it).
        for arg in &args {
            weft_services::text::check_text("A path parameter", arg)?;
        }
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        Ok(Self {
            parts,
            args,
            caller,
            peer,
        })
    }

    /// The typed request, read from the head and `body` (whose signature
    /// is checked first, for a caller who signs it).
    pub(crate) async fn with_body(self, body: bytes::Bytes, s: &AppState) -> Result<Ruma<R>, Error> {
        let caller = match self.caller {
            Some(caller) => caller,
            None => <R::Authentication as CallerAuth>::signed_caller(&self.parts, &body, s).await?,
        };
        let body = R::try_from_http_request(axum::http::Request::from_parts(self.parts, body), &self.args)
            .map_err(request_error)?;
        Ok(Ruma {
            body,
            caller,
            peer: self.peer,
        })
    }
}

/// The Matrix error for a request ruma could not read.
fn request_error(e: FromHttpRequestError) -> Error {
    match e {
        FromHttpRequestError::MethodMismatch { .. } => Error::new(
            ErrorKind::Unrecognized {
                method_not_allowed: true,
            },
            "Method not allowed on this endpoint",
        ),
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) if e.is_syntax() || e.is_eof() => {
            Error::new(ErrorKind::NotJson, format!("Body is not valid JSON: {e}"))
        }
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) => {
            Error::bad_json(format!("Invalid request body: {e}"))
        }
        FromHttpRequestError::Deserialization(e) if e.to_string().starts_with("missing field") => {
            Error::missing_param(format!("Invalid request: {e}"))
        }
        FromHttpRequestError::Deserialization(e) => Error::invalid_param(format!("Invalid request: {e}")),
        e => Error::bad_json(format!("Invalid request: {e}")),
    }
}

/// What an endpoint answers with: ruma's typed response, or one of ours
/// ([`Full`]) where ruma's leaves out what clients need.
pub trait ApiResponse: Send + 'static {
    fn into_http(self) -> Response;
}

impl<T: OutgoingResponse + Send + 'static> ApiResponse for T {
    fn into_http(self) -> Response {
        match self.try_into_http_response::<BytesMut>() {
            Ok(resp) => resp.map(|b| Body::from(b.freeze())).into_response(),
            Err(e) => ApiError(Error::internal(format!("could not encode a response: {e}"))).into_response(),
        }
    }
}

/// A typed response body serialized as it is, empty fields included: ruma
/// leaves empty maps out of some responses (`failures` of `/keys/query`
/// and `/keys/claim`) that clients such as matrix-nio require.
pub struct Full<T>(pub T);

impl<T: serde::Serialize + Send + 'static> ApiResponse for Full<T> {
    fn into_http(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// A typed response on its way out.
pub struct RumaResponse<T>(pub T);

impl<T: ApiResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        self.0.into_http()
    }
}

/// The paths an endpoint is served at: each Client-Server path (ruma's
/// `v3`, `r0` or `v1` one) under every prefix of [`CLIENT_PREFIXES`], a
/// `v1` one at `v1` too; other paths as ruma names them. (Endpoints the
/// spec added under `v1`, such as the registration-token check, were
/// served under the other prefixes before and stay there.)
pub(crate) fn paths_of<R: Metadata>() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for path in R::PATH_BUILDER.all_paths() {
        let rest = ["/_matrix/client/v3", "/_matrix/client/r0", "/_matrix/client/v1"]
            .iter()
            .find_map(|p| path.strip_prefix(p).filter(|r| r.starts_with('/')));
        if let Some(rest) = rest {
            out.extend(CLIENT_PREFIXES.iter().map(|p| format!("{p}{rest}")));
        }
        if rest.is_none() || path.starts_with("/_matrix/client/v1/") {
            out.insert(path.to_owned());
        }
    }
    out
}

/// The router being declared, endpoint by endpoint.
pub struct Routes {
    pub(crate) router: Router<AppState>,
}

impl Routes {
    pub fn new(router: Router<AppState>) -> Self {
        Self { router }
    }

    /// Declares one endpoint: `R` says its method, paths and caller;
    /// `class` how it is rate-limited; `handler` what it does.
    pub fn add<R, T, F, Fut>(self, class: RateClass, handler: F) -> Self
    where
        R: IncomingRequest + Send + 'static,
        R::Authentication: CallerAuth,
        T: ApiResponse,
        F: Fn(AppState, Ruma<R>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        self.add_at(&[], class, handler)
    }

    /// Declares one endpoint as [`Routes::add`] does, served also at
    /// `variants`: paths ruma's metadata lacks, written below the version
    /// prefix (`/rooms/{room_id}/state/{event_type}`) and served under
    /// every prefix of [`CLIENT_PREFIXES`]. `R` must read a variant's path
    /// arguments: ruma's state requests, for one, read a missing last
    /// argument as the empty state key.
    pub fn add_at<R, T, F, Fut>(mut self, variants: &[&str], class: RateClass, handler: F) -> Self
    where
        R: IncomingRequest + Send + 'static,
        R::Authentication: CallerAuth,
        T: ApiResponse,
        F: Fn(AppState, Ruma<R>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let Ok(method) = MethodFilter::try_from(R::METHOD) else {
            // The method is a constant of the request type, not client input.
            panic!(
                "endpoint {} has an unroutable method {}",
                std::any::type_name::<R>(),
                R::METHOD
            );
        };
        let endpoint = move |State(s): State<AppState>, req: Ruma<R>| {
            let handler = handler.clone();
            async move {
                charge(
                    &s,
                    class,
                    <R::Authentication as CallerAuth>::user(&req.caller),
                    req.peer,
                )
                .await?;
                handler(s, req).await.map(RumaResponse).map_err(ApiError)
            }
        };
        let mut paths = paths_of::<R>();
        for rest in variants {
            paths.extend(CLIENT_PREFIXES.iter().map(|p| format!("{p}{rest}")));
        }
        for path in paths {
            self.router = self.router.route(&path, on(method, endpoint.clone()));
        }
        self
    }

    pub fn into_router(self) -> Router<AppState> {
        self.router
    }
}

/// Takes a call from the caller's bucket (calls without a session were
/// charged to their IP by the IP layer already), and from the class's own
/// buckets.
pub(crate) async fn charge(
    s: &AppState,
    class: RateClass,
    session: Option<&Session>,
    peer: Option<SocketAddr>,
) -> Result<(), Error> {
    if let Some(session) = session
        && !s.exempt_from_rate_limits(session)
    {
        s.limiter.check(session.user_id.as_str())?;
    }
    match class {
        RateClass::Caller => Ok(()),
        RateClass::Login => s.charge_sign_in(peer.map(|p| p.ip())).await,
    }
}

// Bridges between typed requests and responses and the services' JSON
// values, until the services take and return the typed values themselves.

/// A typed value as another type with the same JSON form.
pub(crate) fn convert<T: serde::Serialize, U: serde::de::DeserializeOwned>(t: &T) -> Result<U, Error> {
    serde_json::to_value(t)
        .and_then(serde_json::from_value)
        .map_err(bad_json)
}

/// Takes `key` out of a service's JSON answer as a typed value; absent or
/// null is the type's default.
pub(crate) fn field<U: serde::de::DeserializeOwned + Default>(
    v: &mut serde_json::Value,
    key: &str,
) -> Result<U, Error> {
    match v.get_mut(key).map(serde_json::Value::take) {
        None | Some(serde_json::Value::Null) => Ok(U::default()),
        Some(x) => serde_json::from_value(x).map_err(|e| Error::internal(format!("{key}: {e}"))),
    }
}

pub(crate) fn bad_json(e: serde_json::Error) -> Error {
    Error::bad_json(format!("Invalid request body: {e}"))
}

/// A JSON value as the raw JSON a typed response carries (written out
/// once, not parsed again).
pub(crate) fn raw<T>(v: serde_json::Value) -> Result<ruma::serde::Raw<T>, Error> {
    serde_json::value::to_raw_value(&v)
        .map(ruma::serde::Raw::from_json)
        .map_err(Error::internal)
}

// Query parameters ruma requires but Weft lets clients leave out (see
// `rooms::MessagesRequest`): the request gets the default before ruma
// reads it, so everything else about the parameter stays ruma's.

/// Whether the query of `uri` has the parameter `key` (percent-decoded).
pub(crate) fn query_has(uri: &axum::http::Uri, key: &str) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| percent_decode(pair.split('=').next().unwrap_or("")) == key)
    })
}

/// `req` with `key=value` added to its query, unless the query has `key`.
/// `key` and `value` must not need escaping.
pub(crate) fn with_query_default<B>(req: axum::http::Request<B>, key: &str, value: &str) -> axum::http::Request<B> {
    if query_has(req.uri(), key) {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    let target = match parts.uri.query() {
        Some(q) if !q.is_empty() => format!("{}?{q}&{key}={value}", parts.uri.path()),
        _ => format!("{}?{key}={value}", parts.uri.path()),
    };
    // Appending a plain `key=value` to a valid target keeps it valid.
    if let Ok(uri) = target.parse() {
        parts.uri = uri;
    }
    axum::http::Request::from_parts(parts, body)
}

/// Query parameters the spec makes optional but a ruma request type
/// requires, with the spec's defaults.
pub trait QueryDefaults: Send + Sync + 'static {
    const DEFAULTS: &'static [(&'static str, &'static str)];
}

/// `R`, read after the query parameters of `D` that the request leaves out
/// are filled in with their defaults: the endpoint is declared with this
/// type where ruma's reads the spec too strictly.
pub struct WithDefaults<R, D> {
    pub request: R,
    defaults: std::marker::PhantomData<D>,
}

impl<R: Metadata, D> Metadata for WithDefaults<R, D> {
    const METHOD: axum::http::Method = R::METHOD;
    const RATE_LIMITED: bool = R::RATE_LIMITED;
    type Authentication = R::Authentication;
    type PathBuilder = R::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = R::PATH_BUILDER;
}

impl<R: IncomingRequest, D: QueryDefaults> IncomingRequest for WithDefaults<R, D> {
    type EndpointError = R::EndpointError;
    type OutgoingResponse = R::OutgoingResponse;

    fn try_from_http_request<B, S>(req: axum::http::Request<B>, path_args: &[S]) -> Result<Self, FromHttpRequestError>
    where
        B: AsRef<[u8]>,
        S: AsRef<str>,
    {
        let req = D::DEFAULTS
            .iter()
            .fold(req, |req, (key, value)| with_query_default(req, key, value));
        R::try_from_http_request(req, path_args).map(|request| Self {
            request,
            defaults: std::marker::PhantomData,
        })
    }
}
