//! Cluster mode (`WRS_NATS_URL`): every node connects to the same NATS.
//! Shared state lives in JetStream key-value buckets ([`records`]);
//! messages travel on core NATS subjects:
//!
//! - `<prefix>.ch.<channel>.all` — broadcasts (pub-sub, req-repl
//!   requests). A node subscribes while it has clients in the channel, so
//!   NATS carries one copy per interested node, never one per client.
//! - `<prefix>.node.<node>` — messages for one client on that node
//!   (round-robin picks and replies), headers naming the target.
//!
//! This module owns the NATS connection, the buckets and the cluster's
//! caches; [`sync`] runs the loops that keep this node's relay in step with
//! them, and [`crate::backplane::nats`] relays messages through them.

pub mod records;
pub mod sync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::kv;
use async_nats::{HeaderMap, connection::State};
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use rand::RngExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::relay::ids::{ChannelId, ClientId};
use records::{ChannelRecord, ClusterRoster, Member, MembersDoc, NodeRecord, epoch_ms};

/// Messages waiting to be published to NATS; beyond this they are dropped
/// and counted, never buffered without bound.
pub const PUBLISH_QUEUE: usize = 65_536;
/// Compare-and-set attempts before a membership change gives up.
const CAS_ATTEMPTS: usize = 64;
/// How long a store operation is retried while NATS fails over (a server
/// lost, leaders being elected) before the request gives up with 503.
pub const STORE_RETRY: Duration = Duration::from_secs(10);
/// A node is considered gone after this many heartbeat intervals of silence.
pub const MISSED_HEARTBEATS: u32 = 3;

/// How to reach and use the cluster, from the configuration.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Comma-separated NATS server URLs.
    pub urls: String,
    /// Prefix of subjects and bucket names (`WRS_CLUSTER`).
    pub prefix: String,
    pub node_id: String,
    /// Host and port clients use for this node (shown in `/cluster`).
    pub address: String,
    pub credentials: Option<PathBuf>,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub kv_replicas: usize,
    pub heartbeat: Duration,
    /// How long to keep trying the first connection.
    pub connect_timeout: Duration,
    /// The largest client message (`WRS_MAX_MESSAGE_BYTES`): NATS must
    /// carry it with its headers.
    pub max_message_bytes: usize,
}

/// Room for the headers WRS puts on a relayed message (channel id, sender,
/// kind, target, mode: well under 300 bytes).
pub const HEADER_ROOM: usize = 1024;

/// Why a cluster operation failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error(
        "the NATS server's max_payload is {max_payload} bytes, but WRS_MAX_MESSAGE_BYTES={max_message} \
         needs {needed} with headers: messages that large would be lost between nodes. \
         Set `max_payload: 2MB` (or more) in the NATS server configuration, \
         or lower WRS_MAX_MESSAGE_BYTES to at most {fits}"
    )]
    PayloadTooSmall {
        max_payload: usize,
        max_message: usize,
        needed: usize,
        fits: usize,
    },
    #[error("cannot open the key-value bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("the cluster store is unavailable: {0}")]
    Unavailable(String),
    #[error("too many concurrent changes to channel {0}; try again")]
    Contention(String),
}

/// Why a place in a channel could not be reserved.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("channel full ({limit} clients)")]
    Full { limit: u32 },
    /// The channel's members document cannot grow: with one more client
    /// it would not fit in one NATS message (`max_payload`).
    #[error("channel full: its cluster roster of {clients} clients fills a NATS message")]
    RosterFull { clients: usize },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// A message for NATS.
#[derive(Debug)]
pub struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// The latest members document of a channel, as this node knows it.
#[derive(Clone, Debug)]
pub struct Members {
    pub revision: u64,
    pub doc: Arc<MembersDoc>,
    pub roster: Arc<ClusterRoster>,
}

/// A node as last heard from.
#[derive(Clone, Debug)]
pub struct SeenNode {
    pub record: NodeRecord,
    pub seen: Instant,
}

/// The NATS connection, the buckets and what this node knows of them.
#[derive(Debug)]
pub struct Cluster {
    node: Arc<str>,
    prefix: String,
    address: Mutex<String>,
    heartbeat: Duration,
    started_at: SystemTime,
    client: async_nats::Client,
    channels: kv::Store,
    members: kv::Store,
    activity: kv::Store,
    nodes: kv::Store,
    /// Members documents of every channel, from the `members` watch.
    docs: DashMap<ChannelId, Members>,
    /// Nodes heard from recently, from the `nodes` watch.
    seen: Mutex<BTreeMap<String, SeenNode>>,
    /// Since when this node has watched heartbeats without interruption.
    watching_since: Mutex<Instant>,
    outgoing_tx: mpsc::Sender<Outgoing>,
    outgoing_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// When this node last wrote each channel's activity.
    activity_written: DashMap<ChannelId, Instant>,
    /// Joins and leaves waiting for the next write of a channel's members
    /// document. An entry exists while a writer task runs for the channel.
    queued: DashMap<ChannelId, Vec<MemberChange>>,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// Connects to NATS (retrying for `connect_timeout`) and opens the
    /// buckets, creating them if needed.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Connect`] or [`ClusterError::Bucket`].
    pub async fn connect(
        settings: &ClusterSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = connect_nats(settings).await?;
        check_max_payload(client.server_info().max_payload, settings.max_message_bytes)?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let bucket = |kind: &str, max_age: Duration| kv::Config {
            bucket: format!("{}-{kind}", settings.prefix),
            description: format!("WRS cluster {}: {kind}", settings.prefix),
            history: 1,
            max_age,
            num_replicas: settings.kv_replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        // A NATS cluster that is starting needs a moment to elect its
        // JetStream leader: retry until the connect deadline. Nodes of a
        // first deploy start together and race to create the buckets;
        // updating a replicated stream that another node is still creating
        // stalls, so a bucket that exists is opened as it is, and only a
        // missing one is created (the loser of a race then opens it).
        let deadline = Instant::now() + settings.connect_timeout;
        let open = |config: kv::Config| {
            let jetstream = jetstream.clone();
            async move {
                let name = config.bucket.clone();
                loop {
                    let attempt = match jetstream.get_key_value(&name).await {
                        Ok(store) if settings_differ(&store, &config).await => {
                            info!(bucket = %name, "bucket settings changed; updating the bucket");
                            jetstream
                                .update_key_value(config.clone())
                                .await
                                .map_err(|e| e.to_string())
                        }
                        Ok(store) => Ok(store),
                        Err(_) => jetstream
                            .create_key_value(config.clone())
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    match attempt {
                        Ok(store) => return Ok(store),
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(bucket = %name, error = %e, "bucket not ready yet");
                            let jitter = rand::random_range(100..400);
                            tokio::time::sleep(Duration::from_millis(jitter)).await;
                        }
                        Err(e) => {
                            return Err(ClusterError::Bucket {
                                bucket: name,
                                reason: e,
                            });
                        }
                    }
                }
            }
        };
        let channels = open(bucket("channels", Duration::ZERO)).await?;
        let members = open(bucket("members", Duration::ZERO)).await?;
        // Timeouts are at most 30 days; stale activity ages out after that.
        let activity = open(bucket("activity", Duration::from_secs(31 * 24 * 3600))).await?;
        let nodes = open(bucket("nodes", settings.heartbeat * 10 * MISSED_HEARTBEATS)).await?;
        let (outgoing_tx, outgoing_rx) = mpsc::channel(PUBLISH_QUEUE);
        info!(node = %settings.node_id, prefix = %settings.prefix, urls = %settings.urls, "joined the cluster");
        Ok(Arc::new(Cluster {
            node: settings.node_id.as_str().into(),
            prefix: settings.prefix.clone(),
            address: Mutex::new(settings.address.clone()),
            heartbeat: settings.heartbeat,
            started_at: SystemTime::now(),
            client,
            channels,
            members,
            activity,
            nodes,
            docs: DashMap::new(),
            seen: Mutex::new(BTreeMap::new()),
            watching_since: Mutex::new(Instant::now()),
            outgoing_tx,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            activity_written: DashMap::new(),
            queued: DashMap::new(),
            metrics,
        }))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets the host and port clients use for this node (known once the
    /// port is bound).
    pub fn set_address(&self, address: String) {
        *self.address.lock() = address;
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn channels_store(&self) -> &kv::Store {
        &self.channels
    }

    pub fn members_store(&self) -> &kv::Store {
        &self.members
    }

    pub fn nodes_store(&self) -> &kv::Store {
        &self.nodes
    }

    /// Broadcast subject of a channel.
    pub fn all_subject(&self, channel: &ChannelId) -> String {
        format!("{}.ch.{channel}.all", self.prefix)
    }

    /// Direct subject of a node.
    pub fn node_subject(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }

    // ----- channels --------------------------------------------------------

    /// Stores a new channel; fails with `Ok(false)` if the id is taken
    /// anywhere in the cluster. Returns once NATS acknowledged the write.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`] when the store cannot be reached.
    pub async fn create_channel(
        &self,
        id: &ChannelId,
        record: &ChannelRecord,
    ) -> Result<bool, ClusterError> {
        let value: Bytes = serde_json::to_vec(record)
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?
            .into();
        let mut retry = Retry::new();
        loop {
            match self.channels.create(id.as_str(), value.clone()).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(false),
                Err(e) => retry.wait(e).await?,
            }
        }
    }

    /// A channel's record and revision, if it exists and is not closing.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn fetch_channel(
        &self,
        id: &ChannelId,
    ) -> Result<Option<(ChannelRecord, u64)>, ClusterError> {
        let mut retry = Retry::new();
        let entry = loop {
            match self.channels.entry(id.as_str()).await {
                Ok(entry) => break entry,
                Err(e) => retry.wait(e).await?,
            }
        };
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                serde_json::from_slice::<ChannelRecord>(&e.value)
                    .ok()
                    .map(|r| (r, e.revision))
            })
            .filter(|(record, _)| record.closing.is_none()))
    }

    /// Closes a channel cluster-wide: marks it with `reason` (every node
    /// closes its clients with the matching code), then deletes it and its
    /// members and activity. `expected` makes it conditional on the record
    /// not having changed. Returns whether this call closed it.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn close_channel(
        &self,
        id: &ChannelId,
        reason: &str,
        expected: Option<u64>,
    ) -> Result<bool, ClusterError> {
        let Some((mut record, revision)) = self.fetch_channel(id).await? else {
            return Ok(false);
        };
        if expected.is_some_and(|e| e != revision) {
            return Ok(false);
        }
        record.closing = Some(reason.to_owned());
        let value: Bytes = serde_json::to_vec(&record)
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?
            .into();
        let mut retry = Retry::new();
        loop {
            match self
                .channels
                .update(id.as_str(), value.clone(), revision)
                .await
            {
                Ok(_) => break,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(false),
                Err(e) => retry.wait(e).await?,
            }
        }
        for store in [&self.channels, &self.members, &self.activity] {
            let mut retry = Retry::new();
            while let Err(e) = store.delete(id.as_str()).await {
                retry.wait(e).await?;
            }
        }
        self.docs.remove(id);
        Ok(true)
    }

    /// Ids of every channel in the cluster.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn channel_ids(&self) -> Result<Vec<ChannelId>, ClusterError> {
        use futures_util::TryStreamExt;
        let keys = self
            .channels
            .keys()
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let keys: Vec<String> = keys
            .try_collect()
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(keys.iter().filter_map(|k| ChannelId::parse(k)).collect())
    }

    // ----- members ---------------------------------------------------------

    /// The cluster roster of a channel, as last seen.
    pub fn members(&self, channel: &ChannelId) -> Option<Members> {
        self.docs.get(channel).map(|m| m.clone())
    }

    /// Records a members document seen in the bucket (newer revisions win).
    pub fn apply_members(&self, channel: ChannelId, revision: u64, doc: MembersDoc) {
        let members = Members {
            revision,
            roster: Arc::new(ClusterRoster::of(&doc)),
            doc: Arc::new(doc),
        };
        match self.docs.entry(channel) {
            dashmap::Entry::Occupied(mut held) => {
                if held.get().revision < revision {
                    held.insert(members);
                }
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(members);
            }
        }
    }

    pub fn forget_members(&self, channel: &ChannelId) {
        self.docs.remove(channel);
    }

    /// Reserves a place for a new client on this node: draws an id unique
    /// in the channel cluster-wide and adds it — unless that would exceed
    /// `limit`. Compare-and-set, so concurrent connects on any nodes can
    /// never exceed the limit.
    ///
    /// Joins and leaves of one channel on this node are written together:
    /// while one write of the channel's members document is in flight, the
    /// changes that arrive queue up and go out in the next write (see
    /// [`Cluster::write_queued`]).
    ///
    /// # Errors
    ///
    /// [`ReserveError::Full`], or the cluster's error.
    pub async fn reserve(
        self: &Arc<Self>,
        channel: &ChannelId,
        limit: Option<u32>,
    ) -> Result<ClientId, ReserveError> {
        let (done, outcome) = oneshot::channel();
        self.queue_change(channel, MemberChange::Reserve { limit, done });
        outcome
            .await
            .unwrap_or_else(|_| Err(ReserveError::Cluster(writer_gone())))
    }

    /// Removes a client (that left, or whose upgrade failed); written
    /// together with the channel's other queued changes, like
    /// [`Cluster::reserve`].
    ///
    /// # Errors
    ///
    /// The cluster's error.
    pub async fn release(
        self: &Arc<Self>,
        channel: &ChannelId,
        id: ClientId,
    ) -> Result<(), ClusterError> {
        let (done, outcome) = oneshot::channel();
        self.queue_change(channel, MemberChange::Release { id, done });
        outcome.await.unwrap_or_else(|_| Err(writer_gone()))
    }

    /// Queues a change of a channel's members document and starts the
    /// channel's writer task unless one runs. The queue holds at most one
    /// change per connect or leave in progress on this node.
    fn queue_change(self: &Arc<Self>, channel: &ChannelId, change: MemberChange) {
        match self.queued.entry(channel.clone()) {
            dashmap::Entry::Occupied(mut queue) => queue.get_mut().push(change),
            dashmap::Entry::Vacant(slot) => {
                slot.insert(vec![change]);
                // A task of its own: the connect that queued first may be
                // cancelled (its client hung up), the changes queued after
                // it must still be written.
                let cluster = Arc::clone(self);
                let channel = channel.clone();
                tokio::spawn(async move { cluster.write_queued(channel).await });
            }
        }
    }

    /// Writes a channel's queued changes, one compare-and-set write per
    /// batch, until none are left. A burst of connects to one channel so
    /// costs a few writes of its document instead of one each — the
    /// document grows with the channel, and every node's watch receives
    /// every version of it.
    async fn write_queued(&self, channel: ChannelId) {
        loop {
            let batch = match self.queued.entry(channel.clone()) {
                dashmap::Entry::Occupied(queue) if queue.get().is_empty() => {
                    queue.remove();
                    return;
                }
                dashmap::Entry::Occupied(mut queue) => std::mem::take(queue.get_mut()),
                dashmap::Entry::Vacant(_) => return,
            };
            self.write_batch(&channel, batch).await;
        }
    }

    /// Applies a batch of changes, in the order they were queued, to the
    /// channel's members document in one write, and tells each caller its
    /// outcome.
    async fn write_batch(&self, channel: &ChannelId, batch: Vec<MemberChange>) {
        let room = self.client.server_info().max_payload;
        let mut outcomes = Vec::new();
        // Outcomes are those of the attempt that was written.
        let written = self
            .change_members(channel, |doc| {
                apply_changes(doc, &self.node, &batch, room, &mut outcomes)
            })
            .await;
        match written {
            Ok(()) => {
                for (change, outcome) in batch.into_iter().zip(outcomes) {
                    change.answer(outcome);
                }
            }
            Err(error) => {
                for change in batch {
                    change.fail(error.clone());
                }
            }
        }
    }

    /// Sets this node's entry of a channel to exactly `clients` (repairs
    /// the document after an eviction or a lost write).
    ///
    /// # Errors
    ///
    /// The cluster's error.
    pub async fn set_local_members(
        &self,
        channel: &ChannelId,
        clients: &[Member],
    ) -> Result<(), ClusterError> {
        let node = Arc::clone(&self.node);
        self.change_members(channel, |doc| {
            let current = doc.nodes.get(&*node).map(Vec::as_slice).unwrap_or_default();
            let mut want: Vec<Member> = clients.to_vec();
            want.sort_by_key(|m| (m.at, m.id));
            let mut have = current.to_vec();
            have.sort_by_key(|m| (m.at, m.id));
            if want == have {
                return false;
            }
            doc.nodes.remove(&*node);
            if !clients.is_empty() {
                doc.nodes.insert(node.to_string(), want);
            }
            true
        })
        .await
    }

    /// Removes every client of `node` from every channel this node knows;
    /// returns how many were removed.
    ///
    /// # Errors
    ///
    /// The cluster's error, for the first channel that failed.
    pub async fn remove_node_members(&self, node: &str) -> Result<usize, ClusterError> {
        let channels: Vec<ChannelId> = self
            .docs
            .iter()
            .filter(|m| m.doc.nodes.contains_key(node))
            .map(|m| m.key().clone())
            .collect();
        let mut removed = 0;
        for channel in channels {
            let mut count = 0;
            self.change_members(&channel, |doc| {
                count = doc.remove_node(node);
                count > 0
            })
            .await?;
            removed += count;
        }
        Ok(removed)
    }

    /// Reads, changes and writes back a members document, retrying on
    /// conflicting writes (`change` runs again on the fresh document).
    /// `change` returns whether it changed anything.
    async fn change_members<F>(
        &self,
        channel: &ChannelId,
        mut change: F,
    ) -> Result<(), ClusterError>
    where
        F: FnMut(&mut MembersDoc) -> bool,
    {
        let mut retry = Retry::new();
        let mut attempt = 0;
        while attempt < CAS_ATTEMPTS {
            let entry = match self.members.entry(channel.as_str()).await {
                Ok(entry) => entry,
                Err(e) => {
                    retry.wait(e).await?;
                    continue;
                }
            };
            let (mut doc, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<MembersDoc>(&e.value).unwrap_or_default(),
                    e.revision,
                ),
                Some(e) => (MembersDoc::default(), e.revision),
                None => (MembersDoc::default(), 0),
            };
            if !change(&mut doc) {
                return Ok(());
            }
            let value: Bytes = serde_json::to_vec(&doc)
                .map_err(|e| ClusterError::Unavailable(e.to_string()))?
                .into();
            let written = if revision == 0 {
                match self.members.create(channel.as_str(), value).await {
                    Ok(revision) => Some(revision),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                    Err(e) => {
                        retry.wait(e).await?;
                        continue;
                    }
                }
            } else {
                match self.members.update(channel.as_str(), value, revision).await {
                    Ok(revision) => Some(revision),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => None,
                    Err(e) => {
                        retry.wait(e).await?;
                        continue;
                    }
                }
            };
            if let Some(revision) = written {
                self.apply_members(channel.clone(), revision, doc);
                return Ok(());
            }
            // Someone else wrote first: back off a little, read again.
            attempt += 1;
            let jitter = rand::rng().random_range(0..=(1u64 << attempt.min(6)));
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        Err(ClusterError::Contention(channel.to_string()))
    }

    // ----- activity --------------------------------------------------------

    /// Notes activity on a channel; writes it to the shared bucket at most
    /// once per `every` from this node (never waiting on the message path).
    pub fn note_activity(self: &Arc<Self>, channel: &ChannelId, every: Duration) {
        let now = Instant::now();
        let due = self
            .activity_written
            .get(channel)
            .is_none_or(|last| now.duration_since(*last) >= every);
        if !due {
            return;
        }
        self.activity_written.insert(channel.clone(), now);
        let cluster = Arc::clone(self);
        let channel = channel.clone();
        tokio::spawn(async move {
            let stamp = epoch_ms(SystemTime::now()).to_string();
            if let Err(error) = cluster.activity.put(channel.as_str(), stamp.into()).await {
                warn!(%channel, %error, "cannot record channel activity in the cluster");
            }
        });
    }

    /// The last activity any node recorded for a channel.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn last_activity_ms(&self, channel: &ChannelId) -> Result<Option<u64>, ClusterError> {
        let value = self
            .activity
            .get(channel.as_str())
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }

    pub fn forget_activity(&self, channel: &ChannelId) {
        self.activity_written.remove(channel);
    }

    // ----- messages --------------------------------------------------------

    /// Queues a message for NATS without waiting.
    pub fn publish(&self, outgoing: Outgoing) {
        match self.outgoing_tx.try_send(outgoing) {
            Ok(()) => {
                self.metrics.cluster.published.inc();
            }
            Err(_) => {
                self.metrics.cluster.dropped.inc();
            }
        }
    }

    /// Takes the queue's receiving end (once, for the publisher task).
    pub fn take_outgoing(&self) -> Option<mpsc::Receiver<Outgoing>> {
        self.outgoing_rx.lock().take()
    }

    // ----- nodes -----------------------------------------------------------

    /// Writes this node's heartbeat.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn beat(
        &self,
        state: &str,
        clients: u64,
        channels: u64,
        messages_per_second: u64,
    ) -> Result<(), ClusterError> {
        let record = NodeRecord {
            id: self.node.to_string(),
            address: self.address.lock().clone(),
            state: state.to_owned(),
            started_at_ms: epoch_ms(self.started_at),
            clients,
            channels,
            messages_per_second,
        };
        let value =
            serde_json::to_vec(&record).map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        self.nodes
            .put(&*self.node, value.into())
            .await
            .map(drop)
            .map_err(|e| ClusterError::Unavailable(e.to_string()))
    }

    /// Records a heartbeat seen in the bucket.
    pub fn saw_node(&self, record: NodeRecord) {
        self.seen.lock().insert(
            record.id.clone(),
            SeenNode {
                record,
                seen: Instant::now(),
            },
        );
    }

    /// Records a heartbeat written `age` ago.
    pub fn saw_node_aged(&self, record: NodeRecord, age: Duration) {
        let seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut nodes = self.seen.lock();
        let fresher = nodes.get(&record.id).is_none_or(|known| known.seen <= seen);
        if fresher {
            nodes.insert(record.id.clone(), SeenNode { record, seen });
        }
    }

    /// The heartbeat watch (re)started, or heartbeats could not be written:
    /// what this node knows of other nodes' liveness is not complete yet.
    pub fn nodes_resynced(&self) {
        *self.watching_since.lock() = Instant::now();
    }

    /// Whether this node has watched heartbeats for a full liveness bound
    /// without interruption, so silence really means absence.
    pub fn knows_liveness(&self) -> bool {
        self.watching_since.lock().elapsed() > self.heartbeat * MISSED_HEARTBEATS
    }

    /// Nodes other than this one that appear in some channel's roster.
    pub fn rostered_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .docs
            .iter()
            .flat_map(|m| m.doc.nodes.keys().cloned().collect::<Vec<_>>())
            .filter(|n| *n != *self.node)
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Reads a node's heartbeat from the bucket: whether it was written
    /// within the liveness bound (then it is recorded as seen).
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn confirm_alive(&self, node: &str) -> Result<bool, ClusterError> {
        let entry = self
            .nodes
            .entry(node)
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(false);
        };
        let age = SystemTime::now()
            .duration_since(SystemTime::from(entry.created))
            .unwrap_or_default();
        if age > self.heartbeat * MISSED_HEARTBEATS {
            return Ok(false);
        }
        if let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) {
            self.saw_node_aged(record, age);
        }
        Ok(true)
    }

    /// Forgets a node (it left, or was found dead or evicted).
    pub fn forget_node(&self, node: &str) -> bool {
        self.seen.lock().remove(node).is_some()
    }

    /// Nodes heard from within the liveness bound, by id.
    pub fn live_nodes(&self) -> Vec<SeenNode> {
        let bound = self.heartbeat * MISSED_HEARTBEATS;
        self.seen
            .lock()
            .values()
            .filter(|n| n.seen.elapsed() <= bound)
            .cloned()
            .collect()
    }

    /// Nodes not heard from within the liveness bound.
    pub fn silent_nodes(&self) -> Vec<String> {
        let bound = self.heartbeat * MISSED_HEARTBEATS;
        self.seen
            .lock()
            .values()
            .filter(|n| n.seen.elapsed() > bound && *n.record.id != *self.node)
            .map(|n| n.record.id.clone())
            .collect()
    }

    pub fn is_live(&self, node: &str) -> bool {
        let bound = self.heartbeat * MISSED_HEARTBEATS;
        node == &*self.node
            || self
                .seen
                .lock()
                .get(node)
                .is_some_and(|n| n.seen.elapsed() <= bound)
    }

    /// Leaves the cluster gracefully: removes this node's heartbeat and any
    /// of its clients still listed, and flushes what is queued for NATS.
    pub async fn leave(&self) {
        if !self.is_connected() {
            // Every store call would wait out its retries: leave at once;
            // the other nodes evict this one after missed heartbeats.
            warn!(
                node = %self.node,
                "NATS unreachable: left the cluster without removing this node's entries"
            );
            return;
        }
        if let Err(error) = self.remove_node_members(&self.node).await {
            warn!(%error, "cannot remove this node's clients from the cluster roster");
        }
        if let Err(error) = self.delete_node(&self.node).await {
            warn!(%error, "cannot remove this node's heartbeat");
        }
        let _ = self.client.flush().await;
        info!(node = %self.node, "left the cluster");
    }

    /// Removes a node's heartbeat (graceful leave, or eviction).
    ///
    /// # Errors
    ///
    /// [`ClusterError::Unavailable`].
    pub async fn delete_node(&self, node: &str) -> Result<(), ClusterError> {
        self.forget_node(node);
        self.nodes
            .delete(node)
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))
    }
}

/// A join or leave waiting for the next write of a channel's members
/// document, with where its outcome goes.
#[derive(Debug)]
enum MemberChange {
    Reserve {
        limit: Option<u32>,
        done: oneshot::Sender<Result<ClientId, ReserveError>>,
    },
    Release {
        id: ClientId,
        done: oneshot::Sender<Result<(), ClusterError>>,
    },
}

impl MemberChange {
    /// Tells the caller how its change went in the written document: the
    /// new client's id or why it was refused for a join, `None` for a
    /// leave. A caller that gave up no longer listens.
    fn answer(self, outcome: Result<Option<ClientId>, ReserveError>) {
        match self {
            Self::Reserve { done, .. } => {
                // A join always has an id or a refusal; without either the
                // caller hears that the writer is gone.
                if let Some(outcome) = outcome.transpose() {
                    let _ = done.send(outcome);
                }
            }
            Self::Release { done, .. } => {
                let _ = done.send(Ok(()));
            }
        }
    }

    /// Tells the caller that its change could not be written.
    fn fail(self, error: ClusterError) {
        match self {
            Self::Reserve { done, .. } => {
                let _ = done.send(Err(error.into()));
            }
            Self::Release { done, .. } => {
                let _ = done.send(Err(error));
            }
        }
    }
}

/// The most one client adds to a members document's JSON:
/// `{"id":"XXXX-XXXX-XXXX","at":MS},` with a `u64` of up to 20 digits.
const MEMBER_JSON_MAX: usize = 50;

/// Applies a batch of joins and leaves, in order, to a members document
/// whose JSON must stay within `room` bytes (NATS's `max_payload`).
/// Fills `outcomes` (one per change: the new client's id for a join) and
/// returns whether the document changed.
fn apply_changes(
    doc: &mut MembersDoc,
    node: &str,
    batch: &[MemberChange],
    room: usize,
    outcomes: &mut Vec<Result<Option<ClientId>, ReserveError>>,
) -> bool {
    outcomes.clear();
    // Joins are counted at their largest, and this node's key as if it
    // were new for each: the document written is never larger than this.
    let grows_by = MEMBER_JSON_MAX + node.len() + 8;
    let mut size = serde_json::to_vec(&*doc).map_or(usize::MAX, |json| json.len());
    let mut changed = false;
    for change in batch {
        let outcome = match change {
            MemberChange::Reserve { limit, .. } => {
                let fits = size.saturating_add(grows_by) <= room;
                let added = add_member(doc, node, *limit, fits).map(Some);
                if added.is_ok() {
                    size += grows_by;
                    changed = true;
                }
                added
            }
            MemberChange::Release { id, .. } => {
                if doc.remove(*id) {
                    // `size` stays as it is: an overestimate is safe.
                    changed = true;
                }
                Ok(None)
            }
        };
        outcomes.push(outcome);
    }
    changed
}

/// Adds a new client of `node` with an id unique in the channel, unless
/// the channel already holds `limit` clients or the document has no room
/// for it (`fits` false). The client limit speaks first.
fn add_member(
    doc: &mut MembersDoc,
    node: &str,
    limit: Option<u32>,
    fits: bool,
) -> Result<ClientId, ReserveError> {
    if let Some(limit) = limit
        && doc.len() >= limit as usize
    {
        return Err(ReserveError::Full { limit });
    }
    if !fits {
        return Err(ReserveError::RosterFull { clients: doc.len() });
    }
    let id = loop {
        let id = ClientId::random();
        if !doc.contains(id) {
            break id;
        }
    };
    doc.add(
        node,
        Member {
            id,
            at: epoch_ms(SystemTime::now()),
        },
    );
    Ok(id)
}

/// The writer task of a channel's membership changes ended without an
/// outcome (the runtime is shutting down).
fn writer_gone() -> ClusterError {
    ClusterError::Unavailable("the membership change was not written".to_owned())
}

/// Retries transient store failures with back-off for [`STORE_RETRY`].
struct Retry {
    deadline: Instant,
    delay: Duration,
}

impl Retry {
    fn new() -> Self {
        Self {
            deadline: Instant::now() + STORE_RETRY,
            delay: Duration::from_millis(25),
        }
    }

    /// Waits before the next attempt, or gives up with the error.
    async fn wait<E: std::fmt::Display>(&mut self, error: E) -> Result<(), ClusterError> {
        if Instant::now() + self.delay > self.deadline {
            return Err(ClusterError::Unavailable(error.to_string()));
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

/// Parses `WRS_NATS_URL`: comma-separated server URLs.
fn server_list(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("{u:?}: {e}"))
        })
        .collect()
}

/// Refuses a NATS whose `max_payload` cannot carry the largest client
/// message with its headers: such messages would vanish between nodes.
fn check_max_payload(max_payload: usize, max_message: usize) -> Result<(), ClusterError> {
    let needed = max_message + HEADER_ROOM;
    if max_payload >= needed {
        return Ok(());
    }
    Err(ClusterError::PayloadTooSmall {
        max_payload,
        max_message,
        needed,
        fits: max_payload.saturating_sub(HEADER_ROOM),
    })
}

/// Whether an existing bucket's settings differ from what this node wants
/// (the operator changed replicas or the heartbeat).
async fn settings_differ(store: &kv::Store, wanted: &kv::Config) -> bool {
    let Ok(status) = store.status().await else {
        return false;
    };
    let have = &status.info.config;
    have.num_replicas != wanted.num_replicas
        || have.max_age != wanted.max_age
        || have.max_messages_per_subject != wanted.history
}

/// Connects to NATS with the configured credentials, retrying until
/// `connect_timeout`. Once connected, the client reconnects by itself
/// (with back-off) for as long as the process runs.
async fn connect_nats(settings: &ClusterSettings) -> Result<async_nats::Client, ClusterError> {
    let error = |reason: String| ClusterError::Connect {
        urls: settings.urls.clone(),
        reason,
    };
    let deadline = Instant::now() + settings.connect_timeout;
    // A node never wants its own publications back: it delivers to its
    // own clients directly.
    let mut options = async_nats::ConnectOptions::new()
        .no_echo()
        .name(format!("wrs-{}", settings.node_id))
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .retry_on_initial_connect();
    if let Some(path) = &settings.credentials {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| error(format!("credentials file {}: {e}", path.display())))?;
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(ca) = &settings.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    let client = options
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => info!("NATS connected"),
                async_nats::Event::Disconnected => warn!("NATS disconnected; reconnecting"),
                other => info!(event = %other, "NATS event"),
            }
        })
        .connect(server_list(&settings.urls).map_err(error)?)
        .await
        .map_err(|e| error(e.to_string()))?;
    // With retry_on_initial_connect the client is returned at once and
    // keeps trying in the background: wait (bounded) until it is connected.
    let mut delay = Duration::from_millis(20);
    while client.connection_state() != State::Connected {
        if Instant::now() >= deadline {
            return Err(error(format!(
                "not reachable within {:?}",
                settings.connect_timeout
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserve(limit: Option<u32>) -> MemberChange {
        MemberChange::Reserve {
            limit,
            done: oneshot::channel().0,
        }
    }

    fn release(id: ClientId) -> MemberChange {
        MemberChange::Release {
            id,
            done: oneshot::channel().0,
        }
    }

    fn joined(outcome: &Result<Option<ClientId>, ReserveError>) -> ClientId {
        match outcome {
            Ok(Some(id)) => *id,
            other => panic!("expected a join, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_counts_every_join_against_the_limit_in_order() {
        let mut doc = MembersDoc::default();
        let mut outcomes = Vec::new();
        let batch = [reserve(Some(2)), reserve(Some(2)), reserve(Some(2))];
        assert!(apply_changes(&mut doc, "a", &batch, 1 << 20, &mut outcomes));
        assert_eq!(outcomes.len(), 3);
        let (first, second) = (joined(&outcomes[0]), joined(&outcomes[1]));
        assert_ne!(first, second);
        assert!(matches!(outcomes[2], Err(ReserveError::Full { limit: 2 })));
        assert_eq!(doc.len(), 2);
        // A leave earlier in the same batch frees the place for a join.
        let batch = [release(first), reserve(Some(2)), reserve(Some(2))];
        assert!(apply_changes(&mut doc, "b", &batch, 1 << 20, &mut outcomes));
        assert!(matches!(outcomes[0], Ok(None)));
        let third = joined(&outcomes[1]);
        assert!(matches!(outcomes[2], Err(ReserveError::Full { limit: 2 })));
        assert!(doc.contains(second) && doc.contains(third) && !doc.contains(first));
        assert_eq!(doc.nodes["b"].len(), 1);
    }

    #[test]
    fn nothing_changes_when_nothing_is_added_or_removed() {
        let mut doc = MembersDoc::default();
        let mut outcomes = Vec::new();
        let absent = ClientId::random();
        assert!(!apply_changes(
            &mut doc,
            "a",
            &[release(absent)],
            1 << 20,
            &mut outcomes
        ));
        assert!(matches!(outcomes[..], [Ok(None)]));
    }

    #[test]
    fn the_roster_never_outgrows_a_nats_message() {
        let mut doc = MembersDoc::default();
        let mut outcomes = Vec::new();
        let room = 4096;
        let size = |doc: &MembersDoc| serde_json::to_vec(doc).unwrap().len();
        // Batches of joins from two nodes until one is refused.
        let mut admitted = Vec::new();
        for round in 0.. {
            let node = if round % 2 == 0 { "node-a" } else { "node-b" };
            let batch: Vec<MemberChange> = (0..10).map(|_| reserve(None)).collect();
            apply_changes(&mut doc, node, &batch, room, &mut outcomes);
            assert!(size(&doc) <= room, "{} bytes", size(&doc));
            admitted.extend(
                outcomes
                    .iter()
                    .filter_map(|o| o.as_ref().ok().copied().flatten()),
            );
            if let Some(refused) = outcomes.iter().find(|o| o.is_err()) {
                // Refused only within a batch's worst case of the room,
                // and told how many clients the channel holds.
                assert!(size(&doc) + 10 * (MEMBER_JSON_MAX + node.len() + 8) > room);
                assert!(matches!(
                    refused,
                    Err(ReserveError::RosterFull { clients }) if *clients == doc.len()
                ));
                break;
            }
            assert!(round < 100, "never full");
        }
        assert_eq!(admitted.len(), doc.len());
        assert!(doc.len() > 60, "only {} fit in {room} bytes", doc.len());
        // A few leaves make room again.
        let leaves: Vec<MemberChange> = admitted[..3].iter().map(|id| release(*id)).collect();
        assert!(apply_changes(
            &mut doc,
            "node-a",
            &leaves,
            room,
            &mut outcomes
        ));
        assert!(apply_changes(
            &mut doc,
            "node-a",
            &[reserve(None)],
            room,
            &mut outcomes
        ));
        joined(&outcomes[0]);
        assert!(size(&doc) <= room);
    }
}
