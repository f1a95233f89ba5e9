//! `cache-updater rebuild`: rebuilds the read model from the `events` topic.
//!
//! 1. The end offsets (high watermarks) of every partition of `events` are captured first: the
//!    rebuild replays exactly what was in the topic when it started.
//! 2. The stack's documents (`<REDIS_KEY_PREFIX>doc:*`) are removed with `SCAN` + `UNLINK`
//!    ([`readmodel::clear`]); nothing else in Redis is touched (never `FLUSHDB`: other stacks
//!    and the rooms' history share the instance).
//! 3. A consumer with a fresh, unique group id and a manual assignment reads every partition
//!    from its earliest retained offset and applies each event with the same version-guarded
//!    script as the live updater; it commits nothing, so the live group is unaffected.
//! 4. When every partition reached its captured end offset, it prints a summary and exits.
//!
//! It neither notifies rooms nor publishes invalidations: the replayed states are ones clients
//! have already seen. A live updater may keep running meanwhile: both write through the version
//! guard, so the newest version wins whichever writes last. Rebuilding reproduces the whole
//! model only if `events` retains every event (infinite retention); with time-based
//! retention it rebuilds what is retained, and later writes fill in the rest.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable as _};
use common::kafka::TOPIC_EVENTS;
use common::readmodel::{self, Outcome};
use common::shutdown::CancellationToken;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message as _, Offset, TopicPartitionList};

use crate::{Config, NAME};

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Documents removed before the replay.
    pub cleared: u64,
    /// Partitions of `events`.
    pub partitions: usize,
    /// Messages read up to the captured end offsets.
    pub events: u64,
    /// Events that changed the read model.
    pub applied: u64,
    /// Events skipped by the version guard (superseded by a later event).
    pub stale: u64,
    /// Messages that were not event envelopes.
    pub malformed: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rebuild complete: cleared {} documents, replayed {} events from {} partitions \
             ({} applied, {} superseded, {} malformed) in {:.1} s",
            self.cleared,
            self.events,
            self.partitions,
            self.applied,
            self.stale,
            self.malformed,
            self.elapsed.as_secs_f64()
        )
    }
}

/// The rebuild failed.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Redis could not be reached or a command failed.
    #[error("failed to write the read model: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Redis client could not be built (`REDIS_URL`, `REDIS_CA_FILE`).
    #[error(transparent)]
    RedisClient(#[from] common::redis::RedisError),
    /// Kafka could not be reached or the topic could not be read.
    #[error("failed to read the events topic: {0}")]
    Kafka(#[from] KafkaError),
    /// The topic does not exist.
    #[error("topic {0} does not exist")]
    NoTopic(String),
    /// A signal stopped the replay; the read model is partial.
    #[error("interrupted; the read model is partial (run the rebuild again)")]
    Interrupted,
    /// No message arrived for too long before the end offsets were reached.
    #[error("no progress for {0:?} before reaching the end offsets")]
    Stalled(Duration),
}

/// How long the replay may go without a message before it gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Replays `events` into an emptied read model (see the module docs).
pub async fn rebuild(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Summary, RebuildError> {
    let started = Instant::now();
    let topic = config.kafka.topic(TOPIC_EVENTS);
    let prefix = &config.redis.redis_key_prefix;
    let timeout = Duration::from_millis(config.kafka.kafka_timeout_ms.max(1000));

    let group = format!(
        "{}rebuild-{}",
        config.consumer_group(),
        uuid::Uuid::now_v7()
    );
    let consumer = common::kafka::assigned_consumer(&config.kafka, NAME, &group)?;
    // Metadata and watermark calls block briefly; this runs once, before the replay.
    let partitions = common::kafka::partitions(&consumer, &topic, timeout)?;
    if partitions.is_empty() {
        return Err(RebuildError::NoTopic(topic));
    }
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        // A topic created moments ago may not have its partition leaders yet: retry briefly.
        let fetch = || async { consumer.fetch_watermarks(&topic, partition, timeout) };
        let (low, high) = fetch
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_times(6),
            )
            .sleep(tokio::time::sleep)
            .when(|error| {
                matches!(
                    error,
                    KafkaError::MetadataFetch(
                        RDKafkaErrorCode::NotLeaderForPartition
                            | RDKafkaErrorCode::LeaderNotAvailable
                    )
                )
            })
            .await?;
        if high > low {
            remaining.insert(partition, high);
            assignment.add_partition_offset(&topic, partition, Offset::Offset(low))?;
        }
    }
    tracing::info!(%topic, partitions = partitions.len(), ends = ?remaining, "Captured the end offsets.");

    let client = common::redis::client_for(&config.redis)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let cleared = readmodel::clear(&mut conn, prefix).await?;
    tracing::info!(cleared, "Cleared the read model.");

    let mut summary = Summary {
        cleared,
        partitions: partitions.len(),
        ..Summary::default()
    };
    let tombstone_ttl = Duration::from_secs(config.cache.cache_tombstone_ttl_seconds.max(1));
    if !remaining.is_empty() {
        consumer.assign(&assignment)?;
    }
    while !remaining.is_empty() {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Err(RebuildError::Interrupted),
            received = tokio::time::timeout(STALL_TIMEOUT, consumer.recv()) => {
                received.map_err(|_| RebuildError::Stalled(STALL_TIMEOUT))??
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        let Some(&end) = remaining.get(&partition) else {
            continue; // past this partition's captured end
        };
        summary.events += 1;
        match crate::updater::parse(message.payload()) {
            Ok(event) => match readmodel::apply(&mut conn, prefix, &event, tombstone_ttl).await? {
                Outcome::Applied => summary.applied += 1,
                Outcome::Stale => summary.stale += 1,
            },
            Err(reason) => {
                summary.malformed += 1;
                tracing::warn!(partition, offset, reason, "Skipping a malformed event.");
            }
        }
        if offset + 1 >= end {
            remaining.remove(&partition);
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The `rebuild` subcommand's entry point: configuration from the environment, telemetry,
/// stop on SIGTERM/SIGINT, summary on stdout.
pub fn main() -> anyhow::Result<()> {
    common::service::run_job::<crate::CacheUpdater, _, _>(|config, shutdown| async move {
        let summary = rebuild(&config, &shutdown).await?;
        tracing::info!(?summary, "Rebuild complete.");
        println!("{summary}");
        Ok(())
    })
}
