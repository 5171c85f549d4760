//! Cluster mode (`WRS_NATS_URL`): the NATS adapter behind the relay's
//! [`Coordinator`] port. Every node connects to the same NATS. Shared
//! state lives in JetStream key-value buckets ([`records`]); messages
//! travel on core NATS subjects ([`transport`]).
//!
//! - [`connect`]: the connection and the buckets;
//! - [`store`]: a typed bucket with retries and the one watch loop;
//! - [`channels`]: creating, finding and ending channels;
//! - [`membership`]: the shared rosters, written in batches per node;
//! - [`activity`]: channel activity shared for cluster-wide timeouts;
//! - [`liveness`]: heartbeats, dead nodes, eviction;
//! - [`command`]: drain and ready commands from other nodes;
//! - [`transport`]: relaying messages between nodes, and the
//!   subscriptions that follow interest.
//!
//! The adapter depends on the relay; the relay never names it.

mod activity;
mod channels;
mod command;
pub mod connect;
mod history;
mod liveness;
mod membership;
pub mod records;
pub mod store;
mod transport;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashSet;
use parking_lot::Mutex;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::relay::Delivered;
use crate::relay::NodeState;
use crate::relay::channel::Channel;
use crate::relay::client::Transport;
use crate::relay::coordinator::{
    Claim, ClusterSummary, CommandError, Coordinator, CoordinatorError, EndReason, Ended,
    EvictError, ExpiryCheck, Handle, JoinRefusal, Listed, NodeCommand, NodeInfo, SharedChannel,
    Tasks,
};
use crate::relay::deliver::{Outlet, Prepared, Source};
use crate::relay::history::SharedHistory;
use crate::relay::ids::{ChannelId, ClientId};
use crate::relay::subprotocol::FrameError;
use connect::Store;

/// A node is considered gone after this many heartbeat intervals of silence.
pub const MISSED_HEARTBEATS: u32 = 3;

/// How to reach and use the cluster, from the configuration.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Comma-separated NATS server URLs.
    pub urls: String,
    /// Prefix of subjects and bucket names (`WRS_CLUSTER`).
    pub prefix: String,
    pub node_id: String,
    /// Host and port clients use for this node (shown in `/cluster`).
    pub address: String,
    pub credentials: Option<PathBuf>,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub kv_replicas: usize,
    pub heartbeat: Duration,
    /// How long to keep trying the first connection.
    pub connect_timeout: Duration,
    /// The largest client message (`WRS_MAX_MESSAGE_BYTES`): NATS must
    /// carry it with its headers.
    pub max_message_bytes: usize,
}

/// Why a node cannot join the cluster.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error(
        "the NATS server's max_payload is {max_payload} bytes, but WRS_MAX_MESSAGE_BYTES={max_message} \
         needs {needed} with headers: messages that large would be lost between nodes. \
         Set `max_payload: 2MB` (or more) in the NATS server configuration, \
         or lower WRS_MAX_MESSAGE_BYTES to at most {fits}"
    )]
    PayloadTooSmall {
        max_payload: usize,
        max_message: usize,
        needed: usize,
        fits: usize,
    },
    #[error("cannot open the key-value bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("cannot subscribe to this node's NATS subject: {0}")]
    Subscribe(String),
}

/// The relay's coordinator in cluster mode.
#[derive(Debug)]
pub struct NatsCoordinator {
    /// This coordinator, for tasks that outlive a call.
    me: Weak<NatsCoordinator>,
    node: Arc<str>,
    prefix: String,
    address: Mutex<String>,
    heartbeat: Duration,
    store: Store,
    metrics: Arc<Metrics>,
    channels: channels::Channels,
    members: membership::Membership,
    activity: activity::Activity,
    liveness: liveness::Liveness,
    transport: transport::Transport,
    /// The relay's handle and tasks, from [`Coordinator::start`].
    runtime: OnceLock<(Handle, Tasks)>,
    /// Keys of unknown channels being checked ([`NatsCoordinator::check_orphan`]).
    orphan_checks: DashSet<(Kind, String)>,
}

impl NatsCoordinator {
    /// Connects to NATS and opens the buckets.
    ///
    /// # Errors
    ///
    /// [`ClusterError`].
    pub async fn connect(
        settings: &ClusterSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<NatsCoordinator>, ClusterError> {
        let store = Store::open(settings).await?;
        Ok(Arc::new_cyclic(|me| NatsCoordinator {
            me: me.clone(),
            node: settings.node_id.as_str().into(),
            prefix: settings.prefix.clone(),
            address: Mutex::new(settings.address.clone()),
            heartbeat: settings.heartbeat,
            store,
            metrics,
            channels: channels::Channels::default(),
            members: membership::Membership::default(),
            activity: activity::Activity::default(),
            liveness: liveness::Liveness::new(),
            transport: transport::Transport::new(),
            runtime: OnceLock::new(),
            orphan_checks: DashSet::new(),
        }))
    }

    /// Sets the host and port clients use for this node (known once the
    /// port is bound).
    pub fn set_address(&self, address: String) {
        *self.address.lock() = address;
    }

    /// This coordinator, shared (it lives as long as a relay holds it).
    fn me(&self) -> Option<Arc<NatsCoordinator>> {
        self.me.upgrade()
    }

    fn handle(&self) -> Option<&Handle> {
        self.runtime.get().map(|(handle, _)| handle)
    }

    fn tasks(&self) -> Option<&Tasks> {
        self.runtime.get().map(|(_, tasks)| tasks)
    }

    /// Runs `task` on the relay's tracker (nothing before the start).
    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(tasks) = self.tasks() {
            tasks.spawn(task);
        }
    }

    fn is_connected(&self) -> bool {
        self.store.is_connected()
    }

    /// Follows every bucket, feeding this node's caches and relay.
    fn start_watches(&self) {
        let (Some(me), Some(tasks)) = (self.me(), self.tasks()) else {
            return;
        };
        let stop = tasks.stop().clone();
        let (node, halt) = (Arc::clone(&me), stop.clone());
        self.spawn(async move {
            node.store
                .channels
                .follow(&halt, |seen| node.on_channel(seen))
                .await
        });
        let (node, halt) = (Arc::clone(&me), stop.clone());
        self.spawn(async move {
            node.store
                .rosters
                .follow(&halt, |seen| node.on_segment(seen))
                .await
        });
        let (node, halt) = (Arc::clone(&me), stop.clone());
        self.spawn(async move {
            node.store
                .counts
                .follow(&halt, |seen| node.on_counts(seen))
                .await
        });
        let (node, halt) = (Arc::clone(&me), stop.clone());
        self.spawn(async move {
            node.store
                .nodes
                .follow(&halt, |seen| node.on_node(seen))
                .await
        });
        self.spawn(async move {
            me.store
                .activity
                .follow(&stop, |seen| me.on_activity(seen))
                .await
        });
    }

    /// A roster, count or activity key of a channel this node does not
    /// know: once the shared registry confirms the channel is gone (a join
    /// or an activity write that raced its end, or a node that died), the
    /// key is removed — if it is still at `revision`.
    fn check_orphan(&self, kind: Kind, key: String, revision: u64) {
        let Some(channel) = key.split('.').next().and_then(ChannelId::parse) else {
            return;
        };
        if self.knows_channel(&channel) || !self.orphan_checks.insert((kind, key.clone())) {
            return;
        }
        let Some(me) = self.me() else {
            return;
        };
        self.spawn(async move {
            // The channel's record may simply not have reached this node yet.
            tokio::time::sleep(ORPHAN_DELAY).await;
            let known = me.knows_channel(&channel)
                || me.handle().is_some_and(|h| h.channel(&channel).is_some());
            if !known && matches!(me.store.channels.get(channel.as_str()).await, Ok(None)) {
                let removed = match kind {
                    Kind::Roster => me.store.rosters.delete(&key, Some(revision)).await,
                    Kind::Counts => me.store.counts.delete(&key, Some(revision)).await,
                    Kind::Activity => me.store.activity.delete(&key, Some(revision)).await,
                };
                if matches!(removed, Ok(true)) {
                    tracing::info!(%channel, key, "removed what an ended channel left behind");
                }
            }
            me.orphan_checks.remove(&(kind, key));
        });
    }
}

/// Which per-channel bucket a key is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Roster,
    Counts,
    Activity,
}

/// How long a key of an unknown channel waits before it is checked.
const ORPHAN_DELAY: Duration = Duration::from_secs(2);

#[async_trait]
impl Coordinator for NatsCoordinator {
    async fn start(&self, node: Handle, tasks: Tasks) -> Result<(), CoordinatorError> {
        if self.runtime.set((node, tasks)).is_err() {
            return Ok(());
        }
        self.start_transport().await?;
        self.start_commands().await?;
        self.start_watches();
        self.start_heartbeat();
        self.start_activity();
        Ok(())
    }

    fn is_available(&self) -> bool {
        self.is_connected()
    }

    fn channel_limit(&self, own: usize) -> usize {
        self.smallest_channel_limit(own)
    }

    async fn create(
        &self,
        id: &ChannelId,
        channel: &SharedChannel,
    ) -> Result<Claim, CoordinatorError> {
        self.create_channel(id, channel).await
    }

    async fn fetch(&self, id: &ChannelId) -> Result<Option<SharedChannel>, CoordinatorError> {
        self.fetch_channel(id).await
    }

    async fn end(&self, id: &ChannelId, reason: EndReason) -> Result<Ended, CoordinatorError> {
        self.end_channel(id, reason).await
    }

    async fn channel_ids(&self) -> Result<Vec<ChannelId>, CoordinatorError> {
        self.shared_channel_ids().await
    }

    fn forget(&self, id: &ChannelId) {
        self.forget_channel(id);
    }

    async fn join(
        &self,
        channel: &Arc<Channel>,
        transport: Transport,
    ) -> Result<Option<ClientId>, JoinRefusal> {
        self.join_channel(channel, transport).await.map(Some)
    }

    fn left(&self, channel: &Arc<Channel>, id: Option<ClientId>) {
        self.leave_channel(channel, id);
    }

    fn clients(&self, channel: &Channel) -> Option<Vec<Listed>> {
        self.listed(channel.id())
    }

    fn client_count(&self, channel: &Channel) -> Option<usize> {
        self.listed_count(channel.id())
    }

    fn relay(
        &self,
        outlet: &Outlet<'_>,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, FrameError> {
        self.relay_message(outlet, channel, source, prepared)
    }

    async fn open_call(&self, origin: ClientId) -> Result<(), CoordinatorError> {
        self.listen_for_reply(origin).await
    }

    fn close_call(&self, origin: ClientId) {
        self.stop_listening(origin);
    }

    fn answer_elsewhere(
        &self,
        channel: &Channel,
        sender: ClientId,
        origin: ClientId,
        reply: Bytes,
    ) -> Result<(), FrameError> {
        self.send_reply(channel.id(), sender, origin, reply);
        Ok(())
    }

    fn note_activity(&self, channel: &Arc<Channel>) {
        self.queue_activity(channel);
    }

    fn expiry_grace(&self, timeout: Duration) -> Duration {
        activity::grace(timeout)
    }

    async fn confirm_expiry(
        &self,
        channel: &Arc<Channel>,
    ) -> Result<ExpiryCheck, CoordinatorError> {
        self.check_expiry(channel).await
    }

    async fn command(&self, node: &str, command: NodeCommand) -> Result<NodeState, CommandError> {
        self.send_command(node, command).await
    }

    fn nodes(&self) -> Option<Vec<NodeInfo>> {
        Some(self.node_infos())
    }

    fn summary(&self) -> Option<ClusterSummary> {
        Some(ClusterSummary {
            prefix: self.prefix.clone(),
            connected: self.is_connected(),
            nodes: self.live_nodes().len(),
        })
    }

    async fn evict(&self, node: &str) -> Result<usize, EvictError> {
        self.evict_node(node).await
    }

    async fn leave(&self) {
        self.leave_cluster().await;
    }

    fn shared_history(&self) -> Option<&dyn SharedHistory> {
        Some(self)
    }
}
