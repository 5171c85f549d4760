//! The hardening table (issue 3): floods of bad connects and cross-origin
//! requests. Oversized bodies, oversized frames, invalid UTF-8 and deeply
//! nested frames are covered in validation.rs, abuse.rs and patterns.rs.

mod common;

use common::*;
use reqwest::StatusCode;

#[tokio::test]
async fn a_thousand_rapid_wrong_token_connects_all_get_401_and_the_server_stays_healthy() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut listener = server.connect(&channel).await;
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token=WRONGWRONGWRONG1",
        channel.id
    ));
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let request = request.clone();
        let addr = server.addr;
        attempts.push(tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(100);
            for _ in 0..100 {
                statuses.push(raw_request(addr, &request).await.status);
            }
            statuses
        }));
    }
    let mut total = 0;
    for attempt in attempts {
        let statuses = bounded("attempts", attempt).await.unwrap();
        assert!(statuses.iter().all(|&s| s == 401), "{statuses:?}");
        total += statuses.len();
    }
    assert_eq!(total, 1000);
    let stats = server.service_stats().await;
    assert_eq!(stats["connectionsRejected"], 1000);
    // Healthy: probes answer, the existing client still relays.
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let mut other = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    other.send_text("still fine").await;
    assert_eq!(listener.recv_text().await, "still fine");
}

#[tokio::test]
async fn cors_preflight_allows_json_and_the_authorization_header() {
    let server = TestServer::start().await;
    let response = server
        .http
        .request(reqwest::Method::OPTIONS, server.url("/channels"))
        .header("origin", "http://game.example:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("content-type") && allowed.contains("authorization"),
        "{allowed}"
    );
    // The real request carries the header too.
    let response = server
        .http
        .post(server.url("/channels"))
        .header("origin", "http://game.example:3000")
        .body(r#"{"pattern":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn cors_origins_can_be_restricted() {
    let server = TestServer::with(|c| {
        c.cors_origins = "https://app.example, http://localhost:3000"
            .parse()
            .unwrap()
    })
    .await;
    let preflight = |origin: &'static str| {
        server
            .http
            .request(reqwest::Method::OPTIONS, server.url("/channels"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::with(|c| c.header_timeout_ms = 300).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // The server closes the connection (hyper answers 408 first).
    let mut answer = Vec::new();
    bounded(
        "slow-header connection closed",
        slow.read_to_end(&mut answer),
    )
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // Everyone else is served as usual.
    assert_eq!(server.get("/healthz").await.0, StatusCode::OK);
}
