//! `/channels` (alias `/channel`) and `/reset`: creating, listing,
//! inspecting and deleting channels.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime};

use super::AppState;
use super::error::ApiError;
use crate::relay::channel::{Channel, ChannelSpec};
use crate::relay::ids::{ChannelId, ClientId};
use crate::relay::pattern::Pattern;

/// Largest `clientLimit` accepted.
pub const MAX_CLIENT_LIMIT: u64 = 1_000_000;
/// Largest `timeout` accepted, in ms (30 days).
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// `timeout` when none is given, in ms (24 hours).
pub const DEFAULT_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// The fields `POST /channels` accepts.
const FIELDS: [&str; 4] = ["pattern", "clientLimit", "timeout", "welcome"];
const PATTERN_NAMES: &str = "echo, pub-sub, push-pull, req-repl, fan-in-out";

/// The success envelope: `{"message": ..., "data": ...}`.
#[derive(Serialize)]
pub struct Envelope<T> {
    pub message: String,
    pub data: T,
}

pub fn ok<T: Serialize>(message: impl Into<String>, data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        message: message.into(),
        data,
    })
}

/// A channel as the API shows it. The token is never part of it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelView {
    id: String,
    pattern: Pattern,
    /// Inactivity timeout in ms, -1 = never.
    timeout: i64,
    /// Ms until the timeout fires, -1 = never.
    countdown: i64,
    /// Most clients, -1 = unlimited.
    client_limit: i64,
    clients: usize,
    created_at: String,
}

impl ChannelView {
    pub fn of(channel: &Channel) -> Self {
        let spec = channel.spec();
        Self {
            id: channel.id().to_string(),
            pattern: spec.pattern,
            timeout: spec.timeout.map_or(-1, |t| t.as_millis() as i64),
            countdown: channel.countdown_ms().map_or(-1, |c| c as i64),
            client_limit: spec.client_limit.map_or(-1, i64::from),
            clients: channel.client_count(),
            created_at: timestamp(channel.created_at()),
        }
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T09:30:00.123Z`.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// A channel id from the path. Text that cannot be an id is a 404, like
/// an id that is not (or no longer) there.
pub struct ChannelPath(pub ChannelId);

impl<S: Send + Sync> FromRequestParts<S> for ChannelPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await?;
        ChannelId::parse(&raw)
            .map(ChannelPath)
            .ok_or_else(|| ApiError::channel_not_found(&raw))
    }
}

/// `GET /channels`
pub async fn list(State(app): State<AppState>) -> impl IntoResponse {
    let channels: Vec<_> = app
        .relay
        .channels()
        .iter()
        .map(|c| ChannelView::of(c))
        .collect();
    ok(format!("{} channel(s)", channels.len()), channels)
}

/// `POST /channels`
pub async fn create(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = parse_spec(&body?)?;
    let channel = app.relay.create_channel(spec)?;
    #[derive(Serialize)]
    struct Created<'a> {
        message: String,
        token: &'a str,
        data: ChannelView,
    }
    let location = format!("/channels/{}", channel.id());
    let body = Created {
        message: format!("channel {} created", channel.id()),
        token: channel.token().reveal(),
        data: ChannelView::of(&channel),
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

/// `GET /channels/{id}`
pub async fn show(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    let channel = app
        .relay
        .channel(&id)
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    Ok(ok(format!("channel {id}"), ChannelView::of(&channel)))
}

/// `DELETE /channels/{id}`: its clients are closed with 4001.
pub async fn remove(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    let channel = app
        .relay
        .delete_channel(&id)
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    Ok(ok(
        format!("channel {id} deleted"),
        ChannelView::of(&channel),
    ))
}

/// `GET /channels/{id}/clients`
pub async fn clients(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct ClientView {
        id: ClientId,
        connected_at: String,
    }
    let channel = app
        .relay
        .channel(&id)
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    let clients: Vec<_> = channel
        .clients()
        .into_iter()
        .map(|(id, at)| ClientView {
            id,
            connected_at: timestamp(at),
        })
        .collect();
    Ok(ok(
        format!("{} client(s) connected to channel {id}", clients.len()),
        clients,
    ))
}

/// `DELETE /reset`: deletes every channel.
pub async fn reset(State(app): State<AppState>) -> impl IntoResponse {
    #[derive(Serialize)]
    struct Deleted {
        deleted: usize,
    }
    let deleted = app.relay.reset();
    ok(format!("{deleted} channel(s) deleted"), Deleted { deleted })
}

/// Validates a create body: a JSON object with exactly the known fields,
/// each of the right type and range. An empty body is an empty object.
///
/// # Errors
///
/// 400 naming the field: `invalid_json`, `invalid_body`, `unknown_field`,
/// `missing_field` or `invalid_field`.
pub fn parse_spec(body: &[u8]) -> Result<ChannelSpec, ApiError> {
    let fields = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    r#"the body must be a JSON object, e.g. {"pattern":"pub-sub"}"#,
                ));
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the body is not valid JSON: {e}"),
                ));
            }
        }
    };
    if let Some(unknown) = fields.keys().find(|key| !FIELDS.contains(&key.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_field",
            format!(
                "unknown field {unknown:?}; the fields are pattern, clientLimit, timeout and welcome"
            ),
        ));
    }
    let pattern = match fields.get("pattern") {
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_field",
                format!(r#"field "pattern" is required: one of {PATTERN_NAMES}"#),
            ));
        }
        Some(Value::String(name)) => Pattern::parse(name),
        Some(_) => None,
    }
    .ok_or_else(|| {
        ApiError::invalid_field("pattern", &format!("must be one of {PATTERN_NAMES}"))
    })?;
    let client_limit = match fields.get("clientLimit") {
        None => None,
        Some(value) => {
            limit(value, "clientLimit", MAX_CLIENT_LIMIT, "unlimited")?.map(|n| n as u32)
        }
    };
    let timeout = match fields.get("timeout") {
        None => Some(DEFAULT_TIMEOUT_MS),
        Some(value) => limit(value, "timeout", MAX_TIMEOUT_MS, "never")?,
    }
    .map(Duration::from_millis);
    let welcome = match fields.get("welcome") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid_field("welcome", "must be true or false")),
    };
    Ok(ChannelSpec {
        pattern,
        client_limit,
        timeout,
        welcome,
    })
}

/// A numeric limit: -1 (none) or an integer from 1 to `max`.
fn limit(value: &Value, field: &str, max: u64, none: &str) -> Result<Option<u64>, ApiError> {
    match value.as_i64() {
        Some(-1) => Ok(None),
        Some(n) if n >= 1 && n as u64 <= max => Ok(Some(n as u64)),
        _ => Err(ApiError::invalid_field(
            field,
            &format!("must be -1 ({none}) or an integer from 1 to {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: &str) -> (StatusCode, &'static str) {
        let error = parse_spec(body.as_bytes()).expect_err(body);
        (error.status(), error.code())
    }

    #[test]
    fn accepts_minimal_and_full_bodies() {
        let spec = parse_spec(br#"{"pattern":"pub-sub"}"#).unwrap();
        assert_eq!(spec.pattern, Pattern::PubSub);
        assert_eq!(spec.client_limit, None);
        assert_eq!(
            spec.timeout,
            Some(Duration::from_millis(DEFAULT_TIMEOUT_MS))
        );
        assert!(!spec.welcome);
        let spec =
            parse_spec(br#"{"pattern":"fan-in-out","clientLimit":5,"timeout":-1,"welcome":true}"#)
                .unwrap();
        assert_eq!(
            (spec.pattern, spec.client_limit, spec.timeout, spec.welcome),
            (Pattern::FanInOut, Some(5), None, true)
        );
        let spec = parse_spec(br#"{"pattern":"echo","clientLimit":-1,"timeout":1}"#).unwrap();
        assert_eq!(
            (spec.client_limit, spec.timeout),
            (None, Some(Duration::from_millis(1)))
        );
    }

    #[test]
    fn rejects_every_kind_of_bad_body() {
        let bad = StatusCode::BAD_REQUEST;
        for (body, code) in [
            ("", "missing_field"),
            ("{}", "missing_field"),
            ("{", "invalid_json"),
            ("nonsense", "invalid_json"),
            ("[]", "invalid_body"),
            ("\"pub-sub\"", "invalid_body"),
            ("null", "invalid_body"),
            (r#"{"pattern":"pub-sub","extra":1}"#, "unknown_field"),
            (r#"{"pattern":"pub-sub","token":"x"}"#, "unknown_field"),
            (r#"{"pattern":"broadcast"}"#, "invalid_field"),
            (r#"{"pattern":5}"#, "invalid_field"),
            (r#"{"pattern":null}"#, "invalid_field"),
            (r#"{"pattern":"pub-sub","clientLimit":0}"#, "invalid_field"),
            (r#"{"pattern":"pub-sub","clientLimit":-2}"#, "invalid_field"),
            (
                r#"{"pattern":"pub-sub","clientLimit":1000001}"#,
                "invalid_field",
            ),
            (
                r#"{"pattern":"pub-sub","clientLimit":2.5}"#,
                "invalid_field",
            ),
            (
                r#"{"pattern":"pub-sub","clientLimit":"3"}"#,
                "invalid_field",
            ),
            (
                r#"{"pattern":"pub-sub","clientLimit":null}"#,
                "invalid_field",
            ),
            (
                r#"{"pattern":"pub-sub","clientLimit":1e400}"#,
                "invalid_json",
            ),
            (r#"{"pattern":"pub-sub","timeout":0}"#, "invalid_field"),
            (
                r#"{"pattern":"pub-sub","timeout":2592000001}"#,
                "invalid_field",
            ),
            (r#"{"pattern":"pub-sub","timeout":true}"#, "invalid_field"),
            (
                r#"{"pattern":"pub-sub","timeout":18446744073709551616}"#,
                "invalid_field",
            ),
            (r#"{"pattern":"pub-sub","welcome":"yes"}"#, "invalid_field"),
        ] {
            assert_eq!(error_of(body), (bad, code), "{body}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        for (body, field) in [
            (
                r#"{"pattern":"pub-sub","clientLimit":0}"#,
                "\"clientLimit\"",
            ),
            (r#"{"pattern":"pub-sub","timeout":0}"#, "\"timeout\""),
            (r#"{"pattern":"x"}"#, "\"pattern\""),
            (r#"{}"#, "\"pattern\""),
            (r#"{"pattern":"echo","welcome":1}"#, "\"welcome\""),
            (r#"{"pattern":"echo","nope":1}"#, "\"nope\""),
        ] {
            let error = parse_spec(body.as_bytes()).unwrap_err();
            assert!(
                error.message().contains(field),
                "{body}: {}",
                error.message()
            );
        }
    }
}
