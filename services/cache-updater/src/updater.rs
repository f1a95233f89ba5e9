//! The consumer loop on `events`.
//!
//! Messages are handled one at a time in the order Kafka delivers them, so one document's
//! events (one key, one partition) reach Redis in order. For each message:
//!
//! 1. The payload is parsed as an [`EventEnvelope`]; a message that is not one is logged,
//!    counted in `cache_events_malformed_total` and skipped (its offset is stored, so a
//!    poison message never turns into a crash loop).
//! 2. [`readmodel::apply`] runs the version-guarded script. Redis errors are retried with the
//!    shared backoff until they succeed or the service stops (then the offset is not stored and
//!    the event is redelivered: applying it again is a no-op).
//! 3. Only when the script applied the event: the event JSON is published to the rooms
//!    `doc:<collection>:<id>`, `collection:<collection>` and `cmd:<commandId>`, and an
//!    invalidation (`{collection, id, version}`, header `message-type: cache.invalidate`) is
//!    enqueued on `cache`. A stale event (redelivery or overtaken) changes and announces
//!    nothing. A shutdown never cuts in between the script and the notifications (their
//!    first attempts always complete); only if Redis fails right after the script and the
//!    service stops while retrying are that event's notifications lost, since its redelivery
//!    is stale — the read model itself is still correct.
//! 4. The offset is stored once the effects are done. Waiting for Kafka to acknowledge each
//!    invalidation before reading the next event would cap throughput at one producer round
//!    trip per event, so acknowledgements are awaited in a bounded, ordered queue
//!    (`CACHE_MAX_IN_FLIGHT`) and offsets are stored strictly in the order the events were read.
//!
//! The span of each event continues the trace carried by the message's W3C headers, and the
//! invalidation carries it on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable as _;
use common::envelope::EventEnvelope;
use common::kafka::{HEADER_COMMAND_ID, HEADER_CONTENT_TYPE, HEADER_MESSAGE_TYPE};
use common::metrics::{
    CACHE_APPLY_DURATION_SECONDS, CACHE_EVENTS_APPLIED_TOTAL, CACHE_EVENTS_MALFORMED_TOTAL,
    CACHE_EVENTS_STALE_TOTAL,
};
use common::readmodel::{self, Outcome};
use common::redis::Redis;
use common::rooms::Rooms;
use common::shutdown::CancellationToken;
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
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
    /// Invalidations awaiting Kafka's acknowledgement at most.
    pub max_in_flight: usize,
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

/// Resolves to whether the message's effects are complete (false only when shutdown
/// interrupted them).
type Completion = Pin<Box<dyn Future<Output = (Position, bool)> + Send>>;

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
        if let Err(error) = self.consumer.subscribe(&[&self.settings.events_topic]) {
            tracing::error!(%error, topic = %self.settings.events_topic, "Failed to subscribe; the read model is not updated.");
            return;
        }
        tracing::info!(topic = %self.settings.events_topic, "Consuming events.");
        let mut pending: FuturesOrdered<Completion> = FuturesOrdered::new();
        let mut intact = true;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some((position, done)) = pending.next(), if !pending.is_empty() => {
                    intact = self.store(&position, done && intact);
                }
                received = self.consumer.recv(), if pending.len() < self.settings.max_in_flight => {
                    match received {
                        Ok(message) => match self.handle(&message, &shutdown).await {
                            Some(completion) => pending.push_back(completion),
                            None => break,
                        },
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
            while let Some((position, done)) = pending.next().await {
                intact = self.store(&position, done && intact);
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

    /// Stores the offset if everything up to this message is done; returns whether later
    /// offsets may still be stored.
    fn store(&self, position: &Position, done: bool) -> bool {
        if !done {
            return false;
        }
        if let Err(error) =
            self.consumer
                .store_offset(&position.topic, position.partition, position.offset)
        {
            // The partition was revoked meanwhile; its new owner re-applies idempotently.
            tracing::debug!(%error, partition = position.partition, offset = position.offset, "Offset not stored.");
        }
        true
    }

    /// Applies one message. `None` when shutdown interrupted it (its offset must not be
    /// stored); otherwise a completion that resolves once the invalidation was acknowledged.
    async fn handle(
        &self,
        message: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Option<Completion> {
        let position = Position {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let event = match parse(message.payload()) {
            Ok(event) => event,
            Err(reason) => {
                metrics::counter!(CACHE_EVENTS_MALFORMED_TOTAL, "service" => NAME).increment(1);
                tracing::warn!(
                    topic = %position.topic,
                    partition = position.partition,
                    offset = position.offset,
                    reason,
                    "Skipping a malformed event."
                );
                return Some(Box::pin(async move { (position, true) }));
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
        // The rooms get the message's own bytes: exactly the event JSON the processor emitted.
        let payload = message.payload().unwrap_or_default();
        let applied = self
            .apply(&event, payload, shutdown)
            .instrument(span.clone())
            .await?;
        if !applied {
            return Some(Box::pin(async move { (position, true) }));
        }
        let acked = self.invalidate(&event, shutdown).instrument(span).await?;
        Some(Box::pin(async move { (position, acked.await) }))
    }

    /// Runs the script and, if it applied the event, notifies the rooms. `None` when shutdown
    /// interrupted a retry; otherwise whether the event was applied.
    async fn apply(
        &self,
        event: &EventEnvelope,
        payload: &[u8],
        shutdown: &CancellationToken,
    ) -> Option<bool> {
        let started = Instant::now();
        let outcome = self
            .retrying("apply the event to the read model", shutdown, || async {
                let mut conn = self.redis.connection()?;
                Ok::<_, common::redis::RedisError>(
                    readmodel::apply(
                        &mut conn,
                        &self.settings.key_prefix,
                        event,
                        self.settings.tombstone_ttl,
                    )
                    .await?,
                )
            })
            .await?;
        if outcome == Outcome::Stale {
            metrics::counter!(CACHE_EVENTS_STALE_TOTAL, "service" => NAME).increment(1);
            tracing::debug!(
                "Stale event skipped: the read model holds this version or a newer one."
            );
            return Some(false);
        }
        // The script applied the event, so a retry of it would be a no-op: retry the
        // notifications on their own. The three rooms go out concurrently (pipelined on the
        // one multiplexed connection); each room still sees this document's events in order,
        // because the next event is only handled after all three are published.
        let rooms = rooms_of(event);
        self.retrying("notify the rooms", shutdown, || {
            futures::future::try_join_all(
                rooms.iter().map(|room| self.rooms.publish(room, payload)),
            )
        })
        .await?;
        metrics::counter!(CACHE_EVENTS_APPLIED_TOTAL, "service" => NAME).increment(1);
        metrics::histogram!(CACHE_APPLY_DURATION_SECONDS, "service" => NAME)
            .record(started.elapsed().as_secs_f64());
        Some(true)
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
    /// the Redis response timeout): a shutdown must not cut in between a script that applied
    /// an event and that event's notifications, because the redelivered event would be stale
    /// and announce nothing.
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
