//! Service-level resources: `/service`, `/cluster`, `/healthz`, `/readyz`.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::channels::{Envelope, ok, timestamp};
use super::error::{ApiError, ErrorBody, MAX_BODY_BYTES};
use crate::cluster::records::from_epoch_ms;
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
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterInfo>,
    limits: Limits,
    stats: StatsView,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Features {
    cluster: bool,
    auth: bool,
    tls: bool,
    public_tls: bool,
    browser_only: bool,
}

/// Cluster details (cluster mode only).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ClusterInfo {
    /// Subject and bucket prefix (`WRS_CLUSTER`).
    prefix: String,
    nats_connected: bool,
    /// Live nodes, this one included.
    nodes: usize,
    messages_published: u64,
    messages_received: u64,
    messages_dropped: u64,
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
    } else if relay.is_ready() {
        "ready"
    } else {
        "disconnected"
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
            mode: if relay.cluster().is_some() {
                "cluster"
            } else {
                "standalone"
            },
            state: state_of(relay),
            started_at: timestamp(relay.started_at()),
            uptime_ms: relay.uptime().as_millis() as u64,
            channels: relay.channel_count(),
            clients: relay.metrics().totals().connections_open,
            patterns: Pattern::ALL.to_vec(),
            features: Features {
                cluster: relay.cluster().is_some(),
                auth: app.config.auth,
                tls: app.config.ssl,
                public_tls: app.config.public_tls(),
                browser_only: app.config.browser_only,
            },
            cluster: relay.cluster().map(|cluster| ClusterInfo {
                prefix: cluster.prefix().to_owned(),
                nats_connected: cluster.is_connected(),
                nodes: cluster.live_nodes().len(),
                messages_published: relay.metrics().cluster.published.get(),
                messages_received: relay.metrics().cluster.received.get(),
                messages_dropped: relay.metrics().cluster.dropped.get(),
            }),
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
    /// `ready` or `draining` (`disconnected`: this node lost NATS).
    state: String,
    started_at: String,
    uptime_ms: u64,
    /// Channels with clients on this node.
    channels: u64,
    /// Clients connected to this node.
    clients: u64,
    /// Messages received from this node's clients per second (cluster mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    messages_per_second: Option<u64>,
    /// Whether this is the node that answered.
    this_node: bool,
}

/// `GET /cluster`: the nodes with their state and load. A standalone node
/// is a cluster of one.
#[utoipa::path(get, path = "/cluster", tag = "service", summary = "Nodes of the cluster",
    description = "Each live node with its state and load. A standalone node lists itself. Nodes that stop leave at once; nodes that die disappear after three missed heartbeats.",
    responses((status = 200, body = Envelope<Vec<NodeView>>)))]
pub async fn cluster(State(app): State<AppState>) -> impl IntoResponse {
    let relay = &app.relay;
    let Some(cluster) = relay.cluster() else {
        let node = NodeView {
            id: relay.settings().node_id.clone(),
            address: format!("{}:{}", app.config.domain, app.config.public_port()),
            state: state_of(relay).to_owned(),
            started_at: timestamp(relay.started_at()),
            uptime_ms: relay.uptime().as_millis() as u64,
            channels: relay.channel_count() as u64,
            clients: relay.metrics().totals().connections_open,
            messages_per_second: None,
            this_node: true,
        };
        return ok("1 node (standalone)", vec![node]);
    };
    let now = std::time::SystemTime::now();
    let nodes: Vec<NodeView> = cluster
        .live_nodes()
        .into_iter()
        .map(|seen| {
            let record = seen.record;
            let started = from_epoch_ms(record.started_at_ms);
            let this_node = record.id == cluster.node();
            NodeView {
                state: if this_node {
                    state_of(relay).to_owned()
                } else {
                    record.state
                },
                started_at: timestamp(started),
                uptime_ms: now
                    .duration_since(started)
                    .map_or(0, |d| d.as_millis() as u64),
                channels: record.channels,
                clients: record.clients,
                messages_per_second: Some(record.messages_per_second),
                id: record.id,
                address: record.address,
                this_node,
            }
        })
        .collect();
    ok(format!("{} node(s)", nodes.len()), nodes)
}

/// The result of `DELETE /cluster/{nodeId}`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evicted {
    /// The node's clients removed from channel rosters.
    removed_clients: usize,
}

/// `DELETE /cluster/{nodeId}`: evicts a dead node's registrations.
#[utoipa::path(delete, path = "/cluster/{nodeId}", tag = "service", summary = "Evict a node",
    description = "Removes a dead node's heartbeat and its clients from every channel roster at once, instead of waiting for its heartbeat to expire. A node that is in fact alive announces itself again and restores its clients within a heartbeat. In standalone mode there are no other nodes: 404.",
    params(("nodeId" = String, Path, description = "Node id")),
    responses((status = 200, body = Envelope<Evicted>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn evict(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let unknown = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "node_not_found",
            format!("no node {node:?} in this cluster"),
        )
    };
    let Some(cluster) = app.relay.cluster() else {
        return Err(unknown());
    };
    if node == cluster.node() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cannot_evict_self",
            "a node cannot evict itself; stop it (it leaves the cluster gracefully) or ask another node",
        ));
    }
    let listed = cluster.live_nodes().iter().any(|n| n.record.id == node)
        || cluster.rostered_nodes().contains(&node);
    if !listed {
        return Err(unknown());
    }
    let removed_clients = cluster.remove_node_members(&node).await?;
    cluster.delete_node(&node).await?;
    tracing::warn!(%node, removed_clients, "node evicted");
    Ok(ok(
        format!("node {node} evicted"),
        Evicted { removed_clients },
    ))
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
    description = "503 while the node drains (shutting down), or in a cluster while it cannot reach NATS.",
    responses((status = 200, body = Envelope<Status>), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(app): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if app.relay.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining and accepts no new connections",
        ));
    }
    if !app.relay.is_ready() {
        return Err(ApiError::cluster_unavailable());
    }
    Ok(ok("ready", Status { status: "ready" }))
}

/// `GET /metrics`: Prometheus text (OpenMetrics).
#[utoipa::path(get, path = "/metrics", tag = "service", summary = "Prometheus metrics",
    description = "Connections and channels open, messages and bytes in and out by pattern, dropped deliveries, slow-consumer closes, connect rejections by reason, HTTP requests by route and status with latency histograms.",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let metrics = app.relay.metrics();
    metrics.channels_open.set(app.relay.channel_count() as i64);
    if let Some(cluster) = app.relay.cluster() {
        metrics
            .cluster
            .connected
            .set(i64::from(cluster.is_connected()));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.relay.metrics().encode(),
    )
}
