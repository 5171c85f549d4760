//! A connection's place in a channel, from the moment its connect is
//! accepted until it is gone: two guards own everything that must be
//! undone when it ends, so no path can forget a part.
//!
//! - [`Reservation`]: a place held (here, and in the shared roster) while
//!   the upgrade is answered. Dropping it gives the place back.
//! - [`Member`]: a connected client. It holds the client in the channel's
//!   roster and in the `connections_open` gauge; dropping it removes the
//!   client here and everywhere and lowers the gauge.

use std::sync::Arc;

use tracing::debug;

use super::channel::Channel;
use super::client::{Client, CloseReason, Wire};
use super::ids::ClientId;
use super::overload::Slot;
use super::{ConnectError, Relay};
use crate::ws::codec::{self, OpCode};

/// A place held in a channel for a connection being upgraded.
#[derive(Debug)]
pub struct Reservation {
    relay: Arc<Relay>,
    channel: Arc<Channel>,
    /// The id the shared roster lists the client under, if it has one.
    id: Option<ClientId>,
    /// Whether the place is still held (not yet admitted).
    held: bool,
    /// The connection's share of the node's capacity (the member takes
    /// it over).
    slot: Option<Slot>,
    wire: Wire,
}

impl Reservation {
    /// Holds a place: here first (the local limit, and a local place keeps
    /// the channel's shared subscriptions while the coordinator waits),
    /// then in the shared roster.
    pub(super) async fn hold(
        relay: &Arc<Relay>,
        channel: &Arc<Channel>,
        wire: Wire,
    ) -> Result<Self, ConnectError> {
        let slot = relay
            .capacity()
            .take()
            .map_err(|refusal| relay.refused(refusal))?;
        channel.hold_place().map_err(ConnectError::from)?;
        let mut reservation = Self {
            relay: Arc::clone(relay),
            channel: Arc::clone(channel),
            id: None,
            held: true,
            slot: Some(slot),
            wire,
        };
        reservation.id = relay
            .coordinator()
            .join(channel, wire.transport())
            .await
            .map_err(|refusal| ConnectError::refused(channel, refusal))?;
        Ok(reservation)
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Makes the place a member, before the handshake is answered: once a
    /// client sees 101, messages sent to its channel reach it (they wait in
    /// its outbox until its connection task runs). The welcome frame, if
    /// the channel sends one, is queued first.
    ///
    /// # Errors
    ///
    /// Why the client cannot join: the channel closed since the place was
    /// held, or the node began draining (the client is removed again).
    pub fn admit(mut self) -> Result<Member, CloseReason> {
        self.held = false;
        let relay = Arc::clone(&self.relay);
        let channel = Arc::clone(&self.channel);
        let client = match channel.fill_place(self.id, relay.settings().queue, self.wire) {
            Ok(client) => client,
            Err(reason) => {
                self.give_back();
                return Err(reason);
            }
        };
        relay.metrics().connections_open.inc();
        let member = Member {
            relay,
            channel,
            client,
            _slot: self.slot.take(),
        };
        // The drain delay ended after the checks: the drain may have
        // picked its clients before this one joined.
        if member.relay.is_refusing() {
            return Err(CloseReason::ServerShutdown);
        }
        if member.channel.spec().welcome {
            let hello = hello(&member.channel, member.client.id());
            let frame = match member.client.wire() {
                Wire::WebSocket { .. } => codec::encode(OpCode::Text, hello.as_bytes()),
                Wire::Sse => crate::sse::hello(&hello),
            };
            member.relay.offer(&member.channel, &member.client, frame);
        }
        debug!(channel = %member.channel.id(), client = %member.client.id(), "client admitted");
        Ok(member)
    }

    fn give_back(&mut self) {
        self.relay.coordinator().left(&self.channel, self.id.take());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            self.channel.release_place();
            self.give_back();
        }
    }
}

/// A connected client of a channel on this node. Dropping it is the one
/// way a client leaves.
#[derive(Debug)]
pub struct Member {
    relay: Arc<Relay>,
    channel: Arc<Channel>,
    client: Arc<Client>,
    /// Given back after the client left (fields drop after `drop`).
    _slot: Option<Slot>,
}

impl Member {
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let id = self.client.id();
        self.channel.leave(id);
        self.relay.coordinator().left(&self.channel, Some(id));
        self.relay.metrics().connections_open.dec();
        debug!(channel = %self.channel.id(), client = %id, "client left");
    }
}

/// The optional welcome frame.
fn hello(channel: &Channel, client: ClientId) -> String {
    serde_json::json!({
        "type": "hello",
        "clientId": client,
        "channel": channel.id().as_str(),
        "pattern": channel.pattern(),
    })
    .to_string()
}
