//! The relay domain: channels, clients, patterns, and the hub that ties
//! them together. No HTTP and no sockets live here; the connection task
//! ([`crate::ws`]) feeds messages in through [`Relay::dispatch`] and drains
//! each client's outbox.
//!
//! The relay holds one [`Coordinator`]: the port to whatever shares
//! channels with other nodes. Standalone, the [`Registry`] is the truth
//! about channels; in a cluster it is this node's copy of the shared
//! registry, and creating, ending, joining and leaving go through the
//! coordinator first. The relay never knows which one it holds.

pub mod admission;
pub mod channel;
pub mod client;
pub mod clock;
pub mod coordinator;
pub mod deliver;
pub mod evacuate;
mod expiry;
pub mod history;
pub mod ids;
pub mod order;
pub mod overload;
pub mod pattern;
mod publish;
pub mod registry;
pub mod subprotocol;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::ws::codec::OpCode;
use admission::Reservation;
use channel::{Channel, ChannelSpec, JoinError};
use client::{Client, QueueLimits, Wire};
use clock::{Clock, epoch_ms};
use coordinator::{
    Claim, CommandError, Coordinator, CoordinatorError, EndReason, Ended, Handle, JoinRefusal,
    Listed, NodeCommand, NodeStatus, SharedChannel, Standalone, Tasks,
};
use dashmap::DashMap;
use deliver::{Inbound, Outlet, Prepared, Source, prepare};
use evacuate::Evacuation;
pub use evacuate::{DrainKind, DrainSettings, RebalanceSettings};
use ids::{ChannelId, ClientId, Token};
use overload::{Capacity, Refusal};
use pattern::Intent;
pub use publish::{CallError, PublishError};
use registry::{CreateError, Registry};
use subprotocol::FrameError;

/// Attempts at drawing an unused channel id before giving up.
const ID_ATTEMPTS: usize = 16;

/// A node's state, as readiness and `GET /cluster` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Accepting connections.
    Ready,
    /// Draining (stopping, or evacuated for maintenance): not ready; after
    /// the drain delay refuses new connections and closes its clients.
    Draining,
    /// Holds well more than the average node and closes its excess; still
    /// takes connections, but tells the balancer it is unattractive.
    Shedding,
    /// Cannot reach the shared state (NATS): refuses new connections.
    Disconnected,
    /// Above 90 % of `WRS_MAX_CONNECTIONS` (until below 80 % again): not
    /// ready, though connections are still taken up to the maximum.
    Overloaded,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NodeState {
    pub const ALL: [NodeState; 5] = [
        NodeState::Ready,
        NodeState::Draining,
        NodeState::Shedding,
        NodeState::Overloaded,
        NodeState::Disconnected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Shedding => "shedding",
            NodeState::Disconnected => "disconnected",
            NodeState::Overloaded => "overloaded",
        }
    }
}

/// What happens when a client's outbox is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowConsumerPolicy {
    /// Close the client with 1008 "slow consumer" (it may reconnect).
    Close,
    /// Drop the message for that client and keep it connected.
    Drop,
}

impl SlowConsumerPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SlowConsumerPolicy::Close => "close",
            SlowConsumerPolicy::Drop => "drop",
        }
    }
}

/// What happens when a client sends faster than `WRS_CLIENT_RATE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRatePolicy {
    /// Stop reading its socket until the bucket refills (TCP backpressure,
    /// nothing is dropped).
    Throttle,
    /// Close it with 1008 "rate limit exceeded".
    Close,
}

/// The knobs of the relay, taken from the configuration.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    pub node_id: String,
    pub max_channels: usize,
    pub id_bytes: usize,
    pub token_length: usize,
    pub max_message_bytes: usize,
    pub queue: QueueLimits,
    pub slow_consumer: SlowConsumerPolicy,
    pub ping_interval: Duration,
    /// Most connections held at once (open or being upgraded).
    pub max_connections: usize,
    /// New connections per second and burst, if limited.
    pub connect_rate: Option<(u32, u32)>,
    /// Messages per second and burst of each client, if limited.
    pub client_rate: Option<(u32, u32)>,
    pub client_rate_policy: ClientRatePolicy,
    /// Connections are closed with 1012 at about this age (±10 %).
    pub max_connection_age: Option<Duration>,
    pub drain: DrainSettings,
    /// `None`: rebalancing is off.
    pub rebalance: Option<RebalanceSettings>,
    /// permessage-deflate is offered; messages from this size on are
    /// compressed. `None`: compression is off.
    pub compress_from: Option<usize>,
}

/// A message a client sent: a complete text (valid UTF-8) or binary payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
}

impl Message {
    pub fn payload(&self) -> &Bytes {
        match self {
            Message::Text(p) | Message::Binary(p) => p,
        }
    }
}

/// Why a connection attempt is refused before the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("node is draining")]
    Draining,
    #[error("unknown channel")]
    NotFound,
    #[error("missing token")]
    MissingToken,
    #[error("wrong token")]
    WrongToken,
    #[error("channel full ({limit} clients)")]
    Full { limit: u32 },
    #[error("the cluster store is unavailable")]
    Unavailable,
    #[error("node at its connection limit ({max})")]
    Overloaded { max: usize },
    #[error("connects arrive faster than the node's connect rate")]
    TooFast { wait: Duration },
}

impl From<JoinError> for ConnectError {
    fn from(error: JoinError) -> Self {
        match error {
            JoinError::Full { limit } => ConnectError::Full { limit },
            JoinError::Closed(_) => ConnectError::NotFound,
        }
    }
}

impl ConnectError {
    /// The refusal for a place the coordinator would not give.
    fn refused(channel: &Channel, refusal: JoinRefusal) -> Self {
        match refusal {
            JoinRefusal::Full { limit } => ConnectError::Full { limit },
            JoinRefusal::Unavailable(error) => {
                warn!(channel = %channel.id(), %error, "cannot take a place in the shared roster");
                ConnectError::Unavailable
            }
        }
    }
}

/// Result of carrying one message to its receivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Frames queued on this node.
    pub frames: u64,
    pub bytes: u64,
    /// Clients the message was routed to, on every node.
    pub addressed: u64,
    /// The one client it was routed to (a round-robin pick, a reply).
    pub to: Option<ClientId>,
    /// Its offset in the channel's history, if it keeps one.
    pub offset: Option<u64>,
}

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error(transparent)]
    Shared(#[from] CoordinatorError),
}

/// The hub: registry, coordinator, counters, lifecycle.
#[derive(Debug)]
pub struct Relay {
    settings: RelaySettings,
    clock: Clock,
    started_at: SystemTime,
    registry: Registry,
    coordinator: Arc<dyn Coordinator>,
    metrics: Arc<Metrics>,
    evacuation: Evacuation,
    capacity: Arc<Capacity>,
    /// Parent of every channel's token; cancelled when the relay stops.
    root: CancellationToken,
    /// Channel timeout watchers and the coordinator's loops.
    background: TaskTracker,
    /// WebSocket connection tasks.
    connections: TaskTracker,
    /// HTTP calls waiting on this node for their reply, by origin.
    calls: DashMap<ClientId, tokio::sync::oneshot::Sender<Bytes>>,
}

impl Relay {
    /// A relay that shares its channels through `coordinator`. Call
    /// [`Relay::start`] before serving.
    pub fn new(
        settings: RelaySettings,
        coordinator: Arc<dyn Coordinator>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let capacity = Capacity::new(settings.max_connections, settings.connect_rate);
        Arc::new(Self {
            registry: Registry::new(),
            capacity,
            settings,
            clock: Clock::new(),
            started_at: SystemTime::now(),
            coordinator,
            metrics,
            evacuation: Evacuation::default(),
            root: CancellationToken::new(),
            background: TaskTracker::new(),
            connections: TaskTracker::new(),
            calls: DashMap::new(),
        })
    }

    /// A standalone relay (its [`Relay::start`] has nothing to do).
    pub fn standalone(settings: RelaySettings) -> Arc<Self> {
        Self::new(
            settings,
            Arc::new(Standalone),
            Arc::new(Metrics::new(false)),
        )
    }

    /// Starts the coordinator's work for this relay.
    ///
    /// # Errors
    ///
    /// The coordinator's reason.
    pub async fn start(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        let tasks = Tasks::new(self.background.clone(), self.root.clone());
        self.coordinator.start(Handle::new(self), tasks).await?;
        if let Some(settings) = self.settings.rebalance
            && self.coordinator.nodes().is_some()
        {
            let relay = Arc::clone(self);
            let stop = self.root.clone();
            self.background.spawn(async move {
                stop.run_until_cancelled(relay.rebalance(settings)).await;
            });
        }
        Ok(())
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn coordinator(&self) -> &dyn Coordinator {
        &*self.coordinator
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn uptime(&self) -> Duration {
        Duration::from_millis(self.clock.now_ms())
    }

    pub fn is_draining(&self) -> bool {
        self.evacuation.is_draining()
    }

    /// This node's state: draining, unable to reach shared state,
    /// overloaded, shedding, or ready.
    pub fn state(&self) -> NodeState {
        if self.is_draining() {
            NodeState::Draining
        } else if !self.coordinator.is_available() {
            NodeState::Disconnected
        } else if self.capacity.is_overloaded() {
            NodeState::Overloaded
        } else if self.evacuation.is_shedding() {
            NodeState::Shedding
        } else {
            NodeState::Ready
        }
    }

    /// How attractive this node is to a balancer, 0–100: the share of its
    /// `WRS_MAX_CONNECTIONS` that is free, and 0 while it is not ready or
    /// sheds.
    pub fn weight(&self) -> u8 {
        match self.state() {
            NodeState::Ready => {
                let max = self.capacity.max().max(1);
                let free = max.saturating_sub(self.capacity.held());
                (free * 100 / max) as u8
            }
            NodeState::Overloaded
            | NodeState::Draining
            | NodeState::Shedding
            | NodeState::Disconnected => 0,
        }
    }

    /// Carries out a drain or ready command for node `node`: this one, or
    /// (in a cluster) another, through the coordinator. Returns the
    /// node's state afterwards.
    ///
    /// # Errors
    ///
    /// [`CommandError`]: no such node, a shutdown drain cannot be ended,
    /// or the node cannot be reached.
    pub async fn command(
        self: &Arc<Self>,
        node: &str,
        command: NodeCommand,
    ) -> Result<NodeState, CommandError> {
        if node == self.settings.node_id {
            self.apply(command)
        } else {
            self.coordinator.command(node, command).await
        }
    }

    /// Carries out a command for this node.
    pub(crate) fn apply(self: &Arc<Self>, command: NodeCommand) -> Result<NodeState, CommandError> {
        match command {
            NodeCommand::Drain => Ok(self.drain(DrainKind::Maintenance)),
            NodeCommand::Ready => self.undrain().map_err(|_| CommandError::ShuttingDown),
        }
    }

    /// The node's connections against its limits.
    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }

    /// Ready for new connections.
    pub fn is_ready(&self) -> bool {
        self.state() == NodeState::Ready
    }

    /// Channels this node holds (in a cluster: knows of).
    pub fn channel_count(&self) -> usize {
        self.registry.count()
    }

    /// What this node tells other nodes about itself.
    pub fn status(&self) -> NodeStatus {
        let totals = self.metrics.totals();
        NodeStatus {
            state: self.state(),
            connections: totals.connections_open,
            channels: self
                .registry
                .list()
                .iter()
                .filter(|c| !c.is_idle_here())
                .count() as u64,
            messages_in: totals.messages_in,
            max_channels: self.settings.max_channels,
            max_connections: self.capacity.max() as u64,
            weight: self.weight(),
        }
    }

    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    /// Creates a channel — in a cluster, in the shared registry, answering
    /// only once every node can find it — and returns it with its token,
    /// which is never available again.
    ///
    /// # Errors
    ///
    /// [`RelayError`]: the channel limit, or shared state unavailable.
    pub async fn create_channel(
        self: &Arc<Self>,
        spec: ChannelSpec,
    ) -> Result<(Arc<Channel>, Token), RelayError> {
        let limit = self.coordinator.channel_limit(self.settings.max_channels);
        self.registry.check_room(limit)?;
        for _ in 0..ID_ATTEMPTS {
            let id = ChannelId::random(self.settings.id_bytes);
            if self.registry.get(&id).is_some() {
                continue;
            }
            let token = Token::random(self.settings.token_length);
            let shared = SharedChannel {
                spec,
                token: token.digest(),
                created_at: SystemTime::now(),
                created_by: self.settings.node_id.clone(),
            };
            let channel = match self.coordinator.create(&id, &shared).await? {
                Claim::Taken => continue,
                // The id is this channel's everywhere; the coordinator may
                // even have told this node about it already.
                Claim::Claimed => self.hold(self.new_channel(id, &shared)),
                Claim::Local => {
                    let channel = self.new_channel(id, &shared);
                    if !self.registry.insert(Arc::clone(&channel), limit)? {
                        continue;
                    }
                    self.watch_expiry(&channel);
                    channel
                }
            };
            info!(
                channel = %channel.id(),
                pattern = %spec.pattern,
                client_limit = spec.client_limit.map_or(-1, i64::from),
                timeout_ms = spec.timeout.map_or(-1, |t| t.as_millis() as i64),
                "channel created"
            );
            return Ok((channel, token));
        }
        Err(CreateError::IdsExhausted.into())
    }

    /// A channel created now, on this node.
    fn new_channel(&self, id: ChannelId, shared: &SharedChannel) -> Arc<Channel> {
        Arc::new(Channel::new(
            id,
            shared.spec,
            shared.token,
            shared.created_at,
            self.clock,
            self.root.child_token(),
        ))
    }

    /// Takes a channel that exists elsewhere into this node's registry
    /// (unless it holds it already); returns the one held.
    pub(crate) fn adopt_channel(
        self: &Arc<Self>,
        id: ChannelId,
        shared: &SharedChannel,
    ) -> Arc<Channel> {
        if let Some(held) = self.registry.get(&id) {
            return held;
        }
        let channel = self.new_channel(id, shared);
        // Its timeout runs from creation, not from when this node heard of it.
        channel.set_last_activity(self.clock.from_epoch_ms(epoch_ms(shared.created_at)));
        self.hold(channel)
    }

    /// Adds a channel that exists in the shared registry (keeping one
    /// already held under its id); returns the one held.
    fn hold(self: &Arc<Self>, channel: Arc<Channel>) -> Arc<Channel> {
        let (channel, new) = self.registry.adopt(channel);
        if new {
            self.watch_expiry(&channel);
            let limit = self.settings.max_channels;
            if self.registry.count() == limit + 1 {
                warn!(
                    limit,
                    "this node now holds more channels than its WRS_MAX_CHANNELS: another node allows more; give every node the same limit"
                );
            }
        }
        channel
    }

    /// A channel this node holds.
    pub fn channel(&self, id: &ChannelId) -> Option<Arc<Channel>> {
        self.registry.get(id)
    }

    /// A channel by id; in a cluster, read through to the shared registry
    /// when this node has not heard of it yet.
    ///
    /// # Errors
    ///
    /// [`CoordinatorError`] when the shared registry cannot be read.
    pub async fn lookup(
        self: &Arc<Self>,
        id: &ChannelId,
    ) -> Result<Option<Arc<Channel>>, CoordinatorError> {
        if let Some(channel) = self.registry.get(id) {
            return Ok(Some(channel));
        }
        Ok(self
            .coordinator
            .fetch(id)
            .await?
            .map(|shared| self.adopt_channel(id.clone(), &shared)))
    }

    /// All channels, oldest first.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.registry.list()
    }

    /// Deletes a channel — in a cluster, everywhere; its clients are closed
    /// with 4001. `None` if there is no such channel.
    ///
    /// # Errors
    ///
    /// [`CoordinatorError`] when the shared registry cannot be written.
    pub async fn delete_channel(
        self: &Arc<Self>,
        id: &ChannelId,
    ) -> Result<Option<Arc<Channel>>, CoordinatorError> {
        let Some(channel) = self.lookup(id).await? else {
            return Ok(None);
        };
        Ok(match self.coordinator.end(id, EndReason::Deleted).await? {
            Ended::Ended => {
                self.close_local(id, EndReason::Deleted);
                Some(channel)
            }
            Ended::NotFound => None,
            Ended::Local => self.close_local(id, EndReason::Deleted),
        })
    }

    /// Deletes every channel, including any a dead node left half-ended;
    /// returns how many there were.
    ///
    /// # Errors
    ///
    /// [`CoordinatorError`] when the shared registry cannot be written.
    pub async fn reset(&self) -> Result<usize, CoordinatorError> {
        let mut ids: Vec<ChannelId> = self
            .registry
            .list()
            .iter()
            .map(|c| c.id().clone())
            .collect();
        ids.extend(self.coordinator.channel_ids().await?);
        ids.sort();
        ids.dedup();
        let mut deleted = 0;
        for id in ids {
            let ended = self.coordinator.end(&id, EndReason::Deleted).await?;
            let held = self.close_local(&id, EndReason::Deleted).is_some();
            if ended == Ended::Ended || (ended == Ended::Local && held) {
                deleted += 1;
            }
        }
        info!(channels = deleted, "all channels deleted");
        Ok(deleted)
    }

    /// Closes a channel on this node: removes it and closes its clients
    /// here with the code for `reason`. Returns it if it was held.
    pub fn close_local(&self, id: &ChannelId, reason: EndReason) -> Option<Arc<Channel>> {
        let channel = self.registry.remove(id)?;
        self.closed(&channel, reason);
        Some(channel)
    }

    /// Like [`Relay::close_local`], for exactly this channel (not a later
    /// one that reused its id).
    fn close_exact(&self, channel: &Arc<Channel>, reason: EndReason) {
        if self.registry.remove_exact(channel) {
            self.closed(channel, reason);
        }
    }

    fn closed(&self, channel: &Channel, reason: EndReason) {
        let clients = channel.close(reason.close_reason());
        self.coordinator.forget(channel.id());
        self.metrics.channel_closed(reason.as_str());
        match reason {
            EndReason::TimedOut => info!(channel = %channel.id(), clients, "channel timed out"),
            EndReason::Deleted => info!(channel = %channel.id(), clients, "channel deleted"),
        }
    }

    /// The channel's clients: ids, node (in a cluster) and connect times,
    /// in roster order.
    pub fn clients(&self, channel: &Channel) -> Vec<Listed> {
        self.coordinator.clients(channel).unwrap_or_else(|| {
            channel
                .clients()
                .into_iter()
                .map(|(id, connected_at, transport)| Listed {
                    id,
                    node: None,
                    connected_at,
                    transport,
                })
                .collect()
        })
    }

    /// How many clients a channel has (cluster-wide in a cluster).
    pub fn client_count(&self, channel: &Channel) -> usize {
        self.coordinator
            .client_count(channel)
            .unwrap_or_else(|| channel.client_count())
    }

    /// Checks a connection attempt before the upgrade.
    ///
    /// # Errors
    ///
    /// [`ConnectError`], in this order: draining (or shared state
    /// unreachable), faster than the connect rate, unknown channel, missing
    /// or wrong token.
    pub async fn authorize(
        self: &Arc<Self>,
        id: &ChannelId,
        token: Option<&str>,
    ) -> Result<Arc<Channel>, ConnectError> {
        match self.state() {
            NodeState::Ready | NodeState::Overloaded | NodeState::Shedding => {}
            // Within the drain delay the balancer may not have noticed yet.
            NodeState::Draining if !self.is_refusing() => {}
            NodeState::Draining => return Err(ConnectError::Draining),
            NodeState::Disconnected => return Err(ConnectError::Unavailable),
        }
        self.capacity
            .pace()
            .map_err(|refusal| self.refused(refusal))?;
        let channel = self
            .lookup(id)
            .await
            .map_err(|_| ConnectError::Unavailable)?
            .ok_or(ConnectError::NotFound)?;
        let token = token.ok_or(ConnectError::MissingToken)?;
        if !channel.token().matches(token) {
            return Err(ConnectError::WrongToken);
        }
        Ok(channel)
    }

    /// Holds a place in `channel` for a connection being upgraded — in a
    /// cluster, in the shared roster too.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Full`] at the client limit, `NotFound` if the channel
    /// closed meanwhile, `Unavailable` if shared state cannot be reached.
    pub async fn reserve(
        self: &Arc<Self>,
        channel: &Arc<Channel>,
        wire: Wire,
    ) -> Result<Reservation, ConnectError> {
        Reservation::hold(self, channel, wire).await
    }

    /// The refusal for the node's own limits.
    fn refused(&self, refusal: Refusal) -> ConnectError {
        match refusal {
            Refusal::Full => ConnectError::Overloaded {
                max: self.capacity.max(),
            },
            Refusal::TooFast(wait) => ConnectError::TooFast { wait },
        }
    }

    /// Delivery into this node's outboxes.
    pub(crate) fn outlet(&self) -> Outlet<'_> {
        Outlet {
            metrics: &self.metrics,
            policy: self.settings.slow_consumer,
            compress_from: self.settings.compress_from,
        }
    }

    /// Relays one message from `sender` according to the channel's pattern.
    /// Every relayed message restarts the channel's inactivity timeout.
    ///
    /// # Errors
    ///
    /// A [`FrameError`] for a sub-protocol frame that cannot be relayed; the
    /// caller answers the sender with an error frame.
    pub fn dispatch(
        &self,
        channel: &Arc<Channel>,
        sender: ClientId,
        message: Message,
    ) -> Result<(), FrameError> {
        self.relay(channel, Source::Client(sender), &message)
            .map(|_| ())
    }

    /// Bookkeeping after a message was relayed: activity, counters.
    fn relayed(&self, channel: &Arc<Channel>, delivered: &Delivered) {
        channel.touch();
        self.coordinator.note_activity(channel);
        self.metrics
            .delivered(channel.pattern(), delivered.frames, delivered.bytes);
    }

    fn relay(
        &self,
        channel: &Arc<Channel>,
        source: Source,
        message: &Message,
    ) -> Result<Delivered, FrameError> {
        let prepared = self.take_in(channel, source, message)?;
        self.relay_prepared(channel, source, prepared)
    }

    /// Counts a message in and classifies it for routing.
    fn take_in(
        &self,
        channel: &Channel,
        source: Source,
        message: &Message,
    ) -> Result<Prepared, FrameError> {
        let pattern = channel.pattern();
        self.metrics
            .message_in(pattern, message.payload().len() as u64);
        prepare(pattern, source.id(), message).inspect_err(|_| self.metrics.frame_error(pattern))
    }

    fn relay_prepared(
        &self,
        channel: &Arc<Channel>,
        source: Source,
        mut prepared: Prepared,
    ) -> Result<Delivered, FrameError> {
        let pattern = channel.pattern();
        let outlet = self.outlet();
        let relayed = if let Intent::Reply { origin } = prepared.intent
            && origin.is_call()
        {
            self.answer(channel, source.id(), origin, &prepared)
        } else {
            match (channel.history(), self.coordinator.shared_history()) {
                (Some(_), Some(shared)) => Ok(shared.relay(channel, source, &prepared)),
                // Numbered and delivered under the history's lock: every
                // client sees offsets in order, and a reader sees each
                // message either kept or delivered (see `history`).
                (Some(history), None) => {
                    let mut history = history.lock();
                    prepared.offset = Some(history.push(
                        self.clock.now_ms(),
                        prepared.opcode == OpCode::Binary,
                        prepared.payload.clone(),
                    ));
                    self.coordinator.relay(&outlet, channel, source, &prepared)
                }
                (None, _) => self.coordinator.relay(&outlet, channel, source, &prepared),
            }
        };
        match relayed {
            Ok(delivered) => {
                // An HTTP publish that nobody could take (409 no_receiver)
                // was not relayed: it is no activity.
                let untaken = matches!(source, Source::Outside(_))
                    && delivered.addressed == 0
                    && !matches!(pattern, pattern::Pattern::PubSub | pattern::Pattern::Echo);
                if !untaken {
                    self.relayed(channel, &delivered);
                }
                Ok(delivered)
            }
            Err(error) => {
                self.metrics.frame_error(pattern);
                Err(error)
            }
        }
    }

    /// Delivers a message that another node relayed to this node's
    /// clients; returns how many took it.
    fn deliver_inbound(&self, id: &ChannelId, inbound: &Inbound) -> u64 {
        let Some(channel) = self.registry.get(id) else {
            return 0;
        };
        let delivered = self.outlet().deliver_inbound(&channel, inbound);
        channel.touch();
        self.metrics.delivered(
            channel.pattern(),
            delivered,
            delivered * inbound.payload.len() as u64,
        );
        delivered
    }

    /// Queues a frame for one client, applying the slow-consumer policy.
    pub fn offer(&self, channel: &Channel, client: &Client, frame: Bytes) -> bool {
        self.outlet().offer(channel, client, frame)
    }

    /// Stops, after a shutdown drain: waits until the drain closed every
    /// client or `deadline` passed (then closes the rest with 1001 and
    /// gives them `grace` for their closing handshake), leaves the shared
    /// state, then stops the background tasks. Returns whether everything
    /// finished in time.
    pub async fn stop(self: &Arc<Self>, deadline: tokio::time::Instant, grace: Duration) -> bool {
        self.drain(DrainKind::Shutdown);
        if tokio::time::timeout_at(deadline, self.drained())
            .await
            .is_err()
        {
            let clients = self.close_remaining();
            info!(
                clients,
                "shutdown timeout: closing the clients left with 1001"
            );
        }
        let deadline = deadline.max(tokio::time::Instant::now()) + grace;
        self.connections.close();
        let connections_done = tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_ok();
        let left = tokio::time::timeout_at(deadline, self.coordinator.leave())
            .await
            .is_ok();
        self.root.cancel();
        self.background.close();
        let background_done = tokio::time::timeout_at(deadline, self.background.wait())
            .await
            .is_ok();
        connections_done && left && background_done
    }

    fn watch_expiry(self: &Arc<Self>, channel: &Arc<Channel>) {
        if channel.spec().timeout.is_some() {
            self.background.spawn(expiry::expire_when_idle(
                Arc::clone(self),
                Arc::clone(channel),
            ));
        }
    }
}
