//! The shared rosters: every client of every channel, by node, from the
//! moment its connect is accepted until it leaves.
//!
//! A channel's roster is made of segments (the `rosters` bucket, key
//! `<channel>.<node>.<seq>`), each up to [`SEGMENT`] clients of one node in
//! join order. A node writes only its own segments, so nodes never contend
//! for a write, and a write carries at most one segment, however large the
//! channel: joins go to the node's last segment (a new one when it is
//! full), a leave rewrites the segment that lists the client.
//!
//! A channel with a `clientLimit` also has a count per node (the `counts`
//! bucket). A node raises its count with compare-and-set — the limit
//! checked against the sum, in the same write — before it lists new
//! clients, and lowers it after they are gone, so concurrent connects on
//! any nodes never exceed the limit.
//!
//! Each node writes a channel's changes through one writer at a time:
//! joins, leaves, evictions and reconciliations that arrive while a write
//! is in flight go out together in the next one (group commit). A batch of
//! k changes to a node's part of n clients costs O(n + k) in memory and
//! one write per segment it touches.
//!
//! A segment that cannot be decoded is never overwritten: joins and leaves
//! of its channel fail (503) and it is logged and counted until it is
//! repaired or the channel is deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use rand::RngExt;
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::records::{
    ClusterRoster, Counts, Member, SEGMENT, Segment, parse_segment_key, segment_key,
};
use super::store::{Seen, Versioned};
use super::{MISSED_HEARTBEATS, NatsCoordinator};
use crate::relay::channel::Channel;
use crate::relay::client::Transport;
use crate::relay::clock::{epoch_ms, from_epoch_ms};
use crate::relay::coordinator::{CoordinatorError, JoinRefusal, Listed};
use crate::relay::ids::{ChannelId, ClientId};

/// What a failed decode of a roster segment says.
const CORRUPT: &str = "a segment of the channel's roster cannot be read: joins and leaves of the channel fail until it is repaired or the channel is deleted";

/// Attempts at a batch whose count was changed meanwhile by another node.
const CAS_ATTEMPTS: usize = 64;

/// One segment as last seen: `None` if it cannot be decoded.
#[derive(Clone, Debug)]
struct Seg {
    revision: u64,
    members: Option<Arc<Segment>>,
}

/// A channel's roster as this node knows it.
#[derive(Debug, Default)]
struct Known {
    /// Segments by (node, number): the order of the cluster roster.
    segments: BTreeMap<(String, u32), Seg>,
    /// Every client listed, kept with the segments.
    ids: HashSet<ClientId>,
    /// Per-node counts, for a channel with a `clientLimit`.
    counts: Option<Versioned<Counts>>,
    /// Segments that cannot be decoded.
    corrupt: usize,
    /// The roster for routing, built on first use after a change.
    built: Option<(Arc<ClusterRoster>, Arc<HashSet<String>>)>,
}

impl Known {
    /// Puts a segment in (newer revisions win); returns whether it changed.
    fn put(&mut self, node: &str, seq: u32, seg: Seg) -> bool {
        let key = (node.to_owned(), seq);
        if self
            .segments
            .get(&key)
            .is_some_and(|held| held.revision >= seg.revision)
        {
            return false;
        }
        self.take(&key);
        match &seg.members {
            Some(members) => self.ids.extend(members.iter().map(|m| m.id)),
            None => self.corrupt += 1,
        }
        self.segments.insert(key, seg);
        self.built = None;
        true
    }

    /// Takes a segment out.
    fn take(&mut self, key: &(String, u32)) -> Option<Seg> {
        let old = self.segments.remove(key)?;
        match &old.members {
            Some(members) => {
                for m in members.iter() {
                    self.ids.remove(&m.id);
                }
            }
            None => self.corrupt -= 1,
        }
        self.built = None;
        Some(old)
    }

    /// The segments of `node`, by number.
    fn of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = (u32, &'a Seg)> + 'a {
        self.segments
            .range((node.to_owned(), 0)..=(node.to_owned(), u32::MAX))
            .map(|((_, seq), seg)| (*seq, seg))
    }

    fn nodes(&self) -> impl Iterator<Item = &str> {
        self.segments
            .iter()
            .filter(|(_, seg)| seg.members.as_ref().is_some_and(|m| !m.is_empty()))
            .map(|((node, _), _)| node.as_str())
    }

    fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.counts.is_none()
    }
}

/// Rosters and their writers.
#[derive(Debug, Default)]
pub(super) struct Membership {
    known: DashMap<ChannelId, Known>,
    /// Changes waiting for the next write of a channel's roster by this
    /// node. An entry exists while a writer task runs for the channel.
    queued: DashMap<ChannelId, Vec<Change>>,
}

/// A change of a channel's roster by this node.
#[derive(Debug)]
enum Change {
    /// A new client of this node: its id, or why there is no place.
    Join {
        limit: Option<u32>,
        sse: bool,
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

/// What a change came to.
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

/// This node's part of a channel's roster while a batch is applied: its
/// segments by number, which of them changed, and where each client is.
#[derive(Debug, Default)]
struct Part {
    segments: BTreeMap<u32, (u64, Segment)>,
    changed: HashSet<u32>,
    /// Segment of each client; built when a batch first needs it (O(n)).
    index: Option<HashMap<ClientId, u32>>,
    len: usize,
}

impl Part {
    fn new(segments: BTreeMap<u32, (u64, Segment)>) -> Self {
        let len = segments.values().map(|(_, s)| s.len()).sum();
        Self {
            segments,
            len,
            ..Self::default()
        }
    }

    fn index(&mut self) -> &mut HashMap<ClientId, u32> {
        self.index.get_or_insert_with(|| {
            self.segments
                .iter()
                .flat_map(|(seq, (_, members))| members.iter().map(move |m| (m.id, *seq)))
                .collect()
        })
    }

    /// Lists a client in the last segment, or a new one when it is full.
    fn add(&mut self, member: Member) {
        let seq = match self.segments.last_key_value() {
            Some((seq, (_, members))) if members.len() < SEGMENT => *seq,
            Some((seq, _)) => seq + 1,
            None => 0,
        };
        self.segments.entry(seq).or_default().1.push(member);
        self.changed.insert(seq);
        if let Some(index) = &mut self.index {
            index.insert(member.id, seq);
        }
        self.len += 1;
    }

    /// Removes several clients at once; returns how many were listed.
    fn remove_all(&mut self, ids: &HashSet<ClientId>) -> usize {
        if ids.is_empty() {
            return 0;
        }
        let mut by_segment: HashMap<u32, usize> = HashMap::new();
        let index = self.index();
        for id in ids {
            if let Some(seq) = index.remove(id) {
                *by_segment.entry(seq).or_default() += 1;
            }
        }
        let mut removed = 0;
        for (seq, count) in by_segment {
            if let Some((_, members)) = self.segments.get_mut(&seq) {
                members.retain(|m| !ids.contains(&m.id));
                self.changed.insert(seq);
                removed += count;
            }
        }
        self.len -= removed;
        removed
    }

    fn members(&self) -> impl Iterator<Item = &Member> {
        self.segments
            .values()
            .flat_map(|(_, members)| members.iter())
    }
}

/// A batch applied to this node's part: the outcomes, and the ids drawn.
fn apply(
    part: &mut Part,
    others: u64,
    batch: &[Change],
    local: &dyn Fn() -> Vec<Member>,
    listed: &dyn Fn(ClientId) -> bool,
) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut leaving: HashSet<ClientId> = HashSet::new();
    let flush = |part: &mut Part, leaving: &mut HashSet<ClientId>| {
        part.remove_all(leaving);
        leaving.clear();
    };
    for change in batch {
        let outcome = match change {
            Change::Join { limit, sse, .. } => {
                flush(part, &mut leaving);
                let total = others + part.len as u64;
                match limit {
                    Some(limit) if total >= u64::from(*limit) => {
                        Outcome::Refused(JoinRefusal::Full { limit: *limit })
                    }
                    _ => {
                        let id = loop {
                            let id = ClientId::random();
                            if !listed(id) && !part.index().contains_key(&id) {
                                break id;
                            }
                        };
                        part.add(Member {
                            id,
                            at: epoch_ms(SystemTime::now()),
                            sse: *sse,
                        });
                        Outcome::Joined(id)
                    }
                }
            }
            Change::Leave { id } => {
                leaving.insert(*id);
                Outcome::Done
            }
            Change::Reconcile { young_since } => {
                flush(part, &mut leaving);
                let real = local();
                let real_ids: HashSet<ClientId> = real.iter().map(|m| m.id).collect();
                let stale: HashSet<ClientId> = part
                    .members()
                    .filter(|m| !real_ids.contains(&m.id) && m.at < *young_since)
                    .map(|m| m.id)
                    .collect();
                part.remove_all(&stale);
                let index = part.index();
                let missing: Vec<Member> = real
                    .into_iter()
                    .filter(|m| !index.contains_key(&m.id))
                    .collect();
                for member in missing {
                    part.add(member);
                }
                Outcome::Done
            }
            Change::Evict { .. } => Outcome::Done,
        };
        outcomes.push(outcome);
    }
    flush(part, &mut leaving);
    outcomes
}

impl NatsCoordinator {
    /// Takes a place for a new client of this node in the shared roster.
    /// The channel's broadcasts are subscribed first, so nothing sent to
    /// the client once it is listed can be missed.
    pub(super) async fn join_channel(
        &self,
        channel: &Arc<Channel>,
        transport: Transport,
    ) -> Result<ClientId, JoinRefusal> {
        self.ensure_interest(channel).await?;
        let (done, outcome) = oneshot::channel();
        self.queue_change(
            channel.id(),
            Change::Join {
                limit: channel.spec().client_limit,
                sse: transport == Transport::Sse,
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

    /// Writes a channel's queued changes, batch after batch, until none
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
            let evictions: Vec<&str> = batch
                .iter()
                .filter_map(|c| match c {
                    Change::Evict { node, .. } => Some(node.as_str()),
                    _ => None,
                })
                .collect();
            let evicted = match evictions.is_empty() {
                true => Ok(HashMap::new()),
                false => self.evict_segments(&channel, &evictions).await,
            };
            let written = match evicted {
                Ok(evicted) => self
                    .write_batch(&channel, &batch)
                    .await
                    .map(|mut outcomes| {
                        for (change, outcome) in batch.iter().zip(outcomes.iter_mut()) {
                            if let Change::Evict { node, .. } = change {
                                *outcome =
                                    Outcome::Removed(evicted.get(node).copied().unwrap_or(0));
                            }
                        }
                        outcomes
                    }),
                Err(error) => Err(error),
            };
            match written {
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

    /// The channel's `clientLimit`, if this node holds the channel.
    fn limit_of(&self, channel: &ChannelId) -> Option<u32> {
        self.handle()?.channel(channel)?.spec().client_limit
    }

    /// Applies a batch to this node's part of the roster: raises this
    /// node's count first (limited channels), writes the segments that
    /// changed, then lowers the count.
    async fn write_batch(
        &self,
        channel: &ChannelId,
        batch: &[Change],
    ) -> Result<Vec<Outcome>, CoordinatorError> {
        let needs_part = batch.iter().any(|c| !matches!(c, Change::Evict { .. }));
        if !needs_part {
            return Ok(batch.iter().map(|_| Outcome::Done).collect());
        }
        let limited = self.limit_of(channel).is_some()
            || batch
                .iter()
                .any(|c| matches!(c, Change::Join { limit: Some(_), .. }));
        let local = || self.local_members(channel);
        for attempt in 0..CAS_ATTEMPTS {
            let (segments, counts) = self.snapshot(channel)?;
            let mut part = Part::new(segments);
            let counted = counts
                .as_ref()
                .and_then(|c| c.value.nodes.get(&*self.node).copied())
                .unwrap_or(0) as usize;
            let others = counts.as_ref().map_or(0, |c| {
                c.value.total() - u64::from(*c.value.nodes.get(&*self.node).unwrap_or(&0))
            });
            let listed = |id| self.is_listed(channel, id);
            let outcomes = apply(&mut part, others, batch, &local, &listed);
            let after = part.len;
            // A limited channel's count goes up before its clients are
            // listed: the limit is checked in this write.
            if limited
                && after > counted
                && !self.set_count(channel, counts.as_ref(), after).await?
            {
                back_off(attempt).await;
                continue;
            }
            if !self.write_segments(channel, &part).await? {
                // This node's view of its own segments was stale (its
                // watch lagged, or another node evicted it meanwhile): it
                // was refreshed; apply the batch again. Clients a segment
                // written before the conflict lists twice are repaired by
                // the reconciliation.
                back_off(attempt).await;
                continue;
            }
            if limited && after < counted {
                // Lowered after the clients are gone; a lost race is
                // repaired by the next reconciliation.
                let counts = self.snapshot(channel)?.1;
                let _ = self.set_count(channel, counts.as_ref(), after).await;
            }
            return Ok(outcomes);
        }
        Err(CoordinatorError::Contention(channel.to_string()))
    }

    /// This node's segments of the channel and the counts, as last seen.
    ///
    /// # Errors
    ///
    /// `Corrupt` when a segment of the channel cannot be decoded.
    #[allow(clippy::type_complexity)]
    fn snapshot(
        &self,
        channel: &ChannelId,
    ) -> Result<(BTreeMap<u32, (u64, Segment)>, Option<Versioned<Counts>>), CoordinatorError> {
        let Some(known) = self.members.known.get(channel) else {
            return Ok((BTreeMap::new(), None));
        };
        if known.corrupt > 0 {
            self.metrics.cluster.corrupt_records.inc();
            error!(%channel, "{CORRUPT}");
            return Err(CoordinatorError::Corrupt {
                what: format!("the roster of channel {channel}"),
                reason: "a segment does not decode".to_owned(),
            });
        }
        let segments = known
            .of(&self.node)
            .filter_map(|(seq, seg)| {
                Some((seq, (seg.revision, Segment::clone(seg.members.as_ref()?))))
            })
            .collect();
        Ok((segments, known.counts.clone()))
    }

    fn is_listed(&self, channel: &ChannelId, id: ClientId) -> bool {
        self.members
            .known
            .get(channel)
            .is_some_and(|known| known.ids.contains(&id))
    }

    /// Sets this node's count of the channel to `count`, unless the counts
    /// changed since `seen` or the limit would be passed (`false`: read
    /// again and retry).
    async fn set_count(
        &self,
        channel: &ChannelId,
        seen: Option<&Versioned<Counts>>,
        count: usize,
    ) -> Result<bool, CoordinatorError> {
        let mut counts = seen.map(|c| c.value.clone()).unwrap_or_default();
        let revision = seen.map_or(0, |c| c.revision);
        if count == 0 {
            counts.nodes.remove(&*self.node);
        } else {
            counts.nodes.insert(self.node.to_string(), count as u32);
        }
        let written = self
            .store
            .counts
            .update(channel.as_str(), &counts, revision)
            .await?;
        match written {
            Some(revision) => {
                let size = counts.nodes.len();
                let mut known = self.members.known.entry(channel.clone()).or_default();
                if known.counts.as_ref().is_none_or(|c| c.revision < revision) {
                    known.counts = Some(Versioned {
                        value: counts,
                        revision,
                        size,
                    });
                }
                Ok(true)
            }
            None => {
                // Someone else wrote first: take the counts as they are.
                let fresh = self.store.counts.get(channel.as_str()).await?;
                let mut known = self.members.known.entry(channel.clone()).or_default();
                known.counts = fresh;
                Ok(false)
            }
        }
    }

    /// Writes the segments of `part` that changed (deleting empty ones)
    /// and records them as seen. `false` when a segment had moved on (this
    /// node's view of it was stale): it is read again.
    async fn write_segments(
        &self,
        channel: &ChannelId,
        part: &Part,
    ) -> Result<bool, CoordinatorError> {
        for seq in &part.changed {
            let Some((revision, members)) = part.segments.get(seq) else {
                continue;
            };
            let key = segment_key(channel, &self.node, *seq);
            if members.is_empty() {
                if *revision != 0 && !self.store.rosters.delete(&key, Some(*revision)).await? {
                    self.refresh_segment(channel, *seq).await?;
                    return Ok(false);
                }
                self.forget_segment(channel, &self.node, *seq);
                continue;
            }
            let written = self.store.rosters.update(&key, members, *revision).await?;
            let Some(revision) = written else {
                self.refresh_segment(channel, *seq).await?;
                return Ok(false);
            };
            let seg = Seg {
                revision,
                members: Some(Arc::new(members.clone())),
            };
            self.members
                .known
                .entry(channel.clone())
                .or_default()
                .put(&self.node, *seq, seg);
        }
        Ok(true)
    }

    /// Reads one of this node's segments again into the roster.
    async fn refresh_segment(&self, channel: &ChannelId, seq: u32) -> Result<(), CoordinatorError> {
        let key = segment_key(channel, &self.node, seq);
        match self.store.rosters.get(&key).await? {
            Some(found) => {
                let seg = Seg {
                    revision: found.revision,
                    members: Some(Arc::new(found.value)),
                };
                self.members
                    .known
                    .entry(channel.clone())
                    .or_default()
                    .put(&self.node, seq, seg);
            }
            None => self.forget_segment(channel, &self.node, seq),
        }
        Ok(())
    }

    /// Deletes every segment (and the count) of the evicted nodes; returns
    /// how many clients each had listed.
    async fn evict_segments(
        &self,
        channel: &ChannelId,
        nodes: &[&str],
    ) -> Result<HashMap<String, usize>, CoordinatorError> {
        let mut evicted = HashMap::new();
        for node in nodes {
            let segments: Vec<(u32, u64, usize)> = match self.members.known.get(channel) {
                Some(known) => known
                    .of(node)
                    .map(|(seq, seg)| {
                        (
                            seq,
                            seg.revision,
                            seg.members.as_ref().map_or(0, |m| m.len()),
                        )
                    })
                    .collect(),
                None => Vec::new(),
            };
            let mut count = 0;
            for (seq, revision, len) in segments {
                self.store
                    .rosters
                    .delete(&segment_key(channel, node, seq), Some(revision))
                    .await?;
                self.forget_segment(channel, node, seq);
                count += len;
            }
            evicted.insert((*node).to_owned(), count);
            // Its count goes too (places held for its clients are free).
            for _ in 0..CAS_ATTEMPTS {
                let counts = self
                    .members
                    .known
                    .get(channel)
                    .and_then(|k| k.counts.clone());
                let Some(counts) = counts.filter(|c| c.value.nodes.contains_key(*node)) else {
                    break;
                };
                let mut value = counts.value.clone();
                value.nodes.remove(*node);
                match self
                    .store
                    .counts
                    .update(channel.as_str(), &value, counts.revision)
                    .await?
                {
                    Some(revision) => {
                        let size = value.nodes.len();
                        if let Some(mut known) = self.members.known.get_mut(channel) {
                            known.counts = Some(Versioned {
                                value,
                                revision,
                                size,
                            });
                        }
                        break;
                    }
                    None => {
                        let fresh = self.store.counts.get(channel.as_str()).await?;
                        if let Some(mut known) = self.members.known.get_mut(channel) {
                            known.counts = fresh;
                        }
                    }
                }
            }
        }
        Ok(evicted)
    }

    fn forget_segment(&self, channel: &ChannelId, node: &str, seq: u32) {
        if let Some(mut known) = self.members.known.get_mut(channel) {
            known.take(&(node.to_owned(), seq));
        }
        self.members
            .known
            .remove_if(channel, |_, known| known.is_empty());
    }

    /// This node's real clients of the channel.
    fn local_members(&self, channel: &ChannelId) -> Vec<Member> {
        self.handle()
            .and_then(|handle| handle.channel(channel))
            .map(|channel| {
                channel
                    .clients()
                    .into_iter()
                    .map(|(id, at, transport)| Member {
                        id,
                        at: epoch_ms(at),
                        sse: transport == Transport::Sse,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn forget_roster(&self, channel: &ChannelId) {
        self.members.known.remove(channel);
    }

    /// The keys this node knows for the channel in the `rosters` and
    /// `counts` buckets (what an ended channel leaves to clean up).
    pub(super) fn roster_keys(&self, channel: &ChannelId) -> (Vec<(String, u64)>, Option<u64>) {
        let Some(known) = self.members.known.get(channel) else {
            return (Vec::new(), None);
        };
        let segments = known
            .segments
            .iter()
            .map(|((node, seq), seg)| (segment_key(channel, node, *seq), seg.revision))
            .collect();
        (segments, known.counts.as_ref().map(|c| c.revision))
    }

    /// The channel's cluster roster for routing, and whether other nodes
    /// have clients in it.
    pub(super) fn roster(&self, channel: &ChannelId) -> Option<(Arc<ClusterRoster>, bool)> {
        let built = {
            let known = self.members.known.get(channel)?;
            if known.segments.is_empty() {
                return None;
            }
            known.built.clone()
        };
        let (roster, nodes) = match built {
            Some(built) => built,
            None => {
                let mut known = self.members.known.get_mut(channel)?;
                let roster = Arc::new(ClusterRoster::of(known.segments.iter().filter_map(
                    |((node, _), seg)| Some((node.as_str(), seg.members.as_deref()?.as_slice())),
                )));
                let nodes: Arc<HashSet<String>> =
                    Arc::new(known.nodes().map(str::to_owned).collect());
                known.built = Some((Arc::clone(&roster), Arc::clone(&nodes)));
                (roster, nodes)
            }
        };
        let others = nodes.iter().any(|n| *n != *self.node);
        Some((roster, others))
    }

    pub(super) fn listed(&self, channel: &ChannelId) -> Option<Vec<Listed>> {
        let known = self.members.known.get(channel)?;
        if known.segments.is_empty() {
            return None;
        }
        Some(
            known
                .segments
                .iter()
                .filter_map(|((node, _), seg)| Some((node, seg.members.as_ref()?)))
                .flat_map(|(node, members)| {
                    members.iter().map(move |m| Listed {
                        id: m.id,
                        node: Some(node.clone()),
                        connected_at: from_epoch_ms(m.at),
                        transport: if m.sse {
                            Transport::Sse
                        } else {
                            Transport::WebSocket
                        },
                    })
                })
                .collect(),
        )
    }

    pub(super) fn listed_count(&self, channel: &ChannelId) -> Option<usize> {
        let known = self.members.known.get(channel)?;
        (!known.segments.is_empty()).then_some(known.ids.len())
    }

    /// Nodes other than this one that appear in some roster.
    pub(super) fn rostered_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .members
            .known
            .iter()
            .flat_map(|entry| entry.nodes().map(str::to_owned).collect::<Vec<_>>())
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
            .members
            .known
            .iter()
            .filter(|entry| {
                entry.segments.keys().any(|(n, _)| n == node)
                    || entry
                        .counts
                        .as_ref()
                        .is_some_and(|c| c.value.nodes.contains_key(node))
            })
            .map(|entry| entry.key().clone())
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
    /// NATS was away). Compares with the roster as last seen and queues a
    /// reconciliation only where they differ; the reconciliation itself
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
        for entry in &self.members.known {
            if entry.of(&self.node).next().is_some() {
                channels.insert(entry.key().clone());
            }
        }
        for channel in channels {
            let local: HashSet<ClientId> =
                self.local_members(&channel).iter().map(|m| m.id).collect();
            let (listed, count) = match self.members.known.get(&channel) {
                Some(known) if known.corrupt > 0 => continue,
                Some(known) => (
                    known
                        .of(&self.node)
                        .filter_map(|(_, seg)| seg.members.clone())
                        .flat_map(|m| m.iter().map(|m| m.id).collect::<Vec<_>>())
                        .collect::<HashSet<_>>(),
                    known
                        .counts
                        .as_ref()
                        .and_then(|c| c.value.nodes.get(&*self.node).copied()),
                ),
                None => (HashSet::new(), None),
            };
            let limited = self.limit_of(&channel).is_some();
            let count_off = limited && count.unwrap_or(0) as usize != listed.len();
            if local != listed || count_off {
                self.queue_change(&channel, Change::Reconcile { young_since });
            }
        }
    }

    /// Applies what the watch of the `rosters` bucket reports.
    pub(super) fn on_segment(&self, seen: Seen) {
        match seen {
            Seen::Value {
                key, revision, raw, ..
            } => {
                let Some((channel, node, seq)) = parse_segment_key(&key) else {
                    return;
                };
                let members = match self.store.rosters.decode(&key, revision, &raw) {
                    Ok(members) => Some(Arc::new(members)),
                    Err(error) => {
                        self.metrics.cluster.corrupt_records.inc();
                        error!(%channel, %error, "{CORRUPT}");
                        None
                    }
                };
                self.members.known.entry(channel.clone()).or_default().put(
                    &node,
                    seq,
                    Seg { revision, members },
                );
                if self.handle().is_some_and(|h| h.channel(&channel).is_none()) {
                    self.check_orphan(super::Kind::Roster, key, revision);
                }
            }
            Seen::Removed { key, .. } => {
                if let Some((channel, node, seq)) = parse_segment_key(&key) {
                    self.forget_segment(&channel, &node, seq);
                }
            }
            Seen::Current | Seen::Restarting => {}
        }
    }

    /// Applies what the watch of the `counts` bucket reports.
    pub(super) fn on_counts(&self, seen: Seen) {
        match seen {
            Seen::Value {
                key, revision, raw, ..
            } => {
                let Some(channel) = ChannelId::parse(&key) else {
                    return;
                };
                let Ok(value) = self.store.counts.decode(&key, revision, &raw) else {
                    return;
                };
                let size = raw.len();
                let mut known = self.members.known.entry(channel.clone()).or_default();
                if known.counts.as_ref().is_none_or(|c| c.revision < revision) {
                    known.counts = Some(Versioned {
                        value,
                        revision,
                        size,
                    });
                }
                drop(known);
                if self.handle().is_some_and(|h| h.channel(&channel).is_none()) {
                    self.check_orphan(super::Kind::Counts, key, revision);
                }
            }
            Seen::Removed { key, .. } => {
                if let Some(channel) = ChannelId::parse(&key)
                    && let Some(mut known) = self.members.known.get_mut(&channel)
                {
                    known.counts = None;
                }
            }
            Seen::Current | Seen::Restarting => {}
        }
    }
}

/// A short, growing, jittered pause before a batch is tried again.
async fn back_off(attempt: usize) {
    let jitter = rand::rng().random_range(0..=(1u64 << attempt.min(6)));
    tokio::time::sleep(Duration::from_millis(jitter)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(limit: Option<u32>) -> Change {
        Change::Join {
            limit,
            sse: false,
            done: oneshot::channel().0,
        }
    }

    fn joined(outcome: &Outcome) -> ClientId {
        match outcome {
            Outcome::Joined(id) => *id,
            other => panic!("expected a join, got {other:?}"),
        }
    }

    fn nobody() -> Vec<Member> {
        Vec::new()
    }

    fn unknown(_: ClientId) -> bool {
        false
    }

    fn member(raw: u64, at: u64) -> Member {
        Member {
            id: ClientId::from_raw(raw),
            at,
            sse: false,
        }
    }

    fn ids(part: &Part) -> Vec<ClientId> {
        part.members().map(|m| m.id).collect()
    }

    #[test]
    fn a_batch_counts_every_join_against_the_limit_in_order() {
        let mut part = Part::default();
        // Another node has 1 client; the limit is 3.
        let batch = [join(Some(3)), join(Some(3)), join(Some(3))];
        let outcomes = apply(&mut part, 1, &batch, &nobody, &unknown);
        let (first, second) = (joined(&outcomes[0]), joined(&outcomes[1]));
        assert_ne!(first, second);
        assert!(matches!(
            outcomes[2],
            Outcome::Refused(JoinRefusal::Full { limit: 3 })
        ));
        assert_eq!(part.len, 2);
        // A leave earlier in the same batch frees the place for a join.
        let batch = [Change::Leave { id: first }, join(Some(3)), join(Some(3))];
        let outcomes = apply(&mut part, 1, &batch, &nobody, &unknown);
        let third = joined(&outcomes[1]);
        assert!(matches!(
            outcomes[2],
            Outcome::Refused(JoinRefusal::Full { limit: 3 })
        ));
        assert_eq!(ids(&part), [second, third]);
    }

    #[test]
    fn joins_fill_segments_of_at_most_segment_clients() {
        let mut part = Part::default();
        let batch: Vec<Change> = (0..SEGMENT * 2 + 10).map(|_| join(None)).collect();
        apply(&mut part, 0, &batch, &nobody, &unknown);
        let sizes: Vec<usize> = part.segments.values().map(|(_, s)| s.len()).collect();
        assert_eq!(sizes, [SEGMENT, SEGMENT, 10]);
        assert_eq!(part.changed.len(), 3);
    }

    #[test]
    fn a_reconciliation_keeps_joins_under_way_and_the_real_clients_only() {
        let mut part = Part::new(BTreeMap::from([(
            0,
            (7, vec![member(1, 100), member(2, 100), member(3, 5_000)]),
        )]));
        // Real clients: 1 and 4 (4 is not listed); 3 is young (its upgrade
        // is under way); 2 is stale.
        let local = || vec![member(1, 100), member(4, 200)];
        let batch = [join(None), Change::Reconcile { young_since: 1_000 }];
        let outcomes = apply(&mut part, 0, &batch, &local, &unknown);
        let new = joined(&outcomes[0]);
        let listed: HashSet<ClientId> = ids(&part).into_iter().collect();
        assert_eq!(
            listed,
            HashSet::from([
                ClientId::from_raw(1),
                ClientId::from_raw(3),
                ClientId::from_raw(4),
                new
            ])
        );
    }

    #[test]
    fn ids_listed_anywhere_in_the_channel_are_not_drawn_again() {
        let mut part = Part::default();
        let taken = |id: ClientId| id.to_string().ends_with('0');
        let batch: Vec<Change> = (0..200).map(|_| join(None)).collect();
        for outcome in apply(&mut part, 0, &batch, &nobody, &taken) {
            assert!(!taken(joined(&outcome)));
        }
    }

    /// 19 000 clients of one node: every one leaving in one batch, and a
    /// reconciliation against 19 000 real clients, are one linear pass
    /// each (a quadratic version does 180 million comparisons here), and
    /// touch only the segments they must.
    #[test]
    fn batches_and_reconciles_of_19_000_clients_are_linear() {
        const N: usize = 19_000;
        let mut part = Part::default();
        let batch: Vec<Change> = (0..N).map(|_| join(None)).collect();
        let outcomes = apply(&mut part, 0, &batch, &nobody, &unknown);
        assert_eq!(part.len, N);
        assert_eq!(part.segments.len(), N.div_ceil(SEGMENT));
        let all: Vec<ClientId> = outcomes.iter().map(joined).collect();
        // Written: the segments start clean.
        part.changed.clear();
        let real: Vec<Member> = part.members().copied().collect();
        apply(
            &mut part,
            0,
            &[Change::Reconcile { young_since: 0 }],
            &|| real.clone(),
            &unknown,
        );
        assert!(
            part.changed.is_empty(),
            "nothing to repair, nothing written"
        );
        // One leave touches one segment.
        apply(
            &mut part,
            0,
            &[Change::Leave { id: all[300] }],
            &nobody,
            &unknown,
        );
        assert_eq!(part.changed, HashSet::from([(300 / SEGMENT) as u32]));
        let leaves: Vec<Change> = all.iter().map(|&id| Change::Leave { id }).collect();
        apply(&mut part, 0, &leaves, &nobody, &unknown);
        assert_eq!(part.len, 0);
        assert!(part.segments.values().all(|(_, s)| s.is_empty()));
    }
}
