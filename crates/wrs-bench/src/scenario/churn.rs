//! `churn`: how fast channels come and go.
//!
//! Two phases, each `--duration` long: `rest`, where W workers on
//! keep-alive connections create (`POST /channels`) and delete
//! (`DELETE /channels/{id}`) channels back to back; and `cycle`, where each
//! worker creates an `echo` channel, connects to it, sends one message,
//! waits for it to come back, deletes the channel and waits for the close
//! frame (4001) — the whole life of a short-lived channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;

use super::{Outcome, collect};
use crate::harness::{Common, RunProgress, Window};
use crate::http::HttpClient;
use crate::payload::{Composer, Kind, Stamp, now_ns};
use crate::report::Report;
use crate::target::{Target, create_channel};
use crate::track::Latencies;
use crate::ws::{Frame, WsConn, WsUrl};

/// Longest wait for the echo and for the close frame in a cycle.
const CYCLE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChurnMode {
    /// Both phases, one after the other.
    Both,
    /// Only REST create + delete.
    Rest,
    /// Only create -> connect -> send -> delete cycles.
    Cycle,
}

#[derive(Args, Clone, Debug)]
pub struct ChurnArgs {
    /// Concurrent workers.
    #[arg(short = 'w', long, default_value_t = 16)]
    pub workers: usize,
    /// Which phases to run.
    #[arg(long, value_enum, default_value_t = ChurnMode::Both)]
    pub mode: ChurnMode,
}

/// What a worker counted.
#[derive(Default)]
struct WorkerOut {
    latencies: Latencies,
    done: u64,
    lost: u64,
    connect_errors: u64,
    errors: Vec<String>,
    error_count: u64,
}

impl WorkerOut {
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < 3 {
            self.errors.push(e);
        }
    }
}

/// Runs the scenario.
///
/// # Errors
///
/// A non-WRS target or an unreadable server PID.
pub async fn run(common: &Common, args: &ChurnArgs) -> anyhow::Result<Report> {
    let target = Target::from_args(&common.target).await?;
    let api = target.wrs_api("churn")?.clone();
    let mut report = common.report("churn", target.label());
    report.params.insert("workers".into(), json!(args.workers));
    report.params.insert(
        "mode".into(),
        json!(format!("{:?}", args.mode).to_lowercase()),
    );
    let mut primary = None;
    if args.mode != ChurnMode::Cycle {
        let phase = phase(common, &api, args.workers, Phase::Rest).await?;
        report
            .extra
            .insert("create_delete_per_s".into(), json!(phase.rate));
        if let Some(ns) = phase.server_ns_per_op {
            report
                .extra
                .insert("server_cpu_us_per_create_delete".into(), json!(ns / 1000.0));
        }
        phase.merge_into(&mut report, "create_delete");
        primary = Some(phase.measured);
        report.delivered = phase.done;
    }
    if args.mode != ChurnMode::Rest {
        let phase = phase(common, &api, args.workers, Phase::Cycle).await?;
        report
            .extra
            .insert("cycles_per_s".into(), json!(phase.rate));
        if let Some(ns) = phase.server_ns_per_op {
            report
                .extra
                .insert("server_cpu_us_per_cycle".into(), json!(ns / 1000.0));
        }
        phase.merge_into(&mut report, "cycle");
        if primary.is_none() {
            primary = Some(phase.measured);
            report.delivered = phase.done;
        }
    }
    if let Some(measured) = primary {
        measured.apply(&mut report);
    }
    report.extra.insert(
        "delivery_means".into(),
        json!(if args.mode == ChurnMode::Cycle {
            "one create-connect-send-delete cycle"
        } else {
            "one channel created and deleted over REST"
        }),
    );
    Ok(report)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rest,
    Cycle,
}

struct PhaseResult {
    measured: crate::harness::Measured,
    rate: f64,
    done: u64,
    server_ns_per_op: Option<f64>,
    workers: Vec<WorkerOut>,
}

impl PhaseResult {
    fn merge_into(&self, report: &mut Report, name: &str) {
        let mut latencies = Latencies::new();
        for w in &self.workers {
            latencies.merge(&w.latencies);
            report.lost += w.lost;
            report.connect_errors += w.connect_errors;
            report.errors += w.error_count;
            for e in &w.errors {
                report.sample_error(format!("{name}: {e}"));
            }
        }
        if let Some(l) = latencies.summary() {
            report.latency.insert(name.into(), l);
        }
        if name == "cycle" {
            report.connections += self.done;
        }
        report.sent += self.done;
    }
}

async fn phase(
    common: &Common,
    api: &WsUrl,
    workers: usize,
    phase: Phase,
) -> anyhow::Result<PhaseResult> {
    let counter = Arc::new(AtomicU64::new(0));
    let window = Window::start(common).await?;
    let progress = RunProgress::start(common, Arc::clone(&counter));
    let end = Instant::now() + common.duration();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let api = api.clone();
            let counter = Arc::clone(&counter);
            let timeout = common.connect_timeout();
            tokio::spawn(async move {
                match phase {
                    Phase::Rest => rest_worker(api, end, timeout, counter).await,
                    Phase::Cycle => cycle_worker(api, end, timeout, counter).await,
                }
            })
        })
        .collect();
    let mut outs = Vec::new();
    let mut failures = WorkerOut::default();
    let within = common.duration() + common.connect_timeout() * 3 + CYCLE_WAIT * 2;
    for outcome in collect(tasks, within).await {
        match outcome {
            Outcome::Done(out) => outs.push(out),
            Outcome::Failed(why) => failures.error(format!("worker failed: {why}")),
            Outcome::TimedOut => failures.error("worker did not finish in time".into()),
        }
    }
    drop(progress);
    let measured = window.close(Instant::now()).await;
    outs.push(failures);
    let done: u64 = outs.iter().map(|w| w.done).sum();
    Ok(PhaseResult {
        rate: done as f64 / measured.window_s.max(1e-9),
        server_ns_per_op: measured
            .server_cpu_s
            .filter(|_| done > 0)
            .map(|s| s * 1e9 / done as f64),
        measured,
        done,
        workers: outs,
    })
}

/// Creates and deletes channels on one keep-alive connection until `end`.
async fn rest_worker(
    api: WsUrl,
    end: Instant,
    timeout: Duration,
    counter: Arc<AtomicU64>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut client = HttpClient::new(api.addr, api.host.clone(), timeout).with_tls(api.tls);
    while Instant::now() < end {
        let started = now_ns();
        let channel = match create_channel(&mut client, &api, "echo").await {
            Ok(channel) => channel,
            Err(e) => {
                out.error(format!("{e:#}"));
                continue;
            }
        };
        match client
            .request("DELETE", &format!("/channels/{}", channel.name), None)
            .await
        {
            Ok(r) if r.status == 200 => {
                out.latencies.record(now_ns() - started);
                out.done += 1;
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => out.error(format!("DELETE answered {}", r.status)),
            Err(e) => out.error(format!("DELETE: {e}")),
        }
    }
    out
}

/// Create -> connect -> send -> receive -> delete -> close frame, until
/// `end`.
async fn cycle_worker(
    api: WsUrl,
    end: Instant,
    timeout: Duration,
    counter: Arc<AtomicU64>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut client = HttpClient::new(api.addr, api.host.clone(), timeout).with_tls(api.tls);
    let mut composer = Composer::plain(64);
    let mut seq = 0;
    while Instant::now() < end {
        let started = now_ns();
        let channel = match create_channel(&mut client, &api, "echo").await {
            Ok(channel) => channel,
            Err(e) => {
                out.error(format!("{e:#}"));
                continue;
            }
        };
        let delete = format!("/channels/{}", channel.name);
        let mut conn = match WsConn::connect(&channel.sub, None, timeout, 1024).await {
            Ok(conn) => conn,
            Err(e) => {
                out.connect_errors += 1;
                out.error(format!("connect: {e}"));
                let _ = client.request("DELETE", &delete, None).await;
                continue;
            }
        };
        seq += 1;
        let stamp = Stamp {
            kind: Kind::Measure,
            source: 0,
            seq,
            sent_ns: now_ns(),
        };
        conn.tx.text(composer.compose(&stamp));
        let echoed = match conn.flush().await {
            Ok(()) => next_frame(&mut conn).await,
            Err(e) => Err(format!("write: {e}")),
        };
        match echoed {
            Ok(Some(FrameSeen::Message(s))) if s == seq => {}
            Ok(other) => {
                out.lost += 1;
                out.error(format!("expected the echo, got {other:?}"));
            }
            Err(e) => {
                out.lost += 1;
                out.error(e);
            }
        }
        match client.request("DELETE", &delete, None).await {
            Ok(r) if r.status == 200 => {}
            Ok(r) => {
                out.error(format!("DELETE answered {}", r.status));
                continue;
            }
            Err(e) => {
                out.error(format!("DELETE: {e}"));
                continue;
            }
        }
        match next_frame(&mut conn).await {
            Ok(Some(FrameSeen::Close(Some(4001)))) => {
                // Complete the closing handshake; the server waits for it.
                conn.tx.close(4001);
                let _ = tokio::time::timeout(CYCLE_WAIT, conn.flush()).await;
                out.latencies.record(now_ns() - started);
                out.done += 1;
                counter.fetch_add(1, Ordering::Relaxed);
            }
            other => out.error(format!("expected close 4001 after DELETE, got {other:?}")),
        }
    }
    out
}

#[derive(Debug)]
enum FrameSeen {
    Message(u64),
    Close(Option<u16>),
}

/// The next message or close frame, within [`CYCLE_WAIT`]; `None` at end
/// of stream.
async fn next_frame(conn: &mut WsConn) -> Result<Option<FrameSeen>, String> {
    let deadline = Instant::now() + CYCLE_WAIT;
    loop {
        match conn.rx.next_frame(&mut conn.tx) {
            Ok(Some(Frame::Text(p) | Frame::Binary(p))) => {
                return Ok(Some(FrameSeen::Message(
                    Stamp::find(p).map_or(u64::MAX, |s| s.seq),
                )));
            }
            Ok(Some(Frame::Close(code))) => return Ok(Some(FrameSeen::Close(code))),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        match tokio::time::timeout_at(deadline.into(), conn.fill()).await {
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Err(_) => return Err(format!("nothing within {CYCLE_WAIT:?}")),
        }
    }
}
