//! What the cluster keeps in NATS JetStream key-value buckets, one bucket
//! per kind, all named `<WRS_CLUSTER>-<kind>`:
//!
//! | bucket | key | value | written by |
//! |---|---|---|---|
//! | `channels` | channel id | [`ChannelRecord`] | the node that creates or closes it |
//! | `members` | channel id | [`MembersDoc`] | every node, compare-and-set |
//! | `activity` | channel id | last activity, ms since the epoch | nodes relaying on it (throttled) |
//! | `nodes` | node id | [`NodeRecord`] | each node for itself (heartbeat) |
//!
//! Values are JSON.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::relay::channel::ChannelSpec;
use crate::relay::ids::{ClientId, TokenDigest};
use crate::relay::pattern::{Pattern, Roster};

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A channel as the cluster shares it. The token is stored only as its
/// SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelRecord {
    pub pattern: String,
    pub client_limit: Option<u32>,
    pub timeout_ms: Option<u64>,
    pub welcome: bool,
    pub token_sha256: String,
    pub created_at_ms: u64,
    pub created_by: String,
    /// Set just before the key is deleted: `deleted` or `timed_out`, so
    /// every node closes its clients with the right code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closing: Option<String>,
}

impl ChannelRecord {
    pub fn new(spec: &ChannelSpec, token: TokenDigest, created_at: SystemTime, node: &str) -> Self {
        Self {
            pattern: spec.pattern.as_str().to_owned(),
            client_limit: spec.client_limit,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            welcome: spec.welcome,
            token_sha256: token.to_hex(),
            created_at_ms: epoch_ms(created_at),
            created_by: node.to_owned(),
            closing: None,
        }
    }

    /// The channel's settings and token digest, if the record is valid.
    pub fn spec(&self) -> Option<(ChannelSpec, TokenDigest)> {
        let spec = ChannelSpec {
            pattern: Pattern::parse(&self.pattern)?,
            client_limit: self.client_limit,
            timeout: self.timeout_ms.map(Duration::from_millis),
            welcome: self.welcome,
        };
        Some((spec, TokenDigest::from_hex(&self.token_sha256)?))
    }
}

/// One client in a [`MembersDoc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: ClientId,
    /// When it connected (or reserved its place), ms since the epoch.
    pub at: u64,
}

/// The clients of one channel across the cluster, by node. A client is
/// listed from the moment its connect is accepted (its place is reserved)
/// until it leaves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersDoc {
    pub nodes: BTreeMap<String, Vec<Member>>,
}

impl MembersDoc {
    pub fn len(&self) -> usize {
        self.nodes.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: ClientId) -> bool {
        self.nodes.values().flatten().any(|m| m.id == id)
    }

    /// Whether nodes other than `node` have clients.
    pub fn has_others(&self, node: &str) -> bool {
        self.nodes
            .iter()
            .any(|(n, members)| n != node && !members.is_empty())
    }

    pub fn add(&mut self, node: &str, member: Member) {
        self.nodes.entry(node.to_owned()).or_default().push(member);
    }

    /// Removes a client; returns whether it was there.
    pub fn remove(&mut self, id: ClientId) -> bool {
        let mut found = false;
        for members in self.nodes.values_mut() {
            let before = members.len();
            members.retain(|m| m.id != id);
            found |= members.len() != before;
        }
        self.nodes.retain(|_, members| !members.is_empty());
        found
    }

    /// Removes every client of `node`; returns how many there were.
    pub fn remove_node(&mut self, node: &str) -> usize {
        self.nodes.remove(node).map_or(0, |members| members.len())
    }
}

/// A node's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub id: String,
    /// Host and port clients use for this node.
    pub address: String,
    /// `ready` or `draining`.
    pub state: String,
    pub started_at_ms: u64,
    pub clients: u64,
    pub channels: u64,
    /// Messages received from this node's clients per second, over the
    /// last heartbeat interval.
    pub messages_per_second: u64,
}

/// The cluster-wide roster of a channel in a stable order: nodes by id,
/// clients in join order — every node computes the same positions.
#[derive(Debug, Default)]
pub struct ClusterRoster {
    entries: Vec<(ClientId, Arc<str>)>,
    index: HashMap<ClientId, usize>,
}

impl ClusterRoster {
    pub fn of(doc: &MembersDoc) -> Self {
        let mut entries = Vec::with_capacity(doc.len());
        for (node, members) in &doc.nodes {
            let node: Arc<str> = node.as_str().into();
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
        }
    }

    #[test]
    fn members_docs_add_remove_and_count() {
        let mut doc = MembersDoc::default();
        doc.add("b", member(1));
        doc.add("a", member(2));
        doc.add("b", member(3));
        assert_eq!(doc.len(), 3);
        assert!(doc.has_others("a") && doc.has_others("b") && doc.has_others("c"));
        assert!(doc.remove(ClientId::from_raw(2)));
        assert!(!doc.remove(ClientId::from_raw(2)));
        assert!(!doc.has_others("b"));
        assert!(!doc.nodes.contains_key("a"), "empty nodes are dropped");
        assert_eq!(doc.remove_node("b"), 2);
        assert!(doc.is_empty());
    }

    #[test]
    fn rosters_order_by_node_then_join() {
        let mut doc = MembersDoc::default();
        doc.add("node-b", member(1));
        doc.add("node-a", member(2));
        doc.add("node-b", member(3));
        let roster = ClusterRoster::of(&doc);
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
        };
        let token = TokenDigest::of("secret");
        let record = ChannelRecord::new(&spec, token, SystemTime::now(), "n1");
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains("secret"));
        let back: ChannelRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.spec(), Some((spec, token)));
        let mut doc = MembersDoc::default();
        doc.add("n1", member(7));
        let back: MembersDoc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
    }
}
