//! The standalone backplane: every client of a channel lives in this
//! process, so relaying is routing plus pushing into outboxes.

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
        let pattern = channel.pattern();
        // Parse and encode before taking the roster lock; the frame is
        // encoded once and shared by every receiver.
        let (intent, frame, payload_len) = prepare(pattern, sender, &message)?;
        let members = channel.members();
        let Some(sender_at) = members.position(sender) else {
            // The sender is closing and already left the roster.
            return Ok(Delivered::default());
        };
        let deliver = |position: usize| {
            members.client_at(position).is_some_and(|client| {
                offer(
                    &self.metrics,
                    self.policy,
                    channel.id(),
                    client,
                    frame.clone(),
                )
            })
        };
        let count = |frames: u64| Delivered {
            frames,
            bytes: frames * payload_len,
        };
        // A round-robin pick whose outbox is closing or full passes the
        // message on to the next client in turn, at most once per client.
        let mut attempts = members.len();
        loop {
            let receivers = pattern::route(pattern, &*members, sender_at, intent, channel.turns())
                .map_err(|RouteError::UnknownOrigin(origin)| {
                    FrameError::UnknownOrigin(origin.to_string())
                })?;
            match receivers {
                Receivers::Nobody => return Ok(Delivered::default()),
                Receivers::Sender => return Ok(count(u64::from(deliver(sender_at)))),
                Receivers::AllButSender => {
                    let frames = (0..members.len())
                        .filter(|&position| position != sender_at && deliver(position))
                        .count();
                    return Ok(count(frames as u64));
                }
                Receivers::One(position) => {
                    if deliver(position) {
                        return Ok(count(1));
                    }
                    attempts -= 1;
                    if attempts == 0 || matches!(intent, Intent::Reply { .. }) {
                        return Ok(Delivered::default());
                    }
                }
            }
        }
    }
}

/// Classifies a message for routing and encodes the frame receivers get:
/// unchanged for the plain patterns, stamped with `origin` for requests,
/// unchanged for replies.
fn prepare(
    pattern: Pattern,
    sender: ClientId,
    message: &Message,
) -> Result<(Intent, Bytes, u64), FrameError> {
    let encoded = |opcode, payload: &[u8]| (codec::encode(opcode, payload), payload.len() as u64);
    if !pattern.uses_subprotocol() {
        let (frame, len) = match message {
            Message::Text(payload) => encoded(OpCode::Text, payload),
            Message::Binary(payload) => encoded(OpCode::Binary, payload),
        };
        return Ok((Intent::Plain, frame, len));
    }
    let Message::Text(payload) = message else {
        return Err(FrameError::BinaryFrame);
    };
    // The codec validated text frames; this cannot fail for them.
    let text = std::str::from_utf8(payload).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    match subprotocol::parse(text)? {
        Envelope::Request(fields) => {
            let (frame, len) = encoded(OpCode::Text, &fields.with_origin(sender));
            Ok((Intent::Request, frame, len))
        }
        Envelope::Reply { origin } => {
            let (frame, len) = encoded(OpCode::Text, payload);
            Ok((Intent::Reply { origin }, frame, len))
        }
    }
}
