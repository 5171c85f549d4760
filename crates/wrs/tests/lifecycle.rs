//! Channel lifecycle over real sockets: delete and reset close clients
//! with 4001, timeouts with 4002; countdown; client listing; aliases.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use tokio::time::Instant;

#[tokio::test]
async fn deleting_a_channel_closes_every_client_with_4001() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let other = server.create_pattern("pub-sub").await;
    let mut clients = server.connect_n(&channel, 3).await;
    let mut bystanders = server.connect_n(&other, 2).await;
    let (status, body) = server.delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for client in &mut clients {
        assert_eq!(client.expect_close(4001).await, "channel deleted");
    }
    // Connecting again is refused: the channel is gone.
    let raw = raw_request(
        server.addr,
        &upgrade_request(&format!(
            "/channels/{}/connect?token={}",
            channel.id, channel.token
        )),
    )
    .await;
    assert_eq!(raw.status, 404);
    // The other channel is untouched.
    bystanders[0].send_text("still here").await;
    assert_eq!(bystanders[1].recv_text().await, "still here");
    server.shutdown().await;
}

#[tokio::test]
async fn messages_queued_before_a_delete_are_delivered_before_the_close() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut c = server.connect_n(&channel, 2).await;
    for i in 0..50 {
        c[0].send_text(format!("m{i}")).await;
    }
    // Wait until the server has queued all 50 for client 1, then delete.
    eventually("50 deliveries", || async {
        (server.service_stats().await["deliveries"] == 50).then_some(())
    })
    .await;
    server.delete(&format!("/channels/{}", channel.id)).await;
    let (before, close) = c[1].recv_until_close().await;
    let texts: Vec<_> = before
        .iter()
        .map(|m| m.to_text().unwrap().to_owned())
        .collect();
    let expected: Vec<_> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
    assert_eq!(close, Some((4001, "channel deleted".to_owned())));
    server.shutdown().await;
}

#[tokio::test]
async fn reset_deletes_every_channel_and_closes_their_clients() {
    let server = TestServer::start().await;
    let a = server.create_pattern("echo").await;
    let b = server.create_pattern("push-pull").await;
    server.create_pattern("req-repl").await;
    let mut ca = server.connect(&a).await;
    let mut cb = server.connect(&b).await;
    let (status, body) = server.delete("/reset").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"message": "3 channel(s) deleted", "data": {"deleted": 3}})
    );
    assert_eq!(ca.expect_close(4001).await, "channel deleted");
    assert_eq!(cb.expect_close(4001).await, "channel deleted");
    let (_, list) = server.get("/channels").await;
    assert_eq!(list["data"], json!([]));
    let (_, body) = server.delete("/reset").await;
    assert_eq!(body["data"]["deleted"], 0);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_channel_closes_every_client_with_4002() {
    let server = TestServer::start().await;
    let start = Instant::now();
    let channel = server
        .create(json!({"pattern": "pub-sub", "timeout": 300}))
        .await;
    let mut clients = server.connect_n(&channel, 2).await;
    assert_elapsed_ms(start, 0, "creating and connecting");
    for client in &mut clients {
        assert_eq!(client.expect_close(4002).await, "channel timed out");
        assert_elapsed_ms(start, 300, "closed at the timeout");
    }
    assert_eq!(server.countdown(&channel.id).await, None);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn countdown_runs_down_and_restarts_with_activity() {
    let server = TestServer::start().await;
    let never = server
        .create(json!({"pattern": "echo", "timeout": -1}))
        .await;
    assert_eq!(never.body["data"]["timeout"], -1);
    assert_eq!(never.body["data"]["countdown"], -1);
    let start = Instant::now();
    let channel = server
        .create(json!({"pattern": "echo", "timeout": 60_000}))
        .await;
    assert_eq!(channel.body["data"]["countdown"], 60_000);
    sleep_until_ms(start, 300).await;
    assert_eq!(server.countdown(&channel.id).await, Some(59_700));
    // A relayed message restarts it...
    let mut client = server.connect(&channel).await;
    client.send_text("tick").await;
    assert_eq!(client.recv_text().await, "tick");
    assert_elapsed_ms(start, 300, "connecting and echoing");
    assert_eq!(server.countdown(&channel.id).await, Some(60_000));
    // ...and it runs down from there.
    sleep_until_ms(start, 550).await;
    assert_eq!(server.countdown(&channel.id).await, Some(59_750));
    assert_eq!(server.countdown(&never.id).await, Some(-1));
    // Connecting alone is not activity: only relayed messages count.
    let idle = server
        .create(json!({"pattern": "echo", "timeout": 60_000}))
        .await;
    sleep_until_ms(start, 850).await;
    let _watcher = server.connect(&idle).await;
    assert_eq!(server.countdown(&idle.id).await, Some(59_700));
    assert_elapsed_ms(start, 850, "connecting the watcher");
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn error_frames_do_not_restart_the_timeout() {
    let server = TestServer::start().await;
    let start = Instant::now();
    let channel = server
        .create(json!({"pattern": "req-repl", "timeout": 60_000}))
        .await;
    let mut client = server.connect(&channel).await;
    sleep_until_ms(start, 300).await;
    client.send_text("not json").await;
    assert_eq!(client.recv_json().await["error"], "invalid_json");
    assert_elapsed_ms(start, 300, "the error frame's round trip");
    assert_eq!(server.countdown(&channel.id).await, Some(59_700));
    server.shutdown().await;
}

#[tokio::test]
async fn clients_are_listed_in_join_order_and_removed_when_they_leave() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "welcome": true}))
        .await;
    let mut c = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut client = server.connect(&channel).await;
        ids.push(
            client.recv_json().await["clientId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        c.push(client);
    }
    assert_eq!(server.client_ids(&channel.id).await, ids);
    let (_, body) = server
        .get(&format!("/channels/{}/clients", channel.id))
        .await;
    assert_eq!(
        body["message"],
        format!("3 client(s) connected to channel {}", channel.id)
    );
    for client in body["data"].as_array().unwrap() {
        assert_eq!(client.as_object().unwrap().len(), 3);
        assert!(client["connectedAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(client["transport"], "websocket");
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 3);
    c.remove(1).close().await;
    server.wait_for_clients(&channel.id, 2).await;
    assert_eq!(
        server.client_ids(&channel.id).await,
        [ids[0].clone(), ids[2].clone()]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn singular_channel_paths_are_aliases() {
    let server = TestServer::start().await;
    let (status, created) = server.post("/channel", r#"{"pattern":"echo"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["data"]["id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    let (status, body) = server.get(&format!("/channel/{id}")).await;
    assert_eq!(
        (status, body["data"]["id"].as_str()),
        (StatusCode::OK, Some(id))
    );
    let (_, list) = server.get("/channel").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let mut client = server
        .connect_url(&format!(
            "ws://{}/channel/{id}/connect?token={token}",
            server.addr
        ))
        .await;
    client.send_text("alias").await;
    assert_eq!(client.recv_text().await, "alias");
    let (_, clients) = server.get(&format!("/channel/{id}/clients")).await;
    assert_eq!(clients["data"].as_array().unwrap().len(), 1);
    let (status, _) = server.delete(&format!("/channel/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(client.expect_close(4001).await, "channel deleted");
    server.shutdown().await;
}

#[tokio::test]
async fn channel_ids_are_matched_case_insensitively() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("echo").await;
    let lower = channel.id.to_lowercase();
    let (status, body) = server.get(&format!("/channels/{lower}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["id"], channel.id);
    let mut client = server
        .connect_url(&server.ws_url(&lower, &channel.token))
        .await;
    client.send_text("x").await;
    assert_eq!(client.recv_text().await, "x");
    server.shutdown().await;
}

#[tokio::test]
async fn ids_and_tokens_follow_the_configured_lengths() {
    let server = TestServer::with(|c| {
        c.id_length = 6;
        c.token_length = 40;
    })
    .await;
    let channel = server.create_pattern("echo").await;
    assert_eq!(channel.id.len(), 14, "{}", channel.id); // XXXX-XXXX-XXXX
    assert_eq!(channel.token.len(), 40);
    let other = server.create_pattern("echo").await;
    assert_ne!(channel.token, other.token);
    assert_ne!(channel.id, other.id);
    server.shutdown().await;
}

#[tokio::test]
async fn service_reports_counts_and_never_secrets() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut c = server.connect_n(&channel, 2).await;
    c[0].send_text("count me").await;
    c[1].recv_text().await;
    let (status, body) = server.get("/service").await;
    assert_eq!(status, StatusCode::OK);
    let data = &body["data"];
    assert_eq!(data["channels"], 1);
    assert_eq!(data["clients"], 2);
    assert_eq!(data["nodeId"], "test-node");
    assert_eq!(data["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        data["patterns"],
        json!(["echo", "pub-sub", "push-pull", "req-repl", "fan-in-out"])
    );
    assert_eq!(data["stats"]["messagesIn"], 1);
    assert_eq!(data["stats"]["bytesIn"], 8);
    assert_eq!(data["stats"]["deliveries"], 1);
    assert_eq!(data["stats"]["bytesOut"], 8);
    assert_eq!(data["stats"]["connectionsAccepted"], 2);
    assert!(!body.to_string().contains(&channel.token));
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_has_seen_101_is_already_a_member() {
    // No waiting between a connect and its use: once the handshake
    // response has arrived, the client is listed and messages reach it —
    // what a browser does in `onopen` must never race the server.
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut publisher = server.connect(&channel).await;
    let mut subscribers = Vec::new();
    for round in 1..=30u64 {
        subscribers.push(server.connect(&channel).await);
        assert_eq!(server.client_count(&channel.id).await, Some(round + 1));
        let text = format!("round {round}");
        publisher.send_text(&text).await;
        for subscriber in &mut subscribers {
            assert_eq!(subscriber.recv_text().await, text);
        }
    }
}
