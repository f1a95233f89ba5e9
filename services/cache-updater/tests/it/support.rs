//! One isolated "stack" per test: its own Kafka topic prefix (topics created here, deleted at
//! the end), its own Redis key prefix (keys removed at the end), and helpers to produce events,
//! watch rooms and read the read model.

use std::sync::Once;
use std::time::Duration;

use axum::body::Bytes;
use common::config::{CommonConfig, KafkaConfig, Vars};
use common::envelope::EventEnvelope;
use common::kafka;
use common::readmodel::{self, Lookup};
use common::rooms::Publication;
use common::service::Service;
use common::test_support::{ChannelFrames, ChildProcess, Deps, TestApp, free_port, test_vars};
use futures::StreamExt as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

/// Partitions of every test topic.
pub const PARTITIONS: i32 = 3;

pub struct Stack {
    pub vars: Vars,
    pub kafka: KafkaConfig,
    pub redis_prefix: String,
    pub redis: common::redis::RedisConnection,
    producer: FutureProducer,
}

impl Stack {
    pub async fn new() -> Self {
        static TELEMETRY: Once = Once::new();
        let id = Uuid::new_v4().simple().to_string();
        let vars = test_vars()
            .with("KAFKA_TOPIC_PREFIX", format!("it-cu-{id}."))
            .with("REDIS_KEY_PREFIX", format!("it:cu:{id}:"))
            // The services connect as a stack's ACL user would (assertions use `redis`).
            .with(
                "REDIS_URL",
                common::test_support::stack_redis_url(&format!("it:cu:{id}:")),
            );
        TELEMETRY.call_once(|| {
            let guard = common::telemetry::init("it", &vars.parse::<CommonConfig>().unwrap());
            std::mem::forget(guard); // keep the propagator for the whole process
        });
        let kafka: KafkaConfig = vars.parse().unwrap();
        let admin = kafka::admin(&kafka, "it-admin").unwrap();
        let topics: Vec<String> = [
            kafka::TOPIC_COMMANDS,
            kafka::TOPIC_EVENTS,
            kafka::TOPIC_CACHE,
            kafka::TOPIC_COMMANDS_DLQ,
        ]
        .iter()
        .map(|t| kafka.topic(t))
        .collect();
        let specs: Vec<(&str, i32)> = topics.iter().map(|t| (t.as_str(), PARTITIONS)).collect();
        kafka::ensure_topics(&admin, &specs, 1).await.unwrap();
        // The pipeline tests run three services on the test's one thread, so a read can wait
        // long for its turn.
        let redis_config: common::config::RedisConfig = common::config::Vars::from_env()
            .with("REDIS_TIMEOUT_MS", "10000")
            .parse()
            .unwrap();
        let redis = common::redis::connect_once(&redis_config).await.unwrap();
        Self {
            producer: kafka::producer(&kafka, "it-producer").unwrap(),
            redis_prefix: format!("it:cu:{id}:"),
            vars,
            kafka,
            redis,
        }
    }

    pub fn topic(&self, name: &str) -> String {
        self.kafka.topic(name)
    }

    /// Starts `S` in-process with this stack's variables (plus `extra`) and waits until ready.
    pub async fn start<S: Service>(&self, extra: &[(&str, &str)]) -> TestApp {
        let mut vars = self.vars.clone();
        for (k, v) in extra {
            vars = vars.with(*k, *v);
        }
        let app = TestApp::start::<S>(&vars).await;
        let ready = app.url("/ready");
        common::test_support::wait_ready(&ready, Duration::from_secs(30)).await;
        app
    }

    /// Produces `payload` to `events` with the document's key; returns its partition and
    /// offset.
    pub async fn produce_raw(&self, key: &str, payload: &[u8]) -> (i32, i64) {
        let topic = self.topic(kafka::TOPIC_EVENTS);
        let delivered = self
            .producer
            .send(
                FutureRecord::to(&topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        (delivered.partition, delivered.offset)
    }

    /// Produces `event` (see [`Stack::produce_raw`]).
    pub async fn produce(&self, event: &EventEnvelope) -> (i32, i64) {
        self.produce_raw(&event.key(), &serde_json::to_vec(event).unwrap())
            .await
    }

    /// Produces `messages` (key, payload, W3C `traceparent` if any) to `events` as one burst:
    /// all are enqueued at once (the idempotent producer keeps each partition's order), then
    /// every acknowledgement is awaited.
    pub async fn produce_burst(&self, messages: &[(String, Vec<u8>, Option<String>)]) {
        let topic = self.topic(kafka::TOPIC_EVENTS);
        let deliveries: Vec<_> = messages
            .iter()
            .map(|(key, payload, traceparent)| {
                let mut record = FutureRecord::to(&topic).key(key).payload(payload);
                if let Some(traceparent) = traceparent {
                    record = record.headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some(traceparent.as_str()),
                    }));
                }
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .unwrap()
            })
            .collect();
        for delivery in deliveries {
            delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }

    /// A subscriber on a room's channel (subscribed when this returns).
    pub async fn subscribe(&self, room: &str) -> ChannelFrames {
        let cluster = Deps::from_env().redis_cluster;
        let channel = common::redis::tagged(&self.redis_prefix, "room:", room, cluster);
        common::test_support::subscribe_channel(&channel).await
    }

    pub async fn lookup(&self, collection: &str, id: &str) -> Lookup {
        let mut conn = self.redis.clone();
        readmodel::read(&mut conn, &self.redis_prefix, collection, id)
            .await
            .unwrap()
    }

    /// A consumer reading `topic` from the beginning (manual assignment, no group offsets).
    pub fn read_from_start(&self, name: &str) -> StreamConsumer {
        let topic = self.topic(name);
        let consumer: StreamConsumer = kafka::client_config(&self.kafka, "it-reader")
            .set("group.id", format!("it-reader-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            tpl.add_partition_offset(&topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        consumer
    }

    /// Deletes the topics and every key under the stack's prefix.
    pub async fn cleanup(self) {
        let admin = kafka::admin(&self.kafka, "it-admin").unwrap();
        let topics: Vec<String> = [
            kafka::TOPIC_COMMANDS,
            kafka::TOPIC_EVENTS,
            kafka::TOPIC_CACHE,
            kafka::TOPIC_COMMANDS_DLQ,
        ]
        .iter()
        .map(|t| self.kafka.topic(t))
        .collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = admin
            .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
            .await;
        unlink_prefixed(&mut self.redis.clone(), &self.redis_prefix).await;
    }
}

/// Starts the cache-updater binary on this stack (its own port, `rust_log` as `RUST_LOG`,
/// output to a log file named after `name`); returns the process, its base URL and its log.
pub fn spawn_binary(
    stack: &Stack,
    name: &str,
    rust_log: &str,
) -> (ChildProcess, String, std::path::PathBuf) {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("meridian-cache-updater-{name}-{port}.log"));
    let process = ChildProcess::spawn(
        env!("CARGO_BIN_EXE_cache-updater").as_ref(),
        &[
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".into()),
            ("KAFKA_TOPIC_PREFIX", stack.kafka.kafka_topic_prefix.clone()),
            ("REDIS_KEY_PREFIX", stack.redis_prefix.clone()),
            ("RUST_LOG", rust_log.into()),
        ],
        &log,
    );
    (process, format!("http://127.0.0.1:{port}"), log)
}

/// An event as the processor would emit it.
pub fn event(
    event_type: &str,
    collection: &str,
    id: &str,
    version: i64,
    data: Option<serde_json::Value>,
) -> EventEnvelope {
    EventEnvelope {
        event_id: Uuid::now_v7(),
        event_type: event_type.into(),
        collection: collection.into(),
        id: id.into(),
        version,
        data,
        command_id: Uuid::now_v7(),
        occurred_at: chrono::Utc::now(),
    }
}

/// The next event published on a room channel, decoded from its publication frame.
pub async fn next_publication(stream: &mut ChannelFrames) -> EventEnvelope {
    next_traced_publication(stream).await.0
}

/// The next publication on a room subscription: its event and its `traceparent`, if any.
pub async fn next_traced_publication(
    stream: &mut ChannelFrames,
) -> (EventEnvelope, Option<String>) {
    let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no room publication within 30 s")
        .expect("the subscription ended");
    let frame = Publication::decode(Bytes::from(message)).unwrap();
    (
        serde_json::from_slice(&frame.payload).unwrap(),
        frame.trace_parent,
    )
}

/// Removes every key under `prefix` (SCAN + UNLINK; the prefix is a plain test id).
pub async fn unlink_prefixed(conn: &mut common::redis::RedisConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(conn)
                .await
                .unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
