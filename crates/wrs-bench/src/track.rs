//! Bookkeeping for received messages: which sequence numbers arrived
//! (to count lost, duplicated and reordered messages) and how late
//! (latency histograms).

use std::collections::VecDeque;
use std::sync::Arc;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The sequence numbers seen from one sender.
///
/// Memory stays small when messages arrive mostly in order: everything
/// below `base` has been seen, and a bitmap covers only the window above
/// it. Out-of-order arrivals widen the window until the gap fills.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    base: u64,
    words: VecDeque<u64>,
    /// Highest sequence number seen plus one.
    next: u64,
    pub unique: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

/// What one arrival was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    New,
    Duplicate,
}

impl SeqTracker {
    /// Records one arrival of `seq`.
    pub fn insert(&mut self, seq: u64) -> Arrival {
        if seq < self.base {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        let offset = seq - self.base;
        let word = (offset / 64) as usize;
        let bit = 1u64 << (offset % 64);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & bit != 0 {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.words[word] |= bit;
        self.unique += 1;
        if seq < self.next {
            self.reordered += 1;
        } else {
            self.next = seq + 1;
        }
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
        }
        Arrival::New
    }

    /// Highest sequence number seen plus one (0 before any).
    pub fn next(&self) -> u64 {
        self.next
    }
}

/// A latency histogram in nanoseconds, 1 ns to 1 hour, 3 significant
/// digits.
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"))
    }

    /// Records one latency, clamped into the histogram's range.
    pub fn record(&mut self, nanos: u64) {
        self.0.saturating_record(nanos.max(1));
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Both have the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Percentiles in microseconds, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Latency> {
        if self.0.is_empty() {
            return None;
        }
        let us = |nanos: u64| nanos as f64 / 1000.0;
        Some(Latency {
            count: self.0.len(),
            mean_us: self.0.mean() / 1000.0,
            p50_us: us(self.0.value_at_quantile(0.50)),
            p90_us: us(self.0.value_at_quantile(0.90)),
            p99_us: us(self.0.value_at_quantile(0.99)),
            p999_us: us(self.0.value_at_quantile(0.999)),
            max_us: us(self.0.max()),
        })
    }
}

/// One histogram shared by many tasks. A histogram is a few hundred KiB;
/// one per receiver would make every record a cache miss (and a thousand
/// subscribers cost 250 MiB). Each task buffers the samples of one read
/// batch in a [`Recorder`] and records them under one lock.
#[derive(Clone, Default)]
pub struct SharedLatencies(Arc<Mutex<Latencies>>);

impl SharedLatencies {
    pub fn recorder(&self) -> Recorder {
        Recorder {
            shared: self.clone(),
            samples: Vec::new(),
        }
    }

    pub fn summary(&self) -> Option<Latency> {
        self.0.lock().summary()
    }
}

/// A task's buffer of samples; flushed on [`Recorder::flush`] and on drop.
pub struct Recorder {
    shared: SharedLatencies,
    samples: Vec<u64>,
}

impl Recorder {
    pub fn record(&mut self, nanos: u64) {
        self.samples.push(nanos);
    }

    /// Records the buffered samples into the shared histogram.
    pub fn flush(&mut self) {
        if self.samples.is_empty() {
            return;
        }
        let mut histogram = self.shared.0.lock();
        for nanos in self.samples.drain(..) {
            histogram.record(nanos);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Spread of per-receiver counts: `(max - min) / mean` in percent.
pub fn spread_pct(counts: &[u64]) -> Option<f64> {
    let max = *counts.iter().max()?;
    let min = *counts.iter().min()?;
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    (mean > 0.0).then(|| (max - min) as f64 / mean * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_arrivals_keep_the_window_small() {
        let mut t = SeqTracker::default();
        for seq in 0..10_000 {
            assert_eq!(t.insert(seq), Arrival::New);
        }
        assert!(t.words.len() <= 1);
        assert_eq!((t.unique, t.duplicated, t.reordered), (10_000, 0, 0));
        assert_eq!(t.next(), 10_000);
    }

    #[test]
    fn counts_duplicates_and_reordering() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 3, 2, 3, 0, 200, 100] {
            t.insert(seq);
        }
        assert_eq!(t.unique, 6);
        assert_eq!(t.duplicated, 2);
        assert_eq!(t.reordered, 2, "2 after 3, 100 after 200");
    }

    #[test]
    fn gaps_are_missing_not_counted() {
        let mut t = SeqTracker::default();
        for seq in (0..1000).filter(|s| s % 10 != 0) {
            t.insert(seq);
        }
        assert_eq!(t.unique, 900);
        assert_eq!(t.reordered, 0);
    }

    #[test]
    fn latency_summary_in_microseconds() {
        let mut l = Latencies::new();
        for ns in 1..=1000u64 {
            l.record(ns * 1000);
        }
        let s = l.summary().unwrap();
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
        assert!(Latencies::new().summary().is_none());
    }

    #[test]
    fn recorders_share_one_histogram() {
        let shared = SharedLatencies::default();
        let mut a = shared.recorder();
        let mut b = shared.recorder();
        a.record(1000);
        b.record(3000);
        a.flush();
        drop(b);
        assert_eq!(shared.summary().unwrap().count, 2);
    }

    #[test]
    fn spread_of_counts() {
        assert_eq!(spread_pct(&[100, 100]), Some(0.0));
        assert_eq!(spread_pct(&[99, 101]), Some(2.0));
        assert_eq!(spread_pct(&[]), None);
    }
}
