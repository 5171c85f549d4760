//! The HTTP side of a channel (SPEC §10): publishing with one request,
//! reading its history, and Server-Sent Events for receive-only clients.
//! Each takes the channel's token as `?token=` or the `WRS-Token` header.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::channels::{ChannelPath, Envelope, ok, timestamp};
use super::error::{ApiError, ErrorBody, connect_error};
use crate::relay::channel::Channel;
use crate::relay::client::{CloseReason, Wire};
use crate::relay::ids::{ChannelId, ClientId};
use crate::relay::pattern::Pattern;
use crate::relay::{CallError, ConnectError, Message, PublishError};
use crate::sse;

/// The header that may carry the channel's token instead of `?token=`.
pub const TOKEN_HEADER: &str = "wrs-token";
/// `wait` of an HTTP call when none is given, and its largest value (ms).
pub const DEFAULT_WAIT_MS: u64 = 10_000;
pub const MAX_WAIT_MS: u64 = 60_000;
/// `limit` of a history read when none is given.
pub const DEFAULT_LIMIT: u64 = 100;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagesQuery {
    token: Option<String>,
    wait: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    last_event_id: Option<String>,
}

/// What a publish reached.
#[derive(Serialize, ToSchema)]
pub struct Published {
    /// pub-sub: the clients it was delivered to, on every node.
    #[serde(skip_serializing_if = "Option::is_none")]
    receivers: Option<u64>,
    /// push-pull: the client that got it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "3F2A-91C0-7B44")]
    receiver: Option<ClientId>,
    /// Its offset in the channel's history (with history).
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

/// A page of a channel's history.
#[derive(Serialize, ToSchema)]
pub struct HistoryPage {
    /// Names this history: it changes when the history is lost, and
    /// offsets of another epoch mean nothing in this one.
    epoch: String,
    /// Oldest first.
    messages: Vec<KeptMessage>,
}

/// One kept message.
#[derive(Serialize, ToSchema)]
pub struct KeptMessage {
    offset: u64,
    /// When it was published, RFC 3339 UTC.
    at: String,
    binary: bool,
    /// The text, or the binary payload in base64.
    data: String,
}

/// The channel, if the token in the query or the `WRS-Token` header is
/// its token.
async fn authorized(
    app: &AppState,
    id: &ChannelId,
    query: &MessagesQuery,
    headers: &HeaderMap,
) -> Result<std::sync::Arc<Channel>, ApiError> {
    let channel = app
        .relay
        .lookup(id)
        .await?
        .ok_or_else(|| ApiError::channel_not_found(id.as_str()))?;
    let token = token(query, headers).ok_or_else(|| {
        connect_error(ConnectError::MissingToken, id)
            .with_message("this needs the channel's token: ?token=TOKEN or the WRS-Token header")
    })?;
    if !channel.token().matches(token) {
        return Err(connect_error(ConnectError::WrongToken, id));
    }
    Ok(channel)
}

fn token<'a>(query: &'a MessagesQuery, headers: &'a HeaderMap) -> Option<&'a str> {
    query
        .token
        .as_deref()
        .or_else(|| headers.get(TOKEN_HEADER)?.to_str().ok())
}

/// An optional integer query parameter from `min` to `max`.
fn number(value: Option<&str>, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    value
        .map(|text| {
            text.parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_parameter",
                        format!("query parameter {name:?} must be an integer from {min} to {max}"),
                    )
                })
        })
        .transpose()
}

fn query_of(
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> Result<MessagesQuery, ApiError> {
    query.map(|Query(query)| query).map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    })
}

/// `POST /channels/{id}/messages`
#[utoipa::path(post, path = "/channels/{id}/messages", tag = "http", summary = "Publish a message over HTTP",
    description = "The body is one message: `Content-Type: application/octet-stream` sends a binary message, anything else a text message (valid UTF-8). It counts as channel activity when it is relayed (not when answered 409). The publisher is not a client, so every client is one of \"the others\". pub-sub: 202, delivered to every client, `data.receivers` counts them on every node (`data.offset` with history). push-pull: 202, delivered to the next client in the round-robin, `data.receiver` names it; 409 `no_receiver` when none is connected (nothing is kept). req-repl and fan-in-out: the body must be a request (`{\"type\":\"request\",...}`); it is routed as a client's request, with `origin` set to a one-off id, and the first reply to that origin is the 200 response body; 504 `no_reply` after `wait` ms; 409 `no_receiver` when nobody is connected. echo: 200, the body echoed back.",
    params(("id" = String, Path, description = "Channel id"),
        ("token" = Option<String>, Query, description = "The channel's token (or the WRS-Token header)"),
        ("WRS-Token" = Option<String>, Header, description = "The channel's token (instead of ?token=)"),
        ("wait" = Option<u64>, Query, description = "req-repl and fan-in-out: ms to wait for the reply, 1 to 60000, default 10000")),
    request_body(description = "The message: text (valid UTF-8) unless the type is application/octet-stream",
        content((String = "text/plain"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 200, description = "echo: the body, in its Content-Type; req-repl / fan-in-out: the reply object",
            content((Object = "application/json"), (String = "text/plain"), (Vec<u8> = "application/octet-stream"))),
        (status = 202, description = "Delivered (pub-sub, push-pull)", body = Envelope<Published>),
        (status = 400, description = "Invalid UTF-8, not a request (req-repl, fan-in-out), or `wait` out of range", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "`no_receiver`: nobody connected (push-pull, req-repl, fan-in-out)", body = ErrorBody),
        (status = 413, description = "Larger than WRS_MAX_MESSAGE_BYTES", body = ErrorBody),
        (status = 504, description = "`no_reply`: no reply within `wait`", body = ErrorBody)))]
pub async fn publish(
    State(app): State<AppState>,
    path: Result<ChannelPath, ApiError>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let ChannelPath(id) = path?;
    let query = query_of(query)?;
    let channel = authorized(&app, &id, &query, &headers).await?;
    let wait = number(query.wait.as_deref(), "wait", 1, MAX_WAIT_MS)?.unwrap_or(DEFAULT_WAIT_MS);
    let body = read_message(&app, &headers, body).await?;
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/octet-stream"));
    let message = if binary {
        Message::Binary(body)
    } else if std::str::from_utf8(&body).is_ok() {
        Message::Text(body)
    } else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_utf8",
            "a text message must be valid UTF-8; send binary data with Content-Type: application/octet-stream",
        ));
    };
    let relay = &app.relay;
    match channel.pattern() {
        Pattern::Echo => {
            relay
                .publish(&channel, &message)
                .await
                .map_err(publish_error)?;
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("text/plain; charset=utf-8"));
            Ok((
                [(header::CONTENT_TYPE, content_type)],
                message.payload().clone(),
            )
                .into_response())
        }
        Pattern::PubSub => {
            let delivered = relay
                .publish(&channel, &message)
                .await
                .map_err(publish_error)?;
            Ok(accepted(Published {
                receivers: Some(delivered.addressed),
                receiver: None,
                offset: delivered.offset,
            }))
        }
        Pattern::PushPull => {
            let delivered = relay
                .publish(&channel, &message)
                .await
                .map_err(publish_error)?;
            let receiver = delivered.to.ok_or_else(no_receiver)?;
            Ok(accepted(Published {
                receivers: None,
                receiver: Some(receiver),
                offset: None,
            }))
        }
        Pattern::ReqRepl | Pattern::FanInOut => {
            let Message::Text(request) = message else {
                return Err(frame_error(
                    crate::relay::subprotocol::FrameError::BinaryFrame,
                ));
            };
            match relay
                .call(&channel, request, Duration::from_millis(wait))
                .await
            {
                Ok(reply) => Ok((
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    reply,
                )
                    .into_response()),
                Err(CallError::Invalid(error)) => Err(frame_error(error)),
                Err(error @ CallError::NotARequest) => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not_a_request",
                    error.to_string(),
                )),
                Err(CallError::NoReceiver) => Err(no_receiver()),
                Err(CallError::NoReply) => Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "no_reply",
                    format!("no reply arrived within {wait} ms"),
                )),
                Err(CallError::Unavailable(error)) => Err(error.into()),
            }
        }
    }
}

fn accepted(published: Published) -> Response {
    (StatusCode::ACCEPTED, ok("message published", published)).into_response()
}

fn no_receiver() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "no_receiver",
        "no client is connected to receive the message; nothing was kept",
    )
}

fn publish_error(error: PublishError) -> ApiError {
    match error {
        PublishError::Invalid(error) => frame_error(error),
        PublishError::Unavailable(error) => error.into(),
    }
}

fn frame_error(error: crate::relay::subprotocol::FrameError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, error.code(), error.to_string())
}

/// The body, at most `WRS_MAX_MESSAGE_BYTES` (413 beyond).
async fn read_message(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let max = app.relay.settings().max_message_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("a message may have at most {max} bytes (WRS_MAX_MESSAGE_BYTES)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max)
        .await
        .map_err(|_| too_large())
}

/// `GET /channels/{id}/messages`
#[utoipa::path(get, path = "/channels/{id}/messages", tag = "http", summary = "Read a channel's history",
    description = "The kept messages with an offset above `since`, oldest first, at most `limit`. A `since` beyond the newest offset gives an empty list. Only pub-sub channels created with `history` keep messages (409 `no_history` otherwise).",
    params(("id" = String, Path, description = "Channel id"),
        ("token" = Option<String>, Query, description = "The channel's token (or the WRS-Token header)"),
        ("WRS-Token" = Option<String>, Header, description = "The channel's token (instead of ?token=)"),
        ("since" = Option<u64>, Query, description = "Only messages with a higher offset (default 0: all)"),
        ("limit" = Option<u64>, Query, description = "Most messages, 1 to 10000, default 100")),
    responses(
        (status = 200, description = "The messages", body = Envelope<HistoryPage>),
        (status = 400, description = "`since` or `limit` out of range", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "The channel keeps no history", body = ErrorBody)))]
pub async fn history(
    State(app): State<AppState>,
    path: Result<ChannelPath, ApiError>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ChannelPath(id) = path?;
    let query = query_of(query)?;
    let channel = authorized(&app, &id, &query, &headers).await?;
    let since = number(query.since.as_deref(), "since", 0, u64::MAX)?.unwrap_or(0);
    let limit = number(
        query.limit.as_deref(),
        "limit",
        1,
        u64::from(crate::relay::history::MAX_SIZE),
    )?
    .unwrap_or(DEFAULT_LIMIT);
    let Some(slice) = app
        .relay
        .read_history(&channel, since, limit as usize)
        .await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_history",
            format!("channel {id} keeps no history; create it with \"history\": {{\"size\": N}}"),
        ));
    };
    let messages = slice
        .entries
        .iter()
        .map(|entry| KeptMessage {
            offset: entry.offset,
            at: timestamp(entry.at),
            binary: entry.binary,
            data: if entry.binary {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(&entry.payload)
            } else {
                String::from_utf8_lossy(&entry.payload).into_owned()
            },
        })
        .collect::<Vec<_>>();
    let count = messages.len();
    Ok(ok(
        format!("{count} messages"),
        HistoryPage {
            epoch: slice.epoch,
            messages,
        },
    )
    .into_response())
}

/// `GET /channels/{id}/events`
#[utoipa::path(get, path = "/channels/{id}/events", tag = "http", summary = "Receive a channel's messages as Server-Sent Events",
    description = "A receive-only client (`new EventSource(\"/channels/ID/events?token=TOKEN\")`), counted in `clients` and `clientLimit` and listed with `\"transport\": \"sse\"`; on pub-sub and push-pull (where it takes its turn in the rotation). A text message is one `message` event (its lines as `data:` lines), a binary one a `binary` event with base64 data; with history each has `id: <offset>`. The stream starts with a `retry:` line, carries a keepalive comment every WRS_SSE_KEEPALIVE_MS, and ends with a `close` event `{\"code\":4001|4002|1012|1001|1008,\"reason\":...}`. Reconnecting with `Last-Event-ID` (browsers do) or `?lastEventId=` on a channel with history first replays every kept message after that offset, then live ones, nothing lost or repeated; if the offset is older than what is kept the first event is `reset` `{\"reason\":\"history_expired\",\"oldest\":K}`. Refusals are those of a WebSocket connect, before the stream starts.",
    params(("id" = String, Path, description = "Channel id"),
        ("token" = Option<String>, Query, description = "The channel's token (or the WRS-Token header)"),
        ("WRS-Token" = Option<String>, Header, description = "The channel's token (instead of ?token=)"),
        ("lastEventId" = Option<u64>, Query, description = "Resume after this offset (as the Last-Event-ID header does)"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this offset (a browser's EventSource sends it when it reconnects)")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream"),
        (status = 400, description = "`lastEventId` is not an offset", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "Channel full, or `pattern_not_supported` (echo, req-repl, fan-in-out)", body = ErrorBody),
        (status = 503, description = "Node draining or at its limits; Retry-After says when to try again", body = ErrorBody)))]
pub async fn events(
    State(app): State<AppState>,
    path: Result<ChannelPath, ApiError>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ChannelPath(id) = path?;
    let query = query_of(query)?;
    let result = subscribe(&app, &id, &query, &headers).await;
    match &result {
        Ok(_) => {
            app.relay.metrics().connections_accepted.inc();
        }
        Err(error) => {
            app.relay.metrics().connect_rejected(error.code());
            tracing::info!(channel = %id, status = error.status().as_u16(), reason = error.code(), "event stream rejected");
        }
    }
    result
}

async fn subscribe(
    app: &AppState,
    id: &ChannelId,
    query: &MessagesQuery,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let channel = app
        .relay
        .authorize(id, token(query, headers))
        .await
        .map_err(|e| match e {
            ConnectError::MissingToken => connect_error(e, id).with_message(
                "an event stream needs the channel's token: /channels/{id}/events?token=TOKEN or the WRS-Token header",
            ),
            _ => connect_error(e, id),
        })?;
    if !matches!(channel.pattern(), Pattern::PubSub | Pattern::PushPull) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "pattern_not_supported",
            format!(
                "Server-Sent Events are receive-only: they serve pub-sub and push-pull channels, not {}",
                channel.pattern()
            ),
        ));
    }
    let last_event_id = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().unwrap_or("-")),
        None => query.last_event_id.as_deref(),
    };
    let last = number(last_event_id, "lastEventId", 0, u64::MAX)?;
    let member = app
        .relay
        .reserve(&channel, Wire::Sse)
        .await
        .map_err(|e| connect_error(e, id))?
        .admit()
        .map_err(|reason| match reason {
            CloseReason::ServerShutdown => connect_error(ConnectError::Draining, id),
            _ => connect_error(ConnectError::NotFound, id),
        })?;
    // Joined first, then read: a message is kept before this read or
    // delivered to the member after it; copies of both are skipped.
    let mut first = bytes::BytesMut::from(&sse::retry()[..]);
    let mut skip_through = 0;
    let kept = match last {
        Some(last) => app.relay.read_history(&channel, last, usize::MAX).await?,
        None => None,
    };
    if let Some(slice) = kept {
        if slice.expired {
            first.extend_from_slice(&sse::reset(slice.oldest));
        }
        for entry in &slice.entries {
            first.extend_from_slice(&sse::entry(entry));
        }
        skip_through = slice.newest;
    }
    let keepalive = Duration::from_millis(app.config.sse_keepalive_ms);
    let events = sse::Events::new(member, first.freeze(), skip_through, keepalive);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(events.stream()),
    )
        .into_response())
}
