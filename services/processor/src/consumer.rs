//! The `commands` consumer: one consumer-group member, one sequential worker per partition.
//!
//! Per-key order: a document's commands share a key, hence a partition, and each partition's
//! messages are processed one after another by its own task; partitions proceed
//! concurrently. A message's offset is stored (for librdkafka's periodic commit) only after
//! its outcome is committed to PostgreSQL — or after it was dead-lettered — so a crash
//! redelivers at most the last few seconds of messages, which the idempotency check in
//! [`crate::apply`] turns into no-ops. On shutdown the stored offsets are committed
//! synchronously.
//!
//! The dispatcher hands messages to the partition tasks through bounded channels; while a
//! partition's task retries a command, its channel fills and the dispatcher waits, which
//! pauses every partition of this member for that long (bounded by the retry budget). That
//! keeps memory bounded and the code simple; with a handful of partitions per member it is
//! the same back-pressure a single-threaded consumer would apply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::kafka::ensure_topics;
use common::postgres::{HeldConnection, Postgres};
use common::shutdown::CancellationToken;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::NAME;
use crate::engine::Engine;

/// Messages buffered per partition ahead of its worker.
const PARTITION_BUFFER: usize = 256;

/// What the consumer needs besides the engine.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Full name of the `commands` topic.
    pub commands_topic: String,
    /// Topics to create at start if missing (broker-default partitions and replication).
    pub ensure_topics: Vec<String>,
    /// Messages of one partition handed to [`Engine::handle_all`] at once at most.
    pub batch_max: usize,
}

/// Consumes until `shutdown` fires: waits for the migrations, makes sure the topics exist,
/// subscribes, and dispatches messages to per-partition workers.
pub async fn run(
    consumer: Arc<StreamConsumer>,
    admin: Arc<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>,
    db: Postgres,
    engine: Engine,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) {
    // Processing before the schema exists would turn every command into a database error.
    while !db.is_migrated() {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let topics: Vec<(&str, i32)> = settings
        .ensure_topics
        .iter()
        .map(|t| (t.as_str(), -1))
        .collect();
    let ensured = common::retry::until_connected(NAME, "kafka", &shutdown, || {
        ensure_topics(&admin, &topics, -1)
    })
    .await;
    if ensured.is_none() {
        return;
    }
    if let Err(error) = consumer.subscribe(&[&settings.commands_topic]) {
        tracing::error!(%error, topic = settings.commands_topic, "Failed to subscribe; not consuming.");
        return;
    }
    tracing::info!(topic = settings.commands_topic, "Consuming commands.");

    let mut partitions: HashMap<i32, mpsc::Sender<OwnedMessage>> = HashMap::new();
    let mut workers = JoinSet::new();
    // Stopped with the dispatcher, whatever ends it.
    let lag = shutdown.child_token();
    workers.spawn(common::kafka::report_lag(
        consumer.clone(),
        NAME,
        lag.clone(),
    ));
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            received = consumer.recv() => received,
        };
        let message = match received {
            Ok(message) => message.detach(),
            Err(error) => {
                tracing::warn!(%error, "Kafka consumer error.");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
        };
        let partition = message.partition();
        let sender = partitions.entry(partition).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PARTITION_BUFFER);
            workers.spawn(work(
                rx,
                consumer.clone(),
                engine.clone(),
                HeldConnection::new(db.pool().clone()),
                settings.batch_max,
                shutdown.clone(),
            ));
            tx
        });
        tokio::select! {
            () = shutdown.cancelled() => break,
            sent = sender.send(message) => {
                if sent.is_err() {
                    // A worker stops only on shutdown (or a bug); stop consuming rather than
                    // skip its partition's messages.
                    if !shutdown.is_cancelled() {
                        tracing::error!(partition, "A partition worker stopped; the consumer stops.");
                    }
                    break;
                }
            }
        }
    }
    drop(partitions);
    lag.cancel();
    while let Some(joined) = workers.join_next().await {
        if let Err(error) = joined {
            tracing::error!(%error, "A partition worker panicked.");
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("Committed the processed offsets."),
        // Nothing was stored since the last automatic commit.
        Err(error) => tracing::debug!(%error, "No offsets committed on shutdown."),
    }
    consumer.unsubscribe();
}

/// One partition's messages, in order: whatever is waiting (up to `batch_max`) is handled
/// together, and the offset of the last message handled is stored. Batches are written on
/// `conn`, kept between them (see [`HeldConnection`]).
async fn work(
    mut messages: mpsc::Receiver<OwnedMessage>,
    consumer: Arc<StreamConsumer>,
    engine: Engine,
    mut conn: HeldConnection,
    batch_max: usize,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(batch_max);
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            message = messages.recv() => match message {
                Some(message) => message,
                None => return,
            },
            () = conn.release_when_idle() => continue,
        };
        batch.push(first);
        while batch.len() < batch_max {
            match messages.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        let done = engine.handle_all(&batch, &mut conn, &shutdown).await;
        if let Some(last) = batch[..done].last()
            && let Err(error) = consumer.store_offset(last.topic(), last.partition(), last.offset())
        {
            // The partition was revoked meanwhile; its new owner redelivers from the last
            // commit and finds the effects already applied.
            tracing::debug!(%error, partition = last.partition(), "Offset not stored.");
        }
        if done < batch.len() {
            return; // interrupted by shutdown: the rest is not stored, so it is redelivered
        }
        batch.clear();
    }
}
