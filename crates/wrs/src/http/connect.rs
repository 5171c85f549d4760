//! `GET /channels/{id}/connect?token=T`: the WebSocket upgrade into a
//! channel. Every refusal happens before the upgrade, with a JSON body,
//! and is logged with its reason.

use std::sync::Arc;

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
use crate::ws;

#[derive(Deserialize)]
pub struct ConnectQuery {
    token: Option<String>,
}

/// `GET /channels/{id}/connect?token=T`
#[utoipa::path(get, path = "/channels/{id}/connect", tag = "connect", summary = "Connect to a channel over WebSocket",
    description = "A WebSocket upgrade (`new WebSocket(\"ws://host/channels/ID/connect?token=TOKEN\")`). Refusals come before the upgrade, each with a JSON body. After the upgrade, close codes: 1000 normal, 1001 server shutting down, 1002 protocol error, 1007 invalid UTF-8, 1008 policy (message too large, slow consumer), 4001 channel deleted, 4002 channel timed out.",
    params(("id" = String, Path, description = "Channel id"), ("token" = String, Query, description = "The channel's token")),
    responses(
        (status = 101, description = "Switching Protocols: the WebSocket is open"),
        (status = 400, description = "Malformed handshake", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown channel", body = ErrorBody),
        (status = 409, description = "Channel full (clientLimit)", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade, or not version 13", body = ErrorBody),
        (status = 503, description = "Node draining", body = ErrorBody)))]
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
                .map(|info| info.0.0);
            info!(
                channel,
                peer = ?peer,
                status = error.status().as_u16(),
                reason = error.code(),
                "connection rejected"
            );
            error.into_response()
        }
    }
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
    let reservation = app
        .relay
        .reserve(&channel)
        .await
        .map_err(|e| connect_error(e, &id))?;
    let on_upgrade = hyper::upgrade::on(&mut *request);
    let relay = Arc::clone(&app.relay);
    app.relay.connections().spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => ws::serve(upgraded, reservation, relay).await,
            Err(error) => debug!(%error, "upgrade did not complete"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}
