//! `idle`: N connections that send nothing, held for the duration, to
//! measure what an idle connection costs the server: resident memory per
//! connection (from `/proc/PID/status` of `--server-pid`, before the first
//! connect and at the end of the hold) and CPU while idle.
//!
//! Past about 28 000 connections one source address runs out of
//! ephemeral ports, so connections are spread over 127.0.0.2, 127.0.0.3,
//! ... (`--sources`, by default one address per 10 000 connections).
//! Pings from the server are answered, so keepalive never drops them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::collect;
use crate::harness::{self, Common, Dial, RunProgress, Window};
use crate::procfs;
use crate::report::Report;
use crate::target::Target;
use crate::track::Latencies;
use crate::ws::{Frame, WsConn};

/// Connections per source address when `--sources` is not given.
const PER_SOURCE: usize = 10_000;

#[derive(Args, Clone, Debug)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels; connection i joins channel i mod K.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub channels: usize,
    /// Source addresses (127.0.0.2 and up); default one per 10 000
    /// connections, none (the kernel's choice) up to 10 000.
    #[arg(long)]
    pub sources: Option<usize>,
}

/// Runs the scenario.
///
/// # Errors
///
/// Bad arguments, channels that cannot be created, or an unreadable
/// server PID.
pub async fn run(common: &Common, args: &IdleArgs) -> anyhow::Result<Report> {
    ensure!(args.channels >= 1, "--channels must be at least 1");
    let target = Target::from_args(&common.target).await?;
    let mut report = common.report("idle", target.label());
    let sources = args
        .sources
        .unwrap_or_else(|| args.connections.div_ceil(PER_SOURCE))
        .max(1);
    report
        .params
        .insert("connections".into(), json!(args.connections));
    report
        .params
        .insert("channels".into(), json!(args.channels));
    report.params.insert("sources".into(), json!(sources));
    let channels = target
        .open_channels(args.channels, "pub-sub", common.connect_timeout())
        .await?;
    let rss = |pid: Option<u32>| -> anyhow::Result<Option<u64>> {
        pid.map(procfs::rss_bytes)
            .transpose()
            .map_err(|e| anyhow::anyhow!("cannot read the server's /proc/PID/status: {e}"))
    };
    let rss_before = rss(common.server_pid)?;
    let dials = (0..args.connections)
        .map(|i| Dial {
            url: channels[i % channels.len()].sub.clone(),
            source: harness::source_address(i, sources),
        })
        .collect();
    // CPU of every measured process (`--process`, `--server-pid`) while
    // the connections are opened: what admission costs.
    let mut meters: Vec<(String, procfs::CpuMeter)> = Vec::new();
    for (name, pid) in common
        .processes
        .iter()
        .map(|(name, pid)| (name.clone(), *pid))
        .chain(common.server_pid.map(|pid| ("server".to_owned(), pid)))
    {
        let meter = procfs::CpuMeter::start(pid)
            .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}/stat of {name}: {e}"))?;
        meters.push((name, meter));
    }
    let connecting = Instant::now();
    let opened = harness::open_all(common, dials, 1024, "idle connections").await;
    let connect_s = connecting.elapsed().as_secs_f64();
    let connects = opened.connect_times.len().max(1) as f64;
    let mut per_connect = serde_json::Map::new();
    let mut total_us = 0.0;
    for (name, meter) in &meters {
        let us = meter.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e6) / connects;
        if name != "server" || common.processes.is_empty() {
            total_us += us;
        }
        per_connect.insert(name.clone(), json!(us));
    }
    if !meters.is_empty() {
        report.extra.insert(
            "connect_cpu_us_per_connect".into(),
            json!({"all": total_us, "by_process": per_connect}),
        );
    }
    harness::note_connects(&mut report, &opened);
    let mut connect_latency = Latencies::new();
    for took in &opened.connect_times {
        connect_latency.record(took.as_nanos() as u64);
    }
    if let Some(l) = connect_latency.summary() {
        report.latency.insert("connect".into(), l);
    }
    report.extra.insert(
        "connects_per_s".into(),
        json!(opened.connect_times.len() as f64 / connect_s.max(1e-9)),
    );

    let stop = CancellationToken::new();
    let dropped = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = opened
        .conns
        .into_iter()
        .flatten()
        .map(|conn| tokio::spawn(hold(conn, stop.clone(), Arc::clone(&dropped))))
        .collect();
    let window = Window::start(common).await?;
    let progress = RunProgress::start(common, Arc::new(AtomicU64::new(0)));
    tokio::time::sleep(common.duration()).await;
    drop(progress);
    let rss_after = rss(common.server_pid)?;
    let measured = window.close(Instant::now()).await;
    stop.cancel();
    for outcome in collect(tasks, Duration::from_secs(10)).await {
        outcome.add_to(&mut report);
    }
    measured.apply(&mut report);
    let held = report
        .connections
        .saturating_sub(dropped.load(Ordering::SeqCst));
    report.extra.insert("held_to_the_end".into(), json!(held));
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report
            .extra
            .insert("server_rss_before_bytes".into(), json!(before));
        report
            .extra
            .insert("server_rss_after_bytes".into(), json!(after));
        if report.connections > 0 {
            let per = after.saturating_sub(before) as f64 / report.connections as f64;
            report
                .extra
                .insert("rss_per_connection_bytes".into(), json!(per));
            report
                .extra
                .insert("rss_per_connection_kib".into(), json!(per / 1024.0));
        }
    }
    report.errors += target
        .close_channels(&channels, common.connect_timeout())
        .await;
    Ok(report)
}

/// Holds one connection, answering pings, until stopped. A connection
/// the server ends is an error.
async fn hold(mut conn: WsConn, stop: CancellationToken, dropped: Arc<AtomicU64>) -> Vec<String> {
    let lost = |why: String| {
        dropped.fetch_add(1, Ordering::SeqCst);
        vec![why]
    };
    loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return Vec::new(),
            read = conn.fill() => read,
        };
        match read {
            Ok(0) => return lost("idle connection closed by the server".into()),
            Err(e) => return lost(format!("idle connection: read failed: {e}")),
            Ok(_) => {}
        }
        loop {
            match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Close(code))) => {
                    return lost(format!(
                        "idle connection closed by the server with {code:?}"
                    ));
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return lost(format!("idle connection: {e}")),
            }
        }
        if let Err(e) = conn.flush().await {
            return lost(format!("idle connection: write failed: {e}"));
        }
    }
}
