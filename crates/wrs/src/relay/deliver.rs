//! Putting frames into this node's outboxes: the one place where a message
//! reaches a local client. A coordinator decides *who* receives a message
//! (over this node's roster, or over the cluster's); what it does for
//! receivers on this node goes through an [`Outlet`].

use std::cell::OnceCell;

use bytes::Bytes;

use super::channel::Channel;
use super::client::{Client, CloseReason, PushError, Wire};
use super::ids::ClientId;
use super::pattern::{self, Intent, Pattern, Receivers, Roster, RouteError};
use super::subprotocol::{self, Envelope, FrameError};
use super::{Delivered, Message, SlowConsumerPolicy};
use crate::metrics::Metrics;
use crate::sse;
use crate::ws::codec::{self, OpCode};
use crate::ws::deflate::{self, MAX_WINDOW_BITS};

/// Who sent a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A client of the channel.
    Client(ClientId),
    /// A publisher outside the channel (HTTP publish): "the others" are
    /// every client. Its id is a one-off no client has (for a call, the
    /// origin the reply must name).
    Outside(ClientId),
}

impl Source {
    pub fn id(self) -> ClientId {
        match self {
            Source::Client(id) | Source::Outside(id) => id,
        }
    }
}

/// A message classified for routing, with the payload its receivers get.
#[derive(Debug)]
pub struct Prepared {
    pub intent: Intent,
    pub opcode: OpCode,
    /// Unchanged for the plain patterns and replies, stamped with `origin`
    /// for requests.
    pub payload: Bytes,
    /// Its offset in the channel's history, if it keeps one.
    pub offset: Option<u64>,
}

impl Prepared {
    /// `frames` deliveries of this message, on this node, out of
    /// `addressed` clients it was routed to.
    pub fn delivered(&self, frames: u64, addressed: u64) -> Delivered {
        Delivered {
            frames,
            bytes: frames * self.payload.len() as u64,
            addressed,
            to: None,
            offset: self.offset,
        }
    }

    /// The delivery to the one client `to` (on this node if `here`).
    pub fn delivered_to(&self, to: ClientId, here: bool) -> Delivered {
        Delivered {
            to: Some(to),
            ..self.delivered(u64::from(here), 1)
        }
    }
}

/// Classifies a message for routing: plain for `echo`, `pub-sub` and
/// `push-pull`; a request (stamped with the sender as `origin`) or a reply
/// for the sub-protocol patterns.
///
/// # Errors
///
/// A [`FrameError`] for a sub-protocol frame that cannot be relayed.
pub fn prepare(
    pattern: Pattern,
    sender: ClientId,
    message: &Message,
) -> Result<Prepared, FrameError> {
    if !pattern.uses_subprotocol() {
        let (opcode, payload) = match message {
            Message::Text(payload) => (OpCode::Text, payload),
            Message::Binary(payload) => (OpCode::Binary, payload),
        };
        return Ok(Prepared {
            intent: Intent::Plain,
            opcode,
            payload: payload.clone(),
            offset: None,
        });
    }
    let Message::Text(payload) = message else {
        return Err(FrameError::BinaryFrame);
    };
    // The codec validated text frames; this cannot fail for them.
    let text = std::str::from_utf8(payload).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let (intent, payload) = match subprotocol::parse(text)? {
        Envelope::Request(fields) => (Intent::Request, Bytes::from(fields.with_origin(sender))),
        Envelope::Reply { origin } => (Intent::Reply { origin }, payload.clone()),
    };
    Ok(Prepared {
        intent,
        opcode: OpCode::Text,
        payload,
        offset: None,
    })
}

/// Who may take a message addressed to one client of this node whose
/// target is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// A round-robin pick: the next local client in turn takes it.
    NextInTurn,
    /// A reply: nobody else.
    Nobody,
}

/// A message that arrived from another node for this node's clients.
#[derive(Debug)]
pub struct Inbound {
    pub opcode: OpCode,
    pub payload: Bytes,
    /// The client that sent it (never delivered back to it).
    pub sender: Option<ClientId>,
    /// One client, or every local client but the sender.
    pub target: Option<(ClientId, Fallback)>,
    /// Its offset in the channel's history, if it keeps one.
    pub offset: Option<u64>,
}

/// One message as its receivers get it: encoded at most once plain, at
/// most once compressed (permessage-deflate, for the receivers that
/// negotiated it with the default window) and at most once as a
/// Server-Sent Event, the same bytes shared by all. A receiver that asked
/// for a smaller window gets its own compression.
#[derive(Debug)]
pub struct Frame<'a> {
    metrics: &'a Metrics,
    opcode: OpCode,
    payload: Bytes,
    /// Its offset in the channel's history (the SSE event's id).
    offset: Option<u64>,
    /// Large enough to be worth compressing (and compression is on).
    compressible: bool,
    plain: OnceCell<Bytes>,
    /// `None` inside: the compressor failed (the plain frame goes).
    deflated: OnceCell<Option<Bytes>>,
    sse: OnceCell<Bytes>,
}

impl<'a> Frame<'a> {
    pub fn new(
        metrics: &'a Metrics,
        opcode: OpCode,
        payload: Bytes,
        compress_from: Option<usize>,
    ) -> Frame<'a> {
        Frame {
            metrics,
            opcode,
            compressible: compress_from.is_some_and(|min| payload.len() >= min),
            payload,
            offset: None,
            plain: OnceCell::new(),
            deflated: OnceCell::new(),
            sse: OnceCell::new(),
        }
    }

    /// The frame bytes for `client`.
    pub fn for_client(&self, client: &Client) -> Bytes {
        if client.wire() == Wire::Sse {
            return self
                .sse
                .get_or_init(|| {
                    sse::message(self.offset, self.opcode == OpCode::Binary, &self.payload)
                })
                .clone();
        }
        let deflated = match client.deflate() {
            Some(deflate) if self.compressible => {
                if deflate.window_bits == MAX_WINDOW_BITS {
                    self.deflated
                        .get_or_init(|| self.compress(MAX_WINDOW_BITS))
                        .clone()
                } else {
                    self.compress(deflate.window_bits)
                }
            }
            _ => None,
        };
        deflated.unwrap_or_else(|| {
            self.plain
                .get_or_init(|| codec::encode(self.opcode, &self.payload))
                .clone()
        })
    }

    fn compress(&self, window_bits: u8) -> Option<Bytes> {
        self.metrics.compressions.inc();
        deflate::compress(&self.payload, window_bits)
            .map(|compressed| codec::encode_deflated(self.opcode, &compressed))
    }
}

/// Delivery into this node's outboxes, with the slow-consumer policy and
/// the counters. Cheap to make: three references' worth.
#[derive(Clone, Copy, Debug)]
pub struct Outlet<'a> {
    pub metrics: &'a Metrics,
    pub policy: SlowConsumerPolicy,
    /// Messages of at least this many bytes are compressed for the clients
    /// that negotiated permessage-deflate; `None`: compression is off.
    pub compress_from: Option<usize>,
}

impl Outlet<'_> {
    /// `payload` as a frame for this node's receivers.
    pub fn frame(&self, opcode: OpCode, payload: Bytes, offset: Option<u64>) -> Frame<'_> {
        Frame {
            offset,
            ..Frame::new(self.metrics, opcode, payload, self.compress_from)
        }
    }

    /// A prepared message as a frame for this node's receivers.
    pub fn frame_of(&self, prepared: &Prepared) -> Frame<'_> {
        self.frame(prepared.opcode, prepared.payload.clone(), prepared.offset)
    }

    /// Queues `frame` as `client` takes it (compressed or not).
    pub fn offer_frame(&self, channel: &Channel, client: &Client, frame: &Frame<'_>) -> bool {
        self.offer(channel, client, frame.for_client(client))
    }

    /// Queues `frame` for `client`; on a full outbox applies the
    /// slow-consumer policy. Returns whether the frame was queued.
    pub fn offer(&self, channel: &Channel, client: &Client, frame: Bytes) -> bool {
        match client.outbox.push(frame) {
            Ok(()) => true,
            Err(PushError::Closed) => false,
            Err(PushError::Full) => {
                self.metrics.dropped.inc();
                if self.policy == SlowConsumerPolicy::Close
                    && client.outbox.close(CloseReason::SlowConsumer)
                {
                    self.metrics.slow_consumer_closes.inc();
                    tracing::warn!(channel = %channel.id(), client = %client.id(), "outbox full: closing slow consumer with 1008");
                }
                false
            }
        }
    }

    /// Queues `frame` for every local client but `sender`; returns how many
    /// took it.
    pub fn offer_all_but(
        &self,
        channel: &Channel,
        sender: Option<ClientId>,
        frame: &Frame<'_>,
    ) -> u64 {
        channel
            .members()
            .iter()
            .filter(|client| {
                Some(client.id()) != sender && self.offer_frame(channel, client, frame)
            })
            .count() as u64
    }

    /// Queues `frame` for the local client `id`; false if it is not here
    /// (or not taking frames).
    pub fn offer_to(&self, channel: &Channel, id: ClientId, frame: &Frame<'_>) -> bool {
        channel
            .members()
            .client(id)
            .is_some_and(|client| self.offer_frame(channel, client, frame))
    }

    /// Routes over this node's own clients and pushes into their outboxes:
    /// all of standalone relaying, and a cluster node's fallback when the
    /// sender is not in the cluster roster.
    ///
    /// # Errors
    ///
    /// [`FrameError::UnknownOrigin`] for a reply to a client not connected.
    pub fn route_locally(
        &self,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, FrameError> {
        // Encoded once before taking the roster lock, shared by every receiver.
        let frame = self.frame_of(prepared);
        let members = channel.members();
        let sender = source.id();
        let sender_at = match source {
            Source::Client(id) => match members.position(id) {
                Some(at) => Some(at),
                // The sender is closing and already left the roster.
                None => return Ok(prepared.delivered(0, 0)),
            },
            Source::Outside(_) => None,
        };
        let deliver = |position: usize| {
            members
                .client_at(position)
                .is_some_and(|client| self.offer_frame(channel, client, &frame))
        };
        // A round-robin pick whose outbox is closing or full passes the
        // message on to the next client in turn, at most once per client.
        let mut attempts = members.len();
        loop {
            let receivers = pattern::route(
                channel.pattern(),
                &*members,
                sender_at,
                prepared.intent,
                channel.turns(),
            )
            .map_err(unknown_origin)?;
            match receivers {
                Receivers::Nobody => return Ok(prepared.delivered(0, 0)),
                Receivers::Sender => {
                    let here = sender_at.is_some_and(deliver);
                    return Ok(prepared.delivered_to(sender, here));
                }
                Receivers::AllButSender => {
                    // In join order, without looking anyone up by position.
                    let frames = members
                        .iter()
                        .filter(|client| {
                            client.id() != sender && self.offer_frame(channel, client, &frame)
                        })
                        .count();
                    let addressed = members.len() - usize::from(sender_at.is_some());
                    return Ok(prepared.delivered(frames as u64, addressed as u64));
                }
                Receivers::One(position) => {
                    if deliver(position) {
                        let to = members.client_at(position).map(|client| client.id());
                        return Ok(prepared.delivered_to(to.unwrap_or(sender), true));
                    }
                    attempts -= 1;
                    if attempts == 0 || matches!(prepared.intent, Intent::Reply { .. }) {
                        return Ok(prepared.delivered(0, 0));
                    }
                }
            }
        }
    }

    /// Delivers a message from another node to this node's clients of
    /// `channel`: to the named target (or, for a round-robin pick whose
    /// target left, the next local client in turn), or to all but the
    /// sender. Returns the deliveries made.
    pub fn deliver_inbound(&self, channel: &Channel, inbound: &Inbound) -> u64 {
        let frame = self.frame(inbound.opcode, inbound.payload.clone(), inbound.offset);
        match inbound.target {
            None => self.offer_all_but(channel, inbound.sender, &frame),
            Some((target, fallback)) => {
                let members = channel.members();
                if members
                    .client(target)
                    .is_some_and(|client| self.offer_frame(channel, client, &frame))
                {
                    return 1;
                }
                if fallback == Fallback::Nobody {
                    return 0;
                }
                let n = members.len();
                (0..n)
                    .map(|_| (channel.next_turn() % n as u64) as usize)
                    .filter_map(|i| members.client_at(i))
                    .find(|client| {
                        Some(client.id()) != inbound.sender
                            && self.offer_frame(channel, client, &frame)
                    })
                    .map_or(0, |_| 1)
            }
        }
    }
}

/// The frame error for a reply to a client that is not connected.
pub fn unknown_origin(RouteError::UnknownOrigin(origin): RouteError) -> FrameError {
    FrameError::UnknownOrigin(origin.to_string())
}
