//! A channel: its settings, its secret and its roster of clients.
//!
//! The roster sits behind the channel's own read-write lock. Relaying a
//! message takes the read lock (many senders at once); joining, leaving
//! and closing take the write lock. No lock is held across an `.await`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;

use super::client::{Client, CloseReason, QueueLimits, Transport, Wire};
use super::clock::Clock;
use super::history::{History, HistorySpec};
use super::ids::{ChannelId, ClientId, TokenDigest};
use super::order::JoinOrder;
use super::pattern::{Pattern, Roster};

/// The settings a channel is created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    pub pattern: Pattern,
    /// Most simultaneous clients; `None` = unlimited.
    pub client_limit: Option<u32>,
    /// Inactivity timeout; `None` = never.
    pub timeout: Option<Duration>,
    /// Whether each client gets a `{"type":"hello"}` frame on connect.
    pub welcome: bool,
    /// The messages kept for reading and resuming (`pub-sub` only).
    pub history: Option<HistorySpec>,
}

/// Why a client cannot join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("channel is full ({limit} clients)")]
    Full { limit: u32 },
    #[error("channel is closed")]
    Closed(CloseReason),
}

/// One relay room.
#[derive(Debug)]
pub struct Channel {
    id: ChannelId,
    spec: ChannelSpec,
    token: TokenDigest,
    created_at: SystemTime,
    clock: Clock,
    members: RwLock<Members>,
    /// The round-robin counter of `push-pull` and `fan-in-out`.
    turns: AtomicU64,
    /// Time of the last relayed message (or creation), in ms of `clock`.
    last_activity_ms: AtomicU64,
    /// Whether activity here has not been passed on to other nodes yet
    /// (cluster mode; set on the message path, cleared by whoever shares
    /// it).
    unshared_activity: AtomicBool,
    /// Cancelled when the channel is closed for good.
    closed: CancellationToken,
    /// Its history, when it keeps one.
    history: Option<Mutex<History>>,
}

/// The clients of a channel in join order, plus pending reservations.
#[derive(Debug, Default)]
pub struct Members {
    clients: JoinOrder<Arc<Client>>,
    /// Upgrades accepted but not yet joined; they count against the limit.
    reserved: u32,
    closed: Option<CloseReason>,
}

impl Members {
    pub fn client_at(&self, position: usize) -> Option<&Arc<Client>> {
        self.clients.get_index(position)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.clients.values()
    }

    pub fn client(&self, id: ClientId) -> Option<&Arc<Client>> {
        self.clients.get(&id)
    }
}

impl Roster for Members {
    fn len(&self) -> usize {
        self.clients.len()
    }

    fn position(&self, id: ClientId) -> Option<usize> {
        self.clients.position(&id)
    }
}

impl Channel {
    pub(crate) fn new(
        id: ChannelId,
        spec: ChannelSpec,
        token: TokenDigest,
        created_at: SystemTime,
        clock: Clock,
        closed: CancellationToken,
    ) -> Self {
        Self {
            id,
            spec,
            token,
            created_at,
            clock,
            members: RwLock::new(Members::default()),
            turns: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(clock.now_ms()),
            unshared_activity: AtomicBool::new(false),
            closed,
            history: spec.history.map(|spec| Mutex::new(History::new(spec))),
        }
    }

    /// The channel's history, when it keeps one.
    pub fn history(&self) -> Option<&Mutex<History>> {
        self.history.as_ref()
    }

    pub fn id(&self) -> &ChannelId {
        &self.id
    }

    pub fn spec(&self) -> &ChannelSpec {
        &self.spec
    }

    pub fn pattern(&self) -> Pattern {
        self.spec.pattern
    }

    pub fn token(&self) -> &TokenDigest {
        &self.token
    }

    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    pub fn turns(&self) -> &AtomicU64 {
        &self.turns
    }

    /// The roster, read-locked, for routing one message.
    pub fn members(&self) -> RwLockReadGuard<'_, Members> {
        self.members.read()
    }

    pub fn client_count(&self) -> usize {
        self.members.read().clients.len()
    }

    /// The connected clients' ids, connection times and transports, in
    /// join order.
    pub fn clients(&self) -> Vec<(ClientId, SystemTime, Transport)> {
        self.members
            .read()
            .iter()
            .map(|c| (c.id(), c.connected_at(), c.wire().transport()))
            .collect()
    }

    /// Records activity: the inactivity timeout starts over.
    pub(crate) fn touch(&self) {
        self.last_activity_ms
            .store(self.clock.now_ms(), Ordering::Relaxed);
    }

    /// Sets the last activity (ms of the relay clock).
    pub(crate) fn set_last_activity(&self, ms: u64) {
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    /// Sets the last activity (ms of the relay clock) if it is later than
    /// the one held — activity seen on another node.
    pub fn note_activity_at(&self, ms: u64) {
        self.last_activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// Marks activity as not yet shared with other nodes; returns whether
    /// it was shared until now (so the caller queues the channel once).
    pub fn mark_unshared(&self) -> bool {
        !self.unshared_activity.load(Ordering::Relaxed)
            && !self.unshared_activity.swap(true, Ordering::AcqRel)
    }

    /// Marks the activity so far as shared; activity after this call marks
    /// the channel unshared again.
    pub fn mark_shared(&self) {
        self.unshared_activity.store(false, Ordering::Release);
    }

    /// The clock the channel's times are on.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The next round-robin turn.
    pub fn next_turn(&self) -> u64 {
        self.turns.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether this node has no clients and no upgrades under way here.
    pub fn is_idle_here(&self) -> bool {
        let members = self.members.read();
        members.clients.is_empty() && members.reserved == 0
    }

    /// When the inactivity timeout fires, in ms of the relay clock.
    pub fn deadline_ms(&self) -> Option<u64> {
        let timeout = self.spec.timeout?;
        let last = self.last_activity_ms.load(Ordering::Relaxed);
        Some(last.saturating_add(timeout.as_millis() as u64))
    }

    /// Milliseconds until the inactivity timeout fires; `None` if it never does.
    pub fn countdown_ms(&self) -> Option<u64> {
        self.deadline_ms()
            .map(|deadline| deadline.saturating_sub(self.clock.now_ms()))
    }

    /// Whether the channel was closed for good.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Completes once the channel is closed for good.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Holds a place for a client whose upgrade is under way, so that
    /// concurrent connects can never exceed `clientLimit` here. Pair it
    /// with [`Channel::fill_place`] or [`Channel::release_place`] (the
    /// relay's `Reservation` guard does).
    ///
    /// # Errors
    ///
    /// [`JoinError::Full`] at the limit, [`JoinError::Closed`] after close.
    pub(crate) fn hold_place(&self) -> Result<(), JoinError> {
        let mut members = self.members.write();
        if let Some(reason) = members.closed {
            return Err(JoinError::Closed(reason));
        }
        if let Some(limit) = self.spec.client_limit
            && members.clients.len() + members.reserved as usize >= limit as usize
        {
            return Err(JoinError::Full { limit });
        }
        members.reserved += 1;
        Ok(())
    }

    /// Gives back a place held with [`Channel::hold_place`].
    pub(crate) fn release_place(&self) {
        self.members.write().reserved -= 1;
    }

    /// Turns a held place into a member with the id `id` (already unique
    /// in the channel everywhere) or, without one, a fresh id unique here.
    ///
    /// # Errors
    ///
    /// The close reason if the channel closed while the place was held;
    /// the place is given back then.
    pub(crate) fn fill_place(
        &self,
        id: Option<ClientId>,
        limits: QueueLimits,
        wire: Wire,
    ) -> Result<Arc<Client>, CloseReason> {
        let mut members = self.members.write();
        members.reserved -= 1;
        if let Some(reason) = members.closed {
            return Err(reason);
        }
        let id = match id {
            Some(id) => id,
            None => loop {
                let id = ClientId::random();
                if !members.clients.contains_key(&id) {
                    break id;
                }
            },
        };
        let client = Arc::new(Client::new(id, limits, wire));
        members.clients.insert(id, Arc::clone(&client));
        Ok(client)
    }

    /// Removes a client; a no-op if it is already gone.
    pub(crate) fn leave(&self, id: ClientId) {
        self.members.write().clients.remove(&id);
    }

    /// Closes the channel for good: no one can join any more and every
    /// client is asked to close with `reason`. Returns how many were
    /// connected. Only the first call has an effect.
    pub(crate) fn close(&self, reason: CloseReason) -> usize {
        let mut members = self.members.write();
        if members.closed.is_some() {
            return 0;
        }
        members.closed = Some(reason);
        let clients = std::mem::take(&mut members.clients);
        drop(members);
        self.closed.cancel();
        for client in clients.values() {
            client.outbox.close(reason);
        }
        clients.len()
    }

    /// Takes one client off the roster (nothing more is routed to it) and
    /// asks it to close with `reason`, after what is queued for it. False
    /// if it had left already.
    pub(crate) fn disconnect(&self, id: ClientId, reason: CloseReason) -> bool {
        let Some(client) = self.members.write().clients.remove(&id) else {
            return false;
        };
        client.outbox.close(reason);
        true
    }

    /// Asks every client to close with `reason` but keeps the channel.
    pub(crate) fn disconnect_all(&self, reason: CloseReason) -> usize {
        let clients = std::mem::take(&mut self.members.write().clients);
        for client in clients.values() {
            client.outbox.close(reason);
        }
        clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::ids::Token;

    const LIMITS: QueueLimits = QueueLimits {
        frames: 8,
        bytes: 1024,
    };

    fn channel(limit: Option<u32>, timeout: Option<Duration>) -> Arc<Channel> {
        let spec = ChannelSpec {
            pattern: Pattern::PubSub,
            client_limit: limit,
            timeout,
            welcome: false,
            history: None,
        };
        Arc::new(Channel::new(
            ChannelId::random(4),
            spec,
            Token::random(16).digest(),
            SystemTime::now(),
            Clock::new(),
            CancellationToken::new(),
        ))
    }

    /// A held place, admitted at once.
    fn join(ch: &Channel) -> Arc<Client> {
        ch.hold_place().unwrap();
        ch.fill_place(None, LIMITS, Wire::PLAIN).unwrap()
    }

    #[test]
    fn held_places_count_against_the_limit() {
        let ch = channel(Some(2), None);
        ch.hold_place().unwrap();
        ch.hold_place().unwrap();
        assert_eq!(ch.hold_place().unwrap_err(), JoinError::Full { limit: 2 });
        ch.release_place();
        let client = ch.fill_place(None, LIMITS, Wire::PLAIN).unwrap();
        ch.hold_place().unwrap();
        assert_eq!(ch.hold_place().unwrap_err(), JoinError::Full { limit: 2 });
        ch.fill_place(None, LIMITS, Wire::PLAIN).unwrap();
        assert_eq!(ch.client_count(), 2);
        ch.leave(client.id());
        assert_eq!(ch.client_count(), 1);
        assert!(ch.hold_place().is_ok());
    }

    #[test]
    fn closing_empties_the_roster_and_refuses_joins() {
        let ch = channel(None, None);
        let client = join(&ch);
        ch.hold_place().unwrap();
        assert_eq!(ch.close(CloseReason::ChannelDeleted), 1);
        assert!(ch.is_closed());
        assert_eq!(
            ch.close(CloseReason::ChannelTimedOut),
            0,
            "only the first close counts"
        );
        assert_eq!(
            client.outbox.close_reason(),
            Some(CloseReason::ChannelDeleted)
        );
        assert_eq!(ch.client_count(), 0);
        // A place held while it closed cannot be filled.
        assert_eq!(
            ch.fill_place(None, LIMITS, Wire::PLAIN).unwrap_err(),
            CloseReason::ChannelDeleted
        );
        assert!(ch.is_idle_here());
        assert_eq!(
            ch.hold_place().unwrap_err(),
            JoinError::Closed(CloseReason::ChannelDeleted)
        );
    }

    #[test]
    fn given_ids_are_used() {
        let ch = channel(None, None);
        ch.hold_place().unwrap();
        assert!(!ch.is_idle_here(), "a held place counts as a client here");
        let client = ch
            .fill_place(Some(ClientId::from_raw(42)), LIMITS, Wire::PLAIN)
            .unwrap();
        assert_eq!(client.id(), ClientId::from_raw(42));
        assert_eq!(ch.clients()[0].0, ClientId::from_raw(42));
        ch.leave(client.id());
        assert!(ch.is_idle_here());
    }

    #[test]
    fn disconnect_all_keeps_the_channel_open() {
        let ch = channel(None, None);
        let client = join(&ch);
        assert_eq!(ch.disconnect_all(CloseReason::ServerShutdown), 1);
        assert_eq!(
            client.outbox.close_reason(),
            Some(CloseReason::ServerShutdown)
        );
        assert!(ch.hold_place().is_ok());
    }

    #[test]
    fn client_ids_are_unique_and_in_join_order() {
        let ch = channel(None, None);
        let ids: Vec<_> = (0..50).map(|_| join(&ch).id()).collect();
        let listed: Vec<_> = ch.clients().into_iter().map(|(id, ..)| id).collect();
        assert_eq!(listed, ids);
        let members = ch.members();
        assert_eq!(members.position(ids[7]), Some(7));
    }

    #[test]
    fn activity_is_marked_unshared_once_until_shared() {
        let ch = channel(None, Some(Duration::from_secs(60)));
        assert!(ch.mark_unshared());
        assert!(!ch.mark_unshared(), "already queued");
        ch.mark_shared();
        assert!(ch.mark_unshared());
    }

    #[tokio::test(start_paused = true)]
    async fn countdown_follows_activity_exactly() {
        let never = channel(None, None);
        assert_eq!(never.countdown_ms(), None);
        let ch = channel(None, Some(Duration::from_secs(60)));
        assert_eq!(ch.countdown_ms(), Some(60_000));
        tokio::time::advance(Duration::from_millis(25_000)).await;
        assert_eq!(ch.countdown_ms(), Some(35_000));
        assert_eq!(ch.deadline_ms(), Some(60_000));
        ch.touch();
        assert_eq!(ch.deadline_ms(), Some(85_000));
        assert_eq!(ch.countdown_ms(), Some(60_000));
        // Activity seen elsewhere moves the deadline only forward.
        ch.note_activity_at(30_000);
        assert_eq!(ch.deadline_ms(), Some(90_000));
        ch.note_activity_at(10_000);
        assert_eq!(ch.deadline_ms(), Some(90_000));
        tokio::time::advance(Duration::from_millis(70_000)).await;
        assert_eq!(ch.countdown_ms(), Some(0), "never negative");
    }
}
