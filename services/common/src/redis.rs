//! Redis: a [`ConnectionManager`] (multiplexed, reconnecting) established in the background
//! with the shared backoff, so the service starts and reports not-ready while Redis is down.
//!
//! A `ConnectionManager` whose reconnect was refused (`AuthenticationFailed`: Redis restarted
//! without the stack's ACL user, which the operator re-creates moments later) never tries
//! again: redis-rs reconnects only after I/O errors. [`Redis`] replaces such a manager with a
//! new one, connected in the background with the same backoff, so the service heals by itself.
//!
//! With `REDIS_CLUSTER`, the handle holds a cluster connection instead (it follows the slot
//! map, `MOVED`/`ASK` and failovers by itself); [`RedisConnection`] is either, so callers
//! write their commands once. What differs on a cluster is the key layout of keys used
//! together ([`Redis::tagged`]), pipelines ([`run_scripts`] splits them by slot) and pub/sub
//! (sharded channels: see `common::rooms`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, RedisFuture, ScriptInvocation, Value};
use secrecy::ExposeSecret;
use tokio::sync::mpsc::UnboundedReceiver;

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
    client_trusting(config.redis_url.expose_secret(), ca_of(config)?).map_err(RedisError::Url)
}

fn ca_of(config: &RedisConfig) -> Result<Option<Vec<u8>>, RedisError> {
    match &config.redis_ca_file {
        Some(path) if !path.is_empty() => Ok(Some(std::fs::read(path).map_err(|source| {
            RedisError::CaFile {
                path: path.clone(),
                source,
            }
        })?)),
        _ => Ok(None),
    }
}

/// A Redis Cluster client for `urls` (one or more seed nodes, comma-separated, sharing one
/// login), with `TCP_NODELAY` like [`client`], trusting `ca` for `rediss://` when given,
/// and `timeout` per connection attempt and per request.
pub fn cluster_client_builder(
    urls: &str,
    ca: Option<Vec<u8>>,
    timeout: Duration,
) -> redis::RedisResult<ClusterClientBuilder> {
    use redis::IntoConnectionInfo as _;
    let mut nodes = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let info = url.into_connection_info()?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        nodes.push(info.set_tcp_settings(tcp));
    }
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let mut builder = ClusterClientBuilder::new(nodes)
        .tcp_settings(tcp)
        .connection_timeout(timeout)
        .response_timeout(timeout);
    if let Some(root_cert) = ca {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        });
    }
    Ok(builder)
}

/// The cluster client `config` describes (`REDIS_CLUSTER`): see [`cluster_client_builder`].
///
/// # Errors
/// As [`client_for`].
pub fn cluster_client_for(config: &RedisConfig) -> Result<ClusterClient, RedisError> {
    cluster_builder_for(config)?
        .build()
        .map_err(RedisError::Url)
}

/// [`cluster_client_for`]'s builder, for callers that add to it (the hub's RESP3 pub/sub).
///
/// # Errors
/// As [`client_for`].
pub fn cluster_builder_for(config: &RedisConfig) -> Result<ClusterClientBuilder, RedisError> {
    cluster_client_builder(
        config.redis_url.expose_secret(),
        ca_of(config)?,
        Duration::from_millis(config.redis_timeout_ms),
    )
    .map_err(RedisError::Url)
}

/// One connection to what `config` describes (a cluster with `REDIS_CLUSTER`), for tools that
/// run once (`cache-updater rebuild`).
///
/// # Errors
/// When the configuration is invalid or the connection fails.
pub async fn connect_once(config: &RedisConfig) -> Result<RedisConnection, RedisError> {
    Ok(Connector::for_config(config)?.connect().await?)
}

/// A Redis Cluster client for `config` whose connections speak RESP3 and hand every push
/// (sharded publications, subscription confirmations, disconnections) to the receiver: how
/// the hub, and the suites acting like it, subscribe to sharded room channels.
///
/// # Errors
/// As [`client_for`].
pub fn cluster_pubsub_for(
    config: &RedisConfig,
) -> Result<(ClusterClient, UnboundedReceiver<PushInfo>), RedisError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = cluster_builder_for(config)?
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()
        .map_err(RedisError::Url)?;
    Ok((client, rx))
}

/// A connection to one Redis or to a cluster; clones share the underlying sockets.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server (multiplexed, reconnecting).
    Single(ConnectionManager),
    /// A Redis Cluster (a connection per node, following the slot map).
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How [`Shared`] makes a connection.
enum Connector {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
}

impl Connector {
    /// What `config` describes: a cluster client with `REDIS_CLUSTER`, else one server's
    /// client and a manager with `REDIS_TIMEOUT_MS` for connecting and each response.
    fn for_config(config: &RedisConfig) -> Result<Self, RedisError> {
        if config.redis_cluster {
            return Ok(Self::Cluster(cluster_client_for(config)?));
        }
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        Ok(Self::Single(
            client_for(config)?,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
        ))
    }

    async fn connect(&self) -> redis::RedisResult<RedisConnection> {
        match self {
            Self::Single(client, config) => {
                ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(RedisConnection::Single)
            }
            Self::Cluster(client) => client
                .get_async_connection()
                .await
                .map(RedisConnection::Cluster),
        }
    }
}

/// A handle to Redis that fills in once the first connection succeeds. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    shared: Arc<Shared>,
    key_prefix: Arc<str>,
    timeout: Duration,
    cluster: bool,
}

/// What every clone of a [`Redis`] shares: the current manager and how to make a new one.
struct Shared {
    manager: RwLock<Option<RedisConnection>>,
    /// A replacement manager is being connected.
    replacing: AtomicBool,
    connector: Connector,
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
                    shared.connector.connect()
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
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let connector = Connector::for_config(config)?;
        let shared = Arc::new(Shared {
            manager: RwLock::new(None),
            replacing: AtomicBool::new(false),
            connector,
            service,
            shutdown: shutdown.clone(),
        });
        shared.connect_in_background();
        Ok(Self {
            shared,
            key_prefix: config.redis_key_prefix.as_str().into(),
            timeout,
            cluster: config.redis_cluster,
        })
    }

    /// A connection (clones share one multiplexed socket per server), or `NotConnected` before
    /// the first connection succeeded.
    pub fn connection(&self) -> Result<RedisConnection, RedisError> {
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

    /// `prefix` + `kind` + `name`, with `name` as the key's hash tag on a cluster
    /// (`<prefix><kind>{<name>}`), so every key made from the same `name` lives in one slot
    /// and one script may use them all; on one Redis, `<prefix><kind><name>` as it always was.
    pub fn tagged(&self, kind: &str, name: &str) -> String {
        tagged(&self.key_prefix, kind, name, self.cluster)
    }

    /// Whether this is a Redis Cluster (`REDIS_CLUSTER`).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The configured response timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// See [`Redis::tagged`].
pub fn tagged(prefix: &str, kind: &str, name: &str, cluster: bool) -> String {
    if cluster {
        format!("{prefix}{kind}{{{name}}}")
    } else {
        format!("{prefix}{kind}{name}")
    }
}

/// The cluster slot of `key` (its hash tag's, when it has one).
pub fn slot_of(key: &str) -> redis::cluster_routing::Slot {
    redis::cluster_routing::Slot::for_key(key)
}

/// A script call and the key that places it: on a cluster, the slot of `key` (every key of
/// the call must share it).
pub struct ScriptCall<'a> {
    /// The call.
    pub invocation: ScriptInvocation<'a>,
    /// One of its keys.
    pub key: String,
}

/// Runs `calls` as transactions (MULTI/EXEC: in order, in one round trip, with no other
/// client's command in between) and returns each one's reply; an `Err` is a round trip's own
/// failure. On one Redis that is one transaction; on a cluster one per slot, sent
/// concurrently (calls on the same slot, e.g. one document's events, keep their order).
///
/// Scripts run by EVALSHA: when Redis does not have one (after a restart or `SCRIPT FLUSH`),
/// it is loaded and the calls that got `NOSCRIPT` run once more, in order, in a second
/// transaction. Without the transaction another client could load the script in the middle
/// of the pipeline: the calls after that point would succeed, the earlier ones be retried after
/// them, and a document's older versions be applied after a newer one.
pub async fn run_scripts<T: redis::FromRedisValue>(
    redis: &Redis,
    calls: &[&ScriptCall<'_>],
) -> Result<Vec<redis::RedisResult<T>>, RedisError> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let conn = redis.connection()?;
    if !redis.is_cluster() {
        return run_in_one_transaction(conn, calls).await;
    }
    let mut by_slot: std::collections::HashMap<_, Vec<usize>> = Default::default();
    for (i, call) in calls.iter().enumerate() {
        by_slot.entry(slot_of(&call.key)).or_default().push(i);
    }
    let groups = by_slot.into_values().map(|indices| {
        let conn = conn.clone();
        async move {
            let group: Vec<&ScriptCall<'_>> = indices.iter().map(|&i| calls[i]).collect();
            run_in_one_transaction::<T>(conn, &group)
                .await
                .map(|replies| (indices, replies))
        }
    });
    let mut replies: Vec<Option<redis::RedisResult<T>>> = calls.iter().map(|_| None).collect();
    for group in futures::future::join_all(groups).await {
        let (indices, group_replies) = group?;
        for (i, reply) in indices.into_iter().zip(group_replies) {
            replies[i] = Some(reply);
        }
    }
    Ok(replies
        .into_iter()
        .map(|reply| {
            reply.unwrap_or_else(|| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "no reply to a script call",
                )))
            })
        })
        .collect())
}

async fn run_in_one_transaction<T: redis::FromRedisValue>(
    mut conn: RedisConnection,
    calls: &[&ScriptCall<'_>],
) -> Result<Vec<redis::RedisResult<T>>, RedisError> {
    fn pipeline<'a>(calls: impl Iterator<Item = &'a ScriptCall<'a>>) -> Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        for call in calls {
            pipe.invoke_script(&call.invocation);
        }
        pipe
    }
    let mut replies: Vec<redis::RedisResult<T>> = pipeline(calls.iter().copied())
        .query_async(&mut conn)
        .await?;
    let missing: Vec<usize> = replies
        .iter()
        .enumerate()
        .filter(|(_, reply)| {
            matches!(reply, Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        })
        .map(|(i, _)| i)
        .collect();
    if let Some(&first) = missing.first() {
        // On a cluster, `SCRIPT LOAD` goes to every primary.
        calls[first].invocation.load_async(&mut conn).await?;
        let retried: Vec<redis::RedisResult<T>> = pipeline(missing.iter().map(|&i| calls[i]))
            .query_async(&mut conn)
            .await?;
        for (i, reply) in missing.into_iter().zip(retried) {
            replies[i] = reply;
        }
    }
    Ok(replies)
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
