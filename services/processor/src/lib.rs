//! The processor (port 8083) consumes the Kafka `commands` topic, decides each command with
//! its handler (built-in, a registered Rust [`Handler`](handler::Handler), or a webhook),
//! applies the change to the PostgreSQL write model exactly once, and emits an event through
//! its own outbox (`processor_outbox`, relayed by the shared [`Relay`]) to `events`.
//!
//! # Layout
//! - [`consumer`]: the consumer-group member; one sequential worker per partition, offsets
//!   stored only after the outcome is committed.
//! - [`engine`]: one message from receipt to its outcome: parse, decide, apply, retry with
//!   backoff, dead-letter to `commands.dlq`.
//! - [`apply`]: the write model: idempotent, version-guarded writes in one transaction with
//!   the command's status and the event's outbox row.
//! - [`handler`]: the [`Handler`](handler::Handler) trait, the built-in handlers and the
//!   registry. [`webhook`]: handlers that call HTTP endpoints.
//! - [`replay`]: the `replay-dlq` subcommand: dead-lettered commands sent through again.
//! - this file: [`Config`], [`AppState`], [`router`], [`run`] and the [`Service`] impl.

pub mod apply;
pub mod batch;
pub mod consumer;
pub mod engine;
pub mod handler;
pub mod replay;
pub mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use common::config::{CommonConfig, ConfigError, KafkaConfig, PostgresConfig, Vars};
use common::http::Ops;
use common::kafka::{KafkaCheck, TOPIC_COMMANDS, TOPIC_COMMANDS_DLQ, TOPIC_EVENTS};
use common::outbox::{InvalidTableName, OutboxTable, Relay, RelaySettings, Waker};
use common::postgres::{Postgres, PostgresError};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Deserializer};
use tokio::net::TcpListener;

use crate::apply::Store;
use crate::consumer::ConsumerSettings;
use crate::engine::{Engine, EngineSettings};
use crate::handler::Handlers;
use crate::webhook::WebhookHandler;

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "processor";

/// The processor's outbox table (see the stack's migrations).
pub const OUTBOX_TABLE: &str = "processor_outbox";

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// The write model, command status and outbox database.
    pub postgres: PostgresConfig,
    /// Commands in; events and dead letters out.
    pub kafka: KafkaConfig,
    /// The processor's own settings (`PROCESSOR_*`).
    pub processor: ProcessorConfig,
}

impl Config {
    /// The consumer group on `commands`: `PROCESSOR_CONSUMER_GROUP`, or
    /// `<KAFKA_TOPIC_PREFIX>processor`.
    pub fn consumer_group(&self) -> String {
        self.processor
            .processor_consumer_group
            .clone()
            .unwrap_or_else(|| format!("{}processor", self.kafka.kafka_topic_prefix))
    }
}

/// The `PROCESSOR_*` variables.
#[derive(Debug, Clone, Deserialize)]
pub struct ProcessorConfig {
    /// `PROCESSOR_MAX_ATTEMPTS`: attempts before a transiently failing command is
    /// dead-lettered. Default 5.
    #[serde(default = "defaults::max_attempts")]
    pub processor_max_attempts: u32,
    /// `PROCESSOR_BACKOFF_BASE_MS`: delay before the first retry (doubling, jittered).
    /// Default 100.
    #[serde(default = "defaults::backoff_base_ms")]
    pub processor_backoff_base_ms: u64,
    /// `PROCESSOR_BACKOFF_MAX_MS`: longest delay between retries. Default 5000.
    #[serde(default = "defaults::backoff_max_ms")]
    pub processor_backoff_max_ms: u64,
    /// `PROCESSOR_WEBHOOK_TIMEOUT_MS`: connect and whole-request timeout of a webhook call.
    /// Default 5000.
    #[serde(default = "defaults::webhook_timeout_ms")]
    pub processor_webhook_timeout_ms: u64,
    /// `PROCESSOR_WEBHOOKS`: JSON object, command type → webhook URL
    /// (`{"approve-order":"http://orders:8080/approve"}`). Default none.
    #[serde(default, deserialize_with = "json_object")]
    pub processor_webhooks: BTreeMap<String, url::Url>,
    /// `PROCESSOR_OUTBOX_BATCH_SIZE`: rows the event relay publishes per batch. Default 500.
    #[serde(default = "defaults::outbox_batch_size")]
    pub processor_outbox_batch_size: u32,
    /// `PROCESSOR_OUTBOX_POLL_INTERVAL_MS`: the relay's fallback poll (and standby)
    /// interval. Default 1000.
    #[serde(default = "defaults::outbox_poll_interval_ms")]
    pub processor_outbox_poll_interval_ms: u64,
    /// `PROCESSOR_CONSUMER_GROUP`: the Kafka consumer group. Default
    /// `<KAFKA_TOPIC_PREFIX>processor`.
    pub processor_consumer_group: Option<String>,
    /// `PROCESSOR_BATCH_MAX`: commands of one partition decided and written in one
    /// statement at most, when that many are waiting (`1`: one command per statement).
    /// Default 128.
    #[serde(default = "defaults::batch_max")]
    pub processor_batch_max: usize,
}

fn json_object<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, url::Url>, D::Error> {
    let text = String::deserialize(deserializer)?;
    serde_json::from_str(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "PROCESSOR_WEBHOOKS must be a JSON object of command type to URL: {e}"
        ))
    })
}

mod defaults {
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn backoff_base_ms() -> u64 {
        100
    }
    pub fn backoff_max_ms() -> u64 {
        5000
    }
    pub fn webhook_timeout_ms() -> u64 {
        5000
    }
    pub fn outbox_batch_size() -> u32 {
        500
    }
    pub fn outbox_poll_interval_ms() -> u64 {
        1000
    }
    pub fn batch_max() -> usize {
        128
    }
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            postgres: vars.parse()?,
            kafka: vars.parse()?,
            processor: vars.parse()?,
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// The service could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL settings were unusable.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// A Kafka client could not be created.
    #[error("failed to create a Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    /// The webhook HTTP client could not be created.
    #[error("failed to create the webhook HTTP client: {0}")]
    Webhooks(#[from] reqwest::Error),
    /// The outbox table name is invalid.
    #[error(transparent)]
    Outbox(#[from] InvalidTableName),
    /// The HTTP server failed.
    #[error("failed to serve HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// Shared by every request handler and background task.
#[derive(Clone)]
pub struct AppState {
    /// Readiness, metrics and drain settings.
    pub ops: Ops,
    /// The database pool.
    pub db: Postgres,
    /// Produces events (through the outbox) and dead letters.
    pub producer: FutureProducer,
    /// The `commands` consumer.
    pub consumer: Arc<StreamConsumer>,
    /// Creates missing topics at start.
    pub admin: Arc<AdminClient<DefaultClientContext>>,
    /// Decides and applies commands.
    pub engine: Engine,
    /// The event relay's settings.
    pub relay: RelaySettings,
    /// Wakes the event relays after each applied command.
    pub outbox: Waker,
    /// The consumer's settings.
    pub consumer_settings: ConsumerSettings,
    /// Reads the replay group's committed offsets on `commands.dlq` (never joins the group),
    /// for `dead_letters_pending`.
    pub dead_letters: Arc<StreamConsumer>,
    /// The full name of `commands.dlq`.
    pub dead_letter_topic: String,
}

impl AppState {
    /// Creates the clients with the built-in handlers plus the configured webhooks
    /// (connections open lazily, so this never waits on a dependency).
    pub fn new(config: &Config) -> Result<Self, Error> {
        Self::with_handlers(config, Handlers::built_in())
    }

    /// Like [`AppState::new`], with `handlers` (the built-ins plus the embedding program's
    /// Rust handlers); the configured webhooks are added to them (a webhook wins over a
    /// handler registered for the same type).
    pub fn with_handlers(config: &Config, mut handlers: Handlers) -> Result<Self, Error> {
        let p = &config.processor;
        let db = Postgres::connect_lazy(&config.postgres)?;
        let producer = common::kafka::producer(&config.kafka, NAME)?;
        let group = config.consumer_group();
        let consumer: StreamConsumer = common::kafka::consumer(&config.kafka, NAME, &group)?;
        let consumer = Arc::new(consumer);
        let admin = Arc::new(common::kafka::admin(&config.kafka, NAME)?);
        let ops = Ops::new(NAME, &config.common)
            .with(db.clone())
            .with(KafkaCheck::producer(
                &producer,
                config.common.readiness_timeout(),
            ));

        if !p.processor_webhooks.is_empty() {
            let client = webhook::client(Duration::from_millis(p.processor_webhook_timeout_ms))?;
            for (command_type, url) in &p.processor_webhooks {
                handlers = handlers.with(
                    command_type.clone(),
                    WebhookHandler::new(client.clone(), url.clone()),
                );
            }
        }
        let table = OutboxTable::new(OUTBOX_TABLE)?;
        let outbox = Waker::new(table);
        let store = Store::new(
            db.pool().clone(),
            outbox.clone(),
            config.kafka.topic(TOPIC_EVENTS),
        );
        let engine = Engine::new(
            store,
            handlers,
            producer.clone(),
            EngineSettings {
                dlq_topic: config.kafka.topic(TOPIC_COMMANDS_DLQ),
                max_attempts: p.processor_max_attempts.max(1),
                backoff_base: Duration::from_millis(p.processor_backoff_base_ms.max(1)),
                backoff_max: Duration::from_millis(
                    p.processor_backoff_max_ms.max(p.processor_backoff_base_ms),
                ),
            },
        );
        let relay = RelaySettings {
            service: NAME,
            table,
            batch_size: p.processor_outbox_batch_size.max(1),
            poll_interval: Duration::from_millis(p.processor_outbox_poll_interval_ms.max(10)),
        };
        let consumer_settings = ConsumerSettings {
            commands_topic: config.kafka.topic(TOPIC_COMMANDS),
            ensure_topics: [TOPIC_COMMANDS, TOPIC_EVENTS, TOPIC_COMMANDS_DLQ]
                .map(|t| config.kafka.topic(t))
                .to_vec(),
            batch_max: p.processor_batch_max.max(1),
        };
        let dead_letters = Arc::new(common::kafka::assigned_consumer(
            &config.kafka,
            NAME,
            &replay::replay_group(config),
        )?);
        Ok(Self {
            ops,
            db,
            producer,
            consumer,
            admin,
            engine,
            relay,
            outbox,
            consumer_settings,
            dead_letters,
            dead_letter_topic: config.kafka.topic(TOPIC_COMMANDS_DLQ),
        })
    }
}

/// Every route of the service.
pub fn router(state: &AppState) -> Router {
    common::http::instrument(common::http::ops_router(&state.ops), NAME)
}

/// Applies the migrations in the background, starts the consumer and the event relay, and
/// serves until `shutdown` fires; then drains and waits for the background tasks (offsets of
/// processed commands are committed on the way out).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    state
        .db
        .migrate_in_background(NAME, &common::schema::MIGRATOR, &shutdown);
    let background = shutdown.child_token();
    let relay = Relay::new(
        state.db.pool().clone(),
        state.producer.clone(),
        state.relay.clone(),
    )
    .woken_by(&state.outbox);
    let relay = tokio::spawn(relay.run(background.clone()));
    let dead_letters = tokio::spawn(replay::report_pending(
        state.dead_letters.clone(),
        state.dead_letter_topic.clone(),
        background.clone(),
    ));
    let consumer = tokio::spawn(consumer::run(
        state.consumer.clone(),
        state.admin.clone(),
        state.db.clone(),
        state.engine.clone(),
        state.consumer_settings.clone(),
        background.clone(),
    ));
    let served = common::http::serve(listener, router(&state), &state.ops, shutdown).await;
    common::shutdown::stop_background(&background, [relay, consumer, dead_letters]).await;
    Ok(served?)
}

/// The processor as a [`Service`].
pub struct Processor;

impl Service for Processor {
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = 8083;
    type Config = Config;

    async fn start(
        listener: TcpListener,
        config: Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        run(listener, AppState::new(&config)?, shutdown).await?;
        Ok(())
    }
}
