//! The HTTP door: serves the Client-Server API router of `weft-api` (every
//! endpoint, typed and declared once there), and the WebSocket door that
//! dispatches its frames through the same router.

mod ws;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::routing::get;
use weft_api::AppState;

pub use ws::WS_PATH;

/// The whole HTTP application.
pub fn router(services: AppState) -> Router {
    // What WebSocket request frames are dispatched to, in process.
    let dispatch = weft_api::dispatcher(&services);
    weft_api::router(&services, move |r| {
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
    .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
    .with_state(services)
}

/// The span of an HTTP request in logs. Its target has secret query
/// parameters (access tokens) redacted: tokens never reach a log.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %req.method(),
        uri = %weft_api::redacted_uri(req.uri()),
        version = ?req.version(),
    )
}
