//! The OpenAPI document matches the real API: every route the router
//! serves is documented, and every documented operation answers.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn documented(server: &TestServer) -> Vec<(String, String)> {
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut operations = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                let id = operation["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
                assert!(
                    operation["responses"]
                        .as_object()
                        .is_some_and(|r| !r.is_empty()),
                    "{method} {path}"
                );
                operations.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// A request that the route can answer: a real channel for `{id}`, a valid
/// body for creates.
async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    channel: &Created,
) -> (StatusCode, String) {
    let mut url = server.url(&path.replace("{id}", &channel.id));
    if path.ends_with("/connect") {
        url.push_str(&format!("?token={}", channel.token));
    }
    if path.ends_with("/create") {
        url.push_str("?pattern=echo");
    }
    let mut request = server
        .http
        .request(Method::from_bytes(method.as_bytes()).unwrap(), url);
    if method == "POST" {
        request = request.body(r#"{"pattern":"echo"}"#);
    }
    let response = bounded(path, request.send()).await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn every_documented_operation_answers_and_every_route_is_documented() {
    for browser_only in [false, true] {
        let server = TestServer::with(|c| c.browser_only = browser_only).await;
        let operations = documented(&server).await;
        assert_eq!(
            operations.iter().any(|(_, p)| p == "/channels/create"),
            browser_only
        );
        for (method, path) in &operations {
            // A fresh channel each time: some operations delete it.
            let channel = server.create_pattern("echo").await;
            let (status, body) = call(&server, method, path, &channel).await;
            let route_missing = status == StatusCode::METHOD_NOT_ALLOWED
                || (status == StatusCode::NOT_FOUND && body.contains("\"error\":\"not_found\""));
            assert!(
                !route_missing,
                "{method} {path} is documented but not served: {status} {body}"
            );
            if path.ends_with("/connect") {
                // A plain GET to the upgrade route is answered with 426.
                assert_eq!(status, StatusCode::UPGRADE_REQUIRED, "{body}");
            } else if path.starts_with("/cluster/{nodeId}") {
                // A standalone node has no other node to evict, drain or
                // make ready (the test's path names none).
                assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
                assert!(body.contains("node_not_found"), "{body}");
            } else {
                assert!(status.is_success(), "{method} {path}: {status} {body}");
            }
        }
        // The other way round: every method on every documented path that
        // the server does not refuse with 405 must be documented too.
        let paths: std::collections::BTreeSet<_> =
            operations.iter().map(|(_, p)| p.clone()).collect();
        for path in &paths {
            for method in METHODS {
                let method = method.to_uppercase();
                if operations.contains(&(method.clone(), path.clone())) {
                    continue;
                }
                let channel = server.create_pattern("echo").await;
                let (status, body) = call(&server, &method, path, &channel).await;
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented: {body}"
                );
            }
        }
    }
}

#[tokio::test]
async fn schemas_describe_the_real_bodies() {
    let server = TestServer::start().await;
    let (_, doc) = server.get("/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    let props = |name: &str| -> Vec<String> {
        let mut keys: Vec<String> = schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    // The schema's fields are exactly the fields a real channel has.
    let channel = server.create_pattern("pub-sub").await;
    let mut real: Vec<String> = channel.body["data"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    real.sort();
    assert_eq!(props("ChannelView"), real);
    assert_eq!(props("ErrorBody"), ["error", "message"]);
    assert_eq!(props("Created"), ["data", "message", "token"]);
    assert_eq!(
        props("CreateChannel"),
        ["auth", "clientLimit", "pattern", "timeout", "welcome"]
    );
    let patterns: Vec<Value> = schemas["Pattern"]["enum"].as_array().unwrap().clone();
    assert_eq!(
        patterns,
        ["echo", "pub-sub", "push-pull", "req-repl", "fan-in-out"].map(Value::from)
    );
    assert_eq!(
        doc["servers"][0]["url"],
        format!("http://127.0.0.1:{}", server.addr.port())
    );
}

#[tokio::test]
async fn the_built_in_readme_documents_every_path() {
    let server = TestServer::with(|c| c.browser_only = true).await;
    let readme = server
        .http
        .get(server.url("/readme"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (method, path) in documented(&server).await {
        // The singular aliases are documented as one sentence.
        if path.starts_with("/channel/") || path == "/channel" {
            continue;
        }
        let shown = format!("{method} {path}");
        assert!(
            readme.contains(&shown),
            "the readme does not document {shown}"
        );
    }
    assert!(readme.contains("/channel/"), "the aliases are mentioned");
}
