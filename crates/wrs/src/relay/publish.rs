//! The HTTP side of a channel in the relay (SPEC §10): a message
//! published from outside the channel, an HTTP call into a `req-repl` or
//! `fan-in-out` channel and the replies that answer it, and reading a
//! channel's history, wherever it is kept.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::channel::Channel;
use super::coordinator::CoordinatorError;
use super::deliver::{Prepared, Source};
use super::history::Slice;
use super::ids::ClientId;
use super::pattern::Intent;
use super::subprotocol::FrameError;
use super::{Delivered, Message, Relay};

impl Relay {
    /// Relays a message published over HTTP (SPEC §10) by the channel's
    /// pattern, to every client as "the others"; returns whom it reached.
    ///
    /// # Errors
    ///
    /// [`PublishError`]: a sub-protocol frame that cannot be relayed, or
    /// the cluster's history cannot be written.
    pub async fn publish(
        &self,
        channel: &Arc<Channel>,
        message: &Message,
    ) -> Result<Delivered, PublishError> {
        let source = Source::Outside(ClientId::call());
        let shared = self.coordinator.shared_history();
        let (Some(shared), Some(_)) = (shared, channel.history()) else {
            return self
                .relay(channel, source, message)
                .map_err(PublishError::Invalid);
        };
        // Kept in the cluster's history first: the answer carries the offset.
        let prepared = self
            .take_in(channel, source, message)
            .map_err(PublishError::Invalid)?;
        let delivered = shared
            .publish(channel, source, &prepared)
            .await
            .map_err(PublishError::Unavailable)?;
        self.relayed(channel, &delivered);
        Ok(delivered)
    }

    /// The kept messages of a channel with history after `after`, oldest
    /// first, at most `limit`; `None` for a channel without history.
    ///
    /// # Errors
    ///
    /// [`CoordinatorError`] when the cluster's history cannot be read.
    pub async fn read_history(
        &self,
        channel: &Channel,
        after: u64,
        limit: usize,
    ) -> Result<Option<Slice>, CoordinatorError> {
        let Some(history) = channel.history() else {
            return Ok(None);
        };
        match self.coordinator.shared_history() {
            Some(shared) => shared.read(channel, after, limit).await.map(Some),
            None => Ok(Some(history.lock().after(
                self.clock.now_ms(),
                after,
                limit,
            ))),
        }
    }

    /// Sends `request` (a sub-protocol request) into a `req-repl` or
    /// `fan-in-out` channel as a client's request would go, from a one-off
    /// origin, and waits up to `wait` for the first reply to it.
    ///
    /// # Errors
    ///
    /// [`CallError`]: not a request, nobody to ask, no reply in time, or
    /// the cluster cannot carry the reply.
    pub async fn call(
        self: &Arc<Self>,
        channel: &Arc<Channel>,
        request: Bytes,
        wait: Duration,
    ) -> Result<Bytes, CallError> {
        let origin = ClientId::call();
        let source = Source::Outside(origin);
        let prepared = self
            .take_in(channel, source, &Message::Text(request))
            .map_err(CallError::Invalid)?;
        if prepared.intent != Intent::Request {
            self.metrics.frame_error(channel.pattern());
            return Err(CallError::NotARequest);
        }
        let (answer, reply) = tokio::sync::oneshot::channel();
        self.calls.insert(origin, answer);
        // Whatever ends the call (reply, timeout, the caller going away)
        // forgets the origin: later replies get the usual error frame.
        let _open = OpenCall {
            relay: self,
            origin,
        };
        self.coordinator
            .open_call(origin)
            .await
            .map_err(CallError::Unavailable)?;
        let delivered = self
            .relay_prepared(channel, source, prepared)
            .map_err(CallError::Invalid)?;
        if delivered.addressed == 0 {
            return Err(CallError::NoReceiver);
        }
        match tokio::time::timeout(wait, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err(CallError::NoReply),
        }
    }

    /// A reply to an HTTP call's origin: to the call if it waits on this
    /// node, else wherever the coordinator finds it.
    pub(super) fn answer(
        &self,
        channel: &Channel,
        sender: ClientId,
        origin: ClientId,
        prepared: &Prepared,
    ) -> Result<Delivered, FrameError> {
        if self.answer_call(origin, prepared.payload.clone()) {
            return Ok(prepared.delivered_to(origin, false));
        }
        self.coordinator
            .answer_elsewhere(channel, sender, origin, prepared.payload.clone())
            .map(|()| prepared.delivered_to(origin, false))
    }

    /// Hands a reply to the call waiting on this node for `origin`;
    /// false if none waits (any more).
    pub(crate) fn answer_call(&self, origin: ClientId, reply: Bytes) -> bool {
        self.calls
            .remove(&origin)
            .is_some_and(|(_, answer)| answer.send(reply).is_ok())
    }
}

/// An HTTP call's origin while the call waits; dropping it forgets it.
struct OpenCall<'a> {
    relay: &'a Relay,
    origin: ClientId,
}

impl Drop for OpenCall<'_> {
    fn drop(&mut self) {
        self.relay.calls.remove(&self.origin);
        self.relay.coordinator.close_call(self.origin);
    }
}

/// Why a message published over HTTP was not relayed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(FrameError),
    #[error(transparent)]
    Unavailable(CoordinatorError),
}

/// Why an HTTP call into a `req-repl` or `fan-in-out` channel failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Invalid(FrameError),
    #[error(r#"the body must be a request ({{"type":"request",...}}), not a reply"#)]
    NotARequest,
    #[error("no client is connected to receive the request")]
    NoReceiver,
    #[error("no reply arrived in time")]
    NoReply,
    #[error(transparent)]
    Unavailable(CoordinatorError),
}
