//! Elasticity (SPEC §11) over real sockets: maintenance drains and their
//! end, the paced drain with its queued messages, the HAProxy agent-check,
//! the maximum connection age, per-client rate limits, draining another
//! node of a cluster and rebalancing onto a new node.

mod common;

use std::time::Duration;

use common::nats::{NatsServer, NodeOptions, cluster_ids, metric};
use common::*;
use futures_util::StreamExt;
use reqwest::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The agent-check's answer: one line, then the node closes.
async fn agent_answer(server: &TestServer) -> String {
    let addr = server
        .server()
        .and_then(|s| s.agent_addr())
        .expect("agent port");
    let mut socket = bounded("agent connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let mut line = String::new();
    bounded("agent answer", socket.read_to_string(&mut line))
        .await
        .unwrap();
    line
}

#[tokio::test]
async fn a_maintenance_drain_closes_everyone_with_1012_until_the_node_is_ready_again() {
    let server = TestServer::with(|c| c.drain_rate = 50).await;
    let channel = server.create_pattern("pub-sub").await;
    let mut clients = server.connect_n(&channel, 20).await;

    let (status, body) = server.post("/cluster/test-node/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "draining");
    assert_eq!(
        server.get("/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for client in &mut clients {
        assert_eq!(client.expect_close(1012).await, "draining");
    }
    // Drained: new connections are refused until the node is ready again.
    let (status, body) = server
        .request(
            reqwest::Method::GET,
            &format!("/channels/{}/connect?token={}", channel.id, channel.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        metric(&server, "wrs_client_closes_total{reason=\"draining\"}").await,
        20.0
    );
    assert_eq!(
        metric(&server, "wrs_node_state{state=\"draining\"}").await,
        1.0
    );
    let (_, nodes) = server.get("/cluster").await;
    assert_eq!(nodes["data"][0]["state"], "draining");
    assert_eq!(nodes["data"][0]["weight"], 0);

    // Unknown nodes are not found; a standalone node knows only itself.
    let (status, body) = server.post("/cluster/node-z/drain", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error_envelope(&body, "node_not_found");

    let (status, body) = server.post("/cluster/test-node/ready", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "ready");
    assert_eq!(server.get("/readyz").await.0, StatusCode::OK);
    let mut a = server.connect(&channel).await;
    let mut b = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    a.send_text("back").await;
    assert_eq!(b.recv_text().await, "back");
    assert_eq!(
        metric(&server, "wrs_node_state{state=\"ready\"}").await,
        1.0
    );
}

#[tokio::test]
async fn a_drain_is_paced_and_delivers_what_was_queued_before_each_close() {
    const CLIENTS: usize = 300;
    const RATE: usize = 100;
    const QUEUED: usize = 50;
    let server = TestServer::with(|c| {
        c.drain_rate = RATE as u32;
        c.shutdown_timeout_ms = 30_000;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let subscribers = server.connect_n(&channel, CLIENTS).await;
    let mut publisher = server.connect(&channel).await;
    server
        .wait_for_clients(&channel.id, CLIENTS as u64 + 1)
        .await;
    // Queued for every subscriber, none of which reads yet.
    for i in 0..QUEUED {
        publisher.send_text(format!("m{i}")).await;
    }
    let probe = TestServer::client_of(server.addr);
    eventually("every message relayed", || async {
        let delivered = metric(&probe, "wrs_messages_out_total{pattern=\"pub-sub\"}").await;
        (delivered as usize == QUEUED * CLIENTS).then_some(())
    })
    .await;

    let stopping = Instant::now();
    let stop = tokio::spawn(server.shutdown());
    let readiness = async {
        loop {
            if probe.get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE {
                return stopping.elapsed();
            }
        }
    };
    let not_ready_after = bounded("readiness to fail", readiness).await;
    assert!(
        not_ready_after < Duration::from_millis(100),
        "{not_ready_after:?}"
    );
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut texts = Vec::new();
                loop {
                    match within(Duration::from_secs(30), "drain", ws.stream.next()).await {
                        Some(Ok(Message::Text(text))) => texts.push(text.to_string()),
                        Some(Ok(Message::Close(frame))) => {
                            let at = Instant::now();
                            let frame = frame.expect("close code");
                            return (texts, u16::from(frame.code), frame.reason.to_string(), at);
                        }
                        Some(Ok(_)) => {}
                        other => panic!("ended without a close frame: {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for reader in readers {
        let (texts, code, reason, at) = reader.await.unwrap();
        assert_eq!((code, reason.as_str()), (1012, "draining"));
        let expected: Vec<String> = (0..QUEUED).map(|i| format!("m{i}")).collect();
        assert_eq!(
            texts, expected,
            "everything queued arrives before the close"
        );
        closed_at.push(at);
    }
    bounded("shutdown", stop).await.unwrap();
    // Paced: no second holds more than RATE closes, and the drain took as
    // long as the rate says.
    let busiest = busiest_second(&mut closed_at);
    assert!(busiest <= RATE, "{busiest} closes within one second");
    let span = closed_at[CLIENTS - 1].duration_since(closed_at[0]);
    assert!(
        span >= Duration::from_secs_f64((CLIENTS - RATE) as f64 / RATE as f64),
        "{span:?}"
    );
}

#[tokio::test]
async fn the_agent_check_answers_the_free_share_then_drain() {
    let server = TestServer::with(|c| {
        c.agent_port = Some(0);
        c.max_connections = Some(10);
    })
    .await;
    assert_eq!(agent_answer(&server).await, "up ready 100%\n");
    let channel = server.create_pattern("pub-sub").await;
    let clients = server.connect_n(&channel, 3).await;
    assert_eq!(agent_answer(&server).await, "up ready 70%\n");
    let (_, nodes) = server.get("/cluster").await;
    let node = &nodes["data"][0];
    assert_eq!(
        (
            &node["connections"],
            &node["maxConnections"],
            &node["weight"]
        ),
        (&3.into(), &10.into(), &70.into())
    );
    server.post("/cluster/test-node/drain", "").await;
    assert_eq!(agent_answer(&server).await, "drain\n");
    server.post("/cluster/test-node/ready", "").await;
    // Its clients were closed; once their sockets are gone it is all free.
    drop(clients);
    eventually("all capacity free", || async {
        (agent_answer(&server).await == "up ready 100%\n").then_some(())
    })
    .await;
}

#[tokio::test]
async fn connections_are_closed_with_1012_at_their_maximum_age() {
    let server = TestServer::with(|c| c.max_connection_age_ms = Some(1_000)).await;
    let channel = server.create_pattern("pub-sub").await;
    let connected = Instant::now();
    let mut clients = server.connect_n(&channel, 5).await;
    for client in &mut clients {
        assert_eq!(client.expect_close(1012).await, "max connection age");
    }
    // ±10 %: none before 0.9 s.
    assert!(connected.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        metric(&server, "wrs_client_closes_total{reason=\"max_age\"}").await,
        5.0
    );
}

#[tokio::test]
async fn a_client_over_its_rate_is_throttled_without_losing_a_message() {
    let server = TestServer::with(|c| {
        c.client_rate = Some(10);
        c.client_burst = Some(5);
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let mut sender = server.connect(&channel).await;
    let mut receiver = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    let started = Instant::now();
    for i in 0..30 {
        sender.send_text(format!("m{i}")).await;
    }
    for i in 0..30 {
        assert_eq!(receiver.recv_text().await, format!("m{i}"));
    }
    // 5 at once, then 10 a second: the last one cannot come before 2.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(2_500),
        "{:?}",
        started.elapsed()
    );
    // Throttled, not closed.
    sender.send_text("still here").await;
    assert_eq!(receiver.recv_text().await, "still here");
}

#[tokio::test]
async fn a_client_over_its_rate_is_closed_with_1008_under_the_close_policy() {
    let server = TestServer::with(|c| {
        c.client_rate = Some(1);
        c.client_burst = Some(5);
        c.client_rate_policy = wrs::relay::ClientRatePolicy::Close;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let mut sender = server.connect(&channel).await;
    let mut receiver = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    for i in 0..20 {
        sender.send_text(format!("m{i}")).await;
    }
    let (_, close) = sender.recv_until_close().await;
    assert_eq!(close, Some((1008, "rate limit exceeded".to_owned())));
    for i in 0..5 {
        assert_eq!(receiver.recv_text().await, format!("m{i}"));
    }
    server.wait_for_clients(&channel.id, 1).await;
    assert_eq!(
        metric(&server, "wrs_client_closes_total{reason=\"rate_limited\"}").await,
        1.0
    );
}

#[tokio::test]
async fn any_node_drains_another_and_makes_it_ready_again() {
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = common::nats::node(&options, "node-a").await;
    let b = common::nats::node(&options, "node-b").await;
    eventually("two nodes", || async {
        (cluster_ids(&a).await.len() == 2).then_some(())
    })
    .await;
    let channel = a.create_pattern("pub-sub").await;
    let mut on_b = b.connect(&channel).await;
    b.wait_for_clients(&channel.id, 1).await;

    let (status, body) = a.post("/cluster/node-b/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "draining");
    assert_eq!(b.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(on_b.expect_close(1012).await, "draining");
    eventually("node-b listed as draining with weight 0", || async {
        let (_, nodes) = a.get("/cluster").await;
        nodes["data"]
            .as_array()?
            .iter()
            .any(|n| n["id"] == "node-b" && n["state"] == "draining" && n["weight"] == 0)
            .then_some(())
    })
    .await;
    let (status, body) = a.post("/cluster/node-z/drain", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, body) = a.post("/cluster/node-b/ready", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "ready");
    assert_eq!(b.get("/readyz").await.0, StatusCode::OK);
    let _back = b.connect(&channel).await;
    a.wait_for_clients(&channel.id, 1).await;
}

#[tokio::test]
async fn a_new_node_fills_up_as_the_full_one_sheds_its_excess() {
    const CLIENTS: usize = 400;
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let rebalancing = |c: &mut wrs::Config| {
        c.rebalance = true;
        c.rebalance_rate = 200;
    };
    let (urls, prefix) = (options.urls.clone(), options.prefix.clone());
    let start = |id: &'static str| {
        let (urls, prefix) = (urls.clone(), prefix.clone());
        TestServer::with(move |c| {
            c.nats_url = Some(urls);
            c.cluster = prefix;
            c.node_id = Some(id.into());
            c.cluster_heartbeat_ms = 200;
            rebalancing(c);
        })
    };
    let a = start("node-a").await;
    let channel = a.create_pattern("pub-sub").await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(a.connect(&channel).await);
    }
    a.wait_for_clients(&channel.id, CLIENTS as u64).await;
    let b = start("node-b").await;
    // The shed clients reconnect, as a balancer would send them, to the
    // node that is not shedding.
    let url = b.ws_url(&channel.id, &channel.token);
    let movers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let url = url.clone();
            tokio::spawn(async move {
                // Unbounded: most clients are never shed.
                loop {
                    match ws.stream.next().await {
                        Some(Ok(Message::Close(frame))) => {
                            let frame = frame.expect("close code");
                            assert_eq!(
                                (u16::from(frame.code), frame.reason.as_str()),
                                (1012, "rebalancing")
                            );
                            break;
                        }
                        Some(Ok(_)) => {}
                        other => panic!("ended without a close frame: {other:?}"),
                    }
                }
                let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
                ws
            })
        })
        .collect();
    let count = |server: &TestServer| {
        let probe = TestServer::client_of(server.addr);
        async move {
            let (_, nodes) = probe.get("/cluster").await;
            nodes["data"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["thisNode"] == true))
                .and_then(|n| n["connections"].as_u64())
                .unwrap_or(0)
        }
    };
    eventually_within(
        Duration::from_secs(30),
        "half the clients on each node",
        || async {
            let (on_a, on_b) = (count(&a).await, count(&b).await);
            (on_a + on_b == CLIENTS as u64 && (180..=220).contains(&on_b)).then_some(())
        },
    )
    .await;
    assert!(metric(&a, "wrs_client_closes_total{reason=\"rebalancing\"}").await >= 180.0);
    for mover in movers {
        mover.abort();
    }
}

/// Reads `j<n>` jobs until the connection closes; returns them and the
/// close code.
async fn take_jobs(mut ws: Ws) -> (Vec<u64>, Option<u16>) {
    let mut jobs = Vec::new();
    loop {
        match within(Duration::from_secs(30), "jobs", ws.stream.next()).await {
            Some(Ok(Message::Text(text))) => jobs.push(text[1..].parse().unwrap()),
            Some(Ok(Message::Close(frame))) => return (jobs, frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            _ => return (jobs, None),
        }
    }
}

#[tokio::test]
async fn jobs_in_flight_to_a_drained_nodes_last_worker_go_to_a_worker_elsewhere() {
    const JOBS: u64 = 4_000;
    let nats = NatsServer::start().await;
    let options = NodeOptions::new(nats.url());
    let a = common::nats::node(&options, "node-a").await;
    let b = common::nats::node(&options, "node-b").await;
    let c = common::nats::node(&options, "node-c").await;
    let channel = a.create_pattern("push-pull").await;
    let on_b = b.connect(&channel).await;
    let on_c = c.connect(&channel).await;
    let mut pusher = a.connect(&channel).await;
    common::nats::wait_everywhere(&[&a, &b, &c], &channel.id, 3).await;
    let last_on_b = tokio::spawn(take_jobs(on_b));
    let elsewhere = tokio::spawn(take_jobs(on_c));
    // Jobs alternate between B and C; B is drained while they flow, so
    // node A keeps sending to B's worker for as long as its roster still
    // lists it.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let push = tokio::spawn(async move {
        for n in 0..JOBS {
            pusher.send_text(format!("j{n}")).await;
            counter.store(n + 1, std::sync::atomic::Ordering::SeqCst);
        }
        pusher
    });
    eventually("jobs flowing", || async {
        (sent.load(std::sync::atomic::Ordering::SeqCst) >= JOBS / 4).then_some(())
    })
    .await;
    let (status, body) = b.post("/cluster/node-b/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pusher = bounded("pushing", push).await.unwrap();
    let (on_b, code) = bounded("node B's worker", last_on_b).await.unwrap();
    assert_eq!(code, Some(1012));
    // Node C's worker gets everything else, exactly once.
    let expected = JOBS - on_b.len() as u64;
    // On a timeout the exact check below says what is missing.
    let _ = tokio::time::timeout(WAIT, async {
        while (metric(&c, "wrs_messages_out_total{pattern=\"push-pull\"}").await as u64) < expected
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(pusher);
    c.delete(&format!("/channels/{}", channel.id)).await;
    let (on_c, _) = bounded("node C's worker", elsewhere).await.unwrap();
    let mut all: Vec<u64> = on_b.iter().chain(&on_c).copied().collect();
    all.sort_unstable();
    let missing: Vec<u64> = (0..JOBS)
        .filter(|n| all.binary_search(n).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} jobs lost: {missing:?}",
        missing.len()
    );
    assert_eq!(all.len() as u64, JOBS, "no job twice");
}
