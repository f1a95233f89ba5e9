//! The cache updater (port 8084) consumes the Kafka `events` topic, keeps the Redis read
//! model (document projections) current, publishes invalidations to the `cache` topic and
//! notifies the WebSocket hub's rooms through Redis pub/sub.
//!
//! So far it owns its dependencies' clients and the operational routes (`/health`, `/ready`
//! checking Redis and Kafka, `/metrics`); the projection is built on top of them.

use axum::Router;
use common::config::{CommonConfig, ConfigError, KafkaConfig, RedisConfig, Vars};
use common::http::Ops;
use common::kafka::KafkaCheck;
use common::redis::{Redis, RedisError};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use tokio::net::TcpListener;

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "cache-updater";

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// The read model and the hub's notification channels.
    pub redis: RedisConfig,
    /// Events in; invalidations out.
    pub kafka: KafkaConfig,
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            redis: vars.parse()?,
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
    /// Redis settings were unusable.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The Kafka producer could not be created.
    #[error("failed to create the Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    /// The HTTP server failed.
    #[error("failed to serve HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// Shared by every handler and background task.
#[derive(Clone)]
pub struct AppState {
    /// Readiness, metrics and drain settings.
    pub ops: Ops,
    /// Redis, connected in the background.
    pub redis: Redis,
    /// Publishes invalidations to the `cache` topic.
    pub producer: FutureProducer,
}

impl AppState {
    /// Creates the clients; Redis connects in the background until `shutdown`.
    pub fn new(config: &Config, shutdown: &CancellationToken) -> Result<Self, Error> {
        let redis = Redis::connect_in_background(NAME, &config.redis, shutdown)?;
        let producer = common::kafka::producer(&config.kafka, NAME)?;
        let ops = Ops::new(NAME, &config.common)
            .with(redis.clone())
            .with(KafkaCheck::producer(
                &producer,
                config.common.readiness_timeout(),
            ));
        Ok(Self {
            ops,
            redis,
            producer,
        })
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

/// The cache updater as a [`Service`].
pub struct CacheUpdater;

impl Service for CacheUpdater {
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = 8084;
    type Config = Config;

    async fn start(
        listener: TcpListener,
        config: Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let state = AppState::new(&config, &shutdown)?;
        run(listener, state, shutdown).await?;
        Ok(())
    }
}
