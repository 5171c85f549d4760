//! Moving clients off this node (SPEC §11).
//!
//! - **Drain** (SIGTERM, or a maintenance drain through
//!   `POST /cluster/{nodeId}/drain`): readiness fails at once, connections
//!   are still taken for the drain delay (the balancer's time to notice),
//!   then every client is closed with 1012, in random order, at most
//!   `WRS_DRAIN_RATE` a second. A maintenance drain ends with
//!   `POST /cluster/{nodeId}/ready`; a shutdown drain does not end.
//! - **Rebalancing** (cluster): a node well above the average number of
//!   connections per node sheds its excess with 1012, paced, while it tells
//!   the balancer it is unattractive (weight 0), so the clients reconnect
//!   to the others.
//!
//! A client is closed the way every close request works: it leaves the
//! roster at once (nothing more is routed to it), what is already queued
//! for it is written, then the close frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::RngExt;
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::channel::Channel;
use super::client::CloseReason;
use super::ids::ClientId;
use super::{NodeState, Relay};

/// How the drain goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainSettings {
    /// Connections are still accepted this long after readiness failed.
    pub delay: Duration,
    /// Most clients closed a second.
    pub rate: u32,
}

/// When and how fast a node sheds its excess connections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceSettings {
    /// Shed only above `average × relative` ...
    pub relative: f64,
    /// ... and above `average + absolute`.
    pub absolute: u64,
    /// Most clients closed a second.
    pub rate: u32,
}

/// Why a node drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainKind {
    /// `POST /cluster/{nodeId}/drain`: ended by `POST .../ready`.
    Maintenance,
    /// SIGTERM: the process stops afterwards.
    Shutdown,
}

/// Why `POST /cluster/{nodeId}/ready` cannot be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the node is shutting down")]
pub struct ShuttingDown;

/// Closes are spaced this much wider than `1 s / rate`.
const PACING_SLACK: f64 = 1.02;
/// How often a node compares its load with the others'.
const REBALANCE_CHECK: Duration = Duration::from_secs(1);
/// Connections younger than this are not shed: a client that was just
/// shed elsewhere (or here) and reconnected is never shed again at once.
pub const SHED_MIN_AGE: Duration = Duration::from_secs(5);
/// How long a node stays unattractive after shedding, while the shed
/// clients reconnect (with their jitter) elsewhere.
const SHED_SETTLE: Duration = Duration::from_secs(2);

/// The drain and shedding state of one relay.
#[derive(Debug, Default)]
pub(super) struct Evacuation {
    /// The drain under way, with what stops its task.
    drain: Mutex<Option<(DrainKind, CancellationToken)>>,
    /// The drain delay is over: new connections are refused.
    refusing: AtomicBool,
    /// Shedding excess connections.
    shedding: AtomicBool,
    /// True once a drain closed every client (reset when one starts).
    drained: DrainedFlag,
}

#[derive(Debug)]
struct DrainedFlag(watch::Sender<bool>);

impl Default for DrainedFlag {
    fn default() -> Self {
        Self(watch::Sender::new(false))
    }
}

impl Evacuation {
    pub(super) fn is_draining(&self) -> bool {
        self.drain.lock().is_some()
    }

    pub(super) fn is_refusing(&self) -> bool {
        // SeqCst with the store in `run_drain`: a client admitted after
        // its own check either sees the flag or is seen by the drain's pick.
        self.refusing.load(Ordering::SeqCst)
    }

    pub(super) fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Acquire)
    }
}

/// How many connections a node holding `mine` should shed, given the
/// other nodes' states and connection counts; `None` if it is not above
/// both thresholds. The average is over the nodes that take connections;
/// clients of draining nodes count, as they are about to move to those.
pub fn excess(mine: u64, others: &[(NodeState, u64)], settings: &RebalanceSettings) -> Option<u64> {
    let mut total = mine;
    let mut accepting = 1u64;
    for &(state, connections) in others {
        match state {
            NodeState::Ready | NodeState::Shedding | NodeState::Overloaded => {
                accepting += 1;
                total += connections;
            }
            NodeState::Draining => total += connections,
            NodeState::Disconnected => {}
        }
    }
    if accepting < 2 {
        return None;
    }
    let average = total as f64 / accepting as f64;
    let above = mine as f64 > average * settings.relative
        && mine as f64 > average + settings.absolute as f64;
    above.then(|| mine - average.ceil() as u64)
}

impl Relay {
    /// Starts draining (a SIGTERM drain takes over a maintenance drain
    /// under way). Returns the state now.
    pub fn drain(self: &Arc<Self>, kind: DrainKind) -> NodeState {
        let mut drain = self.evacuation.drain.lock();
        match drain.as_mut() {
            Some((current, _)) => {
                if kind == DrainKind::Shutdown {
                    *current = DrainKind::Shutdown;
                }
            }
            None => {
                let stop = self.root.child_token();
                *drain = Some((kind, stop.clone()));
                self.evacuation.drained.0.send_replace(false);
                info!(
                    ?kind,
                    delay_ms = self.settings.drain.delay.as_millis() as u64,
                    rate = self.settings.drain.rate,
                    "draining: not ready; clients will be closed with 1012"
                );
                let relay = Arc::clone(self);
                self.background
                    .spawn(async move { relay.run_drain(stop).await });
            }
        }
        drop(drain);
        self.state()
    }

    /// Ends a maintenance drain: the node is ready again and keeps the
    /// clients it still has.
    ///
    /// # Errors
    ///
    /// [`ShuttingDown`] during a shutdown drain.
    pub fn undrain(&self) -> Result<NodeState, ShuttingDown> {
        let mut drain = self.evacuation.drain.lock();
        match drain.as_ref() {
            Some((DrainKind::Shutdown, _)) => return Err(ShuttingDown),
            Some((DrainKind::Maintenance, stop)) => {
                stop.cancel();
                *drain = None;
                self.evacuation.refusing.store(false, Ordering::Release);
                info!("drain ended: ready again");
            }
            None => {}
        }
        drop(drain);
        Ok(self.state())
    }

    /// The drain delay is over: new connections are refused.
    pub(crate) fn is_refusing(&self) -> bool {
        self.evacuation.is_refusing()
    }

    /// Completes once a drain has closed every client.
    pub async fn drained(&self) {
        let mut drained = self.evacuation.drained.0.subscribe();
        let _ = drained.wait_for(|done| *done).await;
    }

    async fn run_drain(&self, stop: CancellationToken) {
        let settings = self.settings.drain;
        if stop
            .run_until_cancelled(tokio::time::sleep(settings.delay))
            .await
            .is_none()
        {
            return;
        }
        self.evacuation.refusing.store(true, Ordering::SeqCst);
        let closed = self
            .close_paced(
                settings.rate,
                CloseReason::Draining,
                usize::MAX,
                Duration::ZERO,
                &stop,
            )
            .await;
        if !stop.is_cancelled() {
            info!(closed, "drained: every client was closed with 1012");
            self.evacuation.drained.0.send_replace(true);
        }
    }

    /// Closes up to `count` clients connected for at least `min_age`, in
    /// random order, at most `rate` a second, until none is left or `stop`.
    /// Returns how many were closed.
    async fn close_paced(
        &self,
        rate: u32,
        reason: CloseReason,
        count: usize,
        min_age: Duration,
        stop: &CancellationToken,
    ) -> usize {
        // 2 % slower than the rate: however the timer rounds, no second
        // ever sees more than `rate` closes.
        let period = (Duration::from_secs(1) / rate.max(1)).mul_f64(PACING_SLACK);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut closed = 0;
        while closed < count {
            let picked = self.pick(count - closed, min_age);
            if picked.is_empty() {
                break;
            }
            for (channel, client) in picked {
                if stop.run_until_cancelled(ticker.tick()).await.is_none()
                    || (reason == CloseReason::Rebalancing && self.is_draining())
                {
                    return closed;
                }
                if channel.disconnect(client, reason) {
                    closed += 1;
                    self.metrics.client_closed(reason_label(reason));
                }
            }
        }
        closed
    }

    /// Up to `count` clients of this node connected for at least
    /// `min_age`, in random order.
    fn pick(&self, count: usize, min_age: Duration) -> Vec<(Arc<Channel>, ClientId)> {
        let born_before = SystemTime::now()
            .checked_sub(min_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut all: Vec<(Arc<Channel>, ClientId)> = Vec::new();
        for channel in self.registry.list() {
            let members = channel.members();
            all.extend(
                members
                    .iter()
                    .filter(|client| client.connected_at() <= born_before)
                    .map(|client| (Arc::clone(&channel), client.id())),
            );
        }
        all.shuffle(&mut rand::rng());
        all.truncate(count);
        all
    }

    /// Sheds this node's excess connections whenever it holds well more
    /// than the average node, until the relay stops. Cluster mode only.
    pub(super) async fn rebalance(self: Arc<Self>, settings: RebalanceSettings) {
        loop {
            let jitter = rand::rng().random_range(0..500);
            tokio::time::sleep(REBALANCE_CHECK + Duration::from_millis(jitter)).await;
            if self.is_draining() {
                continue;
            }
            let Some(nodes) = self.coordinator.nodes() else {
                return;
            };
            let others: Vec<(NodeState, u64)> = nodes
                .iter()
                .filter(|node| !node.this_node)
                .map(|node| (node.state, node.clients))
                .collect();
            let mine = self.capacity.held() as u64;
            let Some(excess) = excess(mine, &others, &settings) else {
                continue;
            };
            self.evacuation.shedding.store(true, Ordering::Release);
            info!(
                connections = mine,
                excess,
                rate = settings.rate,
                "above the cluster's average: shedding with 1012"
            );
            let stop = self.root.child_token();
            let shed = self
                .close_paced(
                    settings.rate,
                    CloseReason::Rebalancing,
                    excess as usize,
                    SHED_MIN_AGE,
                    &stop,
                )
                .await;
            tokio::time::sleep(SHED_SETTLE).await;
            self.evacuation.shedding.store(false, Ordering::Release);
            info!(shed, "shedding done");
        }
    }

    /// Closes every client left with 1001 (the end of a shutdown drain
    /// window); returns how many there were.
    pub(super) fn close_remaining(&self) -> usize {
        let clients: usize = self
            .registry
            .list()
            .iter()
            .map(|channel| channel.disconnect_all(CloseReason::ServerShutdown))
            .sum();
        for _ in 0..clients {
            self.metrics
                .client_closed(reason_label(CloseReason::ServerShutdown));
        }
        clients
    }

    /// A deadline for one connection's maximum age: `age` jittered ±10 %.
    pub fn connection_deadline(&self, connected: Instant) -> Option<Instant> {
        let age = self.settings.max_connection_age?;
        let factor = rand::rng().random_range(0.9..=1.1);
        Some(connected + age.mul_f64(factor))
    }
}

/// The metric label of a close by the service.
pub fn reason_label(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::ChannelDeleted => "channel_deleted",
        CloseReason::ChannelTimedOut => "channel_timed_out",
        CloseReason::ServerShutdown => "shutdown",
        CloseReason::Draining => "draining",
        CloseReason::Rebalancing => "rebalancing",
        CloseReason::MaxAge => "max_age",
        CloseReason::SlowConsumer => "slow_consumer",
        CloseReason::RateLimited => "rate_limited",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: RebalanceSettings = RebalanceSettings {
        relative: 1.1,
        absolute: 100,
        rate: 100,
    };

    #[test]
    fn a_new_empty_node_makes_the_full_ones_shed_down_to_the_average() {
        let others = [(NodeState::Ready, 600), (NodeState::Ready, 0)];
        assert_eq!(excess(600, &others, &DEFAULTS), Some(200));
    }

    #[test]
    fn both_thresholds_must_be_passed() {
        // 10 % above the average but not 100 above it.
        let others = [(NodeState::Ready, 100), (NodeState::Ready, 100)];
        assert_eq!(excess(150, &others, &DEFAULTS), None);
        // 100 above the average but not 10 % above it.
        let others = [(NodeState::Ready, 5_000), (NodeState::Ready, 5_000)];
        assert_eq!(excess(5_150, &others, &DEFAULTS), None);
        // Both.
        let others = [(NodeState::Ready, 1_000), (NodeState::Ready, 1_000)];
        // 3 400 over three nodes: 1 133.3 each, so 1 400 − 1 134.
        assert_eq!(excess(1_400, &others, &DEFAULTS), Some(266));
    }

    #[test]
    fn clients_of_draining_nodes_raise_the_average_of_the_others() {
        // The draining node's 900 clients are about to land on the two
        // others: 1 500 over two nodes is 750 each, so 600 is not excess.
        let others = [(NodeState::Draining, 900), (NodeState::Ready, 0)];
        assert_eq!(excess(600, &others, &DEFAULTS), None);
    }

    #[test]
    fn disconnected_nodes_and_a_lone_node_do_not_count() {
        assert_eq!(excess(5_000, &[], &DEFAULTS), None);
        let others = [(NodeState::Disconnected, 0)];
        assert_eq!(excess(5_000, &others, &DEFAULTS), None);
        let others = [(NodeState::Draining, 0)];
        assert_eq!(excess(5_000, &others, &DEFAULTS), None);
    }
}
