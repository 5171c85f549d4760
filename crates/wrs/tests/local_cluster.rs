//! `deploy/local-cluster.sh`: the topology of `deploy/compose.yaml` (NATS
//! with JetStream, three WRS nodes, nginx with `deploy/nginx/compose.conf`)
//! as local processes, on ephemeral ports. Data traffic goes through the
//! load balancer only; the nodes are asked directly only where a client
//! sits (`GET /channels/{id}/clients`), to know when every node has heard
//! of every client.
//!
//! - Every pattern of SPEC §3 keeps its exact delivery set with the
//!   clients of one channel spread over several nodes by least
//!   connections (one of them over TLS, through nginx's TLS server block).
//! - A node stopped with SIGTERM closes its clients with 1012; they
//!   reconnect through nginx to the others, the channel survives and
//!   messages flow again. The script reports the node and keeps running.
//! - The script stops exactly what it started: after SIGTERM every process
//!   it printed (and every other child of it) is gone, and its temporary
//!   directory too; when NATS dies it stops the rest by itself.
//! - With `--haproxy`, HAProxy with the shipped `deploy/haproxy/wrs.cfg`
//!   replaces nginx: `ready` comes once its stats socket shows the three
//!   servers UP, least connections spreads a channel's clients evenly, the
//!   agent weights follow the nodes' load, a node stopped with SIGTERM goes
//!   to DRAIN (agent) and then DOWN, and its clients, closed with 1012,
//!   reconnect through HAProxy to the other two only.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::nats::free_port;
use common::{Ws, bounded, within};
use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/local-cluster.sh");

/// How long the script may take to report `ready` (NATS, three nodes
/// joining, nginx) on a busy machine.
const START: Duration = Duration::from_secs(40);

/// How long a client must stay silent to show that nothing else arrives.
const QUIET: Duration = Duration::from_millis(400);

/// One process the script printed.
#[derive(Clone, Debug)]
struct Process {
    name: String,
    pid: u32,
    url: String,
    line: String,
}

/// The load balancer the script runs in front of the nodes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Balancer {
    /// nginx with `deploy/nginx/compose.conf`, plain HTTP only.
    Nginx,
    /// nginx with its TLS server block too (`--tls`).
    NginxTls,
    /// HAProxy with `deploy/haproxy/wrs.cfg` (`--haproxy`).
    Haproxy,
}

impl Balancer {
    /// The name the script prints for the balancer's process.
    fn name(self) -> &'static str {
        match self {
            Balancer::Nginx | Balancer::NginxTls => "nginx",
            Balancer::Haproxy => "haproxy",
        }
    }
}

/// A running `deploy/local-cluster.sh`, stopped (by its PID) on drop.
struct Cluster {
    script: tokio::process::Child,
    pid: u32,
    lines: mpsc::UnboundedReceiver<String>,
    processes: Vec<Process>,
    stopped: BTreeSet<String>,
    /// `nginx` or `haproxy`.
    lb_name: &'static str,
    lb: String,
    /// HAProxy's stats socket (in the script's temporary directory), when
    /// started with `--haproxy`.
    stats: Option<PathBuf>,
    /// `wss://127.0.0.1:<port>` and a client configuration that trusts the
    /// script's certificate, when started with `--tls`.
    tls: Option<(String, Arc<rustls::ClientConfig>)>,
    http: reqwest::Client,
    stderr: PathBuf,
    tmp: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(tls: bool) -> Cluster {
        let balancer = if tls {
            Balancer::NginxTls
        } else {
            Balancer::Nginx
        };
        Cluster::start_with(balancer, &[]).await
    }

    /// Runs the script with `balancer` on ephemeral ports; `env` is given
    /// to the script last (WRS_* variables reach the nodes).
    async fn start_with(balancer: Balancer, env: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let stderr = dir.path().join("stderr.log");
        let node_ports = format!("{} {} {}", free_port(), free_port(), free_port());
        let mut command = tokio::process::Command::new(SCRIPT);
        match balancer {
            Balancer::Nginx => {}
            Balancer::NginxTls => {
                command.arg("--tls");
            }
            Balancer::Haproxy => {
                command.arg("--haproxy").env(
                    "WRS_AGENT_PORTS",
                    format!("{} {} {}", free_port(), free_port(), free_port()),
                );
            }
        }
        let tls = balancer == Balancer::NginxTls;
        let mut script = command
            .env("WRS_LB_PORT", free_port().to_string())
            .env("WRS_LB_TLS_PORT", free_port().to_string())
            .env("WRS_NODE_PORTS", node_ports)
            .env("WRS_NATS_PORT", free_port().to_string())
            .env("WRS_NATS_MONITOR_PORT", free_port().to_string())
            .env("WRS_BINARY", env!("CARGO_BIN_EXE_wrs"))
            .env("WRS_START_TIMEOUT", START.as_secs().to_string())
            .env("WRS_SHUTDOWN_TIMEOUT_MS", "5000")
            .env("WRS_DRAIN_DELAY_MS", "1000")
            .env("TMPDIR", &tmp)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run deploy/local-cluster.sh");
        let pid = script.id().unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        let mut reader = BufReader::new(script.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut cluster = Cluster {
            script,
            pid,
            lines,
            processes: Vec::new(),
            stopped: BTreeSet::new(),
            lb_name: balancer.name(),
            lb: String::new(),
            stats: None,
            tls: None,
            http: common::http_client(),
            stderr,
            tmp,
            _dir: dir,
        };
        let ready = within(
            START + Duration::from_secs(5),
            "the script's ready line",
            async {
                loop {
                    let line = cluster
                        .lines
                        .recv()
                        .await
                        .expect("the script ended before its ready line");
                    if let Some(url) = line.strip_prefix("ready ") {
                        return url.to_owned();
                    }
                    cluster.record(&line);
                }
            },
        )
        .await;
        let names: Vec<&str> = cluster.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["nats", "wrs-1", "wrs-2", "wrs-3", balancer.name()]);
        let nginx = cluster.process(balancer.name()).clone();
        assert_eq!(nginx.url, ready, "the ready line names the balancer");
        cluster.lb = ready;
        if balancer == Balancer::Haproxy {
            let stats = nginx
                .line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("stats="))
                .unwrap_or_else(|| panic!("no stats= in {:?}", nginx.line));
            assert!(
                Path::new(stats).starts_with(&cluster.tmp),
                "the stats socket lives in the script's temporary directory: {stats}"
            );
            cluster.stats = Some(PathBuf::from(stats));
        }
        if tls {
            let line = nginx.line.clone();
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                    .to_owned()
            };
            let (tls_url, cert) = (field("tls_url="), field("cert="));
            assert!(
                Path::new(&cert).starts_with(&cluster.tmp),
                "the certificate lives in the script's temporary directory: {cert}"
            );
            let port = tls_url.rsplit_once(':').unwrap().1;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&cert).expect("the printed certificate"))
                .unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            cluster.tls = Some((format!("wss://127.0.0.1:{port}"), Arc::new(config)));
        }
        cluster
    }

    /// Remembers a `NAME pid=.. url=..` line (`node NAME ...` for nodes).
    fn record(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |key: &str| words.iter().find_map(|w| w.strip_prefix(key));
        let name = match words.first() {
            Some(&"node") => words.get(1).copied(),
            other => other.copied(),
        };
        if let (Some(name), Some(pid), Some(url)) = (name, field("pid="), field("url=")) {
            self.processes.push(Process {
                name: name.to_owned(),
                pid: pid.parse().unwrap_or_else(|_| panic!("pid in {line:?}")),
                url: url.to_owned(),
                line: line.to_owned(),
            });
        }
    }

    fn process(&self, name: &str) -> &Process {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("the script printed no {name}"))
    }

    /// The nodes still running, as (node id, base URL).
    fn live_nodes(&self) -> Vec<(String, String)> {
        self.processes
            .iter()
            .filter(|p| p.name.starts_with("wrs-") && !self.stopped.contains(&p.name))
            .map(|p| (p.name.clone(), p.url.clone()))
            .collect()
    }

    /// Creates a channel through the balancer, with welcome frames (each
    /// client learns its id).
    async fn create(&self, pattern: &str) -> (String, String) {
        let response = bounded(
            "create through nginx",
            self.http
                .post(format!("{}/channels", self.lb))
                .header("content-type", "application/json")
                .body(json!({"pattern": pattern, "welcome": true}).to_string())
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        (
            body["data"]["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }

    /// Connects one client through the balancer (over TLS if asked),
    /// retrying while nginx answers 502 or 503; returns it with its id.
    async fn connect(&self, channel: &(String, String), over_tls: bool) -> (String, Ws) {
        let (id, token) = channel;
        let (base, connector) = match (&self.tls, over_tls) {
            (Some((url, config)), true) => (
                url.clone(),
                Some(tokio_tungstenite::Connector::Rustls(config.clone())),
            ),
            (None, true) => panic!("the cluster runs without --tls"),
            _ => (self.lb.replace("http://", "ws://"), None),
        };
        let url = format!("{base}/channels/{id}/connect?token={token}");
        let mut ws = bounded("connect through nginx", async {
            loop {
                match tokio_tungstenite::connect_async_tls_with_config(
                    &url,
                    None,
                    false,
                    connector.clone(),
                )
                .await
                {
                    Ok((stream, _)) => return Ws { stream },
                    Err(tokio_tungstenite::tungstenite::Error::Http(response))
                        if matches!(response.status().as_u16(), 502 | 503) =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("connect {url}: {e}"),
                }
            }
        })
        .await;
        let hello = ws.recv_json().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["channel"], id.as_str(), "{hello}");
        (hello["clientId"].as_str().unwrap().to_owned(), ws)
    }

    /// The channel's clients as one node lists them: client id -> node.
    async fn roster(&self, node_url: &str, channel: &str) -> Option<BTreeMap<String, String>> {
        let response = tokio::time::timeout(
            Duration::from_secs(3),
            self.http
                .get(format!("{node_url}/channels/{channel}/clients"))
                .send(),
        )
        .await
        .ok()?
        .ok()?;
        let body: Value = response.json().await.ok()?;
        body["data"]
            .as_array()?
            .iter()
            .map(|c| Some((c["id"].as_str()?.to_owned(), c["node"].as_str()?.to_owned())))
            .collect()
    }

    /// Waits until every running node lists exactly `ids` in the channel;
    /// returns where each client is.
    async fn wait_roster(&self, channel: &str, ids: &BTreeSet<String>) -> BTreeMap<String, String> {
        let mut agreed = BTreeMap::new();
        for (node, url) in self.live_nodes() {
            agreed = common::eventually(
                &format!("{node} lists the {} clients {ids:?}", ids.len()),
                || async {
                    let roster = self.roster(&url, channel).await?;
                    (roster.keys().cloned().collect::<BTreeSet<_>>() == *ids).then_some(roster)
                },
            )
            .await;
        }
        agreed
    }

    /// Connects plain clients through the balancer until `peers` holds `n`.
    async fn top_up(&self, channel: &(String, String), peers: &mut Vec<Peer>, n: usize) {
        while peers.len() < n {
            let (id, ws) = self.connect(channel, false).await;
            peers.push(Peer {
                id,
                node: String::new(),
                ws,
            });
        }
    }

    /// Waits until every running node lists exactly `peers` in the channel,
    /// notes each one's node and returns the roster.
    async fn locate(
        &self,
        channel: &(String, String),
        peers: &mut [Peer],
    ) -> BTreeMap<String, String> {
        let ids: BTreeSet<String> = peers.iter().map(|p| p.id.clone()).collect();
        let roster = self.wait_roster(&channel.0, &ids).await;
        for peer in peers {
            peer.node = roster[&peer.id].clone();
        }
        roster
    }

    /// Connects clients through the balancer until the channel has at
    /// least `n` and they sit on at least two nodes; the first one over
    /// TLS when `first_over_tls`. Every node knows every client on return.
    async fn join(&self, channel: &(String, String), n: usize, first_over_tls: bool) -> Vec<Peer> {
        let mut peers: Vec<Peer> = Vec::new();
        loop {
            let over_tls = first_over_tls && peers.is_empty();
            let (id, ws) = self.connect(channel, over_tls).await;
            peers.push(Peer {
                id,
                node: String::new(),
                ws,
            });
            if peers.len() < n {
                continue;
            }
            let roster = self.locate(channel, &mut peers).await;
            let nodes: BTreeSet<&String> = roster.values().collect();
            if nodes.len() >= 2 {
                return peers;
            }
            assert!(
                peers.len() < 8,
                "least connections left {} clients on one node: {roster:?}",
                peers.len()
            );
        }
    }

    /// SIGTERM to one node, by the PID the script printed.
    fn stop_node(&mut self, node: &str) -> u32 {
        let pid = self.process(node).pid;
        signal("-TERM", pid);
        self.stopped.insert(node.to_owned());
        pid
    }

    /// The next line the script prints, within `limit`.
    async fn next_line(&mut self, limit: Duration, what: &str) -> Option<String> {
        within(limit, what, self.lines.recv()).await
    }

    /// Children of the script right now (its processes and its log
    /// readers), and nginx's workers.
    fn descendants(&self) -> BTreeSet<u32> {
        let mut all = children_of(self.pid);
        let balancer = self.process(self.lb_name).pid;
        all.extend(children_of(balancer));
        all
    }

    /// Asserts that the script ended, that every process it printed or
    /// started is gone (not even a zombie), and that its temporary
    /// directory was removed.
    fn assert_all_gone(&self, before: &BTreeSet<u32>) {
        let printed: Vec<u32> = self.processes.iter().map(|p| p.pid).collect();
        for pid in printed.iter().chain(before) {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "process {pid} (started by the script) is still there: {}",
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ")
            );
        }
        let left: Vec<_> = std::fs::read_dir(&self.tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "the script left {left:?} in TMPDIR");
    }

    /// SIGTERM to the script; it must stop everything and exit 143.
    async fn stop(mut self) {
        let before = self.descendants();
        let running = self.processes.len() - self.stopped.len();
        assert!(
            before.len() >= 2 * running,
            "{running} processes and their log readers: {before:?}"
        );
        signal("-TERM", self.pid);
        let status = within(
            Duration::from_secs(30),
            "the script to stop",
            self.script.wait(),
        )
        .await
        .unwrap();
        assert_eq!(status.code(), Some(143), "exit status after SIGTERM");
        self.assert_all_gone(&before);
    }

    /// HAProxy's view of the backend's servers (`show stat` on the stats
    /// socket the script printed): server name -> its row.
    async fn haproxy_servers(&self) -> BTreeMap<String, HaproxyServer> {
        let path = self.stats.as_ref().expect("started with --haproxy");
        let text = bounded("show stat", async {
            let mut socket = tokio::net::UnixStream::connect(path)
                .await
                .unwrap_or_else(|e| panic!("HAProxy's stats socket {}: {e}", path.display()));
            socket.write_all(b"show stat\n").await.unwrap();
            let mut text = String::new();
            socket.read_to_string(&mut text).await.unwrap();
            text
        })
        .await;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .expect("show stat: a header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("show stat has no {name} column: {header:?}"))
        };
        let (px, sv, status, weight, check, agent) = (
            column("pxname"),
            column("svname"),
            column("status"),
            column("weight"),
            column("check_status"),
            column("agent_status"),
        );
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > agent && f[px] == "wrs_nodes" && f[sv].starts_with("wrs-"))
            .map(|f| {
                let server = HaproxyServer {
                    status: f[status].to_owned(),
                    weight: f[weight].parse().unwrap_or_else(|_| panic!("weight {f:?}")),
                    check: f[check].to_owned(),
                    agent: f[agent].to_owned(),
                };
                (f[sv].to_owned(), server)
            })
            .collect()
    }

    /// The last lines of the script's standard error.
    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- deploy/local-cluster.sh, standard error:\n{}",
                self.stderr_tail()
            );
        }
        if matches!(self.script.try_wait(), Ok(None)) {
            signal("-TERM", self.pid);
            for _ in 0..300 {
                if !matches!(self.script.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // The script did not stop: stop what it printed, by PID.
            let _ = self.script.start_kill();
            for process in &self.processes {
                signal("-KILL", process.pid);
            }
        }
    }
}

/// One server of HAProxy's backend, as `show stat` lists it.
#[derive(Clone, Debug, PartialEq)]
struct HaproxyServer {
    /// `UP`, `DOWN`, `DRAIN (agent)`, ...
    status: String,
    /// The effective weight (the agent's percentage of `weight 100`).
    weight: u64,
    /// The last health check (`L7OK`: /healthz answered 200).
    check: String,
    /// The last agent-check (`L7OK`: the node answered).
    agent: String,
}

/// One client of a channel: its id, its node, its connection.
struct Peer {
    id: String,
    node: String,
    ws: Ws,
}

fn signal(signal: &str, pid: u32) {
    let _ = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The PIDs whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> BTreeSet<u32> {
    let mut children = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the name may contain spaces.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.insert(pid);
        }
    }
    children
}

/// The next text or binary message within `limit`, or `None`; a close or
/// an error fails the test.
async fn next_message(ws: &mut Ws, limit: Duration) -> Option<Message> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.stream.next())
            .await
            .ok()?;
        match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => panic!("closed unexpectedly: {frame:?}"),
            Some(Ok(message)) => return Some(message),
            Some(Err(e)) => panic!("receive: {e}"),
            None => panic!("the connection ended"),
        }
    }
}

/// Everything each peer receives until it has been silent for [`QUIET`].
async fn drain(peers: &mut [Peer]) -> Vec<Vec<Message>> {
    join_all(peers.iter_mut().map(|peer| async move {
        let mut got = Vec::new();
        while let Some(message) = next_message(&mut peer.ws, QUIET).await {
            got.push(message);
            assert!(got.len() < 10_000, "a flood");
        }
        got
    }))
    .await
}

/// Asserts that no peer receives anything for [`QUIET`].
async fn assert_quiet(peers: &mut [Peer]) {
    let got = drain(peers).await;
    for (peer, got) in peers.iter().zip(got) {
        assert!(
            got.is_empty(),
            "{} on {} received more than expected: {got:?}",
            peer.id,
            peer.node
        );
    }
}

/// `n` text messages of one peer, within [`common::WAIT`] each.
async fn recv_texts(peer: &mut Peer, n: usize) -> Vec<String> {
    let mut texts = Vec::new();
    for _ in 0..n {
        texts.push(peer.ws.recv_text().await);
    }
    texts
}

fn texts(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| match m {
            Message::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        })
        .collect()
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

async fn close_all(peers: Vec<Peer>) {
    join_all(peers.into_iter().map(|p| p.ws.close())).await;
}

/// pub-sub: each message reaches every other client exactly once, never
/// the sender; text and binary unchanged.
async fn pub_sub(cluster: &Cluster) {
    let channel = cluster.create("pub-sub").await;
    let mut peers = cluster.join(&channel, 4, cluster.tls.is_some()).await;
    let n = peers.len();
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.ws.send_text(format!("pub {i}")).await;
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        let got = sorted(recv_texts(peer, n - 1).await);
        let expected = sorted(
            (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("pub {j}"))
                .collect(),
        );
        assert_eq!(got, expected, "pub-sub to {} on {}", peer.id, peer.node);
    }
    let blob = vec![0u8, 159, 146, 150, 255];
    peers[n - 1].ws.send_binary(blob.clone()).await;
    for peer in &mut peers[..n - 1] {
        assert_eq!(peer.ws.recv().await, Message::binary(blob.clone()));
    }
    assert_quiet(&mut peers).await;
    close_all(peers).await;
}

/// push-pull: each message reaches exactly one other client, round-robin
/// (fair to ±1), never the sender while others are connected.
async fn push_pull(cluster: &Cluster) {
    let channel = cluster.create("push-pull").await;
    let mut peers = cluster.join(&channel, 4, false).await;
    let workers = peers.len() - 1;
    let total = workers * 10;
    for i in 0..total {
        peers[0].ws.send_text(format!("{i}")).await;
    }
    let got = drain(&mut peers).await;
    assert!(
        got[0].is_empty(),
        "the sender got its own jobs: {:?}",
        got[0]
    );
    let mut all = Vec::new();
    for (peer, got) in peers.iter().zip(&got).skip(1) {
        let jobs: Vec<usize> = texts(got).iter().map(|t| t.parse().unwrap()).collect();
        assert!(
            jobs.len().abs_diff(total / workers) <= 1,
            "{} on {} got {} of {total} jobs (round-robin over {workers})",
            peer.id,
            peer.node,
            jobs.len()
        );
        assert!(jobs.windows(2).all(|w| w[0] < w[1]), "order per worker");
        all.extend(jobs);
    }
    assert_eq!(sorted(all), (0..total).collect::<Vec<_>>(), "each job once");
    close_all(peers).await;
}

/// req-repl: a request reaches every other client with `origin` set by
/// the service; a reply reaches exactly its origin; bad frames get an
/// error frame and go nowhere.
async fn req_repl(cluster: &Cluster) {
    let channel = cluster.create("req-repl").await;
    let mut peers = cluster.join(&channel, 4, false).await;
    let n = peers.len();
    // Two askers on different nodes.
    let second = (1..n).find(|&i| peers[i].node != peers[0].node).unwrap();
    for asker in [0, second] {
        let asker_id = peers[asker].id.clone();
        peers[asker]
            .ws
            .send_text(format!(
                r#"{{"type":"request","origin":"FFFF-FFFF","q":"from {asker}"}}"#
            ))
            .await;
        for i in (0..n).filter(|&i| i != asker) {
            let request = peers[i].ws.recv_json().await;
            assert_eq!(
                request,
                json!({"type": "request", "q": format!("from {asker}"), "origin": asker_id}),
                "request to {} on {}",
                peers[i].id,
                peers[i].node
            );
            let reply = json!({"type": "reply", "origin": asker_id, "from": peers[i].id});
            peers[i].ws.send_json(reply).await;
        }
        let replies = recv_texts(&mut peers[asker], n - 1).await;
        let from: BTreeSet<String> = replies
            .iter()
            .map(|r| json_of(r)["from"].as_str().unwrap().to_owned())
            .collect();
        let expected: BTreeSet<String> = (0..n)
            .filter(|&i| i != asker)
            .map(|i| peers[i].id.clone())
            .collect();
        assert_eq!(
            from, expected,
            "replies to the asker on {}",
            peers[asker].node
        );
        assert_quiet(&mut peers).await;
    }
    // Errors stay with the sender.
    peers[1].ws.send_text("not json").await;
    assert_eq!(peers[1].ws.recv_json().await["error"], "invalid_json");
    peers[2]
        .ws
        .send_json(json!({"type": "reply", "origin": "0000-0000-0001"}))
        .await;
    let error = peers[2].ws.recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"], "unknown_origin");
    assert_quiet(&mut peers).await;
    close_all(peers).await;
}

/// fan-in-out: each request reaches exactly one other client (round-robin)
/// with `origin`; every reply reaches the origin only.
async fn fan_in_out(cluster: &Cluster) {
    let channel = cluster.create("fan-in-out").await;
    let mut peers = cluster.join(&channel, 4, false).await;
    let workers = peers.len() - 1;
    let total = workers * 4;
    let origin = peers[0].id.clone();
    for i in 0..total {
        peers[0]
            .ws
            .send_json(json!({"type": "request", "n": i}))
            .await;
    }
    let got = drain(&mut peers).await;
    assert!(got[0].is_empty(), "the origin got requests: {:?}", got[0]);
    let mut all = Vec::new();
    let mut replies = Vec::new();
    for (i, got) in got.iter().enumerate().skip(1) {
        assert!(
            got.len().abs_diff(total / workers) <= 1,
            "{} got {} of {total} requests",
            peers[i].id,
            got.len()
        );
        for text in texts(got) {
            let request = json_of(&text);
            assert_eq!(request["origin"], origin.as_str(), "{request}");
            let n = request["n"].as_u64().unwrap();
            all.push(n);
            replies.push((i, n));
        }
    }
    assert_eq!(
        sorted(all),
        (0..total as u64).collect::<Vec<_>>(),
        "each request once"
    );
    for (i, n) in replies {
        let reply = json!({"type": "reply", "origin": origin, "n": n, "by": peers[i].id});
        peers[i].ws.send_json(reply).await;
    }
    let answers = recv_texts(&mut peers[0], total).await;
    let answered: Vec<u64> = answers
        .iter()
        .map(|a| json_of(a)["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sorted(answered),
        (0..total as u64).collect::<Vec<_>>(),
        "every reply reached the origin once"
    );
    assert_quiet(&mut peers).await;
    close_all(peers).await;
}

/// echo: a message comes back to its sender only.
async fn echo(cluster: &Cluster) {
    let channel = cluster.create("echo").await;
    let mut peers = cluster.join(&channel, 3, false).await;
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.ws.send_text(format!("echo {i}")).await;
        peer.ws.send_binary(vec![i as u8, 0, 255]).await;
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        assert_eq!(peer.ws.recv_text().await, format!("echo {i}"));
        assert_eq!(peer.ws.recv().await, Message::binary(vec![i as u8, 0, 255]));
    }
    assert_quiet(&mut peers).await;
    close_all(peers).await;
}

#[tokio::test]
async fn every_pattern_works_through_the_balancer_with_clients_on_several_nodes() {
    let cluster = Cluster::start(true).await;
    // The nodes answer on their own ports; the balancer over plain HTTP
    // and over TLS, and the cluster has formed.
    for (node, url) in cluster.live_nodes() {
        let service: Value = cluster
            .http
            .get(format!("{url}/service"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(service["data"]["nodeId"], node.as_str());
    }
    let listed: Value = cluster
        .http
        .get(format!("{}/cluster", cluster.lb))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: BTreeSet<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids, BTreeSet::from(["wrs-1", "wrs-2", "wrs-3"]));

    pub_sub(&cluster).await;
    push_pull(&cluster).await;
    req_repl(&cluster).await;
    fan_in_out(&cluster).await;
    echo(&cluster).await;

    cluster.stop().await;
}

#[tokio::test]
async fn a_stopped_node_moves_its_clients_and_the_channel_survives() {
    let mut cluster = Cluster::start(false).await;
    let channel = cluster.create("pub-sub").await;
    let peers = cluster.join(&channel, 6, false).await;
    let n = peers.len();
    // The node of the first client; at least one other node has clients.
    let victim = peers[0].node.clone();
    assert!(peers.iter().any(|p| p.node != victim));
    let pid = cluster.stop_node(&victim);

    // Its clients are closed with 1012 after the drain delay (nginx has
    // no readiness checks to notice it); the others stay
    // (they take part in the exchange below).
    let (moved, mut peers): (Vec<Peer>, Vec<Peer>) =
        peers.into_iter().partition(|p| p.node == victim);
    for mut peer in moved {
        assert_eq!(peer.ws.expect_close(1012).await, "draining");
    }
    // The script reports the node and keeps running.
    let line = cluster
        .next_line(Duration::from_secs(20), "the script to report the node")
        .await
        .expect("the script ended");
    assert_eq!(line, format!("exited {victim} pid={pid} status=0"));
    assert!(
        matches!(cluster.script.try_wait(), Ok(None)),
        "the script must survive a stopped node"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the stopped node was reaped"
    );

    // The moved clients reconnect through nginx, to the other nodes.
    cluster.top_up(&channel, &mut peers, n).await;
    cluster.locate(&channel, &mut peers).await;
    for peer in &peers {
        assert_ne!(peer.node, victim, "a client on the stopped node");
    }
    // The channel still exists (asked through the balancer) and the
    // stopped node left the cluster.
    let response = cluster
        .http
        .get(format!("{}/channels/{}", cluster.lb, channel.0))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["clients"], n as u64, "{body}");
    let listed: Value = cluster
        .http
        .get(format!("{}/cluster", cluster.lb))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|node| node["id"] != victim.as_str()),
        "{victim} still listed: {listed}"
    );

    // Messages flow between all clients again, exactly once each.
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.ws.send_text(format!("after {i}")).await;
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        let got = sorted(recv_texts(peer, n - 1).await);
        let expected = sorted(
            (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("after {j}"))
                .collect(),
        );
        assert_eq!(got, expected, "pub-sub to {} on {}", peer.id, peer.node);
    }
    assert_quiet(&mut peers).await;
    close_all(peers).await;

    // If NATS dies, the script stops everything else by itself.
    let before = cluster.descendants();
    signal("-KILL", cluster.process("nats").pid);
    let line = cluster
        .next_line(Duration::from_secs(20), "the script to report NATS")
        .await
        .expect("the script ended");
    assert_eq!(
        line,
        format!("exited nats pid={} status=137", cluster.process("nats").pid)
    );
    let status = within(
        Duration::from_secs(30),
        "the script to stop",
        cluster.script.wait(),
    )
    .await
    .unwrap();
    assert_eq!(status.code(), Some(1), "exit status when NATS died");
    cluster.assert_all_gone(&before);
}

/// The drain delay of the HAProxy run's nodes. HAProxy asks each node's
/// agent every second (`agent-inter 1s`), so 3 s leave it time to put a
/// stopped node into DRAIN, and the test time to see it there, before the
/// node closes its clients with 1012 (the nodes' default is 5 s).
const HAPROXY_DRAIN_DELAY_MS: &str = "3000";

/// The HAProxy run's `WRS_MAX_CONNECTIONS` per node, so that the agent
/// weights move visibly: a node with `n` clients weighs `100 - n`.
const HAPROXY_MAX_CONNECTIONS: u64 = 100;

/// Clients per node, from a roster (client id -> node).
fn per_node(roster: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for node in roster.values() {
        *counts.entry(node.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn haproxy_spreads_a_channel_and_moves_a_stopped_nodes_clients_to_the_others() {
    let max = HAPROXY_MAX_CONNECTIONS.to_string();
    let mut cluster = Cluster::start_with(
        Balancer::Haproxy,
        &[
            ("WRS_DRAIN_DELAY_MS", HAPROXY_DRAIN_DELAY_MS),
            ("WRS_MAX_CONNECTIONS", &max),
        ],
    )
    .await;
    let nodes = ["wrs-1", "wrs-2", "wrs-3"];

    // `ready` came once HAProxy had checked all three: UP, /healthz and the
    // agent answered, the agent's weight of an empty node.
    let servers = cluster.haproxy_servers().await;
    assert_eq!(servers.keys().collect::<Vec<_>>(), nodes, "{servers:?}");
    for (name, server) in &servers {
        let up = HaproxyServer {
            status: "UP".into(),
            weight: 100,
            check: "L7OK".into(),
            agent: "L7OK".into(),
        };
        assert_eq!(server, &up, "{name} at the ready line");
    }

    // Six clients of one channel, one after the other through HAProxy:
    // least connections puts two on each node.
    let channel = cluster.create("pub-sub").await;
    let mut peers = Vec::new();
    let n = 6;
    cluster.top_up(&channel, &mut peers, n).await;
    let roster = cluster.locate(&channel, &mut peers).await;
    let two_each: BTreeMap<String, usize> = nodes.iter().map(|n| (n.to_string(), 2)).collect();
    assert_eq!(per_node(&roster), two_each, "least connections: {roster:?}");
    // The agents report the load: 2 of 100 connections taken.
    common::eventually("HAProxy's weights to follow the agents (98)", || async {
        let servers = cluster.haproxy_servers().await;
        (servers.len() == 3
            && servers
                .values()
                .all(|s| s.status == "UP" && s.weight == HAPROXY_MAX_CONNECTIONS - 2))
        .then_some(())
    })
    .await;

    // SIGTERM to the first client's node: its agent answers `drain` at once,
    // so HAProxy sends it nothing new while it waits out its drain delay.
    let victim = peers[0].node.clone();
    let pid = cluster.stop_node(&victim);
    common::eventually(&format!("{victim} in DRAIN (agent)"), || async {
        let servers = cluster.haproxy_servers().await;
        let others_up = servers
            .iter()
            .filter(|(name, _)| **name != victim)
            .all(|(_, s)| s.status == "UP");
        (servers.get(&victim)?.status == "DRAIN (agent)" && others_up).then_some(())
    })
    .await;
    let (moved, mut peers): (Vec<Peer>, Vec<Peer>) =
        peers.into_iter().partition(|p| p.node == victim);
    assert_eq!(moved.len(), 2);
    for mut peer in moved {
        assert_eq!(peer.ws.expect_close(1012).await, "draining");
    }
    let line = cluster
        .next_line(Duration::from_secs(20), "the script to report the node")
        .await
        .expect("the script ended");
    assert_eq!(line, format!("exited {victim} pid={pid} status=0"));
    assert!(
        matches!(cluster.script.try_wait(), Ok(None)),
        "the script must survive a stopped node"
    );

    // They reconnect through HAProxy: one to each of the other two.
    cluster.top_up(&channel, &mut peers, n).await;
    let roster = cluster.locate(&channel, &mut peers).await;
    let three_each: BTreeMap<String, usize> = nodes
        .iter()
        .filter(|n| **n != victim)
        .map(|n| (n.to_string(), 3))
        .collect();
    assert_eq!(per_node(&roster), three_each, "after the move: {roster:?}");
    // HAProxy: the stopped node DOWN (its /healthz is gone), the others
    // UP weighing 100 - 3.
    common::eventually(&format!("{victim} DOWN, the others at 97"), || async {
        let servers = cluster.haproxy_servers().await;
        let others = servers
            .iter()
            .filter(|(name, _)| **name != victim)
            .all(|(_, s)| s.status == "UP" && s.weight == HAPROXY_MAX_CONNECTIONS - 3);
        (servers.get(&victim)?.status.starts_with("DOWN") && others).then_some(())
    })
    .await;

    // Messages flow between all clients again, exactly once each.
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.ws.send_text(format!("after {i}")).await;
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        let got = sorted(recv_texts(peer, n - 1).await);
        let expected = sorted(
            (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("after {j}"))
                .collect(),
        );
        assert_eq!(got, expected, "pub-sub to {} on {}", peer.id, peer.node);
    }
    assert_quiet(&mut peers).await;
    close_all(peers).await;

    // SIGTERM to the script: HAProxy, the two nodes and NATS stop, the
    // stats socket goes with the temporary directory.
    let stats = cluster.stats.clone().unwrap();
    cluster.stop().await;
    assert!(!stats.exists(), "{} left behind", stats.display());
}

/// `--haproxy` settings are checked before anything starts.
#[tokio::test]
async fn haproxy_settings_are_checked_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, String)]| {
        std::process::Command::new(SCRIPT)
            .args(args)
            .env(
                "WRS_NODE_PORTS",
                format!("{} {} {}", free_port(), free_port(), free_port()),
            )
            .env("WRS_LB_PORT", free_port().to_string())
            .env("WRS_NATS_PORT", free_port().to_string())
            .env("WRS_NATS_MONITOR_PORT", free_port().to_string())
            .env("WRS_BINARY", env!("CARGO_BIN_EXE_wrs"))
            .env("TMPDIR", tmp.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    };
    let refused = |output: std::process::Output, message: &str| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(output.stdout.is_empty(), "{:?}", output.stdout);
        assert!(stderr.contains(message), "expected {message:?}: {stderr}");
    };
    let agents = || format!("{} {} {}", free_port(), free_port(), free_port());

    // wrs.cfg has no TLS frontend.
    refused(
        run(&["--tls", "--haproxy"], &[("WRS_AGENT_PORTS", agents())]),
        "--tls is for nginx only",
    );
    refused(
        run(&["--haproxy"], &[("WRS_LB_TLS", "true".into())]),
        "--tls is for nginx only",
    );
    refused(
        run(&[], &[("WRS_LB", "traefik".into())]),
        "WRS_LB must be nginx or haproxy, not 'traefik'",
    );
    refused(
        run(&["--haproxy"], &[("WRS_AGENT_PORTS", "19091 19092".into())]),
        "WRS_AGENT_PORTS needs three ports",
    );
    // An agent port in use (WRS_LB=haproxy is the same as --haproxy).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    refused(
        run(
            &[],
            &[
                ("WRS_LB", "haproxy".into()),
                (
                    "WRS_AGENT_PORTS",
                    format!("{} {port} {}", free_port(), free_port()),
                ),
            ],
        ),
        &format!("port {port} on 127.0.0.1 is already in use"),
    );
    // An agent port equal to a node's port.
    let same = free_port();
    refused(
        run(
            &["--haproxy"],
            &[
                (
                    "WRS_NODE_PORTS",
                    format!("{same} {} {}", free_port(), free_port()),
                ),
                (
                    "WRS_AGENT_PORTS",
                    format!("{same} {} {}", free_port(), free_port()),
                ),
            ],
        ),
        "the ports must differ",
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn help_and_bad_settings_start_nothing() {
    let help = std::process::Command::new(SCRIPT)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    for word in [
        "Usage: deploy/local-cluster.sh",
        "--tls",
        "WRS_LB_PORT",
        "WRS_NODE_PORTS",
        "WRS_BINARY",
        "compose.conf",
        "--haproxy",
        "WRS_AGENT_PORTS",
        "deploy/haproxy/wrs.cfg",
        "stats=",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    // A port in use is refused before anything starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let refused = std::process::Command::new(SCRIPT)
        .env("WRS_LB_PORT", port.to_string())
        .env(
            "WRS_NODE_PORTS",
            format!("{} {} {}", free_port(), free_port(), free_port()),
        )
        .env("WRS_NATS_PORT", free_port().to_string())
        .env("WRS_NATS_MONITOR_PORT", free_port().to_string())
        .env("WRS_BINARY", env!("CARGO_BIN_EXE_wrs"))
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stdout.is_empty(), "{:?}", refused.stdout);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("port {port} on 127.0.0.1 is already in use")),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // Two nodes only: refused.
    let two = std::process::Command::new(SCRIPT)
        .env("WRS_NODE_PORTS", "18081 18082")
        .env("WRS_BINARY", env!("CARGO_BIN_EXE_wrs"))
        .output()
        .unwrap();
    assert_eq!(two.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&two.stderr).contains("WRS_NODE_PORTS needs three ports"),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
}
