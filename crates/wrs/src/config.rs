//! The configuration: one struct, read once from `WRS_*` environment
//! variables (command-line flags override them), validated up front.
//! Nothing else in the service reads the environment.

pub mod access;

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};

pub use access::{AuthPolicy, CorsOrigins};

use crate::relay::client::QueueLimits;
use crate::relay::{
    ClientRatePolicy, DrainSettings, RebalanceSettings, RelaySettings, SlowConsumerPolicy,
};

/// Longest server frame header; a client's outbox must fit one largest
/// message plus this.
const FRAME_HEADER_MAX: usize = 10;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// WRS — WebSocket Relay Service: relays messages between plain browser
/// WebSocket clients by channel pattern (echo, pub-sub, push-pull,
/// req-repl, fan-in-out).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "wrs",
    version,
    about = "WRS — WebSocket Relay Service: relays messages between browser WebSocket clients by channel pattern.",
    long_about = "WRS — WebSocket Relay Service.\n\nCreate a channel with `POST /channels {\"pattern\":\"pub-sub\"}`, hand its id and token to your clients, and every client that connects to `ws://HOST:PORT/channels/ID/connect?token=TOKEN` exchanges messages by the channel's pattern.\n\nEvery setting comes from the environment variable shown with it; a command-line flag overrides the variable. Logs go to standard output.",
    after_help = "Documentation: README.md, and GET / on a running server."
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Port for the REST API and WebSocket connections (0 = pick a free port).
    #[arg(
        short = 'p',
        long = "port",
        env = "WRS_API_PORT",
        default_value_t = 8080
    )]
    pub api_port: u16,

    /// Address to listen on.
    #[arg(long, env = "WRS_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,

    /// Port clients see, when a proxy sits in front [default: the API port].
    #[arg(long, env = "WRS_PUBLIC_API_PORT")]
    pub public_api_port: Option<u16>,

    /// Host name clients use to reach the service (shown in links and metadata).
    #[arg(long, env = "WRS_DOMAIN", default_value = "127.0.0.1")]
    pub domain: String,

    /// Length of generated channel tokens, in characters (8-256).
    #[arg(long, env = "WRS_TOKEN_LENGTH", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(8..=256))]
    pub token_length: u16,

    /// Random bytes in a channel id, each shown as two hex digits (2-16; 4 gives ids like D679-05F5).
    #[arg(long, env = "WRS_ID_LENGTH", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(2..=16))]
    pub id_length: u8,

    /// Largest message a client may send, in bytes; bigger ones close the client with 1009 (1 B - 64 MiB).
    #[arg(long, env = "WRS_MAX_MESSAGE_BYTES", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u32).range(1..=64 * 1024 * 1024))]
    pub max_message_bytes: u32,

    /// Most channels; creating more answers 429. In a cluster every node holds every channel,
    /// so this limits the cluster's channels, and the smallest limit of the live nodes applies.
    #[arg(long, env = "WRS_MAX_CHANNELS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_channels: u32,

    /// Most messages waiting for one client before the slow-consumer policy applies
    /// (a waiting message costs 32 bytes here; its payload is shared).
    #[arg(long, env = "WRS_CLIENT_QUEUE_MESSAGES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub client_queue_messages: u32,

    /// Most bytes waiting for one client before the slow-consumer policy applies
    /// (at least WRS_MAX_MESSAGE_BYTES + 10).
    #[arg(long, env = "WRS_CLIENT_QUEUE_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(11..=1024 * 1024 * 1024))]
    pub client_queue_bytes: u32,

    /// Offer permessage-deflate (RFC 7692, without context takeover): on or off. A broadcast is
    /// compressed once for all receivers that negotiated it; others get it plain.
    #[arg(long, env = "WRS_COMPRESSION", default_value = "off", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub compression: bool,

    /// With WRS_COMPRESSION=on, messages of at least this many bytes are compressed; smaller
    /// ones go out plain (0-67108864).
    #[arg(long, env = "WRS_COMPRESSION_MIN_BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(0..=64 * 1024 * 1024))]
    pub compression_min_bytes: u32,

    /// What to do with a client whose queue is full: close it with 1008, or drop the message for it.
    #[arg(long, env = "WRS_SLOW_CONSUMER", value_enum, default_value_t = SlowConsumerPolicy::Close)]
    pub slow_consumer: SlowConsumerPolicy,

    /// Interval between keepalive comments on each Server-Sent Events stream, in ms (100-3600000).
    #[arg(long, env = "WRS_SSE_KEEPALIVE_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub sse_keepalive_ms: u64,

    /// Interval between pings to each client, in ms; a client silent for two intervals is disconnected (100-3600000).
    #[arg(long, env = "WRS_PING_INTERVAL_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub ping_interval_ms: u64,

    /// Most connections this node holds; beyond it connects get 503 (1013 for browsers), and
    /// readiness is 503 from 90 % until below 80 % again [default: the open-file limit minus
    /// 100 kept for the listener, NATS and HTTP requests].
    #[arg(long, env = "WRS_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: Option<u32>,

    /// Most new connections a second; faster connects get 503 with Retry-After (1013 for
    /// browsers) [default: no limit].
    #[arg(long, env = "WRS_CONNECT_RATE",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub connect_rate: Option<u32>,

    /// Connects that may arrive at once above `WRS_CONNECT_RATE` [default: one second's worth].
    #[arg(long, env = "WRS_CONNECT_BURST", requires = "connect_rate",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub connect_burst: Option<u32>,

    /// Per-client messages a second; beyond it WRS_CLIENT_RATE_POLICY applies [default: no limit].
    #[arg(long, env = "WRS_CLIENT_RATE",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub client_rate: Option<u32>,

    /// Messages a client may send at once above WRS_CLIENT_RATE [default: one second's worth].
    #[arg(long, env = "WRS_CLIENT_BURST", requires = "client_rate",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub client_burst: Option<u32>,

    /// A client over WRS_CLIENT_RATE: throttle (stop reading its socket until the bucket refills,
    /// nothing is dropped) or close (1008 "rate limit exceeded").
    #[arg(long, env = "WRS_CLIENT_RATE_POLICY", value_enum, default_value_t = ClientRatePolicy::Throttle)]
    pub client_rate_policy: ClientRatePolicy,

    /// Close each connection with 1012 after this age, in ms, jittered ±10 % (1000-2592000000)
    /// [default: no maximum].
    #[arg(long, env = "WRS_MAX_CONNECTION_AGE_MS",
          value_parser = clap::value_parser!(u64).range(1_000..=2_592_000_000))]
    pub max_connection_age_ms: Option<u64>,

    /// On a drain, how long connections are still accepted after readiness turned 503 (the
    /// balancer's time to notice), in ms (0-600000).
    #[arg(long, env = "WRS_DRAIN_DELAY_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub drain_delay_ms: u64,

    /// On a drain, most clients closed with 1012 a second (1-1000000).
    #[arg(long, env = "WRS_DRAIN_RATE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub drain_rate: u32,

    /// From SIGTERM until the clients still connected are closed with 1001 and the process
    /// exits, in ms: the drain delay plus a full node at WRS_DRAIN_RATE should fit
    /// (the default: 5 s + 20 000 clients at 500/s, plus margin) (0-3600000).
    #[arg(long, env = "WRS_SHUTDOWN_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub shutdown_timeout_ms: u64,

    /// Rebalancing in a cluster: a node well above the average sheds its excess with 1012.
    #[arg(long, env = "WRS_REBALANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub rebalance: bool,

    /// A node sheds only above this multiple of the average connections per node (1.0-100).
    #[arg(long, env = "WRS_REBALANCE_RELATIVE", default_value_t = 1.1, value_parser = parse_relative)]
    pub rebalance_relative: f64,

    /// ... and only above the average plus this many connections (0-10000000).
    #[arg(long, env = "WRS_REBALANCE_ABSOLUTE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub rebalance_absolute: u32,

    /// Most clients a shedding node closes a second (1-1000000).
    #[arg(long, env = "WRS_REBALANCE_RATE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rebalance_rate: u32,

    /// TCP port answering HAProxy's agent-check (`ready 73%`, `drain`, `down`) [default: off].
    #[arg(long, env = "WRS_AGENT_PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub agent_port: Option<u16>,

    /// How long a client may take to send an HTTP request's headers, in ms; slower connections are closed (100-600000).
    #[arg(long, env = "WRS_HEADER_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_timeout_ms: u64,

    /// This node's id in metadata and logs [default: host name plus a random suffix].
    #[arg(long, env = "WRS_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,

    /// Require the API token (WRS_AUTH_TOKEN) on the resources in WRS_AUTH_RESOURCES.
    #[arg(short = 'a', long = "auth", env = "WRS_AUTH")]
    pub auth: bool,

    /// The API token: accepted as `Authorization: Bearer <token>`, query `?auth=<token>` or body field "auth".
    #[arg(short = 't', long = "token", env = "WRS_AUTH_TOKEN", value_parser = parse_secret, hide_env_values = true)]
    pub auth_token: Option<Secret>,

    /// Space-separated METHOD:PATH_REGEX entries that need the API token; METHOD may be *, the regex
    /// must match from the start of the path [default: everything, *:.*].
    #[arg(long, env = "WRS_AUTH_RESOURCES", default_value = "", value_parser = parse_typed::<AuthPolicy>)]
    pub auth_resources: AuthPolicy,

    /// Serve HTTPS and WSS on the API port (needs WRS_SSL_CERT_PATH and WRS_SSL_KEY_PATH).
    #[arg(short = 's', long = "ssl", env = "WRS_SSL")]
    pub ssl: bool,

    /// PEM certificate chain for WRS_SSL.
    #[arg(long, env = "WRS_SSL_CERT_PATH")]
    pub ssl_cert_path: Option<std::path::PathBuf>,

    /// PEM private key for WRS_SSL.
    #[arg(long, env = "WRS_SSL_KEY_PATH")]
    pub ssl_key_path: Option<std::path::PathBuf>,

    /// TLS is terminated in front of the service: links and docs use https and wss.
    #[arg(long, env = "WRS_PUBLIC_SSL")]
    pub public_ssl: bool,

    /// Add GET aliases for browsers: /channels/create?pattern=... and /channels/{id}/delete.
    #[arg(long, env = "WRS_BROWSER_ONLY")]
    pub browser_only: bool,

    /// Origins allowed by CORS on the REST API: * or a comma-separated list such as https://app.example.
    #[arg(long, env = "WRS_CORS_ORIGINS", default_value = "*", value_parser = parse_typed::<CorsOrigins>)]
    pub cors_origins: CorsOrigins,

    /// NATS server URLs, comma-separated; setting it turns on cluster mode
    /// (e.g. nats://10.0.0.5:4222,nats://10.0.0.6:4222) [default: standalone].
    #[arg(long, env = "WRS_NATS_URL")]
    pub nats_url: Option<String>,

    /// Cluster name: prefix of NATS subjects and key-value buckets, so several clusters can share one NATS.
    #[arg(long = "cluster", env = "WRS_CLUSTER", default_value = "wrs", value_parser = parse_cluster_name)]
    pub cluster: String,

    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "WRS_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// NATS token.
    #[arg(long, env = "WRS_NATS_TOKEN", value_parser = parse_secret, hide_env_values = true)]
    pub nats_token: Option<Secret>,

    /// NATS user name (with WRS_NATS_PASSWORD).
    #[arg(long, env = "WRS_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password.
    #[arg(long, env = "WRS_NATS_PASSWORD", value_parser = parse_secret, hide_env_values = true)]
    pub nats_password: Option<Secret>,

    /// PEM CA certificate to verify NATS servers with; turns on TLS to NATS.
    #[arg(long, env = "WRS_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// PEM client certificate for NATS (with WRS_NATS_TLS_KEY).
    #[arg(long, env = "WRS_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    /// PEM client key for NATS.
    #[arg(long, env = "WRS_NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,

    /// Replicas of the cluster's key-value buckets (up to the number of JetStream servers, 1-5).
    #[arg(long, env = "WRS_NATS_KV_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_kv_replicas: u8,

    /// Heartbeat interval of cluster nodes, in ms; a node silent for three intervals is gone (100-60000).
    #[arg(long, env = "WRS_CLUSTER_HEARTBEAT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub cluster_heartbeat_ms: u64,

    /// How long to keep trying to reach NATS at start, in ms (0-600000).
    #[arg(long, env = "WRS_NATS_CONNECT_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub nats_connect_timeout_ms: u64,

    /// Markdown file served as HTML at / and /readme [default: the built-in API readme].
    #[arg(long, env = "WRS_README_PATH")]
    pub readme_path: Option<std::path::PathBuf>,

    /// Log format.
    #[arg(long, env = "WRS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `wrs=debug` [default: RUST_LOG, else info].
    #[arg(long = "log", env = "WRS_LOG")]
    pub log: Option<String>,
}

/// What to run instead of the service.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Ask this node's /healthz (on loopback, with the same configuration)
    /// and exit 0 if it answers 200 — for container health checks.
    Healthcheck {
        /// Path to probe, e.g. /readyz.
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
}

/// A configuration that cannot be used, or a request for help text.
#[derive(Debug)]
pub enum ConfigError {
    /// `--help` or `--version`: print this to stdout and exit 0.
    Info(String),
    /// Invalid: print this one line to stderr and exit non-zero.
    Invalid(String),
}

impl Config {
    /// Reads the configuration from the process's arguments and environment.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for help/version requests and invalid settings.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// Like [`Config::load`] with explicit arguments (the environment is
    /// still read for unset flags).
    ///
    /// # Errors
    ///
    /// See [`Config::load`].
    pub fn load_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut config = Config::try_parse_from(args).map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                ConfigError::Info(e.render().to_string())
            }
            _ => ConfigError::Invalid(one_line(&e)),
        })?;
        if config.log.is_none() {
            config.log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
        }
        config
            .validate()
            .map_err(|reason| ConfigError::Invalid(flatten(&reason)))?;
        Ok(config)
    }

    /// Defaults for a server on an ephemeral loopback port (tests, embedding).
    pub fn for_tests() -> Config {
        let mut config =
            Config::try_parse_from(["wrs"]).unwrap_or_else(|e| panic!("defaults parse: {e}"));
        config.api_port = 0;
        config.bind_address = IpAddr::from([127, 0, 0, 1]);
        config.node_id = Some("test-node".to_owned());
        // Tests stop servers often and have no balancer to wait for, and
        // place their clients on cluster nodes on purpose.
        config.drain_delay_ms = 0;
        config.rebalance = false;
        config
    }

    fn validate(&self) -> Result<(), String> {
        if self.auth && self.auth_token.is_none() {
            return Err(
                "WRS_AUTH=true needs an API token in WRS_AUTH_TOKEN (or --token)".to_owned(),
            );
        }
        if self.ssl && (self.ssl_cert_path.is_none() || self.ssl_key_path.is_none()) {
            return Err(
                "WRS_SSL=true needs WRS_SSL_CERT_PATH and WRS_SSL_KEY_PATH (PEM files)".to_owned(),
            );
        }
        if self.nats_user.is_some() != self.nats_password.is_some() {
            return Err("WRS_NATS_USER and WRS_NATS_PASSWORD go together".to_owned());
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err("WRS_NATS_TLS_CERT and WRS_NATS_TLS_KEY go together".to_owned());
        }
        if self
            .nats_url
            .as_deref()
            .is_some_and(|u| u.trim().is_empty())
        {
            return Err("WRS_NATS_URL is empty; unset it for standalone mode".to_owned());
        }
        let needed = self.max_message_bytes as usize + FRAME_HEADER_MAX;
        if (self.client_queue_bytes as usize) < needed {
            return Err(format!(
                "WRS_CLIENT_QUEUE_BYTES ({}) must be at least WRS_MAX_MESSAGE_BYTES + {FRAME_HEADER_MAX} ({needed}) so that one largest message fits",
                self.client_queue_bytes
            ));
        }
        if let Some(filter) = &self.log {
            tracing_subscriber::EnvFilter::try_new(filter)
                .map_err(|e| format!("invalid log filter {filter:?} (WRS_LOG / RUST_LOG): {e}"))?;
        }
        Ok(())
    }

    /// Whether clients reach the service over TLS (served here or in front).
    pub fn public_tls(&self) -> bool {
        self.ssl || self.public_ssl
    }

    /// The service's public HTTP base URL, e.g. `https://wrs.example:443`.
    pub fn public_http_url(&self) -> String {
        let scheme = if self.public_tls() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.domain, self.public_port())
    }

    /// The service's public WebSocket base URL, e.g. `wss://wrs.example:443`.
    pub fn public_ws_url(&self) -> String {
        let scheme = if self.public_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}:{}", self.domain, self.public_port())
    }

    /// The port clients see.
    pub fn public_port(&self) -> u16 {
        self.public_api_port.unwrap_or(self.api_port)
    }

    /// The log filter to use.
    pub fn log_filter(&self) -> &str {
        self.log.as_deref().unwrap_or("info")
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// How to join the cluster, when `WRS_NATS_URL` is set.
    pub fn cluster_settings(&self, node_id: &str) -> Option<crate::cluster::ClusterSettings> {
        let urls = self.nats_url.clone()?;
        Some(crate::cluster::ClusterSettings {
            urls,
            prefix: self.cluster.clone(),
            node_id: node_id.to_owned(),
            address: format!("{}:{}", self.domain, self.public_port()),
            credentials: self.nats_creds.clone(),
            token: self.nats_token.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            kv_replicas: usize::from(self.nats_kv_replicas),
            heartbeat: Duration::from_millis(self.cluster_heartbeat_ms),
            connect_timeout: Duration::from_millis(self.nats_connect_timeout_ms),
            max_message_bytes: self.max_message_bytes as usize,
        })
    }

    /// The relay's settings, resolving the node id default.
    pub fn relay_settings(&self) -> RelaySettings {
        RelaySettings {
            node_id: self.node_id.clone().unwrap_or_else(default_node_id),
            max_channels: self.max_channels as usize,
            id_bytes: usize::from(self.id_length),
            token_length: usize::from(self.token_length),
            max_message_bytes: self.max_message_bytes as usize,
            queue: QueueLimits {
                frames: self.client_queue_messages as usize,
                bytes: self.client_queue_bytes as usize,
            },
            slow_consumer: self.slow_consumer,
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            max_connections: self
                .max_connections
                .map_or_else(default_max_connections, |max| max as usize),
            connect_rate: self
                .connect_rate
                .map(|rate| (rate, self.connect_burst.unwrap_or(rate))),
            client_rate: self
                .client_rate
                .map(|rate| (rate, self.client_burst.unwrap_or(rate))),
            client_rate_policy: self.client_rate_policy,
            max_connection_age: self.max_connection_age_ms.map(Duration::from_millis),
            drain: DrainSettings {
                delay: Duration::from_millis(self.drain_delay_ms),
                rate: self.drain_rate,
            },
            rebalance: self.rebalance.then_some(RebalanceSettings {
                relative: self.rebalance_relative,
                absolute: u64::from(self.rebalance_absolute),
                rate: self.rebalance_rate,
            }),
            compress_from: self
                .compression
                .then_some(self.compression_min_bytes as usize),
        }
    }
}

fn parse_relative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (1.0..=100.0).contains(&value) => Ok(value),
        Ok(_) => Err("must be between 1.0 and 100".to_owned()),
        Err(_) => Err("must be a number such as 1.1".to_owned()),
    }
}

/// Open files kept out of `WRS_MAX_CONNECTIONS`'s default: the listener,
/// NATS, logs, HTTP requests.
const FILE_RESERVE: u64 = 100;

/// The open-file limit (as raised at start) minus [`FILE_RESERVE`]: every
/// connection is a socket.
fn default_max_connections() -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(limit.saturating_sub(FILE_RESERVE).max(1)).unwrap_or(usize::MAX)
}

/// A secret setting: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one comparison that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn parse_secret(text: &str) -> Result<Secret, String> {
    if text.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(Secret(text.to_owned()))
    }
}

/// A typed setting from its text. The error carries its causes on one
/// line: clap shows only the first line of a value's error (and
/// [`one_line`] names the variable after it).
fn parse_typed<T>(text: &str) -> Result<T, String>
where
    T: FromStr,
    T::Err: std::error::Error,
{
    text.parse().map_err(|error: T::Err| {
        let chain = std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source());
        flatten(
            &chain
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": "),
        )
    })
}

/// Node ids appear in URLs, logs, NATS subjects and keys: keep them plain.
fn parse_node_id(text: &str) -> Result<String, String> {
    plain_name(text, 64)
}

/// Cluster names prefix NATS subjects and bucket names.
fn parse_cluster_name(text: &str) -> Result<String, String> {
    plain_name(text, 32)
}

fn plain_name(text: &str, max: usize) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "use 1-{max} characters from A-Z, a-z, 0-9, '-' and '_'"
        ))
    }
}

/// The host name plus four random hex digits, e.g. `web-1-3fa2`.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(48)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wrs".to_owned());
    format!("{host}-{:04x}", rand::random::<u16>())
}

/// Joins a multi-line message (regex errors, for one) into one line.
fn flatten(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Turns clap's multi-line error into one line that names the environment
/// variable behind the offending flag.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid configuration");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let env = Config::command().get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let env = arg.get_env()?;
        let named =
            first.contains(&format!("'--{long} ")) || first.contains(&format!("'--{long}'"));
        named.then(|| env.to_string_lossy().into_owned())
    });
    match env {
        Some(env) => format!("{first} (environment variable {env})"),
        None => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(args: &[&str]) -> String {
        match Config::load_from(args.iter().copied()) {
            Err(ConfigError::Invalid(message)) => message,
            other => panic!("{args:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let c = Config::try_parse_from(["wrs"]).unwrap();
        assert_eq!(c.api_port, 8080);
        assert_eq!(c.public_port(), 8080);
        assert_eq!(c.domain, "127.0.0.1");
        assert_eq!(c.token_length, 16);
        assert_eq!(c.id_length, 4);
        assert_eq!(c.max_message_bytes, 1_048_576);
        assert_eq!(c.slow_consumer, SlowConsumerPolicy::Close);
        assert_eq!(c.log_format, LogFormat::Human);
    }

    #[test]
    fn flags_override() {
        let c = Config::load_from(["wrs", "-p", "9000", "--public-api-port", "443"]).unwrap();
        assert_eq!((c.api_port, c.public_port()), (9000, 443));
        let c = Config::load_from(["wrs", "--port", "0"]).unwrap();
        assert_eq!(c.api_port, 0);
    }

    #[test]
    fn invalid_values_give_one_line_naming_the_variable() {
        let message = invalid(&["wrs", "--port", "70000"]);
        assert!(message.contains("WRS_API_PORT"), "{message}");
        assert!(!message.contains('\n'));
        assert!(invalid(&["wrs", "--token-length", "4"]).contains("WRS_TOKEN_LENGTH"));
        assert!(invalid(&["wrs", "--slow-consumer", "maybe"]).contains("WRS_SLOW_CONSUMER"));
        assert!(invalid(&["wrs", "--node-id", "a b"]).contains("WRS_NODE_ID"));
        assert!(invalid(&["wrs", "--bogus"]).contains("--bogus"));
    }

    #[test]
    fn the_queue_must_hold_one_largest_message() {
        let message = invalid(&[
            "wrs",
            "--max-message-bytes",
            "2000",
            "--client-queue-bytes",
            "2000",
        ]);
        assert!(message.contains("WRS_CLIENT_QUEUE_BYTES"), "{message}");
        assert!(
            Config::load_from([
                "wrs",
                "--max-message-bytes",
                "2000",
                "--client-queue-bytes",
                "2010"
            ])
            .is_ok()
        );
    }

    #[test]
    fn auth_needs_a_token_and_valid_resources() {
        assert!(invalid(&["wrs", "--auth"]).contains("WRS_AUTH_TOKEN"));
        let c = Config::load_from(["wrs", "-a", "-t", "s3cret"]).unwrap();
        assert!(c.auth);
        assert_eq!(c.auth_token.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token leaks through Debug"
        );
        assert!(
            invalid(&["wrs", "--auth-resources", "GET:/channels("]).contains("WRS_AUTH_RESOURCES")
        );
        assert!(invalid(&["wrs", "--auth-resources", "FETCH:/x"]).contains("WRS_AUTH_RESOURCES"));
        assert!(invalid(&["wrs", "--auth-resources", "/no-method"]).contains("WRS_AUTH_RESOURCES"));
        assert!(invalid(&["wrs", "--token", ""]).contains("WRS_AUTH_TOKEN"));
    }

    #[test]
    fn ssl_needs_both_files_and_sets_public_urls() {
        assert!(invalid(&["wrs", "--ssl"]).contains("WRS_SSL_CERT_PATH"));
        assert!(invalid(&["wrs", "-s", "--ssl-cert-path", "c.pem"]).contains("WRS_SSL_KEY_PATH"));
        let c = Config::load_from([
            "wrs",
            "-s",
            "--ssl-cert-path",
            "c.pem",
            "--ssl-key-path",
            "k.pem",
            "--domain",
            "wrs.example",
        ])
        .unwrap();
        assert_eq!(c.public_http_url(), "https://wrs.example:8080");
        assert_eq!(c.public_ws_url(), "wss://wrs.example:8080");
        let c = Config::load_from(["wrs", "--public-ssl", "--public-api-port", "443"]).unwrap();
        assert_eq!(c.public_ws_url(), "wss://127.0.0.1:443");
        let c = Config::load_from(["wrs"]).unwrap();
        assert_eq!(c.public_http_url(), "http://127.0.0.1:8080");
    }

    #[test]
    fn cluster_settings_follow_the_nats_variables() {
        let c = Config::load_from(["wrs"]).unwrap();
        assert!(c.cluster_settings("n1").is_none(), "standalone by default");
        let c = Config::load_from([
            "wrs",
            "--nats-url",
            "nats://a:4222,nats://b:4222",
            "--cluster",
            "game-1",
            "--nats-kv-replicas",
            "3",
        ])
        .unwrap();
        let s = c.cluster_settings("n1").unwrap();
        assert_eq!(
            (s.urls.as_str(), s.prefix.as_str(), s.kv_replicas),
            ("nats://a:4222,nats://b:4222", "game-1", 3)
        );
        assert!(invalid(&["wrs", "--cluster", "a.b"]).contains("WRS_CLUSTER"));
        assert!(invalid(&["wrs", "--nats-user", "u"]).contains("WRS_NATS_PASSWORD"));
        assert!(invalid(&["wrs", "--nats-tls-cert", "c.pem"]).contains("WRS_NATS_TLS_KEY"));
        assert!(invalid(&["wrs", "--nats-kv-replicas", "7"]).contains("WRS_NATS_KV_REPLICAS"));
        assert!(invalid(&["wrs", "--node-id", "a.b"]).contains("WRS_NODE_ID"));
        let c = Config::load_from(["wrs", "--nats-token", "nats-secret"]).unwrap();
        assert!(!format!("{c:?}").contains("nats-secret"));
    }

    #[test]
    fn cors_origins_are_validated() {
        assert!(
            Config::load_from([
                "wrs",
                "--cors-origins",
                "https://a.example, http://b.example:3000"
            ])
            .is_ok()
        );
        assert!(invalid(&["wrs", "--cors-origins", "not a url"]).contains("WRS_CORS_ORIGINS"));
        assert!(invalid(&["wrs", "--cors-origins", ""]).contains("WRS_CORS_ORIGINS"));
    }

    #[test]
    fn auth_resources_are_parsed_once_into_a_policy() {
        let everything = Config::load_from(["wrs"]).unwrap().auth_resources;
        assert!(everything.protects("GET", "/healthz"));
        assert!(everything.protects("DELETE", "/channels/D679-05F5"));
        let c = Config::load_from([
            "wrs",
            "--auth-resources",
            "post:/channels DELETE:/channels *:/reset",
        ])
        .unwrap();
        assert!(c.auth_resources.protects("POST", "/channels"));
        assert!(c.auth_resources.protects("DELETE", "/channels/D679-05F5"));
        assert!(c.auth_resources.protects("GET", "/reset"));
        assert!(!c.auth_resources.protects("GET", "/channels"));
        assert!(!c.auth_resources.protects("GET", "/healthz"));
    }

    #[test]
    fn a_bad_auth_resource_is_named_on_one_line_with_its_cause() {
        let message = invalid(&["wrs", "--auth-resources", "POST:/channels GET:/channels("]);
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.contains(r#""GET:/channels(": invalid path regex: regex parse error:"#),
            "{message}"
        );
        assert!(message.contains("unclosed group"), "{message}");
        assert!(
            message.ends_with("(environment variable WRS_AUTH_RESOURCES)"),
            "{message}"
        );
        let message = invalid(&["wrs", "--auth-resources", "fetch:/x"]);
        assert!(
            message.contains(r#""fetch:/x": unknown method "fetch" (use one of GET,"#),
            "{message}"
        );
    }

    #[test]
    fn cors_origins_are_parsed_once() {
        let c = Config::load_from(["wrs"]).unwrap();
        assert_eq!(c.cors_origins, CorsOrigins::Any);
        let c = Config::load_from(["wrs", "--cors-origins", "https://a.example,http://b:3000"])
            .unwrap();
        assert_eq!(
            c.cors_origins,
            CorsOrigins::List(vec!["https://a.example".into(), "http://b:3000".into()])
        );
        let message = invalid(&["wrs", "--cors-origins", "https://a.example/app"]);
        assert!(
            message
                .contains(r#""https://a.example/app" is not an origin like https://app.example"#),
            "{message}"
        );
        assert!(
            message.ends_with("(environment variable WRS_CORS_ORIGINS)"),
            "{message}"
        );
        assert!(
            invalid(&["wrs", "--cors-origins", " , "]).contains("give * or at least one origin")
        );
    }

    #[test]
    fn a_bad_log_filter_is_refused() {
        assert!(invalid(&["wrs", "--log", "wrs=loud"]).contains("log filter"));
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let help = Config::command().render_long_help().to_string();
        for arg in Config::command().get_arguments() {
            if let Some(env) = arg.get_env() {
                assert!(
                    help.contains(&*env.to_string_lossy()),
                    "{env:?} missing from --help"
                );
            }
        }
        assert!(help.contains("[default: 8080]"));
        assert!(help.contains("[default: everything, *:.*]"), "{help}");
        let lines: Vec<&str> = help.lines().map(str::trim).collect();
        let cors = lines
            .iter()
            .position(|l| l.starts_with("[env: WRS_CORS_ORIGINS"))
            .unwrap();
        assert_eq!(lines[cors + 1], "[default: *]");
    }

    #[test]
    fn default_node_ids_are_valid_node_ids() {
        let id = default_node_id();
        assert!(parse_node_id(&id).is_ok(), "{id}");
    }
}
