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

/// Whether `path` is one of the HTTP side's (SPEC §10): publish and
/// history (`/messages`) and Server-Sent Events (`/events`).
fn http_side(path: &str) -> bool {
    path.ends_with("/messages") || path.ends_with("/events")
}

/// A fresh channel that `path` can serve: a pub-sub channel with history
/// for the HTTP side (history reads need one, event streams refuse echo),
/// an echo channel for everything else.
async fn channel_for(server: &TestServer, path: &str) -> Created {
    if http_side(path) {
        server
            .create(serde_json::json!({"pattern": "pub-sub", "history": {"size": 10}}))
            .await
    } else {
        server.create_pattern("echo").await
    }
}

/// A request that the route can answer: a real channel for `{id}` (with
/// its token where the route needs it), a valid body for creates. An
/// event stream never ends by itself: its answer is the status and the
/// stream's first chunk.
async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    channel: &Created,
) -> (StatusCode, String) {
    let mut url = server.url(&path.replace("{id}", &channel.id));
    if path.ends_with("/connect") || http_side(path) {
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
    let mut response = bounded(path, request.send()).await.unwrap();
    let status = response.status();
    let is_stream = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_stream {
        let first = bounded(path, response.chunk())
            .await
            .unwrap()
            .unwrap_or_default();
        return (status, String::from_utf8_lossy(&first).into_owned());
    }
    (status, bounded(path, response.text()).await.unwrap())
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
            let channel = channel_for(&server, path).await;
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
            } else if path.ends_with("/events") {
                // The stream starts with its retry line.
                assert_eq!(status, StatusCode::OK, "{body}");
                assert_eq!(body, "retry: 1000\n\n");
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
                let channel = channel_for(&server, path).await;
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
    let keys = |value: &Value| -> Vec<String> {
        let mut keys: Vec<String> = value
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {value}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    // The schema's fields are exactly the fields a real channel with
    // history has; one without history has all but `history`.
    let channel = server
        .create(serde_json::json!({"pattern": "pub-sub", "history": {"size": 3}}))
        .await;
    assert_eq!(props("ChannelView"), keys(&channel.body["data"]));
    let plain = server.create_pattern("pub-sub").await;
    let mut without: Vec<String> = props("ChannelView");
    without.retain(|k| k != "history");
    assert_eq!(keys(&plain.body["data"]), without);
    assert_eq!(props("HistoryView"), keys(&channel.body["data"]["history"]));
    assert_eq!(props("ErrorBody"), ["error", "message"]);
    assert_eq!(props("Created"), ["data", "message", "token"]);
    assert_eq!(
        props("CreateChannel"),
        [
            "auth",
            "clientLimit",
            "history",
            "pattern",
            "timeout",
            "welcome"
        ]
    );
    // The HTTP side's bodies: a publish, a history page and its messages,
    // a listed client, each as the real answers have them.
    let url = |path: &str| {
        server.url(&format!(
            "/channels/{}{path}?token={}",
            channel.id, channel.token
        ))
    };
    let published: Value = server
        .http
        .post(url("/messages"))
        .body("kept")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        keys(&published["data"]),
        ["offset", "receivers"],
        "{published}"
    );
    assert_eq!(props("Published"), ["offset", "receiver", "receivers"]);
    let (status, page) = server
        .get(&format!(
            "/channels/{}/messages?token={}",
            channel.id, channel.token
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(props("HistoryPage"), keys(&page["data"]));
    assert_eq!(props("KeptMessage"), keys(&page["data"]["messages"][0]));
    let _client = server.connect(&channel).await;
    let (_, clients) = server
        .get(&format!("/channels/{}/clients", channel.id))
        .await;
    assert_eq!(props("ClientView"), {
        let mut real = keys(&clients["data"][0]);
        // `node` is there in cluster mode only.
        real.push("node".to_owned());
        real.sort();
        real
    });
    assert_eq!(
        schemas["Transport"]["enum"],
        serde_json::json!(["websocket", "sse"])
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

/// The three operations of the HTTP side (SPEC §10), with their parameters,
/// statuses and content types as the handlers serve them; the singular
/// aliases document the same.
#[tokio::test]
async fn the_http_side_operations_are_documented() {
    let server = TestServer::start().await;
    let (_, doc) = server.get("/openapi.json").await;
    let operation = |method: &str, path: &str| -> Value {
        let found = doc["paths"][path][method].clone();
        assert!(found.is_object(), "{method} {path} is not documented");
        found
    };
    let parameters = |op: &Value| -> Vec<(String, String)> {
        op["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["in"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let statuses = |op: &Value| -> Vec<String> {
        op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    for prefix in ["/channels", "/channel"] {
        let publish = operation("post", &format!("{prefix}/{{id}}/messages"));
        assert_eq!(
            parameters(&publish),
            pairs(&[
                ("id", "path"),
                ("token", "query"),
                ("WRS-Token", "header"),
                ("wait", "query")
            ])
        );
        assert_eq!(
            statuses(&publish),
            ["200", "202", "400", "401", "404", "409", "413", "504"]
        );
        for content_type in ["text/plain", "application/octet-stream"] {
            assert!(
                publish["requestBody"]["content"][content_type].is_object(),
                "{publish}"
            );
        }
        for content_type in ["application/json", "text/plain", "application/octet-stream"] {
            assert!(
                publish["responses"]["200"]["content"][content_type].is_object(),
                "{publish}"
            );
        }
        assert_eq!(
            publish["responses"]["202"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Envelope_Published"
        );

        let history = operation("get", &format!("{prefix}/{{id}}/messages"));
        assert_eq!(
            parameters(&history),
            pairs(&[
                ("id", "path"),
                ("token", "query"),
                ("WRS-Token", "header"),
                ("since", "query"),
                ("limit", "query")
            ])
        );
        assert_eq!(statuses(&history), ["200", "400", "401", "404", "409"]);
        assert_eq!(
            history["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Envelope_HistoryPage"
        );

        let events = operation("get", &format!("{prefix}/{{id}}/events"));
        assert_eq!(
            parameters(&events),
            pairs(&[
                ("id", "path"),
                ("token", "query"),
                ("WRS-Token", "header"),
                ("lastEventId", "query"),
                ("Last-Event-ID", "header")
            ])
        );
        assert_eq!(
            statuses(&events),
            ["200", "400", "401", "404", "409", "503"]
        );
        assert!(
            events["responses"]["200"]["content"]["text/event-stream"].is_object(),
            "{events}"
        );
        let tag = if prefix == "/channels" {
            "http"
        } else {
            "aliases"
        };
        for op in [&publish, &history, &events] {
            assert_eq!(op["tags"], serde_json::json!([tag]), "{op}");
        }
    }
    assert!(
        doc["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "http"),
        "the http tag is described"
    );
}
