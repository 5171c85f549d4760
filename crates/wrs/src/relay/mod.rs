//! The relay domain: channels, clients, patterns, and the hub that ties
//! them to a backplane. No HTTP and no sockets live here; the connection
//! task ([`crate::ws`]) feeds messages in through [`Relay::dispatch`] and
//! drains each client's outbox.
//!
//! Standalone, the [`Registry`] is the truth about channels. In a cluster
//! it is this node's cache of the shared registry, and channel lifecycle,
//! reservations and departures go through [`Cluster`] first.

pub mod channel;
pub mod client;
pub mod ids;
pub mod order;
pub mod pattern;
pub mod registry;
pub mod subprotocol;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backplane::Backplane;
use crate::backplane::local::LocalBackplane;
use crate::backplane::nats::NatsBackplane;
use crate::cluster::records::{ChannelRecord, epoch_ms, from_epoch_ms};
use crate::cluster::{Cluster, ClusterError, ReserveError};
use crate::metrics::Metrics;
use channel::{Channel, ChannelSpec, JoinError, Reservation};
use client::{Client, CloseReason, PushError, QueueLimits};
use ids::{ChannelId, ClientId, Token};
use registry::{CreateError, Registry};
use subprotocol::FrameError;

/// A monotonic millisecond clock shared by all channels of a relay, with
/// the wall-clock time of its start for converting to and from epoch ms.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
    epoch_wall_ms: u64,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            epoch_wall_ms: epoch_ms(SystemTime::now()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// A wall-clock time (ms since the Unix epoch) on this clock.
    pub fn from_epoch_ms(&self, epoch: u64) -> u64 {
        epoch.saturating_sub(self.epoch_wall_ms)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
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
    /// Cluster mode: the channel's roster fills one NATS message.
    #[error("channel full ({clients} clients, the most its cluster roster holds)")]
    RosterFull { clients: usize },
    #[error("the cluster store is unavailable")]
    Unavailable,
}

/// Result of carrying one message to its receivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    pub frames: u64,
    pub bytes: u64,
}

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// The hub: registry, backplane, counters, lifecycle.
#[derive(Debug)]
pub struct Relay {
    settings: RelaySettings,
    clock: Clock,
    started_at: SystemTime,
    registry: Registry,
    backplane: Box<dyn Backplane>,
    cluster: Option<Arc<Cluster>>,
    /// In a cluster: channels whose broadcasts this node subscribes to
    /// (those with clients here), with the token that ends the subscription.
    interest: DashMap<ChannelId, CancellationToken>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// Parent of every channel's token; cancelled when the relay stops.
    root: CancellationToken,
    /// Channel timeout watchers and cluster loops.
    background: TaskTracker,
    /// WebSocket connection tasks.
    connections: TaskTracker,
}

impl Relay {
    /// A standalone relay.
    pub fn new(settings: RelaySettings) -> Arc<Self> {
        Self::build(settings, None, Arc::new(Metrics::new(false)))
    }

    /// A relay that is one node of a cluster. Start its loops with
    /// [`crate::cluster::sync::start`].
    pub fn clustered(settings: RelaySettings, cluster: Arc<Cluster>) -> Arc<Self> {
        let metrics = Arc::clone(cluster.metrics());
        Self::build(settings, Some(cluster), metrics)
    }

    fn build(
        settings: RelaySettings,
        cluster: Option<Arc<Cluster>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let backplane: Box<dyn Backplane> = match &cluster {
            None => Box::new(LocalBackplane::new(
                Arc::clone(&metrics),
                settings.slow_consumer,
            )),
            Some(cluster) => Box::new(NatsBackplane::new(
                Arc::clone(cluster),
                Arc::clone(&metrics),
                settings.slow_consumer,
            )),
        };
        Arc::new(Self {
            registry: Registry::new(
                settings.max_channels,
                settings.id_bytes,
                settings.token_length,
            ),
            settings,
            clock: Clock::new(),
            started_at: SystemTime::now(),
            backplane,
            cluster,
            interest: DashMap::new(),
            metrics,
            draining: AtomicBool::new(false),
            root: CancellationToken::new(),
            background: TaskTracker::new(),
            connections: TaskTracker::new(),
        })
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn uptime(&self) -> Duration {
        Duration::from_millis(self.clock.now_ms())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ready for new connections: not draining, and in a cluster connected
    /// to NATS.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.cluster.as_ref().is_none_or(|c| c.is_connected())
    }

    /// Channels this node holds (in a cluster: knows of).
    pub fn channel_count(&self) -> usize {
        self.registry.count()
    }

    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    pub(crate) fn background(&self) -> &TaskTracker {
        &self.background
    }

    pub(crate) fn root(&self) -> &CancellationToken {
        &self.root
    }

    /// Creates a channel — in a cluster, in the shared registry, answering
    /// only once NATS acknowledged the write — and returns it with its
    /// token, which is never available again.
    ///
    /// # Errors
    ///
    /// [`RelayError`]: the channel limit, or the cluster unavailable.
    pub async fn create_channel(
        self: &Arc<Self>,
        spec: ChannelSpec,
    ) -> Result<(Arc<Channel>, Token), RelayError> {
        let (channel, token) = match &self.cluster {
            None => self
                .registry
                .create(spec, self.clock, self.root.child_token())?,
            Some(cluster) => {
                self.registry.check_room()?;
                let mut created = None;
                for _ in 0..16 {
                    let id = ChannelId::random(self.registry.id_bytes());
                    let token = Token::random(self.registry.token_length());
                    let now = SystemTime::now();
                    let record = ChannelRecord::new(&spec, token.digest(), now, cluster.node());
                    if cluster.create_channel(&id, &record).await? {
                        let channel = Arc::new(Channel::new(
                            id,
                            spec,
                            token.digest(),
                            now,
                            self.clock,
                            self.root.child_token(),
                        ));
                        created = Some((self.registry.adopt(channel).0, token));
                        break;
                    }
                }
                created.ok_or(CreateError::IdsExhausted)?
            }
        };
        self.watch_expiry(&channel);
        info!(
            channel = %channel.id(),
            pattern = %spec.pattern,
            client_limit = spec.client_limit.map_or(-1, i64::from),
            timeout_ms = spec.timeout.map_or(-1, |t| t.as_millis() as i64),
            "channel created"
        );
        Ok((channel, token))
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
    /// [`ClusterError`] when the shared registry cannot be read.
    pub async fn lookup(
        self: &Arc<Self>,
        id: &ChannelId,
    ) -> Result<Option<Arc<Channel>>, ClusterError> {
        if let Some(channel) = self.registry.get(id) {
            return Ok(Some(channel));
        }
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        Ok(cluster
            .fetch_channel(id)
            .await?
            .and_then(|(record, _)| self.adopt(id.clone(), &record)))
    }

    /// Takes a channel from the shared registry into this node's cache.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        id: ChannelId,
        record: &ChannelRecord,
    ) -> Option<Arc<Channel>> {
        let (spec, digest) = record.spec()?;
        let created_at = from_epoch_ms(record.created_at_ms);
        let channel = Arc::new(Channel::new(
            id,
            spec,
            digest,
            created_at,
            self.clock,
            self.root.child_token(),
        ));
        // Its timeout runs from creation, not from when this node heard of it.
        channel.set_last_activity(self.clock.from_epoch_ms(record.created_at_ms));
        let (channel, new) = self.registry.adopt(channel);
        if new {
            self.watch_expiry(&channel);
        }
        Some(channel)
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
    /// [`ClusterError`] when the shared registry cannot be written.
    pub async fn delete_channel(
        self: &Arc<Self>,
        id: &ChannelId,
    ) -> Result<Option<Arc<Channel>>, ClusterError> {
        let Some(cluster) = &self.cluster else {
            return Ok(self.close_local(id, CloseReason::ChannelDeleted));
        };
        let Some(channel) = self.lookup(id).await? else {
            return Ok(None);
        };
        if !cluster.close_channel(id, "deleted", None).await? {
            // Deleted elsewhere in the meantime.
            return Ok(None);
        }
        self.close_local(id, CloseReason::ChannelDeleted);
        Ok(Some(channel))
    }

    /// Deletes every channel; returns how many there were.
    ///
    /// # Errors
    ///
    /// [`ClusterError`] when the shared registry cannot be written.
    pub async fn reset(&self) -> Result<usize, ClusterError> {
        let mut deleted = 0;
        match &self.cluster {
            None => {
                for channel in self.registry.list() {
                    if self
                        .close_local(channel.id(), CloseReason::ChannelDeleted)
                        .is_some()
                    {
                        deleted += 1;
                    }
                }
            }
            Some(cluster) => {
                for id in cluster.channel_ids().await? {
                    if cluster.close_channel(&id, "deleted", None).await? {
                        self.close_local(&id, CloseReason::ChannelDeleted);
                        deleted += 1;
                    }
                }
            }
        }
        info!(channels = deleted, "all channels deleted");
        Ok(deleted)
    }

    /// Closes a channel on this node: removes it and closes its clients
    /// here with `reason`. Returns it if it was held.
    pub(crate) fn close_local(&self, id: &ChannelId, reason: CloseReason) -> Option<Arc<Channel>> {
        let channel = self.registry.remove(id)?;
        let clients = channel.close(reason);
        if let Some(cluster) = &self.cluster {
            cluster.forget_members(id);
            cluster.forget_activity(id);
            if let Some((_, subscription)) = self.interest.remove(id) {
                subscription.cancel();
            }
        }
        let label = match reason {
            CloseReason::ChannelTimedOut => "timed_out",
            _ => "deleted",
        };
        self.metrics.channel_closed(label);
        match reason {
            CloseReason::ChannelTimedOut => info!(channel = %id, clients, "channel timed out"),
            _ => info!(channel = %id, clients, "channel deleted"),
        }
        Some(channel)
    }

    /// The channel's clients: ids, node (in a cluster) and connect times,
    /// in join order.
    pub fn clients(&self, channel: &Channel) -> Vec<(ClientId, Option<String>, SystemTime)> {
        match self.cluster.as_ref().and_then(|c| c.members(channel.id())) {
            Some(members) => members
                .doc
                .nodes
                .iter()
                .flat_map(|(node, list)| {
                    list.iter()
                        .map(move |m| (m.id, Some(node.clone()), from_epoch_ms(m.at)))
                })
                .collect(),
            None => channel
                .clients()
                .into_iter()
                .map(|(id, at)| (id, None, at))
                .collect(),
        }
    }

    /// How many clients a channel has (cluster-wide in a cluster).
    pub fn client_count(&self, channel: &Channel) -> usize {
        match self.cluster.as_ref().and_then(|c| c.members(channel.id())) {
            Some(members) => members.doc.len(),
            None => channel.client_count(),
        }
    }

    /// Checks a connection attempt before the upgrade.
    ///
    /// # Errors
    ///
    /// [`ConnectError`], in this order: draining (or, in a cluster, NATS
    /// unreachable), unknown channel, missing or wrong token.
    pub async fn authorize(
        self: &Arc<Self>,
        id: &ChannelId,
        token: Option<&str>,
    ) -> Result<Arc<Channel>, ConnectError> {
        if self.is_draining() {
            return Err(ConnectError::Draining);
        }
        if self.cluster.as_ref().is_some_and(|c| !c.is_connected()) {
            return Err(ConnectError::Unavailable);
        }
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

    /// Holds a place in `channel` for a connection being upgraded. In a
    /// cluster the place is taken in the shared roster (compare-and-set),
    /// after this node subscribed to the channel's broadcasts.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Full`] at the client limit, `NotFound` if the channel
    /// closed meanwhile, `Unavailable` if the cluster cannot be reached.
    pub async fn reserve(
        self: &Arc<Self>,
        channel: &Arc<Channel>,
    ) -> Result<Reservation, ConnectError> {
        let closed = |e| match e {
            JoinError::Full { limit } => ConnectError::Full { limit },
            JoinError::Closed(_) => ConnectError::NotFound,
        };
        let Some(cluster) = &self.cluster else {
            return channel.reserve().map_err(closed);
        };
        // Held here first, so the subscription below stays while we wait.
        let mut reservation = channel.reserve_unchecked().map_err(closed)?;
        self.ensure_interest(cluster, channel).await?;
        let id = match cluster
            .reserve(channel.id(), channel.spec().client_limit)
            .await
        {
            Ok(id) => id,
            Err(error) => {
                let refusal = match error {
                    ReserveError::Full { limit } => ConnectError::Full { limit },
                    ReserveError::RosterFull { clients } => {
                        warn!(channel = %channel.id(), clients, "channel full: its cluster roster fills a NATS message (max_payload)");
                        ConnectError::RosterFull { clients }
                    }
                    ReserveError::Cluster(error) => {
                        warn!(channel = %channel.id(), %error, "cannot reserve a place in the cluster");
                        ConnectError::Unavailable
                    }
                };
                drop(reservation);
                self.drop_interest_if_idle(channel);
                return Err(refusal);
            }
        };
        let relay = Arc::clone(self);
        let held = Arc::clone(channel);
        reservation.assign(
            id,
            Box::new(move |id| {
                let task = Arc::clone(&relay);
                relay
                    .background
                    .spawn(async move { task.leave(&held, id).await });
            }),
        );
        Ok(reservation)
    }

    /// A client left (or its upgrade failed): removes it here and, in a
    /// cluster, from the shared roster.
    pub async fn leave(&self, channel: &Arc<Channel>, id: ClientId) {
        channel.leave(id);
        if let Some(cluster) = &self.cluster {
            // Without NATS the store calls would only wait out their
            // retries: the heartbeat's reconciliation repairs the roster
            // once NATS is back (or, if this node stops, the others evict
            // it after missed heartbeats).
            if cluster.is_connected()
                && let Err(error) = cluster.release(channel.id(), id).await
            {
                warn!(channel = %channel.id(), client = %id, %error, "cannot remove a client from the cluster roster");
            }
            self.drop_interest_if_idle(channel);
        }
    }

    /// Subscribes to a channel's broadcasts unless already subscribed; the
    /// subscription is in place at the server before this returns.
    async fn ensure_interest(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        channel: &Arc<Channel>,
    ) -> Result<(), ConnectError> {
        if self.interest.contains_key(channel.id()) {
            return Ok(());
        }
        let subscriber = cluster
            .client()
            .subscribe(cluster.all_subject(channel.id()))
            .await
            .map_err(|_| ConnectError::Unavailable)?;
        cluster
            .client()
            .flush()
            .await
            .map_err(|_| ConnectError::Unavailable)?;
        if let dashmap::Entry::Vacant(slot) = self.interest.entry(channel.id().clone()) {
            let stop = self.root.child_token();
            slot.insert(stop.clone());
            self.background.spawn(crate::cluster::sync::receive(
                Arc::clone(self),
                subscriber,
                stop,
            ));
        }
        Ok(())
    }

    /// Ends a channel's subscription once this node has no clients in it.
    fn drop_interest_if_idle(&self, channel: &Channel) {
        if let Some((_, stop)) = self
            .interest
            .remove_if(channel.id(), |_, _| channel.is_idle_here())
        {
            stop.cancel();
        }
    }

    /// Whether this node subscribes to a channel's broadcasts.
    pub fn is_interested(&self, id: &ChannelId) -> bool {
        self.interest.contains_key(id)
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
        channel: &Channel,
        sender: ClientId,
        message: Message,
    ) -> Result<(), FrameError> {
        let pattern = channel.pattern();
        self.metrics
            .message_in(pattern, message.payload().len() as u64);
        match self.backplane.relay(channel, sender, message) {
            Ok(delivered) => {
                channel.touch();
                if let (Some(cluster), Some(timeout)) = (&self.cluster, channel.spec().timeout) {
                    // Other nodes learn of the activity, a few times per timeout.
                    let every =
                        (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
                    cluster.note_activity(channel.id(), every);
                }
                self.metrics
                    .delivered(pattern, delivered.frames, delivered.bytes);
                Ok(())
            }
            Err(error) => {
                self.metrics.frame_error(pattern);
                Err(error)
            }
        }
    }

    /// Queues a frame for one client, applying the slow-consumer policy.
    pub fn offer(&self, channel: &ChannelId, client: &Client, frame: Bytes) -> bool {
        offer(
            &self.metrics,
            self.settings.slow_consumer,
            channel,
            client,
            frame,
        )
    }

    /// Starts draining: readiness fails, new connections are refused and
    /// every client is asked to close with 1001.
    pub fn begin_drain(&self) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        let clients: usize = self
            .registry
            .list()
            .iter()
            .map(|channel| channel.disconnect_all(CloseReason::ServerShutdown))
            .sum();
        info!(clients, "draining: closing clients with 1001");
    }

    /// Waits for the connection tasks, leaves the cluster, then stops the
    /// background tasks, up to `deadline`. Returns whether everything
    /// finished in time.
    pub async fn stop(&self, deadline: tokio::time::Instant) -> bool {
        self.connections.close();
        let connections_done = tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_ok();
        let mut left = true;
        if let Some(cluster) = &self.cluster {
            left = tokio::time::timeout_at(deadline, cluster.leave())
                .await
                .is_ok();
        }
        self.root.cancel();
        self.background.close();
        let background_done = tokio::time::timeout_at(deadline, self.background.wait())
            .await
            .is_ok();
        connections_done && left && background_done
    }

    fn watch_expiry(self: &Arc<Self>, channel: &Arc<Channel>) {
        if channel.spec().timeout.is_some() {
            self.background
                .spawn(expire_when_idle(Arc::clone(self), Arc::clone(channel)));
        }
    }
}

/// Queues `frame` for `client`; on a full outbox applies `policy`. Returns
/// whether the frame was queued.
pub(crate) fn offer(
    metrics: &Metrics,
    policy: SlowConsumerPolicy,
    channel: &ChannelId,
    client: &Client,
    frame: Bytes,
) -> bool {
    match client.outbox.push(frame) {
        Ok(()) => true,
        Err(PushError::Closed) => false,
        Err(PushError::Full) => {
            metrics.dropped.inc();
            if policy == SlowConsumerPolicy::Close && client.outbox.close(CloseReason::SlowConsumer)
            {
                metrics.slow_consumer_closes.inc();
                warn!(channel = %channel, client = %client.id(), "outbox full: closing slow consumer with 1008");
            }
            false
        }
    }
}

/// Deletes `channel` once nothing was relayed on it for its timeout — in a
/// cluster, on any node: before expiring, the activity other nodes
/// recorded is consulted, and the shared record is closed by
/// compare-and-set so exactly one node expires it.
async fn expire_when_idle(relay: Arc<Relay>, channel: Arc<Channel>) {
    while let Some(deadline) = channel.deadline_ms() {
        let wake = tokio::time::Instant::from_std(relay.clock.instant_at(deadline));
        tokio::select! {
            () = channel.closed() => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        // Activity during the sleep moved the deadline: sleep again.
        if channel
            .deadline_ms()
            .is_some_and(|d| d > relay.clock.now_ms())
        {
            continue;
        }
        let Some(cluster) = &relay.cluster else {
            relay.close_local(channel.id(), CloseReason::ChannelTimedOut);
            return;
        };
        let retry = cluster.heartbeat();
        match cluster.last_activity_ms(channel.id()).await {
            Ok(Some(epoch)) => {
                let seen = relay.clock.from_epoch_ms(epoch);
                if seen > channel.last_activity_ms() {
                    channel.note_activity_at(seen);
                    continue;
                }
            }
            Ok(None) => {}
            Err(_) => {
                tokio::time::sleep(retry).await;
                continue;
            }
        }
        match cluster.close_channel(channel.id(), "timed_out", None).await {
            // Closed here; other nodes close their clients from the record.
            Ok(true) => {
                relay.close_local(channel.id(), CloseReason::ChannelTimedOut);
                return;
            }
            // Closed elsewhere; the record's watcher closes it here.
            Ok(false) => return,
            Err(_) => tokio::time::sleep(retry).await,
        }
    }
}
