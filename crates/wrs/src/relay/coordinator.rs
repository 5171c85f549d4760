//! The port between the relay and whatever shares channels between nodes.
//!
//! The relay owns this seam: it holds one [`Coordinator`] and never knows
//! what is behind it. [`Standalone`] keeps nothing outside the process;
//! the cluster adapter (`crate::cluster`) keeps channels, rosters, activity
//! and nodes in NATS. A coordinator reaches back into the relay only
//! through the [`Handle`] and [`Tasks`] it is given at [`Coordinator::start`],
//! so dependencies run one way: the adapter depends on the relay, never
//! the other way round.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Relay;
use super::channel::{Channel, ChannelSpec};
use super::client::{CloseReason, Transport};
use super::clock::Clock;
use super::deliver::{Inbound, Outlet, Prepared, Source};
use super::history::SharedHistory;
use super::ids::{ChannelId, ClientId, TokenDigest};
use super::subprotocol::FrameError;
use super::{Delivered, NodeState};

/// A channel as every node of a cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedChannel {
    pub spec: ChannelSpec,
    pub token: TokenDigest,
    pub created_at: SystemTime,
    /// The node that created it.
    pub created_by: String,
}

/// Why a channel ended; its clients are closed with the matching code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `DELETE /channels/{id}` or `DELETE /reset`: 4001.
    Deleted,
    /// The inactivity timeout ran out: 4002.
    TimedOut,
}

impl EndReason {
    pub fn close_reason(self) -> CloseReason {
        match self {
            EndReason::Deleted => CloseReason::ChannelDeleted,
            EndReason::TimedOut => CloseReason::ChannelTimedOut,
        }
    }

    /// The label of `wrs_channels_closed_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Deleted => "deleted",
            EndReason::TimedOut => "timed_out",
        }
    }
}

/// Why shared state could not be read or written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    #[error("the cluster store is unavailable: {0}")]
    Unavailable(String),
    /// A stored value cannot be read. It is left as it is: overwriting it
    /// would lose what it holds.
    #[error("{what} cannot be read ({reason}); it is left untouched")]
    Corrupt { what: String, reason: String },
    #[error("too many concurrent changes to channel {0}; try again")]
    Contention(String),
}

/// The answer to a claim of a new channel id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id is this channel's now, everywhere.
    Claimed,
    /// Another channel has this id.
    Taken,
    /// Nothing is shared: this node's registry decides.
    Local,
}

/// The answer to ending a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// This call ended it, everywhere.
    Ended,
    /// There is no such channel (any more).
    NotFound,
    /// Nothing is shared: this node's registry decides.
    Local,
}

/// Why a client cannot take a place in a channel.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("channel full ({limit} clients)")]
    Full { limit: u32 },
    #[error(transparent)]
    Unavailable(#[from] CoordinatorError),
}

/// Whether a channel whose inactivity deadline passed here may end now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryCheck {
    /// Yes: this node ends it.
    Expire,
    /// Not yet: look again after this long (newer activity was found and
    /// noted on the channel, or another node goes first).
    Later(Duration),
}

/// A client as the channel's roster lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub id: ClientId,
    /// The node it is connected to (in a cluster).
    pub node: Option<String>,
    pub connected_at: SystemTime,
    pub transport: Transport,
}

/// One node, as `GET /cluster` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub state: NodeState,
    pub started_at: SystemTime,
    /// Channels with clients on the node.
    pub channels: u64,
    /// Clients connected to the node.
    pub clients: u64,
    pub messages_per_second: u64,
    /// The node's `WRS_MAX_CONNECTIONS` (0: a version that did not say).
    pub max_connections: u64,
    /// How attractive the node is to a balancer, 0–100.
    pub weight: u8,
    pub this_node: bool,
}

/// What `GET /service` shows of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSummary {
    /// Prefix of the shared state's names (`WRS_CLUSTER`).
    pub prefix: String,
    pub connected: bool,
    /// Live nodes, this one included.
    pub nodes: usize,
}

/// Why a node cannot be evicted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvictError {
    #[error("no node {0:?} in this cluster")]
    NotFound(String),
    #[error("a node cannot evict itself")]
    Itself,
    #[error(transparent)]
    Unavailable(#[from] CoordinatorError),
}

/// What one node may ask of another (`POST /cluster/{nodeId}/drain`,
/// `.../ready`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeCommand {
    /// Start a maintenance drain.
    Drain,
    /// End a maintenance drain.
    Ready,
}

/// Why a node command was not carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("no live node {0:?} in this cluster")]
    NotFound(String),
    #[error("the node is shutting down; its drain cannot be ended")]
    ShuttingDown,
    #[error("{0}")]
    Unavailable(String),
}

/// Keeps channels, their rosters, their activity and the nodes in step
/// across the nodes that share them.
///
/// Methods without `async` are called on the message path or under the
/// relay's bookkeeping and never wait.
#[async_trait]
pub trait Coordinator: Send + Sync + fmt::Debug + 'static {
    /// Starts the coordinator's background work on `tasks`; it learns about
    /// this node's relay through `node`. Called once, before the relay
    /// serves anything.
    ///
    /// # Errors
    ///
    /// Why the work cannot start.
    async fn start(&self, node: Handle, tasks: Tasks) -> Result<(), CoordinatorError>;

    /// Whether shared state can be reached now (readiness).
    fn is_available(&self) -> bool;

    /// The most channels that may exist, given this node's own limit
    /// (`WRS_MAX_CHANNELS`): in a cluster every node holds every channel,
    /// so the smallest limit of the live nodes counts.
    fn channel_limit(&self, own: usize) -> usize;

    /// Claims `id` for a new channel; answers once every node can find it.
    async fn create(
        &self,
        id: &ChannelId,
        channel: &SharedChannel,
    ) -> Result<Claim, CoordinatorError>;

    /// A channel this node has not heard of yet (read your writes).
    async fn fetch(&self, id: &ChannelId) -> Result<Option<SharedChannel>, CoordinatorError>;

    /// Ends a channel everywhere, exactly once.
    async fn end(&self, id: &ChannelId, reason: EndReason) -> Result<Ended, CoordinatorError>;

    /// Every channel id the shared state holds (empty when nothing is
    /// shared), including any left half-ended by a node that died.
    async fn channel_ids(&self) -> Result<Vec<ChannelId>, CoordinatorError>;

    /// The channel was closed on this node: drop what is kept for it.
    fn forget(&self, id: &ChannelId);

    /// Takes a place in the channel's shared roster for a client of this
    /// node; `Some` id is the client's, unique in the channel everywhere
    /// (`None`: the relay draws one). The local place is already held.
    async fn join(
        &self,
        channel: &Arc<Channel>,
        transport: Transport,
    ) -> Result<Option<ClientId>, JoinRefusal>;

    /// A place of this node in the channel was given up (already here):
    /// a client that left, or a join that did not complete (`id` is the
    /// place's id if [`Coordinator::join`] gave one).
    fn left(&self, channel: &Arc<Channel>, id: Option<ClientId>);

    /// The channel's clients everywhere, in roster order; `None` when the
    /// local roster is the whole truth.
    fn clients(&self, channel: &Channel) -> Option<Vec<Listed>>;

    /// How many clients the channel has everywhere; `None` as for `clients`.
    fn client_count(&self, channel: &Channel) -> Option<usize>;

    /// Relays a message by the channel's pattern: receivers on this node go
    /// through `outlet`, receivers elsewhere through the shared transport.
    /// Never waits.
    ///
    /// # Errors
    ///
    /// [`FrameError::UnknownOrigin`] for a reply to a client connected
    /// nowhere.
    fn relay(
        &self,
        outlet: &Outlet<'_>,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, FrameError>;

    /// An HTTP call on this node waits for replies to `origin`: replies
    /// sent by clients on other nodes must find it from now on.
    async fn open_call(&self, origin: ClientId) -> Result<(), CoordinatorError>;

    /// The call for `origin` ended.
    fn close_call(&self, origin: ClientId);

    /// Carries a reply from this node's client `sender` to the call for
    /// `origin`, which does not wait on this node. Never waits; if it turns
    /// out that no call waits anywhere, the sender gets the error frame
    /// later.
    ///
    /// # Errors
    ///
    /// [`FrameError::UnknownOrigin`] when it is known at once that no call
    /// waits for `origin`.
    fn answer_elsewhere(
        &self,
        channel: &Channel,
        sender: ClientId,
        origin: ClientId,
        reply: Bytes,
    ) -> Result<(), FrameError>;

    /// Something was relayed on the channel here; other nodes must learn
    /// of it before they may let the channel time out. Never waits.
    fn note_activity(&self, channel: &Arc<Channel>);

    /// How long after its local deadline a channel is checked for expiry:
    /// the time activity elsewhere may take to become known here.
    fn expiry_grace(&self, timeout: Duration) -> Duration;

    /// Asked once the local deadline plus the grace passed.
    async fn confirm_expiry(&self, channel: &Arc<Channel>)
    -> Result<ExpiryCheck, CoordinatorError>;

    /// The nodes sharing channels, this one included; `None` standalone.
    fn nodes(&self) -> Option<Vec<NodeInfo>>;

    /// What `GET /service` shows; `None` standalone.
    fn summary(&self) -> Option<ClusterSummary>;

    /// Removes a dead node's clients and heartbeat at once; returns how
    /// many clients were removed.
    async fn evict(&self, node: &str) -> Result<usize, EvictError>;

    /// Has another node carry out `command`; returns its state afterwards.
    async fn command(&self, node: &str, command: NodeCommand) -> Result<NodeState, CommandError>;

    /// This node stops: remove what it holds in shared state.
    async fn leave(&self);

    /// The history of channels that keep one, when it is kept outside
    /// this process; `None`: the relay keeps it in memory.
    fn shared_history(&self) -> Option<&dyn SharedHistory> {
        None
    }
}

/// What a coordinator may do with this node's relay. Holds the relay
/// weakly: once the relay is gone every call is a no-op.
#[derive(Clone, Debug)]
pub struct Handle {
    relay: Weak<Relay>,
    clock: Clock,
}

/// What a node tells the others about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub state: NodeState,
    pub connections: u64,
    /// Channels with clients on this node.
    pub channels: u64,
    /// Messages received from this node's clients so far.
    pub messages_in: u64,
    /// `WRS_MAX_CHANNELS`.
    pub max_channels: usize,
    /// `WRS_MAX_CONNECTIONS`.
    pub max_connections: u64,
    /// How attractive the node is to a balancer, 0–100.
    pub weight: u8,
}

impl Handle {
    pub(super) fn new(relay: &Arc<Relay>) -> Self {
        Self {
            relay: Arc::downgrade(relay),
            clock: relay.clock(),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The channel, if this node holds it.
    pub fn channel(&self, id: &ChannelId) -> Option<Arc<Channel>> {
        self.relay.upgrade()?.channel(id)
    }

    /// Every channel this node holds.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.relay
            .upgrade()
            .map(|relay| relay.channels())
            .unwrap_or_default()
    }

    /// Takes a channel that exists elsewhere into this node's registry.
    pub fn adopt(&self, id: ChannelId, channel: &SharedChannel) -> Option<Arc<Channel>> {
        Some(self.relay.upgrade()?.adopt_channel(id, channel))
    }

    /// A channel ended elsewhere: close it here with `reason`.
    pub fn ended(&self, id: &ChannelId, reason: EndReason) {
        if let Some(relay) = self.relay.upgrade() {
            relay.close_local(id, reason);
        }
    }

    /// Hands a reply from another node to the call waiting here for
    /// `origin`; false if none waits.
    pub fn answer_call(&self, origin: ClientId, reply: Bytes) -> bool {
        self.relay
            .upgrade()
            .is_some_and(|relay| relay.answer_call(origin, reply))
    }

    /// Sends this node's client `client` of channel `id` the error frame
    /// for a sub-protocol frame that could not be relayed.
    pub fn frame_error(&self, id: &ChannelId, client: ClientId, error: &FrameError) {
        let Some(relay) = self.relay.upgrade() else {
            return;
        };
        let Some(channel) = relay.channel(id) else {
            return;
        };
        relay.metrics().frame_error(channel.pattern());
        let members = channel.members();
        if let Some(client) = members.client(client) {
            let frame = crate::ws::codec::encode(
                crate::ws::codec::OpCode::Text,
                error.to_json().as_bytes(),
            );
            relay.offer(&channel, client, frame);
        }
    }

    /// Delivers a message from another node to this node's clients;
    /// returns how many took it.
    pub fn deliver(&self, id: &ChannelId, inbound: &Inbound) -> u64 {
        self.relay
            .upgrade()
            .map_or(0, |relay| relay.deliver_inbound(id, inbound))
    }

    /// This node's state and load.
    pub fn status(&self) -> Option<NodeStatus> {
        self.relay.upgrade().map(|relay| relay.status())
    }

    /// Carries out a command another node sent to this one.
    pub fn command(&self, command: NodeCommand) -> Result<NodeState, CommandError> {
        match self.relay.upgrade() {
            Some(relay) => relay.apply(command),
            None => Err(CommandError::ShuttingDown),
        }
    }
}

/// The relay's task tracker and stop signal, for a coordinator's
/// background work: every task is tracked and ends when the relay stops.
#[derive(Clone, Debug)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub(super) fn new(tracker: TaskTracker, stop: CancellationToken) -> Self {
        Self { tracker, stop }
    }

    /// Runs `task` until it ends or the relay stops.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            stop.run_until_cancelled(task).await;
        });
    }

    /// Cancelled when the relay stops.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }
}

/// A node on its own: every channel and client lives in this process, so
/// there is nothing to share and nobody to ask.
#[derive(Debug, Default)]
pub struct Standalone;

#[async_trait]
impl Coordinator for Standalone {
    async fn start(&self, _node: Handle, _tasks: Tasks) -> Result<(), CoordinatorError> {
        Ok(())
    }

    fn is_available(&self) -> bool {
        true
    }

    fn channel_limit(&self, own: usize) -> usize {
        own
    }

    async fn create(&self, _: &ChannelId, _: &SharedChannel) -> Result<Claim, CoordinatorError> {
        Ok(Claim::Local)
    }

    async fn fetch(&self, _: &ChannelId) -> Result<Option<SharedChannel>, CoordinatorError> {
        Ok(None)
    }

    async fn end(&self, _: &ChannelId, _: EndReason) -> Result<Ended, CoordinatorError> {
        Ok(Ended::Local)
    }

    async fn channel_ids(&self) -> Result<Vec<ChannelId>, CoordinatorError> {
        Ok(Vec::new())
    }

    fn forget(&self, _: &ChannelId) {}

    async fn join(&self, _: &Arc<Channel>, _: Transport) -> Result<Option<ClientId>, JoinRefusal> {
        Ok(None)
    }

    fn left(&self, _: &Arc<Channel>, _: Option<ClientId>) {}

    fn clients(&self, _: &Channel) -> Option<Vec<Listed>> {
        None
    }

    fn client_count(&self, _: &Channel) -> Option<usize> {
        None
    }

    fn relay(
        &self,
        outlet: &Outlet<'_>,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, FrameError> {
        outlet.route_locally(channel, source, prepared)
    }

    async fn open_call(&self, _: ClientId) -> Result<(), CoordinatorError> {
        Ok(())
    }

    fn close_call(&self, _: ClientId) {}

    fn answer_elsewhere(
        &self,
        _: &Channel,
        _: ClientId,
        origin: ClientId,
        _: Bytes,
    ) -> Result<(), FrameError> {
        Err(FrameError::UnknownOrigin(origin.to_string()))
    }

    fn note_activity(&self, _: &Arc<Channel>) {}

    fn expiry_grace(&self, _: Duration) -> Duration {
        Duration::ZERO
    }

    async fn confirm_expiry(&self, _: &Arc<Channel>) -> Result<ExpiryCheck, CoordinatorError> {
        Ok(ExpiryCheck::Expire)
    }

    fn nodes(&self) -> Option<Vec<NodeInfo>> {
        None
    }

    fn summary(&self) -> Option<ClusterSummary> {
        None
    }

    async fn evict(&self, node: &str) -> Result<usize, EvictError> {
        Err(EvictError::NotFound(node.to_owned()))
    }

    async fn command(&self, node: &str, _: NodeCommand) -> Result<NodeState, CommandError> {
        Err(CommandError::NotFound(node.to_owned()))
    }

    async fn leave(&self) {}
}
