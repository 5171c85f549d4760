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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::relay::NodeState;
use crate::relay::channel::ChannelSpec;
use crate::relay::clock::{epoch_ms, from_epoch_ms};
use crate::relay::coordinator::{EndReason, SharedChannel};
use crate::relay::ids::{ClientId, TokenDigest};
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
        };
        Some(SharedChannel {
            spec,
            token: TokenDigest::from_hex(&self.token_sha256)?,
            created_at: from_epoch_ms(self.created_at_ms),
            created_by: self.created_by.clone(),
        })
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

    /// Whether nodes other than `node` have clients.
    pub fn has_others(&self, node: &str) -> bool {
        self.nodes
            .iter()
            .any(|(n, members)| n != node && !members.is_empty())
    }

    /// The clients of `node`.
    pub fn of(&self, node: &str) -> &[Member] {
        self.nodes.get(node).map_or(&[], Vec::as_slice)
    }

    /// Starts a batch of changes: O(n) once, then O(1) per change.
    pub fn edit(&mut self) -> Edit<'_> {
        let ids = self.nodes.values().flatten().map(|m| m.id).collect();
        Edit {
            doc: self,
            ids,
            removed: HashSet::new(),
            changed: false,
        }
    }
}

/// A batch of changes to a [`MembersDoc`]. Leaves are collected and
/// applied in one pass by [`Edit::finish`], so a batch of k changes to a
/// roster of n clients costs O(n + k), not O(n × k).
#[derive(Debug)]
pub struct Edit<'a> {
    doc: &'a mut MembersDoc,
    /// Every client listed, as of the changes so far.
    ids: HashSet<ClientId>,
    /// Clients to take out of the lists.
    removed: HashSet<ClientId>,
    changed: bool,
}

impl Edit<'_> {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn contains(&self, id: ClientId) -> bool {
        self.ids.contains(&id)
    }

    /// Adds a client of `node`; false if its id is listed already.
    pub fn add(&mut self, node: &str, member: Member) -> bool {
        if !self.ids.insert(member.id) {
            return false;
        }
        // A client that left and came back within one batch keeps its new place.
        if self.removed.remove(&member.id) {
            for members in self.doc.nodes.values_mut() {
                members.retain(|m| m.id != member.id);
            }
        }
        self.doc
            .nodes
            .entry(node.to_owned())
            .or_default()
            .push(member);
        self.changed = true;
        true
    }

    /// Removes a client; false if it was not listed.
    pub fn remove(&mut self, id: ClientId) -> bool {
        if !self.ids.remove(&id) {
            return false;
        }
        self.removed.insert(id);
        self.changed = true;
        true
    }

    /// Removes every client of `node`; returns how many there were.
    pub fn remove_node(&mut self, node: &str) -> usize {
        let Some(members) = self.doc.nodes.remove(node) else {
            return 0;
        };
        let mut count = 0;
        for member in &members {
            if self.ids.remove(&member.id) {
                count += 1;
            }
        }
        self.changed |= !members.is_empty();
        count
    }

    /// Makes `node`'s list hold exactly the clients in `keep` plus those
    /// listed for it that `young` accepts, adding the clients of `keep`
    /// that are missing (in the order given). Returns whether anything
    /// changed.
    pub fn set_node<F>(&mut self, node: &str, keep: &[Member], young: F) -> bool
    where
        F: Fn(&Member) -> bool,
    {
        let wanted: HashSet<ClientId> = keep.iter().map(|m| m.id).collect();
        let listed = self.doc.of(node).to_vec();
        let mut changed = false;
        for member in &listed {
            if !wanted.contains(&member.id) && !young(member) && self.remove(member.id) {
                changed = true;
            }
        }
        let here: HashSet<ClientId> = listed.iter().map(|m| m.id).collect();
        for member in keep {
            if !here.contains(&member.id) && self.add(node, *member) {
                changed = true;
            }
        }
        changed
    }

    /// Applies the removals; returns whether the document changed.
    pub fn finish(self) -> bool {
        if !self.removed.is_empty() {
            let removed = self.removed;
            for members in self.doc.nodes.values_mut() {
                members.retain(|m| !removed.contains(&m.id));
            }
        }
        self.doc.nodes.retain(|_, members| !members.is_empty());
        self.changed
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
        let mut edit = doc.edit();
        assert!(edit.add("b", member(1)));
        assert!(edit.add("a", member(2)));
        assert!(edit.add("b", member(3)));
        assert!(!edit.add("a", member(3)), "ids are unique in the channel");
        assert!(edit.finish());
        assert_eq!(doc.len(), 3);
        assert!(doc.has_others("a") && doc.has_others("b") && doc.has_others("c"));
        let mut edit = doc.edit();
        assert!(edit.remove(ClientId::from_raw(2)));
        assert!(!edit.remove(ClientId::from_raw(2)));
        assert!(edit.finish());
        assert!(!doc.has_others("b"));
        assert!(!doc.nodes.contains_key("a"), "empty nodes are dropped");
        let mut edit = doc.edit();
        assert_eq!(edit.remove_node("b"), 2);
        assert!(edit.finish());
        assert!(doc.is_empty());
        assert!(!doc.edit().finish(), "nothing changed");
    }

    #[test]
    fn a_client_that_leaves_and_rejoins_in_one_batch_is_listed_once() {
        let mut doc = MembersDoc::default();
        let mut edit = doc.edit();
        edit.add("a", member(1));
        edit.add("a", member(2));
        edit.finish();
        let mut edit = doc.edit();
        assert!(edit.remove(ClientId::from_raw(1)));
        assert!(edit.add("b", member(1)));
        edit.finish();
        assert_eq!(doc.of("a"), [member(2)]);
        assert_eq!(doc.of("b"), [member(1)]);
    }

    #[test]
    fn set_node_keeps_real_and_young_entries_only() {
        let mut doc = MembersDoc::default();
        let mut edit = doc.edit();
        for raw in 1..=4 {
            edit.add("a", member(raw));
        }
        edit.add("b", member(9));
        edit.finish();
        // Real clients: 1 and 5 (5 was missing); 3 is young (an upgrade
        // under way); 2 and 4 are stale.
        let mut edit = doc.edit();
        assert!(edit.set_node("a", &[member(1), member(5)], |m| m.id
            == ClientId::from_raw(3)));
        edit.finish();
        assert_eq!(doc.of("a"), [member(1), member(3), member(5)]);
        assert_eq!(doc.of("b"), [member(9)], "other nodes are not touched");
        let mut edit = doc.edit();
        assert!(!edit.set_node("a", &[member(1), member(5)], |m| m.id
            == ClientId::from_raw(3)));
    }

    /// 19 000 clients, every one leaving in one batch, and the node's list
    /// reconciled against 19 000 real clients: each is one linear pass (a
    /// quadratic version does 180 million comparisons here).
    #[test]
    fn batches_and_reconciles_of_19_000_clients_are_linear() {
        const N: u64 = 19_000;
        let mut doc = MembersDoc::default();
        let mut edit = doc.edit();
        for raw in 0..N {
            assert!(edit.add(if raw % 2 == 0 { "a" } else { "b" }, member(raw)));
        }
        assert!(edit.finish());
        assert_eq!(doc.len(), N as usize);
        let real: Vec<Member> = doc.of("a").to_vec();
        let mut edit = doc.edit();
        assert!(!edit.set_node("a", &real, |_| false));
        assert!(!edit.finish());
        let mut edit = doc.edit();
        for raw in 0..N {
            assert!(edit.remove(ClientId::from_raw(raw)));
        }
        assert_eq!(edit.len(), 0);
        assert!(edit.finish());
        assert!(doc.is_empty());
    }

    #[test]
    fn rosters_order_by_node_then_join() {
        let mut doc = MembersDoc::default();
        let mut edit = doc.edit();
        edit.add("node-b", member(1));
        edit.add("node-a", member(2));
        edit.add("node-b", member(3));
        edit.finish();
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
        let mut doc = MembersDoc::default();
        doc.edit().add("n1", member(7));
        let back: MembersDoc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
    }
}
