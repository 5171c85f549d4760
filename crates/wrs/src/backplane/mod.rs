//! How messages reach clients: the seam between the relay and transport.
//!
//! The relay hands every message to a [`Backplane`], which asks
//! [`crate::relay::pattern::route`] who receives it and puts the encoded
//! frame into those clients' outboxes. The in-process [`local`] backplane is
//! the standalone mode; a cluster backplane implements the same trait, so
//! patterns, connections and HTTP stay untouched when it plugs in.

pub mod local;
pub mod nats;

use std::fmt::Debug;

use crate::relay::channel::Channel;
use crate::relay::ids::ClientId;
use crate::relay::subprotocol::FrameError;
use crate::relay::{Delivered, Message};

/// Carries messages from a sender to the receivers its channel's pattern
/// picks. Implementations never wait on a receiver.
pub trait Backplane: Send + Sync + Debug + 'static {
    /// Relays `message` from `sender` on `channel`.
    ///
    /// # Errors
    ///
    /// A [`FrameError`] when a sub-protocol frame cannot be relayed (bad
    /// JSON, unknown origin, binary frame); nothing was delivered then.
    fn relay(
        &self,
        channel: &Channel,
        sender: ClientId,
        message: Message,
    ) -> Result<Delivered, FrameError>;
}
