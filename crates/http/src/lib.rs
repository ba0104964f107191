//! The HTTP door: the Matrix Client-Server API as axum routes over the
//! shared services. Handlers decode requests, call `weft-services`, and
//! encode responses; no room or account logic lives here. Errors become the
//! Matrix error body in exactly one place ([`ApiError`]).

mod accounts;
mod extract;
mod keys;
mod misc;
mod rooms;
mod ws;

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

pub use extract::ApiError;
pub use ws::WS_PATH;

pub type AppState = Arc<Services>;
pub type ApiResult<T = Json<serde_json::Value>> = Result<T, ApiError>;

/// Routes served under each client API prefix (v3, r0, and the talk's api/v1).
fn client_routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(accounts::login_flows).post(accounts::login))
        .route("/register", post(accounts::register))
        .route("/register/available", get(accounts::register_available))
        .route(
            "/register/m.login.registration_token/validity",
            get(accounts::token_validity),
        )
        .route("/account/whoami", get(accounts::whoami))
        .route("/logout", post(accounts::logout))
        .route("/logout/all", post(accounts::logout_all))
        .route("/account/password", post(accounts::change_password))
        .route("/account/deactivate", post(accounts::deactivate))
        .route("/profile/{user_id}", get(accounts::get_profile))
        .route(
            "/profile/{user_id}/{field}",
            get(accounts::get_profile_field).put(accounts::put_profile_field),
        )
        .route("/devices", get(accounts::list_devices))
        .route("/capabilities", get(misc::capabilities))
        .route("/createRoom", post(rooms::create_room))
        .route("/join/{room}", post(rooms::join))
        .route("/joined_rooms", get(rooms::joined_rooms))
        .route("/publicRooms", get(rooms::public_rooms))
        .route(
            "/directory/room/{alias}",
            get(rooms::get_alias).put(rooms::put_alias).delete(rooms::delete_alias),
        )
        .route("/rooms/{room}/aliases", get(rooms::room_aliases))
        .route("/rooms/{room}/join", post(rooms::join))
        .route("/rooms/{room}/invite", post(rooms::invite))
        .route("/rooms/{room}/leave", post(rooms::leave))
        .route("/rooms/{room}/kick", post(rooms::kick))
        .route("/rooms/{room}/ban", post(rooms::ban))
        .route("/rooms/{room}/unban", post(rooms::unban))
        .route("/rooms/{room}/forget", post(rooms::forget))
        .route("/rooms/{room}/members", get(rooms::members))
        .route("/rooms/{room}/joined_members", get(rooms::joined_members))
        .route("/rooms/{room}/send/{event_type}/{txn}", put(rooms::send))
        .route("/rooms/{room}/send/{event_type}", post(rooms::send_no_txn))
        .route("/rooms/{room}/state", get(rooms::state))
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
        .route("/rooms/{room}/event/{event_id}", get(rooms::event))
        .route("/rooms/{room}/redact/{event_id}/{txn}", put(rooms::redact))
        .route("/rooms/{room}/messages", get(rooms::messages))
        .route("/rooms/{room}/context/{event_id}", get(rooms::context))
        .route("/rooms/{room}/typing/{user_id}", put(misc::accept_ephemeral))
        .route(
            "/rooms/{room}/receipt/{receipt_type}/{event_id}",
            post(misc::accept_ephemeral),
        )
        .route("/rooms/{room}/read_markers", post(misc::accept_ephemeral))
        .route("/presence/{user_id}/status", put(misc::accept_ephemeral))
        .route("/sync", get(rooms::sync))
        .route("/user/{user_id}/filter", post(misc::put_filter))
        .route("/user/{user_id}/filter/{filter_id}", get(misc::get_filter))
        .route(
            "/user/{user_id}/account_data/{data_type}",
            get(misc::get_account_data).put(misc::put_account_data),
        )
        .route(
            "/user/{user_id}/rooms/{room}/account_data/{data_type}",
            get(misc::get_room_account_data).put(misc::put_room_account_data),
        )
        .route("/pushrules/", get(misc::push_rules))
        .route("/keys/upload", post(keys::upload))
        .route("/keys/query", post(keys::query))
        .route("/keys/claim", post(keys::claim))
        .route("/keys/changes", get(keys::changes))
        .route("/keys/device_signing/upload", post(keys::device_signing_upload))
        .route("/keys/signatures/upload", post(keys::signatures_upload))
        .route("/sendToDevice/{event_type}/{txn}", put(keys::send_to_device))
}

/// The Client-Server API routes, their fallbacks, rate limit and body limit.
fn api(services: &AppState, extra: impl FnOnce(Router<AppState>) -> Router<AppState>) -> Router<AppState> {
    let limit = services.config.limits.max_body_bytes;
    let mut app = Router::new()
        .route("/_matrix/client/versions", get(misc::versions))
        .route("/.well-known/matrix/client", get(misc::well_known));
    for prefix in ["/_matrix/client/v3", "/_matrix/client/r0", "/_matrix/client/api/v1"] {
        app = app.nest(prefix, client_routes());
    }
    extra(app)
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(services.clone(), rate_limit_by_ip))
        .layer(DefaultBodyLimit::max(limit))
}

/// The whole HTTP application.
pub fn router(services: AppState) -> Router {
    // What WebSocket request frames are dispatched to, in process.
    let dispatch: Router = api(&services, |r| r).with_state(services.clone());
    api(&services, move |r| {
        r.route(
            ws::WS_PATH,
            get(move |State(s): State<AppState>, req: Request| ws::upgrade(s, dispatch.clone(), req)),
        )
    })
    .layer(
        tower_http::cors::CorsLayer::new()
            .allow_origin(tower_http::cors::Any)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
            .allow_headers(tower_http::cors::Any),
    )
    .layer(tower_http::trace::TraceLayer::new_for_http())
    .with_state(services)
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
/// resolving it); authenticated ones by user, in the auth extractor,
/// which reuses the session resolved here.
async fn rate_limit_by_ip(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
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
