//! Channels in the shared registry (the `channels` bucket).
//!
//! A create is one acknowledged KV `create` (ids are unique cluster-wide).
//! An end is one conditional write: the record's values are purged and a
//! marker carrying the reason (`deleted`, `timed_out`) takes its place for
//! [`END_MARKER_TTL`], so every node — including one whose watch restarts
//! meanwhile — closes its clients with the right code, and there is no
//! state in between that a node dying half-way could leave behind.
//! Records that earlier versions left marked `closing` are finished by
//! whichever node sees them.

use bytes::Bytes;
use dashmap::DashMap;
use tracing::{error, info};

use super::NatsCoordinator;
use super::connect::END_MARKER_TTL;
use super::records::ChannelRecord;
use super::store::Seen;
use crate::relay::coordinator::{Claim, CoordinatorError, EndReason, Ended, SharedChannel};
use crate::relay::ids::ChannelId;

/// What this node knows of the shared registry beyond the relay's copy.
#[derive(Debug, Default)]
pub(super) struct Channels {
    /// The revision of each live channel's record: ending it is one write
    /// conditional on it. Emptied when the watch replays the bucket, so
    /// that afterwards it holds exactly the channels that still exist.
    revisions: DashMap<ChannelId, u64>,
}

/// Attempts at ending a channel whose known revision turned out stale.
const END_ATTEMPTS: usize = 3;

impl NatsCoordinator {
    pub(super) async fn create_channel(
        &self,
        id: &ChannelId,
        channel: &SharedChannel,
    ) -> Result<Claim, CoordinatorError> {
        let record = ChannelRecord::new(channel);
        Ok(
            match self.store.channels.create(id.as_str(), &record).await? {
                Some(revision) => {
                    self.channels.revisions.insert(id.clone(), revision);
                    Claim::Claimed
                }
                None => Claim::Taken,
            },
        )
    }

    pub(super) async fn fetch_channel(
        &self,
        id: &ChannelId,
    ) -> Result<Option<SharedChannel>, CoordinatorError> {
        let Some(found) = self.store.channels.get(id.as_str()).await? else {
            return Ok(None);
        };
        if let Some(reason) = found.value.closing {
            self.finish_end(id, found.revision, reason);
            return Ok(None);
        }
        let shared = found
            .value
            .shared()
            .ok_or_else(|| CoordinatorError::Corrupt {
                what: format!("channel record {id}"),
                reason: "unknown pattern or token digest".to_owned(),
            })?;
        self.channels.revisions.insert(id.clone(), found.revision);
        Ok(Some(shared))
    }

    pub(super) async fn end_channel(
        &self,
        id: &ChannelId,
        reason: EndReason,
    ) -> Result<Ended, CoordinatorError> {
        let marker = Bytes::from(serde_json::to_vec(&reason).unwrap_or_default());
        for _ in 0..END_ATTEMPTS {
            let known = self.channels.revisions.get(id).map(|r| *r);
            let revision = match known {
                Some(revision) => revision,
                None => match self.store.channels.get(id.as_str()).await? {
                    Some(found) => {
                        self.channels.revisions.insert(id.clone(), found.revision);
                        found.revision
                    }
                    None => return Ok(Ended::NotFound),
                },
            };
            let ended = self
                .store
                .channels
                .purge_with_marker(id.as_str(), revision, marker.clone(), END_MARKER_TTL)
                .await?;
            self.channels
                .revisions
                .remove_if(id, |_, held| *held == revision);
            if ended {
                self.clean_up_after(id);
                self.forget_history(id);
                return Ok(Ended::Ended);
            }
            // Ended by another node, or the revision was stale: look again.
        }
        Err(CoordinatorError::Contention(id.to_string()))
    }

    /// Ends a channel that an earlier version left marked as closing.
    fn finish_end(&self, id: &ChannelId, revision: u64, reason: EndReason) {
        let Some(me) = self.me() else {
            return;
        };
        let id = id.clone();
        info!(channel = %id, reason = reason.as_str(), "finishing the end of a channel that a node left half-ended");
        self.channels.revisions.insert(id.clone(), revision);
        self.spawn(async move {
            if let Err(error) = me.end_channel(&id, reason).await {
                tracing::warn!(channel = %id, %error, "cannot finish ending a channel");
            }
        });
    }

    /// Removes what other buckets hold for an ended channel (when this node
    /// knows it holds something: rosters and activity are only written
    /// for channels that had clients or traffic).
    fn clean_up_after(&self, id: &ChannelId) {
        let (segments, counts) = self.roster_keys(id);
        let activity = self.activity_revision(id);
        if segments.is_empty() && counts.is_none() && activity.is_none() {
            return;
        }
        let Some(me) = self.me() else {
            return;
        };
        let id = id.clone();
        self.spawn(async move {
            for (key, revision) in segments {
                let _ = me.store.rosters.delete(&key, Some(revision)).await;
            }
            if let Some(revision) = counts {
                let _ = me.store.counts.delete(id.as_str(), Some(revision)).await;
            }
            if let Some(revision) = activity {
                let _ = me.store.activity.delete(id.as_str(), Some(revision)).await;
            }
        });
    }

    pub(super) async fn shared_channel_ids(&self) -> Result<Vec<ChannelId>, CoordinatorError> {
        Ok(self
            .store
            .channels
            .keys()
            .await?
            .iter()
            .filter_map(|key| ChannelId::parse(key))
            .collect())
    }

    /// The channel was closed on this node: forget everything kept for it.
    pub(super) fn forget_channel(&self, id: &ChannelId) {
        self.channels.revisions.remove(id);
        self.forget_roster(id);
        self.forget_activity(id);
        self.drop_interest(id);
    }

    /// Whether the shared registry holds the channel (as far as this node
    /// knows).
    pub(super) fn knows_channel(&self, id: &ChannelId) -> bool {
        self.channels.revisions.contains_key(id)
    }

    /// Applies what the watch of the `channels` bucket reports.
    pub(super) fn on_channel(&self, seen: Seen) {
        let Some(handle) = self.handle() else {
            return;
        };
        match seen {
            Seen::Value {
                key, revision, raw, ..
            } => {
                let Some(id) = ChannelId::parse(&key) else {
                    return;
                };
                let record = match self.store.channels.decode(&key, revision, &raw) {
                    Ok(record) => record,
                    Err(error) => {
                        self.metrics.cluster.corrupt_records.inc();
                        error!(channel = %id, %error, "unreadable channel record");
                        return;
                    }
                };
                if let Some(reason) = record.closing {
                    handle.ended(&id, reason);
                    self.finish_end(&id, revision, reason);
                    return;
                }
                let Some(shared) = record.shared() else {
                    self.metrics.cluster.corrupt_records.inc();
                    error!(channel = %id, "channel record with an unknown pattern or token digest");
                    return;
                };
                self.channels.revisions.insert(id.clone(), revision);
                handle.adopt(id, &shared);
            }
            Seen::Removed { key, marker } => {
                let Some(id) = ChannelId::parse(&key) else {
                    return;
                };
                let reason = serde_json::from_slice(&marker).unwrap_or(EndReason::Deleted);
                self.channels.revisions.remove(&id);
                handle.ended(&id, reason);
            }
            Seen::Restarting => self.channels.revisions.clear(),
            Seen::Current => {
                // Channels that ended while the watch was down and whose
                // marker is gone too (channels created since are known
                // again): how they ended is unknown, so say deleted.
                for channel in handle.channels() {
                    if !self.channels.revisions.contains_key(channel.id()) {
                        handle.ended(channel.id(), EndReason::Deleted);
                    }
                }
            }
        }
    }
}
