//! A typed view of one JetStream key-value bucket: values are JSON of one
//! type, every operation retries transient failures (a NATS server lost,
//! leaders being elected) for up to [`STORE_RETRY`] with back-off, and
//! conditional writes report a lost race as a value, not an error.
//!
//! A value that cannot be decoded is an error ([`CoordinatorError::Corrupt`]),
//! never a default: writing back over it would lose what it holds.
//!
//! [`Bucket::follow`] is the one watch loop of the cluster: every current
//! entry first, then each change, restarted with a full replay after any
//! failure.

use std::marker::PhantomData;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::relay::coordinator::CoordinatorError;

/// How long a store operation is retried while NATS fails over before the
/// request gives up (with 503).
pub const STORE_RETRY: Duration = Duration::from_secs(10);

/// Pause before a failed watch is set up again.
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// How often an idle watch hears from its consumer; two missed in a row
/// (the consumer was lost with its NATS server) start the watch over.
const WATCH_HEARTBEAT: Duration = Duration::from_secs(1);

/// Headers NATS sets on watch messages.
const KV_OPERATION: &str = "KV-Operation";
const LAST_CONSUMER: &str = "Nats-Last-Consumer";
const MARKER_REASON: &str = "Nats-Marker-Reason";

/// A value and the revision it was read (or written) at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
    /// Bytes of the stored value.
    pub size: usize,
}

/// What a watch of a bucket reports.
#[derive(Debug)]
pub enum Seen {
    /// A key's value, as stored: [`Bucket::decode`] reads it (a watcher
    /// may skip values it does not need).
    Value {
        key: String,
        revision: u64,
        /// When it was written.
        written: std::time::SystemTime,
        raw: Bytes,
    },
    /// A key was deleted or purged; `marker` is what the marker carried.
    Removed { key: String, marker: Bytes },
    /// Every entry present when the watch (re)started has been reported.
    Current,
    /// The watch failed and starts over with a full replay.
    Restarting,
}

/// One bucket holding values of type `T`.
#[derive(Debug)]
pub struct Bucket<T> {
    store: kv::Store,
    jetstream: async_nats::jetstream::Context,
    /// The subject prefix of the bucket's keys (`$KV.<bucket>.`).
    prefix: String,
    _values: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Bucket<T> {
    pub fn new(store: kv::Store, jetstream: async_nats::jetstream::Context) -> Self {
        let prefix = store
            .put_prefix
            .clone()
            .unwrap_or_else(|| store.prefix.clone());
        Self {
            store,
            jetstream,
            prefix,
            _values: PhantomData,
        }
    }

    pub fn name(&self) -> &str {
        &self.store.name
    }

    /// The stored form of `value`.
    ///
    /// # Errors
    ///
    /// Only for values serde cannot write (never for the record types).
    pub fn encode(value: &T) -> Result<Bytes, CoordinatorError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))
    }

    /// Reads a stored value.
    ///
    /// # Errors
    ///
    /// [`CoordinatorError::Corrupt`] naming the key and revision.
    pub fn decode(&self, key: &str, revision: u64, raw: &[u8]) -> Result<T, CoordinatorError> {
        serde_json::from_slice(raw).map_err(|e| CoordinatorError::Corrupt {
            what: format!("{} {key:?} at revision {revision}", self.store.name),
            reason: e.to_string(),
        })
    }

    /// The current value of `key`.
    ///
    /// # Errors
    ///
    /// Unavailable after the retries, or `Corrupt`.
    pub async fn get(&self, key: &str) -> Result<Option<Versioned<T>>, CoordinatorError> {
        let mut retry = Retry::new();
        let entry = loop {
            match self.store.entry(key).await {
                Ok(entry) => break entry,
                Err(e) => retry.wait(e).await?,
            }
        };
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            // A direct get may be answered by a replica that has not yet
            // caught up with a write another node just made (replicated
            // buckets): a miss is asked of the stream's leader once more,
            // so a channel created on one node is found at once on any.
            return self.get_from_leader(key).await;
        };
        Ok(Some(Versioned {
            value: self.decode(key, entry.revision, &entry.value)?,
            revision: entry.revision,
            size: entry.value.len(),
        }))
    }

    /// The value under `key` as the stream's leader has it.
    async fn get_from_leader(&self, key: &str) -> Result<Option<Versioned<T>>, CoordinatorError> {
        let subject = format!("{}{key}", self.prefix);
        let mut retry = Retry::new();
        let message = loop {
            match self.store.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => break message,
                Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                    return Ok(None);
                }
                Err(e) => retry.wait(e).await?,
            }
        };
        // Deletes and purges are markers with an operation header.
        if message.headers.get("KV-Operation").is_some() {
            return Ok(None);
        }
        Ok(Some(Versioned {
            value: self.decode(key, message.sequence, &message.payload)?,
            revision: message.sequence,
            size: message.payload.len(),
        }))
    }

    /// Stores `value` under `key` unless the key holds a value; `None` if
    /// it does.
    ///
    /// # Errors
    ///
    /// Unavailable after the retries.
    pub async fn create(&self, key: &str, value: &T) -> Result<Option<u64>, CoordinatorError> {
        let bytes = Self::encode(value)?;
        let mut retry = Retry::new();
        loop {
            match self.store.create(key, bytes.clone()).await {
                Ok(revision) => return Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(None),
                Err(e) => retry.wait(e).await?,
            }
        }
    }

    /// Stores `value` if the key is still at `revision` (0: absent);
    /// `None` if someone wrote first.
    ///
    /// # Errors
    ///
    /// Unavailable after the retries.
    pub async fn update(
        &self,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<Option<u64>, CoordinatorError> {
        self.update_encoded(key, Self::encode(value)?, revision)
            .await
    }

    /// [`Bucket::update`] with the value already encoded.
    ///
    /// # Errors
    ///
    /// Unavailable after the retries.
    pub async fn update_encoded(
        &self,
        key: &str,
        bytes: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, CoordinatorError> {
        let mut retry = Retry::new();
        if revision == 0 {
            loop {
                match self.store.create(key, bytes.clone()).await {
                    Ok(revision) => return Ok(Some(revision)),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(None),
                    Err(e) => retry.wait(e).await?,
                }
            }
        }
        loop {
            match self.store.update(key, bytes.clone(), revision).await {
                Ok(revision) => return Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(None),
                Err(e) => retry.wait(e).await?,
            }
        }
    }

    /// Stores `value` whatever the key holds.
    ///
    /// # Errors
    ///
    /// Unavailable (no retries: callers write again on their next beat).
    pub async fn put(&self, key: &str, value: &T) -> Result<u64, CoordinatorError> {
        self.store
            .put(key, Self::encode(value)?)
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))
    }

    /// Deletes `key` (if still at `revision`, when given); false if the
    /// revision did not match.
    ///
    /// # Errors
    ///
    /// Unavailable after the retries.
    pub async fn delete(&self, key: &str, revision: Option<u64>) -> Result<bool, CoordinatorError> {
        let mut retry = Retry::new();
        loop {
            match self.store.delete_expect_revision(key, revision).await {
                Ok(()) => return Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(false),
                Err(e) => retry.wait(e).await?,
            }
        }
    }

    /// Ends `key` in one write, if it is still at `revision`: all its
    /// values are purged and a marker carrying `marker` stays for `ttl`
    /// (watchers see the marker with its payload; then the key is gone for
    /// good). False if the revision did not match.
    ///
    /// # Errors
    ///
    /// Unavailable after the retries.
    pub async fn purge_with_marker(
        &self,
        key: &str,
        revision: u64,
        marker: Bytes,
        ttl: Duration,
    ) -> Result<bool, CoordinatorError> {
        let subject = format!("{}{key}", self.prefix);
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "PURGE");
        headers.insert("Nats-Rollup", "sub");
        headers.insert("Nats-TTL", ttl.as_secs().max(1).to_string().as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            revision.to_string().as_str(),
        );
        let mut retry = Retry::new();
        loop {
            let published = self
                .jetstream
                .publish_with_headers(subject.clone(), headers.clone(), marker.clone())
                .await;
            let acked = match published {
                Ok(ack) => ack.await,
                Err(e) => {
                    retry.wait(e).await?;
                    continue;
                }
            };
            match acked {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => return Ok(false),
                Err(e) => retry.wait(e).await?,
            }
        }
    }

    /// Every key that holds a value.
    ///
    /// # Errors
    ///
    /// Unavailable.
    pub async fn keys(&self) -> Result<Vec<String>, CoordinatorError> {
        let keys = self
            .store
            .keys()
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        keys.try_collect()
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))
    }

    /// The value of `key` and when it was written.
    ///
    /// # Errors
    ///
    /// Unavailable, or `Corrupt`.
    pub async fn get_with_time(
        &self,
        key: &str,
    ) -> Result<Option<(T, std::time::SystemTime)>, CoordinatorError> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let value = self.decode(key, entry.revision, &entry.value)?;
        Ok(Some((value, std::time::SystemTime::from(entry.created))))
    }

    /// Reports every entry of the bucket to `on`, then every change, until
    /// `stop`; after a failure it starts over with a full replay (preceded
    /// by [`Seen::Restarting`]).
    pub async fn follow<F>(&self, stop: &CancellationToken, mut on: F)
    where
        F: FnMut(Seen),
    {
        loop {
            self.follow_once(stop, &mut on).await;
            if stop.is_cancelled() {
                return;
            }
            on(Seen::Restarting);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(WATCH_RETRY) => {}
            }
        }
    }

    async fn follow_once<F>(&self, stop: &CancellationToken, on: &mut F)
    where
        F: FnMut(Seen),
    {
        // The watch is a push consumer of its own rather than the
        // library's ordered watch: that one notices a consumer lost with
        // its NATS server only after ten silent seconds, this one after
        // two missed heartbeats of `WATCH_HEARTBEAT`. Any gap or failure
        // ends it; `follow` then replays the bucket.
        let client = self.jetstream.client();
        let inbox = client.new_inbox();
        let mut messages = match client.subscribe(inbox.clone()).await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(bucket = %self.store.name, %error, "cannot watch the bucket");
                return;
            }
        };
        let config = push::Config {
            deliver_subject: inbox,
            description: Some("wrs watch".to_owned()),
            filter_subject: format!("{}>", self.store.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            max_deliver: 1,
            replay_policy: ReplayPolicy::Instant,
            idle_heartbeat: WATCH_HEARTBEAT,
            inactive_threshold: WATCH_HEARTBEAT * 5,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        // While NATS elects new leaders a request can go unanswered; the
        // watch asks again soon rather than after the client's ten-second
        // request timeout (a consumer made after all finds no subscriber
        // and is removed by NATS).
        let created = tokio::time::timeout(
            WATCH_HEARTBEAT * 2,
            self.store.stream.create_consumer(config),
        );
        let consumer = match created.await {
            Ok(Ok(consumer)) => consumer,
            Ok(Err(error)) => {
                warn!(bucket = %self.store.name, %error, "cannot watch the bucket");
                return;
            }
            Err(_) => {
                warn!(bucket = %self.store.name, "no answer to a watch; asking again");
                return;
            }
        };
        // Read when the consumer was made: nothing to replay means the
        // (empty) replay is complete now.
        let mut current = consumer.cached_info().num_pending == 0;
        if current {
            on(Seen::Current);
        }
        let mut delivered = 0;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = tokio::time::timeout(WATCH_HEARTBEAT * 2, messages.next()) => message,
            };
            let message = match message {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(_) => {
                    warn!(bucket = %self.store.name, "watch silent (NATS server lost?); replaying the bucket");
                    return;
                }
            };
            if let Some(status) = message.status {
                if status != async_nats::StatusCode::IDLE_HEARTBEAT {
                    warn!(bucket = %self.store.name, %status, "watch ended by the server; replaying the bucket");
                    return;
                }
                // An idle heartbeat: the consumer is alive. One that
                // reports a later delivery than ours means messages
                // were lost on the way.
                let last = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(LAST_CONSUMER))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                if last.is_some_and(|last| last != delivered) {
                    warn!(bucket = %self.store.name, "watch missed changes; replaying the bucket");
                    return;
                }
                continue;
            }
            let message = async_nats::jetstream::Message {
                message,
                context: self.jetstream.clone(),
            };
            let Ok(info) = message.info() else {
                warn!(bucket = %self.store.name, "watch got a message without metadata; replaying the bucket");
                return;
            };
            if info.consumer_sequence != delivered + 1 {
                warn!(bucket = %self.store.name, "watch missed changes; replaying the bucket");
                return;
            }
            delivered = info.consumer_sequence;
            let (revision, pending, published) =
                (info.stream_sequence, info.pending, info.published);
            let message = message.message;
            let Some(key) = message.subject.strip_prefix(self.store.prefix.as_str()) else {
                continue;
            };
            // Deletes and purges say so; a marker NATS leaves when a
            // value ages out names its reason instead.
            let removed = message.headers.as_ref().is_some_and(|h| {
                h.get(KV_OPERATION).is_some_and(|op| op.as_str() != "PUT")
                    || h.get(MARKER_REASON).is_some()
            });
            let seen = if removed {
                Seen::Removed {
                    key: key.to_owned(),
                    marker: message.payload,
                }
            } else {
                Seen::Value {
                    written: std::time::SystemTime::from(published),
                    key: key.to_owned(),
                    revision,
                    raw: message.payload,
                }
            };
            on(seen);
            if !current && pending == 0 {
                current = true;
                on(Seen::Current);
            }
        }
    }
}

/// Retries transient store failures with back-off for [`STORE_RETRY`].
pub struct Retry {
    deadline: Instant,
    delay: Duration,
}

impl Retry {
    pub fn new() -> Self {
        Self {
            deadline: Instant::now() + STORE_RETRY,
            delay: Duration::from_millis(25),
        }
    }

    /// Waits before the next attempt, or gives up with the error.
    ///
    /// # Errors
    ///
    /// [`CoordinatorError::Unavailable`] once the time is up.
    pub async fn wait<E: std::fmt::Display>(&mut self, error: E) -> Result<(), CoordinatorError> {
        if Instant::now() + self.delay > self.deadline {
            return Err(CoordinatorError::Unavailable(error.to_string()));
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}
