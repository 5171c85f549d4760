//! Self-contained pages served by the service itself: the interactive API
//! docs (`/docs`, driven by `/openapi.json`) and the test client
//! (`/client`). Plain HTML, CSS and JavaScript compiled into the binary;
//! nothing is fetched from anywhere else.

use axum::http::header;
use axum::response::{Html, IntoResponse};

/// Pages may talk only to this service (HTTP and WebSocket).
const CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self' ws: wss:; frame-ancestors 'none'";

fn page(html: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_SECURITY_POLICY, CSP)], Html(html))
}

/// `GET /client`
pub async fn client() -> impl IntoResponse {
    page(include_str!("pages/client.html"))
}

/// `GET /docs`
pub async fn docs() -> impl IntoResponse {
    page(include_str!("pages/docs.html"))
}
