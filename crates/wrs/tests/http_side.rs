//! The HTTP side of a channel (SPEC §10) on one node, over real sockets:
//! publishing with one request for every pattern, Server-Sent Events
//! clients next to WebSocket clients, history, resuming a stream, and
//! every kind of bad input.

mod common;

use std::collections::BTreeMap;

use base64::Engine;
use common::sse::{Sse, post, post_json, post_raw};
use common::{Created, TestServer, Ws, assert_error_envelope, error_code};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn sse(server: &TestServer, channel: &Created) -> Sse {
    Sse::open_ok(server, channel, None).await
}

#[tokio::test]
async fn pub_sub_publish_reaches_every_websocket_and_sse_client() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut ws = server.connect_n(&channel, 3).await;
    let mut events = sse(&server, &channel).await;
    server.wait_for_clients(&channel.id, 4).await;
    assert_eq!(
        events.headers["content-type"], "text/event-stream",
        "{:?}",
        events.headers
    );
    assert_eq!(events.headers["cache-control"], "no-cache");
    assert_eq!(events.headers["x-accel-buffering"], "no");

    let (status, body) = post_json(&server, &channel, "hello\nworld", "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["data"], json!({"receivers": 4}));
    for client in &mut ws {
        assert_eq!(client.recv_text().await, "hello\nworld");
    }
    let event = events.event().await;
    assert_eq!(
        (event.event.as_str(), event.data.as_str(), event.id),
        ("message", "hello\nworld", None)
    );

    // Binary: unchanged to WebSockets, base64 in a `binary` event.
    let payload = vec![0u8, 1, 2, 255, b'\n'];
    let (status, _) = post_raw(
        &server,
        &channel,
        payload.clone(),
        "application/octet-stream",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for client in &mut ws {
        assert_eq!(client.recv().await, Message::Binary(payload.clone().into()));
    }
    let event = events.event().await;
    assert_eq!(event.event, "binary");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&event.data)
            .unwrap(),
        payload
    );

    // A WebSocket client's message reaches the SSE client too, and the
    // token may come in the WRS-Token header instead of the query.
    ws[0].send_text("from a socket\r\nwith CRLF").await;
    assert_eq!(events.event().await.data, "from a socket\nwith CRLF");
    let response = server
        .http
        .post(server.url(&format!("/channels/{}/messages", channel.id)))
        .header("wrs-token", &channel.token)
        .body("by header")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(events.event().await.data, "by header");

    // The SSE client is listed as one.
    let (_, clients) = server
        .get(&format!("/channels/{}/clients", channel.id))
        .await;
    let transports: Vec<&str> = clients["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["transport"].as_str().unwrap())
        .collect();
    assert_eq!(transports, ["websocket", "websocket", "websocket", "sse"]);
    server.shutdown().await;
}

#[tokio::test]
async fn push_pull_publish_goes_to_exactly_one_client_in_turn_sse_included() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("push-pull").await;
    let (status, body) = post_json(&server, &channel, "nobody", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error_envelope(&body, "no_receiver");

    let mut ws = server.connect_n(&channel, 2).await;
    let mut events = sse(&server, &channel).await;
    server.wait_for_clients(&channel.id, 3).await;
    let ids = server.client_ids(&channel.id).await;
    let mut picked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..9 {
        let (status, body) = post_json(&server, &channel, &format!("job {i}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let receiver = body["data"]["receiver"].as_str().unwrap().to_owned();
        picked.entry(receiver).or_default().push(format!("job {i}"));
    }
    // The exact rotation: three jobs each.
    assert_eq!(picked.len(), 3, "{picked:?}");
    for (position, client) in ws.iter_mut().enumerate() {
        let mine = &picked[&ids[position]];
        assert_eq!(mine.len(), 3);
        for job in mine {
            assert_eq!(&client.recv_text().await, job);
        }
    }
    for job in &picked[&ids[2]] {
        assert_eq!(&events.event().await.data, job);
    }
    server.shutdown().await;
}

/// A worker answering requests: replies `{"type":"reply","origin":..,"answer":..}`.
async fn answer(worker: &mut Ws, answer: &str) -> Value {
    let request = worker.recv_json().await;
    assert_eq!(request["type"], "request");
    let origin = request["origin"].as_str().unwrap().to_owned();
    worker
        .send_json(json!({"type": "reply", "origin": origin, "answer": answer}))
        .await;
    request
}

#[tokio::test]
async fn req_repl_publish_is_a_synchronous_call_answered_by_the_first_reply() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("req-repl").await;
    let (status, body) = post_json(&server, &channel, r#"{"type":"request"}"#, "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error_envelope(&body, "no_receiver");

    let mut workers = server.connect_n(&channel, 2).await;
    let call = {
        let server = TestServer::client_of(server.addr);
        let channel = Created {
            id: channel.id.clone(),
            token: channel.token.clone(),
            body: Value::Null,
        };
        tokio::spawn(async move {
            post_json(
                &server,
                &channel,
                r#"{"type":"request","origin":"forged","q":1}"#,
                "",
            )
            .await
        })
    };
    // Both workers get the request with the same one-off origin (not the
    // forged one, and no client's id).
    let first = workers[0].recv_json().await;
    let second = workers[1].recv_json().await;
    assert_eq!(first, second);
    assert_eq!(first["q"], 1);
    let origin = first["origin"].as_str().unwrap().to_owned();
    assert_ne!(origin, "forged");
    assert!(!server.client_ids(&channel.id).await.contains(&origin));
    workers[1]
        .send_json(json!({"type": "reply", "origin": origin, "answer": "B"}))
        .await;
    let (status, reply) = call.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        reply,
        json!({"type": "reply", "origin": origin, "answer": "B"})
    );
    // The call ended: a later reply to its origin gets the error frame,
    // and the worker stays connected.
    workers[0]
        .send_json(json!({"type": "reply", "origin": origin, "answer": "A"}))
        .await;
    let error = workers[0].recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"], "unknown_origin");

    // Nobody answers: 504 after `wait`, and the origin is forgotten.
    let (status, body) = post_json(&server, &channel, r#"{"type":"request"}"#, "&wait=300").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_error_envelope(&body, "no_reply");
    let late = workers[0].recv_json().await;
    workers[0]
        .send_json(json!({"type": "reply", "origin": late["origin"]}))
        .await;
    assert_eq!(workers[0].recv_json().await["error"], "unknown_origin");
    workers[1].recv_json().await;

    // Not a request: 400, and nothing reaches the workers.
    for (body, code) in [
        (
            r#"{"type":"reply","origin":"0000-0000-0001"}"#,
            "not_a_request",
        ),
        (r#"[1,2]"#, "not_an_object"),
        (r#"{"type":"hello"}"#, "invalid_type"),
        ("{", "invalid_json"),
    ] {
        let (status, error) = post_json(&server, &channel, body, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_error_envelope(&error, code);
    }
    let (status, _) = post_raw(
        &server,
        &channel,
        b"{}".to_vec(),
        "application/octet-stream",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    workers[0].send_text("ping-check").await;
    assert_eq!(workers[0].recv_json().await["error"], "invalid_json");
    server.shutdown().await;
}

#[tokio::test]
async fn fan_in_out_calls_rotate_over_the_workers() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("fan-in-out").await;
    let mut workers = server.connect_n(&channel, 3).await;
    let ids = server.client_ids(&channel.id).await;
    let mut served = BTreeMap::new();
    for round in 0..6 {
        let call = {
            let server = TestServer::client_of(server.addr);
            let (id, token) = (channel.id.clone(), channel.token.clone());
            tokio::spawn(async move {
                let channel = Created {
                    id,
                    token,
                    body: Value::Null,
                };
                post_json(
                    &server,
                    &channel,
                    &format!(r#"{{"type":"request","n":{round}}}"#),
                    "",
                )
                .await
            })
        };
        // Exactly one worker gets it: the one whose turn it is.
        let worker = round % 3;
        let request = answer(&mut workers[worker], &ids[worker]).await;
        assert_eq!(request["n"], round);
        let (status, reply) = call.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply["answer"], ids[worker]);
        *served.entry(worker).or_insert(0) += 1;
    }
    assert_eq!(served, BTreeMap::from([(0, 2), (1, 2), (2, 2)]));
    server.shutdown().await;
}

#[tokio::test]
async fn echo_publish_answers_with_the_body() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("echo").await;
    let (status, body) = post(&server, &channel, "ping ü", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ping ü"));
    let (status, body) = post_raw(
        &server,
        &channel,
        vec![1, 2, 3],
        "application/octet-stream",
        "",
    )
    .await;
    assert_eq!(
        (status, body.as_bytes()),
        (StatusCode::OK, &[1u8, 2, 3][..])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_disturbs_nobody() {
    let server = TestServer::with(|c| c.max_message_bytes = 1024).await;
    let channel = server.create_pattern("pub-sub").await;
    let mut ws = server.connect(&channel).await;
    let path = format!("/channels/{}/messages", channel.id);
    // Token: missing, wrong (query and header).
    for (url, header) in [
        (server.url(&path), None),
        (server.url(&format!("{path}?token=wrong")), None),
        (server.url(&path), Some("wrong")),
    ] {
        let mut request = server.http.post(url).body("x");
        if let Some(token) = header {
            request = request.header("wrs-token", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.unwrap();
        assert!(
            ["missing_token", "invalid_token"].contains(&error_code(&body)),
            "{body}"
        );
    }
    // Unknown channel.
    let (status, body) = server
        .post("/channels/ABCD-0000/messages?token=x", "x")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_envelope(&body, "channel_not_found");
    // Invalid UTF-8 as text; the same bytes as binary are fine.
    let (status, body) =
        post_raw(&server, &channel, vec![b'a', 0xff, 0xfe], "text/plain", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        error_code(&serde_json::from_str(&body).unwrap()),
        "invalid_utf8"
    );
    // Oversized, with and without a Content-Length.
    let (status, body) = post(&server, &channel, &"x".repeat(1025), "").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(
        error_code(&serde_json::from_str(&body).unwrap()),
        "message_too_large"
    );
    let chunks = futures_util::stream::iter(
        (0..3).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 500]))),
    );
    let response = server
        .http
        .post(server.url(&format!("{path}?token={}", channel.token)))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = post(&server, &channel, &"x".repeat(1024), "").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(ws.recv_text().await.len(), 1024);
    // `wait` out of range.
    for wait in ["0", "60001", "x", "-1"] {
        let (status, body) = post_json(&server, &channel, "x", &format!("&wait={wait}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "wait={wait}");
        assert!(
            body["message"].as_str().unwrap().contains("\"wait\""),
            "{body}"
        );
    }
    // SSE on patterns it does not serve.
    for pattern in ["req-repl", "fan-in-out", "echo"] {
        let other = server.create_pattern(pattern).await;
        let events = Sse::open(&server, &other.id, &other.token, "", None).await;
        assert_eq!(events.status, StatusCode::CONFLICT, "{pattern}");
        assert_error_envelope(events.error.as_ref().unwrap(), "pattern_not_supported");
    }
    let events = Sse::open(&server, &channel.id, "wrong", "", None).await;
    assert_eq!(events.status, StatusCode::UNAUTHORIZED);
    let events = Sse::open(&server, &channel.id, &channel.token, "&lastEventId=x", None).await;
    assert_eq!(events.status, StatusCode::BAD_REQUEST);
    // History out of range at create: 400 naming the field.
    for (history, field) in [
        (json!({"size": 0}), "history.size"),
        (json!({"size": 10001}), "history.size"),
        (json!({"size": "5"}), "history.size"),
        (json!({"ttl": 5}), "history.size"),
        (json!({"size": 5, "ttl": 0}), "history.ttl"),
        (json!({"size": 5, "ttl": 86_400_001}), "history.ttl"),
        (json!({"size": 5, "depth": 1}), "history.depth"),
        (json!(5), "history"),
    ] {
        let (status, body) = server
            .post(
                "/channels",
                &json!({"pattern": "pub-sub", "history": history}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{history}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(&format!("\"{field}\"")),
            "{history}: {body}"
        );
    }
    let (status, body) = server
        .post(
            "/channels",
            &json!({"pattern": "push-pull", "history": {"size": 5}}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("pub-sub"),
        "{body}"
    );
    // The connected client saw only the one good message.
    ws.send_text("still here").await;
    server.shutdown().await;
}

#[tokio::test]
async fn history_keeps_the_last_messages_with_increasing_offsets() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "history": {"size": 5, "ttl": 60000}}))
        .await;
    assert_eq!(
        channel.body["data"]["history"],
        json!({"size": 5, "ttl": 60000})
    );
    let mut ws = server.connect(&channel).await;
    for i in 1..=7u64 {
        let (status, body) = post_json(&server, &channel, &format!("m{i}"), "").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(body["data"], json!({"receivers": 1, "offset": i}));
    }
    // A WebSocket client's message is kept too.
    ws.send_binary(vec![9, 9]).await;
    let read = |query: &str| {
        let path = format!(
            "/channels/{}/messages?token={}{query}",
            channel.id, channel.token
        );
        let server = &server;
        async move { server.get(&path).await }
    };
    let (status, body) = read("").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let epoch = body["data"]["epoch"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty());
    let messages = body["data"]["messages"].as_array().unwrap().clone();
    let offsets: Vec<u64> = messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [4, 5, 6, 7, 8]);
    assert_eq!(messages[0]["data"], "m4");
    assert_eq!(messages[0]["binary"], false);
    assert_eq!(messages[4]["data"], "CQk=");
    assert_eq!(messages[4]["binary"], true);
    assert!(messages[0]["at"].as_str().unwrap().ends_with('Z'));
    let (_, body) = read("&since=6&limit=1").await;
    assert_eq!(body["data"]["messages"][0]["offset"], 7);
    assert_eq!(body["data"]["messages"].as_array().unwrap().len(), 1);
    let (status, body) = read("&since=99").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["messages"], json!([]));
    assert_eq!(body["data"]["epoch"], epoch.as_str());
    for bad in ["&limit=0", "&limit=10001", "&since=-1", "&since=x"] {
        let (status, _) = read(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, _) = server
        .get(&format!("/channels/{}/messages?token=wrong", channel.id))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A channel without history says so.
    let plain = server.create_pattern("pub-sub").await;
    let (status, body) = server
        .get(&format!(
            "/channels/{}/messages?token={}",
            plain.id, plain.token
        ))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error_envelope(&body, "no_history");
    server.shutdown().await;
}

#[tokio::test]
async fn an_sse_stream_resumes_after_its_last_event_id_without_gap_or_repeat() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "history": {"size": 4}}))
        .await;
    let mut events = sse(&server, &channel).await;
    for i in 1..=2 {
        post(&server, &channel, &format!("m{i}"), "").await;
    }
    let first = events.event().await;
    assert_eq!(
        (first.id.as_deref(), first.data.as_str()),
        (Some("1"), "m1")
    );
    assert_eq!(events.event().await.id.as_deref(), Some("2"));
    drop(events);
    server.wait_for_clients(&channel.id, 0).await;
    for i in 3..=5 {
        post(&server, &channel, &format!("m{i}"), "").await;
    }
    // Resumed by header: 3, 4, 5 from the history, then live 6.
    let mut events = Sse::open(&server, &channel.id, &channel.token, "", Some("2")).await;
    assert_eq!(events.status, StatusCode::OK);
    post(&server, &channel, "m6", "").await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = events.event().await;
        seen.push((event.id.unwrap(), event.data));
    }
    let expected: Vec<(String, String)> =
        (3..=6).map(|i| (i.to_string(), format!("m{i}"))).collect();
    assert_eq!(seen, expected);
    drop(events);
    // Resumed from too old an offset (1 and 2 were dropped: size 4): a
    // `reset` first, then what is kept. By query this time.
    let mut events = Sse::open(&server, &channel.id, &channel.token, "&lastEventId=0", None).await;
    let reset = events.event().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(
        serde_json::from_str::<Value>(&reset.data).unwrap(),
        json!({"reason": "history_expired", "oldest": 3})
    );
    let ids: Vec<String> = [
        events.event().await,
        events.event().await,
        events.event().await,
        events.event().await,
    ]
    .into_iter()
    .map(|e| e.id.unwrap())
    .collect();
    assert_eq!(ids, ["3", "4", "5", "6"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_resumed_subscriber_ends_with_exactly_the_published_sequence_under_load() {
    const TOTAL: usize = 10_000;
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "history": {"size": TOTAL}}))
        .await;
    let mut publisher = server.connect(&channel).await;
    let mut events = sse(&server, &channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    // Publish at full rate from a WebSocket client on another task.
    let publishing = tokio::spawn(async move {
        for i in 0..TOTAL {
            publisher.send_text(i.to_string()).await;
        }
        publisher
    });
    // Read a while, then disconnect mid-stream.
    let mut received: Vec<usize> = Vec::new();
    let mut last_id = String::new();
    while received.len() < 1_500 {
        let event = events.event().await;
        received.push(event.data.parse().unwrap());
        last_id = event.id.unwrap();
    }
    drop(events);
    // Reconnect with the last id, while (or after) the rest is published.
    let mut events = Sse::open(&server, &channel.id, &channel.token, "", Some(&last_id)).await;
    assert_eq!(events.status, StatusCode::OK);
    while received.len() < TOTAL {
        let event = events.event().await;
        assert_ne!(
            event.event, "reset",
            "nothing may be lost with a history of {TOTAL}"
        );
        received.push(event.data.parse().unwrap());
    }
    let _publisher = publishing.await.unwrap();
    assert_eq!(received, (0..TOTAL).collect::<Vec<_>>());
    server.shutdown().await;
}

#[tokio::test]
async fn sse_streams_keep_alive_count_against_the_limit_and_close_with_the_channel() {
    let server = TestServer::with(|c| c.sse_keepalive_ms = 100).await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "clientLimit": 2}))
        .await;
    let mut events = sse(&server, &channel).await;
    let keepalive = events.next_block().await.unwrap();
    assert_eq!(
        (keepalive.event.as_str(), keepalive.data.as_str()),
        (":", "keepalive")
    );
    let _ws = server.connect(&channel).await;
    // Full: an SSE client and a WebSocket client fill clientLimit 2.
    let refused = Sse::open(&server, &channel.id, &channel.token, "", None).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_error_envelope(refused.error.as_ref().unwrap(), "channel_full");
    // Deleting the channel: a `close` event with 4001, then the end.
    let (status, _) = server.delete(&format!("/channels/{}", channel.id)).await;
    assert_eq!(status, StatusCode::OK);
    let (before, close) = events.until_close().await;
    assert!(before.is_empty(), "{before:?}");
    let close = close.expect("a close event");
    assert_eq!(
        serde_json::from_str::<Value>(&close.data).unwrap(),
        json!({"code": 4001, "reason": "channel deleted"})
    );
    assert!(
        events.next_block().await.is_none(),
        "the stream ends after close"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_drained_node_closes_its_sse_clients_with_1012() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("push-pull").await;
    let mut events = sse(&server, &channel).await;
    server.wait_for_clients(&channel.id, 1).await;
    let (status, body) = server.post("/cluster/test-node/drain", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, close) = events.until_close().await;
    let close: Value = serde_json::from_str(&close.expect("close event").data).unwrap();
    assert_eq!(close["code"], 1012);
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_sse_consumer_is_closed_by_the_slow_consumer_policy() {
    let server = TestServer::with(|c| {
        c.client_queue_messages = 16;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let mut events = sse(&server, &channel).await;
    let mut publisher = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    // 64 KiB messages: the socket's buffers fill, then the outbox.
    let big = "z".repeat(64 * 1024);
    for _ in 0..400 {
        publisher.send_text(big.clone()).await;
    }
    let (before, close) = events.until_close().await;
    assert!(before.len() < 400, "{} delivered", before.len());
    let close: Value = serde_json::from_str(&close.expect("close event").data).unwrap();
    assert_eq!(close, json!({"code": 1008, "reason": "slow consumer"}));
    server.shutdown().await;
}

#[tokio::test]
async fn an_sse_client_is_closed_with_1012_at_the_maximum_connection_age() {
    let server = TestServer::with(|c| c.max_connection_age_ms = Some(1_000)).await;
    let channel = server.create_pattern("pub-sub").await;
    let connected = tokio::time::Instant::now();
    let mut events = sse(&server, &channel).await;
    let (before, close) = events.until_close().await;
    assert!(before.is_empty());
    let close: Value = serde_json::from_str(&close.expect("close event").data).unwrap();
    assert_eq!(close, json!({"code": 1012, "reason": "max connection age"}));
    // ±10 %: not before 0.9 s.
    assert!(connected.elapsed() >= std::time::Duration::from_millis(900));
    server.wait_for_clients(&channel.id, 0).await;
}

#[tokio::test]
async fn a_welcome_channel_greets_an_sse_client_with_a_hello_event() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "pub-sub", "welcome": true}))
        .await;
    let mut events = sse(&server, &channel).await;
    let hello = events.event().await;
    assert_eq!(hello.event, "hello");
    let hello: Value = serde_json::from_str(&hello.data).unwrap();
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["pattern"], "pub-sub");
    assert_eq!(
        server.client_ids(&channel.id).await,
        [hello["clientId"].as_str().unwrap()]
    );
    // The first message after it arrives intact.
    post(&server, &channel, "first", "").await;
    assert_eq!(events.event().await.data, "first");
    server.shutdown().await;
}

#[tokio::test]
async fn a_publish_nobody_takes_does_not_keep_the_channel_alive() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "push-pull", "timeout": 60000}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = server.countdown(&channel.id).await.unwrap();
    let (status, _) = post(&server, &channel, "nobody", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let after = server.countdown(&channel.id).await.unwrap();
    assert!(
        after <= before,
        "a 409 restarted the timeout: {before} -> {after}"
    );
    let _worker = server.connect(&channel).await;
    let (status, _) = post(&server, &channel, "taken", "").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let taken = server.countdown(&channel.id).await.unwrap();
    assert!(
        taken > after + 200,
        "a taken publish restarts it: {after} -> {taken}"
    );
    server.shutdown().await;
}
