//! A connected client as the relay sees it: its id and its outbox.
//!
//! The outbox is the only way anything reaches a client. Senders never
//! wait on it: [`Outbox::push`] either queues a frame or reports that the
//! outbox is full or closed, and the caller applies the slow-consumer
//! policy. The client's connection task drains the whole outbox at once and
//! writes it with one vectored write.
//!
//! The outbox and the connection swap queue buffers, so under load neither
//! reallocates; a burst leaves both at their peak capacity (32 bytes a
//! slot) until the connection gives it back at a quiet moment
//! ([`Outbox::shrink_if_empty`]).

use std::collections::VecDeque;
use std::time::SystemTime;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::ids::ClientId;
use crate::ws::deflate::Deflate;

/// Slots an empty queue keeps when it is shrunk after a burst: enough for
/// the pings and odd frames of a quiet client, so shrinking never
/// reallocates for one that has not had a burst.
pub(crate) const IDLE_QUEUE_SLOTS: usize = 8;

/// Bounds of one client's outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most frames waiting at once.
    pub frames: usize,
    /// Most bytes (encoded frames) waiting at once.
    pub bytes: usize,
}

/// Why the service closes a client from outside its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The channel was deleted (`DELETE /channels/{id}` or `/reset`).
    ChannelDeleted,
    /// The channel's inactivity timeout ran out.
    ChannelTimedOut,
    /// The server is shutting down and the drain window is over.
    ServerShutdown,
    /// The node drains (shutdown or evacuation): reconnect elsewhere.
    Draining,
    /// The node holds more than its share: reconnect elsewhere.
    Rebalancing,
    /// The connection reached `WRS_MAX_CONNECTION_AGE_MS`.
    MaxAge,
    /// The client did not read fast enough and its outbox overflowed.
    SlowConsumer,
    /// The client sent faster than `WRS_CLIENT_RATE` (close policy).
    RateLimited,
}

impl CloseReason {
    /// The WebSocket close code (SPEC §5).
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ChannelDeleted => 4001,
            CloseReason::ChannelTimedOut => 4002,
            CloseReason::ServerShutdown => 1001,
            CloseReason::Draining | CloseReason::Rebalancing | CloseReason::MaxAge => 1012,
            CloseReason::SlowConsumer | CloseReason::RateLimited => 1008,
        }
    }

    /// The close frame's reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::ChannelDeleted => "channel deleted",
            CloseReason::ChannelTimedOut => "channel timed out",
            CloseReason::ServerShutdown => "server shutting down",
            CloseReason::Draining => "draining",
            CloseReason::Rebalancing => "rebalancing",
            CloseReason::MaxAge => "max connection age",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::RateLimited => "rate limit exceeded",
        }
    }

    /// Whether frames already queued are still delivered before the close
    /// frame. A slow consumer's backlog is dropped instead.
    pub fn delivers_queued(self) -> bool {
        self != CloseReason::SlowConsumer
    }
}

/// Why a frame was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The outbox is at its frame or byte limit.
    Full,
    /// The client is closing; nothing more is queued for it.
    Closed,
}

/// A bounded multi-producer, single-consumer queue of encoded frames plus
/// a close request. It allocates nothing until the first frame arrives.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Woken when the outbox turns non-empty and on a close request.
    wake: Notify,
    limits: QueueLimits,
}

#[derive(Debug, Default)]
struct OutboxState {
    frames: VecDeque<Bytes>,
    bytes: usize,
    close: Option<CloseReason>,
}

impl Outbox {
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            state: Mutex::new(OutboxState::default()),
            wake: Notify::new(),
            limits,
        }
    }

    /// Queues a frame without waiting.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] at the limit, [`PushError::Closed`] once a close
    /// was requested.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Err(PushError::Closed);
        }
        if state.frames.len() >= self.limits.frames || state.bytes + frame.len() > self.limits.bytes
        {
            return Err(PushError::Full);
        }
        let was_empty = state.frames.is_empty();
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        // The consumer looks at the outbox whenever it has written what it
        // took, so only the first frame of a batch needs to wake it.
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Asks the connection to close. The first request wins; returns
    /// whether this call was it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(reason);
        if !reason.delivers_queued() {
            state.frames = VecDeque::new();
            state.bytes = 0;
        }
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Moves every queued frame to the back of `dst` and returns the close
    /// request, if there is one.
    pub fn take(&self, dst: &mut VecDeque<Bytes>) -> Option<CloseReason> {
        let mut state = self.state.lock();
        if dst.is_empty() {
            // Swap buffers so neither side reallocates in steady state.
            std::mem::swap(dst, &mut state.frames);
        } else {
            dst.append(&mut state.frames);
        }
        state.bytes = 0;
        state.close
    }

    /// If nothing is queued, shrinks the queue's buffer to at most
    /// [`IDLE_QUEUE_SLOTS`] and returns `true`; a `VecDeque` keeps its
    /// peak capacity otherwise. Meant for quiet moments: it may reallocate.
    pub(crate) fn shrink_if_empty(&self) -> bool {
        let mut state = self.state.lock();
        if !state.frames.is_empty() {
            return false;
        }
        state.frames.shrink_to(IDLE_QUEUE_SLOTS);
        true
    }

    /// The close request, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state.lock().close
    }

    /// Completes when a frame arrives in an empty outbox or a close is
    /// requested (or such a wake-up happened since the last call).
    pub fn notified(&self) -> Notified<'_> {
        self.wake.notified()
    }

    /// How many frames the queue's buffer holds without reallocating.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.state.lock().frames.capacity()
    }
}

/// How a client is connected, which decides how its frames are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// A WebSocket, with permessage-deflate if it negotiated it.
    WebSocket { deflate: Option<Deflate> },
    /// A Server-Sent Events stream (receive-only).
    Sse,
}

impl Wire {
    /// A WebSocket without compression.
    pub const PLAIN: Wire = Wire::WebSocket { deflate: None };

    pub fn transport(self) -> Transport {
        match self {
            Wire::WebSocket { .. } => Transport::WebSocket,
            Wire::Sse => Transport::Sse,
        }
    }
}

/// How a client is connected, as the roster lists it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    #[serde(rename = "websocket")]
    WebSocket,
    Sse,
}

/// One connected client.
#[derive(Debug)]
pub struct Client {
    id: ClientId,
    connected_at: SystemTime,
    wire: Wire,
    pub outbox: Outbox,
}

impl Client {
    pub fn new(id: ClientId, limits: QueueLimits, wire: Wire) -> Self {
        Self {
            id,
            connected_at: SystemTime::now(),
            wire,
            outbox: Outbox::new(limits),
        }
    }

    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// permessage-deflate, if the client negotiated it.
    pub fn deflate(&self) -> Option<Deflate> {
        match self.wire {
            Wire::WebSocket { deflate } => deflate,
            Wire::Sse => None,
        }
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn connected_at(&self) -> SystemTime {
        self.connected_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outbox(frames: usize, bytes: usize) -> Outbox {
        Outbox::new(QueueLimits { frames, bytes })
    }

    #[test]
    fn bounds_by_frame_count() {
        let o = outbox(2, 1000);
        assert_eq!(o.push(Bytes::from_static(b"a")), Ok(()));
        assert_eq!(o.push(Bytes::from_static(b"b")), Ok(()));
        assert_eq!(o.push(Bytes::from_static(b"c")), Err(PushError::Full));
        let mut taken = VecDeque::new();
        assert_eq!(o.take(&mut taken), None);
        assert_eq!(taken, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert_eq!(o.push(Bytes::from_static(b"c")), Ok(()));
    }

    #[test]
    fn bounds_by_bytes() {
        let o = outbox(100, 10);
        assert_eq!(o.push(Bytes::from(vec![0; 6])), Ok(()));
        assert_eq!(o.push(Bytes::from(vec![0; 5])), Err(PushError::Full));
        assert_eq!(o.push(Bytes::from(vec![0; 4])), Ok(()));
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        assert_eq!(o.push(Bytes::from(vec![0; 10])), Ok(()));
    }

    #[test]
    fn take_appends_behind_frames_already_held() {
        let o = outbox(10, 100);
        o.push(Bytes::from_static(b"2")).unwrap();
        let mut held = VecDeque::from([Bytes::from_static(b"1")]);
        o.take(&mut held);
        assert_eq!(held, [Bytes::from_static(b"1"), Bytes::from_static(b"2")]);
    }

    #[test]
    fn graceful_close_keeps_the_queue_and_refuses_more() {
        let o = outbox(10, 100);
        o.push(Bytes::from_static(b"x")).unwrap();
        assert!(o.close(CloseReason::ChannelDeleted));
        assert!(!o.close(CloseReason::ServerShutdown), "first close wins");
        assert_eq!(o.push(Bytes::from_static(b"y")), Err(PushError::Closed));
        let mut taken = VecDeque::new();
        assert_eq!(o.take(&mut taken), Some(CloseReason::ChannelDeleted));
        assert_eq!(taken, [Bytes::from_static(b"x")]);
    }

    #[test]
    fn slow_consumer_close_drops_the_backlog() {
        let o = outbox(10, 100);
        o.push(Bytes::from_static(b"x")).unwrap();
        assert!(o.close(CloseReason::SlowConsumer));
        let mut taken = VecDeque::new();
        assert_eq!(o.take(&mut taken), Some(CloseReason::SlowConsumer));
        assert!(taken.is_empty());
    }

    #[test]
    fn shrinking_gives_back_what_a_burst_left() {
        let o = outbox(10_000, 1_000_000);
        for _ in 0..5_000 {
            o.push(Bytes::from_static(b"x")).unwrap();
        }
        assert!(!o.shrink_if_empty(), "frames are waiting");
        assert!(o.capacity() >= 5_000);
        // The consumer swaps in its own buffer, which an earlier burst grew.
        let mut pending = VecDeque::with_capacity(5_000);
        assert_eq!(o.take(&mut pending), None);
        assert_eq!(pending.len(), 5_000);
        assert!(o.capacity() >= 5_000, "the outbox now holds that buffer");
        assert!(o.shrink_if_empty());
        assert!(o.capacity() <= IDLE_QUEUE_SLOTS, "{}", o.capacity());
        // Nothing is lost on the way: the outbox works as before.
        o.push(Bytes::from_static(b"y")).unwrap();
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        assert_eq!(taken, [Bytes::from_static(b"y")]);
    }

    #[tokio::test]
    async fn wakes_the_consumer_on_first_frame_and_on_close() {
        let o = outbox(10, 100);
        // A wake-up before anyone waits is kept for the next wait.
        o.push(Bytes::from_static(b"x")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), o.notified())
            .await
            .unwrap();
        o.close(CloseReason::ServerShutdown);
        tokio::time::timeout(Duration::from_secs(5), o.notified())
            .await
            .unwrap();
        assert_eq!(o.close_reason(), Some(CloseReason::ServerShutdown));
    }

    #[test]
    fn close_codes_match_the_spec() {
        assert_eq!(CloseReason::ChannelDeleted.code(), 4001);
        assert_eq!(CloseReason::ChannelTimedOut.code(), 4002);
        assert_eq!(CloseReason::ServerShutdown.code(), 1001);
        assert_eq!(CloseReason::SlowConsumer.code(), 1008);
        assert_eq!(CloseReason::RateLimited.code(), 1008);
        for restart in [
            CloseReason::Draining,
            CloseReason::Rebalancing,
            CloseReason::MaxAge,
        ] {
            assert_eq!(restart.code(), 1012);
            assert!(restart.delivers_queued());
        }
    }
}
