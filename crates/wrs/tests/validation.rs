//! Bad input of every kind, over real HTTP: each gets the right status, a
//! JSON error envelope naming what is wrong, and disturbs nobody.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn create_rejects_every_row_of_the_bad_input_table() {
    let server = TestServer::start().await;
    // (body, error code, text the message must contain)
    let table: &[(&str, &str, &str)] = &[
        ("", "missing_field", "\"pattern\""),
        ("{}", "missing_field", "\"pattern\""),
        ("{\"pattern\":", "invalid_json", "not valid JSON"),
        ("pattern=pub-sub", "invalid_json", "not valid JSON"),
        ("[\"pub-sub\"]", "invalid_body", "JSON object"),
        ("42", "invalid_body", "JSON object"),
        (
            r#"{"pattern":"pub-sub","color":"red"}"#,
            "unknown_field",
            "\"color\"",
        ),
        (
            r#"{"pattern":"pub-sub","token":"mine"}"#,
            "unknown_field",
            "\"token\"",
        ),
        (r#"{"pattern":"multicast"}"#, "invalid_field", "\"pattern\""),
        (r#"{"pattern":["pub-sub"]}"#, "invalid_field", "\"pattern\""),
        (
            r#"{"pattern":"pub-sub","clientLimit":0}"#,
            "invalid_field",
            "\"clientLimit\"",
        ),
        (
            r#"{"pattern":"pub-sub","clientLimit":-5}"#,
            "invalid_field",
            "\"clientLimit\"",
        ),
        (
            r#"{"pattern":"pub-sub","clientLimit":1.5}"#,
            "invalid_field",
            "\"clientLimit\"",
        ),
        (
            r#"{"pattern":"pub-sub","clientLimit":"10"}"#,
            "invalid_field",
            "\"clientLimit\"",
        ),
        (
            r#"{"pattern":"pub-sub","clientLimit":1000001}"#,
            "invalid_field",
            "\"clientLimit\"",
        ),
        (
            r#"{"pattern":"pub-sub","timeout":0}"#,
            "invalid_field",
            "\"timeout\"",
        ),
        (
            r#"{"pattern":"pub-sub","timeout":-100}"#,
            "invalid_field",
            "\"timeout\"",
        ),
        (
            r#"{"pattern":"pub-sub","timeout":99999999999999}"#,
            "invalid_field",
            "\"timeout\"",
        ),
        (
            r#"{"pattern":"pub-sub","timeout":null}"#,
            "invalid_field",
            "\"timeout\"",
        ),
        (
            r#"{"pattern":"pub-sub","welcome":"true"}"#,
            "invalid_field",
            "\"welcome\"",
        ),
    ];
    for (body, code, mention) in table {
        let (status, response) = server.post("/channels", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {response}");
        assert_error_envelope(&response, code);
        let message = response["message"].as_str().unwrap();
        assert!(
            message.contains(mention),
            "{body}: {message:?} should mention {mention}"
        );
    }
    // Nothing was created along the way.
    let (_, list) = server.get("/channels").await;
    assert_eq!(list["data"], json!([]));
    server.shutdown().await;
}

#[tokio::test]
async fn create_accepts_json_without_a_content_type() {
    // curl -d sends form encoding by default; the body is JSON all the same.
    let server = TestServer::start().await;
    let response = server
        .http
        .post(server.url("/channels"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"pattern":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let server = TestServer::start().await;
    let padding = "x".repeat(70_000);
    let body = format!(r#"{{"pattern":"echo","pad":"{padding}"}}"#);
    let (status, response) = server.post("/channels", &body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_envelope(&response, "body_too_large");
    // Chunked, without a length up front: the same.
    let stream =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 8192])));
    let response = server
        .http
        .post(server.url("/channels"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_error_envelope(&body, "body_too_large");
    // The server is fine afterwards.
    server.create_pattern("echo").await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "not_found");
    for (method, path) in [
        (reqwest::Method::PUT, "/channels"),
        (reqwest::Method::POST, "/service"),
        (reqwest::Method::GET, "/reset"),
        (reqwest::Method::PATCH, "/channels/ABCD-EF01"),
    ] {
        let (status, body) = server.request(method.clone(), path, None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_error_envelope(&body, "method_not_allowed");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_channels_are_404_everywhere() {
    let server = TestServer::start().await;
    for path in [
        "/channels/ABCD-EF01",
        "/channels/ABCD-EF01/clients",
        "/channels/not!an*id",
        "/channel/ZZZZ",
    ] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_error_envelope(&body, "channel_not_found");
    }
    let (status, body) = server.delete("/channels/ABCD-EF01").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "channel_not_found");
    server.shutdown().await;
}

#[tokio::test]
async fn connect_rejects_every_row_of_the_bad_input_table() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "clientLimit": 1}))
        .await;
    let other = server.create_pattern("pub-sub").await;
    let deleted = server.create_pattern("pub-sub").await;
    server.delete(&format!("/channels/{}", deleted.id)).await;
    let id = &channel.id;
    let good = |query: &str| upgrade_request(&format!("/channels/{id}/connect{query}"));
    let with_headers = |query: &str, headers: &str| {
        format!("GET /channels/{id}/connect{query} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n")
    };
    let token = format!("?token={}", channel.token);
    let table: Vec<(String, String, u16, &str)> = vec![
        ("no token".into(), good(""), 401, "missing_token"),
        ("empty token".into(), good("?token="), 401, "invalid_token"),
        (
            "wrong token".into(),
            good("?token=AAAAAAAAAAAAAAAA"),
            401,
            "invalid_token",
        ),
        (
            "token of another channel".into(),
            good(&format!("?token={}", other.token)),
            401,
            "invalid_token",
        ),
        (
            "token with a suffix".into(),
            good(&format!("{token}x")),
            401,
            "invalid_token",
        ),
        (
            "token in another case".into(),
            good(&format!("?token={}", channel.token.to_lowercase())),
            401,
            "invalid_token",
        ),
        (
            "duplicate token".into(),
            good(&format!("{token}&token=x")),
            400,
            "invalid_query",
        ),
        (
            "unknown channel".into(),
            upgrade_request(&format!("/channels/ABCD-EF01/connect{token}")),
            404,
            "channel_not_found",
        ),
        (
            "malformed id".into(),
            upgrade_request(&format!("/channels/%E2%9C%93/connect{token}")),
            404,
            "channel_not_found",
        ),
        (
            "deleted channel".into(),
            upgrade_request(&format!(
                "/channels/{}/connect?token={}",
                deleted.id, deleted.token
            )),
            404,
            "channel_not_found",
        ),
        (
            "plain GET".into(),
            with_headers(&token, ""),
            426,
            "upgrade_required",
        ),
        (
            "version 8".into(),
            with_headers(
                &token,
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n",
            ),
            426,
            "unsupported_websocket_version",
        ),
        (
            "missing key".into(),
            with_headers(
                &token,
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            ),
            400,
            "invalid_handshake",
        ),
        (
            "short key".into(),
            with_headers(
                &token,
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n",
            ),
            400,
            "invalid_handshake",
        ),
        (
            "POST".into(),
            good(&token)
                .replacen("GET", "POST", 1)
                .replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            405,
            "method_not_allowed",
        ),
    ];
    for (name, request, status, code) in &table {
        let mut raw = raw_request(server.addr, request).await;
        assert_eq!(raw.status, *status, "{name}: {}", raw.head);
        let body = raw_json_body(&mut raw).await;
        assert_error_envelope(&body, code);
        if *status == 426 {
            assert!(
                raw.head
                    .to_ascii_lowercase()
                    .contains(if *code == "upgrade_required" {
                        "upgrade: websocket"
                    } else {
                        "sec-websocket-version: 13"
                    }),
                "{name}: {}",
                raw.head
            );
        }
    }
    // Full: with one client in, a second is refused with 409.
    let _first = server.connect(&channel).await;
    let mut raw = raw_request(server.addr, &good(&token)).await;
    assert_eq!(raw.status, 409);
    assert_error_envelope(&raw_json_body(&mut raw).await, "channel_full");
    // None of this disturbed the channel.
    assert_eq!(server.client_count(id).await, Some(1));
    let stats = server.service_stats().await;
    assert_eq!(
        stats["connectionsRejected"],
        table.len() as u64 - 1 /* 405 never reaches the handler */ + 1
    );
    server.shutdown().await;
}
