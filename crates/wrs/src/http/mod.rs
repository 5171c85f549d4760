//! The REST surface: one router built by [`router`] from the same
//! registration as the OpenAPI document ([`openapi`]), one file per
//! resource, one error type ([`error::ApiError`]). Every response body is a
//! JSON object, including 401, 404, 405 and 413. Layers, outermost first:
//! CORS, HTTP metrics, API auth (with `WRS_AUTH`), body limit.

pub mod auth;
pub mod channels;
pub mod connect;
pub mod error;
pub mod messages;
pub mod openapi;
pub mod pages;
pub mod readme;
pub mod service;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use axum::{Extension, Router};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::config::{Config, CorsOrigins};
use crate::relay::Relay;
use error::{ApiError, MAX_BODY_BYTES};

/// What every handler shares. Cloning is shallow.
#[derive(Clone, Debug)]
pub struct AppState {
    pub relay: Arc<Relay>,
    pub config: Arc<Config>,
    /// The readme page, rendered at start; cloning shares it.
    pub readme: axum::body::Bytes,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let config = Arc::clone(&state.config);
    let policy = config.auth.then(|| config.auth_resources.clone());
    let (router, doc) = openapi::routes(&config).split_for_parts();
    let doc = openapi::finish(doc, &config, policy.as_ref());
    let mut router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(doc))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    if let (Some(policy), Some(token)) = (policy, config.auth_token.clone()) {
        let auth = Arc::new(auth::Auth { policy, token });
        router = router.layer(from_fn_with_state(auth, auth::require_token));
    }
    router
        .layer(from_fn_with_state(Arc::clone(&state.relay), record_http))
        .layer(cors_layer(&config.cors_origins))
        .with_state(state)
}

/// CORS for `WRS_CORS_ORIGINS`: any origin, or only the listed ones.
/// Requested headers are mirrored, so `Authorization` works cross-origin.
pub fn cors_layer(origins: &CorsOrigins) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([header::LOCATION])
        .max_age(Duration::from_secs(3600));
    match origins {
        CorsOrigins::Any => layer.allow_origin(AllowOrigin::any()),
        CorsOrigins::List(list) => {
            // Compared as bytes, as `AllowOrigin::list` does, without
            // converting the configured text into header values.
            let list = list.clone();
            layer.allow_origin(AllowOrigin::predicate(move |origin, _| {
                list.iter()
                    .any(|allowed| allowed.as_bytes() == origin.as_bytes())
            }))
        }
    }
}

/// Counts every request by route (the route template, never the raw path),
/// method and status, with its latency.
async fn record_http(State(relay): State<Arc<Relay>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    // Only known methods become labels, so clients cannot grow the series.
    let method = match *request.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => request.method().as_str().to_owned(),
        _ => "other".to_owned(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    relay.metrics().http_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no resource at {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
