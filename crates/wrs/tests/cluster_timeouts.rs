//! Inactivity timeouts across nodes, with real `nats-server` processes:
//! traffic on any node keeps a channel alive on every node, every node's
//! `countdown` shows the time left as the cluster knows it, and when the
//! channel ends every client everywhere is closed with 4002 — never
//! before the timeout has passed since the last message.

mod common;

use std::time::Duration;

use common::nats::*;
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

const TIMEOUT_MS: u64 = 2000;

/// A message that a client on node B sends, and what the client on node
/// A or B that receives it gets, per pattern.
fn traffic(pattern: &str, n: usize) -> Value {
    match pattern {
        "req-repl" | "fan-in-out" => json!({"type": "request", "n": n}),
        _ => json!({ "n": n }),
    }
}

/// Checks `countdown` on every node: the channel exists and the time left
/// is within (0, timeout].
async fn countdown_everywhere(nodes: &[TestServer], id: &str, pattern: &str) {
    for (i, node) in nodes.iter().enumerate() {
        let (status, body) = node.get(&format!("/channels/{id}")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{pattern}: the channel ended on node {i} while traffic flowed: {body}"
        );
        let countdown = body["data"]["countdown"].as_i64().unwrap();
        assert!(
            countdown > 0 && countdown <= TIMEOUT_MS as i64,
            "{pattern}: countdown {countdown} on node {i}"
        );
    }
}

async fn one_pattern(nodes: &[TestServer], pattern: &'static str) {
    let channel = nodes[0]
        .create(json!({"pattern": pattern, "timeout": TIMEOUT_MS}))
        .await;
    let mut on_a = nodes[0].connect(&channel).await;
    let mut on_b = nodes[1].connect(&channel).await;
    wait_everywhere(&[&nodes[0], &nodes[1], &nodes[2]], &channel.id, 2).await;
    // B sends every 500 ms for 4 s (twice the timeout). On `echo` the
    // traffic never leaves B; on the other patterns it reaches A.
    let start = Instant::now();
    let mut last_sent = start;
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(2 * TIMEOUT_MS) {
        let message = traffic(pattern, n);
        on_b.send_json(message.clone()).await;
        last_sent = Instant::now();
        let receiver = if pattern == "echo" {
            &mut on_b
        } else {
            &mut on_a
        };
        let mut got = receiver.recv_json().await;
        if let Some(object) = got.as_object_mut() {
            object.remove("origin");
        }
        assert_eq!(got, message, "{pattern}");
        countdown_everywhere(nodes, &channel.id, pattern).await;
        n += 1;
        tokio::time::sleep_until(start + Duration::from_millis(500 * n as u64)).await;
    }
    // Silence: every client everywhere is closed with 4002, and not before
    // the timeout has passed since the last message.
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            client.expect_close(4002).await,
            "channel timed out",
            "{pattern}"
        );
        let quiet = last_sent.elapsed();
        assert!(
            quiet >= Duration::from_millis(TIMEOUT_MS),
            "{pattern}: closed {quiet:?} after the last message"
        );
    }
    for node in nodes {
        eventually("gone everywhere", || async {
            (node.get(&format!("/channels/{}", channel.id)).await.0 == StatusCode::NOT_FOUND)
                .then_some(())
        })
        .await;
    }
}

/// The case a new user found: an echo channel created on A with clients
/// on A and B, traffic only on B. The same for every pattern, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_on_any_node_keeps_the_timeout_everywhere_for_every_pattern() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let nodes = &nodes;
    tokio::join!(
        one_pattern(nodes, "echo"),
        one_pattern(nodes, "pub-sub"),
        one_pattern(nodes, "push-pull"),
        one_pattern(nodes, "req-repl"),
        one_pattern(nodes, "fan-in-out"),
    );
}

/// A channel nobody uses ends on time on every node, with 4002 for clients
/// on nodes other than the one that ends it, and every node agrees on the
/// countdown from the start.
#[tokio::test]
async fn an_idle_channel_ends_everywhere_with_4002() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let nodes = three_nodes(&options).await;
    let created = Instant::now();
    let channel = nodes[0]
        .create(json!({"pattern": "pub-sub", "timeout": 1000}))
        .await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(node.connect(&channel).await);
    }
    for client in &mut clients {
        assert_eq!(client.expect_close(4002).await, "channel timed out");
    }
    assert!(created.elapsed() >= Duration::from_millis(1000));
    let closed: f64 = {
        let mut sum = 0.0;
        for node in &nodes {
            eventually("closed everywhere", || async {
                (node.get(&format!("/channels/{}", channel.id)).await.0 == StatusCode::NOT_FOUND)
                    .then_some(())
            })
            .await;
            sum += metric(node, r#"wrs_channels_closed_total{reason="timed_out"}"#).await;
        }
        sum
    };
    // Every node that held the channel counts it as timed out, none as deleted.
    assert_eq!(closed, 3.0);
    for node in &nodes {
        assert_eq!(
            metric(node, r#"wrs_channels_closed_total{reason="deleted"}"#).await,
            0.0
        );
    }
}
