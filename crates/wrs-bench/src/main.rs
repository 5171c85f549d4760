//! `wrs-bench`: the load generator for WRS and, through URL templates,
//! other WebSocket relays.
//!
//! Every scenario is bounded in time, talks only to the relay it is given
//! (loopback in our runs), and ends with a report: a table for people or
//! one JSON object (`--json`). `summarize` turns a directory of JSON
//! reports into the Markdown tables of `docs/benchmarks.md`.

mod harness;
mod http;
mod payload;
mod procfs;
mod relay;
mod report;
mod rng;
mod scenario;
mod sse;
mod summary;
mod target;
mod track;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use harness::Common;
use scenario::{churn, echo, fanout, idle, pushpull, storm};

#[derive(Parser, Debug)]
#[command(
    name = "wrs-bench",
    version,
    about = "Load generator for WRS and other WebSocket relays"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// P publishers -> S subscribers (pub-sub); works with URL templates.
    /// Subscribers over WebSocket or SSE, publishers over WebSocket or
    /// HTTP POST.
    Fanout(fanout::FanoutArgs),
    /// P producers -> W workers (push-pull or fan-in-out): exactly once and
    /// fairness.
    Pushpull(pushpull::PushPullArgs),
    /// C clients on echo channels, K messages in flight each.
    Echo(echo::EchoArgs),
    /// C requester/responder pairs (req-repl or fan-in-out), K requests in
    /// flight each.
    Reqrep(echo::ReqRepArgs),
    /// N idle connections held for the duration; server RSS per connection.
    Idle(idle::IdleArgs),
    /// REST create/delete req/s, and create -> connect -> send -> delete
    /// cycles.
    Churn(churn::ChurnArgs),
    /// A crowd of clients that reconnect (with jitter, through a balancer)
    /// while a node is added or drained: time to settle, reconnect
    /// latency and errors, and the message latency of clients that stay.
    Storm(storm::StormArgs),
    /// A copy-only broadcast relay (the floor under real relays' figures):
    /// serves until killed.
    Relay(relay::RelayArgs),
    /// Reads JSON reports from a directory and prints Markdown tables with
    /// medians per case and target and the ratios WRS / peer.
    Summarize {
        /// Directory of `*.json` reports.
        dir: PathBuf,
        /// Render the cluster table (per-process CPU, NATS messages)
        /// instead of the suite's tables.
        #[arg(long, conflicts_with_all = ["admission", "elastic", "wire", "http"])]
        cluster: bool,
        /// Render the admission table (`bench/admission.sh`): create +
        /// delete pairs and connects per second, CPU per operation.
        #[arg(long, conflicts_with_all = ["elastic", "wire", "http"])]
        admission: bool,
        /// Render the elasticity tables (`bench/elastic.sh`): a node
        /// added, a node drained, the per-client rate limiter's cost.
        #[arg(long, conflicts_with_all = ["wire", "http"])]
        elastic: bool,
        /// With `--elastic`: only this table ("Not run." without reports).
        #[arg(long, value_enum, requires = "elastic")]
        only: Option<summary::ElasticTable>,
        /// Render one table of `bench/wire.sh` (compression, TLS, the
        /// fan-out next to the peers, idle memory) with its targets.
        #[arg(long, value_enum, value_name = "TABLE", conflicts_with = "http")]
        wire: Option<summary::WireTable>,
        /// Render one table of `bench/http.sh` (HTTP publish, SSE, the
        /// cost of history) with its targets.
        #[arg(long, value_enum, value_name = "TABLE")]
        http: Option<summary::HttpTable>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Summarize {
        dir,
        cluster,
        admission,
        elastic,
        only,
        wire,
        http,
    } = &cli.command
    {
        let summary = if let Some(table) = wire {
            summary::summarize_wire(dir, *table)
        } else if let Some(table) = http {
            summary::summarize_http(dir, *table)
        } else if *cluster {
            summary::summarize_cluster(dir)
        } else if *admission {
            summary::summarize_admission(dir)
        } else if *elastic {
            summary::summarize_elastic(dir, *only)
        } else {
            summary::summarize(dir)
        };
        return match summary {
            Ok(markdown) => {
                print!("{markdown}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("wrs-bench: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Relay(args) = &cli.command {
        let served = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(relay::serve(args)));
        if let Err(error) = served {
            eprintln!("wrs-bench relay: {error:#}");
        }
        return ExitCode::FAILURE;
    }
    match cli.common.client_options() {
        Ok(options) => ws::configure(options),
        Err(error) => {
            eprintln!("wrs-bench: {error:#}");
            return ExitCode::FAILURE;
        }
    }
    if let Err(error) = procfs::raise_nofile_limit() {
        eprintln!("wrs-bench: cannot raise the open-file limit: {error}");
    }
    let runtime = if cli.common.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.common.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wrs-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let common = &cli.common;
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Fanout(args) => fanout::run(common, args).await,
            Command::Pushpull(args) => pushpull::run(common, args).await,
            Command::Echo(args) => echo::run_echo(common, args).await,
            Command::Reqrep(args) => echo::run_reqrep(common, args).await,
            Command::Idle(args) => idle::run(common, args).await,
            Command::Churn(args) => churn::run(common, args).await,
            Command::Storm(args) => storm::run(common, args).await,
            Command::Summarize { .. } | Command::Relay(_) => unreachable!("handled above"),
        }
    });
    // Connections still open are closed by the runtime's shutdown.
    runtime.shutdown_background();
    match result {
        Ok(report) => {
            if common.json {
                match serde_json::to_string(&report) {
                    Ok(json) => println!("{json}"),
                    Err(error) => {
                        eprintln!("wrs-bench: cannot encode the report: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("wrs-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
