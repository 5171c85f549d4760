//! Service-level resources: `/service`, `/cluster`, `/healthz`, `/readyz`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;

use super::AppState;
use super::channels::{ok, timestamp};
use super::error::{ApiError, MAX_BODY_BYTES};
use crate::relay::pattern::Pattern;
use crate::relay::{Relay, Stats};

#[derive(Serialize)]
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

#[derive(Serialize)]
struct Features {
    cluster: bool,
}

#[derive(Serialize)]
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

#[derive(Serialize)]
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
    fn of(stats: &Stats) -> Self {
        Self {
            messages_in: Stats::get(&stats.messages_in),
            bytes_in: Stats::get(&stats.bytes_in),
            deliveries: Stats::get(&stats.deliveries),
            bytes_out: Stats::get(&stats.bytes_out),
            dropped_deliveries: Stats::get(&stats.dropped),
            slow_consumer_closes: Stats::get(&stats.slow_consumer_closes),
            frame_errors: Stats::get(&stats.frame_errors),
            connections_accepted: Stats::get(&stats.connections_accepted),
            connections_rejected: Stats::get(&stats.connections_rejected),
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
            clients: Stats::get(&relay.stats().connections_open),
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
            stats: StatsView::of(relay.stats()),
        },
    )
}

/// `GET /cluster`: the nodes with their state and load. A standalone node
/// is a cluster of one.
pub async fn cluster(State(app): State<AppState>) -> impl IntoResponse {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct NodeView {
        id: String,
        address: String,
        state: &'static str,
        started_at: String,
        uptime_ms: u64,
        channels: usize,
        clients: u64,
    }
    let relay = &app.relay;
    let node = NodeView {
        id: relay.settings().node_id.clone(),
        address: format!("{}:{}", app.config.domain, app.config.public_port()),
        state: state_of(relay),
        started_at: timestamp(relay.started_at()),
        uptime_ms: relay.uptime().as_millis() as u64,
        channels: relay.channel_count(),
        clients: Stats::get(&relay.stats().connections_open),
    };
    ok("1 node (standalone)", vec![node])
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

/// `GET /healthz`: the process is alive and serving HTTP.
pub async fn healthz() -> impl IntoResponse {
    ok("alive", Status { status: "ok" })
}

/// `GET /readyz`: 503 while draining.
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
