//! The `wrs` binary: read the configuration, start logging, serve until
//! SIGTERM or SIGINT, then stop gracefully.

use std::process::ExitCode;

use wrs::config::ConfigError;

/// mimalloc instead of glibc's allocator: connection set-up and the
/// per-message buffers allocate and free from many threads, where glibc's
/// arenas spent about a quarter of the CPU of a connect burst in
/// `malloc_consolidate` and friends (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match wrs::Config::load() {
        Ok(config) => config,
        Err(ConfigError::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ConfigError::Invalid(reason)) => {
            eprintln!("wrs: invalid configuration: {reason}");
            return ExitCode::from(2);
        }
    };
    if let Some(wrs::config::Command::Healthcheck { path }) = &config.command {
        return healthcheck(&config, path);
    }
    wrs::telemetry::init(&config);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wrs: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Handlers first: a signal that arrives while the server starts
        // must stop it gracefully, not kill the process.
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("wrs: cannot install signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let server = match wrs::start(config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                eprintln!("wrs: {error}");
                return ExitCode::FAILURE;
            }
        };
        signals.wait().await;
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Every client is a socket: raise the soft open-file limit to the hard
/// limit (often 1 024 soft against a far higher hard limit), so the
/// deployment does not have to.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}

/// `wrs healthcheck`: one line on failure, exit 0 or 1.
fn healthcheck(config: &wrs::Config, path: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wrs healthcheck: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wrs::healthcheck::run(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("wrs healthcheck: unhealthy: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened to from the moment of install.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
        }
    }
}
