//! All channels of this node, by id.
//!
//! A sharded map: creating, finding and deleting channels never takes a
//! lock that the message path needs (connections hold their channel
//! directly and never look it up again).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio_util::sync::CancellationToken;

use super::Clock;
use super::channel::{Channel, ChannelSpec};
use super::ids::{ChannelId, Token};

/// Why a channel cannot be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("this node already holds its maximum of {max} channels")]
    TooManyChannels { max: usize },
    #[error("could not find a free channel id; raise WRS_ID_LENGTH")]
    IdsExhausted,
}

/// Attempts at drawing an unused id before giving up.
const ID_ATTEMPTS: usize = 16;

#[derive(Debug)]
pub struct Registry {
    channels: DashMap<ChannelId, Arc<Channel>>,
    /// Channels held, kept exact so the limit holds under concurrent creates.
    count: AtomicUsize,
    max_channels: usize,
    id_bytes: usize,
    token_length: usize,
}

impl Registry {
    pub fn new(max_channels: usize, id_bytes: usize, token_length: usize) -> Self {
        Self {
            channels: DashMap::new(),
            count: AtomicUsize::new(0),
            max_channels,
            id_bytes,
            token_length,
        }
    }

    /// Creates a channel with a fresh id and token; the token is returned
    /// once, here, and only its digest is kept.
    ///
    /// # Errors
    ///
    /// [`CreateError`] at the channel limit or when no free id was found.
    pub fn create(
        &self,
        spec: ChannelSpec,
        clock: Clock,
        closed: CancellationToken,
    ) -> Result<(Arc<Channel>, Token), CreateError> {
        let held = self.count.fetch_add(1, Ordering::AcqRel);
        if held >= self.max_channels {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(CreateError::TooManyChannels {
                max: self.max_channels,
            });
        }
        for _ in 0..ID_ATTEMPTS {
            if let Entry::Vacant(slot) = self.channels.entry(ChannelId::random(self.id_bytes)) {
                let id = slot.key().clone();
                let token = Token::random(self.token_length);
                let channel = Arc::new(Channel::new(
                    id,
                    spec,
                    token.digest(),
                    SystemTime::now(),
                    clock,
                    closed,
                ));
                slot.insert(Arc::clone(&channel));
                return Ok((channel, token));
            }
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
        Err(CreateError::IdsExhausted)
    }

    /// Whether this node may hold one more channel.
    ///
    /// # Errors
    ///
    /// [`CreateError::TooManyChannels`] at the limit.
    pub fn check_room(&self) -> Result<(), CreateError> {
        if self.count() >= self.max_channels {
            Err(CreateError::TooManyChannels {
                max: self.max_channels,
            })
        } else {
            Ok(())
        }
    }

    /// Adds a channel that exists elsewhere (the cluster's registry). Keeps
    /// the one already held under that id; returns the channel held and
    /// whether it is the one just given.
    pub fn adopt(&self, channel: Arc<Channel>) -> (Arc<Channel>, bool) {
        match self.channels.entry(channel.id().clone()) {
            Entry::Occupied(held) => (Arc::clone(held.get()), false),
            Entry::Vacant(slot) => {
                self.count.fetch_add(1, Ordering::AcqRel);
                slot.insert(Arc::clone(&channel));
                (channel, true)
            }
        }
    }

    pub fn id_bytes(&self) -> usize {
        self.id_bytes
    }

    pub fn token_length(&self) -> usize {
        self.token_length
    }

    pub fn get(&self, id: &ChannelId) -> Option<Arc<Channel>> {
        self.channels.get(id).map(|entry| Arc::clone(entry.value()))
    }

    /// Removes a channel by id; the caller closes it.
    pub fn remove(&self, id: &ChannelId) -> Option<Arc<Channel>> {
        let removed = self.channels.remove(id).map(|(_, channel)| channel);
        if removed.is_some() {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Removes exactly this channel (not a later one that reused its id).
    pub fn remove_exact(&self, channel: &Arc<Channel>) -> bool {
        let removed = self
            .channels
            .remove_if(channel.id(), |_, held| Arc::ptr_eq(held, channel))
            .is_some();
        if removed {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Every channel, oldest first.
    pub fn list(&self) -> Vec<Arc<Channel>> {
        let mut all: Vec<_> = self
            .channels
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        all.sort_by(|a, b| {
            a.created_at()
                .cmp(&b.created_at())
                .then_with(|| a.id().cmp(b.id()))
        });
        all
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::pattern::Pattern;

    const SPEC: ChannelSpec = ChannelSpec {
        pattern: Pattern::Echo,
        client_limit: None,
        timeout: None,
        welcome: false,
    };

    fn create(registry: &Registry) -> Result<Arc<Channel>, CreateError> {
        registry
            .create(SPEC, Clock::new(), CancellationToken::new())
            .map(|(channel, _)| channel)
    }

    #[test]
    fn create_get_remove() {
        let registry = Registry::new(10, 4, 16);
        let (channel, token) = registry
            .create(SPEC, Clock::new(), CancellationToken::new())
            .unwrap();
        assert_eq!(token.reveal().len(), 16);
        assert!(channel.token().matches(token.reveal()));
        assert!(Arc::ptr_eq(&registry.get(channel.id()).unwrap(), &channel));
        assert_eq!(registry.count(), 1);
        assert!(registry.remove(channel.id()).is_some());
        assert!(registry.remove(channel.id()).is_none());
        assert!(!registry.remove_exact(&channel));
        assert_eq!(registry.count(), 0);
    }

    #[test]
    fn enforces_the_channel_limit() {
        let registry = Registry::new(2, 4, 16);
        let a = create(&registry).unwrap();
        create(&registry).unwrap();
        assert_eq!(
            create(&registry).unwrap_err(),
            CreateError::TooManyChannels { max: 2 }
        );
        assert!(registry.remove_exact(&a));
        assert!(create(&registry).is_ok());
        assert_eq!(registry.count(), 2);
    }

    #[test]
    fn a_tiny_id_space_reports_exhaustion_instead_of_spinning() {
        // Two id bytes give 65 536 ids; fill most of them.
        let registry = Registry::new(usize::MAX, 2, 8);
        let mut exhausted = false;
        for _ in 0..70_000 {
            if matches!(create(&registry), Err(CreateError::IdsExhausted)) {
                exhausted = true;
                break;
            }
        }
        assert!(exhausted);
        assert!(registry.count() <= 65_536);
    }

    #[test]
    fn adopting_keeps_the_channel_already_held() {
        let registry = Registry::new(10, 4, 16);
        let mine = create(&registry).unwrap();
        let twin = Arc::new(Channel::new(
            mine.id().clone(),
            SPEC,
            Token::random(16).digest(),
            SystemTime::now(),
            Clock::new(),
            CancellationToken::new(),
        ));
        assert!(Arc::ptr_eq(&registry.adopt(twin).0, &mine));
        assert_eq!(registry.count(), 1);
        let stranger = Arc::new(Channel::new(
            ChannelId::parse("ABCD-0123").unwrap(),
            SPEC,
            Token::random(16).digest(),
            SystemTime::now(),
            Clock::new(),
            CancellationToken::new(),
        ));
        assert!(Arc::ptr_eq(
            &registry.adopt(Arc::clone(&stranger)).0,
            &stranger
        ));
        assert_eq!(registry.count(), 2);
    }

    #[test]
    fn lists_oldest_first() {
        let registry = Registry::new(10, 4, 16);
        let ids: Vec<_> = (0..5)
            .map(|_| create(&registry).unwrap().id().clone())
            .collect();
        let listed: Vec<_> = registry.list().iter().map(|c| c.id().clone()).collect();
        let mut sorted_ids = ids.clone();
        sorted_ids.sort();
        let mut sorted_listed = listed.clone();
        sorted_listed.sort();
        assert_eq!(sorted_ids, sorted_listed);
        for pair in registry.list().windows(2) {
            assert!(pair[0].created_at() <= pair[1].created_at());
        }
    }
}
