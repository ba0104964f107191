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
mod backup;
mod directory;
pub mod endpoint;
mod extract;
mod federation;
mod federation_media;
mod federation_rooms;
mod keys;
mod media;
mod misc;
mod own;
mod push;
mod relations;
mod rooms;
mod search;
mod spaces;
mod streaming;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use weft_core::{Error, ErrorKind};
use weft_services::Services;

pub use endpoint::{Authenticated, Origin};
pub use extract::{ApiError, TokenChecked, access_token, redacted_uri};

pub type AppState = Arc<Services>;
pub type ApiResult<T = Json<serde_json::Value>> = Result<T, ApiError>;

/// The endpoints declared with typed requests and responses: each one's
/// method, paths (every version prefix) and authentication come from its
/// request type.
fn typed_routes(r: endpoint::Routes) -> endpoint::Routes {
    use endpoint::RateClass::{Caller, Login};
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
        .add(Caller, accounts::openid_token)
        .add(Caller, accounts::list_devices)
        .add(Caller, accounts::get_device)
        .add(Caller, misc::put_account_data)
        .add(Caller, misc::get_account_data)
        .add(Caller, misc::put_room_account_data)
        .add(Caller, misc::get_room_account_data)
        // rooms (create, directory, send without txn, state), ephemeral, filters, push rules, cross-signing
        .add(Caller, rooms::create_room)
        .add(Caller, rooms::public_rooms)
        .add(Caller, rooms::send_without_txn)
        .add_at(&rooms::EMPTY_STATE_KEY, Caller, rooms::get_state)
        .add_at(&rooms::EMPTY_STATE_KEY, Caller, rooms::put_state)
        .add(Caller, misc::typing)
        .add(Caller, misc::receipt)
        .add(Caller, misc::read_markers)
        .add(Caller, misc::presence)
        .add(Caller, misc::put_filter)
        .add(Caller, misc::get_filter)
        .add(Caller, push::all)
        .add(Caller, keys::device_signing_upload)
        .add(Caller, keys::signatures_upload)
        // key backup
        .add(Caller, backup::create_version)
        .add(Caller, backup::latest_version)
        .add(Caller, backup::get_version)
        .add(Caller, backup::update_version)
        .add(Caller, backup::delete_version)
        .add(Caller, backup::put_keys)
        .add(Caller, backup::put_room_keys)
        .add(Caller, backup::put_session_key)
        .add(Caller, backup::get_keys)
        .add(Caller, backup::get_room_keys)
        .add(Caller, backup::get_session_key)
        .add(Caller, backup::delete_keys)
        .add(Caller, backup::delete_room_keys)
        .add(Caller, backup::delete_session_key)
        // directory, calls, reports, third-party IDs
        .add(Caller, directory::search)
        .add(Caller, directory::turn_server)
        .add(Caller, directory::three_pids)
        .add(Caller, directory::report_event)
        .add(Caller, directory::report_user)
        // relations and threads
        .add(Caller, relations::relating)
        .add(Caller, relations::relating_with_rel_type)
        .add(Caller, relations::relating_with_rel_type_and_event_type)
        .add(Caller, relations::threads)
        .add(Caller, search::search)
        .add(Caller, spaces::hierarchy)
        // accounts: sign-in, registration, passwords, profiles, discovery
        .add(Caller, accounts::login_flows)
        .add(Login, accounts::login)
        .add(Login, accounts::register)
        .add(Login, accounts::register_available)
        .add(Login, accounts::token_validity)
        .add(Caller, accounts::change_password)
        .add(Caller, accounts::deactivate)
        .add(Caller, accounts::get_profile)
        .add(Caller, accounts::get_profile_field)
        .add(Caller, accounts::put_profile_field)
        .add(Caller, misc::capabilities)
        .add(Caller, misc::versions)
        .add(Caller, misc::well_known)
        // Reading rooms: sync, messages, context.
        .add(Caller, rooms::sync)
        .add(Caller, rooms::messages)
        .add(Caller, rooms::context)
        // Device management and room upgrades.
        .add(Caller, accounts::update_device)
        .add(Caller, accounts::delete_device)
        .add(Caller, accounts::delete_devices)
        .add(Caller, rooms::upgrade)
        // Push rules (stored per user; all of them is `push::all` above).
        .add(Caller, push::global)
        .add(Caller, push::get)
        .add(Caller, push::set)
        .add(Caller, push::delete)
        .add(Caller, push::get_enabled)
        .add(Caller, push::set_enabled)
        .add(Caller, push::get_actions)
        .add(Caller, push::set_actions)
        // Media repository (uploads stream: `add_upload`).
        .add_upload(Caller, media::upload)
        .add_upload(Caller, media::upload_to)
        .add(Caller, media::create)
        .add(Caller, media::download)
        .add(Caller, media::download_as)
        .add(Caller, media::thumbnail)
        .add(Caller, media::config)
        .add(Caller, media::legacy_download)
        .add(Caller, media::legacy_download_as)
        .add(Caller, media::legacy_thumbnail)
        .add(Caller, media::legacy_config)
        .add(Caller, media::room_files)
        .add(Caller, media::my_uploads)
        .add(Caller, media::preview)
        .add(Caller, media::legacy_preview)
        // Push: notifications and pushers.
        .add(Caller, push::notifications)
        .add(Caller, push::pushers)
        .add(Caller, push::set_pusher)
        // Simplified sliding sync (MSC4186).
        .add(Caller, rooms::sliding_sync)
        // Presence (typing and setting presence are above).
        .add(Caller, misc::get_presence)
        .add(Caller, misc::appservice_ping)
        .add(Caller, directory::thirdparty_protocols)
        .add(Caller, directory::thirdparty_protocol)
        .add(Caller, directory::thirdparty_locations)
        .add(Caller, directory::thirdparty_users)
        .add(Caller, directory::thirdparty_location_for_alias)
        .add(Caller, directory::thirdparty_user_for_userid)
}

/// The Server-Server API endpoints, one line each; served on the
/// federation listener ([`federation_router`]).
fn federation_routes(r: endpoint::Routes) -> endpoint::Routes {
    use endpoint::RateClass::Caller;
    r.add(Caller, federation::version)
        .add(Caller, federation::server_keys)
        .add(Caller, federation::server_keys_by_id)
        .add(Caller, federation::query_keys)
        .add(Caller, federation::query_keys_of)
        .add(Caller, federation::query_profile)
        // rooms: reads and membership handshakes
        .add(Caller, federation_rooms::event)
        .add(Caller, federation_rooms::state)
        .add(Caller, federation_rooms::state_ids)
        .add(Caller, federation_rooms::event_auth)
        .add(Caller, federation_rooms::backfill)
        .add(Caller, federation_rooms::missing_events)
        .add(Caller, federation_rooms::make_join)
        .add(Caller, federation_rooms::send_join)
        .add(Caller, federation_rooms::make_leave)
        .add(Caller, federation_rooms::send_leave)
        .add(Caller, federation_rooms::invite)
        .add(Caller, federation::send_transaction)
        .add(Caller, federation::user_devices)
        .add(Caller, federation::user_keys_query)
        .add(Caller, federation::user_keys_claim)
        .add(Caller, federation::query_directory)
        .add(Caller, federation::public_rooms)
        .add(Caller, federation::public_rooms_filtered)
        .add(Caller, federation::openid_userinfo)
        // media: local items for other servers
        .add(Caller, federation_media::download)
        .add(Caller, federation_media::thumbnail)
}

/// The federation listener's API: [`federation_routes`], the Matrix
/// fallbacks, the body limit, and the rate limit by client address for
/// every request (a signed one is charged to its origin server too, by
/// the services). No Client-Server endpoint is served there.
pub fn federation_router(services: &AppState) -> Router {
    let limit = services.config.limits.max_body_bytes;
    federation_routes(endpoint::Routes::new(Router::new()))
        .into_router()
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(services.clone(), rate_limit_by_ip))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(services.clone())
}

/// `GET /.well-known/matrix/server` (served on the client listener):
/// `{"m.server": "<[federation] well_known_server>"}`, or 404 when unset.
pub async fn well_known_server(State(s): State<AppState>) -> Response {
    match s.well_known_server() {
        Some(body) => Json(body).into_response(),
        None => ApiError(Error::not_found("No server delegation is configured")).into_response(),
    }
}

/// The whole Client-Server API: every endpoint, the fallbacks for unknown
/// paths and methods, the rate limit for requests without a token and the
/// body limit. `extra` adds a door's own routes (the WebSocket upgrade).
pub fn router(services: &AppState, extra: impl FnOnce(Router<AppState>) -> Router<AppState>) -> Router<AppState> {
    let limit = services.config.limits.max_body_bytes;
    let app = typed_routes(endpoint::Routes::new(Router::new()))
        .into_router()
        .route("/.well-known/matrix/server", axum::routing::get(well_known_server));
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
        Some(token) => match s
            .authenticate(
                &token,
                endpoint::query_param(&parts.uri, "user_id").as_deref(),
                endpoint::query_param(&parts.uri, endpoint::MASQUERADE_DEVICE).as_deref(),
                ip,
            )
            .await
        {
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
        if e.kind == ErrorKind::Unknown && e.status.is_none() {
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
