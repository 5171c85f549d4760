//! Test fixtures: a real server on an ephemeral loopback port, an HTTP
//! client, and WebSocket clients (tungstenite, an independent
//! implementation) with every wait bounded.

#![allow(dead_code)] // Each test binary uses a different subset.

pub mod nats;
pub mod process;
pub mod sse;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test if it takes longer than [`WAIT`].
pub async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    within(WAIT, what, future).await
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, check).await
}

/// Polls `check` until it returns `Some`, for at most `limit`.
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(limit, what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Sorts `times` and returns the most of them within any one second.
pub fn busiest_second(times: &mut [tokio::time::Instant]) -> usize {
    times.sort();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|at| at.duration_since(times[i]) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// An HTTP client. Tests use rustls with the ring provider (as the server
/// does), installed once per process.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub struct TestServer {
    server: Option<wrs::Server>,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

/// A channel just created: its id, token and the full create response.
pub struct Created {
    pub id: String,
    pub token: String,
    pub body: Value,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut wrs::Config)) -> Self {
        // `WRS_TEST_LOG=wrs=debug` shows the servers' logs with a test's
        // output.
        if let Ok(filter) = std::env::var("WRS_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let mut config = wrs::Config::for_tests();
        tweak(&mut config);
        let server = wrs::start(config).await.expect("server starts");
        Self {
            addr: server.local_addr(),
            server: Some(server),
            http: http_client(),
        }
    }

    /// An HTTP client for a server that runs elsewhere (another process).
    pub fn client_of(addr: SocketAddr) -> Self {
        Self {
            server: None,
            addr,
            http: http_client(),
        }
    }

    /// The in-process server (none for [`TestServer::client_of`]).
    pub fn server(&self) -> Option<&wrs::Server> {
        self.server.as_ref()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, channel: &str, token: &str) -> String {
        format!(
            "ws://{}/channels/{channel}/connect?token={token}",
            self.addr
        )
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = bounded(path, request.send()).await.expect("HTTP request");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = bounded(path, response.text()).await.expect("HTTP body");
        assert!(
            content_type.starts_with("application/json"),
            "{path}: content-type {content_type:?}, body {text}"
        );
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        assert!(value.is_object(), "{path}: body is not an object: {text}");
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a channel from a JSON body and checks the 201 envelope.
    pub async fn create(&self, body: Value) -> Created {
        let (status, body) = self.post("/channels", &body.to_string()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Created {
            id: body["data"]["id"].as_str().expect("id").to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
            body,
        }
    }

    pub async fn create_pattern(&self, pattern: &str) -> Created {
        self.create(json!({ "pattern": pattern })).await
    }

    pub async fn connect(&self, channel: &Created) -> Ws {
        self.connect_url(&self.ws_url(&channel.id, &channel.token))
            .await
    }

    pub async fn connect_url(&self, url: &str) -> Ws {
        let (stream, response) = bounded(url, tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        assert_eq!(response.status(), 101);
        Ws { stream }
    }

    /// Connects `n` clients and waits until the server lists all of them.
    pub async fn connect_n(&self, channel: &Created, n: usize) -> Vec<Ws> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(self.connect(channel).await);
        }
        self.wait_for_clients(&channel.id, n as u64).await;
        clients
    }

    /// The ids of the channel's clients, in join order.
    pub async fn client_ids(&self, channel: &str) -> Vec<String> {
        let (status, body) = self.get(&format!("/channels/{channel}/clients")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["data"]
            .as_array()
            .expect("client list")
            .iter()
            .map(|c| c["id"].as_str().expect("client id").to_owned())
            .collect()
    }

    pub async fn client_count(&self, channel: &str) -> Option<u64> {
        let (status, body) = self.get(&format!("/channels/{channel}")).await;
        (status == StatusCode::OK).then(|| body["data"]["clients"].as_u64().expect("clients"))
    }

    pub async fn wait_for_clients(&self, channel: &str, n: u64) {
        eventually(&format!("{n} clients on {channel}"), || async {
            (self.client_count(channel).await == Some(n)).then_some(())
        })
        .await;
    }

    pub async fn service_stats(&self) -> Value {
        let (status, body) = self.get("/service").await;
        assert_eq!(status, StatusCode::OK);
        body["data"]["stats"].clone()
    }

    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            bounded("server shutdown", server.shutdown()).await;
        }
    }
}

/// A WebSocket client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        bounded("send", self.stream.send(Message::text(text)))
            .await
            .expect("send text");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        bounded("send", self.stream.send(Message::binary(data)))
            .await
            .expect("send binary");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    /// The next text or binary message (pings and pongs are skipped).
    pub async fn recv(&mut self) -> Message {
        loop {
            let message = bounded("receive", self.stream.next())
                .await
                .expect("stream ended")
                .expect("receive");
            match message {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return other,
            }
        }
    }

    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Message::Text(text) => text.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Reads until the server's close frame; returns its code and reason.
    /// Data frames before it are returned too, in order.
    pub async fn recv_until_close(&mut self) -> (Vec<Message>, Option<(u16, String)>) {
        let mut before = Vec::new();
        loop {
            match bounded("close frame", self.stream.next()).await {
                Some(Ok(Message::Close(frame))) => {
                    let close = frame
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()));
                    return (before, close);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => before.push(message),
                Some(Err(e)) => panic!("error before the close frame: {e}"),
                None => return (before, None),
            }
        }
    }

    /// Expects the next frame to be a close frame with `code`.
    pub async fn expect_close(&mut self, code: u16) -> String {
        let (before, close) = self.recv_until_close().await;
        assert!(before.is_empty(), "messages before the close: {before:?}");
        let (got, reason) = close.expect("a close frame with a code");
        assert_eq!(got, code, "close reason {reason:?}");
        reason
    }

    pub async fn close(mut self) {
        let _ = bounded("close", self.stream.close(None)).await;
        // Drain until the server's reply or the end of the stream.
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}

/// A raw TCP connection that has completed the WebSocket handshake (or
/// was refused), for tests that need to misbehave below the client
/// library: never read, send malformed frames, vanish.
pub struct RawWs {
    pub stream: TcpStream,
    pub status: u16,
    pub head: String,
    /// Bytes read past the response head (the start of an error body).
    pub leftover: Vec<u8>,
}

/// Sends a handshake request with `extra` headers replacing the defaults
/// where given; returns the response head and the open stream.
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawWs {
    let raw = raw_exchange(addr, request).await;
    if raw.status == 101 {
        assert!(
            raw.leftover.is_empty(),
            "frames arrived with the handshake response"
        );
    }
    raw
}

/// Like [`raw_request`], but frames may follow the 101 at once (they are
/// in `leftover`).
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> RawWs {
    let mut stream = bounded("tcp connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut reader = BufReader::new(&mut stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = bounded("response head", reader.read_line(&mut line))
            .await
            .expect("read head");
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let leftover = reader.buffer().to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawWs {
        stream,
        status,
        head,
        leftover,
    }
}

/// Reads the JSON body after a raw response head.
pub async fn raw_json_body(raw: &mut RawWs) -> serde_json::Value {
    let length: usize = raw
        .head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = std::mem::take(&mut raw.leftover);
    let have = body.len();
    body.resize(length, 0);
    bounded(
        "error body",
        tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut body[have..]),
    )
    .await
    .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// A complete, valid upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Opens a raw upgraded connection to a channel.
pub async fn raw_connect(server: &TestServer, channel: &Created) -> RawWs {
    let raw = raw_request(
        server.addr,
        &upgrade_request(&format!(
            "/channels/{}/connect?token={}",
            channel.id, channel.token
        )),
    )
    .await;
    assert_eq!(raw.status, 101, "{}", raw.head);
    raw
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one unmasked server frame: (opcode, payload).
pub async fn read_server_frame<R: AsyncRead + Unpin>(stream: &mut R) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    bounded("frame header", stream.read_exact(&mut head))
        .await
        .ok()?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await.ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await.ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    bounded("frame payload", stream.read_exact(&mut payload))
        .await
        .ok()?;
    Some((head[0] & 0x0F, payload))
}

/// The close code inside a close frame's payload.
pub fn close_code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// A JSON body's `error` code.
pub fn error_code(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

/// Asserts the exact error envelope: `message` and `error`, nothing else.
pub fn assert_error_envelope(body: &Value, code: &str) {
    let object = body.as_object().expect("object");
    assert_eq!(object.len(), 2, "{body}");
    assert!(
        object["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error_code(body), code, "{body}");
}

// Paused time. A test with `#[tokio::test(start_paused = true)]` runs the
// server and its clients on one current-thread runtime whose clock stands
// still while any task can make progress (a request over loopback takes no
// time) and jumps to the next timer when every task waits. Timeouts and
// countdowns are then exact: the channel's clock and the test's
// `tokio::time::Instant` are the same clock.

/// Sleeps until `ms` milliseconds of tokio time after `start`.
pub async fn sleep_until_ms(start: tokio::time::Instant, ms: u64) {
    tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
}

/// Asserts that exactly `ms` milliseconds of tokio time passed since
/// `start` (on paused time: that nothing waited on an unexpected timer).
#[track_caller]
pub fn assert_elapsed_ms(start: tokio::time::Instant, ms: u64, what: &str) {
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(ms),
        "tokio time elapsed: {what}"
    );
}

impl TestServer {
    /// The channel's `countdown` in `GET /channels/{id}`; `None` once the
    /// channel is gone (404).
    pub async fn countdown(&self, channel: &str) -> Option<i64> {
        let (status, body) = self.get(&format!("/channels/{channel}")).await;
        match status {
            StatusCode::OK => Some(body["data"]["countdown"].as_i64().expect("countdown")),
            StatusCode::NOT_FOUND => None,
            other => panic!("GET /channels/{channel}: {other} {body}"),
        }
    }
}
