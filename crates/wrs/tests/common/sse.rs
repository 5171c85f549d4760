//! A Server-Sent Events client for tests: reads a real HTTP response
//! stream and parses it as the HTML standard's EventSource does (fields,
//! `data:` lines joined with `\n`, comments), with every wait bounded.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::StatusCode;

use super::{Created, TestServer, bounded};

/// One dispatched event (or a comment, with `event == ":"`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    /// `message` unless the stream named another type.
    pub event: String,
    pub data: String,
    /// A `retry:` field seen in this block.
    pub retry: Option<u64>,
}

pub struct Sse {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
    /// Text of a refusal (not an event stream).
    pub error: Option<serde_json::Value>,
}

impl Sse {
    /// Opens `/channels/{id}/events?token=T` (plus `query`), with a
    /// `Last-Event-ID` header if given.
    pub async fn open(
        server: &TestServer,
        channel: &str,
        token: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Sse {
        let url = server.url(&format!("/channels/{channel}/events?token={token}{query}"));
        let mut request = server.http.get(&url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = bounded("event stream", request.send())
            .await
            .expect("events request");
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::OK {
            let text = bounded("refusal", response.text()).await.expect("body");
            return Sse {
                status,
                headers,
                body: futures_util::stream::empty().boxed(),
                buffer: Vec::new(),
                error: Some(serde_json::from_str(&text).expect("JSON refusal")),
            };
        }
        Sse {
            status,
            headers,
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
            error: None,
        }
    }

    /// Opens a stream that must be accepted, and reads its `retry:` line.
    pub async fn open_ok(
        server: &TestServer,
        channel: &Created,
        last_event_id: Option<&str>,
    ) -> Sse {
        let mut events = Sse::open(server, &channel.id, &channel.token, "", last_event_id).await;
        assert_eq!(events.status, StatusCode::OK, "{:?}", events.error);
        let first = events.next_block().await.expect("retry line");
        assert_eq!(first.retry, Some(1000));
        events
    }

    /// The next block: an event, a comment (`event == ":"`, `data` its
    /// text) or a lone `retry:` (`event` empty). `None` when the stream
    /// ended.
    pub async fn next_block(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(block).expect("UTF-8 event stream");
                return Some(parse(&text[..text.len() - 2]));
            }
            match bounded("SSE data", self.body.next()).await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => panic!("event stream failed: {e}"),
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "stream ended inside a block: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
            }
        }
    }

    /// The next event, skipping comments and `retry:` blocks.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            let block = self.next_block().await?;
            if block.event != ":" && !block.event.is_empty() {
                return Some(block);
            }
        }
    }

    /// The next event, which must exist.
    pub async fn event(&mut self) -> Event {
        self.next_event().await.expect("an event before the end")
    }

    /// Events until a `close` event (returned last) or the end.
    pub async fn until_close(&mut self) -> (Vec<Event>, Option<Event>) {
        let mut before = Vec::new();
        while let Some(event) = self.next_event().await {
            if event.event == "close" {
                return (before, Some(event));
            }
            before.push(event);
        }
        (before, None)
    }
}

/// `POST /channels/{id}/messages` with a text body; the status and the
/// body as text.
pub async fn post(
    server: &TestServer,
    channel: &Created,
    body: &str,
    query: &str,
) -> (StatusCode, String) {
    post_raw(
        server,
        channel,
        body.as_bytes().to_vec(),
        "text/plain",
        query,
    )
    .await
}

/// `POST /channels/{id}/messages` with any body and content type.
pub async fn post_raw(
    server: &TestServer,
    channel: &Created,
    body: Vec<u8>,
    content_type: &str,
    query: &str,
) -> (StatusCode, String) {
    let url = server.url(&format!(
        "/channels/{}/messages?token={}{query}",
        channel.id, channel.token
    ));
    let response = bounded(
        "publish",
        server
            .http
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send(),
    )
    .await
    .expect("publish request");
    let status = response.status();
    (
        status,
        bounded("publish body", response.text()).await.unwrap(),
    )
}

/// Like [`post`], with the answer parsed as JSON.
pub async fn post_json(
    server: &TestServer,
    channel: &Created,
    body: &str,
    query: &str,
) -> (StatusCode, serde_json::Value) {
    let (status, text) = post(server, channel, body, query).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

fn parse(block: &str) -> Event {
    let mut event = Event::default();
    let mut data: Vec<&str> = Vec::new();
    let mut name = None;
    let mut comment = None;
    for line in block.split('\n') {
        if let Some(text) = line.strip_prefix(':') {
            comment = Some(text.trim_start().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => data.push(value),
            "event" => name = Some(value.to_owned()),
            "id" => event.id = Some(value.to_owned()),
            "retry" => event.retry = value.parse().ok(),
            other => panic!("unknown SSE field {other:?} in {block:?}"),
        }
    }
    if !data.is_empty() {
        event.event = name.unwrap_or_else(|| "message".to_owned());
        event.data = data.join("\n");
    } else if let Some(comment) = comment {
        event.event = ":".to_owned();
        event.data = comment;
    }
    event
}
