//! Channel activity across nodes, so that inactivity timeouts hold
//! cluster-wide (the `activity` bucket, one key per channel: the last
//! activity any node shared, ms since the Unix epoch).
//!
//! - A node shares a channel's activity at most once per [`every`] (a
//!   quarter of the timeout, between 25 ms and 1 s), and always shares the
//!   last of a burst: a flusher looks at the channels with unshared
//!   activity every [`FLUSH_TICK`]. Writes are compare-and-set and only
//!   move the value forward.
//! - Every node watches the bucket and moves its channels' deadlines, so
//!   `countdown` reads the time left as the cluster knows it.
//! - A node lets a channel end only [`grace`] after its deadline (the time
//!   shared activity takes to arrive), after reading the key once more;
//!   then the nodes take turns (one heartbeat apart, in an order fixed per
//!   channel) so that normally exactly one node ends it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::debug;

use super::NatsCoordinator;
use super::store::Seen;
use crate::relay::channel::Channel;
use crate::relay::coordinator::{CoordinatorError, ExpiryCheck};
use crate::relay::ids::ChannelId;

/// How often the flusher looks for unshared activity.
pub const FLUSH_TICK: Duration = Duration::from_millis(25);

/// Allowance for a shared activity to reach every node's watch.
const PROPAGATION: Duration = Duration::from_millis(200);

/// Activity writes under way at once.
const WRITES_IN_FLIGHT: usize = 32;

/// How often a node shares one channel's activity at most.
pub fn every(timeout: Duration) -> Duration {
    (timeout / 4).clamp(FLUSH_TICK, Duration::from_secs(1))
}

/// How long after its local deadline a channel may end: activity on
/// another node is shared within [`every`] plus a tick of the flusher,
/// and arrives within [`PROPAGATION`].
pub fn grace(timeout: Duration) -> Duration {
    every(timeout) + FLUSH_TICK + PROPAGATION
}

#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Channels whose activity is not shared yet, in arrival order.
    pending: Mutex<Vec<Arc<Channel>>>,
    /// The activity each channel's key holds, as last seen: (revision, ms
    /// since the epoch).
    known: DashMap<ChannelId, (u64, u64)>,
}

impl NatsCoordinator {
    /// Something was relayed on the channel here (the message path: one
    /// atomic flag, and a push on the first activity since the last share).
    pub(super) fn queue_activity(&self, channel: &Arc<Channel>) {
        if channel.spec().timeout.is_some() && channel.mark_unshared() {
            self.activity.pending.lock().push(Arc::clone(channel));
        }
    }

    pub(super) fn start_activity(&self) {
        let Some(me) = self.me() else {
            return;
        };
        self.spawn(async move { me.flush_activity().await });
    }

    /// Shares queued activity, each channel at most once per [`every`].
    async fn flush_activity(&self) {
        let mut ticker = tokio::time::interval(FLUSH_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Channels shared lately, with when; and those waiting their turn.
        let mut shared: HashMap<ChannelId, Instant> = HashMap::new();
        let mut waiting: Vec<(Arc<Channel>, Instant)> = Vec::new();
        loop {
            ticker.tick().await;
            let now = Instant::now();
            let arrived = std::mem::take(&mut *self.activity.pending.lock());
            for channel in arrived {
                let timeout = channel.spec().timeout.unwrap_or_default();
                let due = shared
                    .get(channel.id())
                    .map_or(now, |at| *at + every(timeout));
                waiting.push((channel, due));
            }
            let (due, later): (Vec<_>, Vec<_>) =
                waiting.drain(..).partition(|(_, due)| *due <= now);
            waiting = later;
            let writes: Vec<_> = due
                .into_iter()
                .map(|(channel, _)| channel)
                .filter(|channel| !channel.is_closed())
                .map(|channel| {
                    shared.insert(channel.id().clone(), now);
                    // Activity after this line queues the channel again.
                    channel.mark_shared();
                    let clock = channel.clock();
                    let at = clock.to_epoch_ms(channel.last_activity_ms());
                    (channel, at)
                })
                .collect();
            futures_util::stream::iter(writes)
                .for_each_concurrent(WRITES_IN_FLIGHT, |(channel, at)| async move {
                    if let Err(error) = self.share_activity(channel.id(), at).await {
                        debug!(channel = %channel.id(), %error, "cannot share channel activity");
                    }
                })
                .await;
            shared.retain(|_, at| now.duration_since(*at) < Duration::from_secs(1));
        }
    }

    /// Moves the channel's shared activity forward to `at` (never back).
    async fn share_activity(&self, channel: &ChannelId, at: u64) -> Result<(), CoordinatorError> {
        let mut known = self.activity.known.get(channel).map(|k| *k);
        for _ in 0..3 {
            if known.is_some_and(|(_, value)| value >= at) {
                return Ok(());
            }
            let revision = known.map_or(0, |(revision, _)| revision);
            match self
                .store
                .activity
                .update(channel.as_str(), &at, revision)
                .await?
            {
                Some(revision) => {
                    self.note_known(channel, revision, at);
                    return Ok(());
                }
                None => {
                    known = self
                        .store
                        .activity
                        .get(channel.as_str())
                        .await?
                        .map(|v| (v.revision, v.value));
                }
            }
        }
        Err(CoordinatorError::Contention(channel.to_string()))
    }

    fn note_known(&self, channel: &ChannelId, revision: u64, at: u64) {
        let mut entry = self.activity.known.entry(channel.clone()).or_insert((0, 0));
        if entry.0 < revision {
            *entry = (revision, at);
        }
    }

    pub(super) fn forget_activity(&self, channel: &ChannelId) {
        self.activity.known.remove(channel);
    }

    /// The revision of the channel's activity key, if this node knows one.
    pub(super) fn activity_revision(&self, channel: &ChannelId) -> Option<u64> {
        self.activity.known.get(channel).map(|k| k.0)
    }

    /// Whether the channel, whose deadline plus grace passed here, may end
    /// now: not if the bucket holds newer activity (it is noted, and the
    /// relay looks again), and not before this node's turn.
    pub(super) async fn check_expiry(
        &self,
        channel: &Arc<Channel>,
    ) -> Result<ExpiryCheck, CoordinatorError> {
        let clock = channel.clock();
        if let Some(stored) = self.store.activity.get(channel.id().as_str()).await? {
            self.note_known(channel.id(), stored.revision, stored.value);
            let at = clock.from_epoch_ms(stored.value);
            if at > channel.last_activity_ms() {
                channel.note_activity_at(at);
                return Ok(ExpiryCheck::Later(Duration::ZERO));
            }
        }
        let (Some(timeout), Some(deadline)) = (channel.spec().timeout, channel.deadline_ms())
        else {
            return Ok(ExpiryCheck::Later(Duration::from_secs(3600)));
        };
        let turn = self.heartbeat * self.expiry_rank(channel.id());
        let mine = clock.instant_at(deadline) + grace(timeout) + turn;
        let now = Instant::now();
        Ok(if mine <= now {
            ExpiryCheck::Expire
        } else {
            ExpiryCheck::Later(mine - now)
        })
    }

    /// This node's place in the order in which live nodes may end the
    /// channel (0: first). The order is the same on every node.
    fn expiry_rank(&self, channel: &ChannelId) -> u32 {
        let score = |node: &str| {
            let mut hasher = DefaultHasher::new();
            channel.as_str().hash(&mut hasher);
            node.hash(&mut hasher);
            hasher.finish()
        };
        let mine = score(&self.node);
        self.live_nodes()
            .iter()
            .filter(|node| *node.record.id != *self.node && score(&node.record.id) < mine)
            .count() as u32
    }

    /// Applies what the watch of the `activity` bucket reports: the
    /// channel's deadline moves on this node too.
    pub(super) fn on_activity(&self, seen: Seen) {
        match seen {
            Seen::Value {
                key, revision, raw, ..
            } => {
                let Some(channel) = ChannelId::parse(&key) else {
                    return;
                };
                let Ok(at) = self.store.activity.decode(&key, revision, &raw) else {
                    return;
                };
                self.note_known(&channel, revision, at);
                match self.handle().and_then(|handle| handle.channel(&channel)) {
                    Some(held) => held.note_activity_at(held.clock().from_epoch_ms(at)),
                    None => self.check_orphan(super::Kind::Activity, key, revision),
                }
            }
            Seen::Removed { key, .. } => {
                if let Some(channel) = ChannelId::parse(&key) {
                    self.forget_activity(&channel);
                }
            }
            Seen::Current | Seen::Restarting => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_shared_often_enough_for_the_timeout() {
        assert_eq!(
            every(Duration::from_millis(2000)),
            Duration::from_millis(500)
        );
        assert_eq!(every(Duration::from_millis(40)), FLUSH_TICK);
        assert_eq!(every(Duration::from_secs(86_400)), Duration::from_secs(1));
        assert_eq!(
            grace(Duration::from_millis(2000)),
            Duration::from_millis(500 + 25 + 200)
        );
    }
}
