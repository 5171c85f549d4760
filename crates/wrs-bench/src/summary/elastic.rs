//! `wrs-bench summarize --elastic DIR`: the tables of `bench/elastic.sh`.
//!
//! Three kinds of reports, told apart by their scenario and parameters:
//! `storm --until balanced` (a node added), `storm --until moved` (a node
//! drained), and `echo` runs with and without the per-client rate limiter
//! (cases named `...-off` and `...-on`). The storm tables show every run
//! on its own row: each run's figures belong together (the storm and the
//! latency before it come from the same minute of a shared machine).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::{grouped, opt, read_reports};
use crate::report::{Report, micros, si};
use crate::track::Latency;

/// One of the elasticity tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ElasticTable {
    /// A node added (`storm --until balanced`).
    Added,
    /// A node drained (`storm --until moved`).
    Drained,
    /// The rate limiter's cost (`echo`, cases `...-off` / `...-on`).
    Limiter,
}

/// Reads every `*.json` report in `dir` and renders the elasticity tables,
/// or only one of them ("Not run." when it has no reports).
///
/// # Errors
///
/// The directory or a report cannot be read or parsed.
pub fn summarize_elastic(dir: &Path, only: Option<ElasticTable>) -> anyhow::Result<String> {
    Ok(render_elastic(&read_reports(dir)?, only))
}

fn render_elastic(reports: &[Report], only: Option<ElasticTable>) -> String {
    let wanted = |table| only.is_none_or(|only| only == table);
    let until = |r: &Report| {
        r.params
            .get("until")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let added: Vec<&Report> = reports
        .iter()
        .filter(|r| r.scenario == "storm" && until(r).as_deref() == Some("balanced"))
        .collect();
    let drained: Vec<&Report> = reports
        .iter()
        .filter(|r| r.scenario == "storm" && until(r).as_deref() == Some("moved"))
        .collect();
    let limiter: Vec<Report> = reports
        .iter()
        .filter(|r| r.scenario != "storm")
        .cloned()
        .collect();
    let mut out = String::new();
    for table in [
        ElasticTable::Added,
        ElasticTable::Drained,
        ElasticTable::Limiter,
    ] {
        if !wanted(table) {
            continue;
        }
        let rendered = match table {
            ElasticTable::Added => (!added.is_empty()).then(|| render_added(&added)),
            ElasticTable::Drained => (!drained.is_empty()).then(|| render_drained(&drained)),
            ElasticTable::Limiter => (!limiter.is_empty()).then(|| render_limiter(&limiter)),
        };
        match rendered {
            Some(text) => {
                out.push_str(&text);
                out.push('\n');
            }
            None if only.is_some() => out.push_str("Not run.\n"),
            None => {}
        }
    }
    out
}

fn extra_f64(r: &Report, key: &str) -> Option<f64> {
    r.extra.get(key).and_then(Value::as_f64)
}

fn extra_u64(r: &Report, key: &str) -> u64 {
    r.extra.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// A counter by reason from `server_closes` / `closes_seen`.
fn by_reason(r: &Report, key: &str, reason: &str) -> u64 {
    r.extra
        .get(key)
        .and_then(|m| m.get(reason))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Node counts as `1 500 / 1 500 / –`.
fn counts(r: &Report, key: &str) -> String {
    let Some(list) = r.extra.get(key).and_then(Value::as_array) else {
        return "-".into();
    };
    list.iter()
        .map(|v| v.as_u64().map_or_else(|| "–".to_owned(), thousands))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// An integer with thin-space thousands, as the rest of the document.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The median of a non-empty list.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn seconds(s: f64) -> String {
    format!("{s:.1} s")
}

/// `p50 / p99` of a latency, or `-`.
fn p50_p99(l: Option<&Latency>) -> String {
    l.map_or_else(
        || "-".into(),
        |l| format!("{} / {}", micros(l.p50_us), micros(l.p99_us)),
    )
}

fn errors(r: &Report) -> u64 {
    r.errors + r.connect_errors
}

fn render_added(runs: &[&Report]) -> String {
    let mut out = String::from(
        "| run | clients | per node before → settled | time to balance (first 1012 at) | moved (server `rebalancing` closes) | closes seen by clients | reconnect errors | reconnect: connect p50 / p99 | away (close → reconnected) p50 / p99 | other errors |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {} → {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            thousands(extra_u64(r, "crowd")),
            counts(r, "node_clients_before"),
            counts(r, "node_clients_settled"),
            balance_time(r),
            thousands(by_reason(r, "server_closes", "rebalancing")),
            closes_seen(r),
            extra_u64(r, "reconnect_errors"),
            p50_p99(r.latency.get("reconnect")),
            p50_p99(r.latency.get("away")),
            errors(r),
        );
    }
    out
}

/// `7.2 s (1.4 s)`: settled, and the first close, after the event.
fn balance_time(r: &Report) -> String {
    match (extra_f64(r, "settled_s"), extra_f64(r, "first_close_s")) {
        (Some(settled), Some(first)) => format!("{settled:.1} s ({first:.1} s)"),
        (settled, _) => opt(settled, seconds),
    }
}

/// `1012: 1 001` and any other codes the crowd saw.
fn closes_seen(r: &Report) -> String {
    let Some(map) = r.extra.get("closes_seen").and_then(Value::as_object) else {
        return "-".into();
    };
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(code, n)| format!("{code}: {}", thousands(n.as_u64().unwrap_or(0))))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render_drained(runs: &[&Report]) -> String {
    let mut out = String::from(
        "| case | clients moved | drain (first close → last reconnect) | reconnect: connect p50 / p99 | away p50 / p99 | reconnect errors | staying clients' latency p50 / p99: before | during the storm | after | p99 during / before | lost | other errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let case = r.case.clone().unwrap_or_else(|| r.scenario.clone());
        let ratio = match (
            r.latency.get("delivery_before"),
            r.latency.get("delivery_storm"),
        ) {
            (Some(before), Some(storm)) if before.p99_us > 0.0 => {
                format!("{:.1}×", storm.p99_us / before.p99_us)
            }
            _ => "-".into(),
        };
        let reconnect_errors = extra_u64(r, "reconnect_errors");
        let _ = writeln!(
            out,
            "| {case} | {} of {} | {} | {} | {} | {reconnect_errors} | {} | {} | {} | {ratio} | {} | {} |",
            thousands(extra_u64(r, "moved_clients")),
            thousands(extra_u64(r, "crowd")),
            opt(extra_f64(r, "storm_s"), seconds),
            p50_p99(r.latency.get("reconnect")),
            p50_p99(r.latency.get("away")),
            p50_p99(r.latency.get("delivery_before")),
            p50_p99(r.latency.get("delivery_storm")),
            p50_p99(r.latency.get("delivery_after")),
            r.lost,
            errors(r),
        );
    }
    out
}

/// Medians per case (`...-off`, `...-on`), the ratio on / off of the
/// medians, and the ratio of each alternating pair of runs.
fn render_limiter(reports: &[Report]) -> String {
    let groups = grouped(reports);
    let ns = |v: f64| format!("{v:.0} ns");
    let mut out = String::from(
        "| case | runs | messages/s | server CPU / message | per run (CPU / message at messages/s) | vs. off | server CPU | bench CPU |\n|---|---|---|---|---|---|---|---|\n",
    );
    let reference = groups
        .iter()
        .find(|((case, _), _)| case.ends_with("-off"))
        .and_then(|(_, g)| g.median(|r| r.server_cpu_ns_per_delivery));
    for ((case, _), g) in &groups {
        let median = g.median(|r| r.server_cpu_ns_per_delivery);
        let per_run: Vec<String> = g
            .runs
            .iter()
            .map(|r| {
                format!(
                    "{} at {}/s",
                    opt(r.server_cpu_ns_per_delivery, ns),
                    si(r.delivered_per_s)
                )
            })
            .collect();
        let vs = match (reference, median) {
            (Some(off), Some(now)) if off > 0.0 => format!("{:+.1} %", (now / off - 1.0) * 100.0),
            _ => "-".into(),
        };
        let pct = |p: f64| format!("{p:.0} %");
        let _ = writeln!(
            out,
            "| {case} | {} | {} | {} | {} | {vs} | {} | {} |",
            g.runs.len(),
            opt(g.median(|r| Some(r.delivered_per_s)), si),
            opt(median, ns),
            per_run.join(", "),
            opt(
                g.median(|r| r
                    .server_cpu_s
                    .filter(|_| r.window_s > 0.0)
                    .map(|cpu| cpu / r.window_s * 100.0)),
                pct
            ),
            opt(g.median(|r| Some(r.bench_cpu_pct)), pct),
        );
    }
    // Pairs: run k without and run k with the limiter ran back to back,
    // so a pair shares the machine's load of that minute.
    let off = groups.iter().find(|((c, _), _)| c.ends_with("-off"));
    let on = groups.iter().find(|((c, _), _)| c.ends_with("-on"));
    if let (Some((_, off)), Some((_, on))) = (off, on) {
        let pairs: Vec<(f64, f64)> = off
            .runs
            .iter()
            .zip(&on.runs)
            .filter_map(|(a, b)| {
                let (a, b) = (a.server_cpu_ns_per_delivery?, b.server_cpu_ns_per_delivery?);
                (a > 0.0).then_some((b - a, (b / a - 1.0) * 100.0))
            })
            .collect();
        if !pairs.is_empty() {
            let shown: Vec<String> = pairs
                .iter()
                .map(|(ns, pct)| format!("{ns:+.0} ns ({pct:+.1} %)"))
                .collect();
            let _ = writeln!(
                out,
                "\nWith the limiter against without, pair by pair (runs back to back): {}; \
                 median of the pairs: **{:+.0} ns per message ({:+.1} %)**.",
                shown.join(", "),
                median(pairs.iter().map(|p| p.0).collect()),
                median(pairs.iter().map(|p| p.1).collect()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_us: f64, p99_us: f64) -> Latency {
        Latency {
            count: 100,
            mean_us: p50_us,
            p50_us,
            p90_us: p99_us,
            p99_us,
            p999_us: p99_us,
            max_us: p99_us,
        }
    }

    fn storm(until: &str, case: &str) -> Report {
        let mut r = Report {
            scenario: "storm".into(),
            case: Some(case.into()),
            ..Report::default()
        };
        r.params.insert("until".into(), until.into());
        r.extra.insert("crowd".into(), 3000.into());
        r.extra.insert("settled_s".into(), 7.25.into());
        r.extra.insert("first_close_s".into(), 1.375.into());
        r.extra.insert("storm_s".into(), 10.5.into());
        r.extra.insert("moved_clients".into(), 1001.into());
        r.extra.insert("reconnect_errors".into(), 2.into());
        r.extra.insert(
            "node_clients_before".into(),
            serde_json::json!([1500, 1500, null]),
        );
        r.extra.insert(
            "node_clients_settled".into(),
            serde_json::json!([1003, 998, 999]),
        );
        r.extra.insert(
            "server_closes".into(),
            serde_json::json!({"rebalancing": 1001}),
        );
        r.extra
            .insert("closes_seen".into(), serde_json::json!({"1012": 1001}));
        r.latency.insert("reconnect".into(), latency(900.0, 4000.0));
        r.latency
            .insert("delivery_before".into(), latency(300.0, 1000.0));
        r.latency
            .insert("delivery_storm".into(), latency(500.0, 3000.0));
        r.errors = 2;
        r
    }

    fn echo(case: &str, ns: f64) -> Report {
        Report {
            scenario: "echo".into(),
            case: Some(case.into()),
            target: "wrs".into(),
            delivered_per_s: 200_000.0,
            server_cpu_ns_per_delivery: Some(ns),
            ..Report::default()
        }
    }

    #[test]
    fn renders_every_table() {
        let reports = vec![
            storm("balanced", "add a node"),
            storm("moved", "drain at 500/s"),
            echo("limiter-off", 1000.0),
            echo("limiter-on", 1020.0),
            echo("limiter-off", 1010.0),
            echo("limiter-on", 1010.0),
        ];
        let out = render_elastic(&reports, None);
        assert!(
            out.contains("| 1 | 3 000 | 1 500 / 1 500 / – → 1 003 / 998 / 999 | 7.2 s (1.4 s) | 1 001 | 1012: 1 001 | 2 |"),
            "{out}"
        );
        assert!(
            out.contains("| drain at 500/s | 1 001 of 3 000 | 10.5 s |"),
            "{out}"
        );
        assert!(out.contains("| 3.0× |"), "{out}");
        assert!(
            out.contains("| limiter-on | 2 | 200.0 k | 1015 ns |"),
            "{out}"
        );
        assert!(out.contains("| +1.0 % |"), "{out}");
        assert!(
            out.contains(
                "pair by pair (runs back to back): +20 ns (+2.0 %), +0 ns (+0.0 %); \
                 median of the pairs: **+10 ns per message (+1.0 %)**."
            ),
            "{out}"
        );
    }

    #[test]
    fn renders_one_table_or_says_it_was_not_run() {
        let reports = vec![echo("limiter-off", 1000.0)];
        let out = render_elastic(&reports, Some(ElasticTable::Limiter));
        assert!(out.contains("| limiter-off | 1 |"), "{out}");
        assert!(!out.contains("Not run"), "{out}");
        let out = render_elastic(&reports, Some(ElasticTable::Drained));
        assert_eq!(out, "Not run.\n");
    }

    #[test]
    fn groups_digits() {
        assert_eq!(thousands(7), "7");
        assert_eq!(thousands(1000), "1 000");
        assert_eq!(thousands(1_234_567), "1 234 567");
    }
}
