//! Redis: a [`ConnectionManager`] (multiplexed, reconnecting) established in the background
//! with the shared backoff, so the service starts and reports not-ready while Redis is down.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use crate::config::RedisConfig;
use crate::health::Check;
use crate::shutdown::CancellationToken;

/// A Redis operation could not run.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `REDIS_URL` did not parse.
    #[error("failed to parse REDIS_URL: {0}")]
    Url(#[source] redis::RedisError),
    /// The first connection has not been established yet.
    #[error("not connected to Redis yet")]
    NotConnected,
    /// A command failed.
    #[error("failed to run a Redis command: {0}")]
    Command(#[from] redis::RedisError),
}

/// A client for `url` whose connections set `TCP_NODELAY`.
///
/// redis-rs leaves Nagle's algorithm on by default. On a multiplexed connection a request
/// written while an earlier one is unacknowledged then waits for the peer's delayed ACK (up
/// to 40 ms on Linux): exactly the tail latency pipelined traffic (rate-limit checks, room
/// publications, read-model scripts) must not have.
pub fn client(url: &str) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo as _;
    let info = url.into_connection_info()?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    redis::Client::open(info.set_tcp_settings(tcp))
}

/// A handle to Redis that fills in once the first connection succeeds. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    manager: Arc<OnceCell<ConnectionManager>>,
    key_prefix: Arc<str>,
    timeout: Duration,
}

impl Redis {
    /// Parses the URL now and connects in the background, retrying until `shutdown`.
    pub fn connect_in_background(
        service: &'static str,
        config: &RedisConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self, RedisError> {
        let client = client(config.redis_url.expose_secret()).map_err(RedisError::Url)?;
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let redis = Self {
            manager: Arc::default(),
            key_prefix: config.redis_key_prefix.as_str().into(),
            timeout,
        };
        let (cell, shutdown) = (redis.manager.clone(), shutdown.clone());
        tokio::spawn(async move {
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            let connected = crate::retry::until_connected(service, "redis", &shutdown, || {
                ConnectionManager::new_with_config(client.clone(), manager_config.clone())
            })
            .await;
            if let Some(manager) = connected {
                tracing::info!(service, "Connected to Redis.");
                let _ = cell.set(manager);
            }
        });
        Ok(redis)
    }

    /// A connection (clones share one multiplexed socket), or `NotConnected` before the first
    /// connection succeeded.
    pub fn connection(&self) -> Result<ConnectionManager, RedisError> {
        self.manager.get().cloned().ok_or(RedisError::NotConnected)
    }

    /// `prefix` + `suffix`: every key and channel of this stack carries the prefix, which the
    /// stack's Redis ACL user is restricted to.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.key_prefix)
    }

    /// The configured response timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Check for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.connection().map_err(|e| e.to_string())?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(format!("unexpected PING reply {pong:?}"))
            }
        })
    }
}
