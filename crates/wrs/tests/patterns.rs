//! Pattern semantics (SPEC §3) over real sockets: exact receivers, exact
//! counts, sender exclusion, lone senders, the request/reply
//! sub-protocol and its error frames.
//!
//! "Nothing else arrived" is shown with a barrier, never a sleep: after
//! the message under test, another client sends a marker to everyone;
//! a client's next frame must be that marker.

mod common;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// `sender` sends `marker` on a pub-sub channel; each of `clients` must
/// receive it as its very next frame.
async fn expect_marker_next(sender: &mut Ws, clients: &mut [&mut Ws], marker: &str) {
    sender.send_text(marker).await;
    for client in clients.iter_mut() {
        assert_eq!(
            client.recv_text().await,
            marker,
            "something arrived before the marker"
        );
    }
}

/// Client 0 sends `workers * rotations` messages; each worker must get
/// exactly its share, in order, and nobody anything else.
async fn round_robin_counts(server: &TestServer, pattern: &str, workers: usize, rotations: usize) {
    let channel = server.create_pattern(pattern).await;
    let mut clients = server.connect_n(&channel, workers + 1).await;
    let ids = server.client_ids(&channel.id).await;
    let before = server.service_stats().await["deliveries"].as_u64().unwrap();
    let total = workers * rotations;
    for i in 0..total {
        let frame = if pattern == "fan-in-out" {
            json!({"type": "request", "n": i}).to_string()
        } else {
            format!("{i}")
        };
        clients[0].send_text(frame).await;
    }
    // One sender: the rotation is strict, so worker w gets exactly the
    // messages w, w + workers, w + 2 * workers, ... in order.
    for (w, worker) in clients.iter_mut().skip(1).enumerate() {
        for k in 0..rotations {
            let n = w + k * workers;
            if pattern == "fan-in-out" {
                assert_eq!(
                    worker.recv_json().await,
                    json!({"type": "request", "n": n, "origin": ids[0]})
                );
            } else {
                assert_eq!(worker.recv_text().await, n.to_string());
            }
        }
    }
    // The server made exactly `total` deliveries and the workers read all
    // of them: nothing went to the sender, nothing was duplicated.
    let after = server.service_stats().await["deliveries"].as_u64().unwrap();
    assert_eq!(after - before, total as u64);
}

#[tokio::test]
async fn push_pull_is_exactly_fair_over_three_and_five_workers() {
    let server = TestServer::start().await;
    round_robin_counts(&server, "push-pull", 3, 100).await;
    round_robin_counts(&server, "push-pull", 5, 40).await;
    server.shutdown().await;
}

#[tokio::test]
async fn fan_in_out_requests_are_exactly_fair_and_stamped() {
    let server = TestServer::start().await;
    round_robin_counts(&server, "fan-in-out", 3, 100).await;
    round_robin_counts(&server, "fan-in-out", 4, 25).await;
    server.shutdown().await;
}

#[tokio::test]
async fn fan_in_out_replies_reach_only_their_origin() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("fan-in-out").await;
    let mut c = server.connect_n(&channel, 3).await;
    let ids = server.client_ids(&channel.id).await;
    // Client 0 fans out two jobs; clients 1 and 2 get one each.
    c[0].send_json(json!({"type": "request", "job": "a"})).await;
    c[0].send_json(json!({"type": "request", "job": "b"})).await;
    let job1 = c[1].recv_json().await;
    let job2 = c[2].recv_json().await;
    assert_eq!(
        job1,
        json!({"type": "request", "job": "a", "origin": ids[0]})
    );
    assert_eq!(
        job2,
        json!({"type": "request", "job": "b", "origin": ids[0]})
    );
    c[2].send_json(json!({"type": "reply", "origin": ids[0], "result": "B"}))
        .await;
    c[1].send_json(json!({"type": "reply", "origin": ids[0], "result": "A"}))
        .await;
    assert_eq!(c[0].recv_json().await["result"], "B");
    assert_eq!(c[0].recv_json().await["result"], "A");
    // Neither worker saw the other's reply: a request from worker 2 goes
    // round-robin (to 0 or 1); whoever gets it gets it as the next frame.
    c[2].send_json(json!({"type": "request", "probe": 1})).await;
    c[2].send_json(json!({"type": "request", "probe": 2})).await;
    let first = c[0].recv_json().await;
    let second = c[1].recv_json().await;
    assert_eq!(first["origin"], ids[2]);
    assert_eq!(second["origin"], ids[2]);
    assert_ne!(first["probe"], second["probe"]);
    server.shutdown().await;
}

#[tokio::test]
async fn pub_sub_reaches_every_other_client_but_not_the_sender() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut c = server.connect_n(&channel, 4).await;
    c[0].send_text("hello all").await;
    for client in &mut c[1..] {
        assert_eq!(client.recv_text().await, "hello all");
    }
    let (first, rest) = c.split_at_mut(1);
    let [a, b, d] = rest else { unreachable!() };
    // The sender's next frame is client 1's marker, not its own message.
    expect_marker_next(a, &mut [&mut first[0], b, d], "marker").await;
    assert_eq!(server.service_stats().await["deliveries"], 6);
    server.shutdown().await;
}

#[tokio::test]
async fn lone_senders_follow_their_pattern() {
    let server = TestServer::start().await;

    // echo and push-pull: back to the lone sender.
    for pattern in ["echo", "push-pull"] {
        let channel = server.create_pattern(pattern).await;
        let mut alone = server.connect(&channel).await;
        alone.send_text("boomerang").await;
        assert_eq!(alone.recv_text().await, "boomerang", "{pattern}");
    }

    // fan-in-out: a lone requester gets its own request, stamped.
    let channel = server.create_pattern("fan-in-out").await;
    let mut alone = server.connect(&channel).await;
    let me = server.client_ids(&channel.id).await.remove(0);
    alone.send_json(json!({"type": "request", "x": 1})).await;
    assert_eq!(
        alone.recv_json().await,
        json!({"type": "request", "x": 1, "origin": me})
    );

    // pub-sub and req-repl: nobody. Shown by the next frame being a
    // later client's marker.
    for pattern in ["pub-sub", "req-repl"] {
        let channel = server.create_pattern(pattern).await;
        let mut alone = server.connect(&channel).await;
        let frame = |text: &str| {
            if pattern == "req-repl" {
                json!({"type": "request", "t": text}).to_string()
            } else {
                text.to_owned()
            }
        };
        alone.send_text(frame("lost")).await;
        let mut late = server.connect(&channel).await;
        server.wait_for_clients(&channel.id, 2).await;
        late.send_text(frame("marker")).await;
        let next = alone.recv_text().await;
        assert!(next.contains("marker"), "{pattern}: got {next}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn req_repl_broadcasts_requests_with_a_server_set_origin() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("req-repl").await;
    let mut c = server.connect_n(&channel, 4).await;
    let ids = server.client_ids(&channel.id).await;
    // A forged origin is overwritten with the sender's real id.
    c[0].send_text(
        r#"{"origin":"FFFF-FFFF-FFFF","type":"request","q":"who?","nested":{"origin":"keep"}}"#,
    )
    .await;
    for client in &mut c[1..] {
        let request = client.recv_json().await;
        assert_eq!(
            request,
            json!({"type": "request", "q": "who?", "nested": {"origin": "keep"}, "origin": ids[0]})
        );
    }
    // Two responders reply; only the origin receives the replies.
    c[1].send_json(json!({"type": "reply", "origin": ids[0], "from": 1}))
        .await;
    c[3].send_json(json!({"type": "reply", "origin": ids[0], "from": 3}))
        .await;
    let mut froms = vec![
        c[0].recv_json().await["from"].clone(),
        c[0].recv_json().await["from"].clone(),
    ];
    froms.sort_by_key(|v| v.as_i64());
    assert_eq!(froms, [json!(1), json!(3)]);
    // The other responders' next frame is a fresh request, not a reply.
    c[0].send_json(json!({"type": "request", "q": "next"}))
        .await;
    for client in &mut c[1..] {
        assert_eq!(client.recv_json().await["q"], "next");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn replies_keep_their_fields_byte_for_byte() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("req-repl").await;
    let mut c = server.connect_n(&channel, 2).await;
    let ids = server.client_ids(&channel.id).await;
    let reply = format!(
        r#"{{ "type" : "reply", "n": 1.50, "origin":"{}", "s":"\u00e9" }}"#,
        ids[0]
    );
    c[1].send_text(reply.clone()).await;
    assert_eq!(c[0].recv_text().await, reply);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_sub_protocol_frames_get_error_frames_and_are_not_relayed() {
    let server = TestServer::start().await;
    for pattern in ["req-repl", "fan-in-out"] {
        let channel = server.create_pattern(pattern).await;
        let mut c = server.connect_n(&channel, 2).await;
        let cases: Vec<(Message, &str)> = vec![
            (Message::text("plain text"), "invalid_json"),
            (Message::text("[1,2,3]"), "not_an_object"),
            (Message::text(r#"{"payload":1}"#), "invalid_type"),
            (Message::text(r#"{"type":"question"}"#), "invalid_type"),
            (Message::text(r#"{"type":"reply"}"#), "missing_origin"),
            (
                Message::text(r#"{"type":"reply","origin":"0000-0000-0000"}"#),
                "unknown_origin",
            ),
            (
                Message::text(r#"{"type":"reply","origin":"not an id"}"#),
                "unknown_origin",
            ),
            (
                Message::binary(br#"{"type":"request"}"#.to_vec()),
                "binary_frame",
            ),
            (
                Message::text(format!(
                    r#"{{"type":"request","deep":{}{}}}"#,
                    "[".repeat(10_000),
                    "]".repeat(10_000)
                )),
                "invalid_json",
            ),
        ];
        for (frame, code) in cases {
            bounded("send", futures_util::SinkExt::send(&mut c[0].stream, frame))
                .await
                .unwrap();
            let error = c[0].recv_json().await;
            assert_eq!(error["type"], "error", "{pattern}: {error}");
            assert_eq!(error["error"], code, "{pattern}: {error}");
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(error.as_object().unwrap().len(), 3);
        }
        // Still connected, and nothing reached the other client: its next
        // frame is a valid request sent now.
        c[0].send_json(json!({"type": "request", "ok": true})).await;
        assert_eq!(c[1].recv_json().await["ok"], true, "{pattern}");
    }
    let stats = server.service_stats().await;
    assert_eq!(stats["frameErrors"], 18);
    server.shutdown().await;
}

#[tokio::test]
async fn binary_frames_pass_through_unchanged() {
    let server = TestServer::start().await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    for pattern in ["echo", "pub-sub", "push-pull"] {
        let channel = server.create_pattern(pattern).await;
        let mut c = server
            .connect_n(&channel, if pattern == "echo" { 1 } else { 2 })
            .await;
        c[0].send_binary(payload.clone()).await;
        let receiver = if pattern == "echo" { 0 } else { 1 };
        match c[receiver].recv().await {
            Message::Binary(got) => assert_eq!(got.as_ref(), &payload[..], "{pattern}"),
            other => panic!("{pattern}: expected binary, got {other:?}"),
        }
        // Text stays text, including non-ASCII.
        c[0].send_text("grüße 👋").await;
        assert_eq!(
            c[receiver].recv().await,
            Message::text("grüße 👋"),
            "{pattern}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_message_at_the_size_limit_is_relayed() {
    let server = TestServer::with(|c| c.max_message_bytes = 200_000).await;
    let channel = server.create_pattern("pub-sub").await;
    let mut c = server.connect_n(&channel, 2).await;
    let text = "x".repeat(200_000);
    c[0].send_text(text.clone()).await;
    assert_eq!(c[1].recv_text().await.len(), text.len());
    server.shutdown().await;
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut receiver = server.connect(&channel).await;
    let mut raw = raw_connect(&server, &channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    let mut frames = client_frame(false, 1, "frag".as_bytes());
    frames.extend(client_frame(true, 9, b"mid-ping")); // control frames may interleave
    frames.extend(client_frame(false, 0, "men".as_bytes()));
    frames.extend(client_frame(true, 0, "ted ✓".as_bytes()));
    tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &frames)
        .await
        .unwrap();
    assert_eq!(receiver.recv_text().await, "fragmented ✓");
    // The ping was answered with a pong carrying its payload.
    let (opcode, payload) = read_server_frame(&mut raw.stream).await.expect("pong");
    assert_eq!((opcode, payload.as_slice()), (0xA, &b"mid-ping"[..]));
    server.shutdown().await;
}

#[tokio::test]
async fn welcome_frames_tell_each_client_its_id() {
    let server = TestServer::start().await;
    let channel = server
        .create(json!({"pattern": "req-repl", "welcome": true}))
        .await;
    let mut a = server.connect(&channel).await;
    let hello_a = a.recv_json().await;
    let mut b = server.connect(&channel).await;
    let hello_b = b.recv_json().await;
    let ids = server.client_ids(&channel.id).await;
    assert_eq!(
        hello_a,
        json!({"type": "hello", "clientId": ids[0], "channel": channel.id, "pattern": "req-repl"})
    );
    assert_eq!(hello_b["clientId"], ids[1]);
    // Without the option nothing is sent on connect: the first frame is a
    // real message.
    let quiet = server.create_pattern("pub-sub").await;
    let mut q = server.connect_n(&quiet, 2).await;
    q[1].send_text("first").await;
    assert_eq!(q[0].recv_text().await, "first");
    server.shutdown().await;
}
