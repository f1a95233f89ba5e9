//! The processor (port 8083) consumes the Kafka `commands` topic, runs each command's
//! handler (with retries and a dead-letter topic), applies the effect to the PostgreSQL write
//! model and emits events through its own outbox to the `events` topic.
//!
//! So far it owns its dependencies' clients and the operational routes (`/health`, `/ready`
//! checking PostgreSQL and Kafka, `/metrics`); command handling is built on top of them.

use axum::Router;
use common::config::{CommonConfig, ConfigError, KafkaConfig, PostgresConfig, Vars};
use common::http::Ops;
use common::kafka::KafkaCheck;
use common::postgres::{Postgres, PostgresError};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use tokio::net::TcpListener;

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "processor";

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// The write model, command status and outbox database.
    pub postgres: PostgresConfig,
    /// Commands in; events and dead letters out.
    pub kafka: KafkaConfig,
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            postgres: vars.parse()?,
            kafka: vars.parse()?,
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
    /// Produces events (through the outbox) and dead letters.
    pub producer: FutureProducer,
}

impl AppState {
    /// Creates the clients (connections open lazily, so this never waits on a dependency).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let db = Postgres::connect_lazy(&config.postgres)?;
        let producer = common::kafka::producer(&config.kafka, NAME)?;
        let ops = Ops::new(NAME, &config.common)
            .with(db.clone())
            .with(KafkaCheck::producer(
                &producer,
                config.common.readiness_timeout(),
            ));
        Ok(Self { ops, db, producer })
    }
}

/// Every route of the service.
pub fn router(state: &AppState) -> Router {
    common::http::instrument(common::http::ops_router(&state.ops), NAME)
}

/// Serves until `shutdown` fires, then drains.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    Ok(common::http::serve(listener, router(&state), &state.ops, shutdown).await?)
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
