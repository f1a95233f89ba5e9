//! The command service (port 8082) accepts commands with idempotency keys, tracks their
//! status, and records them with a transactional outbox in PostgreSQL that is relayed to the
//! Kafka `commands` topic.
//!
//! # Layout
//! - [`caller`]: who is calling (the verified bearer token, or `X-Client-Id` when no JWT
//!   key is configured) and what its grants allow.
//! - [`commands`]: `POST /v1/commands` (idempotent intake: command + idempotency record +
//!   outbox row in one transaction) and `GET /v1/commands/{id}`; expired-key cleanup.
//! - [`documents`]: `GET /v1/documents/{collection}/{id}` from the write model (the read
//!   model's fallback).
//! - [`error`]: [`ApiError`](error::ApiError) (problem+json) and the [`Json`](error::Json)
//!   extractor rejecting with it.
//! - this file: [`Config`], [`AppState`], [`router`], [`run`] (HTTP + the outbox relay + the
//!   cleanup task, all stopped by the shutdown token) and the [`Service`] impl.

pub mod caller;
pub mod commands;
pub mod documents;
pub mod error;
pub mod intake;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use common::auth::{AuthConfig, Verifier};
use common::config::{CommonConfig, ConfigError, KafkaConfig, PostgresConfig, Vars};
use common::http::Ops;
use common::kafka::{KafkaCheck, TOPIC_COMMANDS};
use common::outbox::{OutboxTable, Relay, RelaySettings, Waker};
use common::postgres::{Postgres, PostgresError};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use intake::{Intake, IntakeSettings};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use tokio::net::TcpListener;

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "command-service";

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// The write model and outbox database.
    pub postgres: PostgresConfig,
    /// Where the outbox is relayed.
    pub kafka: KafkaConfig,
    /// JWT verification (`JWT_*`, as the gateway's).
    pub auth: AuthConfig,
    /// The command API's own settings (`COMMANDS_*`).
    pub commands: CommandsConfig,
}

/// The `COMMANDS_*` variables.
#[derive(Debug, Clone, Deserialize)]
pub struct CommandsConfig {
    /// `COMMANDS_IDEMPOTENCY_TTL_SECONDS`: how long an `Idempotency-Key` is remembered.
    /// Default 86400 (24 h).
    #[serde(default = "defaults::idempotency_ttl_seconds")]
    pub commands_idempotency_ttl_seconds: u64,
    /// `COMMANDS_IDEMPOTENCY_CLEANUP_INTERVAL_MS`: how often expired keys are deleted.
    /// Default 60000.
    #[serde(default = "defaults::cleanup_interval_ms")]
    pub commands_idempotency_cleanup_interval_ms: u64,
    /// `COMMANDS_MAX_BODY_BYTES`: request body limit (413 above). Default 1048576 (1 MiB).
    #[serde(default = "defaults::max_body_bytes")]
    pub commands_max_body_bytes: usize,
    /// `COMMANDS_CUSTOM_TYPES`: comma-separated command types accepted besides `create`,
    /// `replace`, `patch` and `delete`. Default none.
    #[serde(default)]
    pub commands_custom_types: Vec<String>,
    /// `COMMANDS_BATCH_MAX`: commands written per transaction at most by the group commit
    /// (see `intake`). Default 64.
    #[serde(default = "defaults::batch_max")]
    pub commands_batch_max: usize,
    /// `COMMANDS_BATCH_WRITERS`: transactions writing commands at once at most; each holds
    /// one database connection while it runs (keep it below `DATABASE_MAX_CONNECTIONS`).
    /// Default 4.
    #[serde(default = "defaults::batch_writers")]
    pub commands_batch_writers: usize,
    /// `COMMANDS_BATCH_SHARE_MS`: how long requests that arrive while a transaction runs wait
    /// for it to end, to share the next transaction, before another writer starts one
    /// alongside (see `intake`). 0 starts one at once, as long as a writer is free. Default 5.
    #[serde(default = "defaults::batch_share_ms")]
    pub commands_batch_share_ms: u64,
    /// `COMMANDS_OUTBOX_BATCH_SIZE`: rows the relay publishes per batch. Default 500.
    #[serde(default = "defaults::outbox_batch_size")]
    pub commands_outbox_batch_size: u32,
    /// `COMMANDS_OUTBOX_POLL_INTERVAL_MS`: the relay's fallback poll (and standby) interval.
    /// Default 1000.
    #[serde(default = "defaults::outbox_poll_interval_ms")]
    pub commands_outbox_poll_interval_ms: u64,
}

mod defaults {
    pub fn idempotency_ttl_seconds() -> u64 {
        86_400
    }
    pub fn cleanup_interval_ms() -> u64 {
        60_000
    }
    pub fn max_body_bytes() -> usize {
        1024 * 1024
    }
    pub fn batch_max() -> usize {
        64
    }
    pub fn batch_writers() -> usize {
        4
    }
    pub fn batch_share_ms() -> u64 {
        5
    }
    pub fn outbox_batch_size() -> u32 {
        500
    }
    pub fn outbox_poll_interval_ms() -> u64 {
        1000
    }
}

/// What the handlers and background tasks need from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Full name of the `commands` topic (prefix included).
    pub commands_topic: String,
    /// Idempotency record lifetime.
    pub idempotency_ttl: Duration,
    /// Expired-key cleanup interval.
    pub cleanup_interval: Duration,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Accepted custom command types.
    pub custom_types: Vec<String>,
    /// The outbox relay.
    pub relay: RelaySettings,
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            postgres: vars.parse()?,
            kafka: vars.parse()?,
            auth: vars.parse()?,
            commands: vars.parse()?,
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
    /// The JWT settings were unusable.
    #[error(transparent)]
    Auth(#[from] common::auth::AuthError),
    /// The Kafka producer could not be created.
    #[error("failed to create the Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
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
    /// The outbox relay's producer.
    pub producer: FutureProducer,
    /// Creates the `commands` topic at start when it is missing (the operator normally has).
    pub admin: Arc<AdminClient<DefaultClientContext>>,
    /// Wakes the `commands` relays after each accepted command.
    pub outbox: Waker,
    /// The group commit that writes accepted commands.
    pub intake: Intake,
    /// Verifies callers' tokens (see [`caller`]).
    pub verifier: Verifier,
    /// Settings from the configuration.
    pub settings: Arc<Settings>,
}

impl AppState {
    /// Creates the clients (connections open lazily, so this never waits on a dependency).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let db = Postgres::connect_lazy(&config.postgres)?;
        let producer = common::kafka::producer(&config.kafka, NAME)?;
        let admin = Arc::new(common::kafka::admin(&config.kafka, NAME)?);
        let verifier = Verifier::new(&config.auth)?;
        if !verifier.is_enabled() {
            tracing::warn!(
                "No JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS_URL: callers are named by X-Client-Id and nothing is authorized."
            );
        }
        // Without Kafka commands are still accepted: the outbox keeps them for the relay.
        let ops = Ops::new(NAME, &config.common)
            .with(db.clone())
            .with_optional(KafkaCheck::producer(
                &producer,
                config.common.readiness_timeout(),
            ));
        let c = &config.commands;
        let settings = Arc::new(Settings {
            commands_topic: config.kafka.topic(TOPIC_COMMANDS),
            idempotency_ttl: Duration::from_secs(c.commands_idempotency_ttl_seconds),
            cleanup_interval: Duration::from_millis(c.commands_idempotency_cleanup_interval_ms),
            max_body_bytes: c.commands_max_body_bytes,
            custom_types: c.commands_custom_types.clone(),
            relay: RelaySettings {
                service: NAME,
                table: OutboxTable::DEFAULT,
                batch_size: c.commands_outbox_batch_size.max(1),
                poll_interval: Duration::from_millis(c.commands_outbox_poll_interval_ms.max(10)),
            },
        });
        Ok(Self {
            ops,
            db,
            producer,
            admin,
            outbox: Waker::new(OutboxTable::DEFAULT),
            intake: Intake::new(IntakeSettings {
                max_batch: c.commands_batch_max,
                writers: c.commands_batch_writers,
                share: Duration::from_millis(c.commands_batch_share_ms),
                commands_topic: settings.commands_topic.clone(),
                idempotency_ttl: settings.idempotency_ttl,
            }),
            verifier,
            settings,
        })
    }
}

/// Every route of the service.
pub fn router(state: &AppState) -> Router {
    let api = commands::router(state)
        .merge(documents::router(state))
        .merge(common::http::ops_router(&state.ops))
        .fallback(|| async { error::ApiError::NotFound });
    common::http::instrument(api, NAME)
}

/// Applies the migrations in the background, starts the outbox relay and the expired-key
/// cleanup, and serves until `shutdown` fires; then drains and waits for the background tasks.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    state
        .db
        .migrate_in_background(NAME, &common::schema::MIGRATOR, &shutdown);
    // Exported from the start, at 0: a dashboard shows 0 rather than "no data".
    metrics::counter!(common::metrics::IDEMPOTENCY_REPLAYS_TOTAL, "service" => NAME).increment(0);
    // Background work stops with the process token, or when serving fails.
    let background = shutdown.child_token();
    let relay = Relay::new(
        state.db.pool().clone(),
        state.producer.clone(),
        state.settings.relay.clone(),
    )
    .woken_by(&state.outbox);
    // The relay publishes to `commands`: make sure the topic exists first (broker defaults; the
    // operator creates it with the stack's settings before the service starts), so a fresh
    // set-up never leaves the relay waiting on a missing topic until delivery times out.
    let relay = tokio::spawn({
        let admin = Arc::clone(&state.admin);
        let topic = state.settings.commands_topic.clone();
        let token = background.clone();
        async move {
            let topics = [(topic.as_str(), -1)];
            let ensured = common::retry::until_connected(NAME, "kafka", &token, || {
                common::kafka::ensure_topics(&admin, &topics, -1)
            })
            .await;
            if ensured.is_some() {
                relay.run(token).await;
            }
        }
    });
    let intake = tokio::spawn(state.intake.clone().run(
        state.db.pool().clone(),
        state.outbox.clone(),
        background.clone(),
    ));
    let cleanup = tokio::spawn(commands::cleanup_expired_keys(
        state.db.pool().clone(),
        state.settings.cleanup_interval,
        background.clone(),
    ));
    let served = common::http::serve(listener, router(&state), &state.ops, shutdown).await;
    common::shutdown::stop_background(&background, [relay, intake, cleanup]).await;
    Ok(served?)
}

/// The command service as a [`Service`].
pub struct CommandService;

impl Service for CommandService {
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = 8082;
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
