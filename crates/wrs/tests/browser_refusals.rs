//! Refused connects as browsers see them (SPEC §5): a browser cannot read
//! the status of a refused upgrade, so a request with `Origin` is upgraded
//! and closed at once with a code mirroring the status and the error code
//! as the reason; without `Origin` the statuses stay.

mod common;

use common::nats::metric;
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Connects the way a browser does (with `Origin`); the connection must be
/// upgraded.
async fn browser_connect(url: &str) -> Ws {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Origin", HeaderValue::from_static("https://app.example"));
    let (stream, response) = bounded(url, tokio_tungstenite::connect_async(request))
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(response.status(), 101);
    Ws { stream }
}

/// The counters of refused connects, by reason, and the open connections.
async fn refusal_counts(server: &TestServer) -> (f64, f64, f64, f64) {
    (
        metric(
            server,
            r#"wrs_connect_rejections_total{reason="channel_not_found"}"#,
        )
        .await,
        metric(
            server,
            r#"wrs_connect_rejections_total{reason="invalid_token"}"#,
        )
        .await,
        metric(
            server,
            r#"wrs_connect_rejections_total{reason="channel_full"}"#,
        )
        .await,
        metric(server, "wrs_connections_open").await,
    )
}

#[tokio::test]
async fn a_browser_learns_each_refusal_from_the_close_code_and_reason() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "clientLimit": 1}))
        .await;
    let mut member = server.connect(&channel).await;
    let base = format!("ws://{}/channels", server.addr);
    let cases = [
        (
            format!("{base}/NOPE-NOPE/connect?token=x"),
            4404,
            "channel_not_found",
        ),
        (
            format!("{base}/{}/connect", channel.id),
            4401,
            "missing_token",
        ),
        (
            format!("{base}/{}/connect?token=wrong", channel.id),
            4401,
            "invalid_token",
        ),
        (
            server.ws_url(&channel.id, &channel.token),
            4409,
            "channel_full",
        ),
    ];
    for (url, code, reason) in cases {
        let mut refused = browser_connect(&url).await;
        assert_eq!(refused.expect_close(code).await, reason, "{url}");
    }
    // None of them took a place or disturbed the member.
    assert_eq!(server.client_count(&channel.id).await, Some(1));
    assert_eq!(refusal_counts(&server).await, (1.0, 1.0, 1.0, 1.0));
    member.send_text("still here").await;
    let (_, list) = server
        .get(&format!("/channels/{}/clients", channel.id))
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    // The place frees up: the same browser connect now gets in.
    member.close().await;
    server.wait_for_clients(&channel.id, 0).await;
    let mut admitted = browser_connect(&server.ws_url(&channel.id, &channel.token)).await;
    admitted.send_text("hello").await;
    server.wait_for_clients(&channel.id, 1).await;
}

#[tokio::test]
async fn without_origin_the_refusals_keep_their_statuses() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "clientLimit": 1}))
        .await;
    let _member = server.connect(&channel).await;
    let cases = [
        (
            "/channels/NOPE-NOPE/connect?token=x".to_owned(),
            404,
            "channel_not_found",
        ),
        (
            format!("/channels/{}/connect", channel.id),
            401,
            "missing_token",
        ),
        (
            format!("/channels/{}/connect?token=wrong", channel.id),
            401,
            "invalid_token",
        ),
        (
            format!("/channels/{}/connect?token={}", channel.id, channel.token),
            409,
            "channel_full",
        ),
    ];
    for (path, status, code) in cases {
        let mut refused = raw_request(server.addr, &upgrade_request(&path)).await;
        assert_eq!(refused.status, status, "{path}: {}", refused.head);
        let body = raw_json_body(&mut refused).await;
        assert_eq!(error_code(&body), code, "{path}");
    }
}

#[tokio::test]
async fn a_broken_handshake_keeps_its_status_even_from_a_browser() {
    let server = TestServer::start().await;
    let path = "/channels/NOPE-NOPE/connect?token=x";
    // No Sec-WebSocket-Key: nothing can be upgraded, so no close code can
    // carry the refusal.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let refused = raw_request(server.addr, &request).await;
    assert_eq!(refused.status, 404, "{}", refused.head);
    // A plain GET from a page is not an upgrade either.
    let (status, body) = server.get(path).await;
    assert_eq!(status, 404);
    assert_error_envelope(&body, "channel_not_found");
}
