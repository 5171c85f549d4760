//! `pushpull`: P producers → W workers on one `push-pull` (or `fan-in-out`)
//! channel; checks that every message is delivered exactly once and that
//! the round-robin is fair.
//!
//! Every client of the channel except the sender is eligible, so with
//! several producers a producer receives work too: it is counted as a
//! delivery (exactly once still holds) but left out of the fairness
//! figure, which compares the workers. On `fan-in-out` workers answer each
//! request with a reply to its `origin`, and producers count the replies
//! and their round-trip latency. Producers answer nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::{Args, ValueEnum};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::collect;
use crate::harness::{self, Common, Dial, RunProgress, Window};
use crate::payload::{self, Composer, Kind, MIN_JSON_SIZE, Stamp, now_ns};
use crate::report::Report;
use crate::target::Target;
use crate::track::{Arrival, SeqTracker, SharedLatencies, spread_pct};
use crate::ws::{Frame, ReadHalf, RxBuf, TxBuf, WriteHalf, WsConn};

/// Longest a single batch may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Warm-up bursts are sent this often until every worker has one.
const WARMUP_EVERY: Duration = Duration::from_millis(50);
/// Most messages written in one batch.
const MAX_BATCH: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkPattern {
    #[value(name = "push-pull")]
    PushPull,
    #[value(name = "fan-in-out")]
    FanInOut,
}

#[derive(Args, Clone, Debug)]
pub struct PushPullArgs {
    /// Producers.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub producers: usize,
    /// Workers.
    #[arg(short = 'w', long, default_value_t = 10)]
    pub workers: usize,
    /// Message size in bytes (at least 40; at least 65 on fan-in-out,
    /// where messages are JSON requests). Default 64, 96 on fan-in-out.
    #[arg(short = 'b', long)]
    pub size: Option<usize>,
    /// Messages per second per producer; without it, the maximum rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// At the maximum rate: most messages of one producer not yet
    /// delivered.
    #[arg(long, default_value_t = 1024)]
    pub backlog: u64,
    /// Channel pattern.
    #[arg(long, value_enum, default_value_t = WorkPattern::PushPull)]
    pub pattern: WorkPattern,
}

struct Producer {
    sent: AtomicU64,
    /// Deliveries of this producer's messages, by every receiver.
    seen: Mutex<SeqTracker>,
    delivered: AtomicU64,
    waiting: AtomicBool,
    wake: Notify,
}

struct Shared {
    producers: Vec<Producer>,
    /// Workers that received a warm-up message.
    ready: AtomicU64,
    delivered: Arc<AtomicU64>,
    last_ns: AtomicU64,
    latencies: SharedLatencies,
    round_trips: SharedLatencies,
}

/// Runs the scenario.
///
/// # Errors
///
/// Bad arguments, a non-WRS target, or a channel that cannot be created.
pub async fn run(common: &Common, args: &PushPullArgs) -> anyhow::Result<Report> {
    ensure!(args.producers >= 1, "--producers must be at least 1");
    ensure!(args.backlog >= 1, "--backlog must be at least 1");
    ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    let fan = args.pattern == WorkPattern::FanInOut;
    let size = args.size.unwrap_or(if fan { 96 } else { 64 });
    ensure!(
        !fan || size >= MIN_JSON_SIZE,
        "--size must be at least {MIN_JSON_SIZE} on fan-in-out"
    );
    let target = Target::from_args(&common.target).await?;
    target.wrs_api("pushpull")?;
    let pattern = if fan { "fan-in-out" } else { "push-pull" };
    let mut report = common.report("pushpull", target.label());
    report.params.insert("pattern".into(), json!(pattern));
    report
        .params
        .insert("producers".into(), json!(args.producers));
    report.params.insert("workers".into(), json!(args.workers));
    report.params.insert("size".into(), json!(size));
    match args.rate {
        Some(rate) => report.params.insert("rate".into(), json!(rate)),
        None => report.params.insert("backlog".into(), json!(args.backlog)),
    };
    let channels = target
        .open_channels(1, pattern, common.connect_timeout())
        .await?;
    let dial = || Dial {
        url: channels[0].sub.clone(),
        source: None,
    };
    let workers = harness::open_all(
        common,
        (0..args.workers).map(|_| dial()).collect(),
        64 * 1024,
        "workers",
    )
    .await;
    let producers = harness::open_all(
        common,
        (0..args.producers).map(|_| dial()).collect(),
        64 * 1024,
        "producers",
    )
    .await;
    harness::note_connects(&mut report, &workers);
    harness::note_connects(&mut report, &producers);

    let shared = Arc::new(Shared {
        producers: (0..args.producers)
            .map(|_| Producer {
                sent: AtomicU64::new(0),
                seen: Mutex::new(SeqTracker::default()),
                delivered: AtomicU64::new(0),
                waiting: AtomicBool::new(false),
                wake: Notify::new(),
            })
            .collect(),
        ready: AtomicU64::new(0),
        delivered: Arc::new(AtomicU64::new(0)),
        last_ns: AtomicU64::new(0),
        latencies: SharedLatencies::default(),
        round_trips: SharedLatencies::default(),
    });
    let stop = CancellationToken::new();
    let go = CancellationToken::new();
    let mut worker_tasks = Vec::new();
    for conn in workers.conns.into_iter().flatten() {
        let WsConn {
            read,
            write,
            rx,
            tx,
        } = conn;
        worker_tasks.push(tokio::spawn(receive(
            read,
            rx,
            Some((write, tx)),
            None,
            fan,
            Arc::clone(&shared),
            stop.clone(),
        )));
    }
    let connected_workers = worker_tasks.len() as u64;
    let mut producer_tasks = Vec::new();
    let mut producer_readers = Vec::new();
    for (j, conn) in producers.conns.into_iter().enumerate() {
        let Some(WsConn {
            read,
            write,
            rx,
            tx,
        }) = conn
        else {
            continue;
        };
        producer_readers.push(tokio::spawn(receive(
            read,
            rx,
            None,
            Some(j as u32),
            fan,
            Arc::clone(&shared),
            stop.clone(),
        )));
        producer_tasks.push(tokio::spawn(produce(
            write,
            tx,
            j,
            Arc::clone(&shared),
            args.clone(),
            size,
            common.duration(),
            connected_workers + args.producers as u64,
            go.clone(),
        )));
    }
    let warm = harness::wait_until(Instant::now() + common.warmup_timeout(), || {
        shared.ready.load(Ordering::SeqCst) >= connected_workers
    })
    .await;
    if !warm {
        report.errors += 1;
        report.sample_error(format!(
            "only {} of {connected_workers} workers received a warm-up message",
            shared.ready.load(Ordering::SeqCst)
        ));
    }
    let window = Window::start(common).await?;
    let epoch = now_ns();
    let progress = RunProgress::start(common, Arc::clone(&shared.delivered));
    go.cancel();
    // Write halves stay open until the end of the run.
    let mut write_halves = Vec::new();
    for outcome in collect(producer_tasks, common.duration() + WRITE_TIMEOUT * 2).await {
        if let Some(sent) = outcome.into_done(&mut report) {
            report.errors += sent.errors.len() as u64;
            for e in sent.errors {
                report.sample_error(e);
            }
            write_halves.push(sent.write);
        }
    }
    let sent: u64 = shared
        .producers
        .iter()
        .map(|p| p.sent.load(Ordering::SeqCst))
        .sum();
    let drained = harness::wait_until(Instant::now() + common.drain(), || {
        shared.delivered.load(Ordering::SeqCst) >= sent
    })
    .await;
    // On fan-in-out, give the last replies the same drain.
    drop(progress);
    let last = shared.last_ns.load(Ordering::SeqCst).max(epoch);
    let measured = window
        .close(window.started() + Duration::from_nanos(last - epoch))
        .await;
    if fan {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    drop(write_halves);

    let mut per_worker = Vec::new();
    let mut to_producers = 0;
    let mut replies = 0;
    let mut reordered = 0;
    for (is_worker, outcome) in collect(worker_tasks, Duration::from_secs(5))
        .await
        .into_iter()
        .map(|o| (true, o))
        .chain(
            collect(producer_readers, Duration::from_secs(5))
                .await
                .into_iter()
                .map(|o| (false, o)),
        )
    {
        let Some(out) = outcome.into_done(&mut report) else {
            continue;
        };
        reordered += out.reordered;
        replies += out.replies;
        if is_worker {
            per_worker.push(out.received);
        } else {
            to_producers += out.received;
        }
        report.errors += out.errors.len() as u64;
        for e in out.errors {
            report.sample_error(e);
        }
    }
    for producer in &shared.producers {
        let seen = producer.seen.lock();
        report.delivered += seen.unique;
        report.duplicated += seen.duplicated;
        report.lost += producer
            .sent
            .load(Ordering::SeqCst)
            .saturating_sub(seen.unique);
    }
    if !drained {
        report.sample_error(format!("{} messages missing after the drain", report.lost));
    }
    report.sent = sent;
    report.reordered = reordered;
    measured.apply(&mut report);
    if let Some(l) = shared.latencies.summary() {
        report.latency.insert("delivery".into(), l);
    }
    if let Some(l) = shared.round_trips.summary() {
        report.latency.insert("round_trip".into(), l);
    }
    if let Some(spread) = spread_pct(&per_worker) {
        report
            .extra
            .insert("fairness_spread_pct".into(), json!(spread));
    }
    report.extra.insert(
        "worker_min".into(),
        json!(per_worker.iter().min().copied().unwrap_or(0)),
    );
    report.extra.insert(
        "worker_max".into(),
        json!(per_worker.iter().max().copied().unwrap_or(0)),
    );
    if args.producers > 1 {
        report
            .extra
            .insert("delivered_to_producers".into(), json!(to_producers));
    }
    if fan {
        report
            .extra
            .insert("replies_received".into(), json!(replies));
        let answered = report.delivered - to_producers;
        report.extra.insert(
            "replies_missing".into(),
            json!(answered.saturating_sub(replies)),
        );
    }
    report.errors += target
        .close_channels(&channels, common.connect_timeout())
        .await;
    Ok(report)
}

struct ReceiverOut {
    /// Measured messages this client received (requests, not replies).
    received: u64,
    /// Arrivals from a producer with a lower sequence than an earlier one.
    reordered: u64,
    replies: u64,
    errors: Vec<String>,
}

/// A worker (with `reply`, the write side for fan-in-out replies) or a
/// producer's read side (`me` set: it also receives the replies to its own
/// requests).
async fn receive(
    mut read: ReadHalf,
    mut rx: RxBuf,
    mut reply: Option<(WriteHalf, TxBuf)>,
    me: Option<u32>,
    fan: bool,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> ReceiverOut {
    let mut latencies = shared.latencies.recorder();
    let mut round_trips = shared.round_trips.recorder();
    let mut out = ReceiverOut {
        received: 0,
        reordered: 0,
        replies: 0,
        errors: Vec::new(),
    };
    let producers = shared.producers.len();
    let mut last_seq: Vec<Option<u64>> = vec![None; producers];
    let mut replies_seen = SeqTracker::default();
    let mut warmed = false;
    let mut body = Vec::new();
    // A producer's read side has no write half: pings are not answered.
    let mut pongs = TxBuf::new(crate::rng::FastRng::seeded());
    let mut touched = vec![0u64; producers];
    'read: loop {
        let read_result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = rx.fill(&mut read) => r,
        };
        match read_result {
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
        let tx = match &mut reply {
            Some((_, tx)) => tx,
            None => &mut pongs,
        };
        loop {
            let payload = match rx.next_frame(tx) {
                Ok(Some(Frame::Text(p) | Frame::Binary(p))) => p,
                Ok(Some(Frame::Close(code))) => {
                    out.errors
                        .push(format!("closed by the server with {code:?}"));
                    break 'read;
                }
                Ok(None) => break,
                Err(e) => {
                    out.errors.push(e.to_string());
                    break 'read;
                }
            };
            let Some(stamp) = Stamp::find(payload) else {
                if payload.starts_with(br#"{"type":"error""#) {
                    out.errors
                        .push(String::from_utf8_lossy(payload).into_owned());
                }
                continue;
            };
            if fan && payload::is_reply(payload) {
                if Some(stamp.source) == me
                    && stamp.kind == Kind::Measure
                    && replies_seen.insert(stamp.seq) == Arrival::New
                {
                    out.replies += 1;
                    round_trips.record(now.saturating_sub(stamp.sent_ns));
                }
                continue;
            }
            let source = stamp.source as usize;
            if source >= producers {
                continue;
            }
            if fan && me.is_none() && payload::reply_to(payload, &mut body).is_some() {
                tx.text(&body);
            }
            match stamp.kind {
                Kind::Warmup => {
                    if me.is_none() && !warmed {
                        warmed = true;
                        shared.ready.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Kind::Measure => {
                    if shared.producers[source].seen.lock().insert(stamp.seq) == Arrival::New {
                        latencies.record(now.saturating_sub(stamp.sent_ns));
                        out.received += 1;
                        touched[source] += 1;
                    }
                    if last_seq[source].is_some_and(|last| stamp.seq < last) {
                        out.reordered += 1;
                    }
                    last_seq[source] = Some(stamp.seq);
                }
            }
        }
        latencies.flush();
        round_trips.flush();
        let mut any = 0;
        for (source, count) in touched.iter_mut().enumerate() {
            if *count > 0 {
                let producer = &shared.producers[source];
                producer.delivered.fetch_add(*count, Ordering::SeqCst);
                any += std::mem::take(count);
                if producer.waiting.load(Ordering::SeqCst)
                    && producer.waiting.swap(false, Ordering::SeqCst)
                {
                    producer.wake.notify_one();
                }
            }
        }
        if any > 0 {
            shared.delivered.fetch_add(any, Ordering::Relaxed);
            shared.last_ns.fetch_max(now, Ordering::Relaxed);
        }
        match &mut reply {
            Some((write, tx)) => {
                if let Err(e) = tx.flush(write).await {
                    out.errors.push(format!("write failed: {e}"));
                    break;
                }
            }
            // The producer's own task writes; it never goes quiet long
            // enough to need a pong.
            None => pongs.clear(),
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    mut write: WriteHalf,
    mut tx: TxBuf,
    me: usize,
    shared: Arc<Shared>,
    args: PushPullArgs,
    size: usize,
    duration: Duration,
    burst: u64,
    go: CancellationToken,
) -> Sent {
    let mut composer = if args.pattern == WorkPattern::FanInOut {
        Composer::request(size)
    } else {
        Composer::plain(size)
    };
    let source = me as u32;
    let producer = &shared.producers[me];
    let mut warm_seq = 0;
    while !go.is_cancelled() {
        for _ in 0..burst {
            let stamp = Stamp {
                kind: Kind::Warmup,
                source,
                seq: warm_seq,
                sent_ns: now_ns(),
            };
            warm_seq += 1;
            tx.text(composer.compose(&stamp));
        }
        if let Err(e) = flush(&mut tx, &mut write).await {
            return Sent {
                errors: vec![e],
                write,
            };
        }
        tokio::select! {
            () = go.cancelled() => {}
            () = tokio::time::sleep(WARMUP_EVERY) => {}
        }
    }
    let started = Instant::now();
    let end = started + duration;
    let mut seq = 0u64;
    while Instant::now() < end {
        let batch = match args.rate {
            Some(rate) => {
                let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1)
                    .min((duration.as_secs_f64() * rate).ceil() as u64);
                if due <= seq {
                    let next = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(next.min(end).into()).await;
                    continue;
                }
                (due - seq).min(MAX_BATCH)
            }
            None => {
                let allowed = |p: &Producer| p.delivered.load(Ordering::SeqCst) + args.backlog;
                if seq >= allowed(producer) {
                    producer.waiting.store(true, Ordering::SeqCst);
                    if seq >= allowed(producer) {
                        tokio::select! {
                            () = producer.wake.notified() => {}
                            () = tokio::time::sleep(Duration::from_millis(1)) => {}
                        }
                        continue;
                    }
                    producer.waiting.store(false, Ordering::SeqCst);
                }
                (allowed(producer) - seq).min(MAX_BATCH)
            }
        };
        let sent_ns = now_ns();
        for i in 0..batch {
            let stamp = Stamp {
                kind: Kind::Measure,
                source,
                seq: seq + i,
                sent_ns,
            };
            tx.text(composer.compose(&stamp));
        }
        if let Err(e) = flush(&mut tx, &mut write).await {
            return Sent {
                errors: vec![e],
                write,
            };
        }
        seq += batch;
        producer.sent.store(seq, Ordering::SeqCst);
    }
    Sent {
        errors: Vec::new(),
        write,
    }
}

/// A sender's errors, and its write half: dropping it would send FIN and
/// make the relay close the connection before the measurement ends.
struct Sent {
    errors: Vec<String>,
    write: WriteHalf,
}

async fn flush(tx: &mut TxBuf, write: &mut WriteHalf) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, tx.flush(write)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("producer: write failed: {e}")),
        Err(_) => Err("producer: write blocked for 10 s".into()),
    }
}
