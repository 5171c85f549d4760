//! Self-contained pages served by the service itself: the interactive API
//! docs (`/docs`, driven by `/openapi.json`) and the test client
//! (`/client`) and the live dashboard (`/dashboard`). Plain HTML, CSS and JavaScript compiled into the binary;
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
#[utoipa::path(get, path = "/client", tag = "docs", summary = "A test client page",
    description = "Create a channel, open several clients, send and watch messages — in the browser.",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn client() -> impl IntoResponse {
    page(include_str!("pages/client.html"))
}

/// `GET /docs`
#[utoipa::path(get, path = "/docs", tag = "docs", summary = "Interactive API docs",
    description = "Renders /openapi.json with a form to try every operation.",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn docs() -> impl IntoResponse {
    page(include_str!("pages/docs.html"))
}

/// `GET /dashboard`
#[utoipa::path(get, path = "/dashboard", tag = "docs", summary = "A live dashboard",
    description = "Nodes with their connections, state and weight, channels, and charts of connections per node, messages per second and channels, refreshed every second from /cluster, /channels and /service. Self-contained: nothing is fetched from elsewhere.",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub async fn dashboard() -> impl IntoResponse {
    page(include_str!("pages/dashboard.html"))
}
