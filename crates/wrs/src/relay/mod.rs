//! The relay domain: channels, clients, patterns, and the hub that ties
//! them to a backplane. No HTTP and no sockets live here; the connection
//! task ([`crate::ws`]) feeds messages in through [`Relay::dispatch`] and
//! drains each client's outbox.

pub mod channel;
pub mod client;
pub mod ids;
pub mod pattern;
pub mod registry;
pub mod subprotocol;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backplane::{Backplane, local::LocalBackplane};
use crate::metrics::Metrics;
use channel::{Channel, ChannelSpec, JoinError, Reservation};
use client::{Client, CloseReason, PushError, QueueLimits};
use ids::{ChannelId, ClientId};
use registry::{CreateError, Registry};
use subprotocol::FrameError;

/// A monotonic millisecond clock shared by all channels of a relay.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
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
}

/// Result of carrying one message to its receivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    pub frames: u64,
    pub bytes: u64,
}

/// The hub: registry, backplane, counters, lifecycle.
#[derive(Debug)]
pub struct Relay {
    settings: RelaySettings,
    clock: Clock,
    started_at: SystemTime,
    registry: Registry,
    backplane: Box<dyn Backplane>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// Parent of every channel's token; cancelled when the relay stops.
    root: CancellationToken,
    /// Channel timeout watchers.
    background: TaskTracker,
    /// WebSocket connection tasks.
    connections: TaskTracker,
}

impl Relay {
    pub fn new(settings: RelaySettings) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let backplane = Box::new(LocalBackplane::new(
            Arc::clone(&metrics),
            settings.slow_consumer,
        ));
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

    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn uptime(&self) -> Duration {
        Duration::from_millis(self.clock.now_ms())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn channel_count(&self) -> usize {
        self.registry.count()
    }

    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    /// Creates a channel and, if it has a timeout, starts its watcher.
    ///
    /// # Errors
    ///
    /// [`CreateError`] at the channel limit.
    pub fn create_channel(
        self: &Arc<Self>,
        spec: ChannelSpec,
    ) -> Result<Arc<Channel>, CreateError> {
        let channel = self
            .registry
            .create(spec, self.clock, self.root.child_token())?;
        self.metrics.channels_open.inc();
        if spec.timeout.is_some() {
            self.background
                .spawn(expire_when_idle(Arc::clone(self), Arc::clone(&channel)));
        }
        info!(
            channel = %channel.id(),
            pattern = %spec.pattern,
            client_limit = spec.client_limit.map_or(-1, i64::from),
            timeout_ms = spec.timeout.map_or(-1, |t| t.as_millis() as i64),
            "channel created"
        );
        Ok(channel)
    }

    pub fn channel(&self, id: &ChannelId) -> Option<Arc<Channel>> {
        self.registry.get(id)
    }

    /// All channels, oldest first.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.registry.list()
    }

    /// Deletes a channel; its clients are closed with 4001.
    pub fn delete_channel(&self, id: &ChannelId) -> Option<Arc<Channel>> {
        let channel = self.registry.remove(id)?;
        let clients = channel.close(CloseReason::ChannelDeleted);
        self.closed(CloseReason::ChannelDeleted);
        info!(channel = %id, clients, "channel deleted");
        Some(channel)
    }

    /// Deletes every channel; returns how many there were.
    pub fn reset(&self) -> usize {
        let mut deleted = 0;
        let mut clients = 0;
        for channel in self.registry.list() {
            if self.registry.remove_exact(&channel) {
                clients += channel.close(CloseReason::ChannelDeleted);
                self.closed(CloseReason::ChannelDeleted);
                deleted += 1;
            }
        }
        info!(channels = deleted, clients, "all channels deleted");
        deleted
    }

    /// Checks a connection attempt before the upgrade.
    ///
    /// # Errors
    ///
    /// [`ConnectError`], in this order: draining, unknown channel, missing
    /// or wrong token.
    pub fn authorize(
        &self,
        id: &ChannelId,
        token: Option<&str>,
    ) -> Result<Arc<Channel>, ConnectError> {
        if self.is_draining() {
            return Err(ConnectError::Draining);
        }
        let channel = self.registry.get(id).ok_or(ConnectError::NotFound)?;
        let token = token.ok_or(ConnectError::MissingToken)?;
        if !channel.token().matches(token) {
            return Err(ConnectError::WrongToken);
        }
        Ok(channel)
    }

    /// Holds a place in `channel` for a connection being upgraded.
    ///
    /// # Errors
    ///
    /// [`ConnectError::Full`] at the client limit, `NotFound` if the channel
    /// closed meanwhile.
    pub fn reserve(&self, channel: &Arc<Channel>) -> Result<Reservation, ConnectError> {
        channel.reserve().map_err(|e| match e {
            JoinError::Full { limit } => ConnectError::Full { limit },
            JoinError::Closed(_) => ConnectError::NotFound,
        })
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

    /// Counts a channel that ended.
    fn closed(&self, reason: CloseReason) {
        self.metrics.channels_open.dec();
        self.metrics.channel_closed(match reason {
            CloseReason::ChannelTimedOut => "timed_out",
            _ => "deleted",
        });
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

    /// Stops the channel watchers and waits for them and for the connection
    /// tasks, up to `deadline`. Returns whether everything finished.
    pub async fn stop(&self, deadline: tokio::time::Instant) -> bool {
        self.connections.close();
        let connections_done = tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_ok();
        self.root.cancel();
        self.background.close();
        let background_done = tokio::time::timeout_at(deadline, self.background.wait())
            .await
            .is_ok();
        connections_done && background_done
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

/// Deletes `channel` once nothing was relayed on it for its timeout.
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
            .is_some_and(|d| d <= relay.clock.now_ms())
        {
            if relay.registry.remove_exact(&channel) {
                let clients = channel.close(CloseReason::ChannelTimedOut);
                relay.closed(CloseReason::ChannelTimedOut);
                info!(channel = %channel.id(), clients, "channel timed out");
            }
            return;
        }
    }
}
