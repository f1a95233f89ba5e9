//! The consumer loop on `events`.
//!
//! Messages are handled in batches, in the order Kafka delivers them: once a message arrives,
//! the messages already waiting in the consumer's queue are taken with it (without waiting
//! for more), up to `CACHE_BATCH_MAX`, the room left under `CACHE_MAX_IN_FLIGHT` and 1 MiB of
//! payloads. A batch costs a constant number of Redis round trips however many events it
//! holds, and one document's events (one key, one partition) keep their order throughout.
//! For each batch:
//!
//! 1. Each payload is parsed as an [`EventEnvelope`]; a message that is not one is logged,
//!    counted in `cache_events_malformed_total` and skipped (its offset is stored, so a
//!    poison message never turns into a crash loop).
//! 2. One pipeline runs, for every event in read order, one script that applies it to the
//!    read model if it is newer than the stored version and, only then, publishes it to the
//!    rooms `doc:<collection>:<id>`, `collection:<collection>` and `cmd:<commandId>`
//!    ([`readmodel::apply_and_publish_invocation`]). Redis executes the batch as one
//!    transaction (MULTI/EXEC), in order, so each document's events apply in order, every applied event
//!    is announced exactly once by its script, and a stale one (a redelivery, or an event
//!    overtaken) changes and announces nothing. Scripts run by EVALSHA; if Redis lost one
//!    (restart, `SCRIPT FLUSH`), it is loaded and the invocations that got `NOSCRIPT` run
//!    again at once. Only the events whose script failed are run again (one pipeline, in
//!    order), with the shared backoff, until they succeed or the service stops (then neither
//!    their offsets nor later ones are stored, and they are redelivered). An event is left
//!    unannounced only if its script failed while a later event of the same document applied
//!    (running it again is then stale); the read model itself is still correct.
//! 3. An invalidation (`{collection, id, version}`, header `message-type: cache.invalidate`)
//!    is enqueued on `cache` per applied event, in order. A shutdown never cuts the first
//!    attempt of the pipeline short.
//! 4. Offsets are stored once the effects are done. Waiting for Kafka to acknowledge the
//!    invalidations before reading on would cap throughput at one producer round trip per
//!    batch, so each batch's acknowledgements are awaited in a bounded, ordered queue
//!    (`CACHE_MAX_IN_FLIGHT` messages) and offsets are stored strictly in read order: a
//!    message's offset only once its effects and those of every message read before it are
//!    done.
//!
//! The event metrics (`cache_events_*_total`, `cache_apply_duration_seconds`) count each
//! event; `cache_batch_size` records each batch's size. Each event has its own `cache.apply`
//! span, which continues the trace carried by the message's W3C headers and which the event's
//! invalidation carries on; the batch's Redis round trips run in a `cache.batch` span that
//! the event spans follow from.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use backon::Retryable as _;
use common::envelope::EventEnvelope;
use common::kafka::{HEADER_COMMAND_ID, HEADER_CONTENT_TYPE, HEADER_MESSAGE_TYPE};
use common::metrics::{
    CACHE_APPLY_DURATION_SECONDS, CACHE_BATCH_SIZE, CACHE_EVENTS_APPLIED_TOTAL,
    CACHE_EVENTS_MALFORMED_TOTAL, CACHE_EVENTS_STALE_TOTAL,
};
use common::readmodel::{self, Outcome};
use common::redis::{Redis, RedisError, ScriptCall};
use common::rooms::Rooms;
use common::shutdown::CancellationToken;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tracing::Instrument as _;

use crate::NAME;

/// The `message-type` of invalidations on `cache`.
pub const MESSAGE_TYPE_INVALIDATE: &str = "cache.invalidate";

/// How long a stopping loop waits for outstanding invalidation acknowledgements.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A batch stops growing once its payloads reach this size, whatever `CACHE_BATCH_MAX` says:
/// each event goes to Redis twice (the document's data and the payload for its rooms) in a
/// pipeline that must finish within the Redis response timeout, and a batch is parsed without
/// yielding the thread.
const BATCH_MAX_BYTES: usize = 1 << 20;

/// What the consumer loop needs from the configuration.
#[derive(Debug, Clone)]
pub struct UpdaterSettings {
    /// `REDIS_KEY_PREFIX`.
    pub key_prefix: String,
    /// Full name of the `events` topic.
    pub events_topic: String,
    /// Full name of the `cache` topic.
    pub cache_topic: String,
    /// How long a delete's tombstone lives.
    pub tombstone_ttl: Duration,
    /// Messages whose effects (invalidations awaiting Kafka's acknowledgement) may be
    /// outstanding at most.
    pub max_in_flight: usize,
    /// Messages handled as one batch at most.
    pub batch_max: usize,
    /// How long to wait for room in the producer's queue before retrying.
    pub delivery_timeout: Duration,
}

/// The body of an invalidation message on `cache`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Invalidation {
    /// The document's collection.
    pub collection: String,
    /// The document's id.
    pub id: String,
    /// The version now in the read model.
    pub version: i64,
}

/// The rooms an event is published to: the document's, its collection's and its command's.
pub fn rooms_of(event: &EventEnvelope) -> [String; 3] {
    [
        format!("doc:{}:{}", event.collection, event.id),
        format!("collection:{}", event.collection),
        format!("cmd:{}", event.command_id),
    ]
}

/// Where a message was read from; its offset is stored once its effects are done.
struct Position {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Position {
    fn of(message: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        }
    }
}

/// What a batch's completion resolves to.
struct Settled {
    /// How many messages the batch held.
    size: usize,
    /// The positions of the batch's leading messages whose effects are done, in read order
    /// (all of them, unless shutdown interrupted the batch).
    done: Vec<Position>,
}

/// Resolves once the invalidations of a batch were acknowledged (or shutdown came first).
type Completion = Pin<Box<dyn Future<Output = Settled> + Send>>;

/// An event of the batch being handled.
struct Parsed<'m> {
    /// Its message's index in the batch.
    index: usize,
    event: EventEnvelope,
    /// The message's bytes: the rooms get exactly the event JSON the processor emitted.
    payload: &'m [u8],
    /// `cache.apply`, continuing the message's trace.
    span: tracing::Span,
    /// `<partition>:<offset>`: on a cluster, the message's claim on announcing its event.
    claim: String,
}

/// The consumer loop (see the module docs).
pub struct Updater {
    consumer: Arc<StreamConsumer>,
    redis: Redis,
    rooms: Rooms,
    producer: FutureProducer,
    settings: Arc<UpdaterSettings>,
}

impl Updater {
    /// A loop consuming through `consumer` (a group member that does not auto-store offsets).
    pub fn new(
        consumer: Arc<StreamConsumer>,
        redis: Redis,
        rooms: Rooms,
        producer: FutureProducer,
        settings: Arc<UpdaterSettings>,
    ) -> Self {
        Self {
            consumer,
            redis,
            rooms,
            producer,
            settings,
        }
    }

    /// Consumes until `shutdown` fires, then waits for the pending acknowledgements, stores
    /// their offsets and commits.
    pub async fn run(self, shutdown: CancellationToken) {
        // Exported from the start, at 0: a dashboard shows "none" rather than "no data".
        metrics::counter!(CACHE_EVENTS_STALE_TOTAL, "service" => NAME).increment(0);
        metrics::counter!(CACHE_EVENTS_MALFORMED_TOTAL, "service" => NAME).increment(0);
        if let Err(error) = self.consumer.subscribe(&[&self.settings.events_topic]) {
            tracing::error!(%error, topic = %self.settings.events_topic, "Failed to subscribe; the read model is not updated.");
            return;
        }
        tracing::info!(topic = %self.settings.events_topic, "Consuming events.");
        let mut pending: FuturesOrdered<Completion> = FuturesOrdered::new();
        // Messages of the batches in `pending`.
        let mut in_flight = 0;
        let mut intact = true;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(settled) = pending.next(), if !pending.is_empty() => {
                    in_flight -= settled.size;
                    intact = self.store(&settled, intact);
                }
                received = self.consumer.recv(), if in_flight < self.settings.max_in_flight => {
                    match received {
                        Ok(message) => {
                            let room = self.settings.max_in_flight - in_flight;
                            let batch = self.gather(message, room.min(self.settings.batch_max));
                            in_flight += batch.len();
                            // After an interrupted batch, the shutdown branch ends the loop.
                            pending.push_back(self.handle(&batch, &shutdown).await);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "Failed to consume from Kafka; retrying.");
                            tokio::select! {
                                () = shutdown.cancelled() => break,
                                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                }
            }
        }
        // Bounded: with Kafka down an acknowledgement could take the producer's whole message
        // timeout; whatever is not acknowledged by then is redelivered to the next owner.
        let drain = async {
            while let Some(settled) = pending.next().await {
                intact = self.store(&settled, intact);
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!(
                "Stopped before every invalidation was acknowledged; those events will be redelivered."
            );
        }
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit, or the group is rebalancing: the next
            // owner resumes from the last committed offsets and re-applies idempotently.
            tracing::debug!(%error, "Final offset commit did not happen.");
        }
        tracing::info!("Stopped consuming events.");
    }

    /// `first` plus the messages already waiting in the consumer's queue (never waiting for
    /// more), `limit` at most and [`BATCH_MAX_BYTES`] of payloads, in the order Kafka delivers
    /// them.
    fn gather<'c>(&'c self, first: BorrowedMessage<'c>, limit: usize) -> Vec<BorrowedMessage<'c>> {
        let mut bytes = first.payload_len();
        let mut batch = Vec::with_capacity(limit);
        batch.push(first);
        while batch.len() < limit && bytes < BATCH_MAX_BYTES {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => {
                    bytes += message.payload_len();
                    batch.push(message);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "Failed to consume from Kafka; handling the messages read so far.");
                    break;
                }
                None => break,
            }
        }
        batch
    }

    /// Stores the offsets of a batch's done messages if every earlier message is done;
    /// returns whether later offsets may still be stored.
    fn store(&self, settled: &Settled, intact: bool) -> bool {
        if !intact {
            return false;
        }
        // Offsets grow within a partition: its last done message covers the earlier ones.
        let mut last: Vec<&Position> = Vec::new();
        for position in &settled.done {
            match last
                .iter_mut()
                .find(|p| p.partition == position.partition && p.topic == position.topic)
            {
                Some(slot) => *slot = position,
                None => last.push(position),
            }
        }
        for position in last {
            if let Err(error) =
                self.consumer
                    .store_offset(&position.topic, position.partition, position.offset)
            {
                // The partition was revoked meanwhile; its new owner re-applies idempotently.
                tracing::debug!(%error, partition = position.partition, offset = position.offset, "Offset not stored.");
            }
        }
        settled.done.len() == settled.size
    }

    /// Handles one batch (see the module docs) and returns the completion that settles its
    /// offsets: all of them once the invalidations are acknowledged, or, when shutdown
    /// interrupted the batch, those of the messages before the first one left undone.
    async fn handle(
        &self,
        messages: &[BorrowedMessage<'_>],
        shutdown: &CancellationToken,
    ) -> Completion {
        let started = Instant::now();
        metrics::histogram!(CACHE_BATCH_SIZE, "service" => NAME).record(messages.len() as f64);
        let batch_span = tracing::info_span!("cache.batch", size = messages.len());
        let events: Vec<Parsed<'_>> = messages
            .iter()
            .enumerate()
            .filter_map(|(index, message)| parse_message(index, message, &batch_span))
            .collect();
        // The index of the first message whose effects are not done.
        let mut undone = messages.len();

        let outcomes = self.apply(&events, shutdown).instrument(batch_span).await;
        let mut applied = Vec::with_capacity(events.len());
        for (parsed, outcome) in events.iter().zip(outcomes) {
            match outcome {
                Some(Outcome::Applied) => applied.push(parsed),
                Some(Outcome::Stale) => {
                    metrics::counter!(CACHE_EVENTS_STALE_TOTAL, "service" => NAME).increment(1);
                    parsed.span.in_scope(|| {
                        tracing::debug!(
                            "Stale event skipped: the read model holds this version or a newer one."
                        );
                    });
                }
                None => undone = undone.min(parsed.index),
            }
        }
        metrics::counter!(CACHE_EVENTS_APPLIED_TOTAL, "service" => NAME)
            .increment(applied.len() as u64);
        metrics::histogram!(CACHE_APPLY_DURATION_SECONDS, "service" => NAME)
            .record_many(started.elapsed().as_secs_f64(), applied.len());

        let mut acks = Vec::with_capacity(applied.len());
        for parsed in applied {
            let ack = self
                .invalidate(&parsed.event, shutdown)
                .instrument(parsed.span.clone())
                .await;
            match ack {
                Some(ack) => acks.push((parsed.index, ack)),
                None => {
                    undone = undone.min(parsed.index);
                    break;
                }
            }
        }
        settle(messages.iter().map(Position::of).collect(), undone, acks)
    }

    /// Applies every event to the read model and announces the applied ones to their rooms.
    /// An outcome is `None` only if shutdown came while it was being retried.
    ///
    /// On one Redis, one script per event does both, all in one pipeline. On a cluster, where
    /// a document and its rooms live on different shards, three rounds: apply (marking the
    /// document as to be announced), publish to the rooms, clear the marks (see
    /// [`readmodel::apply_announcing_call`]).
    async fn apply(
        &self,
        events: &[Parsed<'_>],
        shutdown: &CancellationToken,
    ) -> Vec<Option<Outcome>> {
        if !self.redis.is_cluster() {
            let calls = events
                .iter()
                .map(|parsed| self.invocation(parsed))
                .collect();
            let replies = self
                .run_all::<i64>(
                    "apply the events to the read model and their rooms",
                    calls,
                    shutdown,
                )
                .await;
            return replies
                .into_iter()
                .map(|reply| reply.map(Outcome::from_reply))
                .collect();
        }
        let prefix = &self.settings.key_prefix;
        let calls = events
            .iter()
            .map(|p| {
                readmodel::apply_announcing_call(
                    prefix,
                    &p.event,
                    self.settings.tombstone_ttl,
                    &p.claim,
                )
            })
            .collect();
        let replies = self
            .run_all::<i64>("apply the events to the read model", calls, shutdown)
            .await;
        let mut outcomes: Vec<Option<Outcome>> = replies
            .into_iter()
            .map(|reply| reply.map(Outcome::from_reply))
            .collect();
        let due: Vec<usize> = (0..events.len())
            .filter(|&i| outcomes[i] == Some(Outcome::Applied))
            .collect();
        let mut publications = Vec::with_capacity(due.len() * 3);
        for &i in &due {
            let parsed = &events[i];
            let trace_parent = common::telemetry::traceparent_of(&parsed.span);
            for room in rooms_of(&parsed.event) {
                publications.push((
                    i,
                    self.rooms
                        .publish_call(&room, parsed.payload, trace_parent.as_deref()),
                ));
            }
        }
        let (owners, calls): (Vec<usize>, Vec<_>) = publications.into_iter().unzip();
        let published = self
            .run_all::<redis::Value>("announce the events to their rooms", calls, shutdown)
            .await;
        for (i, reply) in owners.into_iter().zip(published) {
            if reply.is_none() {
                outcomes[i] = None;
            }
        }
        let announced: Vec<usize> = due.into_iter().filter(|&i| outcomes[i].is_some()).collect();
        let calls = announced
            .iter()
            .map(|&i| readmodel::announced_call(prefix, &events[i].event, &events[i].claim))
            .collect();
        let cleared = self
            .run_all::<redis::Value>("mark the events announced", calls, shutdown)
            .await;
        for (i, reply) in announced.into_iter().zip(cleared) {
            if reply.is_none() {
                outcomes[i] = None;
            }
        }
        outcomes
    }

    /// Runs `calls` ([`common::redis::run_scripts`]), then re-runs those that failed until
    /// they succeed. A reply is `None` only if shutdown came while it was being retried.
    async fn run_all<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        calls: Vec<ScriptCall<'static>>,
        shutdown: &CancellationToken,
    ) -> Vec<Option<T>> {
        let replies: Vec<OnceLock<T>> = calls.iter().map(|_| OnceLock::new()).collect();
        let (replies_ref, calls_ref) = (&replies, &calls);
        self.retrying(what, shutdown, move || async move {
            let unresolved: Vec<usize> = (0..calls_ref.len())
                .filter(|&i| replies_ref[i].get().is_none())
                .collect();
            let pending: Vec<&ScriptCall<'_>> = unresolved.iter().map(|&i| &calls_ref[i]).collect();
            let results = common::redis::run_scripts::<T>(&self.redis, &pending).await?;
            let mut failure = None;
            for (i, result) in unresolved.into_iter().zip(results) {
                match result {
                    Ok(reply) => {
                        let _ = replies_ref[i].set(reply);
                    }
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
            failure.map_or(Ok(()), |error| Err(RedisError::from(error)))
        })
        .await;
        replies.into_iter().map(OnceLock::into_inner).collect()
    }

    /// The script call that applies `parsed` and announces it to its rooms with the message's
    /// bytes (the rooms get exactly the event JSON the processor emitted).
    fn invocation(&self, parsed: &Parsed<'_>) -> ScriptCall<'static> {
        ScriptCall {
            invocation: readmodel::apply_and_publish_invocation(
                &self.settings.key_prefix,
                &parsed.event,
                self.settings.tombstone_ttl,
                &self.rooms,
                &rooms_of(&parsed.event),
                parsed.payload,
                common::telemetry::traceparent_of(&parsed.span).as_deref(),
            ),
            key: readmodel::document_key(
                &self.settings.key_prefix,
                &parsed.event.collection,
                &parsed.event.id,
            ),
        }
    }

    /// Enqueues the invalidation now (so invalidations keep the events' order) and returns a
    /// future that resolves once Kafka acknowledged it (re-sending after a failed delivery),
    /// or to false if shutdown came first. `None` if shutdown interrupted the enqueueing.
    async fn invalidate(
        &self,
        event: &EventEnvelope,
        shutdown: &CancellationToken,
    ) -> Option<impl Future<Output = bool> + Send + 'static> {
        let message = OutgoingInvalidation::of(event, &self.settings.cache_topic);
        let delivery = loop {
            match self.producer.send_result(message.record()) {
                Ok(delivery) => break delivery,
                Err((error, _)) => {
                    tracing::warn!(%error, "Failed to enqueue an invalidation; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        };
        let (producer, shutdown) = (self.producer.clone(), shutdown.clone());
        let timeout = self.settings.delivery_timeout;
        Some(async move {
            match delivery.await {
                Ok(Ok(_)) => return true,
                Ok(Err((error, _))) => {
                    tracing::warn!(%error, key = %message.key, "Invalidation not delivered; re-sending.");
                }
                Err(_) => tracing::warn!(key = %message.key, "Invalidation dropped; re-sending."),
            }
            let resend = || async {
                producer
                    .send(message.record(), timeout)
                    .await
                    .map_err(|(error, _)| error)
            };
            let resent = resend
                .retry(common::retry::connect_backoff())
                .sleep(tokio::time::sleep)
                .notify(|error, _| tracing::warn!(%error, "Invalidation not delivered; retrying."));
            tokio::select! {
                result = resent => result.is_ok(),
                () = shutdown.cancelled() => false,
            }
        })
    }

    /// Runs `attempt` until it succeeds, retrying with the shared backoff; `None` if shutdown
    /// came while retrying. The first attempt always runs to completion (each is bounded by
    /// the Redis response timeout): a shutdown must not cut short a pipeline whose scripts may
    /// have applied events without learning which, because those events, redelivered, would
    /// be stale and their invalidations would never be sent.
    async fn retrying<T, E, F, Fut>(
        &self,
        what: &'static str,
        shutdown: &CancellationToken,
        mut attempt: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(error) => tracing::warn!(%error, what, "Failed; retrying."),
        }
        let retried = attempt
            .retry(common::retry::connect_backoff())
            .sleep(tokio::time::sleep)
            .notify(|error: &E, delay: Duration| {
                tracing::warn!(%error, what, retry_in_ms = delay.as_millis() as u64, "Failed; retrying.");
            });
        tokio::select! {
            result = retried => result.ok(),
            () = shutdown.cancelled() => None,
        }
    }
}

/// The completion of a batch whose messages before `undone` were handled and whose
/// invalidations are `acks` (message index, acknowledgement): once the acknowledgements are in,
/// the messages before `undone` and before the first undelivered invalidation are done.
fn settle<F>(mut positions: Vec<Position>, undone: usize, acks: Vec<(usize, F)>) -> Completion
where
    F: Future<Output = bool> + Send + 'static,
{
    let size = positions.len();
    Box::pin(async move {
        let (indices, acks): (Vec<usize>, Vec<F>) = acks.into_iter().unzip();
        let delivered = futures::future::join_all(acks).await;
        let undelivered = indices
            .into_iter()
            .zip(delivered)
            .find(|(_, delivered)| !delivered)
            .map_or(size, |(index, _)| index);
        positions.truncate(undone.min(undelivered));
        Settled {
            size,
            done: positions,
        }
    })
}

/// Parses the batch's message `index` into an event with its span (continuing the message's
/// trace, following from the batch's); a malformed message is counted, logged and skipped.
fn parse_message<'m>(
    index: usize,
    message: &'m BorrowedMessage<'_>,
    batch: &tracing::Span,
) -> Option<Parsed<'m>> {
    let event = match parse(message.payload()) {
        Ok(event) => event,
        Err(reason) => {
            metrics::counter!(CACHE_EVENTS_MALFORMED_TOTAL, "service" => NAME).increment(1);
            tracing::warn!(
                topic = %message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                reason,
                "Skipping a malformed event."
            );
            return None;
        }
    };
    let span = tracing::info_span!(
        "cache.apply",
        collection = %event.collection,
        id = %event.id,
        version = event.version,
        event_type = %event.event_type,
        command_id = %event.command_id,
    );
    common::telemetry::set_parent_from_kafka(&span, message.headers());
    span.follows_from(batch);
    Some(Parsed {
        index,
        event,
        payload: message.payload().unwrap_or_default(),
        span,
        claim: format!("{}:{}", message.partition(), message.offset()),
    })
}

/// An invalidation ready to be (re-)sent.
struct OutgoingInvalidation {
    topic: String,
    key: String,
    body: Vec<u8>,
    headers: OwnedHeaders,
}

impl OutgoingInvalidation {
    fn of(event: &EventEnvelope, topic: &str) -> Self {
        let body = serde_json::to_vec(&Invalidation {
            collection: event.collection.clone(),
            id: event.id.clone(),
            version: event.version,
        })
        .unwrap_or_default();
        let command_id = event.command_id.to_string();
        let headers = common::telemetry::inject_kafka(
            OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: HEADER_MESSAGE_TYPE,
                    value: Some(MESSAGE_TYPE_INVALIDATE),
                })
                .insert(Header {
                    key: HEADER_CONTENT_TYPE,
                    value: Some("application/json"),
                })
                .insert(Header {
                    key: HEADER_COMMAND_ID,
                    value: Some(command_id.as_str()),
                }),
        );
        Self {
            topic: topic.to_owned(),
            key: event.key(),
            body,
            headers,
        }
    }

    fn record(&self) -> FutureRecord<'_, String, Vec<u8>> {
        FutureRecord::to(&self.topic)
            .key(&self.key)
            .payload(&self.body)
            .headers(self.headers.clone())
    }
}

/// Parses and validates an `events` payload; the error says why it is unusable.
pub fn parse(payload: Option<&[u8]>) -> Result<EventEnvelope, String> {
    let payload = payload.ok_or_else(|| "empty payload".to_owned())?;
    let event: EventEnvelope =
        serde_json::from_slice(payload).map_err(|e| format!("not an event envelope: {e}"))?;
    if event.collection.is_empty() || event.id.is_empty() {
        return Err("empty collection or id".into());
    }
    if event.version < 1 {
        return Err(format!("version {} is below 1", event.version));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn event(version: i64) -> serde_json::Value {
        serde_json::json!({
            "eventId": Uuid::now_v7(), "type": "created", "collection": "books", "id": "b1",
            "version": version, "data": {"t": 1}, "commandId": Uuid::now_v7(),
            "occurredAt": "2026-01-01T00:00:00Z"
        })
    }

    #[test]
    fn malformed_payloads_are_rejected_with_a_reason() {
        assert!(parse(None).is_err());
        assert!(parse(Some(b"not json")).is_err());
        assert!(parse(Some(br#"{"type":"created"}"#)).is_err());
        let zero = serde_json::to_vec(&event(0)).unwrap();
        assert!(parse(Some(&zero)).unwrap_err().contains("below 1"));
        let fine = serde_json::to_vec(&event(3)).unwrap();
        assert_eq!(parse(Some(&fine)).unwrap().version, 3);
    }

    #[test]
    fn an_event_goes_to_its_document_collection_and_command_rooms() {
        let event: EventEnvelope = serde_json::from_value(event(1)).unwrap();
        let [doc, collection, cmd] = rooms_of(&event);
        assert_eq!(doc, "doc:books:b1");
        assert_eq!(collection, "collection:books");
        assert_eq!(cmd, format!("cmd:{}", event.command_id));
    }
}
