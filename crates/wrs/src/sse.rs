//! Server-Sent Events (SPEC §10): how a message, a `close` and a `reset`
//! look on an event stream, and the stream of one receive-only client.
//!
//! A text message is one `message` event whose `data:` lines are the
//! text split at its line breaks (a browser's `EventSource` joins them
//! with `\n`); a binary message is a `binary` event with the payload in
//! base64. With history every message event carries `id: <offset>`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::relay::admission::Member;
use crate::relay::client::CloseReason;
use crate::relay::evacuate::reason_label;
use crate::relay::history::Entry;

/// The reconnect delay a stream asks browsers for, in ms (its `retry:`
/// line). A drained node's clients reconnect after it.
pub const RETRY_MS: u64 = 1000;

/// A message event.
pub fn message(offset: Option<u64>, binary: bool, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 32);
    if let Some(offset) = offset {
        out.put_slice(b"id: ");
        out.put_slice(offset.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    if binary {
        out.put_slice(b"event: binary\ndata: ");
        out.put_slice(BASE64.encode(payload).as_bytes());
        out.put_u8(b'\n');
    } else {
        // A text message is valid UTF-8; each line (split at CRLF, CR or
        // LF) becomes one data line.
        let mut rest = payload;
        loop {
            let end = rest
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .unwrap_or(rest.len());
            out.put_slice(b"data: ");
            out.put_slice(&rest[..end]);
            out.put_u8(b'\n');
            if end == rest.len() {
                break;
            }
            let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            rest = &rest[end + skip..];
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// A kept message as an event.
pub fn entry(entry: &Entry) -> Bytes {
    message(Some(entry.offset), entry.binary, &entry.payload)
}

/// The event that ends a stream: `close` with the WebSocket close code a
/// WebSocket client of the channel would get.
pub fn close(reason: CloseReason) -> Bytes {
    event(
        "close",
        &serde_json::json!({"code": reason.code(), "reason": reason.text()}),
    )
}

/// The first event of a resumed stream whose offset is older than what is
/// kept: `oldest` is the oldest offset that follows.
pub fn reset(oldest: u64) -> Bytes {
    event(
        "reset",
        &serde_json::json!({"reason": "history_expired", "oldest": oldest}),
    )
}

/// The welcome of a channel created with `"welcome": true`: a `hello`
/// event with the JSON a WebSocket client gets as its first frame.
pub fn hello(json: &str) -> Bytes {
    Bytes::from(format!("event: hello\ndata: {json}\n\n"))
}

fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The `retry:` line every stream starts with.
pub fn retry() -> Bytes {
    Bytes::from(format!("retry: {RETRY_MS}\n\n"))
}

const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// The offset in a message event's `id:` line, if it has one.
fn offset_of(event: &[u8]) -> Option<u64> {
    let rest = event.strip_prefix(b"id: ")?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// One SSE client's stream: what it is first sent (the `retry:` line and,
/// when it resumes, the kept messages it missed), then whatever reaches its
/// outbox, a keepalive comment every `keepalive`, and a `close` event when
/// the client is closed. Dropping the stream (the browser went away)
/// drops the member, which removes the client.
pub struct Events {
    member: Member,
    first: Option<Bytes>,
    /// Messages up to this offset were in `first`: copies delivered live
    /// meanwhile are skipped.
    skip_through: u64,
    pending: VecDeque<Bytes>,
    keepalive: Interval,
    /// `WRS_MAX_CONNECTION_AGE_MS`: closed with 1012 at about this time.
    max_age: Option<Instant>,
    done: bool,
}

impl Events {
    pub fn new(member: Member, first: Bytes, skip_through: u64, keepalive: Duration) -> Self {
        let now = Instant::now();
        let mut keepalive = tokio::time::interval_at(now + keepalive, keepalive);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            max_age: member.relay().connection_deadline(now),
            member,
            first: Some(first),
            skip_through,
            pending: VecDeque::new(),
            keepalive,
            done: false,
        }
    }

    /// The stream for the response body.
    pub fn stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut events| async move {
            let chunk = events.next().await?;
            Some((Ok(chunk), events))
        })
    }

    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            let client = self.member.client();
            let closing = client.outbox.take(&mut self.pending);
            let mut chunk = BytesMut::new();
            for event in self.pending.drain(..) {
                if self.skip_through > 0 {
                    match offset_of(&event) {
                        Some(offset) if offset <= self.skip_through => continue,
                        _ => self.skip_through = 0,
                    }
                }
                chunk.extend_from_slice(&event);
            }
            if let Some(reason) = closing {
                chunk.extend_from_slice(&close(reason));
                self.done = true;
            }
            if !chunk.is_empty() {
                return Some(chunk.freeze());
            }
            let aged = tokio::time::sleep_until(self.max_age.unwrap_or_else(Instant::now));
            tokio::select! {
                () = client.outbox.notified() => {}
                _ = self.keepalive.tick() => return Some(Bytes::from_static(KEEPALIVE)),
                () = aged, if self.max_age.is_some() => {
                    self.max_age = None;
                    let (channel, relay) = (self.member.channel(), self.member.relay());
                    if channel.disconnect(client.id(), CloseReason::MaxAge) {
                        relay.metrics().client_closed(reason_label(CloseReason::MaxAge));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Bytes) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn text_is_split_into_data_lines() {
        assert_eq!(text(message(None, false, b"hi")), "data: hi\n\n");
        assert_eq!(
            text(message(Some(7), false, b"a\nb\r\nc\rd")),
            "id: 7\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        // Empty lines stay lines, so the browser rebuilds the text.
        assert_eq!(text(message(None, false, b"")), "data: \n\n");
        assert_eq!(text(message(None, false, b"x\n")), "data: x\ndata: \n\n");
    }

    #[test]
    fn binary_is_base64_in_a_binary_event() {
        assert_eq!(
            text(message(Some(1), true, &[0, 255, 10])),
            "id: 1\nevent: binary\ndata: AP8K\n\n"
        );
    }

    #[test]
    fn close_and_reset_events() {
        assert_eq!(
            text(close(CloseReason::ChannelDeleted)),
            "event: close\ndata: {\"code\":4001,\"reason\":\"channel deleted\"}\n\n"
        );
        assert_eq!(
            text(reset(12)),
            "event: reset\ndata: {\"oldest\":12,\"reason\":\"history_expired\"}\n\n"
        );
    }

    #[test]
    fn the_offset_is_read_back_from_an_event() {
        assert_eq!(offset_of(&message(Some(42), false, b"x")), Some(42));
        assert_eq!(offset_of(&message(None, false, b"x")), None);
        assert_eq!(offset_of(KEEPALIVE), None);
    }
}
