//! The history of pub-sub channels in a cluster, in one JetStream stream
//! (`<prefix>-history`, a subject `<prefix>.hist.<channel>` per channel,
//! at most [`history::MAX_SIZE`] messages per subject and no older than
//! [`history::MAX_TTL`]), so any node serves it and it survives the loss
//! of any WRS node. A channel's own `size` and `ttl` are applied when it is
//! read.
//!
//! A message of such a channel is not broadcast on core NATS: it is
//! published into the stream, and every node with clients in the channel
//! (the sender's included) delivers it from an ordered consumer of the
//! channel's subject, with the stream sequence as its offset. So every
//! client sees the channel's messages in one order with increasing
//! offsets, and a node that starts consuming before its client reads the
//! history misses nothing in between. Offsets increase per channel but
//! are not consecutive (the stream numbers every channel's messages).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::stream::{self, Stream};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::NatsCoordinator;
use super::transport::{Outgoing, headers, inbound};
use crate::relay::Delivered;
use crate::relay::channel::Channel;
use crate::relay::coordinator::CoordinatorError;
use crate::relay::deliver::{Prepared, Source};
use crate::relay::history::{self, Entry, SharedHistory, Slice};
use crate::relay::ids::ChannelId;
use crate::relay::pattern::Roster;

/// The stream, and the JetStream context to publish into it.
#[derive(Debug)]
pub struct HistoryStream {
    pub context: async_nats::jetstream::Context,
    pub stream: Stream,
}

impl HistoryStream {
    /// The epoch of every channel's history: the stream's creation time,
    /// read from the stream itself, so a stream that NATS lost and a node
    /// created again is a new epoch on every node.
    async fn epoch(&self) -> Result<String, CoordinatorError> {
        let mut stream = self.stream.clone();
        let info = stream.info().await.map_err(unavailable)?;
        Ok(format!("{:x}", info.created.unix_timestamp_nanos()))
    }
}

/// Opens the history stream, creating it if needed.
///
/// # Errors
///
/// Why the stream cannot be opened.
pub async fn open(
    jetstream: &async_nats::jetstream::Context,
    prefix: &str,
    replicas: usize,
) -> Result<HistoryStream, String> {
    let stream = jetstream
        .get_or_create_stream(stream::Config {
            name: format!("{prefix}-history"),
            description: Some(format!("WRS cluster {prefix}: channel history")),
            subjects: vec![format!("{prefix}.hist.>")],
            max_messages_per_subject: i64::from(history::MAX_SIZE),
            max_age: history::MAX_TTL,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(HistoryStream {
        context: jetstream.clone(),
        stream,
    })
}

fn unavailable(error: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Unavailable(error.to_string())
}

impl NatsCoordinator {
    /// A channel's subject in the history stream.
    fn history_subject(&self, channel: &ChannelId) -> String {
        format!("{}.hist.{channel}", self.prefix)
    }

    /// How many clients a message from `source` is for: the cluster's
    /// roster (this node's if it has none yet) without the sender.
    fn addressed(&self, channel: &Channel, source: Source) -> u64 {
        let (len, sender_listed) = match self.roster(channel.id()) {
            Some((roster, _)) => (roster.len(), roster.position(source.id()).is_some()),
            None => {
                let members = channel.members();
                (members.len(), members.position(source.id()).is_some())
            }
        };
        (len - usize::from(sender_listed)) as u64
    }

    /// Starts delivering the channel's kept messages to this node's
    /// clients as they are kept, from now on; in place at the server
    /// before this returns. Ends with `stop`.
    pub(super) async fn consume_history(
        &self,
        channel: &ChannelId,
        stop: CancellationToken,
    ) -> Result<(), CoordinatorError> {
        let consumer = self
            .store
            .history
            .stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.store.client.new_inbox(),
                filter_subject: self.history_subject(channel),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let Some(handle) = self.handle().cloned() else {
            return Err(unavailable("the node is stopping"));
        };
        let metrics = Arc::clone(&self.metrics);
        self.spawn(async move {
            let deliver = async {
                while let Some(message) = messages.next().await {
                    let message = match message {
                        Ok(message) => message,
                        Err(error) => {
                            warn!(%error, "the channel history consumer failed; it is recreated");
                            continue;
                        }
                    };
                    metrics.cluster.received.inc();
                    let Ok(info) = message.info() else {
                        continue;
                    };
                    let offset = info.stream_sequence;
                    if let Some((channel, mut inbound)) = inbound(&message.message) {
                        inbound.offset = Some(offset);
                        handle.deliver(&channel, &inbound);
                    }
                }
            };
            stop.run_until_cancelled(deliver).await;
        });
        Ok(())
    }

    /// Drops a channel's kept messages (the channel ended), if it kept
    /// any and this node knows it. What is left ages out with the stream's
    /// maximum age.
    pub(super) fn forget_history(&self, channel: &ChannelId) {
        let keeps = self
            .handle()
            .and_then(|handle| handle.channel(channel))
            .is_some_and(|held| held.spec().history.is_some());
        if !keeps {
            return;
        }
        let stream = self.store.history.stream.clone();
        let subject = self.history_subject(channel);
        self.spawn(async move {
            if let Err(error) = stream.purge().filter(subject).await {
                warn!(%error, "an ended channel's history could not be purged; it ages out");
            }
        });
    }

    /// Whether the stream holds the message `offset` of this channel.
    async fn holds(&self, subject: &str, offset: u64) -> Result<bool, CoordinatorError> {
        match self.store.history.stream.direct_get(offset).await {
            Ok(message) => Ok(message.subject.as_str() == subject),
            Err(error) => match error.kind() {
                stream::DirectGetErrorKind::NotFound => Ok(false),
                _ => Err(unavailable(error)),
            },
        }
    }
}

#[async_trait::async_trait]
impl SharedHistory for NatsCoordinator {
    fn relay(&self, channel: &Channel, source: Source, prepared: &Prepared) -> Delivered {
        self.send(Outgoing {
            subject: self.history_subject(channel.id()),
            headers: headers(channel.id(), source.id(), prepared),
            payload: prepared.payload.clone(),
        });
        prepared.delivered(0, self.addressed(channel, source))
    }

    async fn publish(
        &self,
        channel: &Channel,
        source: Source,
        prepared: &Prepared,
    ) -> Result<Delivered, CoordinatorError> {
        let addressed = self.addressed(channel, source);
        let ack = self
            .store
            .history
            .context
            .publish_with_headers(
                self.history_subject(channel.id()),
                headers(channel.id(), source.id(), prepared),
                prepared.payload.clone(),
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        self.metrics.cluster.published.inc();
        Ok(Delivered {
            offset: Some(ack.sequence),
            ..prepared.delivered(0, addressed)
        })
    }

    async fn read(
        &self,
        channel: &Channel,
        after: u64,
        limit: usize,
    ) -> Result<Slice, CoordinatorError> {
        let history = &self.store.history;
        let spec = channel.spec().history.unwrap_or(history::HistorySpec {
            size: history::MAX_SIZE,
            ttl: history::MAX_TTL,
        });
        let subject = self.history_subject(channel.id());
        let epoch = history.epoch().await?;
        let empty = |newest: u64| Slice {
            epoch: epoch.clone(),
            oldest: newest + 1,
            newest,
            expired: false,
            entries: Vec::new(),
        };
        let newest = match history.stream.direct_get_last_for_subject(&subject).await {
            Ok(message) => message.sequence,
            Err(error) => match error.kind() {
                stream::DirectGetErrorKind::NotFound => return Ok(empty(0)),
                _ => return Err(unavailable(error)),
            },
        };
        if after >= newest {
            return Ok(empty(newest));
        }
        // Everything kept after `after`, then the channel's own limits.
        let consumer = history
            .stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.store.client.new_inbox(),
                filter_subject: subject.clone(),
                deliver_policy: if after == 0 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    }
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut kept = Vec::new();
        while let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(unavailable)?
        {
            let message = message.map_err(unavailable)?;
            let info = message.info().map_err(unavailable)?;
            let (offset, at) = (info.stream_sequence, SystemTime::from(info.published));
            if let Some((_, inbound)) = inbound(&message.message) {
                let binary = inbound.opcode == crate::ws::codec::OpCode::Binary;
                kept.push(Entry::kept(offset, at, binary, inbound.payload));
            }
            if offset >= newest {
                break;
            }
        }
        let read = kept.len();
        let young_since = SystemTime::now()
            .checked_sub(spec.ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        kept.retain(|entry| entry.at >= young_since);
        let excess = kept.len().saturating_sub(spec.size as usize);
        kept.drain(..excess);
        // Something after `after` is no longer kept, or `after` itself is
        // gone (so what followed it may be gone too).
        let expired = kept.len() < read || (after > 0 && !self.holds(&subject, after).await?);
        let oldest = kept.first().map_or(newest + 1, |entry| entry.offset);
        kept.truncate(limit);
        Ok(Slice {
            epoch,
            oldest,
            newest,
            expired,
            entries: kept,
        })
    }
}
