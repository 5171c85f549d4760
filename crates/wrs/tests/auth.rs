//! API authentication (SPEC §6, thesis cases 3.1.1 to 3.2.1): the token
//! in each of its three places, right and wrong; resource rules that
//! protect only some routes; the connect route behind a rule.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOKEN: &str = "api-s3cret-token";

async fn server(resources: &str) -> TestServer {
    let resources: wrs::config::AuthPolicy = resources
        .parse()
        .unwrap_or_else(|e| panic!("{resources:?}: {e}"));
    TestServer::with(move |c| {
        c.auth = true;
        c.auth_token = Some(wrs::config::Secret::new(TOKEN));
        c.auth_resources = resources;
    })
    .await
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let response = bounded("request", request.send()).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap();
    (status, body, headers)
}

/// 3.1.1 right token in the header, 3.1.4 wrong token in the header.
#[tokio::test]
async fn tf_3_1_1_and_3_1_4_bearer_header() {
    let server = server("").await;
    let post = || {
        server
            .http
            .post(server.url("/channels"))
            .body(r#"{"pattern":"echo"}"#)
    };
    let (status, body, _) = send(post().bearer_auth(TOKEN)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body, headers) = send(post().bearer_auth("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_envelope(&body, "invalid_auth");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, body, _) = send(post().header("authorization", format!("Basic {TOKEN}"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_envelope(&body, "invalid_auth");
}

/// 3.1.2 right token in the query, 3.1.5 wrong token in the query.
#[tokio::test]
async fn tf_3_1_2_and_3_1_5_query_parameter() {
    let server = server("").await;
    let post = |query: &str| {
        server
            .http
            .post(server.url(&format!("/channels?{query}")))
            .body(r#"{"pattern":"echo"}"#)
    };
    let (status, body, _) = send(post(&format!("auth={TOKEN}"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body, _) = send(post("auth=wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_envelope(&body, "invalid_auth");
    // Percent-encoding is decoded.
    let server2 = TestServer::with(|c| {
        c.auth = true;
        c.auth_token = Some(wrs::config::Secret::new("a b&c"));
    })
    .await;
    let response = server2
        .http
        .get(server2.url("/channels?auth=a%20b%26c"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// 3.1.3 right token in the body, 3.1.6 wrong token in the body.
#[tokio::test]
async fn tf_3_1_3_and_3_1_6_body_field() {
    let server = server("").await;
    let post = |body: Value| server.http.post(server.url("/channels")).json(&body);
    let (status, body, _) = send(post(json!({"pattern": "pub-sub", "auth": TOKEN}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["data"]["pattern"], "pub-sub");
    let (status, body, _) = send(post(json!({"pattern": "pub-sub", "auth": "wrong"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_envelope(&body, "invalid_auth");
    let (status, body, _) = send(post(json!({"pattern": "pub-sub", "auth": 42}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_envelope(&body, "missing_auth");
    let (status, body, _) = send(post(json!({"pattern": "pub-sub"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error_envelope(&body, "missing_auth");
    // The body field works for DELETE too.
    let channel: Value = server
        .http
        .post(server.url("/channels"))
        .bearer_auth(TOKEN)
        .body(r#"{"pattern":"echo"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = channel["data"]["id"].as_str().unwrap();
    let response = server
        .http
        .delete(server.url(&format!("/channels/{id}")))
        .json(&json!({"auth": TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn everything_is_protected_when_no_resources_are_given() {
    let server = server("").await;
    for path in [
        "/channels",
        "/service",
        "/cluster",
        "/healthz",
        "/metrics",
        "/nope",
    ] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_error_envelope(&body, "missing_auth");
    }
    let response = server
        .http
        .get(server.url("/service"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn resource_rules_protect_only_their_routes() {
    let server = server("POST:/channels DELETE:/channels *:/reset").await;
    // Open: reading, health, docs.
    for path in [
        "/channels",
        "/service",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    // Protected: create, delete, reset.
    let (status, _) = server.post("/channels", r#"{"pattern":"echo"}"#).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let channel: Value = server
        .http
        .post(server.url("/channels"))
        .bearer_auth(TOKEN)
        .body(r#"{"pattern":"echo"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = channel["data"]["id"].as_str().unwrap();
    let (status, _) = server.delete(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server.delete("/reset").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Connecting is not protected here: the channel token alone suffices.
    let created = Created {
        id: id.to_owned(),
        token: channel["token"].as_str().unwrap().to_owned(),
        body: channel.clone(),
    };
    let mut client = server.connect(&created).await;
    client.send_text("open").await;
    assert_eq!(client.recv_text().await, "open");
    // The document marks exactly the protected operations.
    let (_, doc) = server.get("/openapi.json").await;
    assert!(doc["paths"]["/channels"]["post"]["security"].is_array());
    assert!(doc["paths"]["/channels/{id}"]["delete"]["security"].is_array());
    assert!(doc["paths"]["/channels"]["get"]["security"].is_null());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// 3.2.1 the WebSocket connection with the API token in the query.
#[tokio::test]
async fn tf_3_2_1_connect_route_behind_a_rule() {
    let server = server("GET:/channels/.*/connect POST:/channels").await;
    let channel: Value = server
        .http
        .post(server.url("/channels"))
        .bearer_auth(TOKEN)
        .body(r#"{"pattern":"echo"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, token) = (
        channel["data"]["id"].as_str().unwrap(),
        channel["token"].as_str().unwrap(),
    );
    // Without the API token: refused before the upgrade.
    let raw = raw_request(
        server.addr,
        &upgrade_request(&format!("/channels/{id}/connect?token={token}")),
    )
    .await;
    assert_eq!(raw.status, 401);
    let raw = raw_request(
        server.addr,
        &upgrade_request(&format!("/channels/{id}/connect?token={token}&auth=wrong")),
    )
    .await;
    assert_eq!(raw.status, 401);
    // With it in the query (what browsers can do): connected.
    let mut client = server
        .connect_url(&format!(
            "ws://{}/channels/{id}/connect?token={token}&auth={TOKEN}",
            server.addr
        ))
        .await;
    client.send_text("through").await;
    assert_eq!(client.recv_text().await, "through");
    // The API token does not replace the channel token.
    let raw = raw_request(
        server.addr,
        &upgrade_request(&format!("/channels/{id}/connect?token=wrong&auth={TOKEN}")),
    )
    .await;
    assert_eq!(raw.status, 401);
    assert!(raw.head.contains("content-type: application/json"));
}

#[tokio::test]
async fn the_api_token_never_appears_in_metadata() {
    let server = server("POST:/channels").await;
    let (_, service) = server.get("/service").await;
    let (_, doc) = server.get("/openapi.json").await;
    let readme = server
        .http
        .get(server.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for text in [service.to_string(), doc.to_string(), readme] {
        assert!(!text.contains(TOKEN));
    }
}
