//! The cache updater (port 8084) consumes the Kafka `events` topic, keeps the Redis read
//! model (document projections, [`common::readmodel`]) current, notifies the WebSocket hub's
//! rooms ([`common::rooms`]) and publishes invalidations to the `cache` topic.
//!
//! # Layout
//! - [`updater`]: the consumer loop: messages handled in batches of those already waiting,
//!   one pipeline of version-guarded scripts per batch, room notifications (one more
//!   pipeline) and invalidations only for events that changed the projection, offsets stored
//!   in read order only after the effects are done.
//! - [`rebuild`]: the `rebuild` subcommand: replay `events` from the beginning into an
//!   emptied read model, then exit.
//! - this file: [`Config`], [`AppState`], [`router`], [`run`] (HTTP + the consumer loop, both
//!   stopped by the shutdown token) and the [`Service`] impl.

pub mod rebuild;
pub mod updater;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use common::config::{CommonConfig, ConfigError, KafkaConfig, RedisConfig, Vars};
use common::http::Ops;
use common::kafka::{KafkaCheck, TOPIC_CACHE, TOPIC_EVENTS};
use common::redis::{Redis, RedisError};
use common::rooms::{HistorySettings, Rooms};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::updater::{Updater, UpdaterSettings};

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
    /// The cache updater's own settings (`CACHE_*`).
    pub cache: CacheConfig,
}

/// The `CACHE_*` variables.
#[derive(Debug, Clone, Deserialize)]
pub struct CacheConfig {
    /// `CACHE_TOMBSTONE_TTL_SECONDS`: how long a deleted document's tombstone (which blocks
    /// older events from resurrecting it) is kept. Default 86400 (24 h).
    #[serde(default = "defaults::tombstone_ttl_seconds")]
    pub cache_tombstone_ttl_seconds: u64,
    /// `CACHE_CONSUMER_GROUP`: the Kafka consumer group on `events`. Default
    /// `<KAFKA_TOPIC_PREFIX>cache-updater`.
    pub cache_consumer_group: Option<String>,
    /// `CACHE_MAX_IN_FLIGHT`: applied events whose invalidation may await Kafka's ack at once
    /// (their offsets are stored in order once acknowledged). Default 1000.
    #[serde(default = "defaults::max_in_flight")]
    pub cache_max_in_flight: usize,
    /// `CACHE_BATCH_MAX`: messages handled as one batch at most: after one message arrives,
    /// those already waiting are taken too (up to 1 MiB of payloads) and the whole batch
    /// costs two Redis round trips. Default 256.
    #[serde(default = "defaults::batch_max")]
    pub cache_batch_max: usize,
    /// `CACHE_ROOM_HISTORY_SIZE`: publications kept per room for resuming clients; set it to
    /// the hub's `HUB_HISTORY_SIZE`. Default 100.
    #[serde(default = "defaults::room_history_size")]
    pub cache_room_history_size: usize,
    /// `CACHE_ROOM_HISTORY_TTL_SECONDS`: how long a room's history lives after its last
    /// publication; set it to the hub's `HUB_HISTORY_TTL_SECONDS`. Default 300.
    #[serde(default = "defaults::room_history_ttl_seconds")]
    pub cache_room_history_ttl_seconds: u64,
    /// `CACHE_INVALIDATION_LINGER_MS`: the `linger.ms` of the producer of `cache`
    /// invalidations (instead of `KAFKA_LINGER_MS`). Default 10. Invalidations are not on the
    /// way to the hub's notification (that goes through Redis first), so they can wait to
    /// share produce requests: at 1,000 events/s a 1 ms linger sent nearly one request per
    /// event, each of them work for a broker that shares the machine with the pipeline.
    #[serde(default = "defaults::invalidation_linger_ms")]
    pub cache_invalidation_linger_ms: u64,
}

mod defaults {
    pub fn tombstone_ttl_seconds() -> u64 {
        86_400
    }
    pub fn max_in_flight() -> usize {
        1000
    }
    pub fn batch_max() -> usize {
        256
    }
    pub fn room_history_size() -> usize {
        100
    }
    pub fn room_history_ttl_seconds() -> u64 {
        300
    }
    pub fn invalidation_linger_ms() -> u64 {
        10
    }
}

impl Config {
    /// The consumer group of the live updater.
    pub fn consumer_group(&self) -> String {
        self.cache
            .cache_consumer_group
            .clone()
            .unwrap_or_else(|| self.kafka.topic(NAME))
    }

    /// The room history settings.
    pub fn history(&self) -> HistorySettings {
        HistorySettings {
            size: self.cache.cache_room_history_size.max(1),
            ttl: Duration::from_secs(self.cache.cache_room_history_ttl_seconds.max(1)),
        }
    }

    /// What the consumer loop needs.
    pub fn updater_settings(&self) -> UpdaterSettings {
        UpdaterSettings {
            key_prefix: self.redis.redis_key_prefix.clone(),
            events_topic: self.kafka.topic(TOPIC_EVENTS),
            cache_topic: self.kafka.topic(TOPIC_CACHE),
            tombstone_ttl: Duration::from_secs(self.cache.cache_tombstone_ttl_seconds.max(1)),
            max_in_flight: self.cache.cache_max_in_flight.max(1),
            batch_max: self.cache.cache_batch_max.max(1),
            delivery_timeout: Duration::from_millis(self.kafka.kafka_timeout_ms.max(100)),
        }
    }
}

impl ServiceConfig for Config {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            redis: vars.parse()?,
            kafka: vars.parse()?,
            cache: vars.parse()?,
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
    /// A Kafka client could not be created.
    #[error("failed to create a Kafka client: {0}")]
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
    /// The consumer group member on `events`.
    pub consumer: Arc<StreamConsumer>,
    /// Room notifications.
    pub rooms: Rooms,
    /// The consumer loop's settings.
    pub settings: Arc<UpdaterSettings>,
}

impl AppState {
    /// Creates the clients; Redis connects in the background until `shutdown`.
    pub fn new(config: &Config, shutdown: &CancellationToken) -> Result<Self, Error> {
        let redis = Redis::connect_in_background(NAME, &config.redis, shutdown)?;
        let invalidations = KafkaConfig {
            kafka_linger_ms: config.cache.cache_invalidation_linger_ms,
            ..config.kafka.clone()
        };
        let producer = common::kafka::producer(&invalidations, NAME)?;
        let consumer = Arc::new(common::kafka::consumer(
            &config.kafka,
            NAME,
            &config.consumer_group(),
        )?);
        let ops = Ops::new(NAME, &config.common)
            .with(redis.clone())
            .with(KafkaCheck::consumer(
                consumer.clone(),
                config.common.readiness_timeout(),
            ));
        Ok(Self {
            ops,
            rooms: Rooms::new(redis.clone(), config.history()),
            redis,
            producer,
            consumer,
            settings: Arc::new(config.updater_settings()),
        })
    }
}

/// Every route of the service.
pub fn router(state: &AppState) -> Router {
    common::http::instrument(common::http::ops_router(&state.ops), NAME)
}

/// Runs the consumer loop and serves HTTP until `shutdown` fires; then drains both.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let updater = Updater::new(
        state.consumer.clone(),
        state.redis.clone(),
        state.rooms.clone(),
        state.producer.clone(),
        state.settings.clone(),
    );
    // A child token: the loop also stops when the HTTP server fails, without cancelling the
    // caller's token.
    let stop = shutdown.child_token();
    let consuming = tokio::spawn(updater.run(stop.clone()));
    let lag = tokio::spawn(common::kafka::report_lag(
        state.consumer.clone(),
        NAME,
        stop.clone(),
    ));
    let served = common::http::serve(listener, router(&state), &state.ops, shutdown).await;
    stop.cancel();
    if let Err(error) = consuming.await {
        tracing::error!(%error, "The consumer loop panicked.");
    }
    lag.abort();
    Ok(served?)
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
