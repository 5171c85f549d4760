//! API authentication (`WRS_AUTH`): the middleware that checks the API
//! token on the requests the configured [`AuthPolicy`]
//! (`WRS_AUTH_RESOURCES`) protects.
//!
//! The token is accepted as `Authorization: Bearer <token>`, as the query
//! parameter `auth`, or as the field `"auth"` of a JSON body, and is
//! compared in constant time. Per-channel connect tokens are independent of
//! it.

use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::{ApiError, MAX_BODY_BYTES};
use crate::config::{AuthPolicy, Secret};

/// What the middleware needs.
#[derive(Clone, Debug)]
pub struct Auth {
    pub policy: AuthPolicy,
    pub token: Secret,
}

fn matches(expected: &Secret, candidate: &str) -> bool {
    expected
        .expose()
        .as_bytes()
        .ct_eq(candidate.as_bytes())
        .into()
}

/// Where a request carried a token, if anywhere.
enum Presented {
    Valid,
    Invalid,
    Missing,
}

impl Presented {
    fn of(auth: &Auth, candidate: Option<&str>) -> Self {
        match candidate {
            None => Presented::Missing,
            Some(token) if matches(&auth.token, token) => Presented::Valid,
            Some(_) => Presented::Invalid,
        }
    }
}

/// Middleware: lets unprotected requests through; protected ones need the
/// token in the header, the query or the JSON body.
pub async fn require_token(
    State(auth): State<Arc<Auth>>,
    request: Request,
    next: Next,
) -> Response {
    if !auth
        .policy
        .protects(request.method().as_str(), request.uri().path())
    {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or("")
        });
    let mut seen = Presented::of(&auth, header);
    if matches!(seen, Presented::Missing) {
        let query = request
            .uri()
            .query()
            .and_then(|q| url_query_value(q, "auth"));
        seen = Presented::of(&auth, query.as_deref());
    }
    let request = if matches!(seen, Presented::Missing) && carries_body(&request) {
        // Look for "auth" in a JSON body; the handler gets the same bytes.
        let (parts, body) = request.into_parts();
        let bytes = match to_bytes(body, MAX_BODY_BYTES).await {
            Ok(bytes) => bytes,
            Err(_) => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                )
                .into_response();
            }
        };
        let field = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("auth").and_then(|a| a.as_str()).map(str::to_owned));
        seen = Presented::of(&auth, field.as_deref());
        Request::from_parts(parts, Body::from(bytes))
    } else {
        request
    };
    match seen {
        Presented::Valid => next.run(request).await,
        Presented::Invalid => unauthorized("invalid_auth", "the API token is wrong"),
        Presented::Missing => unauthorized(
            "missing_auth",
            "this resource needs the API token: send Authorization: Bearer <token>, ?auth=<token> or a JSON body field \"auth\"",
        ),
    }
}

fn carries_body(request: &Request) -> bool {
    !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    )
}

fn unauthorized(code: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// The decoded value of `name` in a query string (the last one wins).
pub fn url_query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .last()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            url_query_value("a=1&auth=x%20y&b=2", "auth").as_deref(),
            Some("x y")
        );
        assert_eq!(
            url_query_value("auth=1&auth=2", "auth").as_deref(),
            Some("2")
        );
        assert_eq!(url_query_value("authx=1", "auth"), None);
    }
}
