//! The typed Client-Server endpoint layer. Every endpoint is declared once
//! — its request and response types (ruma's, or ours where ruma has
//! none), its authentication and its rate-limit class — and reached through
//! one extractor ([`endpoint::Ruma`]). Handlers translate between those
//! types and `weft-services` calls; no room or account logic lives here.
//!
//! Every door dispatches through the one router this crate builds: the HTTP
//! door serves it, the WebSocket door and the CoAP door hand it requests in
//! process. Errors become the Matrix error body in exactly one place
//! ([`ApiError`]).

mod accounts;
pub mod endpoint;
mod extract;
mod keys;
mod misc;
mod rooms;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use weft_core::{Error, ErrorKind};
use weft_services::Services;

pub use endpoint::Authenticated;
pub use extract::{ApiError, TokenChecked, access_token, redacted_uri};

pub type AppState = Arc<Services>;
pub type ApiResult<T = Json<serde_json::Value>> = Result<T, ApiError>;

/// The endpoints declared with typed requests and responses: each one's
/// method, paths (every version prefix) and authentication come from its
/// request type.
fn typed_routes(r: endpoint::Routes) -> endpoint::Routes {
    use endpoint::RateClass::Caller;
    r.add(Caller, accounts::whoami)
        .add(Caller, accounts::logout)
        .add(Caller, accounts::logout_all)
        .add(Caller, rooms::joined_rooms)
        .add(Caller, rooms::send)
        .add(Caller, keys::upload)
        .add(Caller, keys::query)
        .add(Caller, keys::claim)
        .add(Caller, keys::changes)
        .add(Caller, keys::send_to_device)
        .add(Caller, rooms::join)
        .add(Caller, rooms::join_by_id_or_alias)
        .add(Caller, rooms::invite)
        .add(Caller, rooms::leave)
        .add(Caller, rooms::kick)
        .add(Caller, rooms::ban)
        .add(Caller, rooms::unban)
        .add(Caller, rooms::forget)
        .add(Caller, rooms::state)
        .add(Caller, rooms::event)
        .add(Caller, rooms::redact)
        .add(Caller, rooms::get_alias)
        .add(Caller, rooms::put_alias)
        .add(Caller, rooms::delete_alias)
        .add(Caller, rooms::room_aliases)
        .add(Caller, rooms::members)
        .add(Caller, rooms::room_joined_members)
        .add(Caller, accounts::list_devices)
        .add(Caller, accounts::get_device)
        .add(Caller, misc::put_account_data)
        .add(Caller, misc::get_account_data)
        .add(Caller, misc::put_room_account_data)
        .add(Caller, misc::get_room_account_data)
        // Reading rooms: sync, messages, context.
        .add(Caller, rooms::sync)
        .add(Caller, rooms::messages)
        .add(Caller, rooms::context)
}

/// Routes not yet declared with typed requests, served under each client
/// API prefix (v3, r0, and the talk's api/v1). They move to
/// [`typed_routes`] one by one.
fn client_routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(accounts::login_flows).post(accounts::login))
        .route("/register", post(accounts::register))
        .route("/register/available", get(accounts::register_available))
        .route(
            "/register/m.login.registration_token/validity",
            get(accounts::token_validity),
        )
        .route("/account/password", post(accounts::change_password))
        .route("/account/deactivate", post(accounts::deactivate))
        .route("/profile/{user_id}", get(accounts::get_profile))
        .route(
            "/profile/{user_id}/{field}",
            get(accounts::get_profile_field).put(accounts::put_profile_field),
        )
        .route("/capabilities", get(misc::capabilities))
        .route("/createRoom", post(rooms::create_room))
        .route("/publicRooms", get(rooms::public_rooms))
        .route("/rooms/{room}/send/{event_type}", post(rooms::send_no_txn))
        .route(
            "/rooms/{room}/state/{event_type}",
            get(rooms::get_state_empty_key).put(rooms::put_state_empty_key),
        )
        // The trailing slash is optional for an empty state key; ruma sends it.
        .route(
            "/rooms/{room}/state/{event_type}/",
            get(rooms::get_state_empty_key).put(rooms::put_state_empty_key),
        )
        .route(
            "/rooms/{room}/state/{event_type}/{state_key}",
            get(rooms::get_state).put(rooms::put_state),
        )
        .route("/rooms/{room}/typing/{user_id}", put(misc::typing))
        .route("/rooms/{room}/receipt/{receipt_type}/{event_id}", post(misc::receipt))
        .route("/rooms/{room}/read_markers", post(misc::read_markers))
        .route("/presence/{user_id}/status", put(misc::presence))
        .route("/user/{user_id}/filter", post(misc::put_filter))
        .route("/user/{user_id}/filter/{filter_id}", get(misc::get_filter))
        .route("/pushrules/", get(misc::push_rules))
        .route("/keys/device_signing/upload", post(keys::device_signing_upload))
        .route("/keys/signatures/upload", post(keys::signatures_upload))
}

/// The whole Client-Server API: every endpoint, the fallbacks for unknown
/// paths and methods, the rate limit for requests without a token and the
/// body limit. `extra` adds a door's own routes (the WebSocket upgrade).
pub fn router(services: &AppState, extra: impl FnOnce(Router<AppState>) -> Router<AppState>) -> Router<AppState> {
    let limit = services.config.limits.max_body_bytes;
    let mut app = typed_routes(endpoint::Routes::new(
        Router::new()
            .route("/_matrix/client/versions", get(misc::versions))
            .route("/.well-known/matrix/client", get(misc::well_known)),
    ))
    .into_router();
    for prefix in endpoint::CLIENT_PREFIXES {
        app = app.nest(prefix, client_routes());
    }
    extra(app)
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(services.clone(), rate_limit_by_ip))
        .layer(DefaultBodyLimit::max(limit))
}

/// What the WebSocket and CoAP doors dispatch their requests to, in process.
pub fn dispatcher(services: &AppState) -> Router {
    router(services, |r| r).with_state(services.clone())
}

async fn unrecognized() -> ApiError {
    ApiError(Error::new(
        ErrorKind::Unrecognized {
            method_not_allowed: false,
        },
        "Unrecognized request",
    ))
}

async fn method_not_allowed() -> ApiError {
    ApiError(Error::new(
        ErrorKind::Unrecognized {
            method_not_allowed: true,
        },
        "Method not allowed on this endpoint",
    ))
}

/// Requests without an access token are rate-limited by client IP here;
/// ones with an unknown token too (the services charge the IP when
/// resolving it); authenticated ones by user, in the endpoint's extractor,
/// which reuses the session resolved here. A request a door authenticated
/// itself ([`Authenticated`]) is charged to its user there.
async fn rate_limit_by_ip(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS || req.extensions().get::<Authenticated>().is_some() {
        return next.run(req).await;
    }
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let (mut parts, body) = req.into_parts();
    match extract::access_token(&parts) {
        Some(token) => match s.accounts.authenticate(&token, ip).await {
            Err(e) if matches!(e.kind, ErrorKind::LimitExceeded { .. }) => return ApiError(e).into_response(),
            // An unknown token: the endpoint answers (401 where it needs one).
            checked => {
                parts.extensions.insert(extract::TokenChecked(checked));
            }
        },
        None => {
            let key = ip.map(|ip| format!("ip:{ip}")).unwrap_or_else(|| "ip:".to_owned());
            if let Err(e) = s.limiter.check(&key) {
                return ApiError(e).into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, body)).await
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        if e.kind == ErrorKind::Unknown {
            tracing::error!("internal error: {}", e.message);
        }
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = e.body();
        if e.kind == ErrorKind::Unknown && e.status.is_none() {
            body["error"] = "Internal server error".into();
        }
        (status, Json(body)).into_response()
    }
}
