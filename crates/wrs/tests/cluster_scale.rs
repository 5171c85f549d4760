//! One channel with 19 000 clients over two node processes and a real
//! `nats-server`: joins, every node's repair of its roster entries each
//! heartbeat, and leaves stay linear in the roster's size, so the roster
//! fills, stays exact through the heartbeats, and empties again.
//! (Its own test binary: the 19 000 client sockets need most of this
//! process's descriptors.)

mod common;

use std::time::Duration;

use common::nats::*;
use common::*;
use futures_util::StreamExt;

const CLIENTS: usize = 19_000;
/// Connects under way at once.
const IN_FLIGHT: usize = 256;
/// Bound for each phase, for a debug build on a busy 2-core machine.
const PHASE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roster_of_19_000_clients_fills_holds_and_empties_exactly() {
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let nats = NatsServer::start().await;
    let mut options = NodeOptions::new(nats.url());
    options.heartbeat_ms = 250;
    let a = WrsProcess::start(&options, "node-a").await;
    let b = WrsProcess::start(&options, "node-b").await;
    let api = TestServer::client_of(a.addr);
    let channel = api.create(serde_json::json!({"pattern": "pub-sub"})).await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    let addrs = [a.addr, b.addr];
    let clients: Vec<RawWs> = within(
        PHASE,
        "19 000 connects",
        futures_util::stream::iter(0..CLIENTS)
            .map(|i| {
                let request = request.clone();
                async move { raw_request(addrs[i % 2], &request).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect(),
    )
    .await;
    assert!(
        clients.iter().all(|c| c.status == 101),
        "refused: {:?}",
        clients.iter().find(|c| c.status != 101).map(|c| &c.head)
    );
    let on_b = TestServer::client_of(b.addr);
    for node in [&api, &on_b] {
        eventually_within(PHASE, "19 000 in the roster everywhere", || async {
            (node.client_count(&channel.id).await == Some(CLIENTS as u64)).then_some(())
        })
        .await;
    }
    // Both nodes keep beating with the full roster (each repair compares
    // 9 500 entries with 9 500 clients), and report their share.
    eventually_within(PHASE, "heartbeats with 9 500 clients each", || async {
        let (_, body) = api.get("/cluster").await;
        let nodes = body["data"].as_array().unwrap();
        (nodes.len() == 2 && nodes.iter().all(|n| n["clients"] == CLIENTS as u64 / 2)).then_some(())
    })
    .await;
    assert_eq!(api.client_count(&channel.id).await, Some(CLIENTS as u64));
    assert_eq!(
        api.client_ids(&channel.id).await.len(),
        CLIENTS,
        "every client listed once"
    );
    drop(clients);
    for node in [&api, &on_b] {
        eventually_within(PHASE, "the roster empties everywhere", || async {
            (node.client_count(&channel.id).await == Some(0)).then_some(())
        })
        .await;
    }
}
