//! WRS — WebSocket Relay Service.
//!
//! A library plus the thin `wrs` binary. [`start`] binds the configured
//! port and serves the REST API and WebSocket connections until the
//! returned [`Server`] is shut down:
//!
//! ```no_run
//! # async fn demo() -> Result<(), wrs::StartError> {
//! let server = wrs::start(wrs::Config::for_tests()).await?;
//! println!("listening on {}", server.local_addr());
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod cluster;
pub mod config;
pub mod healthcheck;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod relay;
pub mod serve;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use http::AppState;
use relay::Relay;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the readme at {path}: {source}")]
    Readme {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cannot start the cluster node: {0}")]
    Coordinator(#[from] relay::coordinator::CoordinatorError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `address`; returns the listener and the address it got.
async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bound = match TcpListener::bind(address).await {
        Ok(listener) => listener.local_addr().map(|local| (listener, local)),
        Err(error) => Err(error),
    };
    bound.map_err(|source| StartError::Bind { address, source })
}

/// A running server. Dropping it does not stop it; call
/// [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    agent_addr: Option<SocketAddr>,
    relay: Arc<Relay>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Binds the configured address and starts serving.
///
/// # Errors
///
/// [`StartError`] if the readme cannot be read or the address cannot be
/// bound.
pub async fn start(mut config: Config) -> Result<Server, StartError> {
    let acceptor = match (config.ssl, &config.ssl_cert_path, &config.ssl_key_path) {
        (true, Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    // Join the cluster before taking the port: a node that cannot reach
    // NATS refuses connections instead of accepting and dropping them.
    let settings = config.relay_settings();
    let (relay, cluster) = match config.cluster_settings(&settings.node_id) {
        None => (Relay::standalone(settings), None),
        Some(cluster_settings) => {
            let metrics = Arc::new(metrics::Metrics::new(true));
            let cluster =
                cluster::NatsCoordinator::connect(&cluster_settings, Arc::clone(&metrics)).await?;
            let coordinator: Arc<dyn relay::coordinator::Coordinator> = cluster.clone();
            (Relay::new(settings, coordinator, metrics), Some(cluster))
        }
    };
    relay.start().await?;
    let api = SocketAddr::new(config.bind_address, config.api_port);
    let agent = config
        .agent_port
        .map(|port| SocketAddr::new(config.bind_address, port));
    let bound = match bind(api).await {
        Ok(api) => match agent {
            None => Ok((api, None)),
            Some(agent) => bind(agent).await.map(|agent| (api, Some(agent))),
        },
        Err(error) => Err(error),
    };
    let ((listener, local_addr), agent) = match bound {
        Ok(bound) => bound,
        Err(error) => {
            // Leave the cluster again before giving up.
            relay
                .stop(
                    tokio::time::Instant::now(),
                    std::time::Duration::from_secs(2),
                )
                .await;
            return Err(error);
        }
    };
    // The agent answers until the server has stopped: `drain` while it drains.
    let agent_stop = CancellationToken::new();
    let agent_addr = agent.as_ref().map(|(_, local)| *local);
    if let Some((listener, _)) = agent {
        let (relay, stop) = (Arc::clone(&relay), agent_stop.clone());
        tokio::spawn(agent::serve(listener, relay, stop));
    }
    // With port 0 the system picked one: links and metadata show the real one.
    config.api_port = local_addr.port();
    if let Some(cluster) = &cluster {
        cluster.set_address(format!("{}:{}", config.domain, config.public_port()));
    }
    let readme = http::readme::render(&config).map_err(|source| StartError::Readme {
        path: config.readme_path.clone().unwrap_or_default(),
        source,
    })?;
    let shutdown_timeout = config.shutdown_timeout();
    let header_timeout = config.header_timeout();
    let app = http::router(AppState {
        relay: Arc::clone(&relay),
        config: Arc::new(config),
        readme: readme.into(),
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(
        listener,
        acceptor,
        app,
        Arc::clone(&relay),
        [stop.clone(), agent_stop],
        shutdown_timeout,
        header_timeout,
    ));
    info!(address = %local_addr, node = %relay.settings().node_id, "listening");
    Ok(Server {
        local_addr,
        agent_addr,
        relay,
        stop,
        task,
    })
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the HAProxy agent-check answers (`WRS_AGENT_PORT`).
    pub fn agent_addr(&self) -> Option<SocketAddr> {
        self.agent_addr
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Gracefully stops: readiness turns 503, connections are still taken
    /// for `WRS_DRAIN_DELAY_MS`, then clients are closed with 1012 at
    /// `WRS_DRAIN_RATE`; those left at `WRS_SHUTDOWN_TIMEOUT_MS` get 1001;
    /// then HTTP stops.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            warn!(%error, "server task ended abnormally");
        }
    }
}

async fn run(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    relay: Arc<Relay>,
    [stop, agent_stop]: [CancellationToken; 2],
    shutdown_timeout: std::time::Duration,
    header_timeout: std::time::Duration,
) {
    // Stops the agent whichever way this ends.
    let _agent = agent_stop.drop_guard();
    let http_stop = CancellationToken::new();
    let mut http = match acceptor {
        None => tokio::spawn(serve::serve(
            listen::PlainListener(listener),
            app,
            header_timeout,
            http_stop.clone(),
        )),
        Some(acceptor) => match tls::TlsListener::new(listener, acceptor) {
            Ok(listener) => tokio::spawn(serve::serve(
                listener,
                app,
                header_timeout,
                http_stop.clone(),
            )),
            Err(error) => {
                warn!(%error, "cannot start the TLS listener");
                return;
            }
        },
    };
    tokio::select! {
        () = stop.cancelled() => {}
                result = &mut http => {
            warn!(?result, "HTTP server stopped by itself");
            return;
        }
    }
    info!("shutting down");
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    // HTTP keeps answering while clients close, so /readyz reports 503 and
    // connects are taken for the drain delay.
    let drained = relay.stop(deadline, ws::CLOSE_TIMEOUT).await;
    http_stop.cancel();
    let http_done = tokio::time::timeout_at(deadline, &mut http).await.is_ok();
    if !http_done {
        http.abort();
    }
    if drained && http_done {
        info!("stopped");
    } else {
        warn!("stopped at the shutdown timeout; some connections were cut");
    }
}
