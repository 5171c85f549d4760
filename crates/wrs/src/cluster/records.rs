//! What the cluster keeps in NATS JetStream key-value buckets, one bucket
//! per kind, all named `<WRS_CLUSTER>-<kind>`:
//!
//! | bucket | key | value | written by |
//! |---|---|---|---|
//! | `channels` | channel id | [`ChannelRecord`] | the node that creates or ends it |
//! | `rosters` | `<channel>.<node>.<seq>` | a [`Segment`]: up to [`SEGMENT`] clients of that node | that node |
//! | `counts` | channel id | [`Counts`] (channels with a `clientLimit`) | every node, compare-and-set |
//! | `activity` | channel id | last activity, ms since the epoch | nodes relaying on it (throttled) |
//! | `nodes` | node id | [`NodeRecord`] | each node for itself (heartbeat) |
//!
//! Values are JSON.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::relay::NodeState;
use crate::relay::channel::ChannelSpec;
use crate::relay::clock::{epoch_ms, from_epoch_ms};
use crate::relay::coordinator::{EndReason, SharedChannel};
use crate::relay::history::HistorySpec;
use crate::relay::ids::{ChannelId, ClientId, TokenDigest};
use crate::relay::pattern::{Pattern, Roster};

/// A channel as the cluster shares it. The token is stored only as its
/// SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelRecord {
    pub pattern: String,
    pub client_limit: Option<u32>,
    pub timeout_ms: Option<u64>,
    pub welcome: bool,
    /// `[size, ttl in ms]` of a channel that keeps history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<(u32, u64)>,
    pub token_sha256: String,
    pub created_at_ms: u64,
    pub created_by: String,
    /// Written by earlier versions just before deleting the key. A record
    /// that still carries it belongs to a node that died half-way: any node
    /// that sees it finishes the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closing: Option<EndReason>,
}

impl ChannelRecord {
    pub fn new(channel: &SharedChannel) -> Self {
        let spec = &channel.spec;
        Self {
            pattern: spec.pattern.as_str().to_owned(),
            client_limit: spec.client_limit,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            welcome: spec.welcome,
            history: spec.history.map(|h| (h.size, h.ttl.as_millis() as u64)),
            token_sha256: channel.token.to_hex(),
            created_at_ms: epoch_ms(channel.created_at),
            created_by: channel.created_by.clone(),
            closing: None,
        }
    }

    /// The channel as the relay knows it, if the record is valid.
    pub fn shared(&self) -> Option<SharedChannel> {
        let spec = ChannelSpec {
            pattern: Pattern::parse(&self.pattern)?,
            client_limit: self.client_limit,
            timeout: self.timeout_ms.map(Duration::from_millis),
            welcome: self.welcome,
            history: self.history.map(|(size, ttl)| HistorySpec {
                size,
                ttl: Duration::from_millis(ttl),
            }),
        };
        Some(SharedChannel {
            spec,
            token: TokenDigest::from_hex(&self.token_sha256)?,
            created_at: from_epoch_ms(self.created_at_ms),
            created_by: self.created_by.clone(),
        })
    }
}

/// One client in a channel's roster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: ClientId,
    /// When it connected (or its place was taken), ms since the epoch.
    pub at: u64,
    /// A Server-Sent Events client (not a WebSocket).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sse: bool,
}

/// The most clients one segment holds: a roster write carries at most
/// this many clients, whatever the size of the channel.
pub const SEGMENT: usize = 32;

/// Clients of one node in one channel, in join order: a node's part of a
/// channel's roster is a few segments, numbered from 0.
pub type Segment = Vec<Member>;

/// The key of a segment: `<channel>.<node>.<seq>`.
pub fn segment_key(channel: &ChannelId, node: &str, seq: u32) -> String {
    format!("{channel}.{node}.{seq}")
}

/// The parts of a segment's key.
pub fn parse_segment_key(key: &str) -> Option<(ChannelId, String, u32)> {
    let mut parts = key.splitn(3, '.');
    let channel = ChannelId::parse(parts.next()?)?;
    let node = parts.next()?.to_owned();
    let seq = parts.next()?.parse().ok()?;
    Some((channel, node, seq))
}

/// How many clients each node has in a channel with a `clientLimit`. A
/// node raises its count (compare-and-set, the limit checked against the
/// sum) before it lists new clients, so the limit holds for concurrent
/// connects on any nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub nodes: BTreeMap<String, u32>,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.nodes.values().map(|&n| u64::from(n)).sum()
    }
}

/// A node's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub id: String,
    /// Host and port clients use for this node.
    pub address: String,
    pub state: NodeState,
    pub started_at_ms: u64,
    pub clients: u64,
    pub channels: u64,
    /// Messages received from this node's clients per second, over the
    /// last heartbeat interval.
    pub messages_per_second: u64,
    /// The node's `WRS_MAX_CHANNELS` (0: an earlier version that did not say).
    #[serde(default)]
    pub max_channels: usize,
    /// The node's `WRS_MAX_CONNECTIONS` (0: an earlier version).
    #[serde(default)]
    pub max_connections: u64,
    /// How attractive the node is to a balancer, 0–100.
    #[serde(default)]
    pub weight: u8,
}

/// The cluster-wide roster of a channel in a stable order: nodes by id,
/// clients in join order — every node computes the same positions.
#[derive(Debug, Default)]
pub struct ClusterRoster {
    entries: Vec<(ClientId, Arc<str>)>,
    index: HashMap<ClientId, usize>,
}

impl ClusterRoster {
    /// The roster of `segments`, in the order given (nodes by id, then
    /// segments by number).
    pub fn of<'a>(segments: impl Iterator<Item = (&'a str, &'a [Member])>) -> Self {
        let mut entries = Vec::new();
        let mut last: Option<Arc<str>> = None;
        for (node, members) in segments {
            let node = match &last {
                Some(held) if **held == *node => Arc::clone(held),
                _ => {
                    let node: Arc<str> = node.into();
                    last = Some(Arc::clone(&node));
                    node
                }
            };
            entries.extend(members.iter().map(|m| (m.id, Arc::clone(&node))));
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        Self { entries, index }
    }

    pub fn entry(&self, position: usize) -> Option<(ClientId, &str)> {
        self.entries.get(position).map(|(id, node)| (*id, &**node))
    }

    pub fn node_of(&self, id: ClientId) -> Option<&str> {
        self.index.get(&id).map(|&i| &*self.entries[i].1)
    }
}

impl Roster for ClusterRoster {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn position(&self, id: ClientId) -> Option<usize> {
        self.index.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(raw: u64) -> Member {
        Member {
            id: ClientId::from_raw(raw),
            at: raw,
            sse: false,
        }
    }

    #[test]
    fn segment_keys_round_trip() {
        let channel = ChannelId::parse("D679-05F5").unwrap();
        let key = segment_key(&channel, "node-a_1", 12);
        assert_eq!(key, "D679-05F5.node-a_1.12");
        assert_eq!(
            parse_segment_key(&key),
            Some((channel, "node-a_1".to_owned(), 12))
        );
        assert_eq!(parse_segment_key("D679-05F5"), None);
        assert_eq!(parse_segment_key("D679-05F5.a.x"), None);
    }

    #[test]
    fn rosters_order_by_node_then_join() {
        let segments = [
            ("node-a", vec![member(2)]),
            ("node-b", vec![member(1)]),
            ("node-b", vec![member(3)]),
        ];
        let roster = ClusterRoster::of(segments.iter().map(|(n, m)| (*n, m.as_slice())));
        let order: Vec<_> = (0..roster.len())
            .map(|i| roster.entry(i).unwrap())
            .collect();
        assert_eq!(
            order,
            [
                (ClientId::from_raw(2), "node-a"),
                (ClientId::from_raw(1), "node-b"),
                (ClientId::from_raw(3), "node-b")
            ]
        );
        assert_eq!(roster.position(ClientId::from_raw(3)), Some(2));
        assert_eq!(roster.node_of(ClientId::from_raw(1)), Some("node-b"));
    }

    #[test]
    fn records_round_trip_through_json() {
        let spec = ChannelSpec {
            pattern: Pattern::FanInOut,
            client_limit: Some(5),
            timeout: Some(Duration::from_secs(60)),
            welcome: true,
            history: None,
        };
        let shared = SharedChannel {
            spec,
            token: TokenDigest::of("secret"),
            created_at: from_epoch_ms(1_764_000_000_123),
            created_by: "n1".to_owned(),
        };
        let record = ChannelRecord::new(&shared);
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains("secret"));
        let back: ChannelRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.shared(), Some(shared));
        // A record an earlier version marked as closing.
        let legacy: ChannelRecord =
            serde_json::from_str(&json.replace('}', r#","closing":"timed_out"}"#)).unwrap();
        assert_eq!(legacy.closing, Some(EndReason::TimedOut));
        let segment: Segment = vec![member(7)];
        let back: Segment =
            serde_json::from_str(&serde_json::to_string(&segment).unwrap()).unwrap();
        assert_eq!(back, segment);
    }
}
