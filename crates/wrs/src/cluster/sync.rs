//! The loops that keep one node in step with the cluster, started by
//! [`start`] on the relay's background tracker and ended by its root token:
//!
//! - the publisher, draining the bounded queue into NATS;
//! - watches of the `channels`, `members` and `nodes` buckets, feeding
//!   this node's caches (restarted with a full resync after any error);
//! - the heartbeat: announces this node, removes nodes that fell silent
//!   (and their clients), and repairs this node's own roster entries;
//! - receivers of the node's direct subject and of each subscribed channel.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::kv;
use futures_util::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::records::{ChannelRecord, Member, MembersDoc, NodeRecord, epoch_ms};
use super::{Cluster, MISSED_HEARTBEATS};
use crate::backplane::nats::deliver_inbound;
use crate::relay::Relay;
use crate::relay::client::CloseReason;
use crate::relay::ids::ChannelId;

/// Watches start with the current value of every key, then follow changes:
/// a watch that only followed changes would miss what was written before it
/// started (this node's own first heartbeat, rosters changed while a watch
/// was being set up again).
const EVERY_KEY: &str = ">";

/// Pause before a failed watch or subscription is set up again.
const RETRY: Duration = Duration::from_millis(500);

/// Starts every loop of a cluster node.
///
/// # Errors
///
/// A NATS error if the node's direct subject cannot be subscribed.
pub async fn start(
    relay: &Arc<Relay>,
    cluster: &Arc<Cluster>,
) -> Result<(), async_nats::SubscribeError> {
    let stop = relay.root().clone();
    let tasks = relay.background();
    // A loop may be inside a store call that retries for seconds when
    // the node stops: stopping cancels it wherever it is.
    let spawn = |task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
        let stop = stop.clone();
        tasks.spawn(async move {
            stop.run_until_cancelled(task).await;
        });
    };
    if let Some(outgoing) = cluster.take_outgoing() {
        spawn(Box::pin(publish(
            Arc::clone(cluster),
            outgoing,
            stop.clone(),
        )));
    }
    let direct = cluster
        .client()
        .subscribe(cluster.node_subject(cluster.node()))
        .await?;
    spawn(Box::pin(receive(Arc::clone(relay), direct, stop.clone())));
    spawn(Box::pin(watch_channels(
        Arc::clone(relay),
        Arc::clone(cluster),
        stop.clone(),
    )));
    spawn(Box::pin(watch_members(Arc::clone(cluster), stop.clone())));
    spawn(Box::pin(watch_nodes(Arc::clone(cluster), stop.clone())));
    spawn(Box::pin(heartbeat(
        Arc::clone(relay),
        Arc::clone(cluster),
        stop.clone(),
    )));
    Ok(())
}

/// Moves queued messages into the NATS client. A message NATS refuses
/// (larger than the `max_payload` of the server it is connected to now) is
/// counted as dropped and logged, at most once per interval.
async fn publish(
    cluster: Arc<Cluster>,
    mut outgoing: tokio::sync::mpsc::Receiver<super::Outgoing>,
    stop: CancellationToken,
) {
    const WARN_EVERY: Duration = Duration::from_secs(10);
    let mut last_warning: Option<Instant> = None;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let published = cluster
            .client()
            .publish_with_headers(message.subject, message.headers, message.payload)
            .await;
        if let Err(error) = published {
            cluster.metrics().cluster.dropped.inc();
            if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                last_warning = Some(Instant::now());
                warn!(%error, "a message could not be published to NATS and was dropped (counted in wrs_cluster_messages_dropped_total)");
            }
        }
    }
}

/// Delivers what arrives on one subscription until `stop`.
pub async fn receive(
    relay: Arc<Relay>,
    mut subscriber: async_nats::Subscriber,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = subscriber.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        relay.metrics().cluster.received.inc();
        deliver_inbound(&relay, &message);
    }
    // Dropping the subscriber unsubscribes.
}

/// Waits `RETRY` unless stopped; returns whether to go on.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(RETRY) => true,
    }
}

/// Keeps this node's channel cache equal to the shared registry.
async fn watch_channels(relay: Arc<Relay>, cluster: Arc<Cluster>, stop: CancellationToken) {
    loop {
        // Resync first: channels gone while the watch was down close here.
        let keys = async {
            let keys = cluster
                .channels_store()
                .keys()
                .await
                .map_err(|e| e.to_string())?;
            keys.try_collect::<Vec<String>>()
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Ok(keys) = keys {
            let present: HashSet<ChannelId> =
                keys.iter().filter_map(|k| ChannelId::parse(k)).collect();
            for channel in relay.channels() {
                if !present.contains(channel.id()) {
                    relay.close_local(channel.id(), CloseReason::ChannelDeleted);
                }
            }
            match cluster.channels_store().watch_with_history(EVERY_KEY).await {
                Ok(mut watch) => loop {
                    let entry = tokio::select! {
                        () = stop.cancelled() => return,
                        entry = watch.next() => entry,
                    };
                    match entry {
                        Some(Ok(entry)) => apply_channel(&relay, entry),
                        Some(Err(error)) => {
                            warn!(%error, "channel watch failed; resyncing");
                            break;
                        }
                        None => break,
                    }
                },
                Err(error) => warn!(%error, "cannot watch channels"),
            }
        }
        if !pause(&stop).await {
            return;
        }
    }
}

fn apply_channel(relay: &Arc<Relay>, entry: kv::Entry) {
    let Some(id) = ChannelId::parse(&entry.key) else {
        return;
    };
    match entry.operation {
        kv::Operation::Put => match serde_json::from_slice::<ChannelRecord>(&entry.value) {
            Ok(record) => match record.closing.as_deref() {
                Some("timed_out") => {
                    relay.close_local(&id, CloseReason::ChannelTimedOut);
                }
                Some(_) => {
                    relay.close_local(&id, CloseReason::ChannelDeleted);
                }
                None => {
                    relay.adopt(id, &record);
                }
            },
            Err(error) => warn!(channel = %id, %error, "unreadable channel record"),
        },
        kv::Operation::Delete | kv::Operation::Purge => {
            relay.close_local(&id, CloseReason::ChannelDeleted);
        }
    }
}

/// Keeps this node's copy of every channel's cluster roster current.
async fn watch_members(cluster: Arc<Cluster>, stop: CancellationToken) {
    loop {
        match cluster.members_store().watch_with_history(EVERY_KEY).await {
            Ok(mut watch) => loop {
                let entry = tokio::select! {
                    () = stop.cancelled() => return,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => {
                        let Some(id) = ChannelId::parse(&entry.key) else {
                            continue;
                        };
                        match entry.operation {
                            kv::Operation::Put => {
                                let doc = serde_json::from_slice::<MembersDoc>(&entry.value)
                                    .unwrap_or_default();
                                cluster.apply_members(id, entry.revision, doc);
                            }
                            kv::Operation::Delete | kv::Operation::Purge => {
                                cluster.forget_members(&id)
                            }
                        }
                    }
                    Some(Err(error)) => {
                        warn!(%error, "members watch failed; resyncing");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => warn!(%error, "cannot watch channel members"),
        }
        if !pause(&stop).await {
            return;
        }
    }
}

/// Keeps the list of nodes heard from current.
async fn watch_nodes(cluster: Arc<Cluster>, stop: CancellationToken) {
    loop {
        match cluster.nodes_store().watch_with_history(EVERY_KEY).await {
            Ok(mut watch) => loop {
                let entry = tokio::select! {
                    () = stop.cancelled() => return,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => match entry.operation {
                        kv::Operation::Put => {
                            if let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) {
                                // A record written long ago (a node that is
                                // gone) must not look fresh.
                                let written = SystemTime::from(entry.created);
                                let age = SystemTime::now()
                                    .duration_since(written)
                                    .unwrap_or_default();
                                cluster.saw_node_aged(record, age);
                            }
                        }
                        kv::Operation::Delete | kv::Operation::Purge => {
                            if cluster.forget_node(&entry.key) {
                                info!(node = %entry.key, "node left the cluster");
                            }
                        }
                    },
                    Some(Err(error)) => {
                        warn!(%error, "nodes watch failed; resyncing");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => warn!(%error, "cannot watch nodes"),
        }
        cluster.nodes_resynced();
        if !pause(&stop).await {
            return;
        }
    }
}

/// Announces this node, removes nodes that fell silent, and repairs this
/// node's own roster entries, every heartbeat interval.
async fn heartbeat(relay: Arc<Relay>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(cluster.heartbeat());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_messages = relay.metrics().totals().messages_in;
    let mut connected = true;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let totals = relay.metrics().totals();
        let rate = (totals.messages_in - last_messages) * 1000
            / cluster.heartbeat().as_millis().max(1) as u64;
        last_messages = totals.messages_in;
        let local_channels = relay
            .channels()
            .iter()
            .filter(|c| !c.is_idle_here())
            .count() as u64;
        let state = if relay.is_draining() {
            "draining"
        } else {
            "ready"
        };
        match cluster
            .beat(state, totals.connections_open, local_channels, rate)
            .await
        {
            Ok(()) => {
                if !connected {
                    info!("cluster heartbeat restored");
                }
                connected = true;
            }
            Err(error) => {
                if connected {
                    warn!(%error, "cannot write the cluster heartbeat");
                }
                connected = false;
                // Heartbeats of others may have been missed meanwhile.
                cluster.nodes_resynced();
                continue;
            }
        }
        remove_silent_nodes(&cluster).await;
        reconcile(&relay, &cluster).await;
    }
}

/// Removes the clients of every node that is not alive — nodes that fell
/// silent, and nodes listed in a roster that nobody has heard from — once
/// this node has watched the heartbeats long enough to know.
async fn remove_silent_nodes(cluster: &Cluster) {
    if !cluster.knows_liveness() {
        return;
    }
    let mut gone: HashSet<String> = cluster.silent_nodes().into_iter().collect();
    gone.extend(
        cluster
            .rostered_nodes()
            .into_iter()
            .filter(|node| !cluster.is_live(node)),
    );
    for node in gone {
        // A direct read guards against a stalled watch: a node whose
        // heartbeat is fresh in the bucket is alive.
        if !matches!(cluster.confirm_alive(&node).await, Ok(false)) {
            continue;
        }
        match cluster.remove_node_members(&node).await {
            Ok(clients) => {
                let _ = cluster.delete_node(&node).await;
                warn!(%node, clients, "node is gone: its clients were removed from the cluster roster");
            }
            Err(error) => warn!(%node, %error, "cannot remove a gone node's clients"),
        }
    }
}

/// Makes this node's entries in every roster match its real clients
/// (repairs lost writes and evictions). Entries for upgrades still under
/// way (younger than two heartbeats) are kept.
async fn reconcile(relay: &Relay, cluster: &Cluster) {
    let grace = epoch_ms(SystemTime::now())
        .saturating_sub(2 * cluster.heartbeat().as_millis() as u64 * u64::from(MISSED_HEARTBEATS));
    for channel in relay.channels() {
        let local: Vec<Member> = channel
            .clients()
            .into_iter()
            .map(|(id, at)| Member {
                id,
                at: epoch_ms(at),
            })
            .collect();
        let listed = cluster
            .members(channel.id())
            .and_then(|m| m.doc.nodes.get(cluster.node()).cloned())
            .unwrap_or_default();
        let mut want = local.clone();
        want.extend(
            listed
                .iter()
                .filter(|m| m.at >= grace && !local.iter().any(|l| l.id == m.id)),
        );
        let same = want.len() == listed.len() && want.iter().all(|w| listed.contains(w));
        if !same && let Err(error) = cluster.set_local_members(channel.id(), &want).await {
            warn!(channel = %channel.id(), %error, "cannot repair this node's roster entries");
        }
    }
}
