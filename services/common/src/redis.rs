//! Redis: a [`ConnectionManager`] (multiplexed, reconnecting) established in the background
//! with the shared backoff, so the service starts and reports not-ready while Redis is down.
//!
//! A `ConnectionManager` whose reconnect was refused (`AuthenticationFailed`: Redis restarted
//! without the stack's ACL user, which the operator re-creates moments later) never tries
//! again: redis-rs reconnects only after I/O errors. [`Redis`] replaces such a manager with a
//! new one, connected in the background with the same backoff, so the service heals by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisConfig;
use crate::health::Check;
use crate::shutdown::CancellationToken;

/// A Redis operation could not run.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `REDIS_URL` did not parse (or, with `REDIS_CA_FILE`, the CA did not).
    #[error("invalid REDIS_URL or REDIS_CA_FILE: {0}")]
    Url(#[source] redis::RedisError),
    /// `REDIS_CA_FILE` could not be read.
    #[error("failed to read REDIS_CA_FILE {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
///
/// A `rediss://` URL connects over TLS (rustls), trusting the system's roots.
pub fn client(url: &str) -> redis::RedisResult<redis::Client> {
    client_trusting(url, None)
}

/// [`client`], trusting the PEM CA bundle `ca` for `rediss://` instead of the system's roots.
pub fn client_trusting(url: &str, ca: Option<Vec<u8>>) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo as _;
    let info = url.into_connection_info()?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    let info = info.set_tcp_settings(tcp);
    match ca {
        Some(root_cert) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        ),
        None => redis::Client::open(info),
    }
}

/// The client `config` describes: its URL, and its CA file when set (`REDIS_CA_FILE`).
///
/// # Errors
/// When the URL does not parse, or the CA file cannot be read or holds no certificate.
pub fn client_for(config: &RedisConfig) -> Result<redis::Client, RedisError> {
    let ca = match &config.redis_ca_file {
        Some(path) if !path.is_empty() => {
            Some(std::fs::read(path).map_err(|source| RedisError::CaFile {
                path: path.clone(),
                source,
            })?)
        }
        _ => None,
    };
    client_trusting(config.redis_url.expose_secret(), ca).map_err(RedisError::Url)
}

/// A handle to Redis that fills in once the first connection succeeds. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    shared: Arc<Shared>,
    key_prefix: Arc<str>,
    timeout: Duration,
}

/// What every clone of a [`Redis`] shares: the current manager and how to make a new one.
struct Shared {
    manager: RwLock<Option<ConnectionManager>>,
    /// A replacement manager is being connected.
    replacing: AtomicBool,
    client: redis::Client,
    config: ConnectionManagerConfig,
    service: &'static str,
    shutdown: CancellationToken,
}

impl Shared {
    /// Connects a new manager in the background (retrying until `shutdown`) and installs it;
    /// a no-op while one is being connected already.
    fn connect_in_background(self: &Arc<Self>) {
        if self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            let connected =
                crate::retry::until_connected(shared.service, "redis", &shared.shutdown, || {
                    ConnectionManager::new_with_config(shared.client.clone(), shared.config.clone())
                })
                .await;
            if let Some(manager) = connected {
                tracing::info!(service = shared.service, "Connected to Redis.");
                // A poisoned lock only means a reader panicked; the value is still a manager.
                *shared.manager.write().unwrap_or_else(|e| e.into_inner()) = Some(manager);
            }
            shared.replacing.store(false, Ordering::Release);
        });
    }
}

impl Redis {
    /// Parses the URL now and connects in the background, retrying until `shutdown`.
    pub fn connect_in_background(
        service: &'static str,
        config: &RedisConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self, RedisError> {
        let client = client_for(config)?;
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let shared = Arc::new(Shared {
            manager: RwLock::new(None),
            replacing: AtomicBool::new(false),
            client,
            config: ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            service,
            shutdown: shutdown.clone(),
        });
        shared.connect_in_background();
        Ok(Self {
            shared,
            key_prefix: config.redis_key_prefix.as_str().into(),
            timeout,
        })
    }

    /// A connection (clones share one multiplexed socket), or `NotConnected` before the first
    /// connection succeeded.
    pub fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let manager = self
            .shared
            .manager
            .read()
            .unwrap_or_else(|e| e.into_inner());
        manager.clone().ok_or(RedisError::NotConnected)
    }

    /// Looks at an error a command on [`Self::connection`] returned: when it says the
    /// manager's connection was refused for good (its reconnect failed authentication), a new
    /// manager is connected in the background. The readiness check passes its errors here,
    /// so a service heals within one probe period without a restart.
    pub fn observe(&self, error: &redis::RedisError) {
        if error.kind() == redis::ErrorKind::AuthenticationFailed {
            tracing::warn!(service = self.shared.service, %error, "Redis refused the connection; connecting anew.");
            self.shared.connect_in_background();
        }
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
                .inspect_err(|e| self.observe(e))
                .map_err(|e| e.to_string())?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(format!("unexpected PING reply {pong:?}"))
            }
        })
    }
}
