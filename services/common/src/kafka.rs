//! Kafka: client configuration shared by producers, consumers and admin clients, the
//! platform's topic and header names, and a metadata-based readiness check.
//!
//! Producers are idempotent with `acks=all`. Consumers never auto-store offsets: a service
//! stores an offset only after the message's effect is committed, and librdkafka commits the
//! stored offsets periodically.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use secrecy::ExposeSecret;

use crate::config::KafkaConfig;
use crate::health::Check;

/// Topic of accepted commands (written by the command service's outbox relay).
pub const TOPIC_COMMANDS: &str = "commands";
/// Topic of domain events (written by the processor's outbox relay).
pub const TOPIC_EVENTS: &str = "events";
/// Topic of cache invalidation messages (written by the cache updater).
pub const TOPIC_CACHE: &str = "cache";
/// Dead-letter topic for commands that exhausted their retries.
pub const TOPIC_COMMANDS_DLQ: &str = "commands.dlq";

/// Header naming the message's type (`command.create`, `event.document.updated`, …).
pub const HEADER_MESSAGE_TYPE: &str = "message-type";
/// Header carrying the id of the command a message stems from.
pub const HEADER_COMMAND_ID: &str = "command-id";
/// Header with the payload's media type (`application/json`).
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// How often [`report_lag`] refreshes `kafka_consumer_lag`.
pub const LAG_INTERVAL: Duration = Duration::from_secs(10);

/// Every [`LAG_INTERVAL`] until `shutdown`, sets `kafka_consumer_lag{service, topic,
/// partition}` for each partition assigned to `consumer`: the high watermark minus the
/// consumer's fetch position (messages fetched but not yet handled are not counted).
pub async fn report_lag(
    consumer: Arc<StreamConsumer>,
    service: &'static str,
    shutdown: crate::shutdown::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LAG_INTERVAL) => {}
        }
        let consumer = consumer.clone();
        // Watermark requests block on the network: keep them off the async workers.
        let lags = tokio::task::spawn_blocking(move || {
            let Ok(position) = consumer.position() else {
                return Vec::new();
            };
            position
                .elements()
                .iter()
                .filter_map(|e| {
                    let rdkafka::Offset::Offset(at) = e.offset() else {
                        return None;
                    };
                    let (_, high) = consumer
                        .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                        .ok()?;
                    Some((e.topic().to_owned(), e.partition(), (high - at).max(0)))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (topic, partition, lag) in lags {
            metrics::gauge!(crate::metrics::KAFKA_CONSUMER_LAG, "service" => service, "topic" => topic, "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

/// The base librdkafka configuration: servers, security and timeouts.
pub fn client_config(config: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.kafka_bootstrap_servers)
        .set("client.id", client_id)
        .set("security.protocol", &config.kafka_security_protocol)
        .set("socket.nagle.disable", "true")
        .set(
            "socket.connection.setup.timeout.ms",
            config.kafka_timeout_ms.to_string(),
        )
        // librdkafka backs reconnects off exponentially up to 10 s by default, so after a
        // broker restart a client could wait 10 s more before noticing it is back; a 1 s ceiling
        // costs one connection attempt per second during an outage.
        .set("reconnect.backoff.max.ms", "1000");
    if let Some(mechanism) = &config.kafka_sasl_mechanism {
        cc.set("sasl.mechanism", mechanism);
    }
    if let Some(username) = &config.kafka_sasl_username {
        cc.set("sasl.username", username);
    }
    if let Some(password) = &config.kafka_sasl_password {
        cc.set("sasl.password", password.expose_secret());
    }
    if let Some(ca) = &config.kafka_ssl_ca_location {
        cc.set("ssl.ca.location", ca);
    }
    cc
}

/// An idempotent producer (`acks=all`, ordered per partition even across retries).
pub fn producer(config: &KafkaConfig, client_id: &str) -> Result<FutureProducer, KafkaError> {
    client_config(config, client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", config.kafka_linger_ms.to_string())
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            (config.kafka_timeout_ms * 6).to_string(),
        )
        .create()
}

/// A consumer in `group_id` that starts from the earliest offset of new partitions, only
/// commits offsets the service stored explicitly after processing, and whose partitions move
/// to another member within `KAFKA_SESSION_TIMEOUT_MS` when it crashes.
pub fn consumer(
    config: &KafkaConfig,
    client_id: &str,
    group_id: &str,
) -> Result<StreamConsumer, KafkaError> {
    consumer_config(config, client_id, group_id).create()
}

/// The configuration [`consumer`] uses, for a service that needs to tune more.
pub fn consumer_config(config: &KafkaConfig, client_id: &str, group_id: &str) -> ClientConfig {
    let mut cc = client_config(config, client_id);
    let session = config.kafka_session_timeout_ms;
    cc.set("group.id", group_id)
        .set("session.timeout.ms", session.to_string())
        .set("heartbeat.interval.ms", (session / 3).max(1).to_string())
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    cc
}

/// A consumer in `group_id` for a one-off job (a rebuild, a replay) that assigns its
/// partitions itself and commits only what it commits explicitly: never joins the group's
/// rebalances, never commits on its own.
pub fn assigned_consumer(
    config: &KafkaConfig,
    client_id: &str,
    group_id: &str,
) -> Result<StreamConsumer, KafkaError> {
    client_config(config, client_id)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
}

/// The partition ids of `topic`, from a metadata request (empty: the topic does not exist).
/// Blocks for up to `timeout`.
pub fn partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// What a consumer group has not consumed of one partition: from its committed offset (the
/// earliest retained offset where it has none, as the services start there) to the high
/// watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unconsumed {
    /// The partition.
    pub partition: i32,
    /// The first offset the group has not consumed.
    pub from: i64,
    /// The partition's high watermark.
    pub high: i64,
}

impl Unconsumed {
    /// The messages in the range.
    pub fn messages(&self) -> u64 {
        u64::try_from(self.high.saturating_sub(self.from)).unwrap_or(0)
    }
}

/// What `consumer`'s group (its `group.id`) has not consumed of each partition of `topic`
/// (empty: the topic does not exist). Reads offsets only: the consumer need not be a member
/// of the group. Blocks for up to `timeout` per request (metadata, committed offsets, one
/// watermark request per partition).
pub fn unconsumed<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Unconsumed>, KafkaError> {
    let partitions = partitions(consumer, topic, timeout)?;
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let mut wanted = rdkafka::TopicPartitionList::new();
    for &partition in &partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(wanted, timeout)?;
    partitions
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
            let from = match committed
                .find_partition(topic, partition)
                .map(|p| p.offset())
            {
                Some(rdkafka::Offset::Offset(offset)) => offset.max(low),
                _ => low,
            };
            Ok(Unconsumed {
                partition,
                from,
                high,
            })
        })
        .collect()
}

/// An admin client (topic creation, configuration).
pub fn admin(
    config: &KafkaConfig,
    client_id: &str,
) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    client_config(config, client_id).create()
}

/// Creates each topic that does not exist yet; existing topics are left as they are.
pub async fn ensure_topics(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[(&str, i32)],
    replication: i32,
) -> Result<(), KafkaError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(replication))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic, %code, "Failed to create topic.");
                });
            }
        }
    }
    Ok(())
}

type MetadataProbe = dyn Fn(Duration) -> Result<(), KafkaError> + Send + Sync;

/// Readiness: a metadata request through an existing client, bounded by the probe timeout.
#[derive(Clone)]
pub struct KafkaCheck {
    probe: Arc<MetadataProbe>,
    timeout: Duration,
}

impl KafkaCheck {
    /// Checks through `producer`'s connections.
    pub fn producer(producer: &FutureProducer, timeout: Duration) -> Self {
        let producer = producer.clone();
        Self::new(
            move |t| producer.client().fetch_metadata(None, t).map(drop),
            timeout,
        )
    }

    /// Checks through `consumer`'s connections.
    pub fn consumer(consumer: Arc<StreamConsumer>, timeout: Duration) -> Self {
        Self::new(
            move |t| consumer.client().fetch_metadata(None, t).map(drop),
            timeout,
        )
    }

    fn new(
        probe: impl Fn(Duration) -> Result<(), KafkaError> + Send + Sync + 'static,
        timeout: Duration,
    ) -> Self {
        // Leave headroom under the readiness timeout so the real error is reported.
        let timeout = timeout
            .saturating_sub(Duration::from_millis(200))
            .max(Duration::from_millis(100));
        Self {
            probe: Arc::new(probe),
            timeout,
        }
    }
}

impl Check for KafkaCheck {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let (probe, timeout) = (self.probe.clone(), self.timeout);
        Box::pin(async move {
            // librdkafka's metadata call blocks; keep it off the async workers.
            tokio::task::spawn_blocking(move || probe(timeout))
                .await
                .map_err(|e| format!("metadata probe panicked: {e}"))?
                .map_err(|e| e.to_string())
        })
    }
}
