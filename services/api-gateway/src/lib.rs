//! The API gateway (port 8080): routes requests to the services, authenticates JWTs and
//! enforces per-client and per-user rate limits shared by all replicas through Redis.
//!
//! So far it owns its Redis client and the operational routes (`/health`, `/ready` checking
//! Redis, `/metrics`); routing, auth and rate limiting are built on top of them.

use axum::Router;
use common::config::{CommonConfig, ConfigError, RedisConfig, Vars};
use common::http::Ops;
use common::redis::{Redis, RedisError};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use tokio::net::TcpListener;

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "api-gateway";

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// Rate-limit state and the document read model.
    pub redis: RedisConfig,
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            redis: vars.parse()?,
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
    /// The HTTP server failed.
    #[error("failed to serve HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// Shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    /// Readiness, metrics and drain settings.
    pub ops: Ops,
    /// Redis, connected in the background.
    pub redis: Redis,
}

impl AppState {
    /// Creates the clients; Redis connects in the background until `shutdown`.
    pub fn new(config: &Config, shutdown: &CancellationToken) -> Result<Self, Error> {
        let redis = Redis::connect_in_background(NAME, &config.redis, shutdown)?;
        let ops = Ops::new(NAME, &config.common).with(redis.clone());
        Ok(Self { ops, redis })
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

/// The API gateway as a [`Service`].
pub struct ApiGateway;

impl Service for ApiGateway {
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = 8080;
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
