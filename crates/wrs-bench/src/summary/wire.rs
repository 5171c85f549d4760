//! `wrs-bench summarize --wire DIR --only TABLE`: the tables of
//! `bench/wire.sh` (issue 13: compression, TLS, latency at a fixed rate,
//! idle memory with compression).
//!
//! Reports are grouped by case and relay (`--case`, `--label`) in the
//! order of their file names; every figure is the median over a group's
//! runs, lost messages and errors the worst run. The targets compare
//! groups of the same table: WRS with compression against WRS without,
//! WRS over TLS against Nchan behind nginx's TLS, idle memory against
//! 8 KiB per connection.

use std::fmt::Write as _;
use std::path::Path;

use super::{Group, grouped, read_reports_if_any};
use crate::report::{Report, micros, si};

/// One of the tables of `bench/wire.sh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WireTable {
    /// Fan-out of JSON snapshots, compression off and on.
    Compression,
    /// Plain fan-out at the maximum rate and at a fixed rate: throughput,
    /// CPU and latency next to the peers and the floor.
    Fanout,
    /// Fan-out over TLS.
    Tls,
    /// Idle connections, compression off and on: memory per connection.
    Idle,
}

/// WRS's label in reports.
const WRS: &str = "wrs";
/// Server CPU per delivery with compression at most this many times
/// without.
const COMPRESSION_CPU_MAX: f64 = 1.3;
/// Bytes on the wire at least this many times fewer with compression.
const COMPRESSION_BYTES_MIN: f64 = 3.0;
/// WRS over TLS: at least this many times Nchan's deliveries per second,
/// at most this share of its CPU per delivery.
const TLS_RATE_MIN: f64 = 2.0;
const TLS_CPU_MAX: f64 = 0.5;
/// Resident memory per idle connection with compression on, at most.
const IDLE_KIB_MAX: f64 = 8.0;

/// Reads every `*.json` report in `dir` and renders one table with its
/// target checks ("Not run." without reports).
///
/// # Errors
///
/// The directory or a report cannot be read or parsed.
pub fn summarize_wire(dir: &Path, table: WireTable) -> anyhow::Result<String> {
    Ok(render(&read_reports_if_any(dir)?, table))
}

fn render(reports: &[Report], table: WireTable) -> String {
    if reports.is_empty() {
        return "Not run.\n".into();
    }
    let groups = grouped(reports);
    match table {
        WireTable::Compression => render_compression(&groups),
        WireTable::Fanout => render_fanout(&groups, false),
        WireTable::Tls => render_fanout(&groups, true),
        WireTable::Idle => render_idle(&groups),
    }
}

type Groups<'a> = [((String, String), Group<'a>)];

/// The median of `f` over the runs where it is known.
fn median(g: &Group<'_>, f: impl Fn(&Report) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = g.runs.iter().filter_map(|r| f(r)).collect();
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

fn extra(r: &Report, key: &str) -> Option<f64> {
    r.extra.get(key).and_then(serde_json::Value::as_f64)
}

fn worst(g: &Group<'_>, f: impl Fn(&Report) -> u64) -> u64 {
    g.runs.iter().map(|r| f(r)).max().unwrap_or(0)
}

fn show(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "-".into(), format)
}

fn cpu_ns(g: &Group<'_>) -> Option<f64> {
    median(g, |r| r.server_cpu_ns_per_delivery)
}

fn find<'a, 'b>(groups: &'b Groups<'a>, case: &str, target: &str) -> Option<&'b Group<'a>> {
    groups
        .iter()
        .find(|((c, t), _)| c == case && t == target)
        .map(|(_, g)| g)
}

/// `**met**` or `**missed**` with the figure.
fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

fn render_compression(groups: &Groups<'_>) -> String {
    let mut out = String::from(
        "| case | relay | runs | deflate negotiated | delivered/s | server CPU / delivery | bytes on the wire / delivery | payload bytes / delivery | compression ratio | compressed | bench CPU | lost / errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((case, target), g) in groups {
        let subscribers = g
            .runs
            .iter()
            .map(|r| extra(r, "subscribers_deflate").unwrap_or(0.0) as u64)
            .min()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "| {case} | {target} | {} | {subscribers} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            g.runs.len(),
            show(median(g, |r| Some(r.delivered_per_s)), si),
            show(cpu_ns(g), |ns| format!("{ns:.0} ns")),
            show(
                median(g, |r| extra(r, "wire_bytes_per_delivery")),
                |b| format!("{b:.0} B")
            ),
            show(
                median(g, |r| extra(r, "payload_bytes_per_delivery")),
                |b| format!("{b:.0} B")
            ),
            show(median(g, |r| extra(r, "compression_ratio")), |x| format!(
                "{x:.2}×"
            )),
            show(median(g, |r| extra(r, "compressed_share")), |x| format!(
                "{:.0} %",
                x * 100.0
            )),
            show(median(g, |r| Some(r.bench_cpu_pct)), |p| format!(
                "{p:.0} %"
            )),
            worst(g, |r| r.lost),
            worst(g, |r| r.errors + r.connect_errors),
        );
    }
    // Off and on side by side, per relay.
    let mut checks = String::new();
    let mut relays: Vec<&str> = Vec::new();
    for ((_, target), _) in groups {
        if !relays.contains(&target.as_str()) {
            relays.push(target);
        }
    }
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for ((case, _), _) in groups {
        if case.starts_with("deflate-off") && !pairs.iter().any(|(off, _)| off == case) {
            pairs.push((case, case.replacen("deflate-off", "deflate-on", 1)));
        }
    }
    for (off_case, on_case) in &pairs {
        let load = match off_case.strip_prefix("deflate-off-") {
            Some(rate) => format!("at {rate} messages/s"),
            None => "at the maximum rate".to_owned(),
        };
        for &relay in &relays {
            let (Some(off), Some(on)) =
                (find(groups, off_case, relay), find(groups, on_case, relay))
            else {
                continue;
            };
            let cpu = cpu_ns(on).zip(cpu_ns(off)).map(|(on, off)| on / off);
            let wire = |g: &Group<'_>| median(g, |r| extra(r, "wire_bytes_per_delivery"));
            let bytes = wire(off).zip(wire(on)).map(|(off, on)| off / on);
            let rate = median(on, |r| Some(r.delivered_per_s))
                .zip(median(off, |r| Some(r.delivered_per_s)))
                .map(|(on, off)| on / off);
            if relay == WRS {
                let _ = writeln!(
                    checks,
                    "- WRS {load}: server CPU per delivery, compression on / off: {} (target ≤ {COMPRESSION_CPU_MAX}×: {}); bytes on the wire per delivery {} fewer with compression (target ≥ {COMPRESSION_BYTES_MIN}×: {}); deliveries per second on / off {}",
                    show(cpu, |x| format!("{x:.2}×")),
                    verdict(cpu.is_some_and(|x| x <= COMPRESSION_CPU_MAX)),
                    show(bytes, |x| format!("{x:.2}×")),
                    verdict(bytes.is_some_and(|x| x >= COMPRESSION_BYTES_MIN)),
                    show(rate, |x| format!("{x:.2}×")),
                );
            } else {
                let _ = writeln!(
                    checks,
                    "- {relay} {load}, on / off: server CPU per delivery {}, bytes on the wire {} fewer, deliveries per second {}",
                    show(cpu, |x| format!("{x:.2}×")),
                    show(bytes, |x| format!("{x:.2}×")),
                    show(rate, |x| format!("{x:.2}×")),
                );
            }
        }
        if let (Some(wrs), Some(nchan)) =
            (find(groups, on_case, WRS), find(groups, on_case, "nchan"))
        {
            let cpu = cpu_ns(wrs).zip(cpu_ns(nchan)).map(|(w, n)| w / n);
            let _ = writeln!(
                checks,
                "- compression on {load}, WRS / Nchan: server CPU per delivery {}",
                show(cpu, |x| format!("{x:.2}×"))
            );
        }
    }
    if !checks.is_empty() {
        out.push('\n');
        out.push_str(&checks);
    }
    out
}

fn render_fanout(groups: &Groups<'_>, tls: bool) -> String {
    let mut out = String::from(
        "| case | relay | runs | delivered/s | server CPU / delivery | latency p50 | p99 | server CPU | bench CPU | lost / errors |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((case, target), g) in groups {
        let latency =
            |f: fn(&crate::track::Latency) -> f64| median(g, |r| r.latency.get("delivery").map(f));
        let server_pct = median(g, |r| {
            r.server_cpu_s
                .filter(|_| r.window_s > 0.0)
                .map(|s| s / r.window_s * 100.0)
        });
        let _ = writeln!(
            out,
            "| {case} | {target} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            g.runs.len(),
            show(median(g, |r| Some(r.delivered_per_s)), si),
            show(cpu_ns(g), |ns| format!("{ns:.0} ns")),
            show(latency(|l| l.p50_us), micros),
            show(latency(|l| l.p99_us), micros),
            show(server_pct, |p| format!("{p:.0} %")),
            show(median(g, |r| Some(r.bench_cpu_pct)), |p| format!(
                "{p:.0} %"
            )),
            worst(g, |r| r.lost),
            worst(g, |r| r.errors + r.connect_errors),
        );
    }
    if !tls {
        return out;
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
        let fixed_rate = wrs.runs.iter().any(|r| r.params.contains_key("rate"));
        let rate = median(wrs, |r| Some(r.delivered_per_s))
            .zip(median(nchan, |r| Some(r.delivered_per_s)))
            .map(|(w, n)| w / n);
        let cpu = cpu_ns(wrs).zip(cpu_ns(nchan)).map(|(w, n)| w / n);
        let rate_check = if fixed_rate {
            format!(
                "{} (both carry the offered rate: no target)",
                show(rate, |x| format!("{x:.2}×"))
            )
        } else {
            format!(
                "{} (target ≥ {TLS_RATE_MIN}×: {})",
                show(rate, |x| format!("{x:.2}×")),
                verdict(rate.is_some_and(|x| x >= TLS_RATE_MIN))
            )
        };
        let _ = writeln!(
            checks,
            "- {case}, WRS / Nchan: deliveries per second {rate_check}; server CPU per delivery {} (target ≤ {TLS_CPU_MAX}×: {})",
            show(cpu, |x| format!("{x:.2}×")),
            verdict(cpu.is_some_and(|x| x <= TLS_CPU_MAX)),
        );
    }
    if !checks.is_empty() {
        out.push('\n');
        out.push_str(&checks);
    }
    out
}

fn render_idle(groups: &Groups<'_>) -> String {
    let mut out = String::from(
        "| case | relay | runs | connections held | deflate negotiated | RSS / connection | server CPU while idle | connect errors / errors |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let kib = |g: &Group<'_>| median(g, |r| extra(r, "rss_per_connection_kib"));
    for ((case, target), g) in groups {
        let held = g
            .runs
            .iter()
            .map(|r| extra(r, "held_to_the_end").unwrap_or(0.0) as u64)
            .min()
            .unwrap_or(0);
        let deflate = g.runs.iter().any(|r| r.params.contains_key("deflate"));
        let server_pct = median(g, |r| {
            r.server_cpu_s
                .filter(|_| r.window_s > 0.0)
                .map(|s| s / r.window_s * 100.0)
        });
        let _ = writeln!(
            out,
            "| {case} | {target} | {} | {held} | {} | {} | {} | {} / {} |",
            g.runs.len(),
            if deflate { "offered" } else { "not offered" },
            show(kib(g), |k| format!("{k:.2} KiB")),
            show(server_pct, |p| format!("{p:.1} %")),
            worst(g, |r| r.connect_errors),
            worst(g, |r| r.errors),
        );
    }
    if let Some(on) = find(groups, "idle-deflate-on", WRS) {
        let value = kib(on);
        let _ = write!(
            out,
            "\n- WRS RSS per idle connection with compression on: {} (target ≤ {IDLE_KIB_MAX} KiB: {})",
            show(value, |k| format!("{k:.2} KiB")),
            verdict(value.is_some_and(|k| k <= IDLE_KIB_MAX)),
        );
        if let Some(off) = find(groups, "idle-deflate-off", WRS).and_then(kib) {
            let _ = write!(out, "; off: {off:.2} KiB");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(case: &str, target: &str, cpu_ns: f64, wire: f64) -> Report {
        let mut r = Report {
            scenario: "fanout".into(),
            case: Some(case.into()),
            target: target.into(),
            delivered_per_s: 1000.0,
            server_cpu_ns_per_delivery: Some(cpu_ns),
            ..Report::default()
        };
        r.extra
            .insert("wire_bytes_per_delivery".into(), wire.into());
        r.extra
            .insert("payload_bytes_per_delivery".into(), 1500.0.into());
        r.extra
            .insert("compression_ratio".into(), (1500.0 / wire).into());
        r
    }

    #[test]
    fn checks_the_compression_targets_on_medians() {
        let reports = vec![
            run("deflate-off", "wrs", 100.0, 1504.0),
            run("deflate-off", "wrs", 300.0, 1504.0),
            run("deflate-on", "wrs", 120.0, 400.0),
            run("deflate-on", "wrs", 140.0, 400.0),
        ];
        let table = render(&reports, WireTable::Compression);
        // Medians 200 and 130 ns: 0.65×; 1504 / 400 = 3.76×.
        assert!(table.contains("at the maximum rate: server CPU per delivery, compression on / off: 0.65× (target ≤ 1.3×: **met**)"), "{table}");
        assert!(
            table.contains("3.76× fewer with compression (target ≥ 3×: **met**)"),
            "{table}"
        );
        let worse = vec![
            run("deflate-off-100", "wrs", 100.0, 1504.0),
            run("deflate-on-100", "wrs", 140.0, 1000.0),
        ];
        let table = render(&worse, WireTable::Compression);
        assert!(table.contains("WRS at 100 messages/s: server CPU per delivery, compression on / off: 1.40× (target ≤ 1.3×: **missed**)"), "{table}");
        assert!(
            table.contains("1.50× fewer with compression (target ≥ 3×: **missed**)"),
            "{table}"
        );
    }

    #[test]
    fn checks_the_tls_targets_against_nchan() {
        let mut wrs = run("tls-1k-max", "wrs", 200.0, 0.0);
        wrs.delivered_per_s = 500_000.0;
        let mut nchan = run("tls-1k-max", "nchan", 500.0, 0.0);
        nchan.delivered_per_s = 200_000.0;
        let table = render(&[wrs, nchan], WireTable::Tls);
        assert!(
            table.contains("deliveries per second 2.50× (target ≥ 2×: **met**)"),
            "{table}"
        );
        assert!(
            table.contains("server CPU per delivery 0.40× (target ≤ 0.5×: **met**)"),
            "{table}"
        );
    }

    #[test]
    fn without_reports_says_so() {
        assert_eq!(render(&[], WireTable::Idle), "Not run.\n");
    }
}
