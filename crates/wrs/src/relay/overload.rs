//! Overload protection (SPEC §11): a node holds at most `max` connections
//! (those being upgraded included), takes new ones at most at the connect
//! rate, and tells the balancer it is overloaded from 90 % of its maximum
//! until it is below 80 % again — the gap keeps readiness from flapping
//! at the threshold. Refusals cost the connected clients nothing: they
//! happen before anything of theirs is touched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    per_token: Duration,
    burst: u32,
    tokens: u32,
    /// When the bucket last gained its tokens.
    filled: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` and `burst` must be at least 1.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            per_token: Duration::from_secs(1) / rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1),
            filled: now,
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// How long until the next token, at `now` (zero if one is there).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens > 0 {
            return Duration::ZERO;
        }
        (self.filled + self.per_token).saturating_duration_since(now)
    }

    fn refill(&mut self, now: Instant) {
        if self.tokens == self.burst {
            // Time spent full earns nothing: the next token is a whole
            // interval after the first one taken.
            self.filled = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.filled);
        let earned = elapsed.as_nanos() / self.per_token.as_nanos().max(1);
        if earned == 0 {
            return;
        }
        let room = self.burst - self.tokens;
        if earned >= u128::from(room) {
            self.tokens = self.burst;
            self.filled = now;
        } else {
            // Whole tokens only; the part of an interval already passed
            // counts towards the next one.
            let earned = earned as u32;
            self.tokens += earned;
            self.filled += self.per_token * earned;
        }
    }
}

/// Why a connection is refused for the node's sake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `WRS_MAX_CONNECTIONS` reached.
    Full,
    /// Faster than `WRS_CONNECT_RATE`; a token comes after this long.
    TooFast(Duration),
}

/// The node's connections against its limits.
#[derive(Debug)]
pub struct Capacity {
    max: usize,
    held: AtomicUsize,
    overloaded: AtomicBool,
    connects: Option<Mutex<TokenBucket>>,
}

impl Capacity {
    /// `max` connections (at least 1); `connect_rate` as (per second,
    /// burst), or none.
    pub fn new(max: usize, connect_rate: Option<(u32, u32)>) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            held: AtomicUsize::new(0),
            overloaded: AtomicBool::new(false),
            connects: connect_rate
                .map(|(rate, burst)| Mutex::new(TokenBucket::new(rate, burst, Instant::now()))),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections held: open, or being upgraded.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Above 90 % of the maximum, and not yet back below 80 %.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Acquire)
    }

    /// Spends a connect-rate token, if the node has a connect rate.
    ///
    /// # Errors
    ///
    /// [`Refusal::TooFast`] with the wait for the next token.
    pub fn pace(&self) -> Result<(), Refusal> {
        let Some(connects) = &self.connects else {
            return Ok(());
        };
        let now = Instant::now();
        let mut bucket = connects.lock();
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(Refusal::TooFast(bucket.wait(now)))
        }
    }

    /// Holds one of the node's connections until the slot is dropped.
    ///
    /// # Errors
    ///
    /// [`Refusal::Full`] at the maximum.
    pub fn take(self: &Arc<Self>) -> Result<Slot, Refusal> {
        let held = self.held.fetch_add(1, Ordering::AcqRel) + 1;
        if held > self.max {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Full);
        }
        self.judge(held);
        Ok(Slot(Arc::clone(self)))
    }

    fn give_back(&self) {
        let held = self.held.fetch_sub(1, Ordering::AcqRel) - 1;
        self.judge(held);
    }

    /// Moves the readiness verdict with the count: overloaded from 90 %,
    /// ready again below 80 %, unchanged in between.
    fn judge(&self, held: usize) {
        if held * 10 >= self.max * 9 {
            self.overloaded.store(true, Ordering::Release);
        } else if held * 10 < self.max * 8 {
            self.overloaded.store(false, Ordering::Release);
        }
    }
}

/// One connection's share of the node's capacity.
#[derive(Debug)]
pub struct Slot(Arc<Capacity>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_gives_its_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(4, 3, start);
        for _ in 0..3 {
            assert!(bucket.try_take(start));
        }
        assert!(!bucket.try_take(start));
        assert_eq!(bucket.wait(start), Duration::from_millis(250));
        // 249 ms: not yet; 250 ms: one token, no more.
        tokio::time::advance(Duration::from_millis(249)).await;
        assert!(!bucket.try_take(Instant::now()));
        assert_eq!(bucket.wait(Instant::now()), Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(bucket.try_take(Instant::now()));
        assert!(!bucket.try_take(Instant::now()));
        // A part interval is not lost: 100 + 150 ms make the next token.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!bucket.try_take(Instant::now()));
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(bucket.try_take(Instant::now()));
        // A long pause saves up the burst only.
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        assert_eq!((0..10).filter(|_| bucket.try_take(now)).count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_full_does_not_bring_the_next_token_closer() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        // Full for 50 ms, then the burst goes at once.
        tokio::time::advance(Duration::from_millis(50)).await;
        let burst = Instant::now();
        assert_eq!((0..10).filter(|_| bucket.try_take(burst)).count(), 5);
        // The next token is a whole interval after the burst, not 50 ms.
        assert_eq!(bucket.wait(burst), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(!bucket.try_take(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(bucket.try_take(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_connect_rate_refuses_with_the_wait() {
        let capacity = Capacity::new(100, Some((10, 2)));
        assert_eq!(capacity.pace(), Ok(()));
        assert_eq!(capacity.pace(), Ok(()));
        assert_eq!(
            capacity.pace(),
            Err(Refusal::TooFast(Duration::from_millis(100)))
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(capacity.pace(), Ok(()));
        assert!(Capacity::new(1, None).pace().is_ok());
    }

    #[test]
    fn slots_stop_at_the_maximum_and_readiness_has_hysteresis() {
        let capacity = Capacity::new(10, None);
        let mut slots: Vec<Slot> = (0..8).map(|_| capacity.take().unwrap()).collect();
        assert!(!capacity.is_overloaded(), "80 % is not overloaded yet");
        slots.push(capacity.take().unwrap());
        assert!(capacity.is_overloaded(), "90 %");
        slots.push(capacity.take().unwrap());
        assert_eq!(capacity.take().unwrap_err(), Refusal::Full);
        assert_eq!(capacity.held(), 10);
        slots.truncate(8);
        assert!(capacity.is_overloaded(), "80 %: still overloaded");
        slots.pop();
        assert!(!capacity.is_overloaded(), "70 %: ready again");
        slots.push(capacity.take().unwrap());
        assert!(!capacity.is_overloaded(), "80 % on the way up: still ready");
        drop(slots);
        assert_eq!(capacity.held(), 0);
    }
}
