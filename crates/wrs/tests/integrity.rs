//! Integrity under concurrency: many clients sending numbered messages at
//! once. Every delivery is accounted for — no loss, no duplicate, no
//! message to the wrong client, per-sender order kept.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Barrier, mpsc};
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 20;
const MESSAGES: usize = 200;

/// Parses `"<sender>:<seq>"`.
fn parse(text: &str) -> (usize, usize) {
    let (sender, seq) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("bad message {text}"));
    (sender.parse().unwrap(), seq.parse().unwrap())
}

/// Connects `CLIENTS` clients; each sends `MESSAGES` numbered messages
/// (all start together) while a reader forwards everything it receives as
/// `(receiver, sender, seq)`.
async fn run_senders(
    server: &TestServer,
    channel: &Created,
) -> (
    mpsc::UnboundedReceiver<(usize, usize, usize)>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let clients = server.connect_n(channel, CLIENTS).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let start = Arc::new(Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for (me, client) in clients.into_iter().enumerate() {
        let (mut sink, mut stream) = client.stream.split();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(text) = message {
                    let (sender, seq) = parse(&text);
                    if tx.send((me, sender, seq)).is_err() {
                        return;
                    }
                }
            }
        }));
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for seq in 0..MESSAGES {
                sink.feed(Message::text(format!("{me}:{seq}")))
                    .await
                    .unwrap();
            }
            sink.flush().await.unwrap();
            // Keep the connection open until the test ends.
            std::future::pending::<()>().await;
        }));
    }
    (rx, tasks)
}

async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(usize, usize, usize)>,
    expected: usize,
) -> Vec<(usize, usize, usize)> {
    let mut all = Vec::with_capacity(expected);
    bounded("all deliveries", async {
        while all.len() < expected {
            all.push(rx.recv().await.expect("readers alive"));
        }
    })
    .await;
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_sub_delivers_every_message_to_every_other_client_exactly_once_in_order() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("pub-sub").await;
    let (mut rx, tasks) = run_senders(&server, &channel).await;
    let expected = CLIENTS * (CLIENTS - 1) * MESSAGES;
    let all = collect(&mut rx, expected).await;
    // next_seq[receiver][sender]: messages must arrive 0, 1, 2, ... with
    // no gap, no repeat, and never from the receiver itself.
    let mut next_seq = vec![vec![0usize; CLIENTS]; CLIENTS];
    for &(receiver, sender, seq) in &all {
        assert_ne!(
            receiver, sender,
            "client {receiver} got its own message {seq}"
        );
        assert_eq!(
            seq, next_seq[receiver][sender],
            "client {receiver} from {sender}"
        );
        next_seq[receiver][sender] += 1;
    }
    for (receiver, row) in next_seq.iter().enumerate() {
        for (sender, &count) in row.iter().enumerate() {
            assert_eq!(count, if receiver == sender { 0 } else { MESSAGES });
        }
    }
    // And nothing beyond: the server counted exactly these deliveries.
    let stats = server.service_stats().await;
    assert_eq!(stats["messagesIn"], CLIENTS * MESSAGES);
    assert_eq!(stats["deliveries"], expected);
    assert_eq!(stats["droppedDeliveries"], 0);
    assert!(rx.try_recv().is_err());
    for task in tasks {
        task.abort();
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_delivers_every_message_exactly_once_in_sender_order() {
    let server = TestServer::start().await;
    let channel = server.create_pattern("push-pull").await;
    let (mut rx, tasks) = run_senders(&server, &channel).await;
    let expected = CLIENTS * MESSAGES;
    let all = collect(&mut rx, expected).await;
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    // Per receiver and sender, sequence numbers only increase.
    let mut last: HashMap<(usize, usize), usize> = HashMap::new();
    let mut per_receiver = vec![0usize; CLIENTS];
    for &(receiver, sender, seq) in &all {
        assert_ne!(
            receiver, sender,
            "a sender got its own job while others were connected"
        );
        *seen.entry((sender, seq)).or_default() += 1;
        if let Some(&previous) = last.get(&(receiver, sender)) {
            assert!(
                seq > previous,
                "receiver {receiver} got {sender}:{seq} after {sender}:{previous}"
            );
        }
        last.insert((receiver, sender), seq);
        per_receiver[receiver] += 1;
    }
    assert_eq!(seen.len(), expected, "some messages were lost");
    assert!(
        seen.values().all(|&n| n == 1),
        "some messages were delivered twice"
    );
    let stats = server.service_stats().await;
    assert_eq!(stats["deliveries"], expected);
    assert_eq!(stats["droppedDeliveries"], 0);
    // Many senders share one rotation, so shares are near, not exactly, equal.
    let fair = expected / CLIENTS;
    for (receiver, &count) in per_receiver.iter().enumerate() {
        assert!(
            count.abs_diff(fair) <= fair / 4,
            "receiver {receiver} got {count}, fair is {fair}: {per_receiver:?}"
        );
    }
    for task in tasks {
        task.abort();
    }
    server.shutdown().await;
}
