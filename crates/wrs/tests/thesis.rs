//! The thesis' test table, chapter 6.1, cases 1.1.1 to 1.5.1, over real
//! sockets.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use tokio::time::Instant;

/// 1.1.1 the server is created; 1.1.2 its HTTP server runs.
#[tokio::test]
async fn tf_1_1_server_starts_and_serves_http() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"message": "alive", "data": {"status": "ok"}}));
    let (status, body) = server.get("/service").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["name"], "wrs");
    assert_eq!(body["data"]["mode"], "standalone");
    server.shutdown().await;
}

/// 1.2.1 `GET /` and 1.2.2 `GET /readme` return HTML.
#[tokio::test]
async fn tf_1_2_1_and_1_2_2_readme_is_html() {
    let server = TestServer::start().await;
    for path in ["/", "/readme"] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/html"),
            "{path}: {content_type}"
        );
        let html = response.text().await.unwrap();
        assert!(html.starts_with("<!doctype html>"), "{path}");
        assert!(html.contains("<h1>WRS — WebSocket Relay Service</h1>"));
        assert!(html.contains("<table>"), "tables are rendered");
        // Links point at this service.
        assert!(html.contains(&format!("http://127.0.0.1:{}/channels", server.addr.port())));
        assert!(html.contains(&format!("ws://127.0.0.1:{}/channels/", server.addr.port())));
    }
    server.shutdown().await;
}

/// 1.2.3 `GET /cluster` returns the cluster configuration as JSON.
#[tokio::test]
async fn tf_1_2_3_cluster_lists_this_node() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/cluster").await;
    assert_eq!(status, StatusCode::OK);
    let nodes = body["data"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["id"], "test-node");
    assert_eq!(nodes[0]["state"], "ready");
    assert_eq!(nodes[0]["channels"], 0);
    assert_eq!(nodes[0]["clients"], 0);
    server.shutdown().await;
}

/// 1.2.4-1.2.8: list, create, read, delete, list again — exact bodies.
#[tokio::test]
async fn tf_1_2_4_to_1_2_8_rest_crud() {
    let server = TestServer::start().await;

    // 1.2.4 GET /channels: JSON, empty at first.
    let (status, body) = server.get("/channels").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"message": "0 channel(s)", "data": []}));

    // 1.2.5 POST /channels creates the channel, answered as JSON.
    let response = server
        .http
        .post(server.url("/channels"))
        .json(&json!({"pattern": "pub-sub", "clientLimit": 5, "timeout": 60000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: serde_json::Value = response.json().await.unwrap();
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap();
    assert_eq!(location, format!("/channels/{id}"));
    assert_eq!(created["message"], format!("channel {id} created"));
    assert_eq!(token.len(), 16);
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(id.len(), 9);
    assert!(
        id.bytes().enumerate().all(|(i, b)| if i == 4 {
            b == b'-'
        } else {
            b"0123456789ABCDEF".contains(&b)
        }),
        "{id}"
    );
    let data = created["data"].as_object().unwrap();
    let mut keys: Vec<_> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "clientLimit",
            "clients",
            "countdown",
            "createdAt",
            "id",
            "pattern",
            "timeout"
        ]
    );
    assert_eq!(data["pattern"], "pub-sub");
    assert_eq!(data["clientLimit"], 5);
    assert_eq!(data["timeout"], 60000);
    assert_eq!(data["clients"], 0);
    let countdown = data["countdown"].as_i64().unwrap();
    assert!((59_000..=60_000).contains(&countdown), "{countdown}");
    assert!(data["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        created.as_object().unwrap().len(),
        3,
        "message, token, data"
    );

    // 1.2.6 GET /channels/{id} returns it, without the token.
    let (status, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["message"], format!("channel {id}"));
    assert_eq!(body["data"]["id"], id);
    assert_eq!(body["data"]["createdAt"], data["createdAt"]);
    assert!(
        !body.to_string().contains(token),
        "the token leaked: {body}"
    );
    let (_, list) = server.get("/channels").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(token));

    // 1.2.7 DELETE /channels/{id} deletes it.
    let (status, body) = server.delete(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["message"], format!("channel {id} deleted"));
    assert_eq!(body["data"]["id"], id);
    let (status, body) = server.get(&format!("/channels/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "channel_not_found");

    // 1.2.8 GET /channels returns no channels.
    let (_, body) = server.get("/channels").await;
    assert_eq!(body, json!({"message": "0 channel(s)", "data": []}));
    server.shutdown().await;
}

/// 1.3.1 connect over WebSocket and send on an echo channel.
#[tokio::test]
async fn tf_1_3_1_connect_and_echo() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("echo").await;
    let mut client = server.connect(&channel).await;
    client.send_text("ping 1").await;
    assert_eq!(client.recv_text().await, "ping 1");
    client.send_text("ping 2").await;
    assert_eq!(client.recv_text().await, "ping 2");
    client.close().await;
    server.shutdown().await;
}

/// 1.3.2 send and receive on a pub-sub channel between two clients.
#[tokio::test]
async fn tf_1_3_2_pub_sub() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut clients = server.connect_n(&channel, 2).await;
    clients[0].send_text("from a").await;
    assert_eq!(clients[1].recv_text().await, "from a");
    clients[1].send_text("from b").await;
    // a's next frame is b's message: its own never came back.
    assert_eq!(clients[0].recv_text().await, "from b");
    server.shutdown().await;
}

/// 1.3.3 push-pull with three clients spreads messages evenly.
#[tokio::test]
async fn tf_1_3_3_push_pull_distributes_evenly() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("push-pull").await;
    let mut clients = server.connect_n(&channel, 3).await;
    for i in 0..10 {
        clients[0].send_text(format!("job {i}")).await;
    }
    // Two workers, ten jobs: five each, in order.
    let mut got = [Vec::new(), Vec::new()];
    for (worker, received) in got.iter_mut().enumerate() {
        for _ in 0..5 {
            received.push(clients[worker + 1].recv_text().await);
        }
    }
    let expected_a: Vec<_> = (0..10).step_by(2).map(|i| format!("job {i}")).collect();
    let expected_b: Vec<_> = (1..10).step_by(2).map(|i| format!("job {i}")).collect();
    assert_eq!(got[0], expected_a);
    assert_eq!(got[1], expected_b);
    server.shutdown().await;
}

/// 1.3.4 a request and its reply on a req-repl channel.
#[tokio::test]
async fn tf_1_3_4_req_repl() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("req-repl").await;
    let mut clients = server.connect_n(&channel, 2).await;
    let ids = server.client_ids(&channel.id).await;
    clients[0]
        .send_json(json!({"type": "request", "question": "2+2"}))
        .await;
    let request = clients[1].recv_json().await;
    assert_eq!(
        request,
        json!({"type": "request", "question": "2+2", "origin": ids[0]})
    );
    clients[1]
        .send_json(json!({"type": "reply", "origin": request["origin"], "answer": 4}))
        .await;
    let reply = clients[0].recv_json().await;
    assert_eq!(
        reply,
        json!({"type": "reply", "origin": ids[0], "answer": 4})
    );
    server.shutdown().await;
}

/// 1.3.5 connecting with a wrong token fails.
#[tokio::test]
async fn tf_1_3_5_wrong_token_is_rejected() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("echo").await;
    let url = server.ws_url(&channel.id, "wrong-token-1234");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_error_envelope(&body, "invalid_token");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(server.client_count(&channel.id).await, Some(0));
    server.shutdown().await;
}

/// 1.4.1 the channel deletes itself when its timeout runs out — exactly
/// then, on paused time.
#[tokio::test(start_paused = true)]
async fn tf_1_4_1_timeout_deletes_the_channel() {
    let server = TestServer::start().await;
    let start = Instant::now();
    let channel = server
        .create(json!({"pattern": "echo", "timeout": 600}))
        .await;
    assert_elapsed_ms(start, 0, "the create request");
    assert_eq!(channel.body["data"]["countdown"], 600);
    // Connecting is not activity; the client sees how the channel ends.
    let mut client = server.connect(&channel).await;
    // One millisecond before the timeout: still there.
    sleep_until_ms(start, 599).await;
    assert_eq!(server.countdown(&channel.id).await, Some(1));
    assert_elapsed_ms(start, 599, "the GET took no time");
    // At the timeout it ends, closing its client with 4002.
    assert_eq!(client.expect_close(4002).await, "channel timed out");
    assert_elapsed_ms(start, 600, "the timeout fired on time");
    assert_eq!(server.countdown(&channel.id).await, None);
    server.shutdown().await;
}

/// 1.4.2 a message extends the timeout: it ends one timeout after the last
/// message, not after the creation (paused time, exact).
#[tokio::test(start_paused = true)]
async fn tf_1_4_2_messages_extend_the_timeout() {
    let server = TestServer::start().await;
    let start = Instant::now();
    let channel = server
        .create(json!({"pattern": "echo", "timeout": 1500}))
        .await;
    assert_elapsed_ms(start, 0, "the create request");
    let mut client = server.connect(&channel).await;
    sleep_until_ms(start, 700).await;
    assert_eq!(server.countdown(&channel.id).await, Some(800));
    client.send_text("still here").await;
    assert_eq!(client.recv_text().await, "still here");
    assert_elapsed_ms(start, 700, "the message took no time");
    // The countdown restarted with the message: the deadline is 700 + 1500.
    assert_eq!(server.countdown(&channel.id).await, Some(1500));
    // Past the original deadline (1500), one millisecond before the new
    // one, the channel still exists...
    sleep_until_ms(start, 2199).await;
    assert_eq!(server.countdown(&channel.id).await, Some(1));
    // ...and it ends at 2200, closing its client with 4002.
    assert_eq!(client.expect_close(4002).await, "channel timed out");
    assert_elapsed_ms(start, 2200, "the timeout fired on time");
    assert_eq!(server.countdown(&channel.id).await, None);
    server.shutdown().await;
}

/// 1.5.1 the client limit refuses connections past it.
#[tokio::test]
async fn tf_1_5_1_client_limit() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "clientLimit": 3}))
        .await;
    let mut clients = server.connect_n(&channel, 3).await;
    match tokio_tungstenite::connect_async(server.ws_url(&channel.id, &channel.token)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 409);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_error_envelope(&body, "channel_full");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    // A place frees up when a client leaves.
    clients.pop().unwrap().close().await;
    server.wait_for_clients(&channel.id, 2).await;
    let _again = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 3).await;
    server.shutdown().await;
}
