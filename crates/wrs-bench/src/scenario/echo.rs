//! `echo` and `reqrep`: round trips with K messages in flight per client.
//!
//! `echo`: C clients on `echo` channels; each message comes back to its
//! sender. `reqrep`: C requester/responder pairs, each pair on its own
//! `req-repl` or `fan-in-out` channel; the responder answers every request
//! with a reply naming the request's `origin`, carrying the request's
//! header back. A round trip ends when the sender gets its own message (or
//! the reply to it) back; each client sends a new one per round trip, so
//! exactly K are outstanding until the measured window ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::{Args, ValueEnum};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::collect;
use crate::harness::{self, Common, Dial, RunProgress, Window};
use crate::payload::{self, Composer, Kind, MIN_JSON_SIZE, Stamp, now_ns};
use crate::report::Report;
use crate::target::{Channel, Target};
use crate::track::{Arrival, SeqTracker, SharedLatencies};
use crate::ws::{Frame, WsConn};

/// A warm-up request is repeated this often until answered.
const WARMUP_RETRY: Duration = Duration::from_millis(100);

#[derive(Args, Clone, Debug)]
pub struct EchoArgs {
    /// Clients.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub clients: usize,
    /// Messages in flight per client.
    #[arg(long, default_value_t = 1)]
    pub inflight: u64,
    /// Message size in bytes (at least 40).
    #[arg(short = 'b', long, default_value_t = 64)]
    pub size: usize,
    /// Echo channels; client i uses channel i mod K.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub channels: usize,
}

/// The request/reply patterns.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReqPattern {
    #[value(name = "req-repl")]
    ReqRepl,
    #[value(name = "fan-in-out")]
    FanInOut,
}

impl ReqPattern {
    pub fn name(self) -> &'static str {
        match self {
            ReqPattern::ReqRepl => "req-repl",
            ReqPattern::FanInOut => "fan-in-out",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct ReqRepArgs {
    /// Requester/responder pairs, one channel each.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub clients: usize,
    /// Requests in flight per requester.
    #[arg(long, default_value_t = 1)]
    pub inflight: u64,
    /// Request size in bytes (at least 65; requests are JSON objects).
    #[arg(short = 'b', long, default_value_t = 96)]
    pub size: usize,
    /// Channel pattern.
    #[arg(long, value_enum, default_value_t = ReqPattern::FanInOut)]
    pub pattern: ReqPattern,
}

/// Runs `echo`.
///
/// # Errors
///
/// Bad arguments, a non-WRS target, or channels that cannot be created.
pub async fn run_echo(common: &Common, args: &EchoArgs) -> anyhow::Result<Report> {
    ensure!(args.channels >= 1, "--channels must be at least 1");
    let target = Target::from_args(&common.target).await?;
    target.wrs_api("echo")?;
    let mut report = common.report("echo", target.label());
    report.params.insert("clients".into(), json!(args.clients));
    report
        .params
        .insert("inflight".into(), json!(args.inflight));
    report.params.insert("size".into(), json!(args.size));
    report
        .params
        .insert("channels".into(), json!(args.channels));
    let channels = target
        .open_channels(args.channels, "echo", common.connect_timeout())
        .await?;
    let dials = (0..args.clients)
        .map(|i| Dial {
            url: channels[i % channels.len()].sub.clone(),
            source: None,
        })
        .collect();
    let opened = harness::open_all(common, dials, 64 * 1024, "clients").await;
    harness::note_connects(&mut report, &opened);
    let plan = Plan {
        inflight: args.inflight,
        composer: Composer::plain(args.size),
        replies_only: false,
    };
    measure(
        common,
        &mut report,
        opened.conns,
        plan,
        &CancellationToken::new(),
    )
    .await?;
    report.errors += target
        .close_channels(&channels, common.connect_timeout())
        .await;
    Ok(report)
}

/// Runs `reqrep`.
///
/// # Errors
///
/// Bad arguments, a non-WRS target, or channels that cannot be created.
pub async fn run_reqrep(common: &Common, args: &ReqRepArgs) -> anyhow::Result<Report> {
    ensure!(
        args.size >= MIN_JSON_SIZE,
        "--size must be at least {MIN_JSON_SIZE} for JSON requests"
    );
    let target = Target::from_args(&common.target).await?;
    target.wrs_api("reqrep")?;
    let mut report = common.report("reqrep", target.label());
    report.params.insert("pairs".into(), json!(args.clients));
    report
        .params
        .insert("inflight".into(), json!(args.inflight));
    report.params.insert("size".into(), json!(args.size));
    report
        .params
        .insert("pattern".into(), json!(args.pattern.name()));
    let channels: Vec<Channel> = target
        .open_channels(args.clients, args.pattern.name(), common.connect_timeout())
        .await?;
    let dial = |c: &Channel| Dial {
        url: c.sub.clone(),
        source: None,
    };
    // Responders first, so every request finds one.
    let responders = harness::open_all(
        common,
        channels.iter().map(dial).collect(),
        64 * 1024,
        "responders",
    )
    .await;
    let requesters = harness::open_all(
        common,
        channels.iter().map(dial).collect(),
        64 * 1024,
        "requesters",
    )
    .await;
    harness::note_connects(&mut report, &responders);
    harness::note_connects(&mut report, &requesters);
    let stop = CancellationToken::new();
    let responder_tasks: Vec<_> = responders
        .conns
        .into_iter()
        .flatten()
        .map(|conn| tokio::spawn(respond(conn, stop.clone())))
        .collect();
    let plan = Plan {
        inflight: args.inflight,
        composer: Composer::request(args.size),
        replies_only: true,
    };
    let result = measure(common, &mut report, requesters.conns, plan, &stop).await;
    stop.cancel();
    let mut replies = 0;
    for outcome in collect(responder_tasks, Duration::from_secs(5)).await {
        if let Some((answered, errors)) = outcome.into_done(&mut report) {
            replies += answered;
            report.errors += errors.len() as u64;
            for e in errors {
                report.sample_error(e);
            }
        }
    }
    report.extra.insert("replies_sent".into(), json!(replies));
    report.errors += target
        .close_channels(&channels, common.connect_timeout())
        .await;
    result?;
    Ok(report)
}

/// How the senders behave.
#[derive(Clone)]
struct Plan {
    inflight: u64,
    composer: Composer,
    /// Count only replies (request/reply patterns), not requests that came
    /// back (a lone fan-in-out requester gets its own request).
    replies_only: bool,
}

struct Shared {
    ready: AtomicU64,
    round_trips: Arc<AtomicU64>,
    last_ns: AtomicU64,
    latencies: SharedLatencies,
}

/// Warms every sender up, runs the window, drains, and fills the report.
async fn measure(
    common: &Common,
    report: &mut Report,
    conns: Vec<Option<WsConn>>,
    plan: Plan,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        ready: AtomicU64::new(0),
        round_trips: Arc::new(AtomicU64::new(0)),
        last_ns: AtomicU64::new(0),
        latencies: SharedLatencies::default(),
    });
    let go = CancellationToken::new();
    let warmup_deadline = Instant::now() + common.warmup_timeout();
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let Some(conn) = conn else { continue };
        tasks.push(tokio::spawn(send_and_receive(
            conn,
            i as u32,
            plan.clone(),
            Arc::clone(&shared),
            go.clone(),
            stop.clone(),
            warmup_deadline,
            common.duration(),
            common.drain(),
        )));
    }
    let senders = tasks.len() as u64;
    if !harness::wait_until(warmup_deadline, || {
        shared.ready.load(Ordering::SeqCst) >= senders
    })
    .await
    {
        report.errors += 1;
        report.sample_error(format!(
            "only {} of {senders} clients completed a warm-up round trip",
            shared.ready.load(Ordering::SeqCst)
        ));
    }
    let window = Window::start(common).await?;
    let epoch = now_ns();
    let progress = RunProgress::start(common, Arc::clone(&shared.round_trips));
    go.cancel();
    let outcomes = collect(
        tasks,
        common.duration() + common.drain() + Duration::from_secs(5),
    )
    .await;
    drop(progress);
    let last = shared.last_ns.load(Ordering::SeqCst).max(epoch);
    let measured = window
        .close(window.started() + Duration::from_nanos(last - epoch))
        .await;
    for outcome in outcomes {
        let Some(out) = outcome.into_done(report) else {
            continue;
        };
        report.sent += out.sent;
        report.delivered += out.tracker.unique;
        report.lost += out.sent.saturating_sub(out.tracker.unique);
        report.duplicated += out.tracker.duplicated;
        report.reordered += out.tracker.reordered;
        report.errors += out.errors.len() as u64;
        for e in out.errors {
            report.sample_error(e);
        }
    }
    measured.apply(report);
    if let Some(l) = shared.latencies.summary() {
        report.latency.insert("round_trip".into(), l);
    }
    report
        .extra
        .insert("delivery_means".into(), json!("one completed round trip"));
    Ok(())
}

struct SenderOut {
    tracker: SeqTracker,
    sent: u64,
    errors: Vec<String>,
}

/// One client: a warm-up round trip, then K in flight for the window,
/// then waits (bounded) for the last answers.
#[allow(clippy::too_many_arguments)]
async fn send_and_receive(
    mut conn: WsConn,
    me: u32,
    mut plan: Plan,
    shared: Arc<Shared>,
    go: CancellationToken,
    stop: CancellationToken,
    warmup_deadline: Instant,
    duration: Duration,
    drain: Duration,
) -> SenderOut {
    let mut latencies = shared.latencies.recorder();
    let mut out = SenderOut {
        tracker: SeqTracker::default(),
        sent: 0,
        errors: Vec::new(),
    };
    // Warm-up: one answered round trip proves the path works.
    let mut warm = false;
    let mut retry_at = Instant::now();
    while !warm {
        let now = Instant::now();
        if now >= warmup_deadline {
            out.errors.push("no answer to the warm-up message".into());
            return out;
        }
        if now >= retry_at {
            let stamp = Stamp {
                kind: Kind::Warmup,
                source: me,
                seq: 0,
                sent_ns: now_ns(),
            };
            conn.tx.text(plan.composer.compose(&stamp));
            if let Err(e) = conn.flush().await {
                out.errors.push(format!("write failed: {e}"));
                return out;
            }
            retry_at = now + WARMUP_RETRY;
        }
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return out,
            () = tokio::time::sleep_until(retry_at.min(warmup_deadline).into()) => continue,
            read = conn.fill() => read,
        };
        if let Err(e) = read.and_then(|n| {
            if n == 0 {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            } else {
                Ok(())
            }
        }) {
            out.errors.push(format!("read failed: {e}"));
            return out;
        }
        loop {
            match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Text(p) | Frame::Binary(p))) => {
                    if answer_to(p, me, plan.replies_only).is_some_and(|s| s.kind == Kind::Warmup) {
                        warm = true;
                    }
                }
                Ok(Some(Frame::Close(code))) => {
                    out.errors
                        .push(format!("closed by the server with {code:?}"));
                    return out;
                }
                Ok(None) => break,
                Err(e) => {
                    out.errors.push(e.to_string());
                    return out;
                }
            }
        }
    }
    shared.ready.fetch_add(1, Ordering::SeqCst);
    tokio::select! {
        () = go.cancelled() => {}
        () = stop.cancelled() => return out,
    }
    let end = Instant::now() + duration;
    let hard_end = end + drain;
    let mut seq = 0u64;
    let mut outstanding = 0u64;
    let mut to_send = plan.inflight;
    loop {
        if Instant::now() < end {
            let sent_ns = now_ns();
            for _ in 0..to_send {
                let stamp = Stamp {
                    kind: Kind::Measure,
                    source: me,
                    seq,
                    sent_ns,
                };
                seq += 1;
                conn.tx.text(plan.composer.compose(&stamp));
            }
            outstanding += to_send;
        }
        to_send = 0;
        if !conn.tx.is_empty()
            && let Err(e) = conn.flush().await
        {
            out.errors.push(format!("write failed: {e}"));
            break;
        }
        if outstanding == 0 && Instant::now() >= end {
            break;
        }
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(hard_end.into()) => break,
            read = conn.fill() => read,
        };
        match read {
            Ok(0) => {
                out.errors.push("connection closed by the server".into());
                break;
            }
            Err(e) => {
                out.errors.push(format!("read failed: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let now = now_ns();
        let mut done = 0;
        loop {
            match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Text(p) | Frame::Binary(p))) => {
                    let Some(stamp) = answer_to(p, me, plan.replies_only) else {
                        if p.starts_with(br#"{"type":"error""#) {
                            out.errors.push(String::from_utf8_lossy(p).into_owned());
                        }
                        continue;
                    };
                    if stamp.kind == Kind::Measure && out.tracker.insert(stamp.seq) == Arrival::New
                    {
                        latencies.record(now.saturating_sub(stamp.sent_ns));
                        done += 1;
                    }
                }
                Ok(Some(Frame::Close(code))) => {
                    out.errors
                        .push(format!("closed by the server with {code:?}"));
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    out.errors.push(e.to_string());
                    break;
                }
            }
        }
        latencies.flush();
        if done > 0 {
            outstanding = outstanding.saturating_sub(done);
            to_send = done;
            shared.round_trips.fetch_add(done, Ordering::Relaxed);
            shared.last_ns.fetch_max(now, Ordering::Relaxed);
        }
    }
    out.sent = seq;
    out
}

/// The stamp of a message that answers one of `me`'s own.
fn answer_to(payload: &[u8], me: u32, replies_only: bool) -> Option<Stamp> {
    if replies_only && !payload::is_reply(payload) {
        return None;
    }
    Stamp::find(payload).filter(|s| s.source == me)
}

/// A responder: answers every request until stopped. Returns the replies
/// sent and any errors.
async fn respond(mut conn: WsConn, stop: CancellationToken) -> (u64, Vec<String>) {
    let mut reply = Vec::new();
    let mut answered = 0;
    loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return (answered, Vec::new()),
            read = conn.fill() => read,
        };
        match read {
            Ok(0) => return (answered, vec!["responder: connection closed".into()]),
            Err(e) => return (answered, vec![format!("responder: read failed: {e}")]),
            Ok(_) => {}
        }
        loop {
            match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Text(p))) => {
                    if !payload::is_reply(p) && payload::reply_to(p, &mut reply).is_some() {
                        conn.tx.text(&reply);
                        answered += 1;
                    }
                }
                Ok(Some(Frame::Binary(_))) => {}
                Ok(Some(Frame::Close(code))) => {
                    return (answered, vec![format!("responder: closed with {code:?}")]);
                }
                Ok(None) => break,
                Err(e) => return (answered, vec![format!("responder: {e}")]),
            }
        }
        if let Err(e) = conn.flush().await {
            return (answered, vec![format!("responder: write failed: {e}")]);
        }
    }
}
