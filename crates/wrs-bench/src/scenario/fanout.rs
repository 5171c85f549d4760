//! `fanout`: P publishers → S subscribers on a `pub-sub` channel (or K
//! channels, publishers and subscribers spread round-robin), messages of B
//! bytes, at a fixed rate or at the maximum rate the relay sustains.
//!
//! At the maximum rate each publisher stays at most `--backlog` messages
//! ahead of the slowest subscriber of its channel, so the relay's queues
//! stay bounded and what is measured is its delivery rate, not how fast
//! it can buffer. Every subscriber must first receive a warm-up message
//! from each publisher of its channel: only then is it certainly
//! subscribed, and the measured window starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::collect;
use crate::harness::{self, Common, Dial, RunProgress, Window};
use crate::payload::{Composer, Kind, Stamp, now_ns};
use crate::report::Report;
use crate::target::Target;
use crate::track::{Arrival, SeqTracker, SharedLatencies};
use crate::ws::{Frame, ReadHalf, RxBuf, TxBuf, WriteHalf, WsConn, WsUrl};

/// Longest a single batch may take to write before the publisher gives up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Warm-up messages are sent this often until every subscriber has one.
const WARMUP_EVERY: Duration = Duration::from_millis(20);
/// Most messages written in one batch.
const MAX_BATCH: u64 = 256;

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    /// Publishers.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribers.
    #[arg(short = 's', long, default_value_t = 100)]
    pub subscribers: usize,
    /// Channels; publisher j and subscriber i use channel j mod K and i mod K.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub channels: usize,
    /// Message size in bytes (at least 40; with `--payload snapshot` the
    /// largest document).
    #[arg(short = 'b', long, default_value_t = 64)]
    pub size: usize,
    /// What messages carry: the stamp padded with dots, or a JSON
    /// dashboard snapshot whose numbers change with every message.
    #[arg(long, value_enum, default_value_t = PayloadKind::Plain)]
    pub payload: PayloadKind,
    /// Messages per second per publisher; without it, the maximum rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// At the maximum rate: most messages a publisher may be ahead of the
    /// slowest subscriber of its channel.
    #[arg(long, default_value_t = 256)]
    pub backlog: u64,
    /// Another node of a WRS cluster (base URL, repeatable): subscriber i
    /// connects to node i mod N of `--server` and these, publishers to
    /// `--server`, where the channels are created.
    #[arg(long = "spread", value_name = "URL")]
    pub spread: Vec<String>,
}

/// Message contents.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// The 40-byte stamp padded with dots: compresses to almost nothing.
    Plain,
    /// A JSON snapshot of a monitoring dashboard, new numbers each time.
    Snapshot,
}

/// What a publisher shares with the subscribers of its channel.
struct Publisher {
    /// Messages fully written in the measured window.
    sent: AtomicU64,
    /// Per subscriber of the channel: highest sequence received plus one
    /// (`u64::MAX` for a subscriber that never connected).
    acked: Box<[AtomicU64]>,
    /// Set while the publisher waits for acknowledgements.
    waiting: AtomicBool,
    wake: Notify,
}

impl Publisher {
    fn min_acked(&self) -> u64 {
        self.acked
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .min()
            .unwrap_or(u64::MAX)
    }
}

struct Shared {
    publishers: Vec<Arc<Publisher>>,
    /// Subscribers that have a warm-up message from all their publishers.
    ready: AtomicU64,
    /// Unique measured deliveries so far.
    delivered: Arc<AtomicU64>,
    /// Time of the latest measured delivery ([`now_ns`]).
    last_delivery_ns: AtomicU64,
    latencies: SharedLatencies,
}

/// The layout: which channel each client uses, and each subscriber's slot
/// in its channel.
struct Layout {
    sub_channel: Vec<usize>,
    sub_slot: Vec<usize>,
    pub_channel: Vec<usize>,
    subs_per_channel: Vec<usize>,
}

impl Layout {
    fn new(args: &FanoutArgs) -> Self {
        let k = args.channels;
        let mut subs_per_channel = vec![0; k];
        let mut sub_slot = Vec::with_capacity(args.subscribers);
        let sub_channel: Vec<usize> = (0..args.subscribers).map(|i| i % k).collect();
        for &c in &sub_channel {
            sub_slot.push(subs_per_channel[c]);
            subs_per_channel[c] += 1;
        }
        Self {
            sub_channel,
            sub_slot,
            pub_channel: (0..args.publishers).map(|j| j % k).collect(),
            subs_per_channel,
        }
    }
}

/// Runs the scenario.
///
/// # Errors
///
/// Bad arguments, or channels that cannot be created.
pub async fn run(common: &Common, args: &FanoutArgs) -> anyhow::Result<Report> {
    ensure!(args.publishers >= 1, "--publishers must be at least 1");
    ensure!(args.channels >= 1, "--channels must be at least 1");
    ensure!(args.backlog >= 1, "--backlog must be at least 1");
    ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    let target = Target::from_args(&common.target).await?;
    let mut report = common.report("fanout", target.label());
    report
        .params
        .insert("publishers".into(), json!(args.publishers));
    report
        .params
        .insert("subscribers".into(), json!(args.subscribers));
    report
        .params
        .insert("channels".into(), json!(args.channels));
    report.params.insert("size".into(), json!(args.size));
    if args.payload == PayloadKind::Snapshot {
        report.params.insert("payload".into(), json!("snapshot"));
    }
    match args.rate {
        Some(rate) => report.params.insert("rate".into(), json!(rate)),
        None => report.params.insert("backlog".into(), json!(args.backlog)),
    };

    if !args.spread.is_empty() {
        target.wrs_api("fanout --spread")?;
        report
            .params
            .insert("nodes".into(), json!(args.spread.len() + 1));
    }
    let mut nodes = vec![None];
    for url in &args.spread {
        let node = WsUrl::parse(url)
            .await
            .with_context(|| format!("--spread {url}"))?;
        nodes.push(Some(node));
    }

    let channels = target
        .open_channels(args.channels, "pub-sub", common.connect_timeout())
        .await?;
    let layout = Layout::new(args);
    let sub_dials = layout
        .sub_channel
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let sub = &channels[c].sub;
            let url = match &nodes[i % nodes.len()] {
                None => sub.clone(),
                Some(node) => node.with_path(sub.path.clone()),
            };
            Dial { url, source: None }
        })
        .collect();
    let subs = harness::open_all(common, sub_dials, 64 * 1024, "subscribers").await;
    let pub_dials = layout
        .pub_channel
        .iter()
        .map(|&c| Dial {
            url: channels[c].publ.clone(),
            source: None,
        })
        .collect();
    let pubs = harness::open_all(common, pub_dials, 16 * 1024, "publishers").await;
    harness::note_connects(&mut report, &subs);
    harness::note_connects(&mut report, &pubs);

    let shared = Arc::new(Shared {
        publishers: layout
            .pub_channel
            .iter()
            .map(|&c| {
                Arc::new(Publisher {
                    sent: AtomicU64::new(0),
                    acked: (0..layout.subs_per_channel[c])
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                    waiting: AtomicBool::new(false),
                    wake: Notify::new(),
                })
            })
            .collect(),
        ready: AtomicU64::new(0),
        delivered: Arc::new(AtomicU64::new(0)),
        last_delivery_ns: AtomicU64::new(0),
        latencies: SharedLatencies::default(),
    });
    // A subscriber that is not there must not hold its publishers back.
    for (i, conn) in subs.conns.iter().enumerate() {
        if conn.is_none() {
            for (j, &c) in layout.pub_channel.iter().enumerate() {
                if c == layout.sub_channel[i] {
                    shared.publishers[j].acked[layout.sub_slot[i]]
                        .store(u64::MAX, Ordering::SeqCst);
                }
            }
        }
    }

    let stop = CancellationToken::new();
    let go = CancellationToken::new();
    let mut sub_tasks = Vec::new();
    let mut subscribers_on = vec![0u64; args.channels];
    for (i, conn) in subs.conns.into_iter().enumerate() {
        let Some(conn) = conn else { continue };
        let c = layout.sub_channel[i];
        subscribers_on[c] += 1;
        let mine: Vec<usize> = (0..args.publishers)
            .filter(|&j| layout.pub_channel[j] == c)
            .collect();
        sub_tasks.push(tokio::spawn(subscribe(
            conn,
            Arc::clone(&shared),
            mine,
            layout.sub_slot[i],
            stop.clone(),
        )));
    }
    let connected_subs: u64 = subscribers_on.iter().sum();
    let mut pub_tasks = Vec::new();
    let mut drain_tasks = Vec::new();
    let mut expected_per_msg = Vec::new();
    for (j, conn) in pubs.conns.into_iter().enumerate() {
        let Some(WsConn {
            read,
            write,
            rx,
            tx,
        }) = conn
        else {
            continue;
        };
        expected_per_msg.push((j, subscribers_on[layout.pub_channel[j]]));
        drain_tasks.push(tokio::spawn(drain(read, rx, stop.clone())));
        pub_tasks.push(tokio::spawn(publish(
            write,
            tx,
            j,
            Arc::clone(&shared),
            args.clone(),
            common.duration(),
            go.clone(),
        )));
    }

    // Warm-up: every subscriber proves it is subscribed.
    let warm_deadline = Instant::now() + common.warmup_timeout();
    let all_ready = harness::wait_until(warm_deadline, || {
        shared.ready.load(Ordering::SeqCst) >= connected_subs
    })
    .await;
    if !all_ready {
        report.errors += 1;
        report.sample_error(format!(
            "only {} of {connected_subs} subscribers received the warm-up within {:?}",
            shared.ready.load(Ordering::SeqCst),
            common.warmup_timeout()
        ));
    }
    report.extra.insert(
        "subscribers_ready".into(),
        json!(shared.ready.load(Ordering::SeqCst)),
    );

    let window = Window::start(common).await?;
    let window_epoch_ns = now_ns();
    let progress = RunProgress::start(common, Arc::clone(&shared.delivered));
    go.cancel();
    // Write halves stay open until the end of the run.
    let mut write_halves = Vec::new();
    for outcome in collect(pub_tasks, common.duration() + WRITE_TIMEOUT * 2).await {
        if let Some(sent) = outcome.into_done(&mut report) {
            report.errors += sent.errors.len() as u64;
            for e in sent.errors {
                report.sample_error(e);
            }
            write_halves.push(sent.write);
        }
    }
    let sent: Vec<u64> = shared
        .publishers
        .iter()
        .map(|p| p.sent.load(Ordering::SeqCst))
        .collect();
    let expected: u64 = expected_per_msg.iter().map(|&(j, n)| sent[j] * n).sum();
    let drained = harness::wait_until(Instant::now() + common.drain(), || {
        shared.delivered.load(Ordering::SeqCst) >= expected
    })
    .await;
    drop(progress);
    if !drained {
        report.sample_error(format!(
            "{} of {expected} deliveries missing after the drain",
            expected.saturating_sub(shared.delivered.load(Ordering::SeqCst))
        ));
    }
    // The window ends at the last delivery, not at a drain timeout.
    let last_ns = shared
        .last_delivery_ns
        .load(Ordering::SeqCst)
        .max(window_epoch_ns);
    let measured = window
        .close(window.started() + Duration::from_nanos(last_ns - window_epoch_ns))
        .await;

    stop.cancel();
    drop(write_halves);
    let mut wire = WireStats::default();
    for outcome in collect(sub_tasks, Duration::from_secs(5)).await {
        let Some(sub) = outcome.into_done(&mut report) else {
            continue;
        };
        wire.add(&sub.wire);
        for (j, tracker) in sub.trackers {
            report.lost += sent[j].saturating_sub(tracker.unique);
            report.duplicated += tracker.duplicated;
            report.reordered += tracker.reordered;
            report.delivered += tracker.unique;
        }
        report.errors += sub.errors.len() as u64;
        for e in sub.errors {
            report.sample_error(e);
        }
    }
    for outcome in collect(drain_tasks, Duration::from_secs(5)).await {
        outcome.add_to(&mut report);
    }
    report.sent = sent.iter().sum();
    measured.apply(&mut report);
    wire.note(&mut report);
    if let Some(l) = shared.latencies.summary() {
        report.latency.insert("delivery".into(), l);
    }
    report.extra.insert(
        "publish_rate_per_s".into(),
        json!(report.sent as f64 / report.window_s.max(1e-9)),
    );
    if report.sent > 0 {
        for (counter, per) in [
            ("nats_in_msgs", "nats_in_per_published"),
            ("nats_out_msgs", "nats_out_per_published"),
        ] {
            if let Some(n) = report.extra.get(counter).and_then(|v| v.as_u64()) {
                let ratio = n as f64 / report.sent as f64;
                report
                    .extra
                    .insert(per.into(), json!((ratio * 100.0).round() / 100.0));
            }
        }
    }
    let failed = target
        .close_channels(&channels, common.connect_timeout())
        .await;
    report.errors += failed;
    Ok(report)
}

/// What a subscriber saw.
pub struct SubscriberOut {
    /// Per publisher (global index): the measured sequence numbers.
    trackers: Vec<(usize, SeqTracker)>,
    wire: WireStats,
    errors: Vec<String>,
}

/// Sizes of the measured messages a subscriber received (each counted
/// once, duplicates left out).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct WireStats {
    /// Subscribers that negotiated permessage-deflate.
    deflate: u64,
    messages: u64,
    /// Of them, compressed.
    compressed: u64,
    /// Frame bytes as read: headers and payloads, compressed or not.
    wire_bytes: u64,
    /// Payload bytes after inflating.
    payload_bytes: u64,
}

impl WireStats {
    fn add(&mut self, other: &WireStats) {
        self.deflate += other.deflate;
        self.messages += other.messages;
        self.compressed += other.compressed;
        self.wire_bytes += other.wire_bytes;
        self.payload_bytes += other.payload_bytes;
    }

    /// The report's figures: bytes per delivery on the wire and as
    /// payload, their ratio, the share of messages compressed.
    fn note(&self, report: &mut Report) {
        report
            .extra
            .insert("subscribers_deflate".into(), json!(self.deflate));
        if self.messages == 0 {
            return;
        }
        let n = self.messages as f64;
        report.extra.insert(
            "wire_bytes_per_delivery".into(),
            json!(self.wire_bytes as f64 / n),
        );
        report.extra.insert(
            "payload_bytes_per_delivery".into(),
            json!(self.payload_bytes as f64 / n),
        );
        report.extra.insert(
            "compression_ratio".into(),
            json!(self.payload_bytes as f64 / (self.wire_bytes as f64).max(1.0)),
        );
        report
            .extra
            .insert("compressed_share".into(), json!(self.compressed as f64 / n));
    }
}

async fn subscribe(
    mut conn: WsConn,
    shared: Arc<Shared>,
    publishers: Vec<usize>,
    slot: usize,
    stop: CancellationToken,
) -> SubscriberOut {
    let mut local_of = vec![usize::MAX; shared.publishers.len()];
    for (local, &global) in publishers.iter().enumerate() {
        local_of[global] = local;
    }
    let mut trackers = vec![SeqTracker::default(); publishers.len()];
    let mut warmed = vec![false; publishers.len()];
    let mut cold = publishers.len();
    if cold == 0 {
        shared.ready.fetch_add(1, Ordering::SeqCst);
    }
    let mut latencies = shared.latencies.recorder();
    let mut errors = Vec::new();
    let mut touched = vec![false; publishers.len()];
    let mut wire = WireStats {
        deflate: u64::from(conn.deflate()),
        ..WireStats::default()
    };
    'read: loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = conn.fill() => read,
        };
        match read {
            Ok(0) => {
                errors.push("subscriber: connection closed by the server".into());
                break;
            }
            Err(e) => {
                errors.push(format!("subscriber: read failed: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let now = now_ns();
        let mut new = 0;
        loop {
            let (stamp, size) = match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Text(p) | Frame::Binary(p))) => (Stamp::find(p), p.len()),
                Ok(Some(Frame::Close(code))) => {
                    errors.push(format!("subscriber: closed by the server with {code:?}"));
                    break 'read;
                }
                Ok(None) => break,
                Err(e) => {
                    errors.push(format!("subscriber: {e}"));
                    break 'read;
                }
            };
            let Some(stamp) = stamp else {
                continue;
            };
            let Some(&local) = local_of.get(stamp.source as usize) else {
                continue;
            };
            if local == usize::MAX {
                continue;
            }
            match stamp.kind {
                Kind::Warmup => {
                    if !warmed[local] {
                        warmed[local] = true;
                        cold -= 1;
                        if cold == 0 {
                            shared.ready.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                Kind::Measure => {
                    if trackers[local].insert(stamp.seq) == Arrival::New {
                        latencies.record(now.saturating_sub(stamp.sent_ns));
                        wire.messages += 1;
                        wire.compressed += u64::from(conn.rx.last_compressed());
                        wire.wire_bytes += conn.rx.last_wire_bytes() as u64;
                        wire.payload_bytes += size as u64;
                        touched[local] = true;
                        new += 1;
                    }
                }
            }
        }
        latencies.flush();
        if new > 0 {
            shared.delivered.fetch_add(new, Ordering::SeqCst);
            shared.last_delivery_ns.fetch_max(now, Ordering::SeqCst);
            for (local, &global) in publishers.iter().enumerate() {
                if std::mem::take(&mut touched[local]) {
                    let publisher = &shared.publishers[global];
                    publisher.acked[slot].store(trackers[local].next(), Ordering::SeqCst);
                    if publisher.waiting.load(Ordering::SeqCst)
                        && publisher.waiting.swap(false, Ordering::SeqCst)
                    {
                        publisher.wake.notify_one();
                    }
                }
            }
        }
        if !conn.tx.is_empty()
            && let Err(e) = conn.flush().await
        {
            errors.push(format!("subscriber: write failed: {e}"));
            break;
        }
    }
    SubscriberOut {
        trackers: publishers.into_iter().zip(trackers).collect(),
        wire,
        errors,
    }
}

/// Reads and discards what a publisher receives (a relay that echoes to
/// the sender would otherwise stall on it).
async fn drain(mut read: ReadHalf, mut rx: RxBuf, stop: CancellationToken) -> Vec<String> {
    let mut sink = TxBuf::new(crate::rng::FastRng::seeded());
    loop {
        let filled = tokio::select! {
            biased;
            () = stop.cancelled() => return Vec::new(),
            filled = rx.fill(&mut read) => filled,
        };
        match filled {
            Ok(0) => return vec!["publisher: connection closed by the server".into()],
            Err(e) => return vec![format!("publisher: read failed: {e}")],
            Ok(_) => {}
        }
        loop {
            match rx.next_frame(&mut sink) {
                Ok(Some(Frame::Close(code))) => {
                    return vec![format!("publisher: closed by the server with {code:?}")];
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return vec![format!("publisher: {e}")],
            }
        }
    }
}

async fn publish(
    mut write: WriteHalf,
    mut tx: TxBuf,
    me: usize,
    shared: Arc<Shared>,
    args: FanoutArgs,
    duration: Duration,
    go: CancellationToken,
) -> Sent {
    let mut composer = match args.payload {
        PayloadKind::Plain => Composer::plain(args.size),
        PayloadKind::Snapshot => Composer::snapshot(args.size, me as u64 + 1),
    };
    let source = me as u32;
    let publisher = Arc::clone(&shared.publishers[me]);
    // Warm-up until the measurement starts.
    let mut warm_seq = 0;
    while !go.is_cancelled() {
        let stamp = Stamp {
            kind: Kind::Warmup,
            source,
            seq: warm_seq,
            sent_ns: now_ns(),
        };
        warm_seq += 1;
        tx.text(composer.compose(&stamp));
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
    let mut min_acked = 0u64;
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
                if seq >= min_acked.saturating_add(args.backlog) {
                    min_acked = publisher.min_acked();
                }
                if seq >= min_acked.saturating_add(args.backlog) {
                    publisher.waiting.store(true, Ordering::SeqCst);
                    min_acked = publisher.min_acked();
                    if seq >= min_acked.saturating_add(args.backlog) {
                        tokio::select! {
                            () = publisher.wake.notified() => {}
                            () = tokio::time::sleep(Duration::from_millis(1)) => {}
                        }
                        continue;
                    }
                    publisher.waiting.store(false, Ordering::SeqCst);
                }
                (min_acked.saturating_add(args.backlog) - seq).min(MAX_BATCH)
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
        publisher.sent.store(seq, Ordering::SeqCst);
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
        Ok(Err(e)) => Err(format!("publisher: write failed: {e}")),
        Err(_) => Err("publisher: write blocked for 10 s".into()),
    }
}
