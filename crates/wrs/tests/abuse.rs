//! Misbehaving clients: each is dealt with on its own, with the documented
//! close code, and nobody else notices.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use futures_util::StreamExt;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn connections_dropped_without_a_close_frame_are_removed() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut raws = Vec::new();
    for _ in 0..200 {
        raws.push(raw_connect(&server, &channel).await);
    }
    server.wait_for_clients(&channel.id, 200).await;
    drop(raws); // TCP close, no WebSocket close frame
    server.wait_for_clients(&channel.id, 0).await;
    let (_, service) = server.get("/service").await;
    assert_eq!(service["data"]["clients"], 0);
    // Healthy afterwards: new clients relay as usual.
    let mut c = server.connect_n(&channel, 2).await;
    c[0].send_text("after the storm").await;
    assert_eq!(c[1].recv_text().await, "after the storm");
}

#[tokio::test]
async fn a_consumer_that_never_reads_is_closed_while_the_others_keep_up() {
    let server = TestServer::with(|c| {
        c.max_message_bytes = 16 * 1024;
        c.client_queue_bytes = 1024 * 1024;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let mut publisher = server.connect(&channel).await;
    let fast = server.connect(&channel).await;
    // The slow consumer: a tiny receive window and no reads, ever.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = bounded("connect", socket.connect(server.addr))
        .await
        .unwrap();
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    slow.write_all(request.as_bytes()).await.unwrap();
    server.wait_for_clients(&channel.id, 3).await;

    // 1000 messages of 16 KiB: far more than the slow client's socket
    // buffers plus its 1 MiB queue. The publisher stays at most 32
    // messages (512 KiB) ahead of the fast reader, so the fast reader is
    // never near its own limit.
    const MESSAGES: usize = 1000;
    const WINDOW: usize = 32;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut fast = fast;
        for i in 0..MESSAGES {
            let text = fast.recv_text().await;
            assert!(
                text.starts_with(&format!("{i:07} ")),
                "message {i} out of order"
            );
            seen_tx.send(i).unwrap();
        }
    });
    let body = "x".repeat(16 * 1024 - 8);
    for i in 0..MESSAGES {
        publisher.send_text(format!("{i:07} {body}")).await;
        if (i + 1) % WINDOW == 0 {
            bounded("fast reader", async {
                while seen_rx.recv().await.expect("reader alive") < i {}
            })
            .await;
        }
    }
    bounded("fast consumer", reader).await.unwrap();
    // The slow one was closed by the policy and removed; it was the only one.
    server.wait_for_clients(&channel.id, 2).await;
    let stats = server.service_stats().await;
    assert_eq!(stats["slowConsumerCloses"], 1, "{stats}");
    assert!(stats["droppedDeliveries"].as_u64().unwrap() >= 1);
    drop(slow);
}

#[tokio::test]
async fn the_drop_policy_keeps_a_slow_consumer_connected() {
    let server = TestServer::with(|c| {
        c.max_message_bytes = 16 * 1024;
        c.client_queue_bytes = 64 * 1024;
        c.slow_consumer = wrs::relay::SlowConsumerPolicy::Drop;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let mut publisher = server.connect(&channel).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(server.addr).await.unwrap();
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    slow.write_all(request.as_bytes()).await.unwrap();
    server.wait_for_clients(&channel.id, 2).await;
    let body = "y".repeat(16 * 1024 - 8);
    // Publish until the slow client's outbox overflows.
    bounded("drops", async {
        loop {
            publisher.send_text(body.clone()).await;
            if server.service_stats().await["droppedDeliveries"]
                .as_u64()
                .unwrap()
                > 0
            {
                break;
            }
        }
    })
    .await;
    let stats = server.service_stats().await;
    assert_eq!(stats["slowConsumerCloses"], 0);
    assert_eq!(server.client_count(&channel.id).await, Some(2));
    drop(slow);
}

#[tokio::test]
async fn an_oversized_message_closes_only_its_sender_with_1009() {
    let server = TestServer::with(|c| c.max_message_bytes = 1024).await;
    let channel = server.create_pattern("pub-sub").await;
    let mut c = server.connect_n(&channel, 3).await;
    c[0].send_text("y".repeat(1025)).await;
    let reason = c[0].expect_close(1009).await;
    assert!(reason.contains("too large"), "{reason}");
    server.wait_for_clients(&channel.id, 2).await;
    // The others neither saw it nor noticed: their next frame is this.
    c[1].send_text("fine").await;
    assert_eq!(c[2].recv_text().await, "fine");
    c[2].send_text("also fine").await;
    assert_eq!(c[1].recv_text().await, "also fine");
}

#[tokio::test]
async fn a_huge_frame_is_refused_from_its_header_and_never_buffered() {
    let server = TestServer::with(|c| c.max_message_bytes = 1024).await;
    let channel = server.create_pattern("echo").await;
    let mut raw = raw_connect(&server, &channel).await;
    // Announce 1 GiB, send only the header and a little payload.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header.extend_from_slice(&[0u8; 512]);
    raw.stream.write_all(&header).await.unwrap();
    let (opcode, payload) = read_server_frame(&mut raw.stream)
        .await
        .expect("close frame");
    assert_eq!(opcode, 0x8);
    assert_eq!(close_code_of(&payload), 1009);
    // The server sent FIN after its close frame.
    let mut rest = Vec::new();
    bounded("EOF", raw.stream.read_to_end(&mut rest)).await.ok();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let mut other = server.connect(&channel).await;
    let mut raw = raw_connect(&server, &channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    raw.stream
        .write_all(&client_frame(true, 1, &[b'o', b'k', 0xC3, 0x28]))
        .await
        .unwrap();
    let (opcode, payload) = read_server_frame(&mut raw.stream)
        .await
        .expect("close frame");
    assert_eq!((opcode, close_code_of(&payload)), (0x8, 1007));
    server.wait_for_clients(&channel.id, 1).await;
    // Nothing reached the other client; it keeps working.
    let mut late = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    late.send_text("next").await;
    assert_eq!(other.recv_text().await, "next");
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("echo").await;
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    let mut reserved = client_frame(true, 1, b"hi");
    reserved[0] |= 0x20;
    let bad_opcode = client_frame(true, 0x3, b"");
    let long_ping = client_frame(true, 0x9, &[0u8; 200]);
    for frame in [unmasked, reserved, bad_opcode, long_ping] {
        let mut raw = raw_connect(&server, &channel).await;
        raw.stream.write_all(&frame).await.unwrap();
        let (opcode, payload) = read_server_frame(&mut raw.stream)
            .await
            .expect("close frame");
        assert_eq!(
            (opcode, close_code_of(&payload)),
            (0x8, 1002),
            "frame {frame:02x?}"
        );
    }
    server.wait_for_clients(&channel.id, 0).await;
}

#[tokio::test]
async fn a_client_close_is_answered_and_the_client_removed() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("echo").await;
    let mut raw = raw_connect(&server, &channel).await;
    server.wait_for_clients(&channel.id, 1).await;
    let mut body = 4321u16.to_be_bytes().to_vec();
    body.extend_from_slice(b"bye");
    raw.stream
        .write_all(&client_frame(true, 8, &body))
        .await
        .unwrap();
    let (opcode, payload) = read_server_frame(&mut raw.stream)
        .await
        .expect("close reply");
    assert_eq!(
        (opcode, close_code_of(&payload)),
        (0x8, 4321),
        "the code is echoed"
    );
    server.wait_for_clients(&channel.id, 0).await;
}

#[tokio::test]
async fn dead_peers_are_found_by_ping_and_removed() {
    let server = TestServer::with(|c| c.ping_interval_ms = 200).await;
    let channel = server.create_pattern("pub-sub").await;
    // A live client: tungstenite answers pings while its stream is read.
    let live = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 1).await;
    let live_id = server.client_ids(&channel.id).await.remove(0);
    let pings = Arc::new(AtomicUsize::new(0));
    let (_sink, mut stream) = live.stream.split();
    let counter = Arc::clone(&pings);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Ping(_)) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // A dead one: handshake done, then silence (no pong, no reads).
    let dead = raw_connect(&server, &channel).await;
    server.wait_for_clients(&channel.id, 2).await;
    // The dead one goes after two silent intervals; the live one,
    // connected longer, answered every ping and stays.
    server.wait_for_clients(&channel.id, 1).await;
    assert_eq!(server.client_ids(&channel.id).await, [live_id]);
    assert!(
        pings.load(Ordering::Relaxed) >= 2,
        "the live client saw no pings"
    );
    drop(dead);
    reader.abort();
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_never_reads_is_bounded() {
    let server = TestServer::with(|c| {
        c.max_message_bytes = 1024;
        c.client_queue_bytes = 8 * 1024;
        c.client_queue_messages = 64;
    })
    .await;
    let channel = server.create_pattern("echo").await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut flood = socket.connect(server.addr).await.unwrap();
    let request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    flood.write_all(request.as_bytes()).await.unwrap();
    server.wait_for_clients(&channel.id, 1).await;
    let ping = client_frame(true, 9, &[7u8; 125]);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 2000)
        .collect();
    // Writing may stop early once the server closes the connection.
    let _ = bounded("flood", flood.write_all(&burst)).await;
    server.wait_for_clients(&channel.id, 0).await;
    assert_eq!(server.service_stats().await["slowConsumerCloses"], 1);
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
}
