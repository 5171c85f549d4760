//! The standalone backplane: every client of a channel lives in this
//! process, so relaying is routing plus pushing into outboxes. [`prepare`]
//! is shared with the cluster backplane.

use std::sync::Arc;

use bytes::Bytes;

use super::Backplane;
use crate::metrics::Metrics;
use crate::relay::channel::Channel;
use crate::relay::ids::ClientId;
use crate::relay::pattern::{self, Intent, Pattern, Receivers, Roster, RouteError};
use crate::relay::subprotocol::{self, Envelope, FrameError};
use crate::relay::{Delivered, Message, SlowConsumerPolicy, offer};
use crate::ws::codec::{self, OpCode};

#[derive(Debug)]
pub struct LocalBackplane {
    metrics: Arc<Metrics>,
    policy: SlowConsumerPolicy,
}

impl LocalBackplane {
    pub fn new(metrics: Arc<Metrics>, policy: SlowConsumerPolicy) -> Self {
        Self { metrics, policy }
    }
}

impl Backplane for LocalBackplane {
    fn relay(
        &self,
        channel: &Channel,
        sender: ClientId,
        message: Message,
    ) -> Result<Delivered, FrameError> {
        let prepared = prepare(channel.pattern(), sender, &message)?;
        deliver_locally(&self.metrics, self.policy, channel, sender, &prepared)
    }
}

/// Routes over this node's own clients and pushes into their outboxes.
///
/// # Errors
///
/// [`FrameError::UnknownOrigin`] for a reply to a client not connected.
pub fn deliver_locally(
    metrics: &Metrics,
    policy: SlowConsumerPolicy,
    channel: &Channel,
    sender: ClientId,
    prepared: &Prepared,
) -> Result<Delivered, FrameError> {
    let pattern = channel.pattern();
    // Encoded once before taking the roster lock, shared by every receiver.
    let frame = prepared.frame();
    let members = channel.members();
    let Some(sender_at) = members.position(sender) else {
        // The sender is closing and already left the roster.
        return Ok(Delivered::default());
    };
    let deliver = |position: usize| {
        members
            .client_at(position)
            .is_some_and(|client| offer(metrics, policy, channel.id(), client, frame.clone()))
    };
    let count = |frames: u64| Delivered {
        frames,
        bytes: frames * prepared.payload.len() as u64,
    };
    // A round-robin pick whose outbox is closing or full passes the
    // message on to the next client in turn, at most once per client.
    let mut attempts = members.len();
    loop {
        let receivers = pattern::route(
            pattern,
            &*members,
            sender_at,
            prepared.intent,
            channel.turns(),
        )
        .map_err(|RouteError::UnknownOrigin(origin)| {
            FrameError::UnknownOrigin(origin.to_string())
        })?;
        match receivers {
            Receivers::Nobody => return Ok(Delivered::default()),
            Receivers::Sender => return Ok(count(u64::from(deliver(sender_at)))),
            Receivers::AllButSender => {
                // In join order, without looking anyone up by position.
                let frames = members
                    .iter()
                    .filter(|client| {
                        client.id() != sender
                            && offer(metrics, policy, channel.id(), client, frame.clone())
                    })
                    .count();
                return Ok(count(frames as u64));
            }
            Receivers::One(position) => {
                if deliver(position) {
                    return Ok(count(1));
                }
                attempts -= 1;
                if attempts == 0 || matches!(prepared.intent, Intent::Reply { .. }) {
                    return Ok(Delivered::default());
                }
            }
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
}

impl Prepared {
    /// The WebSocket frame receivers get (encode once, share it).
    pub fn frame(&self) -> Bytes {
        codec::encode(self.opcode, &self.payload)
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
    })
}
