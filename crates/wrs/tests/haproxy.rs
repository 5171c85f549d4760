//! The shipped `deploy/haproxy/wrs.cfg` in a real HAProxy (apt `haproxy`)
//! in front of NATS and WRS nodes: the agent-check sets HAProxy's weights
//! from the nodes' load and puts a draining node into DRAIN, and a node
//! added to a loaded cluster fills up as the others shed, with clients
//! that reconnect through HAProxy on 1012 as the docs tell them to.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::nats::{NatsServer, NodeOptions, free_port, metric};
use common::*;
use futures_util::StreamExt;
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
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
    let (urls, prefix, id) = (options.urls.clone(), options.prefix.clone(), id.to_owned());
    let (api, agent) = (ports.api, ports.agent);
    TestServer::with(move |c| {
        c.nats_url = Some(urls);
        c.cluster = prefix;
        c.node_id = Some(id);
        c.cluster_heartbeat_ms = 200;
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

#[tokio::test]
async fn a_third_node_behind_haproxy_fills_up_as_the_others_shed() {
    const CLIENTS: usize = 900;
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
    let channel = a.create_pattern("pub-sub").await;
    let url = haproxy.ws_url(&channel);
    // Clients that reconnect through HAProxy on 1012, at once with
    // 0-1000 ms of jitter, as the tutorial's snippet does.
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (ws, _) = bounded("connect", tokio_tungstenite::connect_async(&url))
            .await
            .unwrap();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut moves = 0u32;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        assert_eq!(code, Some(1012));
                        moves += 1;
                        let jitter = rand::rng().random_range(0..1000);
                        tokio::time::sleep(Duration::from_millis(jitter)).await;
                        // A refusal (no node has room for a moment)
                        // is retried after a back-off, as the snippet does.
                        ws = loop {
                            match tokio_tungstenite::connect_async(&url).await {
                                Ok((ws, _)) => break ws,
                                Err(_) => {
                                    let backoff = 250 + rand::rng().random_range(0..1000);
                                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                                }
                            }
                        };
                    }
                    Some(Ok(_)) => {}
                    _ => return moves,
                }
            }
        }));
    }
    eventually("every client connected", || async {
        let (on_a, on_b) = (connections(&a).await, connections(&b).await);
        (on_a + on_b == CLIENTS as u64).then_some(())
    })
    .await;
    let c = start_node(&options, "node-c", &all[2], rebalancing).await;
    eventually_within(
        Duration::from_secs(40),
        "every node within 10 % of 300",
        || async {
            let counts = [
                connections(&a).await,
                connections(&b).await,
                connections(&c).await,
            ];
            (counts.iter().sum::<u64>() == CLIENTS as u64
                && counts.iter().all(|n| (270..=330).contains(n)))
            .then_some(())
        },
    )
    .await;
    let shed = metric(&a, "wrs_client_closes_total{reason=\"rebalancing\"}").await
        + metric(&b, "wrs_client_closes_total{reason=\"rebalancing\"}").await;
    assert!(shed >= 240.0, "{shed} shed");
    for task in tasks {
        task.abort();
    }
}
