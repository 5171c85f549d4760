//! `storm`: a crowd of N idle clients that reconnect the way the docs tell
//! users to, measured while the cluster moves them: a node added (the
//! others shed with 1012 until every node holds its share) or a node
//! drained (every client it holds is closed with 1012).
//!
//! The crowd joins one `pub-sub` channel through `--connect` (a node, or
//! HAProxy) and reconnects through `--reconnect` (HAProxy): after a close
//! with 1012 at once plus 0–`--jitter-ms` of jitter, after 1013, 1001 or a
//! connection lost without a close frame, or a refused connect, after a
//! back-off of 250 ms × 2^failures (at most 30 s) plus the jitter, as
//! the tutorial's client does. Each successful reconnect records its
//! connect latency (from the attempt's start to the `101` response) and
//! how long the client was away (from the close to the `101`, jitter and
//! retries included); each failed attempt is a reconnect error.
//!
//! Optionally `--subscribers` clients of a second `pub-sub` channel stay
//! on the nodes given by `--stay-on` while one publisher on the first of
//! them sends `--rate` messages a second: their message latency is split
//! into before the event, during the storm (first close to last
//! reconnect) and after it.
//!
//! The run: connect everything, measure `--duration` seconds of the
//! steady state, create `--ready-file`, wait for the event (the contents
//! of `--event-file`, written by whoever adds or drains the node: the
//! event's time in nanoseconds since the Unix epoch, `date +%s%N`), then
//! watch every `--node` (its `GET /cluster`, this node's own live count)
//! until the crowd has settled (`--until`), measure `--after` seconds
//! more, and read each node's `/metrics` for the closes it counted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use clap::{Args, ValueEnum};
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::collect;
use crate::harness::{self, Common, Dial, Window};
use crate::http::HttpClient;
use crate::payload::{Composer, Kind, Stamp, now_ns};
use crate::report::Report;
use crate::rng::FastRng;
use crate::target::{Target, create_channel};
use crate::track::{Arrival, Latencies, SeqTracker, SharedLatencies};
use crate::ws::{Frame, WsConn, WsUrl};

/// How often the nodes are asked for their connections while settling.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// First back-off step after a refusal or an abnormal close.
const BACKOFF_BASE_MS: u64 = 250;
/// Longest back-off.
const BACKOFF_MAX_MS: u64 = 30_000;
/// Warm-up messages are sent this often until every subscriber has one.
const WARMUP_EVERY: Duration = Duration::from_millis(50);
/// Longest a publisher's write may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Close codes after which a client moves (RFC 6455: service restart,
/// try again later, going away).
const MOVE_CODES: [u16; 3] = [1012, 1013, 1001];

/// When the crowd has settled after the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Until {
    /// Every `--node` answers and holds the average of their connections
    /// within `--tolerance-pct`, and the whole crowd is connected.
    Balanced,
    /// Every client of the crowd was closed and has reconnected (a node
    /// holding all of them was drained).
    Moved,
}

impl Until {
    fn name(self) -> &'static str {
        match self {
            Until::Balanced => "balanced",
            Until::Moved => "moved",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct StormArgs {
    /// Clients of the crowd (they reconnect when closed).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub clients: usize,
    /// Base URL the crowd first connects to [default: --server].
    #[arg(long, value_name = "URL")]
    pub connect: Option<String>,
    /// Base URL the crowd reconnects to, e.g. HAProxy [default: --connect].
    #[arg(long, value_name = "URL")]
    pub reconnect: Option<String>,
    /// Most random delay before a reconnect, in ms.
    #[arg(long, default_value_t = 1000)]
    pub jitter_ms: u64,
    /// A node's API base URL (repeatable): watched for its connections
    /// while settling, and read for its close counters at the end.
    #[arg(long = "node", value_name = "URL")]
    pub nodes: Vec<String>,
    /// When the crowd has settled after the event.
    #[arg(long, value_enum, default_value_t = Until::Moved)]
    pub until: Until,
    /// `--until balanced`: how far a node may be from the average, in
    /// percent.
    #[arg(long, default_value_t = 10.0)]
    pub tolerance_pct: f64,
    /// Longest wait for the event and then for the crowd to settle, in
    /// seconds each.
    #[arg(long, default_value_t = 120.0)]
    pub settle_timeout: f64,
    /// Seconds measured after the crowd has settled.
    #[arg(long, default_value_t = 2.0)]
    pub after: f64,
    /// Subscribers that stay: clients of a second channel, dealt
    /// round-robin over the `--stay-on` nodes.
    #[arg(short = 's', long, default_value_t = 0)]
    pub subscribers: usize,
    /// A node the staying subscribers connect to (repeatable; the
    /// publisher connects to the first) [default: --server].
    #[arg(long = "stay-on", value_name = "URL")]
    pub stay_on: Vec<String>,
    /// Messages per second the publisher sends to the staying subscribers.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Message size in bytes (at least 40).
    #[arg(short = 'b', long, default_value_t = 64)]
    pub size: usize,
    /// Created once the crowd is connected and the steady state measured.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Waited for after `--ready-file`: its contents are the event's time
    /// in nanoseconds since the Unix epoch. Without it the event is the
    /// end of the steady state.
    #[arg(long)]
    pub event_file: Option<PathBuf>,
}

/// What the crowd shares; times are [`now_ns`] values.
struct Crowd {
    connected: AtomicU64,
    /// Clients that have reconnected at least once.
    moved: AtomicU64,
    reconnects: AtomicU64,
    reconnect_errors: AtomicU64,
    /// Clients that gave up: closed with a code not to reconnect on, or a
    /// protocol error.
    failures: AtomicU64,
    first_close_ns: AtomicU64,
    last_reconnect_ns: AtomicU64,
    /// Closes by code; `none` for a connection lost without a close frame.
    closes: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
    /// Attempt start to `101`.
    connect: SharedLatencies,
    /// Close to `101`, jitter and retries included.
    away: SharedLatencies,
}

impl Crowd {
    fn new() -> Self {
        Self {
            connected: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reconnect_errors: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            first_close_ns: AtomicU64::new(u64::MAX),
            last_reconnect_ns: AtomicU64::new(0),
            closes: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(Vec::new()),
            connect: SharedLatencies::default(),
            away: SharedLatencies::default(),
        }
    }

    /// Counts a client that gave up.
    fn fail(&self, error: String) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        self.sample_error(error);
    }

    fn sample_error(&self, error: String) {
        let mut errors = self.errors.lock();
        if errors.len() < 10 {
            errors.push(error);
        }
    }
}

/// Where a crowd client reconnects, and how.
#[derive(Clone)]
struct Plan {
    url: WsUrl,
    jitter_ms: u64,
    timeout: Duration,
}

/// What the staying subscribers and their publisher share.
struct News {
    /// Subscribers that have received a warm-up message.
    ready: AtomicU64,
    /// Set once every subscriber is ready: the publisher sends measured
    /// messages from then on.
    measuring: AtomicBool,
    /// Measured messages sent.
    sent: AtomicU64,
    /// Unique measured messages received, over all subscribers.
    delivered: AtomicU64,
}

impl News {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicU64::new(0),
            measuring: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        })
    }
}

/// Runs the scenario.
///
/// # Errors
///
/// Bad arguments, a non-WRS target, URLs that do not resolve, channels
/// that cannot be created, a ready file that cannot be written, or an
/// event that does not come.
pub async fn run(common: &Common, args: &StormArgs) -> anyhow::Result<Report> {
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(args.rate > 0.0, "--rate must be positive");
    ensure!(
        args.until == Until::Moved || !args.nodes.is_empty(),
        "--until balanced needs the nodes to watch (--node)"
    );
    ensure!(
        (0.0..100.0).contains(&args.tolerance_pct),
        "--tolerance-pct must be at least 0 and below 100"
    );
    let target = Target::from_args(&common.target).await?;
    let api = target.wrs_api("storm")?.clone();
    let mut report = common.report("storm", target.label());
    report.params.insert("clients".into(), json!(args.clients));
    report
        .params
        .insert("jitter_ms".into(), json!(args.jitter_ms));
    report
        .params
        .insert("until".into(), json!(args.until.name()));
    report
        .params
        .insert("nodes".into(), json!(args.nodes.len()));
    if args.until == Until::Balanced {
        report
            .params
            .insert("tolerance_pct".into(), json!(args.tolerance_pct));
    }
    if args.subscribers > 0 {
        report
            .params
            .insert("subscribers".into(), json!(args.subscribers));
        report.params.insert("rate".into(), json!(args.rate));
        report.params.insert("size".into(), json!(args.size));
    }

    let connect_base = match &args.connect {
        Some(url) => parse_url(url, "--connect").await?,
        None => api.clone(),
    };
    let reconnect_base = match &args.reconnect {
        Some(url) => parse_url(url, "--reconnect").await?,
        None => connect_base.clone(),
    };
    let mut nodes = Vec::with_capacity(args.nodes.len());
    for url in &args.nodes {
        nodes.push(parse_url(url, "--node").await?);
    }
    let mut stay_on = Vec::with_capacity(args.stay_on.len().max(1));
    for url in &args.stay_on {
        stay_on.push(parse_url(url, "--stay-on").await?);
    }
    if stay_on.is_empty() {
        stay_on.push(api.clone());
    }

    let mut rest =
        HttpClient::new(api.addr, api.host.clone(), common.connect_timeout()).with_tls(api.tls);
    let crowd_channel = create_channel(&mut rest, &api, "pub-sub").await?;
    let news_channel = create_channel(&mut rest, &api, "pub-sub").await?;

    // The crowd.
    let dials = (0..args.clients)
        .map(|_| Dial {
            url: connect_base.with_path(crowd_channel.sub.path.clone()),
            source: None,
        })
        .collect();
    let opened = harness::open_all(common, dials, 1024, "crowd").await;
    harness::note_connects(&mut report, &opened);
    let mut initial = Latencies::new();
    for took in &opened.connect_times {
        initial.record(took.as_nanos() as u64);
    }
    if let Some(l) = initial.summary() {
        report.latency.insert("connect".into(), l);
    }
    let crowd = Arc::new(Crowd::new());
    let plan = Plan {
        url: reconnect_base.with_path(crowd_channel.sub.path.clone()),
        jitter_ms: args.jitter_ms,
        timeout: common.connect_timeout(),
    };
    let stop = CancellationToken::new();
    let mut crowd_tasks = Vec::new();
    for conn in opened.conns.into_iter().flatten() {
        crowd.connected.fetch_add(1, Ordering::SeqCst);
        crowd_tasks.push(tokio::spawn(member(
            conn,
            plan.clone(),
            Arc::clone(&crowd),
            stop.clone(),
        )));
    }
    let crowd_size = crowd_tasks.len() as u64;

    // The subscribers that stay, and their publisher.
    let news = News::new();
    let stop_publisher = CancellationToken::new();
    let mut sub_tasks = Vec::new();
    let mut pub_task = None;
    if args.subscribers > 0 {
        let dials = (0..args.subscribers)
            .map(|i| Dial {
                url: stay_on[i % stay_on.len()].with_path(news_channel.sub.path.clone()),
                source: None,
            })
            .collect();
        let subs = harness::open_all(common, dials, 16 * 1024, "subscribers").await;
        harness::note_connects(&mut report, &subs);
        for conn in subs.conns.into_iter().flatten() {
            sub_tasks.push(tokio::spawn(subscribe(
                conn,
                Arc::clone(&news),
                stop.clone(),
            )));
        }
        let publisher = WsConn::connect(
            &stay_on[0].with_path(news_channel.publ.path.clone()),
            None,
            common.connect_timeout(),
            16 * 1024,
        )
        .await
        .context("the publisher's connect")?;
        report.connections += 1;
        pub_task = Some(tokio::spawn(publish(
            publisher,
            Arc::clone(&news),
            args.size,
            args.rate,
            stop_publisher.clone(),
        )));
        let subscribed = sub_tasks.len() as u64;
        if !harness::wait_until(Instant::now() + common.warmup_timeout(), || {
            news.ready.load(Ordering::SeqCst) >= subscribed
        })
        .await
        {
            report.errors += 1;
            report.sample_error(format!(
                "only {} of {subscribed} subscribers received the warm-up",
                news.ready.load(Ordering::SeqCst)
            ));
        }
        news.measuring.store(true, Ordering::SeqCst);
    }
    let subscribed = sub_tasks.len() as u64;

    // The steady state, then the event.
    let steady_ns = now_ns();
    tokio::time::sleep(common.duration()).await;
    let mut watch = watchers(&nodes, common.connect_timeout());
    let counts_before = poll_counts(&mut watch).await;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, "ready\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let settle_timeout = Duration::from_secs_f64(args.settle_timeout.max(0.0));
    let event_ns = match &args.event_file {
        Some(path) => wait_for_event(path, settle_timeout).await?,
        None => now_ns(),
    };
    let window = Window::start(common).await?;

    // Settling.
    let deadline = Instant::now() + settle_timeout;
    let mut counts_settled: Vec<Option<u64>> = Vec::new();
    let settled_ns = loop {
        let tick = Instant::now();
        let connected = crowd.connected.load(Ordering::SeqCst);
        let done = match args.until {
            Until::Moved => {
                connected == crowd_size && crowd.moved.load(Ordering::SeqCst) >= crowd_size
            }
            Until::Balanced => {
                counts_settled = poll_counts(&mut watch).await;
                connected == crowd_size && balanced(&counts_settled, args.tolerance_pct)
            }
        };
        if done {
            break Some(now_ns());
        }
        if tick >= deadline {
            break None;
        }
        tokio::time::sleep_until((tick + POLL_EVERY).into()).await;
    };
    let measured = window.close(Instant::now()).await;
    if args.until == Until::Moved {
        counts_settled = poll_counts(&mut watch).await;
    }
    if settled_ns.is_none() {
        report.errors += 1;
        report.sample_error(format!(
            "not settled ({}) within {settle_timeout:?} of the event: {} of {crowd_size} connected, {} moved, the nodes hold {counts_settled:?}",
            args.until.name(),
            crowd.connected.load(Ordering::SeqCst),
            crowd.moved.load(Ordering::SeqCst),
        ));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.after.max(0.0))).await;

    // Collecting: the publisher first, then what it sent arrives.
    stop_publisher.cancel();
    if let Some(task) = pub_task {
        for outcome in collect(vec![task], WRITE_TIMEOUT * 2).await {
            if let Some(Some(e)) = outcome.into_done(&mut report) {
                report.errors += 1;
                report.sample_error(e);
            }
        }
    }
    let sent = news.sent.load(Ordering::SeqCst);
    let expected = sent * subscribed;
    harness::wait_until(Instant::now() + common.drain(), || {
        news.delivered.load(Ordering::SeqCst) >= expected
    })
    .await;
    let end_ns = now_ns();
    stop.cancel();
    for outcome in collect(crowd_tasks, Duration::from_secs(10)).await {
        outcome.into_done(&mut report);
    }
    let mut samples: Vec<(u64, u64)> = Vec::new();
    for outcome in collect(sub_tasks, Duration::from_secs(10)).await {
        let Some(sub) = outcome.into_done(&mut report) else {
            continue;
        };
        report.delivered += sub.tracker.unique;
        report.duplicated += sub.tracker.duplicated;
        report.reordered += sub.tracker.reordered;
        report.lost += sent.saturating_sub(sub.tracker.unique);
        samples.extend(sub.samples);
        if let Some(e) = sub.error {
            report.errors += 1;
            report.sample_error(e);
        }
    }
    report.sent = sent;
    measured.apply(&mut report);

    // Phases: before the event, the storm (first close to last
    // reconnect), after it. Messages sent between the event and the first
    // close (the drain delay) count in `delivery` only.
    let first_close = crowd.first_close_ns.load(Ordering::SeqCst);
    let last_reconnect = crowd.last_reconnect_ns.load(Ordering::SeqCst);
    let storm = (first_close != u64::MAX && last_reconnect >= first_close)
        .then_some((first_close, last_reconnect));
    let phases = split_phases(&samples, event_ns, storm);
    for (name, latencies) in [
        "delivery",
        "delivery_before",
        "delivery_storm",
        "delivery_after",
    ]
    .into_iter()
    .zip(&phases)
    {
        if let Some(l) = latencies.summary() {
            report.latency.insert(name.into(), l);
        }
    }
    for (name, shared) in [("reconnect", &crowd.connect), ("away", &crowd.away)] {
        if let Some(l) = shared.summary() {
            report.latency.insert(name.into(), l);
        }
    }
    let secs = |ns: u64| ns as f64 / 1e9;
    let since_event = |at: u64| secs(at.saturating_sub(event_ns));
    let extra = &mut report.extra;
    extra.insert("crowd".into(), json!(crowd_size));
    extra.insert("settled_s".into(), json!(settled_ns.map(since_event)));
    if let Some((from, to)) = storm {
        extra.insert("first_close_s".into(), json!(since_event(from)));
        extra.insert("last_reconnect_s".into(), json!(since_event(to)));
        extra.insert("storm_s".into(), json!(secs(to - from)));
    }
    extra.insert(
        "steady_s".into(),
        json!(secs(event_ns.saturating_sub(steady_ns))),
    );
    extra.insert(
        "after_s".into(),
        json!(secs(end_ns.saturating_sub(settled_ns.unwrap_or(end_ns)))),
    );
    extra.insert(
        "moved_clients".into(),
        json!(crowd.moved.load(Ordering::SeqCst)),
    );
    extra.insert(
        "reconnects".into(),
        json!(crowd.reconnects.load(Ordering::SeqCst)),
    );
    extra.insert(
        "reconnect_errors".into(),
        json!(crowd.reconnect_errors.load(Ordering::SeqCst)),
    );
    extra.insert("closes_seen".into(), json!(*crowd.closes.lock()));
    extra.insert("node_clients_before".into(), json!(counts_before));
    extra.insert("node_clients_settled".into(), json!(counts_settled));
    let (closes, rejections) = server_counters(&mut watch).await;
    report.extra.insert("server_closes".into(), json!(closes));
    report
        .extra
        .insert("server_connect_rejections".into(), json!(rejections));
    report.errors += crowd.failures.load(Ordering::SeqCst);
    let crowd_errors: Vec<String> = crowd.errors.lock().drain(..).collect();
    for e in crowd_errors {
        report.sample_error(e);
    }
    report.errors += target
        .close_channels(&[crowd_channel, news_channel], common.connect_timeout())
        .await;
    Ok(report)
}

async fn parse_url(url: &str, option: &str) -> anyhow::Result<WsUrl> {
    WsUrl::parse(url)
        .await
        .with_context(|| format!("{option} {url}"))
}

/// Waits for the event file and returns the event's time as a
/// [`now_ns`] value.
async fn wait_for_event(path: &std::path::Path, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        // A file being written may be empty or partial for a moment.
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(epoch_ns) = text.trim().parse::<u64>()
        {
            let now_epoch_ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            return Ok(now_ns().saturating_sub(now_epoch_ns.saturating_sub(epoch_ns)));
        }
        ensure!(
            Instant::now() < deadline,
            "no event in {} within {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Latencies of the samples `(sent_ns, latency_ns)`: all, before the
/// event, during the storm, after it.
fn split_phases(
    samples: &[(u64, u64)],
    event_ns: u64,
    storm: Option<(u64, u64)>,
) -> [Latencies; 4] {
    let mut phases = [
        Latencies::new(),
        Latencies::new(),
        Latencies::new(),
        Latencies::new(),
    ];
    for &(sent_ns, latency) in samples {
        phases[0].record(latency);
        let phase = match storm {
            _ if sent_ns < event_ns => Some(1),
            Some((from, to)) if (from..=to).contains(&sent_ns) => Some(2),
            Some((_, to)) if sent_ns > to => Some(3),
            _ => None,
        };
        if let Some(phase) = phase {
            phases[phase].record(latency);
        }
    }
    phases
}

/// One keep-alive client per watched node.
fn watchers(nodes: &[WsUrl], timeout: Duration) -> Vec<HttpClient> {
    nodes
        .iter()
        .map(|node| HttpClient::new(node.addr, node.host.clone(), timeout).with_tls(node.tls))
        .collect()
}

/// Each node's own, live connection count (`thisNode` in its `GET
/// /cluster`), `None` for a node that does not answer.
async fn poll_counts(watch: &mut [HttpClient]) -> Vec<Option<u64>> {
    let mut counts = Vec::with_capacity(watch.len());
    for client in watch {
        let count = match client.request("GET", "/cluster", None).await {
            Ok(response) if response.status == 200 => own_connections(&response.body),
            _ => None,
        };
        counts.push(count);
    }
    counts
}

/// `connections` of the entry with `thisNode` in a `GET /cluster` body.
fn own_connections(body: &[u8]) -> Option<u64> {
    let cluster: serde_json::Value = serde_json::from_slice(body).ok()?;
    cluster["data"]
        .as_array()?
        .iter()
        .find(|node| node["thisNode"] == true)?["connections"]
        .as_u64()
}

/// Whether every node answered and holds the average within
/// `tolerance_pct` percent.
fn balanced(counts: &[Option<u64>], tolerance_pct: f64) -> bool {
    let Some(counts) = counts.iter().copied().collect::<Option<Vec<u64>>>() else {
        return false;
    };
    if counts.is_empty() {
        return false;
    }
    let average = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    let slack = average * tolerance_pct / 100.0;
    counts.iter().all(|&n| (n as f64 - average).abs() <= slack)
}

/// `wrs_client_closes_total` and `wrs_connect_rejections_total` by reason,
/// summed over the nodes that answer `GET /metrics`.
async fn server_counters(
    watch: &mut [HttpClient],
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut closes = BTreeMap::new();
    let mut rejections = BTreeMap::new();
    for client in watch {
        let Ok(response) = client.request("GET", "/metrics", None).await else {
            continue;
        };
        if response.status != 200 {
            continue;
        }
        let text = String::from_utf8_lossy(&response.body);
        for (name, sums) in [
            ("wrs_client_closes_total", &mut closes),
            ("wrs_connect_rejections_total", &mut rejections),
        ] {
            for (reason, n) in counter_by_reason(&text, name) {
                *sums.entry(reason).or_insert(0) += n;
            }
        }
    }
    (closes, rejections)
}

/// The samples of an OpenMetrics counter labelled only by `reason`.
fn counter_by_reason(text: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("{name}{{reason=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (reason, rest) = rest.split_once("\"}")?;
            let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((reason.to_owned(), value as u64))
        })
        .collect()
}

/// How a held connection ended.
enum Held {
    Stopped,
    /// Closed by the server with this code; `None` when the connection
    /// ended without a close frame.
    Closed(Option<u16>),
}

/// Holds a crowd connection, answering pings, until the server ends it
/// or the run stops.
async fn hold(conn: &mut WsConn, stop: &CancellationToken, crowd: &Crowd) -> Held {
    loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => return Held::Stopped,
            read = conn.fill() => read,
        };
        match read {
            Ok(0) | Err(_) => return Held::Closed(None),
            Ok(_) => {}
        }
        loop {
            match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Close(code))) => {
                    // Answer the close as a browser does; the server
                    // waits for it only briefly.
                    conn.tx.close(code.unwrap_or(1000));
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.flush()).await;
                    return Held::Closed(code);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    crowd.fail(format!("crowd client: {e}"));
                    return Held::Closed(None);
                }
            }
        }
        if conn.flush().await.is_err() {
            return Held::Closed(None);
        }
    }
}

/// The back-off before reconnect attempt `failures + 1`: none after a
/// 1012 (`failures == 0`), else 250 ms × 2^failures up to 30 s; plus the
/// jitter.
fn reconnect_delay(failures: u32, jitter_ms: u64, rng: &mut FastRng) -> Duration {
    let backoff = if failures == 0 {
        0
    } else {
        BACKOFF_BASE_MS
            .saturating_mul(1u64 << failures.min(16))
            .min(BACKOFF_MAX_MS)
    };
    let jitter = if jitter_ms == 0 {
        0
    } else {
        rng.next_u64() % (jitter_ms + 1)
    };
    Duration::from_millis(backoff + jitter)
}

/// One client of the crowd: holds its connection and reconnects whenever
/// the server closes it with a code that says to.
async fn member(mut conn: WsConn, plan: Plan, crowd: Arc<Crowd>, stop: CancellationToken) {
    let mut rng = FastRng::seeded();
    let mut connect_latency = crowd.connect.recorder();
    let mut away = crowd.away.recorder();
    let mut moved = false;
    loop {
        let code = match hold(&mut conn, &stop, &crowd).await {
            Held::Stopped => return,
            Held::Closed(code) => code,
        };
        let closed_at = Instant::now();
        crowd.connected.fetch_sub(1, Ordering::SeqCst);
        crowd.first_close_ns.fetch_min(now_ns(), Ordering::SeqCst);
        let label = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
        *crowd.closes.lock().entry(label).or_insert(0) += 1;
        let mut failures = match code {
            Some(1012) => 0,
            Some(c) if !MOVE_CODES.contains(&c) => {
                crowd.fail(format!(
                    "crowd client closed with {c}, not a code to reconnect on"
                ));
                return;
            }
            _ => 1,
        };
        drop(conn);
        conn = loop {
            let delay = reconnect_delay(failures, plan.jitter_ms, &mut rng);
            if stop
                .run_until_cancelled(tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return;
            }
            let started = Instant::now();
            match WsConn::connect(&plan.url, None, plan.timeout, 1024).await {
                Ok(conn) => {
                    connect_latency.record(started.elapsed().as_nanos() as u64);
                    away.record(closed_at.elapsed().as_nanos() as u64);
                    connect_latency.flush();
                    away.flush();
                    break conn;
                }
                Err(e) => {
                    crowd.reconnect_errors.fetch_add(1, Ordering::SeqCst);
                    crowd.sample_error(format!("reconnect: {e}"));
                    failures += 1;
                }
            }
        };
        crowd.connected.fetch_add(1, Ordering::SeqCst);
        crowd.reconnects.fetch_add(1, Ordering::SeqCst);
        crowd
            .last_reconnect_ns
            .fetch_max(now_ns(), Ordering::SeqCst);
        if !moved {
            moved = true;
            crowd.moved.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// What a staying subscriber saw.
struct Subscriber {
    tracker: SeqTracker,
    /// `(sent_ns, latency_ns)` of every measured message, first arrival.
    samples: Vec<(u64, u64)>,
    error: Option<String>,
}

async fn subscribe(mut conn: WsConn, news: Arc<News>, stop: CancellationToken) -> Subscriber {
    let mut out = Subscriber {
        tracker: SeqTracker::default(),
        samples: Vec::new(),
        error: None,
    };
    let mut warmed = false;
    'read: loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = conn.fill() => read,
        };
        match read {
            Ok(0) => {
                out.error = Some("subscriber: connection closed by the server".into());
                break;
            }
            Err(e) => {
                out.error = Some(format!("subscriber: read failed: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let now = now_ns();
        let mut new = 0;
        loop {
            let payload = match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Text(p) | Frame::Binary(p))) => p,
                Ok(Some(Frame::Close(code))) => {
                    out.error = Some(format!("subscriber: closed by the server with {code:?}"));
                    break 'read;
                }
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(format!("subscriber: {e}"));
                    break 'read;
                }
            };
            let Some(stamp) = Stamp::find(payload) else {
                continue;
            };
            match stamp.kind {
                Kind::Warmup => {
                    if !warmed {
                        warmed = true;
                        news.ready.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Kind::Measure => {
                    if out.tracker.insert(stamp.seq) == Arrival::New {
                        out.samples
                            .push((stamp.sent_ns, now.saturating_sub(stamp.sent_ns)));
                        new += 1;
                    }
                }
            }
        }
        if new > 0 {
            news.delivered.fetch_add(new, Ordering::SeqCst);
        }
        if !conn.tx.is_empty() && conn.flush().await.is_err() {
            out.error = Some("subscriber: write failed".into());
            break;
        }
    }
    out
}

/// Sends warm-up messages until every subscriber has one, then measured
/// messages at `rate` a second until stopped, answering pings meanwhile.
/// Returns its error, if any.
async fn publish(
    mut conn: WsConn,
    news: Arc<News>,
    size: usize,
    rate: f64,
    stop: CancellationToken,
) -> Option<String> {
    let mut composer = Composer::plain(size);
    let mut warm_seq = 0;
    let mut seq = 0u64;
    let mut started: Option<Instant> = None;
    let mut next = Instant::now();
    loop {
        let due = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            () = tokio::time::sleep_until(next.into()) => true,
            read = conn.fill() => match read {
                Ok(0) => return Some("publisher: connection closed by the server".into()),
                Err(e) => return Some(format!("publisher: read failed: {e}")),
                Ok(_) => false,
            },
        };
        loop {
            match conn.rx.next_frame(&mut conn.tx) {
                Ok(Some(Frame::Close(code))) => {
                    return Some(format!("publisher: closed by the server with {code:?}"));
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Some(format!("publisher: {e}")),
            }
        }
        if due {
            let stamp = if news.measuring.load(Ordering::SeqCst) {
                let from = *started.get_or_insert_with(Instant::now);
                seq += 1;
                next = from + Duration::from_secs_f64(seq as f64 / rate);
                Stamp {
                    kind: Kind::Measure,
                    source: 0,
                    seq: seq - 1,
                    sent_ns: now_ns(),
                }
            } else {
                warm_seq += 1;
                next = Instant::now() + WARMUP_EVERY;
                Stamp {
                    kind: Kind::Warmup,
                    source: 0,
                    seq: warm_seq - 1,
                    sent_ns: now_ns(),
                }
            };
            conn.tx.text(composer.compose(&stamp));
        }
        if !conn.tx.is_empty() {
            match tokio::time::timeout(WRITE_TIMEOUT, conn.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Some(format!("publisher: write failed: {e}")),
                Err(_) => return Some("publisher: write blocked for 10 s".into()),
            }
            if due && news.measuring.load(Ordering::SeqCst) {
                news.sent.store(seq, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_nodes_live_count_from_cluster() {
        let body = br#"{"message":"2 node(s)","data":[
            {"id":"a","connections":10,"thisNode":false},
            {"id":"b","connections":7,"thisNode":true}]}"#;
        assert_eq!(own_connections(body), Some(7));
        assert_eq!(own_connections(b"{}"), None);
    }

    #[test]
    fn balanced_needs_every_node_near_the_average() {
        assert!(balanced(&[Some(1000), Some(950), Some(1050)], 10.0));
        assert!(!balanced(&[Some(1100), Some(1100), Some(800)], 10.0));
        assert!(!balanced(&[Some(1000), None], 10.0));
        assert!(!balanced(&[], 10.0));
    }

    #[test]
    fn sums_counters_by_reason() {
        let text = "# TYPE wrs_client_closes_total counter\n\
                    wrs_client_closes_total{reason=\"rebalancing\"} 512\n\
                    wrs_client_closes_total{reason=\"draining\"} 3\n\
                    wrs_client_closes_total_created 1\n\
                    wrs_connect_rejections_total{reason=\"draining\"} 2\n";
        assert_eq!(
            counter_by_reason(text, "wrs_client_closes_total"),
            vec![("rebalancing".into(), 512), ("draining".into(), 3)]
        );
        assert_eq!(
            counter_by_reason(text, "wrs_connect_rejections_total"),
            vec![("draining".into(), 2)]
        );
    }

    #[test]
    fn backs_off_except_after_1012() {
        let mut rng = FastRng::new(3);
        for _ in 0..100 {
            assert!(reconnect_delay(0, 1000, &mut rng) <= Duration::from_millis(1000));
            let second = reconnect_delay(1, 1000, &mut rng);
            assert!((500..=1500).contains(&(second.as_millis() as u64)));
        }
        assert_eq!(
            reconnect_delay(20, 0, &mut rng),
            Duration::from_millis(BACKOFF_MAX_MS)
        );
    }

    #[test]
    fn splits_latencies_by_phase() {
        // Event at 100, storm from 150 to 200.
        let samples = [(50, 1_000), (120, 2_000), (160, 3_000), (250, 4_000)];
        let [all, before, storm, after] = split_phases(&samples, 100, Some((150, 200)));
        assert_eq!(all.summary().unwrap().count, 4);
        assert_eq!(before.summary().unwrap().count, 1);
        assert_eq!(storm.summary().unwrap().count, 1);
        assert_eq!(after.summary().unwrap().count, 1);
    }
}
