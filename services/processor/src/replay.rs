//! `processor replay-dlq [--max N]`: sends dead-lettered commands through the processor again,
//! once what made them fail is fixed (a handler deployed, a webhook back).
//!
//! 1. The end offsets of `commands.dlq` are captured first: a replay handles what was
//!    dead-lettered before it started (a command that fails again lands after them).
//! 2. A consumer in the group `<PROCESSOR_CONSUMER_GROUP>-dlq-replay`, manually assigned,
//!    reads from the group's committed offsets (the earliest offset the first time).
//! 3. For each dead letter: an unusable one (`dlq-reason: unparseable`, or without a
//!    `command-id`) is skipped, a replay cannot fix it. Otherwise its command is reopened
//!    (`dead_lettered` → `accepted`, in one guarded `UPDATE`); if it is `accepted` then (just
//!    reopened, or by a replay that stopped before producing) or has no row, the original
//!    message (key, payload, headers without the `dlq-*` ones, plus `dlq-replayed-from`) is
//!    produced to `commands`, and Kafka's acknowledgement awaited; a command already
//!    processing or final is skipped. Then the dead letter's offset is committed.
//! 4. It stops after `--max` replays (default 1000) or at the captured ends, and prints a
//!    summary.
//!
//! Every step is idempotent: a replay stopped anywhere and run again replays nothing twice
//! (the processor skips a command that is final, whatever reaches it), and runs never replay
//! a dead letter a previous run committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::kafka::{HEADER_COMMAND_ID, TOPIC_COMMANDS, TOPIC_COMMANDS_DLQ};
use common::metrics::DEAD_LETTERS_PENDING;
use common::postgres::Postgres;
use common::shutdown::CancellationToken;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use uuid::Uuid;

use crate::engine::{DLQ_UNPARSEABLE, HEADER_DLQ_REASON};
use crate::{Config, NAME};

/// On a replayed command: `partition/offset` of the dead letter it came from.
pub const HEADER_REPLAYED_FROM: &str = "dlq-replayed-from";

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Dead letters read.
    pub read: u64,
    /// Commands sent to `commands` again.
    pub replayed: u64,
    /// Dead letters whose command was processing or final already (replayed before).
    pub finished: u64,
    /// Dead letters a replay cannot fix (unparseable, no command id).
    pub unusable: u64,
    /// Whether `--max` stopped the replay before the captured ends.
    pub more_left: bool,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replay complete: read {} dead letters, replayed {} commands, skipped {} already \
             processed and {} unusable in {:.1} s{}",
            self.read,
            self.replayed,
            self.finished,
            self.unusable,
            self.elapsed.as_secs_f64(),
            if self.more_left {
                "; more are left (run it again)"
            } else {
                ""
            }
        )
    }
}

/// The replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Kafka could not be reached, or a topic could not be read or written.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// PostgreSQL could not be reached or a statement failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The pool could not be set up.
    #[error("PostgreSQL: {0}")]
    Pool(#[from] common::postgres::PostgresError),
    /// The dead-letter topic does not exist.
    #[error("topic {0} does not exist")]
    NoTopic(String),
    /// A signal stopped the replay.
    #[error("interrupted after {0} replays (run it again: nothing is replayed twice)")]
    Interrupted(u64),
    /// No message arrived for too long before the end offsets were reached.
    #[error("no progress for {0:?} before reaching the end offsets")]
    Stalled(Duration),
}

/// How long the replay may go without a message before it gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The replay's consumer group: offsets committed there are never replayed again.
pub fn replay_group(config: &Config) -> String {
    format!("{}-dlq-replay", config.consumer_group())
}

/// Replays at most `max` dead letters (see the module docs).
pub async fn replay(
    config: &Config,
    max: u64,
    shutdown: &CancellationToken,
) -> Result<Summary, ReplayError> {
    let started = Instant::now();
    let dlq = config.kafka.topic(TOPIC_COMMANDS_DLQ);
    let commands = config.kafka.topic(TOPIC_COMMANDS);
    let timeout = Duration::from_millis(config.kafka.kafka_timeout_ms.max(1000));
    let consumer = common::kafka::assigned_consumer(&config.kafka, NAME, &replay_group(config))?;
    let producer = common::kafka::producer(&config.kafka, NAME)?;
    let db = Postgres::connect_lazy(&config.postgres)?;

    // Where to start (the committed offsets) and where to stop (the ends now).
    let ranges = common::kafka::unconsumed(&consumer, &dlq, timeout)?;
    if ranges.is_empty() {
        return Err(ReplayError::NoTopic(dlq));
    }
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for range in ranges.iter().filter(|r| r.high > r.from) {
        remaining.insert(range.partition, range.high);
        assignment.add_partition_offset(&dlq, range.partition, Offset::Offset(range.from))?;
    }
    tracing::info!(topic = %dlq, ends = ?remaining, "Captured the dead letters to replay.");

    let mut summary = Summary::default();
    if !remaining.is_empty() {
        consumer.assign(&assignment)?;
    }
    while !remaining.is_empty() {
        if summary.replayed >= max {
            summary.more_left = true;
            break;
        }
        let message = tokio::select! {
            () = shutdown.cancelled() => return Err(ReplayError::Interrupted(summary.replayed)),
            received = tokio::time::timeout(STALL_TIMEOUT, consumer.recv()) => {
                received.map_err(|_| ReplayError::Stalled(STALL_TIMEOUT))??
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        let Some(&end) = remaining.get(&partition) else {
            continue; // past this partition's captured end
        };
        if offset >= end {
            remaining.remove(&partition);
            continue;
        }
        summary.read += 1;
        let header = |name: &str| {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            })
        };
        let command_id = header(HEADER_COMMAND_ID).and_then(|id| Uuid::parse_str(&id).ok());
        let unparseable = header(HEADER_DLQ_REASON).as_deref() == Some(DLQ_UNPARSEABLE);
        match command_id {
            Some(command_id) if !unparseable => {
                if reopen(db.pool(), command_id).await? {
                    let mut headers = OwnedHeaders::new();
                    for h in message.headers().into_iter().flat_map(|h| h.iter()) {
                        if !h.key.starts_with("dlq-") {
                            headers = headers.insert(h);
                        }
                    }
                    let source = format!("{partition}/{offset}");
                    headers = headers.insert(Header {
                        key: HEADER_REPLAYED_FROM,
                        value: Some(source.as_str()),
                    });
                    let mut record = FutureRecord::to(&commands).headers(headers);
                    if let Some(key) = message.key() {
                        record = record.key(key);
                    }
                    if let Some(payload) = message.payload() {
                        record = record.payload(payload);
                    }
                    producer
                        .send(record, timeout)
                        .await
                        .map_err(|(error, _)| error)?;
                    summary.replayed += 1;
                    tracing::info!(%command_id, partition, offset, "Replayed a dead-lettered command.");
                } else {
                    summary.finished += 1;
                }
            }
            _ => {
                summary.unusable += 1;
                tracing::warn!(
                    partition,
                    offset,
                    "Skipping a dead letter a replay cannot fix."
                );
            }
        }
        let mut done = TopicPartitionList::new();
        done.add_partition_offset(&dlq, partition, Offset::Offset(offset + 1))?;
        consumer.commit(&done, CommitMode::Sync)?;
        if offset + 1 >= end {
            remaining.remove(&partition);
        }
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Every [`common::kafka::LAG_INTERVAL`] until `shutdown`, sets `dead_letters_pending`: the
/// dead letters `reader` (a consumer in the replay group that never joins it) finds past the
/// group's committed offsets, the earliest retained offset where it has none.
pub async fn report_pending(
    reader: Arc<StreamConsumer>,
    topic: String,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(common::kafka::LAG_INTERVAL) => {}
        }
        let (reader, topic) = (reader.clone(), topic.clone());
        // Metadata and offset requests block on the network: off the async workers.
        let pending = tokio::task::spawn_blocking(move || pending(&reader, &topic)).await;
        match pending {
            Ok(Ok(pending)) => {
                metrics::gauge!(DEAD_LETTERS_PENDING, "service" => NAME).set(pending as f64);
            }
            Ok(Err(error)) => tracing::debug!(%error, "Could not count the pending dead letters."),
            Err(error) => tracing::debug!(%error, "The dead-letter count task failed."),
        }
    }
}

/// The dead letters of `topic` past `reader`'s group's committed offsets.
fn pending(reader: &StreamConsumer, topic: &str) -> Result<u64, KafkaError> {
    let ranges = common::kafka::unconsumed(reader, topic, Duration::from_secs(2))?;
    Ok(ranges.iter().map(common::kafka::Unconsumed::messages).sum())
}

/// Reopens a dead-lettered command (`dead_lettered` → `accepted`). Returns whether it is to
/// be produced again: it is `accepted` now (reopened here, or by a replay that stopped before
/// producing it), or it has no row (the processor handles a command without one as new).
async fn reopen(db: &sqlx::PgPool, command_id: Uuid) -> Result<bool, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar(
        "WITH reopened AS (\
             UPDATE commands SET status = 'accepted', failure_reason = NULL, updated_at = now() \
             WHERE id = $1 AND status = 'dead_lettered' RETURNING status) \
         SELECT status FROM reopened \
         UNION ALL SELECT status FROM commands WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM reopened)",
    )
    .bind(command_id)
    .fetch_optional(db)
    .await?;
    Ok(status.is_none_or(|s| s == "accepted"))
}

/// The `replay-dlq` subcommand's entry point: `--max N` from the arguments, configuration from
/// the environment, stop on SIGTERM/SIGINT, summary on stdout.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let max = match args {
        [] => 1000,
        [flag, value] if flag == "--max" => value
            .parse()
            .with_context(|| format!("--max must be a number of commands, not {value:?}"))?,
        _ => anyhow::bail!("usage: processor replay-dlq [--max N]"),
    };
    common::service::run_job::<crate::Processor, _, _>(|config, shutdown| async move {
        let summary = replay(&config, max, &shutdown).await?;
        tracing::info!(?summary, "Replay complete.");
        println!("{summary}");
        Ok(())
    })
}
