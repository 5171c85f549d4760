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
//!
//! Subscribers receive over WebSocket or as Server-Sent Events streams
//! (`--sub-transport sse`), publishers send over WebSocket or with HTTP
//! `POST`s (`--pub-transport http`, see [`super::fanout_http`]); every
//! subscriber counts the sequence numbers in the payloads alike, so loss
//! and duplicates are found whatever carries them. `--history` creates
//! the WRS channels with a message history (SPEC §10).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{collect, fanout_http};
use crate::harness::{self, Common, Dial, RunProgress, Window};
use crate::http::Pipeline;
use crate::payload::{Composer, Kind, Stamp, now_ns};
use crate::report::Report;
use crate::sse::SseConn;
use crate::target::{History, Target};
use crate::track::{Arrival, Recorder, SeqTracker, SharedLatencies};
use crate::ws::{Frame, ReadHalf, RxBuf, TxBuf, WriteHalf, WsConn, WsUrl};

/// Longest a single batch may take to write before the publisher gives up.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Warm-up messages are sent this often until every subscriber has one.
pub(super) const WARMUP_EVERY: Duration = Duration::from_millis(20);
/// Most messages written in one batch.
pub(super) const MAX_BATCH: u64 = 256;
/// Receive buffer of a subscriber, per read.
const SUB_RX_CAPACITY: usize = 64 * 1024;

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
    /// How subscribers receive: WebSocket, or Server-Sent Events (WRS:
    /// `GET /channels/{id}/events?token=T`; with templates `--sub-url` is
    /// the event stream's URL).
    #[arg(long, value_enum, default_value_t = SubTransport::Ws)]
    pub sub_transport: SubTransport,
    /// How publishers send: WebSocket, or HTTP `POST`s on one keep-alive
    /// connection each (WRS: `POST /channels/{id}/messages?token=T`; with
    /// templates `--pub-url` is the URL to post to).
    #[arg(long, value_enum, default_value_t = PubTransport::Ws)]
    pub pub_transport: PubTransport,
    /// HTTP publishers: requests in flight on the connection; 1 waits for
    /// each response before the next request, more pipeline them.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// WRS only: create the channels with a history of SIZE messages
    /// kept for at most TTL_MS milliseconds.
    #[arg(long, value_name = "SIZE:TTL_MS", value_parser = History::parse)]
    pub history: Option<History>,
}

/// What subscribers receive over.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubTransport {
    Ws,
    Sse,
}

/// What publishers send over.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PubTransport {
    Ws,
    Http,
}

/// An open subscriber connection.
enum SubConn {
    Ws(WsConn),
    Sse(SseConn),
}

/// An open publisher connection.
enum PubConn {
    Ws(WsConn),
    Http(Box<Pipeline>),
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
pub(super) struct Publisher {
    /// Messages fully written (HTTP: accepted) in the measured window.
    pub(super) sent: AtomicU64,
    /// Per subscriber of the channel: highest sequence received plus one
    /// (`u64::MAX` for a subscriber that never connected).
    acked: Box<[AtomicU64]>,
    /// Set while the publisher waits for acknowledgements.
    pub(super) waiting: AtomicBool,
    pub(super) wake: Notify,
}

impl Publisher {
    pub(super) fn min_acked(&self) -> u64 {
        self.acked
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .min()
            .unwrap_or(u64::MAX)
    }
}

pub(super) struct Shared {
    pub(super) publishers: Vec<Arc<Publisher>>,
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
    ensure!(args.pipeline >= 1, "--pipeline must be at least 1");
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
    if args.sub_transport == SubTransport::Sse {
        report.params.insert("sub_transport".into(), json!("sse"));
    }
    if args.pub_transport == PubTransport::Http {
        report.params.insert("pub_transport".into(), json!("http"));
        report
            .params
            .insert("pipeline".into(), json!(args.pipeline));
    }
    if let Some(history) = args.history {
        report
            .params
            .insert("history".into(), json!(history.to_string()));
    }

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
        .open_channels_with(
            args.channels,
            "pub-sub",
            args.history,
            common.connect_timeout(),
        )
        .await?;
    let layout = Layout::new(args);
    let sub_dials = layout
        .sub_channel
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let sub = match args.sub_transport {
                SubTransport::Ws => &channels[c].sub,
                SubTransport::Sse => &channels[c].events,
            };
            let url = match &nodes[i % nodes.len()] {
                None => sub.clone(),
                Some(node) => node.with_path(sub.path.clone()),
            };
            Dial { url, source: None }
        })
        .collect();
    let subs = match args.sub_transport {
        SubTransport::Ws => {
            harness::open_all_with(
                common,
                sub_dials,
                "subscribers",
                |dial, timeout| async move {
                    WsConn::connect(&dial.url, dial.source, timeout, SUB_RX_CAPACITY)
                        .await
                        .map(SubConn::Ws)
                },
            )
            .await
        }
        SubTransport::Sse => {
            harness::open_all_with(
                common,
                sub_dials,
                "SSE subscribers",
                |dial, timeout| async move {
                    SseConn::connect(&dial.url, dial.source, timeout, SUB_RX_CAPACITY)
                        .await
                        .map(SubConn::Sse)
                },
            )
            .await
        }
    };
    let pub_dials = layout
        .pub_channel
        .iter()
        .map(|&c| Dial {
            url: match args.pub_transport {
                PubTransport::Ws => channels[c].publ.clone(),
                PubTransport::Http => channels[c].messages.clone(),
            },
            source: None,
        })
        .collect();
    let pubs = match args.pub_transport {
        PubTransport::Ws => {
            harness::open_all_with(
                common,
                pub_dials,
                "publishers",
                |dial, timeout| async move {
                    WsConn::connect(&dial.url, dial.source, timeout, 16 * 1024)
                        .await
                        .map(PubConn::Ws)
                },
            )
            .await
        }
        PubTransport::Http => {
            harness::open_all_with(
                common,
                pub_dials,
                "HTTP publishers",
                |dial, timeout| async move {
                    Pipeline::connect(&dial.url, timeout)
                        .await
                        .map(|pipeline| PubConn::Http(Box::new(pipeline)))
                },
            )
            .await
        }
    };
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
        let tally = Tally::new(&shared, mine, layout.sub_slot[i]);
        sub_tasks.push(match conn {
            SubConn::Ws(conn) => {
                tokio::spawn(subscribe(conn, Arc::clone(&shared), tally, stop.clone()))
            }
            SubConn::Sse(conn) => tokio::spawn(fanout_http::subscribe(
                conn,
                Arc::clone(&shared),
                tally,
                stop.clone(),
            )),
        });
    }
    let connected_subs: u64 = subscribers_on.iter().sum();
    if connected_subs == 0 && args.subscribers > 0 {
        anyhow::bail!(
            "no subscriber connected (of {}): {}",
            args.subscribers,
            report
                .error_samples
                .first()
                .map_or("no error recorded", String::as_str)
        );
    }
    let mut pub_tasks = Vec::new();
    let mut drain_tasks = Vec::new();
    let mut expected_per_msg = Vec::new();
    for (j, conn) in pubs.conns.into_iter().enumerate() {
        let Some(conn) = conn else {
            continue;
        };
        expected_per_msg.push((j, subscribers_on[layout.pub_channel[j]]));
        match conn {
            PubConn::Ws(WsConn {
                read,
                write,
                rx,
                tx,
            }) => {
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
            PubConn::Http(pipeline) => {
                pub_tasks.push(tokio::spawn(fanout_http::publish(
                    pipeline,
                    channels[layout.pub_channel[j]].messages.path.clone(),
                    j,
                    Arc::clone(&shared),
                    args.clone(),
                    common.duration(),
                    go.clone(),
                )));
            }
        }
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
    if shared.ready.load(Ordering::SeqCst) == 0 {
        // Nothing got through: a run would only measure an idle server.
        // Say why, if a publisher already gave up.
        let mut why = Vec::new();
        for task in &mut pub_tasks {
            if task.is_finished()
                && let Ok(sent) = task.await
            {
                why.extend(sent.errors);
            }
        }
        anyhow::bail!(
            "no subscriber received a warm-up message within {:?}{}",
            common.warmup_timeout(),
            why.first().map_or(String::new(), |e| format!(": {e}"))
        );
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
    let mut http = fanout_http::HttpStats::default();
    for outcome in collect(pub_tasks, common.duration() + WRITE_TIMEOUT * 2).await {
        if let Some(sent) = outcome.into_done(&mut report) {
            report.errors += sent.errors.len() as u64;
            for e in sent.errors {
                report.sample_error(e);
            }
            write_halves.push(sent.write);
            if let Some(stats) = sent.http {
                http.add(&stats);
                report.errors += stats.refused;
            }
            for sample in sent.samples {
                report.sample_error(sample);
            }
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
    let mut sse = fanout_http::SseTotals::default();
    for outcome in collect(sub_tasks, Duration::from_secs(5)).await {
        let Some(sub) = outcome.into_done(&mut report) else {
            continue;
        };
        wire.add(&sub.wire);
        if let Some(stats) = &sub.sse {
            sse.add(stats);
        }
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
    if args.pub_transport == PubTransport::Http {
        http.note(&mut report);
    }
    if args.sub_transport == SubTransport::Sse {
        sse.note(&mut report);
    }
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
    /// SSE subscribers: what the stream carried besides messages.
    sse: Option<crate::sse::SseStats>,
    errors: Vec<String>,
}

/// Sizes of the measured messages a subscriber received (each counted
/// once, duplicates left out).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct WireStats {
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
    /// One measured message: its payload size, its bytes on the wire
    /// (WebSocket frames, or the SSE event's lines) and whether it came
    /// compressed.
    pub(super) fn record(&mut self, payload: usize, wire: usize, compressed: bool) {
        self.messages += 1;
        self.compressed += u64::from(compressed);
        self.wire_bytes += wire as u64;
        self.payload_bytes += payload as u64;
    }

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

/// What one subscriber keeps of the messages it receives, whatever
/// carries them: the sequence numbers per publisher, the warm-up, the
/// latencies and sizes, and the acknowledgements its publishers wait for.
pub(super) struct Tally {
    /// The publishers of its channel (global indices).
    publishers: Vec<usize>,
    /// Global publisher index -> local one (`usize::MAX`: not ours).
    local_of: Vec<usize>,
    trackers: Vec<SeqTracker>,
    warmed: Vec<bool>,
    cold: usize,
    /// Publishers with new messages in this read batch.
    touched: Vec<bool>,
    /// Its slot in its channel's acknowledgements.
    slot: usize,
    latencies: Recorder,
    pub(super) wire: WireStats,
    /// New measured deliveries in this read batch.
    new: u64,
}

impl Tally {
    pub(super) fn new(shared: &Shared, publishers: Vec<usize>, slot: usize) -> Self {
        let mut local_of = vec![usize::MAX; shared.publishers.len()];
        for (local, &global) in publishers.iter().enumerate() {
            local_of[global] = local;
        }
        let cold = publishers.len();
        if cold == 0 {
            shared.ready.fetch_add(1, Ordering::SeqCst);
        }
        Self {
            local_of,
            trackers: vec![SeqTracker::default(); publishers.len()],
            warmed: vec![false; publishers.len()],
            cold,
            touched: vec![false; publishers.len()],
            publishers,
            slot,
            latencies: shared.latencies.recorder(),
            wire: WireStats::default(),
            new: 0,
        }
    }

    /// One message with a stamp, read at `now`. Returns whether it is a
    /// new measured delivery (the caller then records its sizes).
    pub(super) fn arrive(&mut self, shared: &Shared, stamp: Stamp, now: u64) -> bool {
        let Some(&local) = self.local_of.get(stamp.source as usize) else {
            return false;
        };
        if local == usize::MAX {
            return false;
        }
        match stamp.kind {
            Kind::Warmup => {
                if !self.warmed[local] {
                    self.warmed[local] = true;
                    self.cold -= 1;
                    if self.cold == 0 {
                        shared.ready.fetch_add(1, Ordering::SeqCst);
                    }
                }
                false
            }
            Kind::Measure => {
                if self.trackers[local].insert(stamp.seq) == Arrival::New {
                    self.latencies.record(now.saturating_sub(stamp.sent_ns));
                    self.touched[local] = true;
                    self.new += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// After the messages of one read: publishes the counts and the
    /// acknowledgements, and wakes publishers that wait for them.
    pub(super) fn batch_done(&mut self, shared: &Shared, now: u64) {
        self.latencies.flush();
        let new = std::mem::take(&mut self.new);
        if new == 0 {
            return;
        }
        shared.delivered.fetch_add(new, Ordering::SeqCst);
        shared.last_delivery_ns.fetch_max(now, Ordering::SeqCst);
        for (local, &global) in self.publishers.iter().enumerate() {
            if std::mem::take(&mut self.touched[local]) {
                let publisher = &shared.publishers[global];
                publisher.acked[self.slot].store(self.trackers[local].next(), Ordering::SeqCst);
                if publisher.waiting.load(Ordering::SeqCst)
                    && publisher.waiting.swap(false, Ordering::SeqCst)
                {
                    publisher.wake.notify_one();
                }
            }
        }
    }

    /// The subscriber's result.
    pub(super) fn finish(
        self,
        sse: Option<crate::sse::SseStats>,
        errors: Vec<String>,
    ) -> SubscriberOut {
        SubscriberOut {
            trackers: self.publishers.into_iter().zip(self.trackers).collect(),
            wire: self.wire,
            sse,
            errors,
        }
    }
}

async fn subscribe(
    mut conn: WsConn,
    shared: Arc<Shared>,
    mut tally: Tally,
    stop: CancellationToken,
) -> SubscriberOut {
    tally.wire.deflate = u64::from(conn.deflate());
    let mut errors = Vec::new();
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
            if tally.arrive(&shared, stamp, now) {
                tally
                    .wire
                    .record(size, conn.rx.last_wire_bytes(), conn.rx.last_compressed());
            }
        }
        tally.batch_done(&shared, now);
        if !conn.tx.is_empty()
            && let Err(e) = conn.flush().await
        {
            errors.push(format!("subscriber: write failed: {e}"));
            break;
        }
    }
    tally.finish(None, errors)
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
            return Sent::ws(vec![e], write);
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
            return Sent::ws(vec![e], write);
        }
        seq += batch;
        publisher.sent.store(seq, Ordering::SeqCst);
    }
    Sent::ws(Vec::new(), write)
}

/// A sender's errors, and a WebSocket publisher's write half: dropping it
/// would send FIN and make the relay close the connection before the
/// measurement ends. HTTP publishers add their counts.
pub(super) struct Sent {
    pub(super) errors: Vec<String>,
    write: Option<WriteHalf>,
    pub(super) http: Option<fanout_http::HttpStats>,
    /// Descriptions of refused requests (counted in `http`).
    pub(super) samples: Vec<String>,
}

impl Sent {
    fn ws(errors: Vec<String>, write: WriteHalf) -> Self {
        Self {
            errors,
            write: Some(write),
            http: None,
            samples: Vec::new(),
        }
    }

    pub(super) fn http(errors: Vec<String>, stats: fanout_http::HttpStats) -> Self {
        Self {
            errors,
            write: None,
            http: Some(stats),
            samples: Vec::new(),
        }
    }
}

async fn flush(tx: &mut TxBuf, write: &mut WriteHalf) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, tx.flush(write)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("publisher: write failed: {e}")),
        Err(_) => Err("publisher: write blocked for 10 s".into()),
    }
}
