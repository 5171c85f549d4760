//! The shared rosters (the `members` bucket): one document per channel
//! listing every client by node, from the moment its connect is accepted
//! until it leaves. `clientLimit` is checked inside the same
//! compare-and-set write that adds a client, so concurrent connects on any
//! nodes never exceed it.
//!
//! Each node writes a channel's document through one writer at a time:
//! joins, leaves, evictions and this node's reconciliation that arrive
//! while a write is in flight go out together in the next write (group
//! commit). Writes start from the document as last seen (the watch keeps
//! it current) and read it again only when another node wrote first. A
//! batch of k changes to a roster of n clients costs O(n + k).
//!
//! A document that cannot be decoded is never overwritten: joins and
//! leaves of that channel fail (503) and the error is logged and counted
//! until the document is repaired or the channel is deleted.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use rand::RngExt;
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::records::{ClusterRoster, Member, MembersDoc};
use super::store::{Seen, Versioned};
use super::{MISSED_HEARTBEATS, NatsCoordinator};
use crate::relay::channel::Channel;
use crate::relay::clock::{epoch_ms, from_epoch_ms};
use crate::relay::coordinator::{CoordinatorError, JoinRefusal, Listed};
use crate::relay::ids::{ChannelId, ClientId};

/// What a failed decode of a roster says.
const CORRUPT: &str = "the channel's roster cannot be read: joins and leaves of it fail until it is repaired or the channel is deleted";

/// Bytes of an empty document, `{"nodes":{}}`.
const EMPTY_DOC_BYTES: usize = 12;

/// Compare-and-set attempts before a batch gives up.
const CAS_ATTEMPTS: usize = 64;

/// The most one client adds to a members document's JSON:
/// `{"id":"XXXX-XXXX-XXXX","at":MS},` with a `u64` of up to 20 digits.
const MEMBER_JSON_MAX: usize = 50;

/// The latest version of a channel's members document that this node
/// knows. It is decoded only when needed — for routing, listing, writing —
/// and then once: a node with no client in a channel never decodes the
/// versions a burst of joins elsewhere writes, and a node never decodes
/// its own writes.
#[derive(Debug)]
pub(super) struct Version {
    revision: u64,
    /// Bytes of the stored document.
    size: usize,
    /// The stored document, until decoded.
    raw: Bytes,
    /// The document, or `None` if it cannot be decoded.
    doc: OnceLock<Option<Arc<MembersDoc>>>,
    roster: OnceLock<Arc<ClusterRoster>>,
}

impl Version {
    fn stored(revision: u64, raw: Bytes) -> Self {
        Self {
            revision,
            size: raw.len(),
            raw,
            doc: OnceLock::new(),
            roster: OnceLock::new(),
        }
    }

    fn written(revision: u64, size: usize, doc: MembersDoc) -> Self {
        Self {
            revision,
            size,
            raw: Bytes::new(),
            doc: OnceLock::from(Some(Arc::new(doc))),
            roster: OnceLock::new(),
        }
    }
}

/// Rosters and their writers.
#[derive(Debug, Default)]
pub(super) struct Membership {
    docs: DashMap<ChannelId, Arc<Version>>,
    /// Changes waiting for the next write of a channel's document. An entry
    /// exists while a writer task runs for the channel.
    queued: DashMap<ChannelId, Vec<Change>>,
}

/// A change of a channel's document by this node.
#[derive(Debug)]
enum Change {
    /// A new client of this node: its id, or why there is no place.
    Join {
        limit: Option<u32>,
        done: oneshot::Sender<Result<ClientId, JoinRefusal>>,
    },
    /// A client of this node left.
    Leave { id: ClientId },
    /// This node's entries are set to its real clients (read when the
    /// batch is written), keeping entries younger than `young_since`
    /// (ms since the epoch: joins whose upgrade is under way).
    Reconcile { young_since: u64 },
    /// Every client of `node` is removed.
    Evict {
        node: String,
        done: Option<oneshot::Sender<Result<usize, CoordinatorError>>>,
    },
}

/// What a change came to in the written document.
#[derive(Debug)]
enum Outcome {
    Joined(ClientId),
    Refused(JoinRefusal),
    Removed(usize),
    Done,
}

impl Change {
    fn answer(self, outcome: Outcome) {
        match (self, outcome) {
            (Change::Join { done, .. }, Outcome::Joined(id)) => {
                let _ = done.send(Ok(id));
            }
            (Change::Join { done, .. }, Outcome::Refused(refusal)) => {
                let _ = done.send(Err(refusal));
            }
            (
                Change::Evict {
                    done: Some(done), ..
                },
                Outcome::Removed(count),
            ) => {
                let _ = done.send(Ok(count));
            }
            _ => {}
        }
    }

    fn fail(self, error: &CoordinatorError) {
        match self {
            Change::Join { done, .. } => {
                let _ = done.send(Err(JoinRefusal::Unavailable(error.clone())));
            }
            Change::Evict {
                done: Some(done), ..
            } => {
                let _ = done.send(Err(error.clone()));
            }
            _ => {}
        }
    }
}

/// Applies a batch of changes, in order, to a document whose JSON is
/// `size` bytes and must stay within `room` (NATS's `max_payload`).
/// `local` gives this node's real clients for a reconciliation. Returns
/// whether the document changed and each change's outcome.
fn apply(
    doc: &mut MembersDoc,
    size: usize,
    node: &str,
    batch: &[Change],
    room: usize,
    local: &dyn Fn() -> Vec<Member>,
) -> (bool, Vec<Outcome>) {
    // Joins are counted at their largest, and this node's key as if it
    // were new for each: the document written is never larger than this.
    let grows_by = MEMBER_JSON_MAX + node.len() + 8;
    let mut size = size;
    let mut edit = doc.edit();
    let mut outcomes = Vec::with_capacity(batch.len());
    for change in batch {
        let outcome = match change {
            Change::Join { limit, .. } => {
                if limit.is_some_and(|limit| edit.len() >= limit as usize) {
                    Outcome::Refused(JoinRefusal::Full {
                        limit: limit.unwrap_or_default(),
                    })
                } else if size.saturating_add(grows_by) > room {
                    Outcome::Refused(JoinRefusal::RosterFull {
                        clients: edit.len(),
                    })
                } else {
                    let id = loop {
                        let id = ClientId::random();
                        if !edit.contains(id) {
                            break id;
                        }
                    };
                    edit.add(
                        node,
                        Member {
                            id,
                            at: epoch_ms(SystemTime::now()),
                        },
                    );
                    size += grows_by;
                    Outcome::Joined(id)
                }
            }
            Change::Leave { id } => {
                edit.remove(*id);
                Outcome::Done
            }
            Change::Reconcile { young_since } => {
                edit.set_node(node, &local(), |m| m.at >= *young_since);
                Outcome::Done
            }
            Change::Evict { node, .. } => Outcome::Removed(edit.remove_node(node)),
        };
        outcomes.push(outcome);
    }
    (edit.finish(), outcomes)
}

impl NatsCoordinator {
    /// Takes a place for a new client of this node in the shared roster.
    /// The channel's broadcasts are subscribed first, so nothing sent to
    /// the client once it is listed can be missed.
    pub(super) async fn join_channel(
        &self,
        channel: &Arc<Channel>,
    ) -> Result<ClientId, JoinRefusal> {
        self.ensure_interest(channel).await?;
        let (done, outcome) = oneshot::channel();
        self.queue_change(
            channel.id(),
            Change::Join {
                limit: channel.spec().client_limit,
                done,
            },
        );
        outcome.await.unwrap_or_else(|_| {
            Err(JoinRefusal::Unavailable(CoordinatorError::Unavailable(
                "the roster write was abandoned (stopping)".to_owned(),
            )))
        })
    }

    /// A place of this node was given up: the client is removed from the
    /// shared roster (without waiting), and the channel's subscription
    /// ends once this node has no clients in it.
    pub(super) fn leave_channel(&self, channel: &Arc<Channel>, id: Option<ClientId>) {
        // Without NATS the write would only wait out its retries: the
        // reconciliation repairs the roster once NATS is back (or, if this
        // node stops, the others evict it after missed heartbeats).
        if let Some(id) = id
            && self.is_connected()
        {
            self.queue_change(channel.id(), Change::Leave { id });
        }
        self.drop_interest_if_idle(channel);
    }

    /// Queues a change and starts the channel's writer unless one runs.
    fn queue_change(&self, channel: &ChannelId, change: Change) {
        match self.members.queued.entry(channel.clone()) {
            dashmap::Entry::Occupied(mut queue) => queue.get_mut().push(change),
            dashmap::Entry::Vacant(slot) => {
                slot.insert(vec![change]);
                let (Some(me), true) = (self.me(), self.tasks().is_some()) else {
                    if let Some((_, batch)) = self.members.queued.remove(channel) {
                        let error = CoordinatorError::Unavailable("not started".to_owned());
                        batch.into_iter().for_each(|c| c.fail(&error));
                    }
                    return;
                };
                // A task of its own: the connect that queued first may be
                // cancelled (its client hung up); the changes queued after
                // it must still be written.
                let channel = channel.clone();
                self.spawn(async move { me.write_queued(channel).await });
            }
        }
    }

    /// Writes a channel's queued changes, one write per batch, until none
    /// are left.
    async fn write_queued(&self, channel: ChannelId) {
        loop {
            let batch = match self.members.queued.entry(channel.clone()) {
                dashmap::Entry::Occupied(queue) if queue.get().is_empty() => {
                    queue.remove();
                    return;
                }
                dashmap::Entry::Occupied(mut queue) => std::mem::take(queue.get_mut()),
                dashmap::Entry::Vacant(_) => return,
            };
            match self.write_batch(&channel, &batch).await {
                Ok(outcomes) => {
                    for (change, outcome) in batch.into_iter().zip(outcomes) {
                        change.answer(outcome);
                    }
                }
                Err(error) => {
                    warn!(%channel, %error, "cannot write the channel's roster");
                    for change in batch {
                        change.fail(&error);
                    }
                }
            }
        }
    }

    /// Applies a batch to the channel's document with compare-and-set:
    /// from the document as last seen, read again after a conflict.
    async fn write_batch(
        &self,
        channel: &ChannelId,
        batch: &[Change],
    ) -> Result<Vec<Outcome>, CoordinatorError> {
        let room = self.store.client.server_info().max_payload;
        let local = || self.local_members(channel);
        let mut base = self.cached_base(channel);
        for attempt in 0..CAS_ATTEMPTS {
            let (mut doc, revision, size) = match base.take() {
                Some(base) => base,
                None => self.read_base(channel).await?,
            };
            let (changed, outcomes) = apply(&mut doc, size, &self.node, batch, room, &local);
            if !changed {
                return Ok(outcomes);
            }
            let written = if doc.is_empty() && revision != 0 {
                // The last client left: the document goes.
                self.store
                    .members
                    .delete(channel.as_str(), Some(revision))
                    .await?
                    .then(|| self.forget_roster(channel))
            } else {
                let bytes = super::store::Bucket::<MembersDoc>::encode(&doc)?;
                let size = bytes.len();
                self.store
                    .members
                    .update_encoded(channel.as_str(), bytes, revision)
                    .await?
                    .map(|revision| {
                        self.apply_roster(channel.clone(), revision, size, doc);
                    })
            };
            if written.is_some() {
                return Ok(outcomes);
            }
            // Another node wrote first: back off a little, read again.
            let jitter = rand::rng().random_range(0..=(1u64 << attempt.min(6)));
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        Err(CoordinatorError::Contention(channel.to_string()))
    }

    /// The document as last seen, to write over without reading it first;
    /// `None` when it must be read. A channel with no document yet is
    /// written with `create` (revision 0).
    fn cached_base(&self, channel: &ChannelId) -> Option<(MembersDoc, u64, usize)> {
        match self.version(channel) {
            Some(version) => self
                .doc_of(channel, &version)
                .map(|doc| (MembersDoc::clone(doc), version.revision, version.size)),
            None => Some((MembersDoc::default(), 0, EMPTY_DOC_BYTES)),
        }
    }

    async fn read_base(
        &self,
        channel: &ChannelId,
    ) -> Result<(MembersDoc, u64, usize), CoordinatorError> {
        match self.store.members.get(channel.as_str()).await {
            Ok(Some(Versioned {
                value,
                revision,
                size,
            })) => Ok((value, revision, size)),
            Ok(None) => Ok((MembersDoc::default(), 0, EMPTY_DOC_BYTES)),
            Err(error) => {
                if matches!(error, CoordinatorError::Corrupt { .. }) {
                    self.metrics.cluster.corrupt_records.inc();
                    error!(%channel, %error, "{CORRUPT}");
                }
                Err(error)
            }
        }
    }

    /// This node's real clients of the channel.
    fn local_members(&self, channel: &ChannelId) -> Vec<Member> {
        self.handle()
            .and_then(|handle| handle.channel(channel))
            .map(|channel| {
                channel
                    .clients()
                    .into_iter()
                    .map(|(id, at)| Member {
                        id,
                        at: epoch_ms(at),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records a document this node wrote.
    fn apply_roster(&self, channel: ChannelId, revision: u64, size: usize, doc: MembersDoc) {
        self.keep_newer(channel, Version::written(revision, size, doc));
    }

    /// Keeps `version` unless a newer one is held; returns whether it was kept.
    fn keep_newer(&self, channel: ChannelId, version: Version) -> bool {
        match self.members.docs.entry(channel) {
            dashmap::Entry::Occupied(mut held) => {
                if held.get().revision < version.revision {
                    held.insert(Arc::new(version));
                    true
                } else {
                    false
                }
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(Arc::new(version));
                true
            }
        }
    }

    fn version(&self, channel: &ChannelId) -> Option<Arc<Version>> {
        self.members.docs.get(channel).map(|v| Arc::clone(&v))
    }

    /// The version's document, decoded on first use; `None` (logged and
    /// counted, once per version) if it cannot be decoded.
    fn doc_of<'a>(&self, channel: &ChannelId, version: &'a Version) -> Option<&'a Arc<MembersDoc>> {
        version
            .doc
            .get_or_init(|| {
                match self
                    .store
                    .members
                    .decode(channel.as_str(), version.revision, &version.raw)
                {
                    Ok(doc) => Some(Arc::new(doc)),
                    Err(error) => {
                        self.metrics.cluster.corrupt_records.inc();
                        error!(%channel, %error, "{CORRUPT}");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The channel's document as last seen, if it can be read.
    fn doc(&self, channel: &ChannelId) -> Option<Arc<MembersDoc>> {
        let version = self.version(channel)?;
        self.doc_of(channel, &version).cloned()
    }

    pub(super) fn forget_roster(&self, channel: &ChannelId) {
        self.members.docs.remove(channel);
    }

    /// The revision of the channel's document, if this node knows one.
    pub(super) fn roster_revision(&self, channel: &ChannelId) -> Option<u64> {
        self.members.docs.get(channel).map(|v| v.revision)
    }

    /// The channel's cluster roster for routing, and whether other nodes
    /// have clients in it.
    pub(super) fn roster(&self, channel: &ChannelId) -> Option<(Arc<ClusterRoster>, bool)> {
        let version = self.version(channel)?;
        let doc = self.doc_of(channel, &version)?;
        let roster = version
            .roster
            .get_or_init(|| Arc::new(ClusterRoster::of(doc)));
        Some((Arc::clone(roster), doc.has_others(&self.node)))
    }

    pub(super) fn listed(&self, channel: &ChannelId) -> Option<Vec<Listed>> {
        let doc = self.doc(channel)?;
        Some(
            doc.nodes
                .iter()
                .flat_map(|(node, members)| {
                    members.iter().map(move |m| Listed {
                        id: m.id,
                        node: Some(node.clone()),
                        connected_at: from_epoch_ms(m.at),
                    })
                })
                .collect(),
        )
    }

    pub(super) fn listed_count(&self, channel: &ChannelId) -> Option<usize> {
        self.doc(channel).map(|doc| doc.len())
    }

    /// Every readable document as last seen.
    fn all_docs(&self) -> Vec<(ChannelId, Arc<MembersDoc>)> {
        let versions: Vec<(ChannelId, Arc<Version>)> = self
            .members
            .docs
            .iter()
            .map(|entry| (entry.key().clone(), Arc::clone(entry.value())))
            .collect();
        versions
            .into_iter()
            .filter_map(|(channel, version)| {
                let doc = self.doc_of(&channel, &version)?.clone();
                Some((channel, doc))
            })
            .collect()
    }

    /// Nodes other than this one that appear in some roster.
    pub(super) fn rostered_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .all_docs()
            .iter()
            .flat_map(|(_, doc)| doc.nodes.keys().cloned().collect::<Vec<_>>())
            .filter(|n| *n != *self.node)
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Removes every client of `node` from every roster that lists it;
    /// returns how many were removed.
    ///
    /// # Errors
    ///
    /// The first channel whose roster could not be written.
    pub(super) async fn remove_node_members(&self, node: &str) -> Result<usize, CoordinatorError> {
        let channels: Vec<ChannelId> = self
            .all_docs()
            .into_iter()
            .filter(|(_, doc)| doc.nodes.contains_key(node))
            .map(|(channel, _)| channel)
            .collect();
        let mut outcomes = Vec::with_capacity(channels.len());
        for channel in &channels {
            let (done, outcome) = oneshot::channel();
            self.queue_change(
                channel,
                Change::Evict {
                    node: node.to_owned(),
                    done: Some(done),
                },
            );
            outcomes.push(outcome);
        }
        let mut removed = 0;
        for outcome in outcomes {
            removed += outcome
                .await
                .unwrap_or_else(|_| Err(CoordinatorError::Unavailable("stopping".to_owned())))?;
        }
        Ok(removed)
    }

    /// Makes this node's entries in every roster match its real clients
    /// (lost writes, evictions during a partition, leaves not written while
    /// NATS was away). Compares with the documents as last seen and queues
    /// a reconciliation only where they differ; the reconciliation itself
    /// reads the real clients when it is written, so it can never undo a
    /// join or a leave that happens meanwhile.
    pub(super) fn reconcile(&self) {
        let Some(handle) = self.handle() else {
            return;
        };
        let young_since = epoch_ms(SystemTime::now())
            .saturating_sub(2 * self.heartbeat.as_millis() as u64 * u64::from(MISSED_HEARTBEATS));
        let mut channels: HashSet<ChannelId> = handle
            .channels()
            .iter()
            .filter(|c| !c.is_idle_here())
            .map(|c| c.id().clone())
            .collect();
        for (channel, doc) in self.all_docs() {
            if !doc.of(&self.node).is_empty() {
                channels.insert(channel);
            }
        }
        for channel in channels {
            let local: HashSet<ClientId> =
                self.local_members(&channel).iter().map(|m| m.id).collect();
            let listed: HashSet<ClientId> = match self.version(&channel) {
                Some(version) => match self.doc_of(&channel, &version) {
                    Some(doc) => doc.of(&self.node).iter().map(|m| m.id).collect(),
                    None => continue,
                },
                None => HashSet::new(),
            };
            if local != listed {
                self.queue_change(&channel, Change::Reconcile { young_since });
            }
        }
    }

    /// Applies what the watch of the `members` bucket reports. A version
    /// is decoded at once only where it is needed soon: on a node with
    /// clients in the channel (it routes their messages).
    pub(super) fn on_roster(&self, seen: Seen) {
        match seen {
            Seen::Value {
                key, revision, raw, ..
            } => {
                let Some(channel) = ChannelId::parse(&key) else {
                    return;
                };
                // This node's own writes are held already.
                if !self.keep_newer(channel.clone(), Version::stored(revision, raw)) {
                    return;
                }
                let held = self.handle().and_then(|handle| handle.channel(&channel));
                match held {
                    Some(held) if !held.is_idle_here() => {
                        if let Some(version) = self.version(&channel) {
                            self.doc_of(&channel, &version);
                        }
                    }
                    Some(_) => {}
                    None => self.check_orphan(super::Kind::Members, channel, revision),
                }
            }
            Seen::Removed { key, .. } => {
                if let Some(channel) = ChannelId::parse(&key) {
                    self.forget_roster(&channel);
                }
            }
            Seen::Current | Seen::Restarting => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(limit: Option<u32>) -> Change {
        Change::Join {
            limit,
            done: oneshot::channel().0,
        }
    }

    fn joined(outcome: &Outcome) -> ClientId {
        match outcome {
            Outcome::Joined(id) => *id,
            other => panic!("expected a join, got {other:?}"),
        }
    }

    fn size(doc: &MembersDoc) -> usize {
        serde_json::to_vec(doc).unwrap().len()
    }

    /// `apply` to a document of its real size.
    fn apply_sized(
        doc: &mut MembersDoc,
        node: &str,
        batch: &[Change],
        room: usize,
        local: &dyn Fn() -> Vec<Member>,
    ) -> (bool, Vec<Outcome>) {
        let bytes = size(doc);
        apply(doc, bytes, node, batch, room, local)
    }

    fn nobody() -> Vec<Member> {
        Vec::new()
    }

    #[test]
    fn a_batch_counts_every_join_against_the_limit_in_order() {
        let mut doc = MembersDoc::default();
        let batch = [join(Some(2)), join(Some(2)), join(Some(2))];
        let (changed, outcomes) = apply(&mut doc, 2, "a", &batch, 1 << 20, &nobody);
        assert!(changed);
        let (first, second) = (joined(&outcomes[0]), joined(&outcomes[1]));
        assert_ne!(first, second);
        assert!(matches!(
            outcomes[2],
            Outcome::Refused(JoinRefusal::Full { limit: 2 })
        ));
        assert_eq!(doc.len(), 2);
        // A leave earlier in the same batch frees the place for a join.
        let batch = [Change::Leave { id: first }, join(Some(2)), join(Some(2))];
        let (changed, outcomes) = apply_sized(&mut doc, "b", &batch, 1 << 20, &nobody);
        assert!(changed);
        let third = joined(&outcomes[1]);
        assert!(matches!(
            outcomes[2],
            Outcome::Refused(JoinRefusal::Full { limit: 2 })
        ));
        let ids: Vec<ClientId> = doc.nodes.values().flatten().map(|m| m.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&second) && ids.contains(&third) && !ids.contains(&first));
        assert_eq!(doc.nodes["b"].len(), 1);
    }

    #[test]
    fn nothing_changes_when_nothing_is_added_or_removed() {
        let mut doc = MembersDoc::default();
        let batch = [Change::Leave {
            id: ClientId::random(),
        }];
        let (changed, _) = apply(&mut doc, 2, "a", &batch, 1 << 20, &nobody);
        assert!(!changed);
    }

    #[test]
    fn the_roster_never_outgrows_a_nats_message() {
        let mut doc = MembersDoc::default();
        let room = 4096;
        let mut admitted = Vec::new();
        for round in 0.. {
            let node = if round % 2 == 0 { "node-a" } else { "node-b" };
            let batch: Vec<Change> = (0..10).map(|_| join(None)).collect();
            let (_, outcomes) = apply_sized(&mut doc, node, &batch, room, &nobody);
            assert!(size(&doc) <= room, "{} bytes", size(&doc));
            admitted.extend(outcomes.iter().filter_map(|o| match o {
                Outcome::Joined(id) => Some(*id),
                _ => None,
            }));
            if let Some(refused) = outcomes.iter().find(|o| matches!(o, Outcome::Refused(_))) {
                // Refused only within a batch's worst case of the room,
                // and told how many clients the channel holds.
                assert!(size(&doc) + 10 * (MEMBER_JSON_MAX + node.len() + 8) > room);
                assert!(matches!(
                    refused,
                    Outcome::Refused(JoinRefusal::RosterFull { clients }) if *clients == doc.len()
                ));
                break;
            }
            assert!(round < 100, "never full");
        }
        assert_eq!(admitted.len(), doc.len());
        assert!(doc.len() > 60, "only {} fit in {room} bytes", doc.len());
        // A few leaves make room again.
        let leaves: Vec<Change> = admitted[..3]
            .iter()
            .map(|&id| Change::Leave { id })
            .collect();
        assert!(apply_sized(&mut doc, "node-a", &leaves, room, &nobody).0);
        let (_, outcomes) = apply_sized(&mut doc, "node-a", &[join(None)], room, &nobody);
        joined(&outcomes[0]);
        assert!(size(&doc) <= room);
    }

    #[test]
    fn a_reconciliation_in_a_batch_keeps_the_joins_before_it() {
        let mut doc = MembersDoc::default();
        let stale = ClientId::random();
        doc.edit().add("a", Member { id: stale, at: 1 });
        let real = Member {
            id: ClientId::random(),
            at: 2,
        };
        let local = move || vec![real];
        // A join (under way: not a real client yet) and a reconciliation
        // in the same batch: the join stays, the stale entry goes, the
        // real client is listed.
        let young_since = epoch_ms(SystemTime::now()) - 1000;
        let batch = [join(None), Change::Reconcile { young_since }];
        let (changed, outcomes) = apply_sized(&mut doc, "a", &batch, 1 << 20, &local);
        assert!(changed);
        let new = joined(&outcomes[0]);
        let ids: HashSet<ClientId> = doc.of("a").iter().map(|m| m.id).collect();
        assert_eq!(ids, HashSet::from([new, real.id]));
    }

    #[test]
    fn an_eviction_removes_only_that_node() {
        let mut doc = MembersDoc::default();
        let mut edit = doc.edit();
        edit.add(
            "a",
            Member {
                id: ClientId::from_raw(1),
                at: 1,
            },
        );
        edit.add(
            "b",
            Member {
                id: ClientId::from_raw(2),
                at: 1,
            },
        );
        edit.add(
            "b",
            Member {
                id: ClientId::from_raw(3),
                at: 1,
            },
        );
        edit.finish();
        let batch = [Change::Evict {
            node: "b".to_owned(),
            done: None,
        }];
        let (changed, outcomes) = apply_sized(&mut doc, "a", &batch, 1 << 20, &nobody);
        assert!(changed);
        assert!(matches!(outcomes[0], Outcome::Removed(2)));
        assert_eq!(doc.len(), 1);
    }

    #[test]
    fn write_payload_is_json() {
        let doc = MembersDoc::default();
        let bytes: Bytes = super::super::store::Bucket::<MembersDoc>::encode(&doc).unwrap();
        assert_eq!(&bytes[..], br#"{"nodes":{}}"#);
    }
}
