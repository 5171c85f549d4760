//! `wrs-bench summarize DIR`: the Markdown tables of `docs/benchmarks.md`
//! from a directory of JSON reports.
//!
//! Reports are grouped by case (`--case`, else the scenario) and target.
//! Rates, latencies and CPU figures are the median over a group's runs;
//! lost, duplicated, reordered messages and errors are the worst run, so
//! a single loss is never averaged away. Cases that a peer also ran get a
//! side-by-side table with the ratio WRS / peer, and the cases named in
//! issue 4 are checked against their targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::report::{Report, micros, si};

mod elastic;
mod http;
mod wire;

pub use elastic::{ElasticTable, summarize_elastic};
pub use http::{HttpTable, summarize_http};
pub use wire::{WireTable, summarize_wire};

/// The target under test in side-by-side tables.
const WRS: &str = "wrs";
/// Latency names in order of preference for the one a table shows.
const PRIMARY_LATENCY: [&str; 5] = [
    "delivery",
    "round_trip",
    "create_delete",
    "cycle",
    "connect",
];

/// Reads every `*.json` report in `dir` and renders the tables.
///
/// # Errors
///
/// The directory or a report cannot be read or parsed.
pub fn summarize(dir: &Path) -> anyhow::Result<String> {
    Ok(render(&read_reports(dir)?))
}

/// Reads every `*.json` report in `dir` and renders the cluster table.
///
/// # Errors
///
/// The directory or a report cannot be read or parsed.
pub fn summarize_cluster(dir: &Path) -> anyhow::Result<String> {
    Ok(render_cluster(&read_reports(dir)?))
}

/// Reads every `*.json` report in `dir` (from `bench/admission.sh`) and
/// renders the admission table.
///
/// # Errors
///
/// The directory or a report cannot be read or parsed.
pub fn summarize_admission(dir: &Path) -> anyhow::Result<String> {
    Ok(render_admission(&read_reports(dir)?))
}

/// The reports in `dir`; none if it does not exist (a part not run).
fn read_reports_if_any(dir: &Path) -> anyhow::Result<Vec<Report>> {
    if dir.is_dir() {
        read_reports(dir)
    } else {
        Ok(Vec::new())
    }
}

fn read_reports(dir: &Path) -> anyhow::Result<Vec<Report>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut reports = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let report: Report =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        reports.push(report);
    }
    Ok(reports)
}

/// Runs grouped by (case, target), in order of first appearance.
fn grouped(reports: &[Report]) -> Vec<((String, String), Group<'_>)> {
    let mut groups: Vec<((String, String), Group<'_>)> = Vec::new();
    for r in reports {
        let key = (
            r.case.clone().unwrap_or_else(|| r.scenario.clone()),
            r.target.clone(),
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.runs.push(r),
            None => groups.push((key, Group { runs: vec![r] })),
        }
    }
    groups
}

/// The cluster table: one row per case and topology, with the CPU per
/// delivery of every process measured (`--process`) and the NATS messages
/// per published message (`--nats-monitor`).
fn render_cluster(reports: &[Report]) -> String {
    let groups = grouped(reports);
    let mut processes: Vec<String> = Vec::new();
    for r in reports {
        if let Some(map) = r
            .extra
            .get("process_cpu_ns_per_delivery")
            .and_then(|v| v.as_object())
        {
            for name in map.keys() {
                if !processes.contains(name) {
                    processes.push(name.clone());
                }
            }
        }
    }
    processes.sort();
    let mut out = String::from(
        "| case | topology | runs | delivered/s | p50 | p99 | lost | dup | CPU / delivery, all processes |",
    );
    for name in &processes {
        let _ = write!(out, " {name} |");
    }
    out.push_str(
        " NATS in / published | NATS out / published |
|---|---|---|---|---|---|---|---|---|",
    );
    out.push_str(&"---|".repeat(processes.len() + 2));
    out.push('\n');
    let ns = |ns: f64| format!("{ns:.0} ns");
    for ((case, target), g) in &groups {
        let _ = write!(
            out,
            "| {case} | {target} | {} | {} | {} | {} | {} | {} | {} |",
            g.runs.len(),
            opt(g.median(|r| Some(r.delivered_per_s)), si),
            opt(g.latency(|l| l.p50_us), micros),
            opt(g.latency(|l| l.p99_us), micros),
            g.worst(|r| r.lost),
            g.worst(|r| r.duplicated),
            opt(g.median(|r| r.server_cpu_ns_per_delivery), ns),
        );
        for name in &processes {
            let per = g.median(|r| {
                r.extra
                    .get("process_cpu_ns_per_delivery")
                    .and_then(|m| m.get(name))
                    .and_then(serde_json::Value::as_f64)
            });
            let _ = write!(out, " {} |", opt(per, ns));
        }
        let ratio = |v: f64| format!("{v:.2}");
        let _ = writeln!(
            out,
            " {} | {} |",
            opt(g.extra("nats_in_per_published"), ratio),
            opt(g.extra("nats_out_per_published"), ratio),
        );
    }
    out
}

/// The admission table: channel create + delete pairs (`churn --mode
/// rest`) and connects into one channel (`idle`), per topology, with the
/// CPU per operation of every process and the ratio to the first topology
/// (the standalone reference).
fn render_admission(reports: &[Report]) -> String {
    let groups = grouped(reports);
    let mut processes: Vec<String> = Vec::new();
    for r in reports {
        let per = r.extra.get("process_cpu_ns_per_delivery").or_else(|| {
            r.extra
                .get("connect_cpu_us_per_connect")
                .and_then(|c| c.get("by_process"))
        });
        if let Some(map) = per.and_then(|v| v.as_object()) {
            for name in map.keys() {
                if !processes.contains(name) && name != "server" {
                    processes.push(name.clone());
                }
            }
        }
    }
    processes.sort();
    let mut out = String::from(
        "| case | topology | runs | per second | vs. standalone | p50 | p99 | errors | CPU / operation, all processes |",
    );
    for name in &processes {
        let _ = write!(out, " {name} |");
    }
    out.push_str("\n|---|---|---|---|---|---|---|---|---|");
    out.push_str(&"---|".repeat(processes.len()));
    out.push('\n');
    // Churn reports give ns per pair; idle reports µs per connect.
    let rate = |r: &Report| match r.scenario.as_str() {
        "idle" => r
            .extra
            .get("connects_per_s")
            .and_then(serde_json::Value::as_f64),
        _ => Some(r.delivered_per_s),
    };
    let cpu_us = |r: &Report, name: Option<&str>| -> Option<f64> {
        match (r.scenario.as_str(), name) {
            ("idle", None) => r
                .extra
                .get("connect_cpu_us_per_connect")?
                .get("all")?
                .as_f64(),
            ("idle", Some(name)) => r
                .extra
                .get("connect_cpu_us_per_connect")?
                .get("by_process")?
                .get(name)?
                .as_f64(),
            (_, None) => r.server_cpu_ns_per_delivery.map(|ns| ns / 1000.0),
            (_, Some(name)) => r
                .extra
                .get("process_cpu_ns_per_delivery")?
                .get(name)?
                .as_f64()
                .map(|ns| ns / 1000.0),
        }
    };
    let us = |v: f64| format!("{v:.0} µs");
    // The reference of each case: its standalone row.
    let reference: BTreeMap<&str, f64> = groups
        .iter()
        .filter(|((_, target), _)| target == "standalone")
        .filter_map(|((case, _), g)| Some((case.as_str(), g.median(rate)?)))
        .collect();
    for ((case, target), g) in &groups {
        let per_second = g.median(rate);
        let vs = match (reference.get(case.as_str()), per_second) {
            (Some(standalone), Some(now)) => format!("{:.0} %", now / standalone * 100.0),
            _ => "-".to_owned(),
        };
        let _ = write!(
            out,
            "| {case} | {target} | {} | {} | {vs} | {} | {} | {} | {} |",
            g.runs.len(),
            opt(per_second, si),
            opt(g.latency(|l| l.p50_us), micros),
            opt(g.latency(|l| l.p99_us), micros),
            g.worst(|r| r.errors + r.connect_errors + r.lost),
            opt(g.median(|r| cpu_us(r, None)), us),
        );
        for name in &processes {
            let _ = write!(out, " {} |", opt(g.median(|r| cpu_us(r, Some(name))), us));
        }
        out.push('\n');
    }
    out
}

/// Runs of one case against one target.
struct Group<'a> {
    runs: Vec<&'a Report>,
}

impl Group<'_> {
    fn median(&self, f: impl Fn(&Report) -> Option<f64>) -> Option<f64> {
        let mut values: Vec<f64> = self.runs.iter().filter_map(|r| f(r)).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        })
    }

    fn worst(&self, f: impl Fn(&Report) -> u64) -> u64 {
        self.runs.iter().map(|r| f(r)).max().unwrap_or(0)
    }

    fn extra(&self, key: &str) -> Option<f64> {
        self.median(|r| r.extra.get(key).and_then(serde_json::Value::as_f64))
    }

    fn latency(&self, pick: fn(&crate::track::Latency) -> f64) -> Option<f64> {
        self.median(|r| primary_latency(r).map(pick))
    }

    fn first(&self) -> &Report {
        self.runs[0]
    }
}

/// Which latency a group's tables show.
fn latency_name<'a>(g: &'a Group<'_>) -> Option<&'a str> {
    PRIMARY_LATENCY
        .iter()
        .find(|k| g.first().latency.contains_key(**k))
        .copied()
}

fn primary_latency(r: &Report) -> Option<&crate::track::Latency> {
    PRIMARY_LATENCY.iter().find_map(|k| r.latency.get(*k))
}

fn render(reports: &[Report]) -> String {
    // Case order: first appearance; targets: WRS first, then by name.
    let mut cases: Vec<String> = Vec::new();
    let mut groups: BTreeMap<(String, String), Group<'_>> = BTreeMap::new();
    for r in reports {
        let case = r.case.clone().unwrap_or_else(|| r.scenario.clone());
        if !cases.contains(&case) {
            cases.push(case.clone());
        }
        groups
            .entry((case, r.target.clone()))
            .or_insert_with(|| Group { runs: Vec::new() })
            .runs
            .push(r);
    }
    let mut targets: Vec<String> = groups.keys().map(|(_, t)| t.clone()).collect();
    targets.sort_by_key(|t| (t != WRS, t.clone()));
    targets.dedup();

    let mut out = String::new();
    for target in &targets {
        let rows: Vec<(&String, &Group<'_>)> = cases
            .iter()
            .filter_map(|c| groups.get(&(c.clone(), target.clone())).map(|g| (c, g)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "### {target}\n");
        out.push_str(
            "| case | runs | parameters | delivered/s | p50 | p99 | p99.9 | max | lost | dup | reord | conn err | errors | server CPU / delivery | bench CPU | notes |\n",
        );
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (case, g) in rows {
            let r = g.first();
            let params: Vec<String> = r
                .params
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
                .collect();
            let _ = writeln!(
                out,
                "| {case} | {} | {} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                g.runs.len(),
                r.scenario,
                params.join(" "),
                opt(g.median(|r| Some(r.delivered_per_s)), si),
                opt(g.latency(|l| l.p50_us), micros),
                opt(g.latency(|l| l.p99_us), micros),
                opt(g.latency(|l| l.p999_us), micros),
                opt(g.latency(|l| l.max_us), micros),
                g.worst(|r| r.lost),
                g.worst(|r| r.duplicated),
                g.worst(|r| r.reordered),
                g.worst(|r| r.connect_errors),
                g.worst(|r| r.errors),
                opt(g.median(|r| r.server_cpu_ns_per_delivery), |ns| format!(
                    "{ns:.0} ns"
                )),
                opt(g.median(|r| Some(r.bench_cpu_pct)), |p| format!("{p:.0} %")),
                notes(g),
            );
        }
        out.push('\n');
    }

    let peers: Vec<&String> = targets.iter().filter(|t| *t != WRS).collect();
    let compared: Vec<&String> = cases
        .iter()
        .filter(|c| {
            groups.contains_key(&((*c).clone(), WRS.to_owned()))
                && peers
                    .iter()
                    .any(|p| groups.contains_key(&((*c).clone(), (*p).clone())))
        })
        .collect();
    if !compared.is_empty() {
        out.push_str("### Side by side (medians; ratio = WRS / peer)\n\n");
        let mut header = String::from("| case | metric | wrs |");
        let mut rule = String::from("|---|---|---|");
        for p in &peers {
            let _ = write!(header, " {p} | wrs/{p} |");
            rule.push_str("---|---|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        type Metric = (
            &'static str,
            fn(&Group<'_>) -> Option<f64>,
            fn(f64) -> String,
        );
        let metrics: [Metric; 5] = [
            (
                "delivered/s",
                |g| g.median(|r| Some(r.delivered_per_s)).filter(|&v| v > 0.0),
                si,
            ),
            ("p99 latency", |g| g.latency(|l| l.p99_us), micros),
            (
                "server CPU / delivery",
                |g| g.median(|r| r.server_cpu_ns_per_delivery),
                |ns| format!("{ns:.0} ns"),
            ),
            (
                "RSS / connection",
                |g| g.extra("rss_per_connection_kib"),
                |k| format!("{k:.1} KiB"),
            ),
            (
                "lost (worst run)",
                |g| Some(g.worst(|r| r.lost) as f64),
                |v| format!("{v:.0}"),
            ),
        ];
        for case in compared {
            let wrs = &groups[&(case.clone(), WRS.to_owned())];
            for (name, get, show) in &metrics {
                let Some(mine) = get(wrs) else { continue };
                let name = match (*name, latency_name(wrs)) {
                    ("p99 latency", Some(which)) => format!("p99 latency ({which})"),
                    (name, _) => name.to_owned(),
                };
                let mut line = format!("| {case} | {name} | {} |", show(mine));
                for p in &peers {
                    match groups.get(&(case.clone(), (*p).clone())).and_then(get) {
                        Some(theirs) => {
                            let ratio = if theirs > 0.0 {
                                format!("{:.2}", mine / theirs)
                            } else {
                                "-".into()
                            };
                            let _ = write!(line, " {} | {ratio} |", show(theirs));
                        }
                        None => line.push_str(" - | - |"),
                    }
                }
                let _ = writeln!(out, "{line}");
            }
        }
        out.push('\n');
    }

    let checks = targets_met(&groups);
    if !checks.is_empty() {
        out.push_str("### Targets of issue 4\n\n| target | measured | met |\n|---|---|---|\n");
        for (target, measured, met) in checks {
            let verdict = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {target} | {measured} | {verdict} |");
        }
        out.push('\n');
    }
    out
}

fn opt(value: Option<f64>, show: fn(f64) -> String) -> String {
    value.map_or_else(|| "-".into(), show)
}

/// Scenario-specific figures worth a glance.
fn notes(g: &Group<'_>) -> String {
    let mut notes = Vec::new();
    let mut add = |key: &str, label: &str, show: fn(f64) -> String| {
        if let Some(v) = g.extra(key) {
            notes.push(format!("{label} {}", show(v)));
        }
    };
    add("fairness_spread_pct", "fairness spread", |v| {
        format!("{v:.2} %")
    });
    add("replies_missing", "replies missing", |v| format!("{v:.0}"));
    add("rss_per_connection_kib", "RSS/conn", |v| {
        format!("{v:.2} KiB")
    });
    add("held_to_the_end", "held", |v| format!("{v:.0}"));
    add("create_delete_per_s", "create+delete/s", si);
    add("cycles_per_s", "cycles/s", si);
    add("publish_rate_per_s", "published/s", si);
    if g.median(|r| Some(r.bench_cpu_pct))
        .is_some_and(|p| p >= crate::report::BENCH_SATURATED_PCT)
    {
        notes.push("load generator saturated".into());
    }
    notes.join(", ")
}

type Check = (String, String, Option<bool>);

/// The targets of issue 4, for the cases `bench/run.sh` runs.
fn targets_met(groups: &BTreeMap<(String, String), Group<'_>>) -> Vec<Check> {
    let get = |case: &str, target: &str| groups.get(&(case.to_owned(), target.to_owned()));
    let mut checks = Vec::new();
    if let Some(wrs) = get("fanout-1k-max", WRS) {
        let nchan = get("fanout-1k-max", "nchan");
        let mine = wrs.median(|r| Some(r.delivered_per_s));
        let theirs = nchan.and_then(|n| n.median(|r| Some(r.delivered_per_s)));
        checks.push(ratio_check(
            "fan-out 1→1000 max rate: deliveries/s ≥ 2× Nchan",
            mine,
            theirs,
            |m, t| m >= 2.0 * t,
            si,
        ));
        let mine = wrs.median(|r| r.server_cpu_ns_per_delivery);
        let theirs = nchan.and_then(|n| n.median(|r| r.server_cpu_ns_per_delivery));
        checks.push(ratio_check(
            "fan-out 1→1000 max rate: server CPU/delivery ≤ ½ Nchan",
            mine,
            theirs,
            |m, t| m <= 0.5 * t,
            |ns| format!("{ns:.0} ns"),
        ));
        let lost = wrs.worst(|r| r.lost);
        let dup = wrs.worst(|r| r.duplicated);
        checks.push((
            "fan-out 1→1000 max rate: 0 lost, 0 duplicated".into(),
            format!("lost {lost}, duplicated {dup} (worst run)"),
            Some(lost == 0 && dup == 0),
        ));
    }
    if let Some(wrs) = get("fanout-1k-40", WRS) {
        let mine = wrs.latency(|l| l.p99_us);
        let theirs = get("fanout-1k-40", "nchan").and_then(|n| n.latency(|l| l.p99_us));
        checks.push(ratio_check(
            "fixed 40 msg/s × 1000 subscribers: p99 ≤ ½ Nchan's",
            mine,
            theirs,
            |m, t| m <= 0.5 * t,
            micros,
        ));
    }
    if let Some(wrs) = get("idle-19k", WRS) {
        let kib = wrs.extra("rss_per_connection_kib");
        let held = wrs.extra("held_to_the_end").unwrap_or(0.0);
        checks.push((
            "19 000 idle connections at ≤ 8 KiB RSS each".into(),
            format!(
                "{} per connection, {held:.0} held",
                opt(kib, |k| format!("{k:.2} KiB"))
            ),
            kib.map(|k| k <= 8.0 && held >= 19_000.0),
        ));
    }
    if let Some(wrs) = get("churn", WRS) {
        let rate = wrs.extra("create_delete_per_s");
        let errors = wrs.worst(|r| r.errors);
        checks.push((
            "churn: ≥ 20 000 create+delete/s, 0 errors".into(),
            format!("{}/s, {errors} errors", opt(rate, si)),
            rate.map(|r| r >= 20_000.0 && errors == 0),
        ));
    }
    for (case, label) in [
        ("pushpull-max", "push-pull"),
        ("faninout-max", "fan-in-out"),
    ] {
        if let Some(wrs) = get(case, WRS) {
            let lost = wrs.worst(|r| r.lost);
            let dup = wrs.worst(|r| r.duplicated);
            let spread = wrs.extra("fairness_spread_pct");
            checks.push((
                format!("{label} at max rate: exactly once, fairness within 1 %"),
                format!(
                    "lost {lost}, duplicated {dup}, spread {}",
                    opt(spread, |s| format!("{s:.2} %"))
                ),
                spread.map(|s| s <= 1.0 && lost == 0 && dup == 0),
            ));
        }
    }
    checks
}

fn ratio_check(
    name: &str,
    mine: Option<f64>,
    theirs: Option<f64>,
    met: fn(f64, f64) -> bool,
    show: fn(f64) -> String,
) -> Check {
    match (mine, theirs) {
        (Some(m), Some(t)) if t > 0.0 => (
            name.into(),
            format!("WRS {} vs Nchan {} (×{:.2})", show(m), show(t), m / t),
            Some(met(m, t)),
        ),
        (Some(m), _) => (name.into(), format!("WRS {}, no Nchan run", show(m)), None),
        _ => (name.into(), "-".into(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::Latency;

    fn run(case: &str, target: &str, rate: f64, cpu: f64) -> Report {
        let mut r = Report {
            scenario: "fanout".into(),
            case: Some(case.into()),
            target: target.into(),
            delivered_per_s: rate,
            server_cpu_ns_per_delivery: Some(cpu),
            ..Report::default()
        };
        r.latency.insert(
            "delivery".into(),
            Latency {
                count: 1,
                mean_us: 1.0,
                p50_us: 1.0,
                p90_us: 1.0,
                p99_us: rate / 1000.0,
                p999_us: 1.0,
                max_us: 1.0,
            },
        );
        r
    }

    #[test]
    fn cluster_table_shows_each_process_and_nats_per_message() {
        let mut one = run("cluster-max", "1 node", 900_000.0, 100.0);
        one.extra.insert(
            "process_cpu_ns_per_delivery".into(),
            serde_json::json!({"wrs-a": 100.0}),
        );
        let mut three = run("cluster-max", "3 nodes", 800_000.0, 130.0);
        three.extra.insert(
            "process_cpu_ns_per_delivery".into(),
            serde_json::json!({"wrs-a": 50.0, "wrs-b": 40.0, "nats": 2.0}),
        );
        three
            .extra
            .insert("nats_in_per_published".into(), 1.01.into());
        three
            .extra
            .insert("nats_out_per_published".into(), 2.0.into());
        let md = render_cluster(&[one, three]);
        assert!(
            md.contains("| nats | wrs-a | wrs-b | NATS in / published | NATS out / published |"),
            "{md}"
        );
        assert!(
            md.contains("| cluster-max | 1 node | 1 | 900.0 k |")
                && md.contains("| 100 ns | - | 100 ns | - | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("| 130 ns | 2 ns | 50 ns | 40 ns | 1.01 | 2.00 |"),
            "{md}"
        );
    }

    #[test]
    fn medians_ratios_and_targets() {
        let reports = vec![
            run("fanout-1k-max", "wrs", 500_000.0, 400.0),
            run("fanout-1k-max", "wrs", 900_000.0, 300.0),
            run("fanout-1k-max", "wrs", 600_000.0, 350.0),
            run("fanout-1k-max", "nchan", 200_000.0, 1000.0),
        ];
        let md = render(&reports);
        assert!(md.contains("| fanout-1k-max | 3 |"), "{md}");
        assert!(md.contains("600.0 k"), "median rate: {md}");
        assert!(md.contains("| 3.00 |"), "ratio 600k/200k: {md}");
        assert!(
            md.contains("deliveries/s ≥ 2× Nchan | WRS 600.0 k vs Nchan 200.0 k (×3.00) | yes"),
            "{md}"
        );
        assert!(
            md.contains("≤ ½ Nchan | WRS 350 ns vs Nchan 1000 ns (×0.35) | yes"),
            "{md}"
        );
    }
}
