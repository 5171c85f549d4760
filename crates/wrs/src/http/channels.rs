//! `/channels` (alias `/channel`) and `/reset`: creating, listing,
//! inspecting and deleting channels.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::relay::Relay;
use crate::relay::channel::{Channel, ChannelSpec};
use crate::relay::client::Transport;
use crate::relay::history::{self, HistorySpec};
use crate::relay::ids::{ChannelId, ClientId};
use crate::relay::pattern::Pattern;

/// Largest `clientLimit` accepted.
pub const MAX_CLIENT_LIMIT: u64 = 1_000_000;
/// Largest `timeout` accepted, in ms (30 days).
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// `timeout` when none is given, in ms (24 hours).
pub const DEFAULT_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// The fields `POST /channels` accepts (`auth` carries the API token).
const FIELDS: [&str; 6] = [
    "pattern",
    "clientLimit",
    "timeout",
    "welcome",
    "history",
    "auth",
];
const PATTERN_NAMES: &str = "echo, pub-sub, push-pull, req-repl, fan-in-out";

/// The success envelope: `{"message": ..., "data": ...}`.
#[derive(Serialize, ToSchema)]
pub struct Envelope<T> {
    /// What happened, for humans.
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
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelView {
    #[schema(example = "D679-05F5")]
    id: String,
    pattern: Pattern,
    /// Inactivity timeout in ms, -1 = never.
    timeout: i64,
    /// Ms until the timeout fires, -1 = never.
    countdown: i64,
    /// Most clients, -1 = unlimited.
    client_limit: i64,
    /// Clients connected now.
    clients: usize,
    /// RFC 3339, UTC.
    #[schema(example = "2026-11-22T09:30:00.123Z")]
    created_at: String,
    /// The history it keeps (pub-sub channels created with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<HistoryView>,
}

/// How much history a channel is to keep.
#[derive(ToSchema)]
#[allow(dead_code)] // Read by the OpenAPI generator; validated by `history_spec`.
pub struct CreateHistory {
    /// Most messages kept, 1 to 10000.
    #[schema(minimum = 1, maximum = 10000)]
    size: u32,
    /// How long a message is kept in ms, 1 to 86400000; default 86400000.
    #[schema(minimum = 1, maximum = 86400000)]
    ttl: Option<u64>,
}

/// How much history a channel keeps.
#[derive(Serialize, ToSchema)]
pub struct HistoryView {
    /// Most messages kept.
    size: u32,
    /// How long a message is kept, in ms.
    ttl: u64,
}

/// The create response: the only place the token is ever shown.
#[derive(Serialize, ToSchema)]
pub struct Created {
    message: String,
    /// The secret clients need to connect.
    #[schema(example = "q3M9vR1xT0bLk2Ze")]
    token: String,
    data: ChannelView,
}

/// The body of `POST /channels`.
#[derive(ToSchema)]
#[schema(example = json!({"pattern": "pub-sub", "clientLimit": -1, "timeout": 86400000, "welcome": false}))]
#[allow(dead_code)] // Read by the OpenAPI generator; bodies are validated by `spec_from_fields`.
pub struct CreateChannel {
    pattern: Pattern,
    /// Most simultaneous clients: -1 (unlimited, default) or 1 to 1000000.
    #[schema(rename = "clientLimit", minimum = -1, maximum = 1000000)]
    client_limit: Option<i64>,
    /// Inactivity timeout in ms: -1 (never) or 1 to 2592000000; default 86400000.
    #[schema(minimum = -1, maximum = 2592000000i64)]
    timeout: Option<i64>,
    /// Send each client a `{"type":"hello"}` frame with its id on connect.
    welcome: Option<bool>,
    /// Keep the last `size` messages (1 to 10000) younger than `ttl` ms (1
    /// to 86400000, default 86400000) for reading and resuming; pub-sub only.
    #[schema(example = json!({"size": 100, "ttl": 60000}))]
    history: Option<CreateHistory>,
    /// The API token, when `WRS_AUTH` protects this route (instead of the header).
    auth: Option<String>,
}

/// A connected client.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientView {
    #[schema(value_type = String, example = "3F2A-91C0-7B44")]
    id: ClientId,
    /// The node it is connected to (in a cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[schema(example = "2026-11-22T09:31:00.004Z")]
    connected_at: String,
    /// `websocket`, or `sse` for a Server-Sent Events client.
    transport: Transport,
}

/// The result of `DELETE /reset`.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    /// How many channels were deleted.
    deleted: usize,
}

impl ChannelView {
    /// The view of a channel; `clients` counts the whole cluster.
    pub fn of(relay: &Relay, channel: &Channel) -> Self {
        let spec = channel.spec();
        Self {
            id: channel.id().to_string(),
            pattern: spec.pattern,
            timeout: spec.timeout.map_or(-1, |t| t.as_millis() as i64),
            countdown: channel.countdown_ms().map_or(-1, |c| c as i64),
            client_limit: spec.client_limit.map_or(-1, i64::from),
            clients: relay.client_count(channel),
            created_at: timestamp(channel.created_at()),
            history: spec.history.map(|h| HistoryView {
                size: h.size,
                ttl: h.ttl.as_millis() as u64,
            }),
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
#[utoipa::path(get, path = "/channels", tag = "channels", summary = "List all channels, oldest first",
    responses((status = 200, body = Envelope<Vec<ChannelView>>)))]
pub async fn list(State(app): State<AppState>) -> impl IntoResponse {
    let channels: Vec<_> = app
        .relay
        .channels()
        .iter()
        .map(|c| ChannelView::of(&app.relay, c))
        .collect();
    ok(format!("{} channel(s)", channels.len()), channels)
}

/// `POST /channels`
#[utoipa::path(post, path = "/channels", tag = "channels", summary = "Create a channel",
    description = "The response is the only place the channel's token is ever shown. Unknown fields, wrong types and out-of-range values get 400 naming the field.",
    request_body(content = CreateChannel, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; `Location` names the channel", body = Created),
        (status = 400, description = "Bad body, naming the field", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 429, description = "This node holds WRS_MAX_CHANNELS channels", body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = spec_from_fields(&parse_body(&body?)?)?;
    created(&app, spec).await
}

/// Creates the channel and answers 201 with its token.
async fn created(app: &AppState, spec: ChannelSpec) -> Result<Response, ApiError> {
    let (channel, token) = app.relay.create_channel(spec).await?;
    let location = format!("/channels/{}", channel.id());
    let body = Created {
        message: format!("channel {} created", channel.id()),
        token: token.reveal().to_owned(),
        data: ChannelView::of(&app.relay, &channel),
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

/// `GET /channels/{id}`
#[utoipa::path(get, path = "/channels/{id}", tag = "channels", summary = "Show one channel",
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, body = Envelope<ChannelView>), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    let channel = app
        .relay
        .lookup(&id)
        .await?
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    Ok(ok(
        format!("channel {id}"),
        ChannelView::of(&app.relay, &channel),
    ))
}

/// `DELETE /channels/{id}`: its clients are closed with 4001.
#[utoipa::path(delete, path = "/channels/{id}", tag = "channels", summary = "Delete a channel",
    description = "Its clients are closed with code 4001 `channel deleted`.",
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, body = Envelope<ChannelView>), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    deleted(&app, &id).await
}

async fn deleted(app: &AppState, id: &ChannelId) -> Result<Json<Envelope<ChannelView>>, ApiError> {
    let channel = app
        .relay
        .delete_channel(id)
        .await?
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    Ok(ok(
        format!("channel {id} deleted"),
        ChannelView::of(&app.relay, &channel),
    ))
}

/// `GET /channels/{id}/clients`
#[utoipa::path(get, path = "/channels/{id}/clients", tag = "channels", summary = "List a channel's clients",
    description = "The connected clients' ids, in join order.",
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, body = Envelope<Vec<ClientView>>), (status = 404, body = ErrorBody)))]
pub async fn clients(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    let channel = app
        .relay
        .lookup(&id)
        .await?
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    let clients: Vec<_> = app
        .relay
        .clients(&channel)
        .into_iter()
        .map(|listed| ClientView {
            id: listed.id,
            node: listed.node,
            connected_at: timestamp(listed.connected_at),
            transport: listed.transport,
        })
        .collect();
    Ok(ok(
        format!("{} client(s) connected to channel {id}", clients.len()),
        clients,
    ))
}

/// `DELETE /reset`: deletes every channel.
#[utoipa::path(delete, path = "/reset", tag = "service", summary = "Delete all channels",
    responses((status = 200, body = Envelope<Deleted>)))]
pub async fn reset(State(app): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let deleted = app.relay.reset().await?;
    Ok(ok(
        format!("{deleted} channel(s) deleted"),
        Deleted { deleted },
    ))
}

/// `GET /channels/create?pattern=...` (browser-only mode)
#[utoipa::path(get, path = "/channels/create", tag = "browser-only", summary = "Create a channel with GET",
    description = "Only with WRS_BROWSER_ONLY=true. Same fields and validation as POST /channels, as query parameters.",
    params(
        ("pattern" = Pattern, Query, description = "The messaging pattern"),
        ("clientLimit" = Option<i64>, Query, description = "-1 (unlimited) or 1 to 1000000"),
        ("timeout" = Option<i64>, Query, description = "Inactivity timeout in ms: -1 (never) or 1 to 2592000000"),
        ("welcome" = Option<bool>, Query, description = "true sends each client a hello frame")),
    responses((status = 201, body = Created), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create_via_get(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let spec = spec_from_fields(&query_fields(query.as_deref().unwrap_or(""))?)?;
    created(&app, spec).await
}

/// `GET /channels/{id}/delete` (browser-only mode)
#[utoipa::path(get, path = "/channels/{id}/delete", tag = "browser-only", summary = "Delete a channel with GET",
    description = "Only with WRS_BROWSER_ONLY=true. Same as DELETE /channels/{id}.",
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, body = Envelope<ChannelView>), (status = 404, body = ErrorBody)))]
pub async fn delete_via_get(
    State(app): State<AppState>,
    ChannelPath(id): ChannelPath,
) -> Result<impl IntoResponse, ApiError> {
    deleted(&app, &id).await
}

/// Turns a query string into create fields: numbers and booleans where
/// the text is one, strings otherwise, so that validation and its messages
/// are exactly those of the JSON body.
fn query_fields(query: &str) -> Result<Map<String, Value>, ApiError> {
    let mut fields = Map::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = match key.as_ref() {
            "clientLimit" | "timeout" => value
                .parse::<i64>()
                .map_or_else(|_| Value::String(value.to_string()), Value::from),
            "welcome" => match value.as_ref() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => Value::String(value.to_string()),
            },
            _ => Value::String(value.to_string()),
        };
        if fields.insert(key.to_string(), value).is_some() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "duplicate_field",
                format!("field {key:?} is given more than once"),
            ));
        }
    }
    Ok(fields)
}

/// Parses a create body: a JSON object (an empty body is an empty object).
///
/// # Errors
///
/// 400 `invalid_json` or `invalid_body`.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            r#"the body must be a JSON object, e.g. {"pattern":"pub-sub"}"#,
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// Validates create fields: exactly the known fields, each of the right
/// type and range. `auth` is the API token and ignored here.
///
/// # Errors
///
/// 400 naming the field: `unknown_field`, `missing_field` or `invalid_field`.
pub fn spec_from_fields(fields: &Map<String, Value>) -> Result<ChannelSpec, ApiError> {
    if let Some(unknown) = fields.keys().find(|key| !FIELDS.contains(&key.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_field",
            format!(
                "unknown field {unknown:?}; the fields are pattern, clientLimit, timeout, welcome and history"
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
    let history = fields
        .get("history")
        .map(|value| history_spec(value, pattern))
        .transpose()?;
    Ok(ChannelSpec {
        pattern,
        client_limit,
        timeout,
        welcome,
        history,
    })
}

/// `"history": {"size": N, "ttl": MS}` of a `pub-sub` channel.
fn history_spec(value: &Value, pattern: Pattern) -> Result<HistorySpec, ApiError> {
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid_field(
            "history",
            r#"must be an object such as {"size": 100, "ttl": 60000}"#,
        ));
    };
    if pattern != Pattern::PubSub {
        return Err(ApiError::invalid_field(
            "history",
            "is kept only by pub-sub channels",
        ));
    }
    if let Some(unknown) = fields
        .keys()
        .find(|key| !["size", "ttl"].contains(&key.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_field",
            format!("unknown field \"history.{unknown}\"; the fields are size and ttl"),
        ));
    }
    let max_ttl = history::MAX_TTL.as_millis() as u64;
    let size = match fields.get("size") {
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_field",
                r#"field "history.size" is required"#,
            ));
        }
        Some(value) => value
            .as_u64()
            .filter(|n| (1..=u64::from(history::MAX_SIZE)).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "history.size",
                    &format!("must be an integer from 1 to {}", history::MAX_SIZE),
                )
            })?,
    };
    let ttl = match fields.get("ttl") {
        None => max_ttl,
        Some(value) => value
            .as_u64()
            .filter(|n| (1..=max_ttl).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "history.ttl",
                    &format!("must be an integer from 1 to {max_ttl} (ms)"),
                )
            })?,
    };
    Ok(HistorySpec {
        size: size as u32,
        ttl: Duration::from_millis(ttl),
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

    fn parse_spec(body: &[u8]) -> Result<ChannelSpec, ApiError> {
        spec_from_fields(&parse_body(body)?)
    }

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
    fn query_strings_validate_like_bodies() {
        let spec = spec_from_fields(
            &query_fields("pattern=push-pull&clientLimit=3&timeout=-1&welcome=true&auth=x")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (spec.pattern, spec.client_limit, spec.timeout, spec.welcome),
            (Pattern::PushPull, Some(3), None, true)
        );
        for (query, code) in [
            ("", "missing_field"),
            ("pattern=nope", "invalid_field"),
            ("pattern=echo&clientLimit=many", "invalid_field"),
            ("pattern=echo&clientLimit=0", "invalid_field"),
            ("pattern=echo&timeout=1.5", "invalid_field"),
            ("pattern=echo&welcome=yes", "invalid_field"),
            ("pattern=echo&color=red", "unknown_field"),
        ] {
            let error = query_fields(query)
                .and_then(|f| spec_from_fields(&f))
                .unwrap_err();
            assert_eq!(error.code(), code, "{query}");
        }
        assert_eq!(
            query_fields("pattern=echo&pattern=pub-sub")
                .unwrap_err()
                .code(),
            "duplicate_field"
        );
    }

    #[test]
    fn the_auth_field_is_reserved_for_the_api_token() {
        assert!(parse_spec(br#"{"pattern":"echo","auth":"token"}"#).is_ok());
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
