//! `cache-updater rebuild`: rebuilds the read model from the `events` topic.
//!
//! 1. Each pass starts by capturing the end offsets (high watermarks) of every partition of
//!    `events` and reads up to them.
//! 2. Pass 1 reads every partition up to those offsets and removes each document an event is
//!    about the first time it meets it ([`readmodel::unlink`]); nothing else in Redis is
//!    touched (never `FLUSHDB`: other stacks and the rooms' history share the instance). The
//!    stack's keys are never enumerated: `SCAN` is not confined to a key prefix, so the
//!    stack's Redis user may not run it. A document no retained event is about keeps its
//!    state.
//! 3. Pass 2 captures the end offsets again and reads every partition from its earliest
//!    retained offset to them, applying each event with the same version-guarded script as the
//!    live updater. Any event a running updater applied to a document after pass 1 removed it
//!    was in the topic before pass 2 started, so pass 2 replays it as well. Both passes use a
//!    consumer with a fresh, unique group id and a manual assignment; it commits nothing, so
//!    the live group is unaffected.
//! 4. When every partition reached its end offset, it prints a summary and exits.
//!
//! It neither notifies rooms nor publishes invalidations: the replayed states are ones clients
//! have already seen. A live updater may keep running meanwhile: both write through the version
//! guard, so the newest version wins whichever writes last. Rebuilding reproduces the whole
//! model only if `events` retains every event (infinite retention); with time-based
//! retention it rebuilds what is retained, and later writes fill in the rest.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable as _};
use common::kafka::TOPIC_EVENTS;
use common::readmodel::{self, Outcome};
use common::shutdown::CancellationToken;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use crate::{Config, NAME};

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Documents removed before the replay (those the retained events are about).
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

/// Rebuilds the read model from `events` (see the module docs).
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
    let mut conn = common::redis::connect_once(&config.redis).await?;
    let mut summary = Summary {
        partitions: partitions.len(),
        ..Summary::default()
    };

    // Pass 1: every document a retained event is about, removed the first time it is met.
    let mut pass = Pass::start(&consumer, &topic, &partitions, timeout).await?;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut batch: Vec<(String, String)> = Vec::new();
    while let Some(message) = pass.next(shutdown).await? {
        let Ok(event) = crate::updater::parse(message.payload()) else {
            continue; // counted in pass 2
        };
        if seen.insert(fingerprint(&event.collection, &event.id)) {
            batch.push((event.collection, event.id));
        }
        if batch.len() >= UNLINK_BATCH {
            summary.cleared += unlink(&mut conn, prefix, &mut batch).await?;
        }
    }
    summary.cleared += unlink(&mut conn, prefix, &mut batch).await?;
    drop(seen);
    tracing::info!(
        cleared = summary.cleared,
        "Cleared the documents the events are about."
    );

    // Pass 2: the events up to the end offsets captured now, so every event a running updater
    // applied meanwhile (to a document pass 1 may then have removed) is replayed too.
    let mut pass = Pass::start(&consumer, &topic, &partitions, timeout).await?;
    let tombstone_ttl = Duration::from_secs(config.cache.cache_tombstone_ttl_seconds.max(1));
    while let Some(message) = pass.next(shutdown).await? {
        summary.events += 1;
        match crate::updater::parse(message.payload()) {
            Ok(event) => match readmodel::apply(&mut conn, prefix, &event, tombstone_ttl).await? {
                Outcome::Applied => summary.applied += 1,
                Outcome::Stale => summary.stale += 1,
            },
            Err(reason) => {
                summary.malformed += 1;
                tracing::warn!(
                    partition = message.partition(),
                    offset = message.offset(),
                    reason,
                    "Skipping a malformed event."
                );
            }
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// How many documents one `UNLINK` removes.
const UNLINK_BATCH: usize = 512;

/// A document's identity in pass 1's set (8 bytes, so a model of millions of documents fits):
/// two documents sharing one would only leave the second's old state to the version guard.
fn fingerprint(collection: &str, id: &str) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = FINGERPRINT.build_hasher();
    hasher.write(collection.as_bytes());
    hasher.write_u8(0);
    hasher.write(id.as_bytes());
    hasher.finish()
}

static FINGERPRINT: std::sync::LazyLock<std::hash::RandomState> =
    std::sync::LazyLock::new(std::hash::RandomState::new);

async fn unlink(
    conn: &mut common::redis::RedisConnection,
    prefix: &str,
    batch: &mut Vec<(String, String)>,
) -> Result<u64, redis::RedisError> {
    let removed = readmodel::unlink(
        conn,
        prefix,
        batch.iter().map(|(c, i)| (c.as_str(), i.as_str())),
    )
    .await?;
    batch.clear();
    Ok(removed)
}

/// One read of `events` from each partition's earliest retained offset to its end offset at
/// the start of the pass.
struct Pass<'c> {
    consumer: &'c StreamConsumer,
    /// The end offset of each partition not read to its end yet.
    remaining: HashMap<i32, i64>,
}

impl<'c> Pass<'c> {
    async fn start(
        consumer: &'c StreamConsumer,
        topic: &str,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<Self, RebuildError> {
        let mut remaining: HashMap<i32, i64> = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for &partition in partitions {
            // A topic created moments ago may not have its partition leaders yet: retry briefly.
            let fetch = || async { consumer.fetch_watermarks(topic, partition, timeout) };
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
                assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
            }
        }
        tracing::info!(%topic, ends = ?remaining, "Captured the end offsets.");
        if !remaining.is_empty() {
            consumer.assign(&assignment)?;
        }
        Ok(Self {
            consumer,
            remaining,
        })
    }

    /// The next message before its partition's end offset; `None` once every partition was
    /// read to its end.
    async fn next(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<BorrowedMessage<'c>>, RebuildError> {
        while !self.remaining.is_empty() {
            let message = tokio::select! {
                () = shutdown.cancelled() => return Err(RebuildError::Interrupted),
                received = tokio::time::timeout(STALL_TIMEOUT, self.consumer.recv()) => {
                    received.map_err(|_| RebuildError::Stalled(STALL_TIMEOUT))??
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            let Some(&end) = self.remaining.get(&partition) else {
                continue; // past this partition's end
            };
            if offset + 1 >= end {
                self.remaining.remove(&partition);
            }
            return Ok(Some(message));
        }
        Ok(None)
    }
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
