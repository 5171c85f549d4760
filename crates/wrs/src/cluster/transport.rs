//! Messages between nodes, on core NATS subjects:
//!
//! - `<prefix>.ch.<channel>.all` — broadcasts (pub-sub, req-repl
//!   requests). A node subscribes while it has clients in the channel, so
//!   NATS carries one copy per interested node, never one per client.
//! - `<prefix>.node.<node>` — messages for one client on that node
//!   (round-robin picks and replies), headers naming the target.
//! - `<prefix>.call.<origin>` — replies to an HTTP call, sent as NATS
//!   requests: the node where the call waits subscribes while it waits and
//!   answers whether it took the reply, so a reply nobody takes gets its
//!   sender the usual error frame.
//!
//! Routing is the same pure [`pattern::route`] as standalone, over the
//! cluster roster. Publishing never waits: messages go through a bounded
//! queue to a publisher task; beyond it they are dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::NatsCoordinator;
use crate::relay::Delivered;
use crate::relay::channel::Channel;
use crate::relay::coordinator::{CoordinatorError, JoinRefusal};
use crate::relay::deliver::{Fallback, Inbound, Outlet, Prepared, Source, unknown_origin};
use crate::relay::ids::{ChannelId, ClientId};
use crate::relay::pattern::{self, Intent, Receivers, Roster};
use crate::relay::subprotocol::FrameError;
use crate::ws::codec::OpCode;

/// Messages waiting to be published to NATS; beyond this they are dropped
/// and counted, never buffered without bound.
pub const PUBLISH_QUEUE: usize = 65_536;

const CHANNEL: &str = "Wrs-Channel";
const SENDER: &str = "Wrs-Sender";
const KIND: &str = "Wrs-Kind";
const TARGET: &str = "Wrs-Target";
const MODE: &str = "Wrs-Mode";
/// Set on a round-robin pick passed on by a node that had nobody to take
/// it: it is not passed on again.
const PASSED_ON: &str = "Wrs-Passed-On";

/// How long a reply to a call elsewhere waits to learn whether it was
/// taken before its sender is told it was not.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A call's answer to a reply: taken, or already answered.
const TAKEN: &[u8] = b"1";
const NOT_TAKEN: &[u8] = b"0";

/// How a message for one client is handled if that client is gone.
const MODE_PICK: &str = "pick";
const MODE_EXACT: &str = "exact";

/// A message for NATS.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) subject: String,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

#[derive(Debug)]
pub(super) struct Transport {
    /// Channels whose broadcasts this node subscribes to (those with
    /// clients here), with the token that ends the subscription.
    interest: DashMap<ChannelId, CancellationToken>,
    /// Turns for picks passed on to other nodes.
    passed_on: AtomicUsize,
    /// HTTP calls waiting on this node, with the token that ends their
    /// reply subscription.
    calls: DashMap<ClientId, CancellationToken>,
    outgoing_tx: mpsc::Sender<Outgoing>,
    outgoing_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
}

impl Transport {
    pub(super) fn new() -> Self {
        let (outgoing_tx, outgoing_rx) = mpsc::channel(PUBLISH_QUEUE);
        Self {
            interest: DashMap::new(),
            passed_on: AtomicUsize::new(0),
            calls: DashMap::new(),
            outgoing_tx,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
        }
    }
}

pub(super) fn headers(channel: &ChannelId, sender: ClientId, prepared: &Prepared) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CHANNEL, channel.as_str());
    headers.insert(SENDER, sender.to_string().as_str());
    headers.insert(
        KIND,
        if prepared.opcode == OpCode::Binary {
            "binary"
        } else {
            "text"
        },
    );
    headers
}

impl NatsCoordinator {
    /// Broadcast subject of a channel.
    fn all_subject(&self, channel: &ChannelId) -> String {
        format!("{}.ch.{channel}.all", self.prefix)
    }

    /// Direct subject of a node.
    fn node_subject(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }

    /// Starts the publisher and the receiver of this node's direct subject.
    pub(super) async fn start_transport(&self) -> Result<(), CoordinatorError> {
        let Some(me) = self.me() else {
            return Ok(());
        };
        if let Some(outgoing) = self.transport.outgoing_rx.lock().take() {
            let me = Arc::clone(&me);
            self.spawn(async move { me.publish(outgoing).await });
        }
        let direct = self
            .store
            .client
            .subscribe(self.node_subject(&self.node))
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        self.spawn(async move { me.receive(direct).await });
        Ok(())
    }

    /// Queues a message for NATS without waiting.
    pub(super) fn send(&self, outgoing: Outgoing) {
        match self.transport.outgoing_tx.try_send(outgoing) {
            Ok(()) => self.metrics.cluster.published.inc(),
            Err(_) => self.metrics.cluster.dropped.inc(),
        };
    }

    /// Moves queued messages into the NATS client. A message NATS refuses
    /// (larger than the `max_payload` of the server it is connected to now)
    /// is counted as dropped and logged, at most once per interval.
    async fn publish(&self, mut outgoing: mpsc::Receiver<Outgoing>) {
        const WARN_EVERY: Duration = Duration::from_secs(10);
        let mut last_warning: Option<Instant> = None;
        while let Some(message) = outgoing.recv().await {
            let published = self
                .store
                .client
                .publish_with_headers(message.subject, message.headers, message.payload)
                .await;
            if let Err(error) = published {
                self.metrics.cluster.dropped.inc();
                if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    last_warning = Some(Instant::now());
                    warn!(%error, "a message could not be published to NATS and was dropped (counted in wrs_cluster_messages_dropped_total)");
                }
            }
        }
    }

    /// Delivers what arrives on one subscription until it ends (dropping
    /// the subscriber unsubscribes).
    async fn receive(&self, mut subscriber: async_nats::Subscriber) {
        while let Some(message) = subscriber.next().await {
            self.metrics.cluster.received.inc();
            let Some((channel, inbound)) = inbound(&message) else {
                continue;
            };
            if let Some(handle) = self.handle()
                && handle.deliver(&channel, &inbound) == 0
            {
                self.pass_on(&channel, &message, &inbound);
            }
        }
    }

    /// A round-robin pick that nobody here could take — its target left
    /// (drained, shed, disconnected) before the sender's roster said so, and
    /// no other client of the channel is on this node — goes once more, to
    /// a client of the channel on another node, in turn. Without this a
    /// drained node's last worker would lose every job sent to it until the
    /// senders' rosters caught up.
    fn pass_on(&self, channel: &ChannelId, message: &async_nats::Message, inbound: &Inbound) {
        let Some((_, Fallback::NextInTurn)) = inbound.target else {
            return;
        };
        let Some(mut headers) = message.headers.clone() else {
            return;
        };
        if headers.get(PASSED_ON).is_some() {
            return;
        }
        let Some((roster, _)) = self.roster(channel) else {
            return;
        };
        let candidates: Vec<(ClientId, &str)> = (0..roster.len())
            .filter_map(|i| roster.entry(i))
            .filter(|&(id, node)| node != &*self.node && Some(id) != inbound.sender)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let turn = self.transport.passed_on.fetch_add(1, Ordering::Relaxed);
        let (target, node) = candidates[turn % candidates.len()];
        headers.insert(TARGET, target.to_string().as_str());
        headers.insert(PASSED_ON, "1");
        self.send(Outgoing {
            subject: self.node_subject(node),
            headers,
            payload: message.payload.clone(),
        });
    }

    /// Subscribes to `subject`; the subscription is in place at the
    /// server when this returns.
    async fn subscribe_now(
        &self,
        subject: String,
    ) -> Result<async_nats::Subscriber, CoordinatorError> {
        let unavailable = |e: String| CoordinatorError::Unavailable(e);
        let subscriber = self
            .store
            .client
            .subscribe(subject)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        self.store
            .client
            .flush()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(subscriber)
    }

    /// Reply subject of an HTTP call.
    fn call_subject(&self, origin: ClientId) -> String {
        format!("{}.call.{origin}", self.prefix)
    }

    /// Subscribes to the replies for a call waiting on this node; the
    /// subscription is in place at the server before this returns.
    pub(super) async fn listen_for_reply(&self, origin: ClientId) -> Result<(), CoordinatorError> {
        let mut subscriber = self.subscribe_now(self.call_subject(origin)).await?;
        let (Some(tasks), Some(handle)) = (self.tasks(), self.handle().cloned()) else {
            return Err(CoordinatorError::Unavailable(
                "the node is stopping".to_owned(),
            ));
        };
        let stop = tasks.stop().child_token();
        self.transport.calls.insert(origin, stop.clone());
        let client = self.store.client.clone();
        self.spawn(async move {
            let answer = async {
                while let Some(message) = subscriber.next().await {
                    let taken = handle.answer_call(origin, message.payload.clone());
                    if let Some(reply_to) = message.reply {
                        let answer = if taken { TAKEN } else { NOT_TAKEN };
                        // Best effort: without it the sender's node times out.
                        let _ = client.publish(reply_to, Bytes::from_static(answer)).await;
                    }
                }
            };
            stop.run_until_cancelled(answer).await;
        });
        Ok(())
    }

    /// The call for `origin` ended: its reply subscription goes.
    pub(super) fn stop_listening(&self, origin: ClientId) {
        if let Some((_, stop)) = self.transport.calls.remove(&origin) {
            stop.cancel();
        }
    }

    /// Sends a reply from this node's client `sender` to the call for
    /// `origin` on whichever node it waits; if none takes it, `sender`
    /// gets the error frame a reply to an unknown origin gets.
    pub(super) fn send_reply(
        &self,
        channel: &ChannelId,
        sender: ClientId,
        origin: ClientId,
        reply: Bytes,
    ) {
        let Some(handle) = self.handle().cloned() else {
            return;
        };
        let client = self.store.client.clone();
        let subject = self.call_subject(origin);
        let channel = channel.clone();
        self.spawn(async move {
            let request = client.request(subject, reply);
            let taken = matches!(
                tokio::time::timeout(REPLY_TIMEOUT, request).await,
                Ok(Ok(answer)) if answer.payload.as_ref() == TAKEN
            );
            if !taken {
                handle.frame_error(
                    &channel,
                    sender,
                    &FrameError::UnknownOrigin(origin.to_string()),
                );
            }
        });
    }

    /// Subscribes to a channel's broadcasts unless already subscribed; the
    /// subscription is in place at the server before this returns.
    pub(super) async fn ensure_interest(&self, channel: &Channel) -> Result<(), JoinRefusal> {
        if self.transport.interest.contains_key(channel.id()) {
            return Ok(());
        }
        let (Some(me), Some(tasks)) = (self.me(), self.tasks()) else {
            return Err(CoordinatorError::Unavailable("the node is stopping".to_owned()).into());
        };
        // In place at the server before the channel counts as subscribed
        // here, so a client that joins after another can miss nothing.
        let stop = tasks.stop().child_token();
        if channel.spec().history.is_some() {
            // A channel with history: its messages come from the stream.
            self.consume_history(channel.id(), stop.clone()).await?;
        } else {
            let subscriber = self.subscribe_now(self.all_subject(channel.id())).await?;
            let receiving = stop.clone();
            self.spawn(async move {
                receiving.run_until_cancelled(me.receive(subscriber)).await;
            });
        }
        match self.transport.interest.entry(channel.id().clone()) {
            dashmap::Entry::Vacant(slot) => {
                slot.insert(stop);
            }
            // Another connect subscribed meanwhile: one is enough.
            dashmap::Entry::Occupied(_) => stop.cancel(),
        }
        Ok(())
    }

    /// Ends a channel's subscription once this node has no clients (and no
    /// connects under way) in it.
    pub(super) fn drop_interest_if_idle(&self, channel: &Channel) {
        if let Some((_, stop)) = self
            .transport
            .interest
            .remove_if(channel.id(), |_, _| channel.is_idle_here())
        {
            stop.cancel();
        }
    }

    pub(super) fn drop_interest(&self, channel: &ChannelId) {
        if let Some((_, stop)) = self.transport.interest.remove(channel) {
            stop.cancel();
        }
    }

    /// Relays a message over the cluster roster: receivers here get outbox
    /// pushes; a broadcast costs one NATS message for all other interested
    /// nodes; a message for one client elsewhere goes to its node.
    pub(super) fn relay_message(
        &self,
        outlet: &Outlet<'_>,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, FrameError> {
        let Some((roster, others)) = self.roster(channel.id()) else {
            return outlet.route_locally(channel, source, prepared);
        };
        let sender = source.id();
        let sender_at = match source {
            Source::Client(id) => match roster.position(id) {
                Some(at) => Some(at),
                // Not in the shared roster yet (or any more): this node's view.
                None => return outlet.route_locally(channel, source, prepared),
            },
            Source::Outside(_) => None,
        };
        let frame = outlet.frame_of(prepared);
        let mut attempts = roster.len();
        loop {
            let receivers = pattern::route(
                channel.pattern(),
                &*roster,
                sender_at,
                prepared.intent,
                channel.turns(),
            )
            .map_err(unknown_origin)?;
            match receivers {
                Receivers::Nobody => return Ok(prepared.delivered(0, 0)),
                Receivers::Sender => {
                    let delivered = outlet.offer_to(channel, sender, &frame);
                    return Ok(prepared.delivered_to(sender, delivered));
                }
                Receivers::AllButSender => {
                    let frames = outlet.offer_all_but(channel, Some(sender), &frame);
                    if others {
                        self.send(Outgoing {
                            subject: self.all_subject(channel.id()),
                            headers: headers(channel.id(), sender, prepared),
                            payload: prepared.payload.clone(),
                        });
                    }
                    // Remote nodes count their own deliveries.
                    let addressed = roster.len() - usize::from(sender_at.is_some());
                    return Ok(prepared.delivered(frames, addressed as u64));
                }
                Receivers::One(position) => {
                    let Some((target, node)) = roster.entry(position) else {
                        return Ok(prepared.delivered(0, 0));
                    };
                    let exact = matches!(prepared.intent, Intent::Reply { .. });
                    if node != &*self.node {
                        let mut headers = headers(channel.id(), sender, prepared);
                        headers.insert(TARGET, target.to_string().as_str());
                        headers.insert(MODE, if exact { MODE_EXACT } else { MODE_PICK });
                        self.send(Outgoing {
                            subject: self.node_subject(node),
                            headers,
                            payload: prepared.payload.clone(),
                        });
                        return Ok(prepared.delivered_to(target, false));
                    }
                    if outlet.offer_to(channel, target, &frame) {
                        return Ok(prepared.delivered_to(target, true));
                    }
                    attempts -= 1;
                    if attempts == 0 || exact {
                        return Ok(prepared.delivered(0, 0));
                    }
                }
            }
        }
    }
}

/// Reads a relayed message's headers.
pub(super) fn inbound(message: &async_nats::Message) -> Option<(ChannelId, Inbound)> {
    let headers = message.headers.as_ref()?;
    let header = |name: &str| headers.get(name).map(|v| v.as_str());
    let channel = header(CHANNEL).and_then(ChannelId::parse)?;
    let opcode = if header(KIND) == Some("binary") {
        OpCode::Binary
    } else {
        OpCode::Text
    };
    let fallback = if header(MODE) == Some(MODE_PICK) {
        Fallback::NextInTurn
    } else {
        Fallback::Nobody
    };
    let target = header(TARGET)
        .and_then(ClientId::parse)
        .map(|target| (target, fallback));
    Some((
        channel,
        Inbound {
            opcode,
            payload: message.payload.clone(),
            sender: header(SENDER).and_then(ClientId::parse),
            target,
            // Set by the stream's consumer for channels with history.
            offset: None,
        },
    ))
}
