//! Cluster mode (SPEC §7) with real `nats-server` processes: any node
//! serves any channel, every pattern is exact across nodes, limits and
//! timeouts hold cluster-wide, traffic follows interest, and nodes come
//! and go.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nats::*;
use common::*;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Sends the upgrade `request` to every address at once; returns the
/// connections that were upgraded and how many were refused with 409 (any
/// other answer fails the test).
async fn connect_at_once(
    addrs: impl Iterator<Item = SocketAddr>,
    request: &str,
) -> (Vec<RawWs>, usize) {
    let attempts: Vec<_> = addrs
        .map(|addr| {
            let request = request.to_owned();
            tokio::spawn(async move { raw_request(addr, &request).await })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        let raw = bounded("connect", attempt).await.unwrap();
        match raw.status {
            101 => open.push(raw),
            409 => refused += 1,
            other => panic!("unexpected status {other}: {}", raw.head),
        }
    }
    (open, refused)
}

/// The same channel, addressed through another node.
fn via(channel: &Created) -> Created {
    Created {
        id: channel.id.clone(),
        token: channel.token.clone(),
        body: channel.body.clone(),
    }
}

#[tokio::test]
async fn channels_created_on_one_node_are_usable_on_every_node() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0]
        .create(json!({"pattern": "echo", "clientLimit": 3}))
        .await;
    // Read-your-writes everywhere: no waiting for propagation.
    for node in &nodes[1..] {
        let (status, body) = node.get(&format!("/channels/{}", channel.id)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"]["pattern"], "echo");
        assert_eq!(body["data"]["clientLimit"], 3);
        assert_eq!(body["data"]["createdAt"], channel.body["data"]["createdAt"]);
        assert!(!body.to_string().contains(&channel.token));
    }
    // Listed on every node once the watch delivered it.
    for node in &nodes {
        eventually("listed", || async {
            let (_, list) = node.get("/channels").await;
            list["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"] == channel.id.as_str())
                .then_some(())
        })
        .await;
    }
    // The token works on every node; a wrong one nowhere.
    for node in &nodes {
        let mut client = node.connect(&channel).await;
        client.send_text("hi").await;
        assert_eq!(client.recv_text().await, "hi");
        let refused = raw_request(
            node.addr,
            &upgrade_request(&format!("/channels/{}/connect?token=nope", channel.id)),
        )
        .await;
        assert_eq!(refused.status, 401);
    }
    // /service and /cluster speak of the cluster.
    let (_, service) = nodes[1].get("/service").await;
    assert_eq!(service["data"]["mode"], "cluster");
    assert_eq!(service["data"]["features"]["cluster"], true);
    assert_eq!(service["data"]["cluster"]["natsConnected"], true);
    eventually("three nodes", || async {
        (cluster_ids(&nodes[2]).await == ["node-a", "node-b", "node-c"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn pub_sub_reaches_every_other_client_on_every_node() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0].create_pattern("pub-sub").await;
    let mut a1 = nodes[0].connect(&channel).await;
    let mut a2 = nodes[0].connect(&channel).await;
    let mut b = nodes[1].connect(&via(&channel)).await;
    let mut c = nodes[2].connect(&via(&channel)).await;
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 4).await;
    // Each client's ids and nodes are listed everywhere.
    let (_, listed) = nodes[2]
        .get(&format!("/channels/{}/clients", channel.id))
        .await;
    let mut by_node: HashMap<String, usize> = HashMap::new();
    for client in listed["data"].as_array().unwrap() {
        *by_node
            .entry(client["node"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        by_node,
        HashMap::from([
            ("node-a".to_owned(), 2),
            ("node-b".to_owned(), 1),
            ("node-c".to_owned(), 1)
        ])
    );

    a1.send_text("from a1").await;
    for other in [&mut a2, &mut b, &mut c] {
        assert_eq!(other.recv_text().await, "from a1");
    }
    c.send_text("from c").await;
    // a1's next frame is c's message: its own never came back.
    for other in [&mut a1, &mut a2, &mut b] {
        assert_eq!(other.recv_text().await, "from c");
    }
    // Binary passes through the cluster unchanged.
    b.send_binary(vec![0, 159, 146, 150, 255]).await;
    for other in [&mut a1, &mut a2, &mut c] {
        assert_eq!(
            other.recv().await,
            Message::binary(vec![0u8, 159, 146, 150, 255])
        );
    }
}

#[tokio::test]
async fn push_pull_is_exactly_once_and_fair_across_three_nodes() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0].create_pattern("push-pull").await;
    let mut producer = nodes[0].connect(&channel).await;
    let mut workers = Vec::new();
    for node in &nodes {
        workers.push(node.connect(&via(&channel)).await);
    }
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 4).await;
    const MESSAGES: usize = 3000;
    let readers: Vec<_> = workers
        .into_iter()
        .map(|worker| {
            tokio::spawn(async move {
                let (_sink, mut stream) = worker.stream.split();
                let mut got = Vec::new();
                while let Ok(Some(Ok(message))) =
                    tokio::time::timeout(Duration::from_secs(3), stream.next()).await
                {
                    if let Message::Text(text) = message {
                        got.push(text.parse::<usize>().unwrap());
                    }
                }
                got
            })
        })
        .collect();
    for i in 0..MESSAGES {
        producer.send_text(i.to_string()).await;
    }
    let mut all = Vec::new();
    for reader in readers {
        let got = bounded("worker", reader).await.unwrap();
        // One producer: the rotation over the cluster roster is strict,
        // every worker takes exactly every third message.
        assert_eq!(got.len(), MESSAGES / 3, "share of {MESSAGES}");
        let step: Vec<usize> = got.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            step.iter().all(|&d| d == 3),
            "not a strict rotation: {step:?}"
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "order kept per worker");
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..MESSAGES).collect::<Vec<_>>(),
        "every job exactly once"
    );
}

#[tokio::test]
async fn requests_and_replies_cross_nodes() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;

    // req-repl: a request reaches every other client on every node, with
    // a server-set origin; replies go back across nodes to the origin only.
    let channel = nodes[0].create_pattern("req-repl").await;
    let mut asker = nodes[0].connect(&channel).await;
    let mut x = nodes[1].connect(&via(&channel)).await;
    let mut y = nodes[2].connect(&via(&channel)).await;
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 3).await;
    let asker_id = nodes[1]
        .get(&format!("/channels/{}/clients", channel.id))
        .await
        .1["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["node"] == "node-a")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    asker
        .send_text(r#"{"type":"request","origin":"FFFF-FFFF-FFFF","q":"who?"}"#)
        .await;
    for responder in [&mut x, &mut y] {
        assert_eq!(
            responder.recv_json().await,
            json!({"type": "request", "q": "who?", "origin": asker_id})
        );
    }
    x.send_json(json!({"type": "reply", "origin": asker_id, "from": "x"}))
        .await;
    assert_eq!(asker.recv_json().await["from"], "x");
    // y never saw x's reply: its next frame is the next request.
    asker
        .send_json(json!({"type": "request", "q": "again"}))
        .await;
    assert_eq!(y.recv_json().await["q"], "again");
    assert_eq!(x.recv_json().await["q"], "again");
    // A reply to a client that is not connected anywhere: error frame.
    y.send_json(json!({"type": "reply", "origin": "0000-0000-0001"}))
        .await;
    assert_eq!(y.recv_json().await["error"], "unknown_origin");

    // fan-in-out: requests round-robin over workers on two other nodes,
    // each reply returns to the origin.
    let channel = nodes[0].create_pattern("fan-in-out").await;
    let mut origin = nodes[0].connect(&channel).await;
    let mut workers = vec![
        nodes[1].connect(&via(&channel)).await,
        nodes[2].connect(&via(&channel)).await,
    ];
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 3).await;
    for n in 0..20 {
        origin.send_json(json!({"type": "request", "n": n})).await;
    }
    for worker in &mut workers {
        for _ in 0..10 {
            let request = worker.recv_json().await;
            let n = request["n"].as_i64().unwrap();
            worker
                .send_json(
                    json!({"type": "reply", "origin": request["origin"], "n": n, "square": n * n}),
                )
                .await;
        }
    }
    let mut squares = Vec::new();
    for _ in 0..20 {
        let reply = origin.recv_json().await;
        assert_eq!(reply["square"], reply["n"].as_i64().unwrap().pow(2));
        squares.push(reply["n"].as_i64().unwrap());
    }
    squares.sort_unstable();
    assert_eq!(squares, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_client_limit_holds_for_concurrent_connects_on_all_nodes() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0]
        .create(json!({"pattern": "pub-sub", "clientLimit": 5}))
        .await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    let addrs = (0..20).map(|i| nodes[i % 3].addr);
    let (mut open, refused) = connect_at_once(addrs, &request).await;
    assert_eq!((open.len(), refused), (5, 15));
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 5).await;
    // A place frees up, cluster-wide, when one leaves.
    drop(open.pop());
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 4).await;
    let again = raw_request(nodes[2].addr, &request).await;
    assert_eq!(again.status, 101);
}

/// A burst of connects to one channel: a node writes the joins that
/// arrive while a write is in flight together, and the limit still counts
/// every one of them exactly.
#[tokio::test]
async fn a_burst_of_connects_to_one_channel_fills_it_exactly_to_the_limit() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0]
        .create(json!({"pattern": "pub-sub", "clientLimit": 250}))
        .await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    // 300 at once on node A, 100 on node B.
    let addrs = (0..400).map(|i| nodes[usize::from(i >= 300)].addr);
    let (mut open, refused) = connect_at_once(addrs, &request).await;
    assert_eq!((open.len(), refused), (250, 150));
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 250).await;
    // Leaving in a burst empties the roster just as exactly.
    open.clear();
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 0).await;
}

#[tokio::test]
async fn traffic_on_one_node_keeps_the_channel_alive_everywhere() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let timeout = Duration::from_millis(1500);
    let channel = nodes[0]
        .create(json!({"pattern": "pub-sub", "timeout": timeout.as_millis() as u64}))
        .await;
    let created = Instant::now();
    let mut talkers = nodes[1].connect_n(&via(&channel), 2).await;
    let mut listener = nodes[2].connect(&via(&channel)).await;
    // Traffic only on node B, for twice the timeout.
    while created.elapsed() < timeout * 2 {
        talkers[0].send_text("keep alive").await;
        assert_eq!(talkers[1].recv_text().await, "keep alive");
        assert_eq!(listener.recv_text().await, "keep alive");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for node in &nodes {
        let (status, _) = node.get(&format!("/channels/{}", channel.id)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the channel expired despite traffic"
        );
    }
    // Silence: it times out, and every node closes its clients with 4002.
    assert_eq!(listener.expect_close(4002).await, "channel timed out");
    for talker in &mut talkers {
        assert_eq!(talker.expect_close(4002).await, "channel timed out");
    }
    for node in &nodes {
        eventually("gone", || async {
            (node.get(&format!("/channels/{}", channel.id)).await.0 == StatusCode::NOT_FOUND)
                .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn deleting_on_one_node_closes_clients_on_all_with_4001() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0].create_pattern("pub-sub").await;
    let mut b = nodes[1].connect(&via(&channel)).await;
    let mut c = nodes[2].connect(&via(&channel)).await;
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 2).await;
    let (status, _) = nodes[0].delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.expect_close(4001).await, "channel deleted");
    assert_eq!(c.expect_close(4001).await, "channel deleted");
    for node in &nodes {
        eventually("gone", || async {
            (node.get(&format!("/channels/{}", channel.id)).await.0 == StatusCode::NOT_FOUND)
                .then_some(())
        })
        .await;
    }
    let (status, _) = nodes[2].delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Reset on one node empties the cluster.
    nodes[1].create_pattern("echo").await;
    nodes[2].create_pattern("echo").await;
    let (_, reset) = nodes[0].delete("/reset").await;
    assert_eq!(reset["data"]["deleted"], 2);
    for node in &nodes {
        eventually("empty", || async {
            (node.get("/channels").await.1["data"] == json!([])).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn nats_carries_one_copy_per_interested_node_and_none_to_others() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0].create_pattern("pub-sub").await;
    let mut sender = nodes[0].connect(&channel).await;
    let mut receivers = Vec::new();
    for _ in 0..5 {
        receivers.push(nodes[1].connect(&via(&channel)).await);
    }
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 6).await;
    let published_before = metric(&nodes[0], "wrs_cluster_messages_published_total").await;
    let received_before = metric(&nodes[1], "wrs_cluster_messages_received_total").await;
    for i in 0..50 {
        sender.send_text(format!("m{i}")).await;
    }
    for receiver in &mut receivers {
        for i in 0..50 {
            assert_eq!(receiver.recv_text().await, format!("m{i}"));
        }
    }
    // One NATS message per published message, not one per receiving client.
    assert_eq!(
        metric(&nodes[0], "wrs_cluster_messages_published_total").await - published_before,
        50.0
    );
    assert_eq!(
        metric(&nodes[1], "wrs_cluster_messages_received_total").await - received_before,
        50.0
    );
    // Node C has no client in the channel: it received nothing at all.
    assert_eq!(
        metric(&nodes[2], "wrs_cluster_messages_received_total").await,
        0.0
    );
    assert_eq!(
        metric(&nodes[1], r#"wrs_messages_out_total{pattern="pub-sub"}"#).await,
        250.0
    );
    let _ = sender.stream.close(None).await;
}

#[tokio::test]
async fn twenty_clients_on_three_nodes_exchange_numbered_messages_exactly() {
    const CLIENTS: usize = 20;
    const MESSAGES: usize = 200;
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let channel = nodes[0].create_pattern("pub-sub").await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(nodes[i % 3].connect(&via(&channel)).await);
    }
    wait_everywhere(
        &[&nodes[0], &nodes[1], &nodes[2]],
        &channel.id,
        CLIENTS as u64,
    )
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for (me, client) in clients.into_iter().enumerate() {
        let (mut sink, mut stream) = client.stream.split();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = stream.next().await {
                let (sender, seq) = text.split_once(':').unwrap();
                let _ = tx.send((
                    me,
                    sender.parse::<usize>().unwrap(),
                    seq.parse::<usize>().unwrap(),
                ));
            }
        }));
        let start = std::sync::Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            use futures_util::SinkExt;
            start.wait().await;
            for seq in 0..MESSAGES {
                sink.feed(Message::text(format!("{me}:{seq}")))
                    .await
                    .unwrap();
            }
            sink.flush().await.unwrap();
            std::future::pending::<()>().await;
        }));
    }
    let expected = CLIENTS * (CLIENTS - 1) * MESSAGES;
    let mut next = vec![vec![0usize; CLIENTS]; CLIENTS];
    bounded("all deliveries", async {
        for _ in 0..expected {
            let (receiver, sender, seq) = rx.recv().await.unwrap();
            assert_ne!(receiver, sender, "own message came back");
            assert_eq!(
                seq, next[receiver][sender],
                "receiver {receiver} from {sender}: loss, duplicate or reorder"
            );
            next[receiver][sender] += 1;
        }
    })
    .await;
    assert!(rx.try_recv().is_err());
    let mut delivered = 0.0;
    for node in &nodes {
        delivered += metric(node, r#"wrs_messages_out_total{pattern="pub-sub"}"#).await;
    }
    assert_eq!(delivered, expected as f64, "no extra deliveries anywhere");
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn a_killed_node_leaves_the_cluster_and_its_places_are_released() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    let c = WrsProcess::start(&options, "node-c").await;
    eventually("three nodes", || async {
        (cluster_ids(&a).await.len() == 3).then_some(())
    })
    .await;
    let channel = a
        .create(json!({"pattern": "pub-sub", "clientLimit": 2}))
        .await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    // Both places are taken by clients of node C.
    let c_clients = vec![
        raw_request(c.addr, &request).await,
        raw_request(c.addr, &request).await,
    ];
    assert!(c_clients.iter().all(|r| r.status == 101));
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    assert_eq!(raw_request(a.addr, &request).await.status, 409);

    let killed = Instant::now();
    c.kill().await;
    eventually("node-c to leave /cluster", || async {
        (cluster_ids(&a).await == ["node-a", "node-b"]
            && cluster_ids(&b).await == ["node-a", "node-b"])
        .then_some(())
    })
    .await;
    wait_everywhere(&[&a, &b], &channel.id, 0).await;
    assert!(
        killed.elapsed() < gone_within(options.heartbeat_ms),
        "took {:?}",
        killed.elapsed()
    );
    // The places are free again, and the survivors keep serving.
    let mut x = a.connect(&channel).await;
    let mut y = b.connect(&via(&channel)).await;
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    x.send_text("still here").await;
    assert_eq!(y.recv_text().await, "still here");
    drop(c_clients);
}

#[tokio::test]
async fn evicting_a_dead_node_releases_its_places_at_once() {
    let nats = NatsServer::start().await;
    // Slow heartbeats: the eviction must not wait for them.
    let mut options = NodeOptions::new(nats.url());
    options.heartbeat_ms = 20_000;
    let a = node(&options, "node-a").await;
    let c = WrsProcess::start(&options, "node-c").await;
    let mut seen = Vec::new();
    let joined = tokio::time::timeout(WAIT, async {
        loop {
            seen = cluster_ids(&a).await;
            if seen.len() == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "node-a sees {seen:?}, expected node-a and node-c"
    );
    let channel = a
        .create(json!({"pattern": "pub-sub", "clientLimit": 1}))
        .await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    let held = raw_request(c.addr, &request).await;
    assert_eq!(held.status, 101);
    a.wait_for_clients(&channel.id, 1).await;
    c.kill().await;
    let (status, body) = a.delete("/cluster/node-c").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["removedClients"], 1);
    assert_eq!(cluster_ids(&a).await, ["node-a"]);
    a.wait_for_clients(&channel.id, 0).await;
    assert_eq!(raw_request(a.addr, &request).await.status, 101);
    // Unknown nodes and the node itself cannot be evicted.
    let (status, body) = a.delete("/cluster/node-z").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "node_not_found");
    let (status, body) = a.delete("/cluster/node-a").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error_envelope(&body, "cannot_evict_self");
    drop(held);
}

#[tokio::test]
async fn a_node_that_stops_drains_its_clients_and_leaves_at_once() {
    let nats = NatsServer::start().await;
    let mut options = NodeOptions::new(nats.url());
    options.heartbeat_ms = 20_000;
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    eventually("two nodes", || async {
        (cluster_ids(&a).await.len() == 2).then_some(())
    })
    .await;
    let channel = a.create_pattern("pub-sub").await;
    let mut on_b = b.connect(&via(&channel)).await;
    a.wait_for_clients(&channel.id, 1).await;
    let stopping = tokio::spawn(b.shutdown());
    assert_eq!(on_b.expect_close(1012).await, "draining");
    bounded("shutdown", stopping).await.unwrap();
    // Gone from /cluster and the roster long before any heartbeat expired.
    eventually("node-b to leave", || async {
        (cluster_ids(&a).await == ["node-a"]).then_some(())
    })
    .await;
    a.wait_for_clients(&channel.id, 0).await;
    // The client reconnects to another node.
    let mut again = a.connect(&channel).await;
    again.send_text("moved").await;
    let _ = again.stream.close(None).await;
}

#[tokio::test]
async fn nats_outage_makes_nodes_unready_and_delivery_resumes_after() {
    let mut nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    let channel = a.create_pattern("pub-sub").await;
    let mut a1 = a.connect(&channel).await;
    let mut a2 = a.connect(&channel).await;
    let mut b1 = b.connect(&via(&channel)).await;
    wait_everywhere(&[&a, &b], &channel.id, 3).await;
    assert_eq!(a.get("/readyz").await.0, StatusCode::OK);

    nats.stop().await;
    for node in [&a, &b] {
        eventually("503 without NATS", || async {
            (node.get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await;
    }
    let (_, body) = a.get("/readyz").await;
    assert_error_envelope(&body, "cluster_unavailable");
    // Clients on one node still reach each other.
    a1.send_text("local only").await;
    assert_eq!(a2.recv_text().await, "local only");
    // New connections are refused while the shared roster is unreachable.
    let refused = raw_request(
        a.addr,
        &upgrade_request(&format!(
            "/channels/{}/connect?token={}",
            channel.id, channel.token
        )),
    )
    .await;
    assert_eq!(refused.status, 503);

    nats.restart().await;
    for node in [&a, &b] {
        eventually("ready again", || async {
            (node.get("/readyz").await.0 == StatusCode::OK).then_some(())
        })
        .await;
    }
    // Cross-node delivery resumes (the first messages after a reconnect
    // may race the resubscription, so send until one arrives).
    bounded("cross-node delivery", async {
        loop {
            a1.send_text("across again").await;
            if let Ok(Some(Ok(Message::Text(text)))) =
                tokio::time::timeout(Duration::from_millis(300), b1.stream.next()).await
                && text.as_str() == "across again"
            {
                return;
            }
        }
    })
    .await;
    // The channel survived in NATS's store.
    assert_eq!(
        b.get(&format!("/channels/{}", channel.id)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_node_stops_promptly_while_nats_is_away() {
    let mut nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let (urls, prefix) = (options.urls.clone(), options.prefix.clone());
    let a = TestServer::with(move |c| {
        c.nats_url = Some(urls);
        c.cluster = prefix;
        c.node_id = Some("node-a".into());
        c.shutdown_timeout_ms = 30_000;
    })
    .await;
    let channel = a.create_pattern("pub-sub").await;
    let mut client = a.connect(&channel).await;
    nats.stop().await;
    eventually("503 without NATS", || async {
        (a.get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    // Nothing to wait for: the client is closed with 1012 and the node does
    // not wait out its 30 s shutdown timeout on a store it cannot reach.
    let stopped = tokio::spawn(async move {
        within(Duration::from_secs(5), "stop without NATS", a.shutdown()).await;
    });
    assert_eq!(client.expect_close(1012).await, "draining");
    // Flushes the reply to the close frame.
    client.close().await;
    stopped.await.unwrap();
}

/// Bound for one step of a NATS server failover (reconnect, leader
/// elections), which the shared `WAIT` does not cover on a loaded machine.
const FAILOVER: Duration = Duration::from_secs(40);

#[tokio::test]
async fn losing_one_of_three_nats_servers_loses_no_channel() {
    let mut nats = NatsCluster::start().await;
    let mut options = NodeOptions::new(nats.urls());
    options.replicas = 3;
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    let mut channels = Vec::new();
    for _ in 0..5 {
        channels.push(a.create_pattern("pub-sub").await);
    }
    nats.servers[0].stop().await;
    // The nodes fail over to the remaining servers (readiness is 503 while
    // they reconnect and JetStream elects new leaders), then every channel
    // is still there, from either node, and usable across nodes. Leader
    // elections take seconds, longer on a loaded machine: each step of the
    // failover gets `FAILOVER`.
    for node in [&a, &b] {
        eventually_within(FAILOVER, "ready after failover", || async {
            (node.get("/readyz").await.0 == StatusCode::OK).then_some(())
        })
        .await;
    }
    for channel in &channels {
        for node in [&a, &b] {
            eventually_within(FAILOVER, "channel readable", || async {
                (node.get(&format!("/channels/{}", channel.id)).await.0 == StatusCode::OK)
                    .then_some(())
            })
            .await;
        }
    }
    let channel = &channels[2];
    let url = |server: &TestServer| server.ws_url(&channel.id, &channel.token);
    // Like any client after a 503, retry until the node can reserve again.
    let mut x = connect_retrying(&url(&a)).await;
    let mut y = connect_retrying(&url(&b)).await;
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    x.send_text("survived").await;
    assert_eq!(y.recv_text().await, "survived");
    // New channels can still be created.
    b.create_pattern("echo").await;
}

/// Connects, retrying on 503 (the node is failing over).
async fn connect_retrying(url: &str) -> Ws {
    within(FAILOVER, "connect after failover", async {
        loop {
            match tokio_tungstenite::connect_async(url).await {
                Ok((stream, _)) => return Ws { stream },
                Err(tokio_tungstenite::tungstenite::Error::Http(response))
                    if response.status() == 503 =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("connect {url}: {error}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn nats_token_auth_is_used_and_wrong_credentials_stop_the_start() {
    let nats = NatsServer::start_with(&["--auth".to_owned(), "nats-s3cret".to_owned()]).await;
    let options = NodeOptions::new(nats.url());
    let (urls, prefix) = (options.urls.clone(), options.prefix.clone());
    let good = TestServer::with(|c| {
        c.nats_url = Some(urls);
        c.cluster = prefix;
        c.nats_token = Some(wrs::config::Secret::new("nats-s3cret"));
        c.nats_connect_timeout_ms = 10_000;
    })
    .await;
    good.create_pattern("echo").await;
    let mut config = wrs::Config::for_tests();
    config.nats_url = Some(nats.url());
    config.nats_token = Some(wrs::config::Secret::new("wrong"));
    config.nats_connect_timeout_ms = 1_000;
    let error = wrs::start(config).await.unwrap_err().to_string();
    assert!(error.contains("NATS"), "{error}");
}

#[tokio::test]
async fn nodes_starting_together_on_replicated_buckets_all_join() {
    // The first deploy of a cluster: every node finds no buckets and
    // creates them at the same moment, replicated over three NATS servers.
    // Updating a replicated bucket another node is still creating stalls
    // NATS for 10 s; a node must open what exists and create only what is
    // missing, so all three join well within their connect timeout.
    let nats = NatsCluster::start().await;
    nats.wait_for_jetstream().await;
    let mut options = NodeOptions::new(nats.urls());
    options.replicas = 3;
    options.connect_timeout_ms = 8_000;
    let (a, b, c) = tokio::join!(
        node(&options, "node-a"),
        node(&options, "node-b"),
        node(&options, "node-c")
    );
    let channel = a.create_pattern("pub-sub").await;
    for server in [&b, &c] {
        assert_eq!(
            server.get(&format!("/channels/{}", channel.id)).await.0,
            StatusCode::OK
        );
    }
    eventually("every node listed", || async {
        (cluster_ids(&c).await == ["node-a", "node-b", "node-c"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_nats_that_cannot_carry_the_largest_message_stops_the_start() {
    // NATS's default max_payload is 1 MiB; WRS's largest message is 1 MiB
    // plus headers. Starting would lose such messages between nodes.
    let nats = NatsServer::start_with_default_payload().await;
    let mut config = wrs::Config::for_tests();
    config.nats_url = Some(nats.url());
    config.max_message_bytes = 1_048_576;
    let error = wrs::start(config).await.unwrap_err().to_string();
    assert!(
        error.contains("max_payload is 1048576 bytes")
            && error.contains("WRS_MAX_MESSAGE_BYTES=1048576 needs 1049600")
            && error.contains("max_payload: 2MB")
            && error.contains("at most 1047552"),
        "{error}"
    );
    // A limit that fits starts, and a message of exactly that size crosses.
    let options = NodeOptions::new(nats.url());
    let limit = 1_047_552;
    let node = |id: &'static str| {
        let (urls, prefix) = (options.urls.clone(), options.prefix.clone());
        TestServer::with(move |c| {
            c.nats_url = Some(urls);
            c.cluster = prefix;
            c.node_id = Some(id.to_owned());
            c.max_message_bytes = limit;
        })
    };
    let (a, b) = (node("node-a").await, node("node-b").await);
    let channel = a.create_pattern("pub-sub").await;
    let mut x = a.connect(&channel).await;
    let mut y = b.connect(&channel).await;
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    let big = "x".repeat(limit as usize);
    x.send_text(&big).await;
    assert_eq!(y.recv_text().await.len(), big.len());
}

#[tokio::test]
async fn a_node_with_new_settings_updates_the_existing_buckets() {
    let nats = NatsServer::start().await;
    let mut options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let channel = a.create_pattern("pub-sub").await;
    // Restarted with a longer heartbeat: the nodes bucket's entries must
    // live longer (30 heartbeats), so the bucket is updated, not recreated.
    options.heartbeat_ms = 400;
    let b = node(&options, "node-b").await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream
        .get_stream(format!("KV_{}-nodes", options.prefix))
        .await
        .unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_millis(400 * 30));
    assert_eq!(
        b.get(&format!("/channels/{}", channel.id)).await.0,
        StatusCode::OK
    );
}

/// A watch that fails (its consumer is gone, as when a NATS server of the
/// cluster is lost) starts over with a full replay of its bucket. The
/// replay must not be taken for an empty bucket: that ended every live
/// channel on the node (4001 to its clients) until the replay re-created
/// them, without their rosters.
#[tokio::test]
async fn a_watch_that_starts_over_ends_no_live_channel() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    let channel = a.create_pattern("pub-sub").await;
    let mut x = a.connect(&channel).await;
    let mut y = b.connect(&channel).await;
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    // Every watch consumer of the cluster's buckets is deleted: the watches
    // miss their heartbeats, fail, and replay.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let streams: Vec<String> = jetstream
        .stream_names()
        .try_collect::<Vec<String>>()
        .await
        .unwrap()
        .into_iter()
        .filter(|name| name.starts_with(&format!("KV_{}-", options.prefix)))
        .collect();
    let watched = format!("KV_{}-channels", options.prefix);
    assert!(streams.contains(&watched), "{streams:?}");
    let consumers = |stream: String| {
        let jetstream = jetstream.clone();
        async move {
            let stream = jetstream.get_stream(&stream).await.unwrap();
            stream
                .consumer_names()
                .try_collect::<Vec<String>>()
                .await
                .unwrap()
        }
    };
    let before = consumers(watched.clone()).await;
    assert_eq!(before.len(), 2, "one watch per node: {before:?}");
    for name in &streams {
        let stream = jetstream.get_stream(name).await.unwrap();
        for consumer in consumers(name.clone()).await {
            stream.delete_consumer(&consumer).await.unwrap();
        }
    }
    // Both nodes watch the channels again (new consumers), soon: a watch
    // notices its lost consumer after two missed one-second heartbeats ...
    within(WAIT, "the watches start over", async {
        loop {
            let now = consumers(watched.clone()).await;
            if now.len() == 2 && now.iter().all(|c| !before.contains(c)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // ... and have replayed the bucket: the channel lives on both, with
    // both clients, who still reach each other.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    x.send_text("after the replay").await;
    assert_eq!(y.recv_text().await, "after the replay");
    y.send_text("and back").await;
    assert_eq!(x.recv_text().await, "and back");
}

/// A bucket of the test cluster, opened with a client of our own.
async fn bucket(
    nats: &NatsServer,
    options: &NodeOptions,
    kind: &str,
) -> async_nats::jetstream::kv::Store {
    let client = async_nats::connect(nats.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .get_key_value(format!("{}-{kind}", options.prefix))
        .await
        .unwrap()
}

/// A roster document that cannot be decoded is never taken for an empty
/// one: joins and leaves of its channel fail instead of overwriting it,
/// the error is counted, and the channel can still be deleted.
#[tokio::test]
async fn a_roster_that_cannot_be_read_is_never_overwritten() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    let channel = a.create_pattern("pub-sub").await;
    let x = a.connect(&channel).await;
    let mut y = b.connect(&channel).await;
    wait_everywhere(&[&a, &b], &channel.id, 2).await;
    // B's part of the roster: segment 0 of node-b.
    let rosters = bucket(&nats, &options, "rosters").await;
    let segment = format!("{}.node-b.0", channel.id);
    assert!(rosters.get(&segment).await.unwrap().is_some());
    let garbage = bytes::Bytes::from_static(b"[{\"id\": not json");
    rosters.put(&segment, garbage.clone()).await.unwrap();
    for node in [&a, &b] {
        eventually("the corrupt roster is noticed", || async {
            (metric(node, "wrs_cluster_corrupt_records_total").await >= 1.0).then_some(())
        })
        .await;
    }
    // A join would have to rewrite the document: refused.
    let refused = raw_request(
        a.addr,
        &upgrade_request(&format!(
            "/channels/{}/connect?token={}",
            channel.id, channel.token
        )),
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.head);
    // A leave too: it fails, is counted, and writes nothing.
    let before = metric(&a, "wrs_cluster_corrupt_records_total").await;
    x.close().await;
    eventually("the leave fails on the corrupt roster", || async {
        (metric(&a, "wrs_cluster_corrupt_records_total").await > before).then_some(())
    })
    .await;
    let stored = rosters.entry(&segment).await.unwrap().unwrap();
    assert_eq!(stored.value, garbage, "the segment was overwritten");
    // Deleting the channel still works, everywhere, and removes it.
    let (status, _) = b.delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(y.expect_close(4001).await, "channel deleted");
    eventually("the roster is gone", || async {
        let keys: Vec<String> = rosters.keys().await.unwrap().try_collect().await.unwrap();
        keys.is_empty().then_some(())
    })
    .await;
}

/// Every heartbeat a node repairs its entries in each roster. During a
/// burst of joins that repair must never take out a join written by the
/// same node meanwhile: every version of every segment of the roster lists
/// at least as many clients as the one before.
#[tokio::test]
async fn repairing_a_roster_never_erases_a_join_in_flight() {
    let nats = NatsServer::start().await;
    let mut options = NodeOptions::new(nats.url());
    // Repairs run every 100 ms, many times during the burst.
    options.heartbeat_ms = 100;
    let a = node(&options, "node-a").await;
    let b = node(&options, "node-b").await;
    let channel = a
        .create(json!({"pattern": "pub-sub", "clientLimit": 600}))
        .await;
    let rosters = bucket(&nats, &options, "rosters").await;
    let mut versions = rosters.watch(format!("{}.>", channel.id)).await.unwrap();
    let counts = tokio::spawn(async move {
        let mut counts: HashMap<String, Vec<usize>> = HashMap::new();
        while let Some(Ok(entry)) = versions.next().await {
            if entry.operation != async_nats::jetstream::kv::Operation::Put {
                continue;
            }
            let segment: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
            let count = segment.as_array().unwrap().len();
            counts.entry(entry.key).or_default().push(count);
            if counts.values().map(|h| h.last().unwrap()).sum::<usize>() == 600 {
                return counts;
            }
        }
        counts
    });
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    let mut open = Vec::new();
    // Waves of joins on both nodes, spread over several heartbeats.
    for wave in 0..6 {
        let addrs = (0..100).map(|i| if (i + wave) % 2 == 0 { a.addr } else { b.addr });
        let (mut joined, refused) = connect_at_once(addrs, &request).await;
        assert_eq!(refused, 0);
        open.append(&mut joined);
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    let counts = bounded("every version", counts).await.unwrap();
    assert!(counts.len() >= 4, "segments of 256: {counts:?}");
    for (segment, history) in &counts {
        for pair in history.windows(2) {
            assert!(
                pair[1] >= pair[0],
                "a version of {segment} listed {} clients after one listed {}: a join was erased ({history:?})",
                pair[1],
                pair[0]
            );
        }
    }
    wait_everywhere(&[&a, &b], &channel.id, 600).await;
    drop(open);
    wait_everywhere(&[&a, &b], &channel.id, 0).await;
}

/// Earlier versions ended a channel in two writes: a `closing` mark, then
/// the deletes. A node that died in between left the mark forever, and
/// `/reset` could not remove it. Now any node finishes such an end, and
/// `/reset` removes every key.
#[tokio::test]
async fn a_channel_left_half_ended_by_a_dead_node_is_finished_and_reset_removes_everything() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = node(&options, "node-a").await;
    let channel = a.create_pattern("pub-sub").await;
    let mut client = a.connect(&channel).await;
    let channels = bucket(&nats, &options, "channels").await;
    // What a node of an earlier version left when it died half-way.
    let record = channels.get(&channel.id).await.unwrap().unwrap();
    let mut record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    record["closing"] = json!("timed_out");
    channels
        .put(&channel.id, record.to_string().into())
        .await
        .unwrap();
    // The node closes its clients as the mark says and finishes the end.
    assert_eq!(client.expect_close(4002).await, "channel timed out");
    eventually("the key is gone", || async {
        channels
            .get(&channel.id)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        a.get(&format!("/channels/{}", channel.id)).await.0,
        StatusCode::NOT_FOUND
    );
    // /reset removes live channels and marks alike: nothing is left.
    a.create_pattern("echo").await;
    a.create_pattern("echo").await;
    let mut stuck = record.clone();
    stuck["closing"] = json!("deleted");
    channels
        .put("ABCD-0123", stuck.to_string().into())
        .await
        .unwrap();
    let (status, body) = a.delete("/reset").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("the bucket is empty", || async {
        let keys: Vec<String> = channels.keys().await.unwrap().try_collect().await.unwrap();
        keys.is_empty().then_some(())
    })
    .await;
    assert_eq!(a.get("/channels").await.1["data"], json!([]));
}

/// Every node holds every channel, so WRS_MAX_CHANNELS limits the
/// channels of the whole cluster, and the smallest limit of the live
/// nodes applies: a node with a larger one cannot make a smaller one hold
/// more than it allows.
#[tokio::test]
async fn the_smallest_channel_limit_of_the_live_nodes_applies_cluster_wide() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let node_with = |id: &'static str, max: u32| {
        common::nats::node_with(&options, id, move |c| c.max_channels = max)
    };
    let a = node_with("node-a", 5).await;
    let b = node_with("node-b", 3).await;
    for node in [&a, &b] {
        eventually("both nodes", || async {
            (cluster_ids(node).await.len() == 2).then_some(())
        })
        .await;
    }
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(a.create_pattern("echo").await);
    }
    for node in [&a, &b] {
        eventually("three channels", || async {
            (node.get("/channels").await.1["data"]
                .as_array()
                .unwrap()
                .len()
                == 3)
                .then_some(())
        })
        .await;
        let (status, body) = node.post("/channels", r#"{"pattern":"echo"}"#).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_error_envelope(&body, "too_many_channels");
        assert!(body["message"].as_str().unwrap().contains("3"), "{body}");
    }
    // A place frees up, cluster-wide, when one is deleted.
    let (status, _) = b.delete(&format!("/channels/{}", created[0].id)).await;
    assert_eq!(status, StatusCode::OK);
    eventually("two channels on A", || async {
        (a.get("/channels").await.1["data"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    a.create_pattern("echo").await;
}
