//! `GET /metrics`: the counters move by exactly the expected amounts around
//! a known workload.

mod common;

use std::cell::Cell;
use std::collections::HashMap;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

/// `name{labels} -> value` for every sample line.
async fn scrape(server: &TestServer) -> HashMap<String, f64> {
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

/// The test's own `GET /channels/{id}` requests, by outcome. Waiting for
/// clients polls, so the number of lookups is not known in advance; counted
/// here, the HTTP metrics for the route can be checked exactly.
#[derive(Default)]
struct Lookups {
    found: Cell<u32>,
    not_found: Cell<u32>,
}

impl Lookups {
    /// The channel's client count, or `None` once it is gone (404).
    async fn client_count(&self, server: &TestServer, channel: &str) -> Option<u64> {
        let (status, body) = server.get(&format!("/channels/{channel}")).await;
        let tally = match status {
            StatusCode::OK => &self.found,
            StatusCode::NOT_FOUND => &self.not_found,
            other => panic!("GET /channels/{channel}: {other} {body}"),
        };
        tally.set(tally.get() + 1);
        (status == StatusCode::OK).then(|| body["data"]["clients"].as_u64().expect("clients"))
    }

    async fn wait_for_clients(&self, server: &TestServer, channel: &str, n: u64) {
        eventually(&format!("{n} clients on {channel}"), || async {
            (self.client_count(server, channel).await == Some(n)).then_some(())
        })
        .await;
    }

    /// Connects `n` clients and waits until the server lists all of them.
    async fn connect_n(&self, server: &TestServer, channel: &Created, n: u64) -> Vec<Ws> {
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(server.connect(channel).await);
        }
        self.wait_for_clients(server, &channel.id, n).await;
        clients
    }
}

#[tokio::test]
async fn counters_move_by_exactly_the_workload() {
    let server = TestServer::with(|c| c.max_message_bytes = 1000).await;
    let pubsub = server.create_pattern("pub-sub").await;
    let reqrepl = server.create_pattern("req-repl").await;
    let timed = server
        .create(json!({"pattern": "echo", "timeout": 100}))
        .await;
    let before = scrape(&server).await;
    assert_eq!(before["wrs_channels_open"], 3.0);
    let lookups = Lookups::default();

    // 3 pub-sub clients; 5 messages of 10 bytes from one: 5 in, 10 out.
    let mut p = lookups.connect_n(&server, &pubsub, 3).await;
    for _ in 0..5 {
        p[0].send_text("0123456789").await;
    }
    for client in &mut p[1..] {
        for _ in 0..5 {
            client.recv_text().await;
        }
    }
    // req-repl: one bad frame (an error frame) and one request to 1 other.
    let mut r = lookups.connect_n(&server, &reqrepl, 2).await;
    r[0].send_text("nope").await;
    assert_eq!(r[0].recv_json().await["error"], "invalid_json");
    r[0].send_json(json!({"type": "request"})).await;
    r[1].recv_json().await;
    // Two refused connects, one oversized message.
    raw_request(
        server.addr,
        &upgrade_request(&format!("/channels/{}/connect?token=bad", pubsub.id)),
    )
    .await;
    raw_request(
        server.addr,
        &upgrade_request("/channels/ABCD-EF01/connect?token=x"),
    )
    .await;
    let mut big = server.connect(&pubsub).await;
    big.send_text("x".repeat(1001)).await;
    big.expect_close(1009).await;
    lookups.wait_for_clients(&server, &pubsub.id, 3).await;
    // The timed channel ends.
    eventually("timeout", || async {
        lookups
            .client_count(&server, &timed.id)
            .await
            .is_none()
            .then_some(())
    })
    .await;

    let after = scrape(&server).await;
    let d = |key: &str| delta(&before, &after, key);
    assert_eq!(d(r#"wrs_messages_in_total{pattern="pub-sub"}"#), 5.0);
    assert_eq!(d(r#"wrs_bytes_in_total{pattern="pub-sub"}"#), 50.0);
    assert_eq!(d(r#"wrs_messages_out_total{pattern="pub-sub"}"#), 10.0);
    assert_eq!(d(r#"wrs_bytes_out_total{pattern="pub-sub"}"#), 100.0);
    assert_eq!(d(r#"wrs_messages_in_total{pattern="req-repl"}"#), 2.0);
    assert_eq!(d(r#"wrs_messages_out_total{pattern="req-repl"}"#), 1.0);
    assert_eq!(d(r#"wrs_frame_errors_total{pattern="req-repl"}"#), 1.0);
    assert_eq!(d(r#"wrs_messages_in_total{pattern="echo"}"#), 0.0);
    assert_eq!(
        d(r#"wrs_connect_rejections_total{reason="invalid_token"}"#),
        1.0
    );
    assert_eq!(
        d(r#"wrs_connect_rejections_total{reason="channel_not_found"}"#),
        1.0
    );
    assert_eq!(d("wrs_connections_accepted_total"), 6.0);
    assert_eq!(after["wrs_connections_open"], 5.0);
    assert_eq!(after["wrs_channels_open"], 2.0);
    assert_eq!(d(r#"wrs_channels_closed_total{reason="timed_out"}"#), 1.0);
    assert_eq!(d("wrs_deliveries_dropped_total"), 0.0);
    assert_eq!(d("wrs_slow_consumer_closes_total"), 0.0);
    // HTTP: the first scrape (this one counts only once it has answered)
    // and exactly the lookups made above, by route template.
    let (found, not_found) = (lookups.found.get(), lookups.not_found.get());
    assert!(found >= 3, "one lookup per wait at least: {found}");
    assert_eq!(not_found, 1, "the lookups stop at the first 404");
    assert_eq!(
        d(r#"wrs_http_requests_total{route="/channels/{id}",method="GET",status="200"}"#),
        f64::from(found)
    );
    assert_eq!(
        d(r#"wrs_http_requests_total{route="/channels/{id}",method="GET",status="404"}"#),
        f64::from(not_found)
    );
    assert_eq!(
        d(r#"wrs_http_requests_total{route="/metrics",method="GET",status="200"}"#),
        1.0
    );
    assert_eq!(
        d(r#"wrs_http_request_duration_seconds_count{route="/channels/{id}",method="GET"}"#),
        f64::from(found + not_found)
    );
    // /service shows the same totals.
    let stats = server.service_stats().await;
    assert_eq!(stats["messagesIn"], 7);
    assert_eq!(stats["deliveries"], 11);
}

#[tokio::test]
async fn unknown_methods_and_paths_do_not_grow_the_label_set() {
    let server = TestServer::start().await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
        server
            .http
            .request(method, server.url(&format!("/random/{i}")))
            .send()
            .await
            .unwrap();
    }
    let after = scrape(&server).await;
    let series = after
        .keys()
        .filter(|k| k.starts_with("wrs_http_requests_total"))
        .count();
    assert!(
        series <= 3,
        "{:?}",
        after
            .keys()
            .filter(|k| k.starts_with("wrs_http_requests_total"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        after[r#"wrs_http_requests_total{route="unmatched",method="other",status="404"}"#],
        20.0
    );
}
