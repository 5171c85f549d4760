//! A pub-sub channel's history: the last `size` messages younger than
//! `ttl`, each with an offset that increases per message, and the
//! channel's epoch, which names the history. Standalone it is kept here,
//! in memory, with offsets that increase by one; in a cluster the
//! coordinator keeps it ([`SharedHistory`]).
//!
//! Offsets are given out under the history's lock by the message path,
//! which delivers the message before it lets go (see `Relay::dispatch`),
//! so every client sees messages in offset order and a message is either
//! kept before a reader looks or delivered to it after it joined.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::RngExt;

use super::Delivered;
use super::channel::Channel;
use super::coordinator::CoordinatorError;
use super::deliver::{Prepared, Source};

/// Most bytes of payload one channel's history keeps, whatever its size:
/// 10 000 messages of the largest size would be 10 GiB.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;
/// Largest `history.size`.
pub const MAX_SIZE: u32 = 10_000;
/// Longest `history.ttl` (24 hours).
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How much history a channel keeps (`"history": {"size", "ttl"}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistorySpec {
    /// Most messages kept, 1 to [`MAX_SIZE`].
    pub size: u32,
    /// How long a message is kept, up to [`MAX_TTL`].
    pub ttl: Duration,
}

/// One kept message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    /// When it was published (wall clock, for the API).
    pub at: SystemTime,
    pub binary: bool,
    pub payload: Bytes,
    /// When it was kept, in ms of the relay clock (for the ttl).
    kept_ms: u64,
}

impl Entry {
    /// A message kept elsewhere (the ttl is not this module's concern).
    pub fn kept(offset: u64, at: SystemTime, binary: bool, payload: Bytes) -> Self {
        Self {
            offset,
            at,
            binary,
            payload,
            kept_ms: 0,
        }
    }
}

/// What a reader gets: the kept messages after an offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub epoch: String,
    /// The oldest offset still kept (the next offset when nothing is).
    pub oldest: u64,
    /// The newest offset given out (0 before the first message).
    pub newest: u64,
    /// Messages after the offset asked for were dropped before they could
    /// be read: that offset is older than what is kept.
    pub expired: bool,
    pub entries: Vec<Entry>,
}

/// A history kept outside this process (in a cluster): every node reads
/// the same messages with the same offsets, and messages of a channel
/// with history reach every node's clients through it, in offset order.
#[async_trait::async_trait]
pub trait SharedHistory: Send + Sync {
    /// Keeps a message and delivers it to the channel's clients on every
    /// node, this one included, without waiting. Returns what is known
    /// at once (how many clients it is for).
    fn relay(&self, channel: &Channel, source: Source, prepared: &Prepared) -> Delivered;

    /// Like [`SharedHistory::relay`], and waits until the message is kept;
    /// the delivery carries its offset.
    async fn publish(
        &self,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, CoordinatorError>;

    /// The kept messages with an offset above `after`, oldest first, at
    /// most `limit`.
    async fn read(
        &self,
        channel: &Channel,
        after: u64,
        limit: usize,
    ) -> Result<Slice, CoordinatorError>;
}

/// A history's state.
#[derive(Debug)]
pub struct History {
    spec: HistorySpec,
    epoch: String,
    /// The offset of the next message.
    next: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl History {
    pub fn new(spec: HistorySpec) -> Self {
        Self {
            spec,
            epoch: format!("{:016x}", rand::rng().random::<u64>()),
            next: 1,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Keeps a message; returns its offset.
    pub fn push(&mut self, now_ms: u64, binary: bool, payload: Bytes) -> u64 {
        let offset = self.next;
        self.next += 1;
        self.bytes += payload.len();
        self.entries.push_back(Entry {
            offset,
            at: SystemTime::now(),
            binary,
            payload,
            kept_ms: now_ms,
        });
        while self.entries.len() > self.spec.size as usize
            || (self.bytes > MAX_BYTES && self.entries.len() > 1)
        {
            self.pop();
        }
        self.expire(now_ms);
        offset
    }

    fn pop(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.payload.len();
        }
    }

    /// Drops what is older than the ttl.
    fn expire(&mut self, now_ms: u64) {
        let ttl = self.spec.ttl.as_millis() as u64;
        while self
            .entries
            .front()
            .is_some_and(|entry| entry.kept_ms.saturating_add(ttl) <= now_ms)
        {
            self.pop();
        }
        if self.entries.is_empty() {
            // Gives back what a burst grew.
            self.entries = VecDeque::new();
        }
    }

    /// The kept messages with an offset above `after`, oldest first, at
    /// most `limit`.
    pub fn after(&mut self, now_ms: u64, after: u64, limit: usize) -> Slice {
        self.expire(now_ms);
        let start = self.entries.partition_point(|entry| entry.offset <= after);
        let oldest = self.entries.front().map_or(self.next, |entry| entry.offset);
        Slice {
            epoch: self.epoch.clone(),
            oldest,
            newest: self.next - 1,
            expired: after.saturating_add(1) < oldest,
            entries: self.entries.range(start..).take(limit).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(size: u32, ttl_ms: u64) -> History {
        History::new(HistorySpec {
            size,
            ttl: Duration::from_millis(ttl_ms),
        })
    }

    fn offsets(slice: &Slice) -> Vec<u64> {
        slice.entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn keeps_the_last_size_messages_with_increasing_offsets() {
        let mut h = history(3, 60_000);
        for i in 1..=5u64 {
            assert_eq!(h.push(0, false, Bytes::from(i.to_string())), i);
        }
        let all = h.after(0, 0, 100);
        assert_eq!(offsets(&all), [3, 4, 5]);
        assert_eq!((all.oldest, all.newest), (3, 5));
        assert_eq!(all.entries[0].payload, "3");
        assert!(all.expired && h.after(0, 1, 100).expired);
        assert!(!h.after(0, 2, 100).expired && !h.after(0, 5, 100).expired);
        assert_eq!(offsets(&h.after(0, 4, 100)), [5]);
        assert_eq!(offsets(&h.after(0, 3, 1)), [4]);
        // Beyond the newest offset: nothing, and not an error.
        assert!(h.after(0, 99, 100).entries.is_empty());
    }

    #[test]
    fn drops_what_is_older_than_the_ttl() {
        let mut h = history(100, 1_000);
        h.push(0, false, Bytes::from_static(b"a"));
        h.push(500, true, Bytes::from_static(b"b"));
        assert_eq!(offsets(&h.after(999, 0, 100)), [1, 2]);
        let slice = h.after(1_000, 0, 100);
        assert_eq!(offsets(&slice), [2]);
        assert!(slice.entries[0].binary);
        let slice = h.after(1_500, 0, 100);
        assert!(slice.entries.is_empty());
        assert_eq!((slice.oldest, slice.newest), (3, 2));
        assert!(h.after(1_500, 1, 100).expired && !h.after(1_500, 2, 100).expired);
        assert_eq!(h.push(1_600, false, Bytes::new()), 3);
    }

    #[test]
    fn keeps_at_most_max_bytes() {
        let mut h = history(MAX_SIZE, 60_000);
        let big = Bytes::from(vec![0u8; MAX_BYTES / 4 + 1]);
        for _ in 0..4 {
            h.push(0, true, big.clone());
        }
        assert_eq!(offsets(&h.after(0, 0, 100)), [2, 3, 4]);
    }

    #[test]
    fn every_history_has_its_own_epoch() {
        assert_ne!(history(1, 1).epoch(), history(1, 1).epoch());
    }
}
