//! Nodes coming and going (the `nodes` bucket): every node writes its
//! heartbeat every `WRS_CLUSTER_HEARTBEAT_MS` and watches everyone's.
//!
//! - A node silent for [`MISSED_HEARTBEATS`] intervals — confirmed by a
//!   direct read of its heartbeat, so a stalled watch cannot cause a false
//!   death — is gone: any live node removes its clients from every roster
//!   (their places are free again) and its heartbeat.
//!   `DELETE /cluster/{nodeId}` does the same at once.
//! - Each beat, a node also repairs its own roster entries
//!   ([`NatsCoordinator::reconcile`]).
//! - A node that stops removes its entries and its heartbeat itself.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use super::records::NodeRecord;
use super::store::Seen;
use super::{MISSED_HEARTBEATS, NatsCoordinator};
use crate::relay::clock::{epoch_ms, from_epoch_ms};
use crate::relay::coordinator::{CoordinatorError, EvictError, NodeInfo};

/// A node as last heard from.
#[derive(Clone, Debug)]
pub(super) struct SeenNode {
    pub record: NodeRecord,
    pub seen: Instant,
}

#[derive(Debug)]
pub(super) struct Liveness {
    started_at: SystemTime,
    /// Nodes heard from, from the watch (and direct reads).
    seen: Mutex<BTreeMap<String, SeenNode>>,
    /// Since when this node has watched heartbeats without interruption.
    watching_since: Mutex<Instant>,
}

impl Liveness {
    pub(super) fn new() -> Self {
        Self {
            started_at: SystemTime::now(),
            seen: Mutex::new(BTreeMap::new()),
            watching_since: Mutex::new(Instant::now()),
        }
    }
}

impl NatsCoordinator {
    fn liveness_bound(&self) -> Duration {
        self.heartbeat * MISSED_HEARTBEATS
    }

    pub(super) fn start_heartbeat(&self) {
        let Some(me) = self.me() else {
            return;
        };
        self.spawn(async move { me.heartbeat().await });
    }

    /// Announces this node, removes nodes that fell silent, and repairs
    /// this node's own roster entries, every heartbeat interval.
    async fn heartbeat(&self) {
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_messages = None;
        let mut beating = true;
        loop {
            ticker.tick().await;
            let Some(status) = self.handle().and_then(|handle| handle.status()) else {
                return;
            };
            let rate = last_messages.map_or(0, |last| {
                (status.messages_in - last) * 1000 / self.heartbeat.as_millis().max(1) as u64
            });
            last_messages = Some(status.messages_in);
            let record = NodeRecord {
                id: self.node.to_string(),
                address: self.address.lock().clone(),
                state: status.state,
                started_at_ms: epoch_ms(self.liveness.started_at),
                clients: status.connections,
                channels: status.channels,
                messages_per_second: rate,
                max_channels: status.max_channels,
                max_connections: status.max_connections,
                weight: status.weight,
            };
            match self.store.nodes.put(&self.node, &record).await {
                Ok(_) => {
                    if !beating {
                        info!("cluster heartbeat restored");
                    }
                    beating = true;
                }
                Err(error) => {
                    if beating {
                        warn!(%error, "cannot write the cluster heartbeat");
                    }
                    beating = false;
                    // Heartbeats of others may have been missed meanwhile.
                    self.nodes_resynced();
                    continue;
                }
            }
            self.remove_silent_nodes().await;
            self.reconcile();
        }
    }

    /// The heartbeat watch (re)started, or heartbeats could not be written:
    /// what this node knows of other nodes' liveness is not complete yet.
    fn nodes_resynced(&self) {
        *self.liveness.watching_since.lock() = Instant::now();
    }

    /// Whether this node has watched heartbeats for a full liveness bound
    /// without interruption, so silence really means absence.
    fn knows_liveness(&self) -> bool {
        self.liveness.watching_since.lock().elapsed() > self.liveness_bound()
    }

    /// Records a heartbeat written `age` ago (a record written long ago —
    /// a node that is gone — must not look fresh).
    fn saw_node(&self, record: NodeRecord, age: Duration) {
        let seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut nodes = self.liveness.seen.lock();
        if nodes.get(&record.id).is_none_or(|known| known.seen <= seen) {
            nodes.insert(record.id.clone(), SeenNode { record, seen });
        }
    }

    fn forget_node(&self, node: &str) -> bool {
        self.liveness.seen.lock().remove(node).is_some()
    }

    /// Nodes heard from within the liveness bound, by id.
    pub(super) fn live_nodes(&self) -> Vec<SeenNode> {
        let bound = self.liveness_bound();
        self.liveness
            .seen
            .lock()
            .values()
            .filter(|n| n.seen.elapsed() <= bound)
            .cloned()
            .collect()
    }

    fn is_live(&self, node: &str) -> bool {
        let bound = self.liveness_bound();
        node == &*self.node
            || self
                .liveness
                .seen
                .lock()
                .get(node)
                .is_some_and(|n| n.seen.elapsed() <= bound)
    }

    /// The smallest `WRS_MAX_CHANNELS` of this node and the live nodes:
    /// every node holds every channel.
    pub(super) fn smallest_channel_limit(&self, own: usize) -> usize {
        self.live_nodes()
            .iter()
            .map(|n| n.record.max_channels)
            .filter(|&limit| limit > 0)
            .fold(own, usize::min)
    }

    /// The nodes for `GET /cluster`.
    pub(super) fn node_infos(&self) -> Vec<NodeInfo> {
        let status = self.handle().and_then(|handle| handle.status());
        self.live_nodes()
            .into_iter()
            .map(|seen| {
                let record = seen.record;
                let this_node = record.id == *self.node;
                // This node's own figures are the live ones.
                let (state, clients, weight) = match (this_node, status) {
                    (true, Some(status)) => (status.state, status.connections, status.weight),
                    _ => (record.state, record.clients, record.weight),
                };
                NodeInfo {
                    state,
                    max_connections: record.max_connections,
                    weight,
                    started_at: from_epoch_ms(record.started_at_ms),
                    channels: record.channels,
                    clients,
                    messages_per_second: record.messages_per_second,
                    id: record.id,
                    address: record.address,
                    this_node,
                }
            })
            .collect()
    }

    /// Reads a node's heartbeat from the bucket: whether it was written
    /// within the liveness bound (then it is recorded as seen).
    async fn confirm_alive(&self, node: &str) -> Result<bool, CoordinatorError> {
        let Some((record, written)) = self.store.nodes.get_with_time(node).await? else {
            return Ok(false);
        };
        let age = SystemTime::now()
            .duration_since(written)
            .unwrap_or_default();
        if age > self.liveness_bound() {
            return Ok(false);
        }
        self.saw_node(record, age);
        Ok(true)
    }

    /// Removes the clients of every node that is not alive — nodes that
    /// fell silent, and nodes listed in a roster that nobody has heard
    /// from — once this node has watched the heartbeats long enough to
    /// know.
    async fn remove_silent_nodes(&self) {
        if !self.knows_liveness() {
            return;
        }
        let bound = self.liveness_bound();
        let mut gone: HashSet<String> = self
            .liveness
            .seen
            .lock()
            .values()
            .filter(|n| n.seen.elapsed() > bound && *n.record.id != *self.node)
            .map(|n| n.record.id.clone())
            .collect();
        gone.extend(
            self.rostered_nodes()
                .into_iter()
                .filter(|node| !self.is_live(node)),
        );
        for node in gone {
            // A direct read guards against a stalled watch: a node whose
            // heartbeat is fresh in the bucket is alive.
            if !matches!(self.confirm_alive(&node).await, Ok(false)) {
                continue;
            }
            match self.remove_node_members(&node).await {
                Ok(clients) => {
                    let _ = self.delete_node(&node).await;
                    warn!(%node, clients, "node is gone: its clients were removed from the cluster roster");
                }
                Err(error) => warn!(%node, %error, "cannot remove a gone node's clients"),
            }
        }
    }

    /// Removes a node's heartbeat (graceful leave, or eviction).
    async fn delete_node(&self, node: &str) -> Result<(), CoordinatorError> {
        self.forget_node(node);
        self.store.nodes.delete(node, None).await.map(drop)
    }

    pub(super) async fn evict_node(&self, node: &str) -> Result<usize, EvictError> {
        if node == &*self.node {
            return Err(EvictError::Itself);
        }
        let listed = self.live_nodes().iter().any(|n| n.record.id == node)
            || self.rostered_nodes().iter().any(|n| n == node);
        if !listed {
            return Err(EvictError::NotFound(node.to_owned()));
        }
        let removed = self.remove_node_members(node).await?;
        self.delete_node(node).await?;
        warn!(%node, removed, "node evicted");
        Ok(removed)
    }

    /// Leaves the cluster gracefully: removes this node's clients still
    /// listed and its heartbeat, and flushes what is queued for NATS.
    pub(super) async fn leave_cluster(&self) {
        if !self.is_connected() {
            // Every store call would wait out its retries: leave at once;
            // the other nodes evict this one after missed heartbeats.
            warn!(node = %self.node, "NATS unreachable: left the cluster without removing this node's entries");
            return;
        }
        if let Err(error) = self.remove_node_members(&self.node).await {
            warn!(%error, "cannot remove this node's clients from the cluster roster");
        }
        if let Err(error) = self.delete_node(&self.node).await {
            warn!(%error, "cannot remove this node's heartbeat");
        }
        let _ = self.store.client.flush().await;
        info!(node = %self.node, "left the cluster");
    }

    /// Applies what the watch of the `nodes` bucket reports.
    pub(super) fn on_node(&self, seen: Seen) {
        match seen {
            Seen::Value {
                key,
                revision,
                written,
                raw,
            } => match self.store.nodes.decode(&key, revision, &raw) {
                Ok(record) => {
                    // A record written long ago (a node that is gone) must
                    // not look fresh.
                    let age = SystemTime::now()
                        .duration_since(written)
                        .unwrap_or_default();
                    self.saw_node(record, age);
                }
                Err(error) => warn!(node = %key, %error, "unreadable heartbeat"),
            },
            Seen::Removed { key, .. } => {
                if self.forget_node(&key) {
                    info!(node = %key, "node left the cluster");
                }
            }
            Seen::Restarting => self.nodes_resynced(),
            Seen::Current => {}
        }
    }
}
