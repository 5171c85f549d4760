//! The result of one run: one JSON object (`--json`) or a human table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::track::Latency;

/// Bench CPU share above which the load generator, not the server, is
/// likely the limit.
pub const BENCH_SATURATED_PCT: f64 = 90.0;

/// Everything one run measured. Rates are per second of the measured
/// window; latencies in microseconds; CPU times in seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// Name of this case in a suite (`--case`), e.g. `fanout-1k-max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    /// Relay under test (`wrs`, `nchan`, ...).
    pub target: String,
    /// The scenario's parameters.
    pub params: BTreeMap<String, Value>,
    /// Length of the measured window in seconds.
    pub window_s: f64,
    pub connections: u64,
    pub connect_errors: u64,
    /// Messages (or requests) sent during the window.
    pub sent: u64,
    /// Messages received, each counted once per receiver.
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Other failures: protocol errors, unexpected closes, refused calls.
    pub errors: u64,
    /// Latency histograms by name (`delivery`, `round_trip`, `connect`,
    /// `create_delete`, `cycle`).
    pub latency: BTreeMap<String, Latency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    /// Server CPU time per delivered message, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_ns_per_delivery: Option<f64>,
    /// This process's CPU time in the window.
    pub bench_cpu_s: f64,
    /// `bench_cpu_s / window_s` in percent (100 = one core).
    pub bench_cpu_pct: f64,
    /// Scenario-specific figures (fairness, RSS per connection, ...).
    pub extra: BTreeMap<String, Value>,
    /// The first few error messages, for diagnosis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
}

impl Report {
    /// Fills the rate and CPU fields from the window and the measured CPU.
    pub fn finish(&mut self, window_s: f64, server_cpu_s: Option<f64>, bench_cpu_s: f64) {
        self.window_s = window_s;
        self.delivered_per_s = if window_s > 0.0 {
            self.delivered as f64 / window_s
        } else {
            0.0
        };
        self.server_cpu_s = server_cpu_s;
        self.server_cpu_ns_per_delivery = server_cpu_s
            .filter(|_| self.delivered > 0)
            .map(|cpu| cpu * 1e9 / self.delivered as f64);
        self.bench_cpu_s = bench_cpu_s;
        self.bench_cpu_pct = if window_s > 0.0 {
            bench_cpu_s / window_s * 100.0
        } else {
            0.0
        };
    }

    /// Keeps an error message if fewer than ten are kept.
    pub fn sample_error(&mut self, message: impl Into<String>) {
        if self.error_samples.len() < 10 {
            self.error_samples.push(message.into());
        }
    }

    /// A two-column table for people.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row("scenario", self.scenario.clone());
        if let Some(case) = &self.case {
            row("case", case.clone());
        }
        row("target", self.target.clone());
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect();
        row("params", params.join(" "));
        row("window", format!("{:.2} s", self.window_s));
        row(
            "connections",
            format!(
                "{} ({} connect errors)",
                self.connections, self.connect_errors
            ),
        );
        row("sent", self.sent.to_string());
        row(
            "delivered",
            format!("{} ({}/s)", self.delivered, si(self.delivered_per_s)),
        );
        row(
            "lost / dup / reordered",
            format!("{} / {} / {}", self.lost, self.duplicated, self.reordered),
        );
        row("errors", self.errors.to_string());
        for (name, l) in &self.latency {
            row(
                &format!("latency {name}"),
                format!(
                    "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
                    micros(l.p50_us),
                    micros(l.p90_us),
                    micros(l.p99_us),
                    micros(l.p999_us),
                    micros(l.max_us),
                    l.count
                ),
            );
        }
        if let Some(cpu) = self.server_cpu_s {
            let per = self
                .server_cpu_ns_per_delivery
                .map_or_else(|| "-".into(), |ns| format!("{ns:.0} ns/delivery"));
            row("server CPU", format!("{cpu:.3} s, {per}"));
        }
        let saturated = if self.bench_cpu_pct >= BENCH_SATURATED_PCT {
            " (load generator saturated: the server may be faster than shown)"
        } else {
            ""
        };
        row(
            "bench CPU",
            format!(
                "{:.3} s, {:.0} % of one core{saturated}",
                self.bench_cpu_s, self.bench_cpu_pct
            ),
        );
        for (k, v) in &self.extra {
            row(k, plain(v));
        }
        for e in &self.error_samples {
            row("error", e.clone());
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A rate with a k/M suffix.
pub fn si(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1} k", value / 1e3)
    } else {
        format!("{value:.1}")
    }
}

/// Microseconds as µs or ms.
pub fn micros(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_computes_rates_and_cpu_per_delivery() {
        let mut r = Report {
            delivered: 1_000_000,
            ..Report::default()
        };
        r.finish(2.0, Some(0.5), 1.0);
        assert_eq!(r.delivered_per_s, 500_000.0);
        assert_eq!(r.server_cpu_ns_per_delivery, Some(500.0));
        assert_eq!(r.bench_cpu_pct, 50.0);
        let table = r.to_table();
        assert!(table.contains("500.0 k/s"), "{table}");
        assert!(table.contains("500 ns/delivery"), "{table}");
    }

    #[test]
    fn round_trips_through_json() {
        let mut r = Report {
            scenario: "fanout".into(),
            ..Report::default()
        };
        r.extra.insert("fairness_spread_pct".into(), 0.5.into());
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.scenario, "fanout");
        assert_eq!(back.extra["fairness_spread_pct"], 0.5);
    }
}
