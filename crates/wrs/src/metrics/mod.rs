//! Counters and gauges of the service, exported at `GET /metrics` in the
//! Prometheus/OpenMetrics text format.
//!
//! The message path touches only pre-resolved handles (an atomic add per
//! message, not per delivery); label lookups happen at start or on cold
//! paths (rejections, HTTP requests).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::relay::pattern::Pattern;

mod process;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PatternLabels {
    pattern: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

#[derive(Clone, Copy, Debug)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 100 µs to ~3.3 s.
        Histogram::new(exponential_buckets(0.0001, 2.0, 16))
    }
}

/// One counter per pattern, indexed by [`pattern_index`].
pub type PerPattern = [Counter; 5];

fn pattern_index(pattern: Pattern) -> usize {
    match pattern {
        Pattern::Echo => 0,
        Pattern::PubSub => 1,
        Pattern::PushPull => 2,
        Pattern::ReqRepl => 3,
        Pattern::FanInOut => 4,
    }
}

/// Every metric of one process. Cloning a handle shares the counter.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages_in: PerPattern,
    bytes_in: PerPattern,
    messages_out: PerPattern,
    bytes_out: PerPattern,
    frame_errors: PerPattern,
    pub dropped: Counter,
    pub slow_consumer_closes: Counter,
    /// Messages compressed with permessage-deflate: once per message and
    /// window size, however many receivers share the result.
    pub compressions: Counter,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    connect_rejections: Family<ReasonLabels, Counter>,
    /// The sum of `connect_rejections` (families cannot be summed).
    connections_rejected: Counter,
    pub channels_open: Gauge,
    channels_closed: Family<ReasonLabels, Counter>,
    client_closes: Family<ReasonLabels, Counter>,
    node_state: Family<StateLabels, Gauge>,
    node_weight: Gauge,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram, LatencyBuckets>,
    /// Cluster mode only (registered when clustered).
    pub cluster: ClusterMetrics,
}

/// The cluster transport's counters.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Messages handed to NATS: one per broadcast to interested nodes, one
    /// per message for a client on another node.
    pub published: Counter,
    /// Messages that arrived from other nodes.
    pub received: Counter,
    /// Messages not published (the bounded queue was full, or NATS refused).
    pub dropped: Counter,
    /// 1 while connected to NATS.
    pub connected: Gauge,
    /// Stored records (channels, rosters) that could not be decoded.
    pub corrupt_records: Counter,
}

fn per_pattern(registry: &mut Registry, name: &str, help: &str) -> PerPattern {
    let family = Family::<PatternLabels, Counter>::default();
    registry.register(name, help, family.clone());
    Pattern::ALL.map(|p| {
        family
            .get_or_create(&PatternLabels {
                pattern: p.as_str(),
            })
            .clone()
    })
}

impl Metrics {
    /// The registry of a standalone node, or of a cluster node (which adds
    /// the `wrs_cluster_*` metrics).
    pub fn new(clustered: bool) -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("wrs");
        let messages_in = per_pattern(registry, "messages_in", "Messages received from clients");
        let bytes_in = per_pattern(registry, "bytes_in", "Payload bytes received from clients");
        let messages_out = per_pattern(
            registry,
            "messages_out",
            "Messages delivered to clients (one per receiver)",
        );
        let bytes_out = per_pattern(registry, "bytes_out", "Payload bytes delivered to clients");
        let frame_errors = per_pattern(
            registry,
            "frame_errors",
            "Sub-protocol frames answered with an error frame",
        );
        let dropped = Counter::default();
        registry.register(
            "deliveries_dropped",
            "Deliveries not made because the receiver's queue was full",
            dropped.clone(),
        );
        let slow_consumer_closes = Counter::default();
        registry.register(
            "slow_consumer_closes",
            "Clients closed with 1008 because their queue overflowed",
            slow_consumer_closes.clone(),
        );
        let compressions = Counter::default();
        registry.register(
            "compressions",
            "Messages compressed with permessage-deflate (once per message, shared by its receivers)",
            compressions.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open (WebSocket and Server-Sent Events)",
            connections_open.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted (WebSocket upgrades and Server-Sent Events streams)",
            connections_accepted.clone(),
        );
        let connect_rejections = Family::default();
        registry.register(
            "connect_rejections",
            "Connection attempts refused before the upgrade, by reason",
            connect_rejections.clone(),
        );
        let channels_open = Gauge::default();
        registry.register(
            "channels_open",
            "Channels held by this node",
            channels_open.clone(),
        );
        let channels_closed = Family::default();
        registry.register(
            "channels_closed",
            "Channels ended, by reason (deleted, timed_out)",
            channels_closed.clone(),
        );
        let client_closes = Family::default();
        registry.register(
            "client_closes",
            "Clients closed by the service, by reason (draining, rebalancing, max_age, shutdown, rate_limited)",
            client_closes.clone(),
        );
        let node_state = Family::default();
        registry.register(
            "node_state",
            "1 for this node's state (ready, draining, shedding, overloaded, disconnected), 0 for the others",
            node_state.clone(),
        );
        let node_weight = Gauge::default();
        registry.register(
            "node_weight",
            "How attractive this node is to a balancer, 0-100 (its agent-check weight)",
            node_weight.clone(),
        );
        let http_requests = Family::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        let http_duration = Family::new_with_constructor(LatencyBuckets);
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency by route and method",
            prometheus_client::registry::Unit::Seconds,
            http_duration.clone(),
        );
        let cluster = ClusterMetrics::default();
        if clustered {
            registry.register(
                "cluster_messages_published",
                "Messages published to NATS (one per interested node, or per remote target)",
                cluster.published.clone(),
            );
            registry.register(
                "cluster_messages_received",
                "Messages received from other nodes through NATS",
                cluster.received.clone(),
            );
            registry.register(
                "cluster_messages_dropped",
                "Messages not published: the bounded NATS queue was full or NATS refused them",
                cluster.dropped.clone(),
            );
            registry.register(
                "cluster_corrupt_records",
                "Stored records (channel records, rosters) that could not be read; they are left untouched",
                cluster.corrupt_records.clone(),
            );
            registry.register(
                "cluster_nats_connected",
                "1 while connected to NATS",
                cluster.connected.clone(),
            );
        }
        // The standard process_* metrics, without the wrs_ prefix.
        root.register_collector(Box::new(process::ProcessCollector));
        Self {
            registry: root,
            cluster,
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
            frame_errors,
            dropped,
            slow_consumer_closes,
            compressions,
            connections_open,
            connections_accepted,
            connect_rejections,
            connections_rejected: Counter::default(),
            channels_open,
            channels_closed,
            client_closes,
            node_state,
            node_weight,
            http_requests,
            http_duration,
        }
    }

    /// One message received on a channel of `pattern`.
    pub fn message_in(&self, pattern: Pattern, bytes: u64) {
        let i = pattern_index(pattern);
        self.messages_in[i].inc();
        self.bytes_in[i].inc_by(bytes);
    }

    /// `frames` deliveries of `bytes` payload bytes in all.
    pub fn delivered(&self, pattern: Pattern, frames: u64, bytes: u64) {
        let i = pattern_index(pattern);
        self.messages_out[i].inc_by(frames);
        self.bytes_out[i].inc_by(bytes);
    }

    pub fn frame_error(&self, pattern: Pattern) {
        self.frame_errors[pattern_index(pattern)].inc();
    }

    pub fn connect_rejected(&self, reason: &'static str) {
        self.connect_rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.connections_rejected.inc();
    }

    pub fn channel_closed(&self, reason: &'static str) {
        self.channels_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A client closed by the service (not by itself, nor for a protocol
    /// violation) for `reason`.
    pub fn client_closed(&self, reason: &'static str) {
        self.client_closes
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Clients closed by the service for `reason` so far.
    pub fn client_closes(&self, reason: &'static str) -> u64 {
        self.client_closes
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// Sets the node's state (one of `states`) and weight, before a scrape.
    pub fn set_node(&self, state: &'static str, states: &[&'static str], weight: u8) {
        for &each in states {
            self.node_state
                .get_or_create(&StateLabels { state: each })
                .set(i64::from(each == state));
        }
        self.node_weight.set(i64::from(weight));
    }

    /// Channels closed for `reason` so far.
    pub fn channels_closed(&self, reason: &'static str) -> u64 {
        self.channels_closed
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    pub fn http_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Totals over all patterns, for `GET /service`.
    pub fn totals(&self) -> Totals {
        let sum = |counters: &PerPattern| counters.iter().map(Counter::get).sum();
        Totals {
            messages_in: sum(&self.messages_in),
            bytes_in: sum(&self.bytes_in),
            deliveries: sum(&self.messages_out),
            bytes_out: sum(&self.bytes_out),
            frame_errors: sum(&self.frame_errors),
            dropped: self.dropped.get(),
            slow_consumer_closes: self.slow_consumer_closes.get(),
            connections_accepted: self.connections_accepted.get(),
            connections_rejected: self.connections_rejected.get(),
            connections_open: self.connections_open.get().max(0) as u64,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

/// Counter totals shown by `GET /service`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub deliveries: u64,
    pub bytes_out: u64,
    pub frame_errors: u64,
    pub dropped: u64,
    pub slow_consumer_closes: u64,
    pub connections_accepted: u64,
    pub connections_rejected: u64,
    pub connections_open: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_pattern_and_totals() {
        let m = Metrics::new(false);
        m.message_in(Pattern::PubSub, 10);
        m.message_in(Pattern::Echo, 3);
        m.delivered(Pattern::PubSub, 4, 40);
        m.connect_rejected("invalid_token");
        m.connect_rejected("invalid_token");
        m.connect_rejected("channel_full");
        let t = m.totals();
        assert_eq!(
            (t.messages_in, t.bytes_in, t.deliveries, t.bytes_out),
            (2, 13, 4, 40)
        );
        assert_eq!(t.connections_rejected, 3);
        let text = m.encode();
        assert!(
            text.contains(r#"wrs_messages_in_total{pattern="pub-sub"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"wrs_messages_out_total{pattern="pub-sub"} 4"#));
        assert!(text.contains(r#"wrs_connect_rejections_total{reason="invalid_token"} 2"#));
        assert!(text.ends_with("# EOF\n"));
        assert!(
            !text.contains("wrs_cluster_"),
            "cluster metrics only in cluster mode"
        );
        let clustered = Metrics::new(true);
        clustered.cluster.published.inc();
        assert!(
            clustered
                .encode()
                .contains("wrs_cluster_messages_published_total 1")
        );
    }

    #[test]
    fn http_latency_is_a_histogram() {
        let m = Metrics::new(false);
        m.http_request("/channels", "POST", 201, Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains(
                r#"wrs_http_requests_total{route="/channels",method="POST",status="201"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"wrs_http_request_duration_seconds_count{route="/channels",method="POST"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("wrs_http_request_duration_seconds_bucket{"));
    }
}
