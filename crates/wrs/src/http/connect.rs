//! `GET /channels/{id}/connect?token=T`: the WebSocket upgrade into a
//! channel. Every refusal happens before the upgrade, with a JSON body,
//! and is logged with its reason; browsers, which cannot see the status of
//! a refused upgrade, are told in a close frame instead (SPEC §5).

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tracing::{debug, info};

use super::AppState;
use super::channels::ChannelPath;
use super::error::{ApiError, ErrorBody, connect_error};
use crate::relay::ConnectError;
use crate::relay::client::{CloseReason, Wire};
use crate::ws;

#[derive(Deserialize)]
pub struct ConnectQuery {
    token: Option<String>,
}

/// `GET /channels/{id}/connect?token=T`
#[utoipa::path(get, path = "/channels/{id}/connect", tag = "connect", summary = "Connect to a channel over WebSocket",
    description = "A WebSocket upgrade (`new WebSocket(\"ws://host/channels/ID/connect?token=TOKEN\")`). Refusals come before the upgrade, each with a JSON body; 503 carries `Retry-After`. With `WRS_COMPRESSION=on`, a client that offers permessage-deflate (browsers do) gets it, without context takeover either way (RFC 7692). A request with an `Origin` header (a browser, which cannot see a refused upgrade's status) and a valid handshake is instead upgraded and closed at once with 4404, 4401, 4409 or 1013 (for 503), the error code as the close reason. After the upgrade, close codes: 1000 normal, 1001 server shutting down, 1002 protocol error, 1007 invalid UTF-8, 1008 policy (slow consumer, rate limit exceeded), 1009 message too big, 1012 service restart (drain, rebalancing, maximum age: reconnect), 1013 try again later, 4001 channel deleted, 4002 channel timed out.",
    params(("id" = String, Path, description = "Channel id"), ("token" = String, Query, description = "The channel's token")),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket is open"),
        (status = 400, description = "Malformed handshake", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "Channel full (clientLimit)", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade, or not version 13", body = ErrorBody),
        (status = 503, description = "Node draining, at WRS_MAX_CONNECTIONS, over WRS_CONNECT_RATE, or without its cluster store; Retry-After says when to try again", body = ErrorBody)))]
pub async fn connect(
    State(app): State<AppState>,
    path: Result<ChannelPath, ApiError>,
    query: Result<Query<ConnectQuery>, QueryRejection>,
    mut request: Request,
) -> Response {
    let channel = path
        .as_ref()
        .map_or_else(|_| "-".to_owned(), |p| p.0.to_string());
    match upgrade(&app, path, query, &mut request).await {
        Ok(response) => {
            app.relay.metrics().connections_accepted.inc();
            response
        }
        Err(error) => {
            app.relay.metrics().connect_rejected(error.code());
            let peer = request
                .extensions()
                .get::<ConnectInfo<crate::listen::PeerAddr>>()
                .map_or_else(|| "-".to_owned(), |info| info.0.0.to_string());
            info!(
                channel,
                peer,
                status = error.status().as_u16(),
                reason = error.code(),
                "connection rejected"
            );
            refuse_in_band(&app, error, &mut request)
        }
    }
}

/// A refusal as the client can see it. Browsers (requests with `Origin`)
/// cannot read the status of a refused upgrade, so for them a valid
/// handshake is accepted and closed at once with a code mirroring the
/// status and the error code as the reason (SPEC §5); other clients get the
/// status and the JSON body.
fn refuse_in_band(app: &AppState, error: ApiError, request: &mut Request) -> Response {
    let browser = request.headers().contains_key(header::ORIGIN);
    let accept = ws::handshake::accept(request.method(), request.version(), request.headers());
    let (true, Some(code), Ok(accept)) = (browser, error.close_code(), accept) else {
        return error.into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut *request);
    let reason = error.code();
    app.relay.connections().spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            ws::refuse(upgraded, code, reason).await;
        }
    });
    switching_protocols(accept).unwrap_or_else(IntoResponse::into_response)
}

/// The 101 answer to a valid handshake.
fn switching_protocols(accept: String) -> Result<Response, ApiError> {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// Runs the checks in the documented order (draining 503, unknown channel
/// 404, token 401, handshake 426/400, full 409), then answers 101 and
/// hands the connection to its task once hyper has switched protocols.
async fn upgrade(
    app: &AppState,
    path: Result<ChannelPath, ApiError>,
    query: Result<Query<ConnectQuery>, QueryRejection>,
    request: &mut Request,
) -> Result<Response, ApiError> {
    let ChannelPath(id) = path?;
    let Query(query) = query?;
    let channel = app
        .relay
        .authorize(&id, query.token.as_deref())
        .await
        .map_err(|e| connect_error(e, &id))?;
    let accept = ws::handshake::accept(request.method(), request.version(), request.headers())?;
    // permessage-deflate, when offered and compression is on: what the
    // client is told and what its connection does come from one answer.
    let deflate = app.relay.settings().compress_from.and_then(|_| {
        ws::deflate::negotiate(
            request
                .headers()
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .map(|v| v.as_bytes()),
        )
    });
    let reservation = app
        .relay
        .reserve(&channel, Wire::WebSocket { deflate })
        .await
        .map_err(|e| connect_error(e, &id))?;
    let member = reservation.admit().map_err(|reason| match reason {
        CloseReason::ServerShutdown => connect_error(ConnectError::Draining, &id),
        _ => connect_error(ConnectError::NotFound, &id),
    })?;
    let on_upgrade = hyper::upgrade::on(&mut *request);
    app.relay.connections().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => ws::serve(upgraded, member).await,
            // Dropping the member removes the client again.
            Err(error) => debug!(%error, "upgrade did not complete"),
        }
    });
    let mut response = switching_protocols(accept)?;
    if let Some(deflate) = deflate {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, deflate.response());
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;

    use tower_service::Service;

    use super::*;
    use crate::relay::Relay;
    use crate::relay::channel::ChannelSpec;
    use crate::relay::pattern::Pattern;

    /// The handler returns 101 only for a client that is already a member:
    /// this request has no connection behind it, so the upgrade can never
    /// complete and the member must be removed again.
    #[tokio::test]
    async fn a_connect_is_admitted_before_101_and_removed_if_the_upgrade_fails() {
        let config = crate::Config::for_tests();
        let relay = Relay::standalone(config.relay_settings());
        let mut app = super::super::router(AppState {
            relay: Arc::clone(&relay),
            config: Arc::new(config),
            readme: axum::body::Bytes::new(),
        });
        let spec = ChannelSpec {
            pattern: Pattern::PubSub,
            client_limit: None,
            timeout: None,
            welcome: false,
            history: None,
        };
        let (channel, token) = relay.create_channel(spec).await.unwrap();
        let request = axum::http::Request::get(format!(
            "/channels/{}/connect?token={}",
            channel.id(),
            token.reveal()
        ))
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .body(Body::empty())
        .unwrap();
        let response = app.call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(channel.client_count(), 1);
        assert_eq!(relay.metrics().totals().connections_open, 1);
        // The upgrade fails (no connection): the member leaves.
        tokio::time::timeout(Duration::from_secs(10), async {
            while channel.client_count() != 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("member removed after the failed upgrade");
        assert_eq!(relay.metrics().totals().connections_open, 0);
    }
}
