//! The cluster backplane: the same pure routing, over the cluster-wide
//! roster. Receivers on this node get outbox pushes; a broadcast costs one
//! NATS message for all interested nodes; a message for one client on
//! another node goes to that node's subject. Publishing never waits: it
//! queues into a bounded buffer ([`crate::cluster::Cluster::publish`]).

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;

use super::Backplane;
use super::local::{Prepared, deliver_locally, prepare};
use crate::cluster::{Cluster, Outgoing};
use crate::metrics::Metrics;
use crate::relay::channel::Channel;
use crate::relay::ids::{ChannelId, ClientId};
use crate::relay::pattern::{self, Intent, Receivers, Roster, RouteError};
use crate::relay::subprotocol::FrameError;
use crate::relay::{Delivered, Message, Relay, SlowConsumerPolicy, offer};
use crate::ws::codec::{self, OpCode};

const CHANNEL: &str = "Wrs-Channel";
const SENDER: &str = "Wrs-Sender";
const KIND: &str = "Wrs-Kind";
const TARGET: &str = "Wrs-Target";
const MODE: &str = "Wrs-Mode";

/// How a message for one client is handled if that client is gone.
const MODE_PICK: &str = "pick";
const MODE_EXACT: &str = "exact";

#[derive(Debug)]
pub struct NatsBackplane {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    policy: SlowConsumerPolicy,
}

impl NatsBackplane {
    pub fn new(cluster: Arc<Cluster>, metrics: Arc<Metrics>, policy: SlowConsumerPolicy) -> Self {
        Self {
            cluster,
            metrics,
            policy,
        }
    }

    fn headers(channel: &ChannelId, sender: ClientId, opcode: OpCode) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CHANNEL, channel.as_str());
        headers.insert(SENDER, sender.to_string().as_str());
        headers.insert(
            KIND,
            if opcode == OpCode::Binary {
                "binary"
            } else {
                "text"
            },
        );
        headers
    }
}

impl Backplane for NatsBackplane {
    fn relay(
        &self,
        channel: &Channel,
        sender: ClientId,
        message: Message,
    ) -> Result<Delivered, FrameError> {
        let pattern = channel.pattern();
        let prepared = prepare(pattern, sender, &message)?;
        let me = self.cluster.node();
        let Some(members) = self.cluster.members(channel.id()) else {
            return deliver_locally(&self.metrics, self.policy, channel, sender, &prepared);
        };
        let roster = &*members.roster;
        let Some(sender_at) = roster.position(sender) else {
            // Not in the shared roster yet (or any more): this node's view.
            return deliver_locally(&self.metrics, self.policy, channel, sender, &prepared);
        };
        let local = channel.members();
        let frame = prepared.frame();
        let push = |id: ClientId| {
            local.client(id).is_some_and(|client| {
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
            bytes: frames * prepared.payload.len() as u64,
        };
        let mut attempts = roster.len();
        loop {
            let receivers =
                pattern::route(pattern, roster, sender_at, prepared.intent, channel.turns())
                    .map_err(|RouteError::UnknownOrigin(origin)| {
                        FrameError::UnknownOrigin(origin.to_string())
                    })?;
            match receivers {
                Receivers::Nobody => return Ok(Delivered::default()),
                Receivers::Sender => return Ok(count(u64::from(push(sender)))),
                Receivers::AllButSender => {
                    let frames = local
                        .iter()
                        .filter(|client| {
                            client.id() != sender
                                && offer(
                                    &self.metrics,
                                    self.policy,
                                    channel.id(),
                                    client,
                                    frame.clone(),
                                )
                        })
                        .count();
                    if members.doc.has_others(me) {
                        self.cluster.publish(Outgoing {
                            subject: self.cluster.all_subject(channel.id()),
                            headers: Self::headers(channel.id(), sender, prepared.opcode),
                            payload: prepared.payload.clone(),
                        });
                    }
                    // Remote nodes count their own deliveries.
                    return Ok(count(frames as u64));
                }
                Receivers::One(position) => {
                    let Some((target, node)) = roster.entry(position) else {
                        return Ok(Delivered::default());
                    };
                    let exact = matches!(prepared.intent, Intent::Reply { .. });
                    if node != me {
                        let mut headers = Self::headers(channel.id(), sender, prepared.opcode);
                        headers.insert(TARGET, target.to_string().as_str());
                        headers.insert(MODE, if exact { MODE_EXACT } else { MODE_PICK });
                        self.cluster.publish(Outgoing {
                            subject: self.cluster.node_subject(node),
                            headers,
                            payload: prepared.payload.clone(),
                        });
                        return Ok(Delivered::default());
                    }
                    if push(target) {
                        return Ok(count(1));
                    }
                    attempts -= 1;
                    if attempts == 0 || exact {
                        return Ok(Delivered::default());
                    }
                }
            }
        }
    }
}

/// Delivers a message that arrived from another node to this node's
/// clients of its channel: to the named target (or, for a round-robin pick
/// whose target is gone, the next local client in turn), or to all.
pub fn deliver_inbound(relay: &Relay, message: &async_nats::Message) {
    let Some(headers) = message.headers.as_ref() else {
        return;
    };
    let header = |name: &str| headers.get(name).map(|v| v.as_str());
    let Some(channel) = header(CHANNEL)
        .and_then(ChannelId::parse)
        .and_then(|id| relay.channel(&id))
    else {
        return;
    };
    let opcode = if header(KIND) == Some("binary") {
        OpCode::Binary
    } else {
        OpCode::Text
    };
    let sender = header(SENDER).and_then(ClientId::parse);
    let prepared = Prepared {
        intent: Intent::Plain,
        opcode,
        payload: message.payload.clone(),
    };
    let frame: Bytes = codec::encode(opcode, &message.payload);
    let metrics = relay.metrics();
    let policy = relay.settings().slow_consumer;
    let local = channel.members();
    let offer_to = |client: &std::sync::Arc<crate::relay::client::Client>| {
        offer(metrics, policy, channel.id(), client, frame.clone())
    };
    let delivered = match header(TARGET).and_then(ClientId::parse) {
        Some(target) => {
            let direct = local.client(target).is_some_and(&offer_to);
            if direct {
                1
            } else if header(MODE) == Some(MODE_PICK) {
                // The pick left meanwhile: the next local client in turn.
                let n = local.len();
                (0..n)
                    .map(|_| (channel.next_turn() % n as u64) as usize)
                    .filter_map(|i| local.client_at(i))
                    .find(|client| Some(client.id()) != sender && offer_to(client))
                    .map_or(0, |_| 1)
            } else {
                0
            }
        }
        None => local
            .iter()
            .filter(|client| Some(client.id()) != sender && offer_to(client))
            .count() as u64,
    };
    drop(local);
    channel.touch();
    metrics.delivered(
        channel.pattern(),
        delivered,
        delivered * prepared.payload.len() as u64,
    );
}
