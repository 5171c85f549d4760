//! Service-level resources: `/service`, `/cluster`, `/healthz`, `/readyz`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::channels::{Envelope, ok, timestamp};
use super::error::{ApiError, ErrorBody, MAX_BODY_BYTES};
use crate::metrics::Totals;
use crate::relay::Relay;
use crate::relay::pattern::Pattern;

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ServiceView {
    name: &'static str,
    version: &'static str,
    node_id: String,
    mode: &'static str,
    state: &'static str,
    started_at: String,
    uptime_ms: u64,
    channels: usize,
    clients: u64,
    patterns: Vec<Pattern>,
    features: Features,
    limits: Limits,
    stats: StatsView,
}

#[derive(Serialize, ToSchema)]
struct Features {
    cluster: bool,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Limits {
    max_message_bytes: usize,
    max_body_bytes: usize,
    max_channels: usize,
    token_length: usize,
    id_bytes: usize,
    client_queue_messages: usize,
    client_queue_bytes: usize,
    slow_consumer_policy: &'static str,
    ping_interval_ms: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct StatsView {
    messages_in: u64,
    bytes_in: u64,
    deliveries: u64,
    bytes_out: u64,
    dropped_deliveries: u64,
    slow_consumer_closes: u64,
    frame_errors: u64,
    connections_accepted: u64,
    connections_rejected: u64,
}

impl StatsView {
    fn of(t: Totals) -> Self {
        Self {
            messages_in: t.messages_in,
            bytes_in: t.bytes_in,
            deliveries: t.deliveries,
            bytes_out: t.bytes_out,
            dropped_deliveries: t.dropped,
            slow_consumer_closes: t.slow_consumer_closes,
            frame_errors: t.frame_errors,
            connections_accepted: t.connections_accepted,
            connections_rejected: t.connections_rejected,
        }
    }
}

fn state_of(relay: &Relay) -> &'static str {
    if relay.is_draining() {
        "draining"
    } else {
        "ready"
    }
}

/// `GET /service`: metadata, limits and counters; never secrets.
#[utoipa::path(get, path = "/service", tag = "service", summary = "Service metadata",
    description = "Name, version, node id, uptime, channel and client counts, enabled features, limits and counters. Never secrets.",
    responses((status = 200, body = Envelope<ServiceView>)))]
pub async fn service(State(app): State<AppState>) -> impl IntoResponse {
    let relay = &app.relay;
    let settings = relay.settings();
    ok(
        "service metadata",
        ServiceView {
            name: "wrs",
            version: env!("CARGO_PKG_VERSION"),
            node_id: settings.node_id.clone(),
            mode: "standalone",
            state: state_of(relay),
            started_at: timestamp(relay.started_at()),
            uptime_ms: relay.uptime().as_millis() as u64,
            channels: relay.channel_count(),
            clients: relay.metrics().totals().connections_open,
            patterns: Pattern::ALL.to_vec(),
            features: Features { cluster: false },
            limits: Limits {
                max_message_bytes: settings.max_message_bytes,
                max_body_bytes: MAX_BODY_BYTES,
                max_channels: settings.max_channels,
                token_length: settings.token_length,
                id_bytes: settings.id_bytes,
                client_queue_messages: settings.queue.frames,
                client_queue_bytes: settings.queue.bytes,
                slow_consumer_policy: settings.slow_consumer.as_str(),
                ping_interval_ms: settings.ping_interval.as_millis() as u64,
            },
            stats: StatsView::of(relay.metrics().totals()),
        },
    )
}

/// One node of the cluster.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    id: String,
    /// Host and port clients use.
    address: String,
    /// `ready` or `draining`.
    state: &'static str,
    started_at: String,
    uptime_ms: u64,
    channels: usize,
    clients: u64,
}

/// `GET /cluster`: the nodes with their state and load. A standalone node
/// is a cluster of one.
#[utoipa::path(get, path = "/cluster", tag = "service", summary = "Nodes of the cluster",
    description = "Each node with its state and load. A standalone node lists itself.",
    responses((status = 200, body = Envelope<Vec<NodeView>>)))]
pub async fn cluster(State(app): State<AppState>) -> impl IntoResponse {
    let relay = &app.relay;
    let node = NodeView {
        id: relay.settings().node_id.clone(),
        address: format!("{}:{}", app.config.domain, app.config.public_port()),
        state: state_of(relay),
        started_at: timestamp(relay.started_at()),
        uptime_ms: relay.uptime().as_millis() as u64,
        channels: relay.channel_count(),
        clients: relay.metrics().totals().connections_open,
    };
    ok("1 node (standalone)", vec![node])
}

/// A probe's answer.
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    status: &'static str,
}

/// `GET /healthz`: the process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "service", summary = "Liveness",
    responses((status = 200, body = Envelope<Status>)))]
pub async fn healthz() -> impl IntoResponse {
    ok("alive", Status { status: "ok" })
}

/// `GET /readyz`: 503 while draining.
#[utoipa::path(get, path = "/readyz", tag = "service", summary = "Readiness",
    description = "503 while the node drains (shutting down) and accepts no new connections.",
    responses((status = 200, body = Envelope<Status>), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(app): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if app.relay.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining and accepts no new connections",
        ));
    }
    Ok(ok("ready", Status { status: "ready" }))
}

/// `GET /metrics`: Prometheus text (OpenMetrics).
#[utoipa::path(get, path = "/metrics", tag = "service", summary = "Prometheus metrics",
    description = "Connections and channels open, messages and bytes in and out by pattern, dropped deliveries, slow-consumer closes, connect rejections by reason, HTTP requests by route and status with latency histograms.",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    app.relay
        .metrics()
        .channels_open
        .set(app.relay.channel_count() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.relay.metrics().encode(),
    )
}
