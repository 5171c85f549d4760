//! permessage-deflate (RFC 7692, SPEC §12) over real sockets: what is
//! negotiated and what is declined, a broadcast compressed once with the
//! same bytes for every receiver that negotiated it, plain frames for the
//! others and under the minimum size, compressed messages from clients
//! (whole and fragmented) inflated for every receiver, and the limits:
//! 1009 for a message that inflates past `WRS_MAX_MESSAGE_BYTES`, 1002 for
//! compressed frames without the extension or on a continuation.

mod common;

use std::io::Write;

use common::nats::metric;
use common::*;
use flate2::Compression;
use flate2::write::{DeflateDecoder, DeflateEncoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// JSON of about 2 KiB, as a game or dashboard sends it.
fn state_json() -> String {
    let players: Vec<String> = (0..24)
        .map(|i| {
            format!(
                r#"{{"id":"player-{i}","x":{},"y":{},"hp":{},"team":"{}"}}"#,
                i * 17 % 800,
                i * 31 % 600,
                100 - i,
                if i % 2 == 0 { "red" } else { "blue" }
            )
        })
        .collect();
    format!(
        r#"{{"type":"state","tick":1234,"players":[{}]}}"#,
        players.join(",")
    )
}

/// A raw upgrade to `channel` with `extensions` offered (if any); returns
/// the connection and the `Sec-WebSocket-Extensions` answer (if any).
async fn connect(
    server: &TestServer,
    channel: &Created,
    extensions: Option<&str>,
) -> (RawWs, Option<String>) {
    let mut request = upgrade_request(&format!(
        "/channels/{}/connect?token={}",
        channel.id, channel.token
    ));
    if let Some(offer) = extensions {
        request = request.replacen(
            "\r\n",
            &format!("\r\nSec-WebSocket-Extensions: {offer}\r\n"),
            1,
        );
    }
    let raw = raw_request(server.addr, &request).await;
    assert_eq!(raw.status, 101, "{}", raw.head);
    let answer = raw.head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .starts_with("sec-websocket-extensions:")
            .then(|| l.split_once(':').unwrap().1.trim().to_owned())
    });
    (raw, answer)
}

/// One server frame with its first byte: (FIN/RSV/opcode byte, payload).
async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    bounded("frame header", stream.read_exact(&mut head))
        .await
        .unwrap();
    let len = match head[1] & 0x7F {
        126 => u64::from(stream.read_u16().await.unwrap()),
        127 => stream.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    bounded("frame payload", stream.read_exact(&mut payload))
        .await
        .unwrap();
    (head[0], payload)
}

const RSV1: u8 = 0x40;

/// Raw deflate of `data` as RFC 7692 §7.2.1 sends it: a sync flush, its
/// four-byte tail removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).unwrap();
    encoder.flush().unwrap();
    let mut out = encoder.finish().unwrap();
    // finish() adds a final empty block after the sync flush: cut back to
    // the flush's tail, then drop the tail.
    let tail = out
        .windows(4)
        .rposition(|w| w == [0x00, 0x00, 0xff, 0xff])
        .unwrap();
    out.truncate(tail);
    out
}

/// Inflates a compressed message (appending the removed tail).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut decoder = DeflateDecoder::new(Vec::new());
    decoder.write_all(data).unwrap();
    decoder.write_all(&[0x00, 0x00, 0xff, 0xff]).unwrap();
    decoder.flush().unwrap();
    decoder.get_ref().clone()
}

/// A masked client frame with the given first byte.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = client_frame(true, 0, payload);
    out[0] = first;
    out
}

#[tokio::test]
async fn deflate_is_negotiated_only_when_on_and_offered_and_declined_when_it_cannot_be_honoured() {
    let server = TestServer::with(|c| c.compression = true).await;
    let channel = server.create_pattern("pub-sub").await;
    assert_eq!(
        connect(&server, &channel, Some(OFFER)).await.1.as_deref(),
        Some(ANSWER)
    );
    assert_eq!(connect(&server, &channel, None).await.1, None);
    // A smaller window is honoured and repeated; 8 bits cannot be (zlib),
    // so that offer is declined and the next one taken.
    assert_eq!(
        connect(
            &server,
            &channel,
            Some("permessage-deflate; server_max_window_bits=10")
        )
        .await
        .1,
        Some(format!("{ANSWER}; server_max_window_bits=10"))
    );
    assert_eq!(
        connect(
            &server,
            &channel,
            Some("permessage-deflate; server_max_window_bits=8")
        )
        .await
        .1,
        None
    );
    assert_eq!(
        connect(
            &server,
            &channel,
            Some("permessage-deflate; server_max_window_bits=8, permessage-deflate")
        )
        .await
        .1
        .as_deref(),
        Some(ANSWER)
    );
    // Malformed offers are declined, not refused.
    for offer in [
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; foo=bar",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
    ] {
        assert_eq!(
            connect(&server, &channel, Some(offer)).await.1,
            None,
            "{offer}"
        );
    }

    let off = TestServer::start().await;
    let channel = off.create_pattern("pub-sub").await;
    assert_eq!(connect(&off, &channel, Some(OFFER)).await.1, None);
}

#[tokio::test]
async fn a_broadcast_is_compressed_once_and_the_same_bytes_go_to_every_receiver_that_negotiated_it()
{
    const DEFLATE: usize = 4;
    const PLAIN: usize = 2;
    let server = TestServer::with(|c| c.compression = true).await;
    let channel = server.create_pattern("pub-sub").await;
    let mut compressed = Vec::new();
    for _ in 0..DEFLATE {
        let (raw, answer) = connect(&server, &channel, Some(OFFER)).await;
        assert_eq!(answer.as_deref(), Some(ANSWER));
        compressed.push(raw);
    }
    let mut plain = Vec::new();
    for _ in 0..PLAIN {
        plain.push(connect(&server, &channel, None).await.0);
    }
    // A smaller window gets its own compression.
    let (mut small, _) = connect(
        &server,
        &channel,
        Some("permessage-deflate; server_max_window_bits=9"),
    )
    .await;
    let mut publisher = server.connect(&channel).await;
    server
        .wait_for_clients(&channel.id, (DEFLATE + PLAIN + 2) as u64)
        .await;

    let json = state_json();
    assert!((1024..4096).contains(&json.len()), "{}", json.len());
    publisher.send_text(json.clone()).await;
    let mut frames = Vec::new();
    for raw in &mut compressed {
        let (first, payload) = read_frame(&mut raw.stream).await;
        assert_eq!(first, 0x80 | RSV1 | 0x1, "FIN, RSV1, text");
        assert_eq!(inflate(&payload), json.as_bytes());
        frames.push(payload);
    }
    assert!(
        frames.windows(2).all(|w| w[0] == w[1]),
        "the same bytes for all"
    );
    assert!(
        frames[0].len() * 3 < json.len(),
        "{} of {} bytes",
        frames[0].len(),
        json.len()
    );
    for raw in &mut plain {
        assert_eq!(
            read_frame(&mut raw.stream).await,
            (0x81, json.clone().into_bytes())
        );
    }
    let (first, payload) = read_frame(&mut small.stream).await;
    assert_eq!(first, 0x80 | RSV1 | 0x1);
    assert_eq!(inflate(&payload), json.as_bytes());
    // Once for the four, once for the small window.
    assert_eq!(metric(&server, "wrs_compressions_total").await, 2.0);

    // Under WRS_COMPRESSION_MIN_BYTES (1024): plain for everyone.
    publisher.send_text("short").await;
    for raw in compressed.iter_mut().chain(&mut plain) {
        assert_eq!(read_frame(&mut raw.stream).await, (0x81, b"short".to_vec()));
    }
    // Binary messages are compressed too.
    let binary = json.as_bytes().repeat(2);
    publisher.send_binary(binary.clone()).await;
    let (first, payload) = read_frame(&mut compressed[0].stream).await;
    assert_eq!(first, 0x80 | RSV1 | 0x2);
    assert_eq!(inflate(&payload), binary);
    assert_eq!(metric(&server, "wrs_compressions_total").await, 4.0);
}

#[tokio::test]
async fn compressed_messages_from_clients_are_inflated_for_every_receiver() {
    let server = TestServer::with(|c| {
        c.compression = true;
        c.compression_min_bytes = 0;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let (mut sender, _) = connect(&server, &channel, Some(OFFER)).await;
    let (mut deflating, _) = connect(&server, &channel, Some(OFFER)).await;
    let mut receiver = server.connect(&channel).await;
    server.wait_for_clients(&channel.id, 3).await;

    let json = state_json();
    let whole = deflate(json.as_bytes());
    sender
        .stream
        .write_all(&frame(0x80 | RSV1 | 0x1, &whole))
        .await
        .unwrap();
    assert_eq!(receiver.recv_text().await, json);
    let (first, payload) = read_frame(&mut deflating.stream).await;
    assert_eq!(first, 0x80 | RSV1 | 0x1);
    assert_eq!(inflate(&payload), json.as_bytes());

    // Fragmented: RSV1 on the first frame only.
    let (head, tail) = whole.split_at(whole.len() / 2);
    let mut first = client_frame(false, 0x1, head);
    first[0] |= RSV1;
    sender.stream.write_all(&first).await.unwrap();
    sender
        .stream
        .write_all(&client_frame(true, 0x0, tail))
        .await
        .unwrap();
    assert_eq!(receiver.recv_text().await, json);
    // An empty message compresses to a single 0x00 (RFC 7692 §7.2.3.6).
    sender
        .stream
        .write_all(&frame(0x80 | RSV1 | 0x2, &[0x00]))
        .await
        .unwrap();
    assert_eq!(
        receiver.recv().await,
        tokio_tungstenite::tungstenite::Message::Binary(Vec::new().into())
    );
}

/// Sends `bytes` and expects the close frame with `code` back.
async fn expect_close_after(raw: &mut RawWs, bytes: &[u8], code: u16) {
    raw.stream.write_all(bytes).await.unwrap();
    let (first, payload) = read_frame(&mut raw.stream).await;
    assert_eq!(first & 0x0F, 0x8, "a close frame");
    assert_eq!(close_code_of(&payload), code);
}

#[tokio::test]
async fn a_message_that_inflates_past_the_limit_closes_its_sender_with_1009_and_nobody_else() {
    let server = TestServer::with(|c| {
        c.compression = true;
        c.max_message_bytes = 64 * 1024;
    })
    .await;
    let channel = server.create_pattern("pub-sub").await;
    let mut others = server.connect_n(&channel, 2).await;
    let (mut bomber, _) = connect(&server, &channel, Some(OFFER)).await;
    server.wait_for_clients(&channel.id, 3).await;
    // 16 MiB of zeros in about 16 KiB: inflated no further than the limit.
    let bomb = deflate(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    expect_close_after(&mut bomber, &frame(0x80 | RSV1 | 0x2, &bomb), 1009).await;
    // Exactly at the limit is fine.
    drop(bomber);
    let (mut exact, _) = connect(&server, &channel, Some(OFFER)).await;
    server.wait_for_clients(&channel.id, 3).await;
    let at_limit = vec![b'a'; 64 * 1024];
    exact
        .stream
        .write_all(&frame(0x80 | RSV1 | 0x1, &deflate(&at_limit)))
        .await
        .unwrap();
    for other in &mut others {
        assert_eq!(other.recv_text().await.len(), 64 * 1024);
    }
    others[0].send_text("still here").await;
    assert_eq!(others[1].recv_text().await, "still here");
}

#[tokio::test]
async fn compressed_frames_break_the_protocol_where_rfc_7692_forbids_them() {
    let server = TestServer::with(|c| c.compression = true).await;
    let channel = server.create_pattern("pub-sub").await;
    let data = deflate(b"hello hello hello");
    // Not negotiated.
    let (mut plain, _) = connect(&server, &channel, None).await;
    expect_close_after(&mut plain, &frame(0x80 | RSV1 | 0x1, &data), 1002).await;
    // On a continuation frame.
    let (mut raw, _) = connect(&server, &channel, Some(OFFER)).await;
    let mut bytes = client_frame(false, 0x1, b"plain start");
    let mut continuation = client_frame(true, 0x0, &data);
    continuation[0] |= RSV1;
    bytes.extend(continuation);
    expect_close_after(&mut raw, &bytes, 1002).await;
    // On a control frame.
    let (mut raw, _) = connect(&server, &channel, Some(OFFER)).await;
    expect_close_after(&mut raw, &frame(0x80 | RSV1 | 0x9, b""), 1002).await;
    // Not deflate data at all.
    let (mut raw, _) = connect(&server, &channel, Some(OFFER)).await;
    expect_close_after(&mut raw, &frame(0x80 | RSV1 | 0x1, &[0xff; 16]), 1002).await;
    // Inflated text must be UTF-8.
    let (mut raw, _) = connect(&server, &channel, Some(OFFER)).await;
    expect_close_after(
        &mut raw,
        &frame(0x80 | RSV1 | 0x1, &deflate(&[0xc3, 0x28])),
        1007,
    )
    .await;
}

#[tokio::test]
async fn a_broadcast_from_another_node_is_compressed_once_on_the_receiving_node() {
    let nats = common::nats::NatsServer::start().await;
    let options = common::nats::NodeOptions::new(nats.url());
    let compressing = |c: &mut wrs::Config| c.compression = true;
    let a = common::nats::node_with(&options, "node-a", compressing).await;
    let b = common::nats::node_with(&options, "node-b", compressing).await;
    let channel = a.create_pattern("pub-sub").await;
    let mut on_b = Vec::new();
    for _ in 0..3 {
        on_b.push(connect(&b, &channel, Some(OFFER)).await.0);
    }
    let mut plain_on_b = connect(&b, &channel, None).await.0;
    let mut publisher = a.connect(&channel).await;
    common::nats::wait_everywhere(&[&a, &b], &channel.id, 5).await;
    let json = state_json();
    publisher.send_text(json.clone()).await;
    let mut frames = Vec::new();
    for raw in &mut on_b {
        let (first, payload) = read_frame(&mut raw.stream).await;
        assert_eq!(first, 0x80 | RSV1 | 0x1);
        assert_eq!(inflate(&payload), json.as_bytes());
        frames.push(payload);
    }
    assert!(frames.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        read_frame(&mut plain_on_b.stream).await,
        (0x81, json.into_bytes())
    );
    // Node A had no receiver that negotiated it; node B compressed once.
    assert_eq!(metric(&a, "wrs_compressions_total").await, 0.0);
    assert_eq!(metric(&b, "wrs_compressions_total").await, 1.0);
}
