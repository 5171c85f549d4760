//! Overload protection (SPEC §11): `WRS_MAX_CONNECTIONS` and the connect
//! rate refuse new connections (503 with `Retry-After`, 1013 for browsers)
//! without disturbing connected clients, and readiness turns 503 from 90 %
//! of the maximum until the node is below 80 % again.

mod common;

use std::time::{Duration, Instant};

use common::nats::metric;
use common::*;
use reqwest::StatusCode;

/// The request a browser sends (with `Origin`).
fn from_browser(request: &str) -> String {
    request.replacen("\r\n", "\r\nOrigin: https://app.example\r\n", 1)
}

/// The close frame that ends a browser's refused connect: (code, reason).
async fn refusal_of(raw: &mut RawWs) -> (u16, String) {
    assert_eq!(raw.status, 101, "{}", raw.head);
    let mut input = tokio::io::AsyncReadExt::chain(&raw.leftover[..], &mut raw.stream);
    let (opcode, payload) = read_server_frame(&mut input).await.expect("close frame");
    assert_eq!(opcode, 0x8);
    (
        close_code_of(&payload),
        String::from_utf8(payload[2..].to_vec()).unwrap(),
    )
}

fn retry_after(raw: &RawWs) -> Option<String> {
    raw.head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after:")
            .map(|v| v.trim().to_owned())
    })
}

async fn readiness(server: &TestServer) -> (StatusCode, String) {
    let (status, body) = server.get("/readyz").await;
    let (_, cluster) = server.get("/cluster").await;
    assert_eq!(
        (status == StatusCode::OK),
        cluster["data"][0]["state"] == "ready",
        "{cluster}"
    );
    let state = cluster["data"][0]["state"].as_str().unwrap().to_owned();
    if state == "overloaded" {
        assert_error_envelope(&body, "overloaded");
    }
    (status, state)
}

#[tokio::test]
async fn the_connection_limit_refuses_newcomers_only_and_readiness_has_hysteresis() {
    let server = TestServer::with(|c| c.max_connections = Some(10)).await;
    let channel = server.create_pattern("pub-sub").await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    let mut clients = server.connect_n(&channel, 8).await;
    assert_eq!(readiness(&server).await, (StatusCode::OK, "ready".into()));
    // 9 of 10: 90 %, not ready; connects are still taken up to the limit.
    clients.push(server.connect(&channel).await);
    assert_eq!(
        readiness(&server).await,
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded".into())
    );
    clients.push(server.connect(&channel).await);
    server.wait_for_clients(&channel.id, 10).await;

    // The 11th: 503 with Retry-After, or 1013 for a browser.
    let mut refused = raw_request(server.addr, &request).await;
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(retry_after(&refused).as_deref(), Some("1"));
    assert_error_envelope(&raw_json_body(&mut refused).await, "overloaded");
    let mut browser = raw_exchange(server.addr, &from_browser(&request)).await;
    assert_eq!(
        refusal_of(&mut browser).await,
        (1013, "overloaded".to_owned())
    );
    assert_eq!(
        metric(
            &server,
            r#"wrs_connect_rejections_total{reason="overloaded"}"#
        )
        .await,
        2.0
    );

    // The ten connected clients noticed nothing: a message reaches the
    // nine others.
    clients[0].send_text("still fine").await;
    for client in &mut clients[1..] {
        assert_eq!(client.recv_text().await, "still fine");
    }
    assert_eq!(server.client_count(&channel.id).await, Some(10));

    // Down to 8 (80 %): still overloaded; to 7: ready again.
    clients.pop().unwrap().close().await;
    clients.pop().unwrap().close().await;
    server.wait_for_clients(&channel.id, 8).await;
    assert_eq!(
        readiness(&server).await,
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded".into())
    );
    clients.pop().unwrap().close().await;
    server.wait_for_clients(&channel.id, 7).await;
    assert_eq!(readiness(&server).await, (StatusCode::OK, "ready".into()));
    // And places are free again.
    clients.push(server.connect(&channel).await);
    server.wait_for_clients(&channel.id, 8).await;
}

/// One connect attempt into a channel with a welcome frame: admitted
/// connections get the hello first, refusals a 503 or (browsers) a close.
enum Attempt {
    Admitted(RawWs),
    Refused(RawWs),
    /// A browser's refusal: the close code and reason.
    Closed(u16, String),
}

async fn attempt(server: &TestServer, request: &str) -> Attempt {
    let mut raw = raw_exchange(server.addr, request).await;
    if raw.status != 101 {
        return Attempt::Refused(raw);
    }
    let mut input = tokio::io::AsyncReadExt::chain(&raw.leftover[..], &mut raw.stream);
    let (opcode, payload) = read_server_frame(&mut input).await.expect("a frame");
    match opcode {
        0x1 => {
            assert!(String::from_utf8_lossy(&payload).contains(r#""type":"hello""#));
            raw.leftover.clear();
            Attempt::Admitted(raw)
        }
        0x8 => Attempt::Closed(
            close_code_of(&payload),
            String::from_utf8(payload[2..].to_vec()).unwrap(),
        ),
        other => panic!("opcode {other}"),
    }
}

#[tokio::test]
async fn connects_faster_than_the_connect_rate_are_refused() {
    let server = TestServer::with(|c| {
        c.connect_rate = Some(1);
        c.connect_burst = Some(3);
    })
    .await;
    let channel = server
        .create(serde_json::json!({"pattern": "pub-sub", "welcome": true}))
        .await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    // The burst of 3, then one a second: connect until refused.
    let started = Instant::now();
    let mut admitted = Vec::new();
    let mut refused = loop {
        match attempt(&server, &request).await {
            Attempt::Admitted(raw) => admitted.push(raw),
            Attempt::Refused(raw) => break raw,
            Attempt::Closed(code, reason) => panic!("closed {code} {reason}"),
        }
        assert!(admitted.len() < 100, "100 connects, none refused");
    };
    let took = started.elapsed();
    assert!(
        (3..=3 + took.as_secs() as usize).contains(&admitted.len()),
        "{} connects got in within {took:?}",
        admitted.len()
    );
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(retry_after(&refused).as_deref(), Some("1"));
    assert_error_envelope(&raw_json_body(&mut refused).await, "connect_rate_exceeded");
    // A browser is told with 1013 and the reason (a token that came
    // meanwhile lets one more in first).
    let browser = loop {
        match attempt(&server, &from_browser(&request)).await {
            Attempt::Admitted(raw) => admitted.push(raw),
            Attempt::Closed(code, reason) => break (code, reason),
            Attempt::Refused(raw) => panic!("a browser got {}", raw.head),
        }
        assert!(admitted.len() < 100, "100 connects, none refused");
    };
    assert_eq!(browser, (1013, "connect_rate_exceeded".to_owned()));
    // Every admitted client is still connected and counted.
    assert_eq!(
        server.client_count(&channel.id).await,
        Some(admitted.len() as u64)
    );
    assert_eq!(
        metric(
            &server,
            r#"wrs_connect_rejections_total{reason="connect_rate_exceeded"}"#
        )
        .await,
        2.0
    );
}

/// `FLOODERS` concurrent connect loops (every other one a browser) until
/// `stop`: the connections admitted and the number refused.
async fn flood(
    addr: std::net::SocketAddr,
    request: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<RawWs>, u64) {
    const FLOODERS: usize = 4;
    let flooders = (0..FLOODERS).map(|i| {
        let request = if i % 2 == 0 {
            request.clone()
        } else {
            from_browser(&request)
        };
        let (stop, flooder) = (stop.clone(), TestServer::client_of(addr));
        async move {
            let (mut admitted, mut refused) = (Vec::new(), 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match attempt(&flooder, &request).await {
                    Attempt::Admitted(raw) => admitted.push(raw),
                    Attempt::Refused(raw) => {
                        assert_eq!(raw.status, 503, "{}", raw.head);
                        assert_eq!(retry_after(&raw).as_deref(), Some("1"));
                        refused += 1;
                    }
                    Attempt::Closed(code, reason) => {
                        assert_eq!(code, 1013);
                        assert!(
                            ["overloaded", "connect_rate_exceeded"].contains(&reason.as_str()),
                            "{reason}"
                        );
                        refused += 1;
                    }
                }
            }
            (admitted, refused)
        }
    });
    let mut total = (Vec::new(), 0);
    for (admitted, refused) in futures_util::future::join_all(flooders).await {
        total.0.extend(admitted);
        total.1 += refused;
    }
    total
}

/// The `q`-quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// Round trips of `clients` (of an echo channel) for `period`, each client
/// in turn; every echo must come back unchanged.
async fn round_trips(clients: &mut [Ws], period: Duration) -> Vec<Duration> {
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < period {
        for client in clients.iter_mut() {
            let text = format!("ping {n}");
            let sent = Instant::now();
            client.send_text(text.clone()).await;
            assert_eq!(client.recv_text().await, text);
            samples.push(sent.elapsed());
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    samples
}

#[tokio::test]
async fn a_connect_flood_is_refused_while_connected_clients_keep_their_latency() {
    const CONNECTED: usize = 10;
    let process = common::process::Process::start(&[
        ("WRS_MAX_CONNECTIONS", "40"),
        ("WRS_CONNECT_RATE", "50"),
        ("WRS_CONNECT_BURST", "20"),
    ])
    .await;
    let server = TestServer::client_of(process.addr);
    let channel = server
        .create(serde_json::json!({"pattern": "echo", "welcome": true}))
        .await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    let mut clients = server.connect_n(&channel, CONNECTED).await;
    for client in &mut clients {
        assert!(client.recv_text().await.contains(r#""type":"hello""#));
    }
    // The bucket refills before the flood.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut before = round_trips(&mut clients, Duration::from_secs(2)).await;

    // The flood runs on its own thread and runtime, so the round trips
    // measure the node, not the flooders' turns on this test's runtime.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (stop, addr, request) = (stop.clone(), process.addr, request.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(flood(addr, request, stop))
        })
    };
    let mut during = round_trips(&mut clients, Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (admitted, refused) = flood.join().unwrap();
    // Up to the maximum, the rest refused, by both rules, and counted.
    assert_eq!(admitted.len(), 40 - CONNECTED);
    assert!(refused > 1_000, "{refused} refusals: not a flood");
    let overloaded = metric(
        &server,
        r#"wrs_connect_rejections_total{reason="overloaded"}"#,
    )
    .await;
    let too_fast = metric(
        &server,
        r#"wrs_connect_rejections_total{reason="connect_rate_exceeded"}"#,
    )
    .await;
    assert!(
        overloaded > 0.0 && too_fast > 0.0,
        "{overloaded} {too_fast}"
    );
    assert_eq!(overloaded + too_fast, refused as f64);
    assert_eq!(server.client_count(&channel.id).await, Some(40));
    // The connected clients noticed nothing: every echo came back, and
    // their latency stayed where it was (compared within this run: the
    // flood shares the machine's two cores with the node).
    let (p50_before, p99_before) = (quantile(&mut before, 0.5), quantile(&mut before, 0.99));
    let (p50_during, p99_during) = (quantile(&mut during, 0.5), quantile(&mut during, 0.99));
    eprintln!(
        "round trips before: p50 {p50_before:?} p99 {p99_before:?} ({} samples); during the flood ({refused} refusals): p50 {p50_during:?} p99 {p99_during:?} ({} samples)",
        before.len(),
        during.len()
    );
    assert!(
        p99_during <= p99_before * 5 + Duration::from_millis(10),
        "p99 {p99_before:?} before, {p99_during:?} during the flood"
    );
    drop(admitted);
}
