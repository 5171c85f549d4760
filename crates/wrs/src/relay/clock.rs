//! The relay's clock: milliseconds since the relay started, on
//! [`tokio::time`] (so tests that pause time control every timeout and
//! countdown), with the wall-clock time of its start for exchanging
//! moments with other nodes as milliseconds since the Unix epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock time `ms` milliseconds after the Unix epoch.
pub fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A monotonic millisecond clock shared by all channels of a relay.
/// Copying it is free; every copy reads the same time.
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

    /// Milliseconds since the clock started.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The instant `ms` milliseconds after the clock started.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// A moment of this clock as milliseconds since the Unix epoch.
    pub fn to_epoch_ms(&self, ms: u64) -> u64 {
        self.epoch_wall_ms.saturating_add(ms)
    }

    /// A moment given as milliseconds since the Unix epoch (say, by another
    /// node) on this clock; moments before its start read as its start.
    pub fn from_epoch_ms(&self, epoch: u64) -> u64 {
        epoch.saturating_sub(self.epoch_wall_ms)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_on_tokio_time_and_converts_to_epoch_ms() {
        let clock = Clock::new();
        assert_eq!(clock.now_ms(), 0);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1500);
        assert_eq!(clock.instant_at(1500), Instant::now());
        let epoch = clock.to_epoch_ms(1500);
        assert_eq!(clock.from_epoch_ms(epoch), 1500);
        assert_eq!(
            clock.from_epoch_ms(0),
            0,
            "before the start reads as the start"
        );
    }
}
