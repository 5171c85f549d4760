//! A channel: its settings, its secret and its roster of clients.
//!
//! The roster sits behind the channel's own read-write lock. Relaying a
//! message takes the read lock (many senders at once); joining, leaving
//! and closing take the write lock. No lock is held across an `.await`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;

use super::Clock;
use super::client::{Client, CloseReason, QueueLimits};
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
    /// Cancelled when the channel is closed for good.
    closed: CancellationToken,
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
            closed,
        }
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

    pub(crate) fn turns(&self) -> &AtomicU64 {
        &self.turns
    }

    /// The roster, read-locked, for routing one message.
    pub(crate) fn members(&self) -> RwLockReadGuard<'_, Members> {
        self.members.read()
    }

    pub fn client_count(&self) -> usize {
        self.members.read().clients.len()
    }

    /// The connected clients' ids and connection times, in join order.
    pub fn clients(&self) -> Vec<(ClientId, SystemTime)> {
        self.members
            .read()
            .iter()
            .map(|c| (c.id(), c.connected_at()))
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
    pub(crate) fn note_activity_at(&self, ms: u64) {
        self.last_activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub(crate) fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// The next round-robin turn.
    pub(crate) fn next_turn(&self) -> u64 {
        self.turns.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether this node has no clients and no upgrades under way here.
    pub(crate) fn is_idle_here(&self) -> bool {
        let members = self.members.read();
        members.clients.is_empty() && members.reserved == 0
    }

    /// When the inactivity timeout fires, in ms of the relay clock.
    pub(crate) fn deadline_ms(&self) -> Option<u64> {
        let timeout = self.spec.timeout?;
        let last = self.last_activity_ms.load(Ordering::Relaxed);
        Some(last.saturating_add(timeout.as_millis() as u64))
    }

    /// Milliseconds until the inactivity timeout fires; `None` if it never does.
    pub fn countdown_ms(&self) -> Option<u64> {
        self.deadline_ms()
            .map(|deadline| deadline.saturating_sub(self.clock.now_ms()))
    }

    /// Completes once the channel is closed for good.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Holds a place for a client whose upgrade is under way, so that
    /// concurrent connects can never exceed `clientLimit`.
    ///
    /// # Errors
    ///
    /// [`JoinError::Full`] at the limit, [`JoinError::Closed`] after close.
    pub fn reserve(self: &Arc<Self>) -> Result<Reservation, JoinError> {
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
        Ok(Reservation {
            channel: Arc::clone(self),
            held: true,
            id: None,
            abandon: None,
        })
    }

    /// Holds a place without checking `clientLimit` here: in a cluster the
    /// shared roster enforces it.
    ///
    /// # Errors
    ///
    /// [`JoinError::Closed`] after close.
    pub fn reserve_unchecked(self: &Arc<Self>) -> Result<Reservation, JoinError> {
        let mut members = self.members.write();
        if let Some(reason) = members.closed {
            return Err(JoinError::Closed(reason));
        }
        members.reserved += 1;
        Ok(Reservation {
            channel: Arc::clone(self),
            held: true,
            id: None,
            abandon: None,
        })
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

    /// Asks every client to close with `reason` but keeps the channel.
    pub(crate) fn disconnect_all(&self, reason: CloseReason) -> usize {
        let clients = std::mem::take(&mut self.members.write().clients);
        for client in clients.values() {
            client.outbox.close(reason);
        }
        clients.len()
    }
}

/// A place held in a channel for a connection being upgraded. Dropping it
/// without [`Reservation::admit`] gives the place back.
pub struct Reservation {
    channel: Arc<Channel>,
    /// Whether the place is still held (not yet admitted or given back).
    held: bool,
    /// In a cluster: the id already written to the shared roster.
    id: Option<ClientId>,
    /// In a cluster: gives the shared place back if the upgrade fails.
    abandon: Option<Box<dyn FnOnce(ClientId) + Send + Sync>>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("channel", self.channel.id())
            .field("held", &self.held)
            .field("id", &self.id)
            .finish()
    }
}

impl Reservation {
    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// Fixes the client's id (already unique cluster-wide) and what to do
    /// if the upgrade fails.
    pub fn assign(&mut self, id: ClientId, abandon: Box<dyn FnOnce(ClientId) + Send + Sync>) {
        self.id = Some(id);
        self.abandon = Some(abandon);
    }

    /// Turns the reservation into a member with its assigned id, or a fresh
    /// one unique within the channel.
    ///
    /// # Errors
    ///
    /// The close reason if the channel closed while the upgrade ran.
    pub fn admit(
        mut self,
        limits: QueueLimits,
    ) -> Result<(Arc<Channel>, Arc<Client>), CloseReason> {
        self.held = false;
        let channel = Arc::clone(&self.channel);
        let mut members = channel.members.write();
        members.reserved -= 1;
        if let Some(reason) = members.closed {
            drop(members);
            self.give_back();
            return Err(reason);
        }
        self.abandon = None;
        let id = match self.id {
            Some(id) => id,
            None => loop {
                let id = ClientId::random();
                if !members.clients.contains_key(&id) {
                    break id;
                }
            },
        };
        let client = Arc::new(Client::new(id, limits));
        members.clients.insert(id, Arc::clone(&client));
        drop(members);
        Ok((channel, client))
    }

    fn give_back(&mut self) {
        if let (Some(id), Some(abandon)) = (self.id, self.abandon.take()) {
            abandon(id);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            self.channel.members.write().reserved -= 1;
            self.give_back();
        }
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

    #[test]
    fn reservations_count_against_the_limit() {
        let ch = channel(Some(2), None);
        let a = ch.reserve().unwrap();
        let b = ch.reserve().unwrap();
        assert_eq!(ch.reserve().unwrap_err(), JoinError::Full { limit: 2 });
        drop(b);
        let (_, client) = a.admit(LIMITS).unwrap();
        let c = ch.reserve().unwrap();
        assert_eq!(ch.reserve().unwrap_err(), JoinError::Full { limit: 2 });
        c.admit(LIMITS).unwrap();
        assert_eq!(ch.client_count(), 2);
        ch.leave(client.id());
        assert_eq!(ch.client_count(), 1);
        assert!(ch.reserve().is_ok());
    }

    #[test]
    fn closing_empties_the_roster_and_refuses_joins() {
        let ch = channel(None, None);
        let (_, client) = ch.reserve().unwrap().admit(LIMITS).unwrap();
        let pending = ch.reserve().unwrap();
        assert_eq!(ch.close(CloseReason::ChannelDeleted), 1);
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
        assert_eq!(
            pending.admit(LIMITS).unwrap_err(),
            CloseReason::ChannelDeleted
        );
        assert_eq!(
            ch.reserve().unwrap_err(),
            JoinError::Closed(CloseReason::ChannelDeleted)
        );
    }

    #[test]
    fn assigned_ids_are_used_and_given_back_when_abandoned() {
        use std::sync::Mutex;
        let ch = channel(None, None);
        let given_back = Arc::new(Mutex::new(Vec::new()));
        let id = ClientId::from_raw(42);
        let mut reservation = ch.reserve_unchecked().unwrap();
        let log = Arc::clone(&given_back);
        reservation.assign(id, Box::new(move |id| log.lock().unwrap().push(id)));
        assert!(!ch.is_idle_here());
        drop(reservation);
        assert_eq!(*given_back.lock().unwrap(), [id]);
        assert!(ch.is_idle_here());
        let mut reservation = ch.reserve_unchecked().unwrap();
        let log = Arc::clone(&given_back);
        reservation.assign(id, Box::new(move |id| log.lock().unwrap().push(id)));
        let (_, client) = reservation.admit(LIMITS).unwrap();
        assert_eq!(client.id(), id);
        assert_eq!(
            given_back.lock().unwrap().len(),
            1,
            "an admitted place is not given back"
        );
        // Closed during the upgrade: the shared place is given back too.
        let mut late = ch.reserve_unchecked().unwrap();
        let log = Arc::clone(&given_back);
        late.assign(
            ClientId::from_raw(7),
            Box::new(move |id| log.lock().unwrap().push(id)),
        );
        ch.close(CloseReason::ChannelDeleted);
        assert_eq!(late.admit(LIMITS).unwrap_err(), CloseReason::ChannelDeleted);
        assert_eq!(
            given_back.lock().unwrap().last(),
            Some(&ClientId::from_raw(7))
        );
    }

    #[test]
    fn disconnect_all_keeps_the_channel_open() {
        let ch = channel(None, None);
        let (_, client) = ch.reserve().unwrap().admit(LIMITS).unwrap();
        assert_eq!(ch.disconnect_all(CloseReason::ServerShutdown), 1);
        assert_eq!(
            client.outbox.close_reason(),
            Some(CloseReason::ServerShutdown)
        );
        assert!(ch.reserve().is_ok());
    }

    #[test]
    fn client_ids_are_unique_and_in_join_order() {
        let ch = channel(None, None);
        let ids: Vec<_> = (0..50)
            .map(|_| ch.reserve().unwrap().admit(LIMITS).unwrap().1.id())
            .collect();
        let listed: Vec<_> = ch.clients().into_iter().map(|(id, _)| id).collect();
        assert_eq!(listed, ids);
        let members = ch.members();
        assert_eq!(members.position(ids[7]), Some(7));
    }

    #[test]
    fn countdown_follows_activity() {
        let never = channel(None, None);
        assert_eq!(never.countdown_ms(), None);
        let ch = channel(None, Some(Duration::from_secs(60)));
        let countdown = ch.countdown_ms().unwrap();
        assert!(countdown <= 60_000 && countdown > 59_000, "{countdown}");
        ch.last_activity_ms.store(0, Ordering::Relaxed);
        let before = ch.deadline_ms().unwrap();
        ch.touch();
        assert!(ch.deadline_ms().unwrap() >= before);
    }
}
