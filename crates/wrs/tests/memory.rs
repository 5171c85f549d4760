//! Memory per idle connection comes back after a burst: the real `wrs`
//! binary, a few hundred pub-sub subscribers that stop reading while a
//! publisher sends a burst (so their outboxes grow to thousands of frames),
//! then read everything and go quiet. The process's resident memory must
//! return close to its figure before the burst.
//!
//! The payloads are shared between outboxes and freed once written; what a
//! server that never gives capacity back keeps is the queues' buffers
//! (32 bytes a slot, for the largest burst each connection saw): up to
//! 300 × 8 192 slots × 32 B × 2 queues here. Without the give-back it
//! stayed 54-72 MiB above the idle figure; with it, within 5 MiB.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// Subscribers that fall behind together.
const SUBSCRIBERS: usize = 300;
/// Messages in the burst: with 512-byte payloads the kernel's socket
/// buffers absorb a couple of thousand frames per subscriber, the rest
/// waits in its outbox (4 MiB of frames: below the default byte bound).
const MESSAGES: usize = 8_000;
const PAYLOAD_BYTES: usize = 512;
/// The server's ping interval: the quiet moment that gives memory back.
/// Not shorter: the server drops a client it has not heard from during a
/// whole interval, and while it fans the burst out (unoptimised, on a
/// machine that other tests may share) a connection task can wait that
/// long for its turn.
const PING_INTERVAL_MS: u64 = 2_000;
/// How often every client sends an unsolicited pong, so that the server
/// hears from subscribers that are not reading (it drops a client it has
/// not heard from since its previous ping).
const KEEPALIVE: Duration = Duration::from_millis(50);
/// How far above its idle figure the process may stay after the burst.
const MARGIN_BYTES: u64 = 10 * 1024 * 1024;

/// The `wrs` binary on an ephemeral port, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    async fn start() -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wrs"))
            .env("WRS_API_PORT", "0")
            .env("WRS_BIND_ADDRESS", "127.0.0.1")
            .env("WRS_LOG_FORMAT", "json")
            .env("WRS_PING_INTERVAL_MS", PING_INTERVAL_MS.to_string())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wrs");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = bounded("wrs to listen", async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("read stdout")
                    .expect("wrs exited before listening");
                if let Ok(log) = serde_json::from_str::<Value>(&line)
                    && log["message"] == "listening"
                {
                    return log["address"].as_str().expect("address").parse().unwrap();
                }
            }
        })
        .await;
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, addr }
    }

    /// Resident memory of the process, in bytes (`VmRSS`).
    fn rss(&self) -> u64 {
        let pid = self.child.id().expect("wrs is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"));
        kib * 1024
    }

    async fn get(&self, http: &reqwest::Client, path: &str) -> Value {
        let response = bounded(path, http.get(format!("http://{}{path}", self.addr)).send())
            .await
            .expect("GET");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        bounded(path, response.json()).await.expect("JSON body")
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Reads one unmasked server frame header and payload into `payload`;
/// returns the opcode, or `None` at the end of the stream.
async fn read_frame(reader: &mut BufReader<OwnedReadHalf>, payload: &mut Vec<u8>) -> Option<u8> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head).await.ok()?;
    let len = match head[1] & 0x7F {
        126 => u64::from(reader.read_u16().await.ok()?),
        127 => reader.read_u64().await.ok()?,
        n => u64::from(n),
    };
    payload.resize(usize::try_from(len).expect("frame length"), 0);
    reader.read_exact(payload).await.ok()?;
    Some(head[0] & 0x0F)
}

/// Waits for `go`, then reads until `expected` data frames arrived
/// (skipping pings) and reports; then keeps draining pings.
async fn read_side(
    read: OwnedReadHalf,
    mut go: watch::Receiver<bool>,
    expected: usize,
    done_tx: mpsc::UnboundedSender<Result<(), String>>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut payload = Vec::new();
    let _ = go.wait_for(|go| *go).await;
    let mut received = 0;
    while received < expected {
        match read_frame(&mut reader, &mut payload).await {
            Some(0x1 | 0x2) if payload.len() == PAYLOAD_BYTES => {
                received += 1;
                // Reading from a full buffer never waits, so a subscriber
                // could read its whole backlog in one go while the other
                // tasks, and its own keep-alive, wait. Take turns.
                if received % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Some(0x9) => {}
            other => {
                let _ = done_tx.send(Err(format!(
                    "after {received} messages: opcode {other:?}, {} bytes",
                    payload.len()
                )));
                return;
            }
        }
    }
    let _ = done_tx.send(Ok(()));
    drain(reader).await;
}

/// Reads and discards frames until the stream ends.
async fn drain(mut reader: BufReader<OwnedReadHalf>) {
    let mut payload = Vec::new();
    while read_frame(&mut reader, &mut payload).await.is_some() {}
}

/// One client's write side: an unsolicited pong every [`KEEPALIVE`], so
/// the server hears from the client even while it reads nothing (a client
/// silent for a ping interval is dropped); and, for the publisher, the
/// burst once `publish` fires. Runs until aborted.
async fn write_side(mut write: OwnedWriteHalf, publish: Option<oneshot::Receiver<()>>) {
    let pong = client_frame(true, 0xA, b"");
    let message = client_frame(true, 0x1, &[b'x'; PAYLOAD_BYTES]);
    let mut tick = tokio::time::interval(KEEPALIVE);
    let publish = async {
        match publish {
            Some(publish_rx) => publish_rx.await.is_ok(),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(publish);
    let mut published = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if write.write_all(&pong).await.is_err() {
                    return; // The server is gone; the reading side reports it.
                }
            }
            go = &mut publish, if !published => {
                published = true;
                if !go {
                    return; // The test ended before the burst.
                }
                for _ in 0..MESSAGES {
                    if write.write_all(&message).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Opens an upgraded raw connection to the channel.
async fn connect(addr: SocketAddr, path: &str) -> (OwnedReadHalf, OwnedWriteHalf) {
    let raw = raw_request(addr, &upgrade_request(path)).await;
    assert_eq!(raw.status, 101, "{}", raw.head);
    raw.stream.into_split()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_its_idle_figure_after_a_burst() {
    let server = Server::start().await;
    let http = http_client();
    let response = bounded(
        "create",
        http.post(format!("http://{}/channels", server.addr))
            .json(&json!({ "pattern": "pub-sub" }))
            .send(),
    )
    .await
    .expect("POST /channels");
    assert_eq!(response.status(), 201);
    let created: Value = bounded("create body", response.json()).await.unwrap();
    let path = format!(
        "/channels/{}/connect?token={}",
        created["data"]["id"].as_str().expect("id"),
        created["token"].as_str().expect("token")
    );

    let mut tasks = JoinSet::new();
    let (go_tx, go_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for _ in 0..SUBSCRIBERS {
        let (read, write) = connect(server.addr, &path).await;
        let reading = read_side(read, go_rx.clone(), MESSAGES, done_tx.clone());
        tasks.spawn(async move { tokio::join!(write_side(write, None), reading) });
    }
    // The publisher receives nothing but pings.
    let (read, write) = connect(server.addr, &path).await;
    let (publish_tx, publish_rx) = oneshot::channel();
    tasks.spawn(async move {
        tokio::join!(
            write_side(write, Some(publish_rx)),
            drain(BufReader::new(read))
        )
    });
    let channel_path = format!("/channels/{}", created["data"]["id"].as_str().unwrap());
    eventually("every client in the roster", || async {
        let clients = server.get(&http, &channel_path).await["data"]["clients"].as_u64();
        (clients == Some(SUBSCRIBERS as u64 + 1)).then_some(())
    })
    .await;

    // The idle figure: every connection has been through a ping tick (a
    // pause to let time pass, not to wait for an event).
    tokio::time::sleep(Duration::from_millis(3 * PING_INTERVAL_MS / 2)).await;
    let idle = server.rss();

    // The burst, while the subscribers read nothing.
    publish_tx.send(()).unwrap();
    let deliveries = (MESSAGES * SUBSCRIBERS) as u64;
    let stats = eventually_within(
        Duration::from_secs(20),
        "the burst queued for every subscriber",
        || async {
            let stats = server.get(&http, "/service").await["data"]["stats"].clone();
            (stats["deliveries"].as_u64() == Some(deliveries)
                || stats["slowConsumerCloses"].as_u64() != Some(0))
            .then_some(stats)
        },
    )
    .await;
    assert_eq!(stats["slowConsumerCloses"], 0, "{stats}");
    assert_eq!(stats["droppedDeliveries"], 0, "{stats}");
    let peak = server.rss();

    // Everybody reads everything.
    go_tx.send(true).unwrap();
    for _ in 0..SUBSCRIBERS {
        let done = within(
            Duration::from_secs(30),
            "subscribers to read",
            done_rx.recv(),
        )
        .await
        .expect("a result");
        done.unwrap_or_else(|e| panic!("a subscriber: {e}"));
    }
    let after_reading = server.rss();

    // Quiet: within a ping interval or two (plus the allocator's own delay
    // before it returns pages) the memory comes back.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let rss = server.rss();
            if rss <= idle + MARGIN_BYTES {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let now = server.rss();
    eprintln!(
        "RSS: idle {:.1} MiB, burst queued {:.1} MiB, all read {:.1} MiB, after idling {:.1} MiB",
        mib(idle),
        mib(peak),
        mib(after_reading),
        mib(now)
    );
    if settled.is_err() {
        panic!(
            "resident memory stayed at {:.1} MiB after idling, {:.1} MiB above its idle figure \
             of {:.1} MiB (allowed: {:.1} MiB)",
            mib(now),
            mib(now.saturating_sub(idle)),
            mib(idle),
            mib(MARGIN_BYTES)
        );
    }
    let stats = server.get(&http, "/service").await["data"]["stats"].clone();
    assert_eq!(stats["slowConsumerCloses"], 0, "{stats}");
    let clients = server.get(&http, &channel_path).await["data"]["clients"].as_u64();
    assert_eq!(clients, Some(SUBSCRIBERS as u64 + 1), "nobody was dropped");
    tasks.shutdown().await;
}
