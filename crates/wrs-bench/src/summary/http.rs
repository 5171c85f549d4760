//! `wrs-bench summarize --http TABLE DIR`: the tables of `bench/http.sh`
//! (issue 12, SPEC §10: HTTP publish, Server-Sent Events, history).
//!
//! Reports are grouped by case and relay (`--case`, `--label`) in the
//! order of their file names; every figure is the median over a group's
//! runs, lost and duplicated messages and errors the worst run. The
//! targets compare WRS with Nchan in the same case: at least twice the
//! published messages per second at no more than half the server CPU per
//! delivery. The history table compares each topology's run with a
//! history against the one without.

use std::fmt::Write as _;
use std::path::Path;

use super::{Group, grouped, read_reports_if_any};
use crate::report::{Report, micros, si};

/// One of the tables of `bench/http.sh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpTable {
    /// One HTTP publisher -> WebSocket subscribers, next to Nchan.
    Publish,
    /// One publisher -> Server-Sent Events subscribers, next to Nchan.
    Sse,
    /// WebSocket fan-out on channels with and without a history.
    History,
}

/// WRS's label in reports (standalone).
const WRS: &str = "wrs";
/// WRS / Nchan, published messages per second: at least.
const RATE_MIN: f64 = 2.0;
/// WRS / Nchan, server CPU per delivery: at most.
const CPU_MAX: f64 = 0.5;

/// Reads every `*.json` report in `dir` and renders one table with its
/// checks ("Not run." without reports).
///
/// # Errors
///
/// The directory or a report cannot be read or parsed.
pub fn summarize_http(dir: &Path, table: HttpTable) -> anyhow::Result<String> {
    Ok(render(&read_reports_if_any(dir)?, table))
}

fn render(reports: &[Report], table: HttpTable) -> String {
    if reports.is_empty() {
        return "Not run.\n".into();
    }
    let groups = grouped(reports);
    match table {
        HttpTable::Publish | HttpTable::Sse => render_relays(&groups, table),
        HttpTable::History => render_history(&groups),
    }
}

type Groups<'a> = [((String, String), Group<'a>)];

fn extra(r: &Report, key: &str) -> Option<f64> {
    r.extra.get(key).and_then(serde_json::Value::as_f64)
}

fn publish_rate(g: &Group<'_>) -> Option<f64> {
    g.median(|r| extra(r, "publish_rate_per_s"))
}

fn cpu_ns(g: &Group<'_>) -> Option<f64> {
    g.median(|r| r.server_cpu_ns_per_delivery)
}

fn show(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "-".into(), format)
}

fn times(x: f64) -> String {
    format!("{x:.2}×")
}

fn pct(p: f64) -> String {
    format!("{p:.0} %")
}

fn ns(n: f64) -> String {
    format!("{n:.0} ns")
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

fn find<'a, 'b>(groups: &'b Groups<'a>, case: &str, target: &str) -> Option<&'b Group<'a>> {
    groups
        .iter()
        .find(|((c, t), _)| c == case && t == target)
        .map(|(_, g)| g)
}

/// The lowest and highest receiver count the server reported, over the
/// runs ("-" when not reported).
fn receivers(g: &Group<'_>) -> String {
    let low = g
        .runs
        .iter()
        .filter_map(|r| extra(r, "receivers_min"))
        .reduce(f64::min);
    let high = g
        .runs
        .iter()
        .filter_map(|r| extra(r, "receivers_max"))
        .reduce(f64::max);
    match (low, high) {
        (Some(low), Some(high)) if low == high => format!("{low:.0}"),
        (Some(low), Some(high)) => format!("{low:.0}–{high:.0}"),
        _ => "-".into(),
    }
}

fn server_pct(r: &Report) -> Option<f64> {
    r.server_cpu_s
        .filter(|_| r.window_s > 0.0)
        .map(|s| s / r.window_s * 100.0)
}

fn render_relays(groups: &Groups<'_>, table: HttpTable) -> String {
    let sse = table == HttpTable::Sse;
    let mut out = String::from(
        "| case | relay | runs | published msg/s | delivered/s | server CPU / delivery | server CPU | bench CPU | latency p50 | p99 |",
    );
    out.push_str(if sse {
        " bytes / delivery | lost / dup / errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    } else {
        " receivers reported | lost / dup / errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    });
    for ((case, target), g) in groups {
        let latency =
            |f: fn(&crate::track::Latency) -> f64| g.median(|r| r.latency.get("delivery").map(f));
        let last = if sse {
            show(g.extra("wire_bytes_per_delivery"), |b| format!("{b:.0} B"))
        } else {
            receivers(g)
        };
        let _ = writeln!(
            out,
            "| {case} | {target} | {} | {} | {} | {} | {} | {} | {} | {} | {last} | {} / {} / {} |",
            g.runs.len(),
            show(publish_rate(g), si),
            show(g.median(|r| Some(r.delivered_per_s)), si),
            show(cpu_ns(g), ns),
            show(g.median(server_pct), pct),
            show(g.median(|r| Some(r.bench_cpu_pct)), pct),
            show(latency(|l| l.p50_us), micros),
            show(latency(|l| l.p99_us), micros),
            g.worst(|r| r.lost),
            g.worst(|r| r.duplicated),
            g.worst(|r| r.errors + r.connect_errors),
        );
    }
    let mut cases: Vec<&str> = Vec::new();
    for ((case, _), _) in groups {
        if !cases.contains(&case.as_str()) {
            cases.push(case);
        }
    }
    let mut checks = String::new();
    for case in cases {
        let (Some(wrs), Some(nchan)) = (find(groups, case, WRS), find(groups, case, "nchan"))
        else {
            continue;
        };
        let rate = publish_rate(wrs)
            .zip(publish_rate(nchan))
            .map(|(w, n)| w / n);
        let cpu = cpu_ns(wrs).zip(cpu_ns(nchan)).map(|(w, n)| w / n);
        // The WebSocket publisher is the reference row, not a target.
        let targeted = case.starts_with("http-") || case.starts_with("sse-");
        if targeted {
            let _ = writeln!(
                checks,
                "- {case}, WRS / Nchan: published messages per second {} (target ≥ {RATE_MIN}×: {}); server CPU per delivery {} (target ≤ {CPU_MAX}×: {})",
                show(rate, times),
                verdict(rate.is_some_and(|x| x >= RATE_MIN)),
                show(cpu, times),
                verdict(cpu.is_some_and(|x| x <= CPU_MAX)),
            );
        } else {
            let _ = writeln!(
                checks,
                "- {case} (reference, no target), WRS / Nchan: published messages per second {}; server CPU per delivery {}",
                show(rate, times),
                show(cpu, times),
            );
        }
    }
    if !checks.is_empty() {
        out.push('\n');
        out.push_str(&checks);
    }
    out
}

/// Whether a report's channel had a history.
fn with_history(g: &Group<'_>) -> bool {
    g.first().params.contains_key("history")
}

/// The group on the same topology whose runs had the same parameters
/// but no history: what `g` is compared with.
fn without_history<'a, 'b>(
    groups: &'b Groups<'a>,
    target: &str,
    g: &Group<'_>,
) -> Option<&'b Group<'a>> {
    let mut params = g.first().params.clone();
    params.remove("history");
    groups
        .iter()
        .find(|((_, t), other)| t == target && other.first().params == params)
        .map(|(_, other)| other)
}

fn render_history(groups: &Groups<'_>) -> String {
    let nats = groups.iter().any(|(_, g)| {
        g.runs.iter().any(|r| {
            r.extra
                .get("process_cpu_ns_per_delivery")
                .and_then(|m| m.get("nats"))
                .is_some()
        })
    });
    let mut out = String::from(
        "| case | topology | history | runs | published msg/s | delivered/s | server CPU / delivery | vs. without history |",
    );
    if nats {
        out.push_str(" of it NATS |");
    }
    out.push_str(
        " latency p50 | p99 | bench CPU | lost / dup / errors |\n|---|---|---|---|---|---|---|---|",
    );
    if nats {
        out.push_str("---|");
    }
    out.push_str("---|---|---|---|\n");
    let mut checks = String::new();
    for ((case, target), g) in groups {
        let history = g
            .first()
            .params
            .get("history")
            .and_then(serde_json::Value::as_str)
            .map_or_else(
                || "none".to_owned(),
                |h| h.replacen(':', " msgs, ", 1) + " ms",
            );
        let base = if with_history(g) {
            without_history(groups, target, g)
        } else {
            None
        };
        let ratio = base.and_then(|b| cpu_ns(g).zip(cpu_ns(b)).map(|(h, b)| h / b));
        let latency =
            |f: fn(&crate::track::Latency) -> f64| g.median(|r| r.latency.get("delivery").map(f));
        let _ = write!(
            out,
            "| {case} | {target} | {history} | {} | {} | {} | {} | {} |",
            g.runs.len(),
            show(publish_rate(g), si),
            show(g.median(|r| Some(r.delivered_per_s)), si),
            show(cpu_ns(g), ns),
            show(ratio, times),
        );
        if nats {
            let per = g.median(|r| {
                r.extra
                    .get("process_cpu_ns_per_delivery")
                    .and_then(|m| m.get("nats"))
                    .and_then(serde_json::Value::as_f64)
            });
            let _ = write!(out, " {} |", show(per, ns));
        }
        let _ = writeln!(
            out,
            " {} | {} | {} | {} / {} / {} |",
            show(latency(|l| l.p50_us), micros),
            show(latency(|l| l.p99_us), micros),
            show(g.median(|r| Some(r.bench_cpu_pct)), pct),
            g.worst(|r| r.lost),
            g.worst(|r| r.duplicated),
            g.worst(|r| r.errors + r.connect_errors),
        );
        if let Some(b) = base
            && let (Some(on), Some(off)) = (cpu_ns(g), cpu_ns(b))
        {
            let load = match g
                .first()
                .params
                .get("rate")
                .and_then(serde_json::Value::as_f64)
            {
                Some(rate) => format!("at {rate:.0} messages/s"),
                None => "at the maximum rate".to_owned(),
            };
            let rate = publish_rate(g)
                .zip(publish_rate(b))
                .map(|(on, off)| on / off);
            let _ = writeln!(
                checks,
                "- {target}, {load}: history costs {:+.0} ns of server CPU per delivery ({:+.1} %); published messages per second with / without: {}",
                on - off,
                (on / off - 1.0) * 100.0,
                show(rate, times),
            );
        }
    }
    if !checks.is_empty() {
        out.push('\n');
        out.push_str(&checks);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(case: &str, target: &str, published: f64, cpu_ns: f64) -> Report {
        let mut r = Report {
            scenario: "fanout".into(),
            case: Some(case.into()),
            target: target.into(),
            delivered_per_s: published * 1000.0,
            server_cpu_ns_per_delivery: Some(cpu_ns),
            ..Report::default()
        };
        r.extra
            .insert("publish_rate_per_s".into(), published.into());
        r.extra.insert("receivers_min".into(), 1000.into());
        r.extra.insert("receivers_max".into(), 1000.into());
        r
    }

    #[test]
    fn checks_the_targets_against_nchan() {
        let reports = vec![
            run("http-pub-1k", "wrs", 900.0, 200.0),
            run("http-pub-1k", "wrs", 1100.0, 300.0),
            run("http-pub-1k", "nchan", 400.0, 600.0),
            run("ws-pub-1k", "wrs", 3000.0, 150.0),
            run("ws-pub-1k", "nchan", 300.0, 3000.0),
        ];
        let table = render(&reports, HttpTable::Publish);
        // Medians 1000 msg/s and 250 ns against 400 and 600.
        assert!(
            table.contains("- http-pub-1k, WRS / Nchan: published messages per second 2.50× (target ≥ 2×: **met**); server CPU per delivery 0.42× (target ≤ 0.5×: **met**)"),
            "{table}"
        );
        assert!(
            table.contains("- ws-pub-1k (reference, no target)"),
            "{table}"
        );
        assert!(table.contains("| 1000 | 0 / 0 / 0 |"), "{table}");
        let missed = vec![
            run("sse-1k", "wrs", 500.0, 400.0),
            run("sse-1k", "nchan", 400.0, 600.0),
        ];
        let table = render(&missed, HttpTable::Sse);
        assert!(
            table.contains("1.25× (target ≥ 2×: **missed**)")
                && table.contains("0.67× (target ≤ 0.5×: **missed**)"),
            "{table}"
        );
    }

    #[test]
    fn compares_history_with_the_same_topology() {
        let mut on = run("fanout-1k-history", "wrs", 2000.0, 260.0);
        on.params.insert("history".into(), json!("1000:60000"));
        let mut slow = run("fanout-1k-200", "wrs", 200.0, 4000.0);
        slow.params.insert("rate".into(), json!(200.0));
        let mut slow_on = run("fanout-1k-200-history", "wrs", 200.0, 4100.0);
        slow_on.params.insert("rate".into(), json!(200.0));
        slow_on.params.insert("history".into(), json!("1000:60000"));
        let reports = vec![
            run("fanout-1k", "wrs", 2500.0, 200.0),
            on,
            slow,
            slow_on,
            run("fanout-1k", "wrs cluster", 1000.0, 900.0),
        ];
        let table = render(&reports, HttpTable::History);
        assert!(table.contains("| 1000 msgs, 60000 ms |"), "{table}");
        assert!(
            table.contains(
                "- wrs, at the maximum rate: history costs +60 ns of server CPU per delivery (+30.0 %); published messages per second with / without: 0.80×"
            ),
            "{table}"
        );
        assert!(
            table.contains("- wrs, at 200 messages/s: history costs +100 ns of server CPU per delivery (+2.5 %)"),
            "{table}"
        );
        assert!(!table.contains("- wrs cluster"), "{table}");
    }

    #[test]
    fn without_reports_says_so() {
        assert_eq!(render(&[], HttpTable::Sse), "Not run.\n");
    }
}
