//! Inactivity timeouts: each channel with a timeout has one small task
//! that sleeps until its deadline (last activity + timeout), plus the
//! coordinator's grace for activity on other nodes to become known here.
//! On waking it re-reads the deadline (activity during the sleep moved
//! it), then asks the coordinator whether the channel may end, and ends
//! it through the coordinator so that exactly one node does.
//!
//! Everything runs on [`tokio::time`], so the tests below drive it with a
//! paused clock and a scripted coordinator.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::Relay;
use super::channel::Channel;
use super::coordinator::{EndReason, Ended, ExpiryCheck};

/// Pause before asking again when shared state cannot be reached.
const RETRY: Duration = Duration::from_millis(500);

/// Ends `channel` once nothing was relayed on it for its timeout.
pub(super) async fn expire_when_idle(relay: Arc<Relay>, channel: Arc<Channel>) {
    let Some(timeout) = channel.spec().timeout else {
        return;
    };
    let grace = relay.coordinator().expiry_grace(timeout);
    let clock = channel.clock();
    let mut wait_more = Duration::ZERO;
    loop {
        let Some(deadline) = channel.deadline_ms() else {
            return;
        };
        let wake =
            (clock.instant_at(deadline) + grace).max(tokio::time::Instant::now() + wait_more);
        wait_more = Duration::ZERO;
        tokio::select! {
            () = channel.closed() => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        // Activity during the sleep moved the deadline: sleep again.
        if channel
            .deadline_ms()
            .is_some_and(|d| clock.instant_at(d) + grace > tokio::time::Instant::now())
        {
            continue;
        }
        match relay.coordinator().confirm_expiry(&channel).await {
            Ok(ExpiryCheck::Expire) => {}
            Ok(ExpiryCheck::Later(after)) => {
                wait_more = after;
                continue;
            }
            Err(error) => {
                debug!(channel = %channel.id(), %error, "cannot check the channel's expiry; trying again");
                wait_more = RETRY;
                continue;
            }
        }
        // A channel that is no longer this one's id (closed and the id
        // reused) is not touched.
        if channel.is_closed() {
            return;
        }
        match relay
            .coordinator()
            .end(channel.id(), EndReason::TimedOut)
            .await
        {
            Ok(Ended::Ended | Ended::Local) => {
                relay.close_exact(&channel, EndReason::TimedOut);
                return;
            }
            // Ended elsewhere meanwhile: the coordinator tells this node.
            Ok(Ended::NotFound) => return,
            Err(error) => {
                debug!(channel = %channel.id(), %error, "cannot end the timed-out channel; trying again");
                wait_more = RETRY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::SystemTime;

    use async_trait::async_trait;

    use super::*;
    use crate::Config;
    use crate::metrics::Metrics;
    use crate::relay::Delivered;
    use crate::relay::channel::ChannelSpec;
    use crate::relay::coordinator::*;
    use crate::relay::deliver::{Outlet, Prepared};
    use crate::relay::ids::{ChannelId, ClientId};
    use crate::relay::pattern::Pattern;
    use crate::relay::subprotocol::FrameError;

    /// A coordinator whose answers the test scripts, recording what the
    /// relay asked of it.
    #[derive(Debug, Default)]
    struct Scripted {
        grace: Duration,
        /// Answers to `confirm_expiry`, in order; `Expire` once used up.
        checks: Mutex<Vec<Result<ExpiryCheck, CoordinatorError>>>,
        /// Answers to `end`; `Ended` once used up.
        ends: Mutex<Vec<Result<Ended, CoordinatorError>>>,
        /// (ms since the test's start, call) in order.
        calls: Mutex<Vec<(u64, &'static str)>>,
        start: Mutex<Option<tokio::time::Instant>>,
    }

    impl Scripted {
        fn log(&self, call: &'static str) {
            let start = *self.start.lock().unwrap();
            let at = start.map_or(0, |s| s.elapsed().as_millis() as u64);
            self.calls.lock().unwrap().push((at, call));
        }
    }

    #[async_trait]
    impl Coordinator for Scripted {
        async fn start(&self, _: Handle, _: Tasks) -> Result<(), CoordinatorError> {
            *self.start.lock().unwrap() = Some(tokio::time::Instant::now());
            Ok(())
        }
        fn is_available(&self) -> bool {
            true
        }
        fn channel_limit(&self, own: usize) -> usize {
            own
        }
        async fn create(
            &self,
            _: &ChannelId,
            _: &SharedChannel,
        ) -> Result<Claim, CoordinatorError> {
            Ok(Claim::Claimed)
        }
        async fn fetch(&self, _: &ChannelId) -> Result<Option<SharedChannel>, CoordinatorError> {
            Ok(None)
        }
        async fn end(&self, _: &ChannelId, _: EndReason) -> Result<Ended, CoordinatorError> {
            self.log("end");
            let mut ends = self.ends.lock().unwrap();
            if ends.is_empty() {
                Ok(Ended::Ended)
            } else {
                ends.remove(0)
            }
        }
        async fn channel_ids(&self) -> Result<Vec<ChannelId>, CoordinatorError> {
            Ok(Vec::new())
        }
        fn forget(&self, _: &ChannelId) {}
        async fn join(
            &self,
            _: &Arc<Channel>,
            _: crate::relay::client::Transport,
        ) -> Result<Option<ClientId>, JoinRefusal> {
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
            source: crate::relay::deliver::Source,
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
            _: bytes::Bytes,
        ) -> Result<(), FrameError> {
            Err(FrameError::UnknownOrigin(origin.to_string()))
        }
        fn note_activity(&self, _: &Arc<Channel>) {}
        fn expiry_grace(&self, _: Duration) -> Duration {
            self.grace
        }
        async fn confirm_expiry(&self, _: &Arc<Channel>) -> Result<ExpiryCheck, CoordinatorError> {
            self.log("confirm");
            let mut checks = self.checks.lock().unwrap();
            if checks.is_empty() {
                Ok(ExpiryCheck::Expire)
            } else {
                checks.remove(0)
            }
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
        async fn command(
            &self,
            node: &str,
            _: NodeCommand,
        ) -> Result<crate::relay::NodeState, CommandError> {
            Err(CommandError::NotFound(node.to_owned()))
        }
        async fn leave(&self) {}
    }

    const SPEC: ChannelSpec = ChannelSpec {
        pattern: Pattern::Echo,
        client_limit: None,
        timeout: Some(Duration::from_millis(1000)),
        welcome: false,
        history: None,
    };

    async fn relay_with(coordinator: Scripted) -> (Arc<Relay>, Arc<Scripted>) {
        let coordinator = Arc::new(coordinator);
        let relay = Relay::new(
            Config::for_tests().relay_settings(),
            Arc::clone(&coordinator) as Arc<dyn Coordinator>,
            Arc::new(Metrics::new(false)),
        );
        relay.start().await.unwrap();
        (relay, coordinator)
    }

    /// Waits (on the paused clock) until the channel is gone; returns when.
    async fn gone_at(relay: &Relay, channel: &Channel, start: tokio::time::Instant) -> u64 {
        tokio::time::timeout(Duration::from_secs(600), channel.closed())
            .await
            .expect("the channel ends");
        assert!(relay.channel(channel.id()).is_none());
        start.elapsed().as_millis() as u64
    }

    #[tokio::test(start_paused = true)]
    async fn ends_at_the_deadline_plus_grace_and_never_before() {
        let (relay, coordinator) = relay_with(Scripted {
            grace: Duration::from_millis(250),
            ..Default::default()
        })
        .await;
        let start = tokio::time::Instant::now();
        let (channel, _) = relay.create_channel(SPEC).await.unwrap();
        assert_eq!(gone_at(&relay, &channel, start).await, 1250);
        assert_eq!(
            *coordinator.calls.lock().unwrap(),
            [(1250, "confirm"), (1250, "end")]
        );
        assert_eq!(relay.metrics().channels_closed("timed_out"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_moves_the_deadline() {
        let (relay, coordinator) = relay_with(Scripted::default()).await;
        let start = tokio::time::Instant::now();
        let (channel, _) = relay.create_channel(SPEC).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        channel.touch();
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Seen on another node, as of 1 500 ms.
        channel.note_activity_at(1500);
        assert_eq!(gone_at(&relay, &channel, start).await, 2500);
        assert_eq!(
            *coordinator.calls.lock().unwrap(),
            [(2500, "confirm"), (2500, "end")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waits_as_long_as_the_coordinator_says() {
        let channel_checks = vec![
            // Newer activity was found elsewhere (and noted): look again.
            Ok(ExpiryCheck::Later(Duration::ZERO)),
            // Another node goes first; this one is the stand-in.
            Ok(ExpiryCheck::Later(Duration::from_millis(400))),
            Err(CoordinatorError::Unavailable("down".into())),
        ];
        let (relay, coordinator) = relay_with(Scripted {
            checks: Mutex::new(channel_checks),
            ends: Mutex::new(vec![Err(CoordinatorError::Unavailable("down".into()))]),
            ..Default::default()
        })
        .await;
        let start = tokio::time::Instant::now();
        let (channel, _) = relay.create_channel(SPEC).await.unwrap();
        let gone = gone_at(&relay, &channel, start).await;
        // 1000: later at once; 1000 + 400; +500 after the error; then the
        // end fails once and is retried 500 later.
        assert_eq!(
            *coordinator.calls.lock().unwrap(),
            [
                (1000, "confirm"),
                (1000, "confirm"),
                (1400, "confirm"),
                (1900, "confirm"),
                (1900, "end"),
                (2400, "confirm"),
                (2400, "end"),
            ]
        );
        assert_eq!(gone, 2400);
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_ended_elsewhere_is_left_to_the_coordinator() {
        let (relay, coordinator) = relay_with(Scripted {
            ends: Mutex::new(vec![Ok(Ended::NotFound)]),
            ..Default::default()
        })
        .await;
        let (channel, _) = relay.create_channel(SPEC).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5000)).await;
        assert_eq!(
            coordinator.calls.lock().unwrap().len(),
            2,
            "one check, one end"
        );
        // Still held here until the coordinator reports how it ended.
        assert!(relay.channel(channel.id()).is_some());
        relay.close_local(channel.id(), EndReason::Deleted);
        assert!(channel.is_closed());
        let _ = SystemTime::now();
    }
}
