//! The WebSocket hub (port 8085): rooms that clients subscribe to, fanned out across replicas
//! through Redis pub/sub (one subscription per room per node), with JWT on connect, resume
//! after reconnect from a bounded per-room history, and per-connection protections.
//!
//! # Layout
//! - [`protocol`]: the client/server messages, JSON and MessagePack encodings.
//! - [`access`]: finding and verifying the token; room permissions from its claims.
//! - [`registry`]: the node's rooms, their Redis subscriptions and the fan-out.
//! - [`connection`]: the upgrade, per-connection reader/writer, keepalive, drain.
//! - [`loadgen`]: the client side used by the load generator and the benchmark.
//!
//! Rooms live in Redis as described in `common::rooms`; anything may publish to them through
//! `common::rooms::Rooms::publish` (the cache updater does).

pub mod access;
pub mod connection;
pub mod loadgen;
pub mod protocol;
pub mod registry;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use common::auth::{AuthConfig, AuthError, Verifier};
use common::config::{CommonConfig, ConfigError, RedisConfig, Vars};
use common::http::Ops;
use common::redis::{Redis, RedisError};
use common::rooms::{HistorySettings, Rooms};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::access::Patterns;
use crate::connection::{Hub, Settings};
use crate::registry::Registry;

/// The service's name in logs, traces and metrics.
pub const NAME: &str = "ws-hub";

/// The hub's own settings (`HUB_*`; defaults in the README's configuration table).
#[derive(Debug, Clone, Deserialize)]
pub struct HubConfig {
    /// `HUB_HISTORY_SIZE`: publications kept per room for resuming clients. Default 100.
    #[serde(default = "defaults::history_size")]
    pub hub_history_size: usize,
    /// `HUB_HISTORY_TTL_SECONDS`: how long a room's history and epoch outlive its last
    /// publication. Default 300.
    #[serde(default = "defaults::history_ttl_seconds")]
    pub hub_history_ttl_seconds: u64,
    /// `HUB_MAX_CONNECTIONS`: connections per node; beyond it the upgrade answers 503.
    /// Default 20000.
    #[serde(default = "defaults::max_connections")]
    pub hub_max_connections: usize,
    /// `HUB_SEND_QUEUE`: frames queued per connection before it counts as a slow consumer
    /// and is closed with 4000. Default 256.
    #[serde(default = "defaults::send_queue")]
    pub hub_send_queue: usize,
    /// `HUB_MAX_MESSAGE_BYTES`: largest client frame/message; larger closes with 1009.
    /// Default 65536.
    #[serde(default = "defaults::max_message_bytes")]
    pub hub_max_message_bytes: usize,
    /// `HUB_PING_INTERVAL_SECONDS`: keepalive ping period. Default 25.
    #[serde(default = "defaults::ping_interval_seconds")]
    pub hub_ping_interval_seconds: u64,
    /// `HUB_PONG_TIMEOUT_SECONDS`: extra silence allowed after a ping period before the
    /// connection is closed with 4001. Default 10.
    #[serde(default = "defaults::pong_timeout_seconds")]
    pub hub_pong_timeout_seconds: u64,
    /// `HUB_MESSAGE_RATE`: client messages per second per connection. Default 20.
    #[serde(default = "defaults::message_rate")]
    pub hub_message_rate: f64,
    /// `HUB_MESSAGE_BURST`: burst of client messages; a client that keeps sending this many
    /// messages more while limited is closed with 1008. Default 40.
    #[serde(default = "defaults::message_burst")]
    pub hub_message_burst: u32,
    /// `HUB_MAX_ROOMS_PER_CONNECTION`: rooms one connection may join. Default 128.
    #[serde(default = "defaults::max_rooms_per_connection")]
    pub hub_max_rooms_per_connection: usize,
    /// `HUB_MAX_CONNECTIONS_PER_SUBJECT`: connections one token subject may hold on a node;
    /// beyond it the upgrade answers 429. 0: no limit. Default 100.
    #[serde(default = "defaults::max_connections_per_subject")]
    pub hub_max_connections_per_subject: usize,
    /// `HUB_MAX_CONNECTIONS_PER_ADDRESS`: connections one client address may hold on a node
    /// (anonymous ones included); beyond it the upgrade answers 429. 0 (default): no limit —
    /// behind a proxy every client shares the proxy's address unless `HUB_TRUSTED_PROXY_HOPS`
    /// says how to find the client's.
    #[serde(default)]
    pub hub_max_connections_per_address: usize,
    /// `HUB_TRUSTED_PROXY_HOPS`: proxies in front of the hub that append to
    /// `X-Forwarded-For` (an ingress: 1); the client address is the entry they added. 0
    /// (default): the TCP peer.
    #[serde(default)]
    pub hub_trusted_proxy_hops: usize,
    /// `HUB_ANONYMOUS_ROOMS`: comma-separated room patterns connections without a token may
    /// join. Default empty (a token is required).
    #[serde(default)]
    pub hub_anonymous_rooms: Vec<String>,
    /// `HUB_PUBLISH_ROOMS`: comma-separated room patterns clients may publish to (if their
    /// token also lets them join the room). Default empty (clients never publish).
    #[serde(default)]
    pub hub_publish_rooms: Vec<String>,
    /// `HUB_DRAIN_JITTER_MS`: on shutdown, clients are told to reconnect after a random
    /// delay up to this. Default 5000.
    #[serde(default = "defaults::drain_jitter_ms")]
    pub hub_drain_jitter_ms: u64,
}

mod defaults {
    pub fn history_size() -> usize {
        100
    }
    pub fn history_ttl_seconds() -> u64 {
        300
    }
    pub fn max_connections() -> usize {
        20_000
    }
    pub fn send_queue() -> usize {
        256
    }
    pub fn max_message_bytes() -> usize {
        64 * 1024
    }
    pub fn ping_interval_seconds() -> u64 {
        25
    }
    pub fn pong_timeout_seconds() -> u64 {
        10
    }
    pub fn message_rate() -> f64 {
        20.0
    }
    pub fn message_burst() -> u32 {
        40
    }
    pub fn max_rooms_per_connection() -> usize {
        128
    }
    pub fn max_connections_per_subject() -> usize {
        100
    }
    pub fn drain_jitter_ms() -> u64 {
        5000
    }
}

impl HubConfig {
    /// The room history settings.
    pub fn history(&self) -> HistorySettings {
        HistorySettings {
            size: self.hub_history_size.max(1),
            ttl: Duration::from_secs(self.hub_history_ttl_seconds.max(1)),
        }
    }

    /// The connection limits and policies.
    pub fn settings(&self) -> Settings {
        Settings {
            max_connections: self.hub_max_connections,
            max_connections_per_subject: self.hub_max_connections_per_subject,
            max_connections_per_address: self.hub_max_connections_per_address,
            trusted_proxy_hops: self.hub_trusted_proxy_hops,
            send_queue: self.hub_send_queue.max(1),
            max_message_bytes: self.hub_max_message_bytes.max(1024),
            ping_interval: Duration::from_secs(self.hub_ping_interval_seconds.max(1)),
            pong_timeout: Duration::from_secs(self.hub_pong_timeout_seconds),
            message_rate: self.hub_message_rate,
            message_burst: self.hub_message_burst,
            max_rooms_per_connection: self.hub_max_rooms_per_connection,
            anonymous_rooms: Patterns::new(&self.hub_anonymous_rooms),
            publish_rooms: Patterns::new(&self.hub_publish_rooms),
            drain_jitter: Duration::from_millis(self.hub_drain_jitter_ms),
        }
    }
}

/// Configuration, from the environment (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct Config {
    /// Port, logging, telemetry, timeouts.
    pub common: CommonConfig,
    /// Pub/sub fan-out and room history.
    pub redis: RedisConfig,
    /// JWT verification (`JWT_*`, shared with the gateway).
    pub auth: AuthConfig,
    /// The hub's own settings.
    pub hub: HubConfig,
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            redis: vars.parse()?,
            auth: vars.parse()?,
            hub: vars.parse()?,
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
    /// The JWT settings were unusable.
    #[error("failed to set up token verification: {0}")]
    Auth(#[from] AuthError),
    /// The HTTP server failed.
    #[error("failed to serve HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// Shared by every connection and background task.
#[derive(Clone)]
pub struct AppState {
    /// Readiness, metrics and drain settings.
    pub ops: Ops,
    /// Redis, connected in the background.
    pub redis: Redis,
    /// The node's connections and rooms.
    pub hub: Arc<Hub>,
}

impl AppState {
    /// Creates the clients; Redis connects in the background until `shutdown`.
    pub fn new(config: &Config, shutdown: &CancellationToken) -> Result<Self, Error> {
        let redis = Redis::connect_in_background(NAME, &config.redis, shutdown)?;
        let pubsub = registry::Source::for_config(&config.redis)?;
        let rooms = Rooms::new(redis.clone(), config.hub.history());
        let verifier = Verifier::new(&config.auth)?;
        let registry = Registry::new(
            rooms,
            pubsub,
            Duration::from_millis(config.redis.redis_timeout_ms),
        );
        let hub = Hub::new(config.hub.settings(), registry.clone(), verifier);
        let ops = Ops::new(NAME, &config.common)
            .with(redis.clone())
            .with(registry);
        Ok(Self { ops, redis, hub })
    }
}

/// Every route of the service: `/ws` and the operational routes.
pub fn router(state: &AppState) -> Router {
    let ws = Router::new()
        .route("/ws", get(connection::upgrade))
        .with_state(state.hub.clone());
    common::http::instrument(common::http::ops_router(&state.ops).merge(ws), NAME)
}

/// Serves until `shutdown` fires, then drains: clients are told to reconnect elsewhere and
/// closed with 1012, within the grace period.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let hub = state.hub.clone();
    let background = CancellationToken::new();
    tokio::spawn(hub.registry().clone().run(background.clone()));
    tokio::spawn(hub.clone().keepalive(background.clone()));
    let draining = hub.clone();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        signal.cancelled().await;
        draining.drain();
    });
    let served = common::http::serve(listener, router(&state), &state.ops, shutdown).await;
    hub.drain();
    hub.drained(state.ops.grace).await;
    background.cancel();
    Ok(served?)
}

/// Raises the soft limit of open files to the hard limit: every connection is a socket.
fn raise_open_files_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + 64 => tracing::warn!(
            limit,
            max_connections,
            "The open-files limit is below HUB_MAX_CONNECTIONS; connections beyond it will fail."
        ),
        Ok(limit) => tracing::debug!(limit, "Open-files limit raised."),
        Err(error) => tracing::warn!(%error, "Cannot raise the open-files limit."),
    }
}

/// The WebSocket hub as a [`Service`].
pub struct WsHub;

impl Service for WsHub {
    const NAME: &'static str = NAME;
    const DEFAULT_PORT: u16 = 8085;
    type Config = Config;

    async fn start(
        listener: TcpListener,
        config: Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        raise_open_files_limit(config.hub.hub_max_connections);
        let state = AppState::new(&config, &shutdown)?;
        run(listener, state, shutdown).await?;
        Ok(())
    }
}
