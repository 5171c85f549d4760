//! All channels of this node, by id.
//!
//! A sharded map: creating, finding and deleting channels never takes a
//! lock that the message path needs (connections hold their channel
//! directly and never look it up again).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::channel::Channel;
use super::ids::ChannelId;

/// Why a channel cannot be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("the maximum of {max} channels is reached (WRS_MAX_CHANNELS)")]
    TooManyChannels { max: usize },
    #[error("could not find a free channel id; raise WRS_ID_LENGTH")]
    IdsExhausted,
}

#[derive(Debug, Default)]
pub struct Registry {
    channels: DashMap<ChannelId, Arc<Channel>>,
    /// Channels held, kept exact so the limit holds under concurrent creates.
    count: AtomicUsize,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a channel created here, unless `limit` channels are held or
    /// its id is taken (`Ok(false)`).
    ///
    /// # Errors
    ///
    /// [`CreateError::TooManyChannels`] at the limit.
    pub fn insert(&self, channel: Arc<Channel>, limit: usize) -> Result<bool, CreateError> {
        let held = self.count.fetch_add(1, Ordering::AcqRel);
        if held >= limit {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(CreateError::TooManyChannels { max: limit });
        }
        match self.channels.entry(channel.id().clone()) {
            Entry::Vacant(slot) => {
                slot.insert(channel);
                Ok(true)
            }
            Entry::Occupied(_) => {
                self.count.fetch_sub(1, Ordering::AcqRel);
                Ok(false)
            }
        }
    }

    /// Whether one more channel fits under `limit`.
    ///
    /// # Errors
    ///
    /// [`CreateError::TooManyChannels`] at the limit.
    pub fn check_room(&self, limit: usize) -> Result<(), CreateError> {
        if self.count() >= limit {
            Err(CreateError::TooManyChannels { max: limit })
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
    use std::time::SystemTime;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::relay::channel::ChannelSpec;
    use crate::relay::clock::Clock;
    use crate::relay::ids::Token;
    use crate::relay::pattern::Pattern;

    const SPEC: ChannelSpec = ChannelSpec {
        pattern: Pattern::Echo,
        client_limit: None,
        timeout: None,
        welcome: false,
        history: None,
    };

    fn channel(id: &str) -> Arc<Channel> {
        Arc::new(Channel::new(
            ChannelId::parse(id).unwrap(),
            SPEC,
            Token::random(16).digest(),
            SystemTime::now(),
            Clock::new(),
            CancellationToken::new(),
        ))
    }

    #[test]
    fn insert_get_remove() {
        let registry = Registry::new();
        let a = channel("AAAA-0001");
        assert_eq!(registry.insert(Arc::clone(&a), 10), Ok(true));
        assert!(Arc::ptr_eq(&registry.get(a.id()).unwrap(), &a));
        assert_eq!(registry.count(), 1);
        // The id is taken: the second one is not added and not counted.
        assert_eq!(registry.insert(channel("AAAA-0001"), 10), Ok(false));
        assert_eq!(registry.count(), 1);
        assert!(registry.remove(a.id()).is_some());
        assert!(registry.remove(a.id()).is_none());
        assert!(!registry.remove_exact(&a));
        assert_eq!(registry.count(), 0);
    }

    #[test]
    fn enforces_the_channel_limit() {
        let registry = Registry::new();
        let a = channel("AAAA-0001");
        registry.insert(Arc::clone(&a), 2).unwrap();
        registry.insert(channel("AAAA-0002"), 2).unwrap();
        assert_eq!(
            registry.insert(channel("AAAA-0003"), 2),
            Err(CreateError::TooManyChannels { max: 2 })
        );
        assert_eq!(
            registry.check_room(2),
            Err(CreateError::TooManyChannels { max: 2 })
        );
        assert!(registry.remove_exact(&a));
        assert_eq!(registry.check_room(2), Ok(()));
        assert_eq!(registry.insert(channel("AAAA-0003"), 2), Ok(true));
        assert_eq!(registry.count(), 2);
    }

    #[test]
    fn adopting_keeps_the_channel_already_held_and_counts_past_the_limit() {
        let registry = Registry::new();
        let mine = channel("ABCD-0001");
        registry.insert(Arc::clone(&mine), 1).unwrap();
        let twin = channel("ABCD-0001");
        assert!(Arc::ptr_eq(&registry.adopt(twin).0, &mine));
        assert_eq!(registry.count(), 1);
        // Channels that exist elsewhere are held whatever the limit.
        let stranger = channel("ABCD-0123");
        let (held, new) = registry.adopt(Arc::clone(&stranger));
        assert!(new && Arc::ptr_eq(&held, &stranger));
        assert_eq!(registry.count(), 2);
    }

    #[test]
    fn lists_oldest_first() {
        let registry = Registry::new();
        for i in 0..5 {
            registry
                .insert(channel(&format!("AAAA-000{i}")), 10)
                .unwrap();
        }
        let listed = registry.list();
        assert_eq!(listed.len(), 5);
        for pair in listed.windows(2) {
            assert!(pair[0].created_at() <= pair[1].created_at());
        }
    }
}
