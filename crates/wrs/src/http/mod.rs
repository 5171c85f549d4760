//! The REST surface: one router built by [`router`], one file per
//! resource, one error type ([`error::ApiError`]). Every response body is
//! a JSON object, including 404, 405 and 413.

pub mod channels;
pub mod connect;
pub mod error;
pub mod pages;
pub mod readme;
pub mod service;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::{delete, get};

use crate::config::Config;
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

/// The whole API. Channel routes answer under `/channels` and the
/// singular alias `/channel`.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for prefix in ["/channels", "/channel"] {
        router = router
            .route(prefix, get(channels::list).post(channels::create))
            .route(
                &format!("{prefix}/{{id}}"),
                get(channels::show).delete(channels::remove),
            )
            .route(&format!("{prefix}/{{id}}/clients"), get(channels::clients))
            .route(&format!("{prefix}/{{id}}/connect"), get(connect::connect));
    }
    router
        .route("/", get(readme::readme))
        .route("/readme", get(readme::readme))
        .route("/client", get(pages::client))
        .route("/docs", get(pages::docs))
        .route("/reset", delete(channels::reset))
        .route("/service", get(service::service))
        .route("/cluster", get(service::cluster))
        .route("/healthz", get(service::healthz))
        .route("/readyz", get(service::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
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
