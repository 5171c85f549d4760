//! Joining NATS: the connection (credentials, TLS, reconnects), the check
//! that NATS can carry the largest message, and the key-value buckets,
//! opened — or created, or updated when the settings changed.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::kv;
use tokio::time::Instant;
use tracing::{info, warn};

use super::history::HistoryStream;
use super::records::{ChannelRecord, Counts, NodeRecord, Segment};
use super::store::Bucket;
use super::{ClusterError, ClusterSettings, MISSED_HEARTBEATS};

/// How long the marker of an ended channel stays in the `channels` bucket,
/// so that a node whose watch was down meanwhile still learns how it ended.
pub const END_MARKER_TTL: Duration = Duration::from_secs(15 * 60);

/// Room for the headers WRS puts on a relayed message (channel id, sender,
/// kind, target, mode: well under 300 bytes).
pub const HEADER_ROOM: usize = 1024;

/// The NATS connection and the cluster's buckets.
#[derive(Debug)]
pub struct Store {
    pub client: async_nats::Client,
    pub channels: Bucket<ChannelRecord>,
    /// Roster segments, `<channel>.<node>.<seq>`.
    pub rosters: Bucket<Segment>,
    /// Clients per node of channels with a `clientLimit`.
    pub counts: Bucket<Counts>,
    /// Last activity of each channel, ms since the Unix epoch.
    pub activity: Bucket<u64>,
    pub nodes: Bucket<NodeRecord>,
    /// The history of channels that keep one.
    pub history: HistoryStream,
}

impl Store {
    /// Connects to NATS (retrying for `connect_timeout`) and opens the
    /// buckets, creating them if needed.
    ///
    /// # Errors
    ///
    /// [`ClusterError`]: NATS unreachable or too small, or a bucket that
    /// cannot be opened.
    pub async fn open(settings: &ClusterSettings) -> Result<Store, ClusterError> {
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
        let deadline = Instant::now() + settings.connect_timeout;
        let open = |config: kv::Config| open_bucket(&jetstream, config, deadline);
        // An ended channel is one write: its values purged, a marker with
        // the reason left for a while (message TTLs, NATS 2.11 or newer).
        let channels = kv::Config {
            limit_markers: Some(END_MARKER_TTL),
            ..bucket("channels", Duration::ZERO)
        };
        let channels = Bucket::new(open(channels).await?, jetstream.clone());
        let rosters = Bucket::new(
            open(bucket("rosters", Duration::ZERO)).await?,
            jetstream.clone(),
        );
        let counts = Bucket::new(
            open(bucket("counts", Duration::ZERO)).await?,
            jetstream.clone(),
        );
        // Timeouts are at most 30 days; stale activity ages out after that.
        let activity = Bucket::new(
            open(bucket("activity", Duration::from_secs(31 * 24 * 3600))).await?,
            jetstream.clone(),
        );
        let nodes = Bucket::new(
            open(bucket("nodes", settings.heartbeat * 10 * MISSED_HEARTBEATS)).await?,
            jetstream.clone(),
        );
        let history = super::history::open(&jetstream, &settings.prefix, settings.kv_replicas)
            .await
            .map_err(|reason| ClusterError::Bucket {
                bucket: format!("{}-history", settings.prefix),
                reason,
            })?;
        info!(node = %settings.node_id, prefix = %settings.prefix, urls = %settings.urls, "joined the cluster");
        Ok(Store {
            client,
            channels,
            rosters,
            counts,
            activity,
            nodes,
            history,
        })
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// Opens a bucket, retrying until `deadline`: a NATS cluster that is
/// starting needs a moment to elect its JetStream leader. Nodes of a first
/// deploy start together and race to create the buckets; updating a
/// replicated stream that another node is still creating stalls, so a
/// bucket that exists is opened as it is (updated only when its settings
/// differ), and only a missing one is created (the loser of a race then
/// opens it).
async fn open_bucket(
    jetstream: &async_nats::jetstream::Context,
    config: kv::Config,
    deadline: Instant,
) -> Result<kv::Store, ClusterError> {
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
            Err(reason) => {
                return Err(ClusterError::Bucket {
                    bucket: name,
                    reason,
                });
            }
        }
    }
}

/// Whether an existing bucket's settings differ from what this node wants
/// (the operator changed replicas or the heartbeat, or an earlier version
/// made it).
async fn settings_differ(store: &kv::Store, wanted: &kv::Config) -> bool {
    let Ok(status) = store.status().await else {
        return false;
    };
    let have = &status.info.config;
    have.num_replicas != wanted.num_replicas
        || have.max_age != wanted.max_age
        || have.max_messages_per_subject != wanted.history
        || have.allow_message_ttl != wanted.limit_markers.is_some()
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

    #[test]
    fn the_largest_message_must_fit_with_its_headers() {
        assert!(check_max_payload(2 * 1024 * 1024, 1024 * 1024).is_ok());
        let error = check_max_payload(1024 * 1024, 1024 * 1024).unwrap_err();
        assert!(matches!(
            error,
            ClusterError::PayloadTooSmall {
                needed: 1_049_600,
                fits: 1_047_552,
                ..
            }
        ));
    }

    #[test]
    fn server_lists_are_comma_separated() {
        assert_eq!(
            server_list("nats://a:4222, nats://b:4222").unwrap().len(),
            2
        );
        assert!(server_list("nats://a:4222,::bad").is_err());
    }
}
