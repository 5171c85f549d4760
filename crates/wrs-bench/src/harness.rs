//! What every scenario shares: the common options, opening many
//! connections with bounded concurrency, the measured window (wall time,
//! server and own CPU), and the progress bar.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;

use crate::procfs::{self, CpuMeter};
use crate::report::{Report, si};
use crate::target::TargetArgs;
use crate::ws::{WsConn, WsUrl};

/// Options every scenario takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Seconds of measured load (or of holding, for `idle`).
    #[arg(long, global = true, default_value_t = 10.0)]
    pub duration: f64,
    /// Longest wait, in seconds, for messages still in flight after the
    /// senders stop; whatever has not arrived then is lost.
    #[arg(long, global = true, default_value_t = 5.0)]
    pub drain: f64,
    /// Longest wait, in seconds, for every receiver to prove it is
    /// subscribed before the measurement starts.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub warmup_timeout: f64,
    /// Timeout of one connect (TCP + handshake) or REST call, in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Connections opened at once while setting up.
    #[arg(long, global = true, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// PID of the server process, for its CPU time and memory.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Another process of the system under test, as NAME=PID (a cluster
    /// node, the NATS server); repeatable. Its CPU time in the window is
    /// shown on its own and added to the server CPU.
    #[arg(long = "process", global = true, value_parser = parse_process)]
    pub processes: Vec<(String, u32)>,
    /// Monitoring URL of a NATS server (`nats-server -m PORT`): the
    /// messages it received and sent in the window are reported.
    #[arg(long, global = true)]
    pub nats_monitor: Option<String>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Name of this case, copied into the report (used by bench/run.sh).
    #[arg(long, global = true)]
    pub case: Option<String>,
    /// Runtime worker threads; 1 runs everything on one thread, which is
    /// the cheapest per message.
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
    /// Offer permessage-deflate (RFC 7692) on every WebSocket connection
    /// and inflate the compressed messages received (in this process).
    #[arg(long, global = true)]
    pub deflate: bool,
    /// PEM certificate to trust for wss:// and https:// URLs; without it
    /// any server certificate is accepted (loopback benchmarks only).
    #[arg(long, global = true, value_name = "PEM")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Common {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.0))
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain.max(0.0))
    }
    pub fn warmup_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_timeout.max(0.0))
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout.max(0.1))
    }

    /// A report with the common fields filled in.
    pub fn report(&self, scenario: &str, target: &str) -> Report {
        let mut report = Report {
            scenario: scenario.into(),
            case: self.case.clone(),
            target: target.into(),
            ..Report::default()
        };
        if self.deflate {
            report.params.insert("deflate".into(), true.into());
        }
        report
    }

    /// The connection options of this run, for [`crate::ws::configure`].
    ///
    /// # Errors
    ///
    /// The `--tls-ca` file cannot be read or holds no certificate.
    pub fn client_options(&self) -> anyhow::Result<crate::ws::ClientOptions> {
        Ok(crate::ws::ClientOptions {
            deflate: self.deflate,
            tls: Some(crate::ws::tls_config(self.tls_ca.as_deref())?),
        })
    }

    pub fn progress_enabled(&self) -> bool {
        !self.quiet && !self.json
    }
}

/// One connection to open.
#[derive(Clone, Debug)]
pub struct Dial {
    pub url: WsUrl,
    pub source: Option<IpAddr>,
}

/// Source address number `index` of `count` spread over 127.0.0.2 and up,
/// or none when one address is enough.
pub fn source_address(index: usize, count: usize) -> Option<IpAddr> {
    (count > 1).then(|| {
        let n = 2 + (index % count) as u32;
        IpAddr::V4(Ipv4Addr::from(0x7F00_0000 | n))
    })
}

/// Opened connections in the order asked for (`None` where it failed),
/// the failures, and each connect's duration.
pub struct Opened<C = WsConn> {
    pub conns: Vec<Option<C>>,
    pub errors: Vec<String>,
    pub connect_times: Vec<Duration>,
}

/// Opens every WebSocket connection, at most `common.connect_concurrency`
/// at once, each bounded by the connect timeout.
pub async fn open_all(common: &Common, dials: Vec<Dial>, rx_capacity: usize, what: &str) -> Opened {
    open_all_with(common, dials, what, move |dial, timeout| async move {
        WsConn::connect(&dial.url, dial.source, timeout, rx_capacity).await
    })
    .await
}

/// Opens every connection with `connect` (given the dial and the connect
/// timeout, which it must keep), at most `common.connect_concurrency` at
/// once.
pub async fn open_all_with<C, E, F, Fut>(
    common: &Common,
    dials: Vec<Dial>,
    what: &str,
    connect: F,
) -> Opened<C>
where
    C: Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Fn(Dial, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<C, E>> + Send + 'static,
{
    let total = dials.len();
    let bar = bar(common, total as u64, &format!("connecting {what}"));
    let timeout = common.connect_timeout();
    let mut conns: Vec<Option<C>> = (0..total).map(|_| None).collect();
    let mut errors = Vec::new();
    let mut connect_times = Vec::with_capacity(total);
    let mut running = JoinSet::new();
    let mut queue = dials.into_iter().enumerate();
    loop {
        while running.len() < common.connect_concurrency.max(1) {
            let Some((i, dial)) = queue.next() else {
                break;
            };
            let connecting = connect(dial, timeout);
            running.spawn(async move {
                let started = Instant::now();
                let result = connecting.await;
                (i, result, started.elapsed())
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        bar.inc(1);
        match joined {
            Ok((i, Ok(conn), took)) => {
                conns[i] = Some(conn);
                connect_times.push(took);
            }
            Ok((_, Err(error), _)) => errors.push(error.to_string()),
            Err(error) => errors.push(format!("connect task failed: {error}")),
        }
    }
    bar.finish_and_clear();
    Opened {
        conns,
        errors,
        connect_times,
    }
}

/// Records connect failures in a report.
pub fn note_connects<C>(report: &mut Report, opened: &Opened<C>) {
    report.connections += opened.connect_times.len() as u64;
    report.connect_errors += opened.errors.len() as u64;
    for e in opened.errors.iter().take(3) {
        report.sample_error(format!("connect: {e}"));
    }
}

/// `NAME=PID`.
fn parse_process(value: &str) -> Result<(String, u32), String> {
    let (name, pid) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?}: expected NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{value:?}: {pid:?} is not a PID"))?;
    if name.is_empty() {
        return Err(format!("{value:?}: the name is empty"));
    }
    Ok((name.to_owned(), pid))
}

/// Message counters of a NATS server, from its monitoring `/varz`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct NatsCounts {
    in_msgs: u64,
    out_msgs: u64,
}

struct NatsMeter {
    client: crate::http::HttpClient,
    start: NatsCounts,
}

impl NatsMeter {
    async fn start(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let base = WsUrl::parse(url)
            .await
            .map_err(|e| anyhow::anyhow!("NATS monitor URL {url}: {e}"))?;
        let mut client = crate::http::HttpClient::new(base.addr, base.host, timeout);
        let start = varz(&mut client).await?;
        Ok(Self { client, start })
    }

    async fn elapsed(&mut self) -> anyhow::Result<NatsCounts> {
        let now = varz(&mut self.client).await?;
        Ok(NatsCounts {
            in_msgs: now.in_msgs.saturating_sub(self.start.in_msgs),
            out_msgs: now.out_msgs.saturating_sub(self.start.out_msgs),
        })
    }
}

async fn varz(client: &mut crate::http::HttpClient) -> anyhow::Result<NatsCounts> {
    let response = client
        .request("GET", "/varz", None)
        .await
        .map_err(|e| anyhow::anyhow!("NATS monitor GET /varz: {e}"))?;
    anyhow::ensure!(
        response.status == 200,
        "NATS monitor GET /varz answered {}",
        response.status
    );
    parse_varz(&response.body)
}

fn parse_varz(body: &[u8]) -> anyhow::Result<NatsCounts> {
    let varz: serde_json::Value = serde_json::from_slice(body)?;
    let field = |name: &str| {
        varz[name]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("NATS /varz has no {name}"))
    };
    Ok(NatsCounts {
        in_msgs: field("in_msgs")?,
        out_msgs: field("out_msgs")?,
    })
}

/// The measured window: wall time plus server and own CPU.
pub struct Window {
    started: Instant,
    server: Option<CpuMeter>,
    processes: Vec<(String, CpuMeter)>,
    nats: Option<tokio::sync::Mutex<NatsMeter>>,
    own_start: Duration,
}

impl Window {
    /// Starts the window now. A server PID that cannot be read is an
    /// error: numbers without it would be silently incomplete.
    ///
    /// # Errors
    ///
    /// `/proc/PID/stat` of the server or another process cannot be read,
    /// or the NATS monitor does not answer.
    pub async fn start(common: &Common) -> anyhow::Result<Self> {
        let server = common
            .server_pid
            .map(CpuMeter::start)
            .transpose()
            .map_err(|e| anyhow::anyhow!("cannot read the server's /proc/PID/stat: {e}"))?;
        let mut processes = Vec::with_capacity(common.processes.len());
        for (name, pid) in &common.processes {
            let meter = CpuMeter::start(*pid)
                .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}/stat of {name}: {e}"))?;
            processes.push((name.clone(), meter));
        }
        let nats = match &common.nats_monitor {
            Some(url) => Some(tokio::sync::Mutex::new(
                NatsMeter::start(url, common.connect_timeout()).await?,
            )),
            None => None,
        };
        Ok(Self {
            started: Instant::now(),
            server,
            processes,
            nats,
            own_start: procfs::own_cpu_time().unwrap_or_default(),
        })
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Ends the window at `end`, reading the CPU times now.
    pub async fn close(&self, end: Instant) -> Measured {
        let processes: Vec<(String, Option<f64>)> = self
            .processes
            .iter()
            .map(|(name, m)| (name.clone(), m.elapsed().ok().map(|d| d.as_secs_f64())))
            .collect();
        let own = self
            .server
            .and_then(|m| m.elapsed().ok())
            .map(|d| d.as_secs_f64());
        // The server is every process measured; one that cannot be read
        // any more (it died) leaves the sum unknown.
        let server_cpu_s = if self.server.is_none() && processes.is_empty() {
            None
        } else {
            let parts = own
                .into_iter()
                .chain(processes.iter().filter_map(|(_, s)| *s));
            let complete = (self.server.is_none() || own.is_some())
                && processes.iter().all(|(_, s)| s.is_some());
            complete.then(|| parts.sum())
        };
        let nats = match &self.nats {
            Some(meter) => meter.lock().await.elapsed().await.ok(),
            None => None,
        };
        let bench_cpu_s = procfs::own_cpu_time()
            .unwrap_or_default()
            .saturating_sub(self.own_start)
            .as_secs_f64();
        Measured {
            window_s: end.saturating_duration_since(self.started).as_secs_f64(),
            server_cpu_s,
            bench_cpu_s,
            processes,
            nats,
        }
    }
}

/// A closed window.
#[derive(Clone, Debug)]
pub struct Measured {
    pub window_s: f64,
    pub server_cpu_s: Option<f64>,
    pub bench_cpu_s: f64,
    /// CPU seconds of each `--process`, `None` when it could not be read.
    processes: Vec<(String, Option<f64>)>,
    nats: Option<NatsCounts>,
}

impl Measured {
    /// Fills the report's rates and CPU figures; call once `delivered` is
    /// final.
    pub fn apply(&self, report: &mut Report) {
        report.finish(self.window_s, self.server_cpu_s, self.bench_cpu_s);
        if !self.processes.is_empty() {
            let mut cpu = serde_json::Map::new();
            let mut per = serde_json::Map::new();
            for (name, seconds) in &self.processes {
                cpu.insert(name.clone(), serde_json::json!(seconds));
                let ns = seconds
                    .filter(|_| report.delivered > 0)
                    .map(|s| (s * 1e9 / report.delivered as f64).round());
                per.insert(name.clone(), serde_json::json!(ns));
            }
            report.extra.insert("process_cpu_s".into(), cpu.into());
            report
                .extra
                .insert("process_cpu_ns_per_delivery".into(), per.into());
        }
        if let Some(nats) = self.nats {
            report
                .extra
                .insert("nats_in_msgs".into(), nats.in_msgs.into());
            report
                .extra
                .insert("nats_out_msgs".into(), nats.out_msgs.into());
        }
    }
}

/// A progress bar on stderr, hidden when disabled or not a terminal.
pub fn bar(common: &Common, len: u64, message: &str) -> ProgressBar {
    if !common.progress_enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// Shows the measured window filling up, with the running delivery rate,
/// until dropped.
pub struct RunProgress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl RunProgress {
    pub fn start(common: &Common, counter: Arc<AtomicU64>) -> Self {
        let total_ms = (common.duration * 1000.0) as u64;
        let bar = bar(common, total_ms.max(1), "running");
        bar.set_style(
            ProgressStyle::with_template("{msg:>24} [{bar:30}] {elapsed}/{duration}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            let started = Instant::now();
            let mut last = (started, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let now = Instant::now();
                let count = counter.load(Ordering::Relaxed);
                let rate = (count - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, count);
                shown.set_position(now.duration_since(started).as_millis() as u64);
                shown.set_message(format!("{}/s", si(rate)));
            }
        });
        Self { bar, ticker }
    }
}

impl Drop for RunProgress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Waits until `done()` holds, checking every millisecond, at most until
/// `deadline`. Returns whether it held.
pub async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_processes() {
        assert_eq!(parse_process("nats=42"), Ok(("nats".into(), 42)));
        assert_eq!(parse_process("wrs-b=7"), Ok(("wrs-b".into(), 7)));
        assert!(parse_process("42").is_err());
        assert!(parse_process("=42").is_err());
        assert!(parse_process("nats=x").is_err());
    }

    #[test]
    fn reads_message_counters_from_varz() {
        let body = br#"{"server_id":"N","in_msgs":120,"out_msgs":345,"in_bytes":1}"#;
        assert_eq!(
            parse_varz(body).unwrap(),
            NatsCounts {
                in_msgs: 120,
                out_msgs: 345
            }
        );
        assert!(parse_varz(br#"{"in_msgs":1}"#).is_err());
        assert!(parse_varz(b"not json").is_err());
    }

    #[test]
    fn spreads_source_addresses_over_loopback() {
        assert_eq!(source_address(5, 1), None);
        assert_eq!(source_address(0, 3), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_address(4, 3), Some("127.0.0.3".parse().unwrap()));
    }
}
