//! One WebSocket connection after the upgrade: a single task that reads
//! frames, relays messages, drains the client's outbox and keeps the
//! connection alive with pings.
//!
//! The task owns both halves of the socket. Reading, writing, the outbox
//! and the ping timer are polled together in one `select!`, and every
//! branch is cancel-safe: a write is one `writev` of whatever is pending,
//! a read is one non-blocking read after readiness. An idle connection
//! holds no read buffer, and at most a few slots of write queue: what a
//! burst grew is given back on the first ping timer tick that finds both
//! the connection's queue and the client's outbox empty.

pub mod codec;
pub mod deflate;
pub mod handshake;
mod send;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;
use tracing::debug;

use crate::relay::admission::Member;
use crate::relay::channel::Channel;
use crate::relay::client::{Client, CloseReason, IDLE_QUEUE_SLOTS};
use crate::relay::evacuate::reason_label;
use crate::relay::overload::TokenBucket;
use crate::relay::{ClientRatePolicy, Message, Relay};
use codec::{Decoder, Event, OpCode, ProtocolError, close_code};

/// Buffer reserved for a read when no larger frame is pending.
const READ_CHUNK: usize = 4096;
/// Most frames handed to one `writev`.
const MAX_IOV: usize = 64;
/// How long the closing handshake may take before the socket is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs an upgraded connection of an admitted client to completion; the
/// client leaves when it ends (dropping `member`).
pub(crate) async fn serve(upgraded: Upgraded, member: Member) {
    let (relay, channel, client) = (member.relay(), member.channel(), member.client());
    let ending = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (reader, writer) = parts.io.into_inner().into_split();
            let writer = send::SendHalf::new(writer);
            Connection::new(reader, writer, parts.read_buf, relay, channel, client)
                .run()
                .await
        }
        Err(upgraded) => {
            let (reader, writer) = tokio::io::split(TokioIo::new(upgraded));
            Connection::new(reader, writer, Bytes::new(), relay, channel, client)
                .run()
                .await
        }
    };
    debug!(channel = %channel.id(), client = %client.id(), ending = %ending, "client disconnected");
}

/// Closes a connection upgraded only to say why it was refused: the close
/// frame (`code`, `reason`) at once, then, bounded by the closing
/// handshake's timeout, the client's close frame (anything before it is
/// discarded).
pub(crate) async fn refuse(upgraded: Upgraded, code: u16, reason: &str) {
    let mut io = TokioIo::new(upgraded);
    let frame = codec::encode_close(code, reason);
    let handshake = async {
        io.write_all(&frame).await?;
        io.flush().await?;
        let mut decoder = Decoder::new(READ_CHUNK);
        let mut inbox = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if io.read_buf(&mut inbox).await? == 0 {
                return io::Result::Ok(());
            }
            loop {
                match decoder.decode(&mut inbox) {
                    Ok(Some(Event::Close(_))) | Err(_) => return io.shutdown().await,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
            if inbox.len() > READ_CHUNK {
                return Ok(());
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// How a connection ended.
#[derive(Debug)]
enum Ending {
    /// The service asked it to close (channel deleted or timed out,
    /// shutdown, slow consumer).
    Requested(CloseReason),
    /// The client broke the protocol or a limit.
    Violation(ProtocolError),
    /// The client sent a close frame (with this code, if any).
    PeerClosed(Option<u16>),
    /// The socket is gone or dead; no close frame can be exchanged.
    Lost(&'static str),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Requested(reason) => write!(f, "closed by the service: {}", reason.text()),
            Ending::Violation(error) => write!(f, "{error}"),
            Ending::PeerClosed(Some(code)) => write!(f, "closed by the client with {code}"),
            Ending::PeerClosed(None) => f.write_str("closed by the client"),
            Ending::Lost(why) => f.write_str(why),
        }
    }
}

/// The read half of a connection: waits for data, then reads what is there.
trait Source: Send {
    /// Reads into `buf`, making room for `want` bytes only once data is
    /// ready. Returns 0 at end of stream. Cancel-safe.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        want: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

impl Source for OwnedReadHalf {
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        loop {
            self.readable().await?;
            buf.reserve(want);
            match self.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return result,
            }
        }
    }
}

impl<T: AsyncRead + Send> Source for tokio::io::ReadHalf<T> {
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        buf.reserve(want);
        self.read_buf(buf).await
    }
}

struct Connection<'a, R, W> {
    reader: R,
    writer: W,
    /// Received bytes not yet decoded; empty (unallocated) when idle.
    inbox: BytesMut,
    decoder: Decoder,
    /// Encoded frames taken from the outbox, being written. It trades
    /// buffers with the outbox on each take, so its capacity follows the
    /// largest burst until [`Connection::shrink_if_idle`] gives it back.
    pending: VecDeque<Bytes>,
    /// Bytes of `pending`'s first frame already written.
    written: usize,
    relay: &'a Relay,
    channel: &'a Arc<Channel>,
    client: &'a Client,
    last_heard: Instant,
    ping_sent: Option<Instant>,
    /// `WRS_CLIENT_RATE`, if set.
    limiter: Option<TokenBucket>,
    /// A message over the rate, relayed when the bucket refills; while it
    /// waits nothing more is read (throttle policy).
    held: Option<Message>,
    /// When the held message may go.
    resume_at: Option<Instant>,
}

impl<'a, R: Source, W: AsyncWrite + Unpin + Send> Connection<'a, R, W> {
    fn new(
        reader: R,
        writer: W,
        leftover: Bytes,
        relay: &'a Relay,
        channel: &'a Arc<Channel>,
        client: &'a Client,
    ) -> Self {
        Self {
            reader,
            writer,
            inbox: BytesMut::from(&leftover[..]),
            decoder: Decoder::new(relay.settings().max_message_bytes)
                .with_deflate(client.deflate().is_some()),
            pending: VecDeque::new(),
            written: 0,
            relay,
            channel,
            client,
            last_heard: Instant::now(),
            ping_sent: None,
            limiter: relay
                .settings()
                .client_rate
                .map(|(rate, burst)| TokenBucket::new(rate, burst, Instant::now())),
            held: None,
            resume_at: None,
        }
    }

    async fn run(mut self) -> Ending {
        let interval = self.relay.settings().ping_interval;
        let ping = tokio::time::sleep(interval);
        tokio::pin!(ping);
        let throttle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(throttle);
        let mut max_age = self.relay.connection_deadline(Instant::now());
        let aged = tokio::time::sleep_until(max_age.unwrap_or_else(Instant::now));
        tokio::pin!(aged);
        // Bytes that arrived with the handshake are decoded first.
        let mut ending = if self.inbox.is_empty() {
            None
        } else {
            self.process_inbox()
        };
        while ending.is_none() {
            if self.pending.is_empty()
                && let Some(reason) = self.client.outbox.take(&mut self.pending)
            {
                ending = Some(Ending::Requested(reason));
                break;
            }
            let want = self.decoder.wanted(self.inbox.len(), READ_CHUNK);
            if let Some(at) = self.resume_at.take() {
                throttle.as_mut().reset(at);
            }
            tokio::select! {
                () = self.client.outbox.notified() => {
                    ending = self.client.outbox.close_reason().map(Ending::Requested);
                }
                written = poll_fn(|cx| poll_write(&mut self.writer, &mut self.pending, &mut self.written, cx)),
                    if !self.pending.is_empty() =>
                {
                    if written.is_err() {
                        ending = Some(Ending::Lost("write failed"));
                    }
                }
                read = self.reader.read_into(&mut self.inbox, want), if self.held.is_none() => {
                    ending = match read {
                        Ok(0) => Some(Ending::Lost("connection dropped without a close frame")),
                        Ok(_) => {
                            self.last_heard = Instant::now();
                            self.process_inbox()
                        }
                        Err(_) => Some(Ending::Lost("read failed")),
                    };
                }
                () = &mut throttle, if self.held.is_some() => {
                    // The client was heard from: it sent what waited.
                    self.last_heard = Instant::now();
                    ending = self
                        .held
                        .take()
                        .and_then(|message| self.admit(message))
                        .or_else(|| self.process_inbox());
                }
                () = &mut aged, if max_age.is_some() => {
                    max_age = None;
                    if self.channel.disconnect(self.client.id(), CloseReason::MaxAge) {
                        self.relay.metrics().client_closed(reason_label(CloseReason::MaxAge));
                    }
                }
                () = &mut ping => {
                    let now = Instant::now();
                    // A throttled connection is not read, so its pong may wait.
                    if self.held.is_none() && self.ping_sent.is_some_and(|sent| self.last_heard < sent) {
                        ending = Some(Ending::Lost("no pong within the ping interval"));
                    } else {
                        self.shrink_if_idle();
                        self.pending.push_back(codec::encode(OpCode::Ping, b""));
                        self.ping_sent = Some(now);
                        ping.as_mut().reset(now + interval);
                    }
                }
            }
        }
        let ending = ending.unwrap_or(Ending::Lost("unreachable"));
        self.finish(&ending).await;
        ending
    }

    /// Gives back what a burst left in both queues (they swap buffers, so
    /// both grew) if nothing waits in either. Called once per ping
    /// interval, so a busy connection never reallocates for it.
    fn shrink_if_idle(&mut self) {
        if self.pending.is_empty() && self.client.outbox.shrink_if_empty() {
            self.pending.shrink_to(IDLE_QUEUE_SLOTS);
        }
    }

    /// Decodes and handles every complete frame received so far.
    fn process_inbox(&mut self) -> Option<Ending> {
        let ending = loop {
            if self.held.is_some() {
                break None;
            }
            let message = match self.decoder.decode(&mut self.inbox) {
                Ok(None) => break None,
                Ok(Some(Event::Text(payload))) => Message::Text(payload),
                Ok(Some(Event::Binary(payload))) => Message::Binary(payload),
                Ok(Some(Event::Ping(payload))) => {
                    self.relay.offer(
                        self.channel,
                        self.client,
                        codec::encode(OpCode::Pong, &payload),
                    );
                    continue;
                }
                Ok(Some(Event::Pong)) => continue,
                Ok(Some(Event::Close(code))) => break Some(Ending::PeerClosed(code)),
                Err(error) => break Some(Ending::Violation(error)),
            };
            if let Some(ending) = self.admit(message) {
                break Some(ending);
            }
        };
        if self.inbox.is_empty() {
            // Give the buffer back while the client is quiet; payloads that
            // were split off keep their own reference to it.
            self.inbox = BytesMut::new();
        }
        ending
    }

    /// Relays a message within the client's rate: over it, holds the
    /// message until the bucket refills (throttle) or ends the connection
    /// with 1008 (close).
    fn admit(&mut self, message: Message) -> Option<Ending> {
        let Some(bucket) = self.limiter.as_mut() else {
            self.relay_message(message);
            return None;
        };
        let now = Instant::now();
        if bucket.try_take(now) {
            self.relay_message(message);
            return None;
        }
        match self.relay.settings().client_rate_policy {
            ClientRatePolicy::Throttle => {
                self.resume_at = Some(now + bucket.wait(now));
                self.held = Some(message);
                None
            }
            ClientRatePolicy::Close => {
                let reason = CloseReason::RateLimited;
                self.relay.metrics().client_closed(reason_label(reason));
                Some(Ending::Requested(reason))
            }
        }
    }

    fn relay_message(&mut self, message: Message) {
        if let Err(error) = self.relay.dispatch(self.channel, self.client.id(), message) {
            self.relay.offer(
                self.channel,
                self.client,
                codec::encode(OpCode::Text, error.to_json().as_bytes()),
            );
        }
    }

    /// Sends the close frame (if the socket can still carry one) and waits,
    /// bounded, for the closing handshake.
    async fn finish(&mut self, ending: &Ending) {
        let (code, reason): (u16, String) = match ending {
            Ending::Requested(reason) => {
                if reason.delivers_queued() {
                    self.client.outbox.take(&mut self.pending);
                } else {
                    // Keep only a frame already partly on the wire.
                    self.pending.truncate(usize::from(self.written > 0));
                }
                (reason.code(), reason.text().to_owned())
            }
            Ending::Violation(error) => {
                // What was relayed to it before the violation (an echo of
                // its last valid message) still goes first.
                self.client.outbox.take(&mut self.pending);
                (error.close_code(), error.to_string())
            }
            Ending::PeerClosed(code) => {
                // Answer at once (RFC 6455 §5.5.1): only a frame already
                // partly written goes first.
                self.pending.truncate(usize::from(self.written > 0));
                (code.unwrap_or(close_code::NORMAL), String::new())
            }
            Ending::Lost(_) => return,
        };
        self.pending.push_back(codec::encode_close(code, &reason));
        let await_reply = !matches!(ending, Ending::PeerClosed(_));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.close_handshake(await_reply)).await;
    }

    async fn close_handshake(&mut self, await_reply: bool) -> io::Result<()> {
        while !self.pending.is_empty() {
            poll_fn(|cx| poll_write(&mut self.writer, &mut self.pending, &mut self.written, cx))
                .await?;
        }
        // Nothing follows a close frame: send FIN so the client sees the end.
        self.writer.shutdown().await?;
        if !await_reply {
            return Ok(());
        }
        // Read until the client answers with its close frame, discarding
        // anything else (including the rest of an oversized message).
        loop {
            let want = self.decoder.wanted(self.inbox.len(), READ_CHUNK);
            if self.reader.read_into(&mut self.inbox, want).await? == 0 {
                return Ok(());
            }
            loop {
                match self.decoder.decode(&mut self.inbox) {
                    Ok(Some(Event::Close(_))) | Err(_) => return Ok(()),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
        }
    }
}

/// Writes as much of `pending` as the socket takes in one vectored write.
fn poll_write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    pending: &mut VecDeque<Bytes>,
    written: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let mut count = 0;
    for (slot, frame) in slices.iter_mut().zip(pending.iter()) {
        let start = if count == 0 { *written } else { 0 };
        *slot = IoSlice::new(&frame[start..]);
        count += 1;
    }
    let mut n = ready!(Pin::new(writer).poll_write_vectored(cx, &slices[..count]))?;
    if n == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    while let Some(front) = pending.front_mut() {
        let left = front.len() - *written;
        if n < left {
            *written += n;
            break;
        }
        n -= left;
        *written = 0;
        pending.pop_front();
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::channel::ChannelSpec;
    use crate::relay::pattern::Pattern;

    const OP_TEXT: u8 = 0x1;
    const OP_PING: u8 = 0x9;

    /// Reads one small unmasked server frame: (opcode, payload).
    async fn read_frame(stream: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(60), async {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.unwrap();
            assert!(head[1] < 126, "a small unmasked frame");
            let mut payload = vec![0; usize::from(head[1])];
            stream.read_exact(&mut payload).await.unwrap();
            (head[0] & 0x0F, payload)
        })
        .await
        .expect("a frame within the time limit")
    }

    #[tokio::test]
    async fn poll_write_advances_through_partial_writes() {
        // A duplex pipe with a tiny buffer forces partial writes.
        let (mut near, mut far) = tokio::io::duplex(5);
        let mut pending: VecDeque<Bytes> =
            ["abc", "defg", "h"].into_iter().map(Bytes::from).collect();
        let mut written = 0;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            got
        });
        while !pending.is_empty() {
            poll_fn(|cx| poll_write(&mut near, &mut pending, &mut written, cx))
                .await
                .unwrap();
        }
        near.shutdown().await.unwrap();
        drop(near);
        assert_eq!(reader.await.unwrap(), b"abcdefgh");
        assert_eq!(written, 0);
    }

    /// A burst grows both the connection's queue and the outbox's (they
    /// trade buffers); the first ping tick that finds them empty shrinks
    /// both back.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_gives_back_what_a_burst_grew() {
        const BURST: usize = 1_000;
        let mut config = crate::Config::for_tests();
        config.ping_interval_ms = 1_000;
        let relay = Relay::standalone(config.relay_settings());
        let spec = ChannelSpec {
            pattern: Pattern::PubSub,
            client_limit: None,
            timeout: None,
            welcome: false,
            history: None,
        };
        let (channel, _token) = relay.create_channel(spec).await.unwrap();
        let member = relay
            .reserve(&channel, crate::relay::client::Wire::PLAIN)
            .await
            .unwrap()
            .admit()
            .unwrap();
        let client = member.client();
        let frame = codec::encode(OpCode::Text, b"0123456789");
        // A small pipe: the connection blocks writing long before the
        // burst is out.
        let (near, mut far) = tokio::io::duplex(1024);
        let (reader, writer) = tokio::io::split(near);
        for _ in 0..BURST {
            client.outbox.push(frame.clone()).unwrap();
        }
        let connection =
            Connection::new(reader, writer, Bytes::new(), &relay, &channel, client).run();
        tokio::pin!(connection);
        let script = async {
            // The connection took the first burst and is blocked writing
            // it; a second one waits in the outbox meanwhile.
            tokio::task::yield_now().await;
            for _ in 0..BURST {
                client.outbox.push(frame.clone()).unwrap();
            }
            for _ in 0..2 * BURST {
                assert_eq!(
                    read_frame(&mut far).await,
                    (OP_TEXT, b"0123456789".to_vec())
                );
            }
            tokio::task::yield_now().await;
            assert!(
                client.outbox.capacity() >= BURST,
                "the burst grew the queues"
            );
            // Quiet: the paused clock runs on to the ping tick.
            assert_eq!(read_frame(&mut far).await.0, OP_PING);
            tokio::task::yield_now().await;
            let capacity = client.outbox.capacity();
            assert!(capacity <= IDLE_QUEUE_SLOTS, "one queue: {capacity}");
            // The queues trade places on every pass of the loop: a pong
            // makes one pass and brings the other one here.
            far.write_all(&[0x8A, 0x80, 0, 0, 0, 0]).await.unwrap();
            tokio::task::yield_now().await;
            let capacity = client.outbox.capacity();
            assert!(capacity <= IDLE_QUEUE_SLOTS, "the other queue: {capacity}");
        };
        tokio::select! {
            biased;
            ending = &mut connection => panic!("the connection ended: {ending}"),
            () = script => {}
        }
    }
}
