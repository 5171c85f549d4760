//! Service-level resources: `/service`, `/cluster`, `/healthz`, `/readyz`.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::channels::{Envelope, ok, timestamp};
use super::error::{ApiError, ErrorBody, MAX_BODY_BYTES};
use crate::metrics::Totals;
use crate::relay::NodeState;
use crate::relay::coordinator::NodeCommand;
use crate::relay::pattern::Pattern;

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ServiceView {
    name: &'static str,
    version: &'static str,
    node_id: String,
    mode: &'static str,
    state: NodeState,
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

/// `GET /service`: metadata, limits and counters; never secrets.
#[utoipa::path(get, path = "/service", tag = "service", summary = "Service metadata",
    description = "Name, version, node id, uptime, channel and client counts, enabled features, limits and counters. Never secrets.",
    responses((status = 200, body = Envelope<ServiceView>)))]
pub async fn service(State(app): State<AppState>) -> impl IntoResponse {
    let relay = &app.relay;
    let settings = relay.settings();
    let summary = relay.coordinator().summary();
    ok(
        "service metadata",
        ServiceView {
            name: "wrs",
            version: env!("CARGO_PKG_VERSION"),
            node_id: settings.node_id.clone(),
            mode: if summary.is_some() {
                "cluster"
            } else {
                "standalone"
            },
            state: relay.state(),
            started_at: timestamp(relay.started_at()),
            uptime_ms: relay.uptime().as_millis() as u64,
            channels: relay.channel_count(),
            clients: relay.metrics().totals().connections_open,
            patterns: Pattern::ALL.to_vec(),
            features: Features {
                cluster: summary.is_some(),
                auth: app.config.auth,
                tls: app.config.ssl,
                public_tls: app.config.public_tls(),
                browser_only: app.config.browser_only,
            },
            cluster: summary.map(|summary| ClusterInfo {
                prefix: summary.prefix,
                nats_connected: summary.connected,
                nodes: summary.nodes,
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
    /// `ready`, `draining` (stopping or evacuated), `shedding` (closing its
    /// excess over the cluster's average), `disconnected` (the node cannot
    /// reach NATS), or `overloaded` (from 90 % of `WRS_MAX_CONNECTIONS`
    /// until below 80 %).
    state: NodeState,
    started_at: String,
    uptime_ms: u64,
    /// Channels with clients on this node.
    channels: u64,
    /// Clients connected to this node.
    clients: u64,
    /// The same as `clients`: WebSocket connections held by the node.
    connections: u64,
    /// The node's `WRS_MAX_CONNECTIONS` (0: a node of an earlier version).
    max_connections: u64,
    /// How attractive the node is to a balancer, 0-100: the share of its
    /// maximum that is free; 0 while it drains, sheds, is overloaded or
    /// is disconnected.
    /// Its HAProxy agent-check answers this weight.
    weight: u8,
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
    let Some(nodes) = relay.coordinator().nodes() else {
        let node = NodeView {
            id: relay.settings().node_id.clone(),
            address: format!("{}:{}", app.config.domain, app.config.public_port()),
            state: relay.state(),
            started_at: timestamp(relay.started_at()),
            uptime_ms: relay.uptime().as_millis() as u64,
            channels: relay.channel_count() as u64,
            clients: relay.capacity().held() as u64,
            connections: relay.capacity().held() as u64,
            max_connections: relay.capacity().max() as u64,
            weight: relay.weight(),
            messages_per_second: None,
            this_node: true,
        };
        return ok("1 node (standalone)", vec![node]);
    };
    let now = std::time::SystemTime::now();
    let nodes: Vec<NodeView> = nodes
        .into_iter()
        .map(|node| NodeView {
            state: node.state,
            started_at: timestamp(node.started_at),
            uptime_ms: now
                .duration_since(node.started_at)
                .map_or(0, |d| d.as_millis() as u64),
            channels: node.channels,
            clients: node.clients,
            connections: node.clients,
            max_connections: node.max_connections,
            weight: node.weight,
            messages_per_second: Some(node.messages_per_second),
            id: node.id,
            address: node.address,
            this_node: node.this_node,
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
    let removed_clients = app.relay.coordinator().evict(&node).await?;
    Ok(ok(
        format!("node {node} evicted"),
        Evicted { removed_clients },
    ))
}

/// A node's state after a drain or ready command.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Commanded {
    node_id: String,
    state: NodeState,
}

/// `POST /cluster/{nodeId}/drain`: evacuates a node for maintenance.
#[utoipa::path(post, path = "/cluster/{nodeId}/drain", tag = "service", summary = "Drain a node",
    description = "Starts a maintenance drain of the node (any node can be asked for any node; a standalone node names itself): its readiness turns 503 at once, it still takes connections for WRS_DRAIN_DELAY_MS, then closes its clients with 1012 in random order at most WRS_DRAIN_RATE a second, each after what is queued for it. It stays drained (503, new connections refused) until POST /cluster/{nodeId}/ready. Asking again changes nothing.",
    params(("nodeId" = String, Path, description = "Node id")),
    responses((status = 200, body = Envelope<Commanded>), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn drain(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let state = app.relay.command(&node, NodeCommand::Drain).await?;
    Ok(ok(
        format!("node {node} drains"),
        Commanded {
            node_id: node,
            state,
        },
    ))
}

/// `POST /cluster/{nodeId}/ready`: ends a maintenance drain.
#[utoipa::path(post, path = "/cluster/{nodeId}/ready", tag = "service", summary = "End a node's drain",
    description = "Ends a maintenance drain: the node is ready again (unless overloaded or disconnected) and keeps the clients it still has. A node that was not draining stays as it is. A node stopping after SIGTERM cannot be made ready: 409.",
    params(("nodeId" = String, Path, description = "Node id")),
    responses((status = 200, body = Envelope<Commanded>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn ready(
    State(app): State<AppState>,
    Path(node): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let state = app.relay.command(&node, NodeCommand::Ready).await?;
    Ok(ok(
        format!("node {node} is {state}"),
        Commanded {
            node_id: node,
            state,
        },
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

/// `GET /readyz`: 503 while draining, disconnected or overloaded.
#[utoipa::path(get, path = "/readyz", tag = "service", summary = "Readiness",
    description = "503 while the node drains (shutting down, or evacuated with POST /cluster/{nodeId}/drain), in a cluster while it cannot reach NATS, and while it is overloaded: from 90 % of WRS_MAX_CONNECTIONS until it is below 80 % again. A shedding node stays ready (its agent-check weight is 0 instead).",
    responses((status = 200, body = Envelope<Status>), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(app): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    match app.relay.state() {
        NodeState::Ready | NodeState::Shedding => Ok(ok("ready", Status { status: "ready" })),
        NodeState::Draining => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining and accepts no new connections",
        )),
        NodeState::Disconnected => Err(ApiError::cluster_unavailable()),
        NodeState::Overloaded => {
            let capacity = app.relay.capacity();
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "node holds {} of its {} connections; ready again below 80 %",
                    capacity.held(),
                    capacity.max()
                ),
            ))
        }
    }
}

/// `GET /metrics`: Prometheus text (OpenMetrics).
#[utoipa::path(get, path = "/metrics", tag = "service", summary = "Prometheus metrics",
    description = "Connections and channels open, messages and bytes in and out by pattern, dropped deliveries, slow-consumer closes, connect rejections by reason, HTTP requests by route and status with latency histograms.",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let metrics = app.relay.metrics();
    metrics.channels_open.set(app.relay.channel_count() as i64);
    let states = NodeState::ALL.map(NodeState::as_str);
    metrics.set_node(app.relay.state().as_str(), &states, app.relay.weight());
    if let Some(summary) = app.relay.coordinator().summary() {
        metrics.cluster.connected.set(i64::from(summary.connected));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.relay.metrics().encode(),
    )
}
