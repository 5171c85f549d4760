//! The shipped `deploy/haproxy/wrs.cfg` in a real HAProxy (apt `haproxy`)
//! in front of NATS and WRS nodes: the agent-check sets HAProxy's weights
//! from the nodes' load and puts a draining node into DRAIN, and a node
//! added to a loaded cluster fills up as the others shed, with clients
//! that reconnect through HAProxy on 1012 as the docs tell them to.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nats::{NatsServer, NodeOptions, free_port, metric};
use common::process::Process;
use common::*;
use futures_util::StreamExt;
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// A node's fixed ports, so HAProxy can list it before it starts.
struct Ports {
    api: u16,
    agent: u16,
}

struct Haproxy {
    _child: Child,
    port: u16,
    stats: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    async fn start(nodes: &[Ports]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("stats.sock");
        let port = free_port();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/haproxy/wrs.cfg");
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .env("WRS_LB_BIND", format!("127.0.0.1:{port}"))
            .env("WRS_LB_STATS", &stats)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (i, node) in nodes.iter().enumerate() {
            command
                .env(
                    format!("WRS_NODE_{}", i + 1),
                    format!("127.0.0.1:{}", node.api),
                )
                .env(format!("WRS_AGENT_{}", i + 1), node.agent.to_string());
        }
        let child = command.spawn().expect("haproxy (apt install haproxy)");
        let haproxy = Haproxy {
            _child: child,
            port,
            stats,
            _dir: dir,
        };
        eventually("haproxy's stats socket", || async {
            tokio::net::UnixStream::connect(&haproxy.stats).await.ok()
        })
        .await;
        haproxy
    }

    /// `show stat` of the backend's servers: name → (status, weight).
    async fn servers(&self) -> HashMap<String, (String, u64)> {
        let mut socket = tokio::net::UnixStream::connect(&self.stats).await.unwrap();
        socket.write_all(b"show stat\n").await.unwrap();
        let mut text = String::new();
        bounded("show stat", socket.read_to_string(&mut text))
            .await
            .unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (px, sv, status, weight) = (
            column("pxname"),
            column("svname"),
            column("status"),
            column("weight"),
        );
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > weight && f[px] == "wrs_nodes" && f[sv].starts_with("wrs-"))
            .map(|f| {
                (
                    f[sv].to_owned(),
                    (f[status].to_owned(), f[weight].parse().unwrap_or(0)),
                )
            })
            .collect()
    }

    fn ws_url(&self, channel: &Created) -> String {
        format!(
            "ws://127.0.0.1:{}/channels/{}/connect?token={}",
            self.port, channel.id, channel.token
        )
    }
}

async fn start_node(
    options: &NodeOptions,
    id: &str,
    ports: &Ports,
    tweak: fn(&mut wrs::Config),
) -> TestServer {
    let (api, agent) = (ports.api, ports.agent);
    common::nats::node_with(options, id, |c| {
        c.api_port = api;
        c.agent_port = Some(agent);
        tweak(c);
    })
    .await
}

fn ports() -> Ports {
    Ports {
        api: free_port(),
        agent: free_port(),
    }
}

/// This node's connections, as it reports them.
async fn connections(server: &TestServer) -> u64 {
    let (_, nodes) = server.get("/cluster").await;
    nodes["data"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["thisNode"] == true))
        .and_then(|n| n["connections"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn haproxy_weights_follow_the_agent_and_a_draining_node_goes_to_drain() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let all = [ports(), ports(), ports()];
    let limit = |c: &mut wrs::Config| c.max_connections = Some(1_000);
    let a = start_node(&options, "node-a", &all[0], limit).await;
    let b = start_node(&options, "node-b", &all[1], limit).await;
    let haproxy = Haproxy::start(&all).await;
    eventually("both nodes up in haproxy at full weight", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-1")? == &("UP".to_owned(), 100)
            && servers.get("wrs-2")? == &("UP".to_owned(), 100))
            .then_some(())
    })
    .await;
    // 200 clients on node-a only: its free share drops to 80 %.
    let channel = a.create_pattern("pub-sub").await;
    let _clients = a.connect_n(&channel, 200).await;
    eventually("haproxy's weights to follow the load", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-1")?.1 == 80 && servers.get("wrs-2")?.1 == 100).then_some(())
    })
    .await;
    // A maintenance drain of node-b, asked of node-a.
    a.post("/cluster/node-b/drain", "").await;
    eventually("node-b in DRAIN", || async {
        let servers = haproxy.servers().await;
        // HAProxy names who put it there.
        (servers.get("wrs-2")?.0 == "DRAIN (agent)").then_some(())
    })
    .await;
    b.post("/cluster/node-b/ready", "").await;
    eventually("node-b back UP", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-2")? == &("UP".to_owned(), 100)).then_some(())
    })
    .await;
}

/// What one reconnecting client saw.
#[derive(Default)]
struct Seen {
    /// Pub-sub: the first sequence number published after its latest
    /// hello (every later one must reach it).
    since: u64,
    /// Pub-sub: the numbers received since the latest hello; push-pull:
    /// every job received, over all its connections.
    received: Vec<u64>,
    moves: u32,
    /// The first 1012: when it came, its reason, and what was received on
    /// that connection before it.
    first_close: Option<(Instant, String, Vec<u64>)>,
    /// Anything but a 1012 close, a hello or a numbered message.
    error: Option<String>,
}

/// Connects through HAProxy; a refusal (no node has room for a moment)
/// is retried after a back-off with jitter, as the tutorial's snippet does.
async fn connect_with_retry(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return ws,
            Err(_) => {
                let backoff = 250 + rand::rng().random_range(0..1000);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
}

/// A client of `url` (a channel with a welcome frame) that reconnects
/// through HAProxy 0-1000 ms after a 1012, as the docs tell users to.
/// Subscribers pass `published`: at each hello they note which messages
/// must reach them from then on.
fn reconnecting(
    mut ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    url: String,
    published: Option<Arc<AtomicU64>>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let failure = match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let mut seen = record.lock().unwrap();
                    if text.contains(r#""type":"hello""#) {
                        if let Some(published) = &published {
                            // The message being sent as this is read may
                            // have been relayed before the join: the next
                            // one cannot have been.
                            seen.since = published.load(Ordering::SeqCst) + 1;
                            seen.received.clear();
                        }
                        continue;
                    }
                    match text.get(1..).and_then(|n| n.parse().ok()) {
                        Some(n) => {
                            seen.received.push(n);
                            continue;
                        }
                        None => format!("unexpected text {text}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    if let Some((1012, reason)) = &close {
                        {
                            let mut seen = record.lock().unwrap();
                            seen.moves += 1;
                            if seen.first_close.is_none() {
                                let before = seen.received.clone();
                                seen.first_close = Some((Instant::now(), reason.clone(), before));
                            }
                        }
                        let jitter = rand::rng().random_range(0..1000);
                        tokio::time::sleep(Duration::from_millis(jitter)).await;
                        ws = connect_with_retry(&url).await;
                        continue;
                    }
                    format!("closed with {close:?}")
                }
                Some(Ok(_)) => continue,
                other => format!("connection ended: {other:?}"),
            };
            record.lock().unwrap().error = Some(failure);
            return;
        }
    });
    (seen, task)
}

/// Sends `prefix` + 0, 1, 2, ... every 20 ms until `stop`, counting in
/// `sent` after each send; returns how many it sent.
fn numbered_sender(
    mut ws: Ws,
    prefix: &'static str,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            ws.send_text(format!("{prefix}{n}")).await;
            n += 1;
            sent.store(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    })
}

#[tokio::test]
async fn a_third_node_behind_haproxy_fills_up_as_the_others_shed_losing_nothing() {
    const SUBSCRIBERS: usize = 1_000;
    const WORKERS: usize = 200;
    const CLIENTS: u64 = (SUBSCRIBERS + WORKERS) as u64;
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let all = [ports(), ports(), ports()];
    let rebalancing = |c: &mut wrs::Config| {
        c.rebalance = true;
        c.rebalance_rate = 200;
    };
    let a = start_node(&options, "node-a", &all[0], rebalancing).await;
    let b = start_node(&options, "node-b", &all[1], rebalancing).await;
    let haproxy = Haproxy::start(&all).await;
    // HAProxy counts a server up until its first check fails.
    eventually("two nodes up in haproxy, the third down", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-1")? == &("UP".to_owned(), 100)
            && servers.get("wrs-2")? == &("UP".to_owned(), 100)
            && servers.get("wrs-3")?.0 == "DOWN")
            .then_some(())
    })
    .await;
    let news = a
        .create(serde_json::json!({"pattern": "pub-sub", "welcome": true}))
        .await;
    let jobs = a
        .create(serde_json::json!({"pattern": "push-pull", "welcome": true}))
        .await;
    let published = Arc::new(AtomicU64::new(0));
    let mut subscribers = Vec::new();
    let mut workers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS as usize {
        let (url, published) = if i % 6 == 5 {
            (haproxy.ws_url(&jobs), None)
        } else {
            (haproxy.ws_url(&news), Some(published.clone()))
        };
        let (ws, _) = bounded("connect", tokio_tungstenite::connect_async(&url))
            .await
            .unwrap();
        let subscriber = published.is_some();
        let (seen, task) = reconnecting(ws, url, published);
        if subscriber {
            subscribers.push(seen);
        } else {
            workers.push(seen);
        }
        tasks.push(task);
    }
    assert_eq!((subscribers.len(), workers.len()), (SUBSCRIBERS, WORKERS));
    eventually("every client connected", || async {
        let (on_a, on_b) = (connections(&a).await, connections(&b).await);
        (on_a + on_b == CLIENTS).then_some(())
    })
    .await;

    // The third node; a publisher and a pusher on it (directly: it only
    // fills up and never sheds) send throughout the move.
    let c = start_node(&options, "node-c", &all[2], rebalancing).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = numbered_sender(c.connect(&news).await, "m", published, stop.clone());
    let pushed = Arc::new(AtomicU64::new(0));
    let pusher = numbered_sender(c.connect(&jobs).await, "j", pushed, stop.clone());
    eventually_within(
        Duration::from_secs(40),
        "every node within 10 % of 400",
        || async {
            let counts = [
                connections(&a).await,
                connections(&b).await,
                // Without the publisher and the pusher.
                connections(&c).await.saturating_sub(2),
            ];
            (counts.iter().sum::<u64>() == CLIENTS
                && counts.iter().all(|n| (360..=440).contains(n)))
            .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let messages = bounded("publisher", publisher).await.unwrap();
    let jobs_sent = bounded("pusher", pusher).await.unwrap();
    assert!(messages > 0 && jobs_sent > 0);

    // Everything sent reaches its clients.
    let last = messages - 1;
    let settled = within(Duration::from_secs(20), "every delivery", async {
        loop {
            let subscribers_done = subscribers.iter().all(|s| {
                let s = s.lock().unwrap();
                s.error.is_some() || s.received.last() == Some(&last)
            });
            let jobs_received: usize = workers
                .iter()
                .map(|w| w.lock().unwrap().received.len())
                .sum();
            if subscribers_done && jobs_received as u64 >= jobs_sent {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // On a timeout the exact checks below say what is missing.
    let _ = tokio::time::timeout(Duration::from_secs(20), settled).await;
    for task in tasks {
        task.abort();
    }
    for (i, seen) in subscribers.iter().enumerate() {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.error, None, "subscriber {i}");
        assert!(
            seen.received.windows(2).all(|w| w[0] < w[1]),
            "subscriber {i}: out of order or repeated"
        );
        let missing: Vec<u64> = (seen.since..messages)
            .filter(|n| seen.received.binary_search(n).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "subscriber {i} (moved {} times) missed {missing:?}",
            seen.moves
        );
    }
    let mut received: Vec<u64> = workers
        .iter()
        .flat_map(|w| {
            let w = w.lock().unwrap();
            assert_eq!(w.error, None);
            w.received.clone()
        })
        .collect();
    received.sort_unstable();
    assert_eq!(
        received,
        (0..jobs_sent).collect::<Vec<_>>(),
        "every job exactly once"
    );
    let moves: u32 = subscribers
        .iter()
        .chain(&workers)
        .map(|s| s.lock().unwrap().moves)
        .sum();
    let shed = metric(&a, "wrs_client_closes_total{reason=\"rebalancing\"}").await
        + metric(&b, "wrs_client_closes_total{reason=\"rebalancing\"}").await;
    eprintln!("{messages} messages and {jobs_sent} jobs sent during the move; {shed} clients shed");
    // Node C's clients all came from the others.
    assert!(shed >= 358.0, "{shed} shed");
    assert_eq!(f64::from(moves), shed);
}

#[tokio::test]
async fn a_node_stopped_under_traffic_drains_at_its_pace_onto_the_others() {
    const CLIENTS: usize = 600;
    const RATE: usize = 200;
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let all = [ports(), ports(), ports()];
    // Node A in its own process, to be stopped with SIGTERM.
    let (api, agent) = (all[0].api.to_string(), all[0].agent.to_string());
    let heartbeat = options.heartbeat_ms.to_string();
    let rate = RATE.to_string();
    let mut process = Process::start(&[
        ("WRS_API_PORT", &api),
        ("WRS_AGENT_PORT", &agent),
        ("WRS_NATS_URL", &options.urls),
        ("WRS_CLUSTER", &options.prefix),
        ("WRS_NODE_ID", "node-a"),
        ("WRS_CLUSTER_HEARTBEAT_MS", &heartbeat),
        ("WRS_REBALANCE", "false"),
        ("WRS_DRAIN_DELAY_MS", "1500"),
        ("WRS_DRAIN_RATE", &rate),
        ("WRS_SHUTDOWN_TIMEOUT_MS", "20000"),
    ])
    .await;
    let a = TestServer::client_of(process.addr);
    let haproxy = Haproxy::start(&all).await;
    eventually("node A alone up in haproxy", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-1")?.0 == "UP"
            && servers.get("wrs-2")?.0 == "DOWN"
            && servers.get("wrs-3")?.0 == "DOWN")
            .then_some(())
    })
    .await;
    let news = a
        .create(serde_json::json!({"pattern": "pub-sub", "welcome": true}))
        .await;
    let published = Arc::new(AtomicU64::new(0));
    let url = haproxy.ws_url(&news);
    let mut subscribers = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (ws, _) = bounded("connect", tokio_tungstenite::connect_async(&url))
            .await
            .unwrap();
        let (seen, task) = reconnecting(ws, url.clone(), Some(published.clone()));
        subscribers.push(seen);
        tasks.push(task);
    }
    eventually("every client on node A", || async {
        (connections(&a).await == CLIENTS as u64).then_some(())
    })
    .await;
    let b = start_node(&options, "node-b", &all[1], |_| {}).await;
    let c = start_node(&options, "node-c", &all[2], |_| {}).await;
    eventually("nodes B and C up in haproxy", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-2")?.0 == "UP" && servers.get("wrs-3")?.0 == "UP").then_some(())
    })
    .await;
    // Traffic from node B throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = numbered_sender(b.connect(&news).await, "m", published.clone(), stop.clone());
    eventually("traffic flowing", || async {
        (published.load(Ordering::SeqCst) >= 10).then_some(())
    })
    .await;

    let signalled = Instant::now();
    let before_signal = published.load(Ordering::SeqCst);
    process.signal("TERM");
    let not_ready_after = bounded("readiness to fail", async {
        loop {
            if a.get("/readyz").await.0 == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                return signalled.elapsed();
            }
        }
    })
    .await;
    assert!(
        not_ready_after <= Duration::from_millis(100),
        "{not_ready_after:?}"
    );
    eventually("node A in DRAIN in haproxy", || async {
        (haproxy.servers().await.get("wrs-1")?.0 == "DRAIN (agent)").then_some(())
    })
    .await;
    assert_eq!(
        within(
            Duration::from_secs(30),
            "node A to exit",
            process.exit_code()
        )
        .await,
        0
    );
    eventually_within(
        Duration::from_secs(20),
        "every client on nodes B and C",
        || async {
            // Node B also holds the publisher.
            (connections(&b).await + connections(&c).await == CLIENTS as u64 + 1).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let messages = bounded("publisher", publisher).await.unwrap();
    let last = messages - 1;
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while !subscribers.iter().all(|s| {
            let s = s.lock().unwrap();
            s.error.is_some() || s.received.last() == Some(&last)
        }) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for task in tasks {
        task.abort();
    }
    let mut closed_at = Vec::new();
    for (i, subscriber) in subscribers.iter().enumerate() {
        let s = subscriber.lock().unwrap();
        assert_eq!(s.error, None, "subscriber {i}");
        let (at, reason, before_close) = s.first_close.as_ref().expect("closed by node A");
        assert_eq!(reason, "draining");
        closed_at.push(*at);
        assert!(
            *at >= signalled + Duration::from_millis(1500),
            "before the drain delay"
        );
        // Everything relayed to it before its close frame, gapless: at
        // least what was published before the signal.
        assert_eq!(
            *before_close,
            (0..before_close.len() as u64).collect::<Vec<_>>(),
            "subscriber {i} before its close"
        );
        assert!(before_close.len() as u64 >= before_signal, "subscriber {i}");
        // And on its new node everything published since its hello.
        let missing: Vec<u64> = (s.since..messages)
            .filter(|n| s.received.binary_search(n).is_err())
            .collect();
        assert!(missing.is_empty(), "subscriber {i} missed {missing:?}");
        assert_eq!(s.moves, 1, "subscriber {i}");
    }
    // Paced: no second holds more than the rate.
    let busiest = busiest_second(&mut closed_at);
    let span = closed_at[CLIENTS - 1].duration_since(closed_at[0]);
    eprintln!(
        "not ready {not_ready_after:?} after SIGTERM; {CLIENTS} closes over {span:?}, at most {busiest} in a second; {messages} messages"
    );
    assert!(busiest <= RATE, "{busiest} closes within one second");
    assert!(
        span >= Duration::from_secs_f64((CLIENTS - RATE) as f64 / RATE as f64),
        "{span:?}"
    );
}

/// The channel's clients as (node, transport).
async fn listed(server: &TestServer, channel: &str) -> Vec<(String, String)> {
    let (_, body) = server.get(&format!("/channels/{channel}/clients")).await;
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["node"].as_str().unwrap().to_owned(),
                c["transport"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A browser's `EventSource` through HAProxy on a pub-sub channel with
/// history: its node is drained while messages are published, it gets the
/// `close` event with 1012, reconnects by itself (through HAProxy, onto the
/// other node) with `Last-Event-ID`, and ends with every message exactly
/// once, in order; deleting the channel gives it `close` with 4001.
#[tokio::test]
async fn an_event_source_in_chromium_survives_a_node_drain_without_gap_or_repeat() {
    const TOTAL: u64 = 300;
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    // The shipped configuration lists three servers; the third stays down.
    let all = [ports(), ports(), ports()];
    let a = start_node(&options, "node-a", &all[0], |_| {}).await;
    let b = start_node(&options, "node-b", &all[1], |_| {}).await;
    let haproxy = Haproxy::start(&all).await;
    eventually("both nodes up in haproxy", || async {
        let servers = haproxy.servers().await;
        (servers.get("wrs-1")?.0 == "UP" && servers.get("wrs-2")?.0 == "UP").then_some(())
    })
    .await;
    let feed = a
        .create(serde_json::json!({"pattern": "pub-sub", "history": {"size": 1000}}))
        .await;
    let browser = browser::Browser::start().await;
    browser
        .goto(&format!("http://127.0.0.1:{}/client", haproxy.port))
        .await;
    browser
        .execute(
            r#"
            window.got = []; window.closes = [];
            const es = new EventSource(`/channels/${arguments[0]}/events?token=${arguments[1]}`);
            es.onmessage = (e) => window.got.push([e.lastEventId, e.data]);
            es.addEventListener("close", (e) => {
                const code = JSON.parse(e.data).code;
                window.closes.push(code);
                // The channel is gone: stop the browser from reconnecting.
                if (code === 4001 || code === 4002) es.close();
            });
            window.feed = es;
            "#,
            vec![feed.id.clone().into(), feed.token.clone().into()],
        )
        .await;
    let first = eventually("the EventSource listed", || async {
        let clients = listed(&a, &feed.id).await;
        (clients.len() == 1).then(|| clients[0].clone())
    })
    .await;
    assert_eq!(first.1, "sse");
    let publisher = if first.0 == "node-a" { &b } else { &a };
    let got = || async {
        browser
            .execute("return window.got.length;", vec![])
            .await
            .as_u64()
            .unwrap()
    };
    for n in 0..TOTAL {
        if n == TOTAL / 3 {
            // Some arrived; then its node drains.
            eventually("the first messages in the page", || async {
                (got().await >= 10).then_some(())
            })
            .await;
            let (status, body) = publisher
                .post(&format!("/cluster/{}/drain", first.0), "")
                .await;
            assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        }
        let response = publisher
            .http
            .post(publisher.url(&format!(
                "/channels/{}/messages?token={}",
                feed.id, feed.token
            )))
            .body(n.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually_within(
        Duration::from_secs(30),
        "every message in the page",
        || async { (got().await >= TOTAL).then_some(()) },
    )
    .await;
    let page = browser
        .execute("return {got: window.got, closes: window.closes};", vec![])
        .await;
    let data: Vec<u64> = page["got"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        data,
        (0..TOTAL).collect::<Vec<_>>(),
        "gapless, no repeats, in order"
    );
    let ids: Vec<u64> = page["got"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "offsets increase");
    assert_eq!(page["closes"], serde_json::json!([1012]));
    // It came back on the other node.
    let now = eventually("the EventSource listed again", || async {
        let clients = listed(publisher, &feed.id).await;
        (clients.len() == 1).then(|| clients[0].clone())
    })
    .await;
    assert_ne!(now.0, first.0, "reconnected to the drained node");
    // Deleted: `close` with 4001, and the page stops its EventSource.
    let (status, _) = publisher.delete(&format!("/channels/{}", feed.id)).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    eventually("the 4001 close in the page", || async {
        let state = browser
            .execute("return [window.closes, window.feed.readyState];", vec![])
            .await;
        (state == serde_json::json!([[1012, 4001], 2])).then_some(())
    })
    .await;
    browser.screenshot("sse-drain").await;
    browser.close().await;
}
