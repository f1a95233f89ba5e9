//! Redis: `PING` with the admin credentials, and the stack's ACL user, confined to the stack's
//! key prefix (`~<prefix>*`) and channel prefix (`&<prefix>*`), allowed only the commands the
//! services send (`common::redis_acl`: no `SCAN`, `KEYS`, `FLUSHALL`, `CONFIG`, ...).
//!
//! When the server keeps its users in an ACL file (`aclfile`), every change the operator
//! makes is written there with `ACL SAVE`, so a restarted Redis loads the stack users itself
//! instead of refusing the services until the operator's next health check re-creates them.
//! Without an ACL file the users live in memory only, and that re-creation is what restores
//! them.
//!
//! On a Redis Cluster (`redis.cluster`) every node keeps its own users (and its own ACL file):
//! each call asks the node the stack names for the cluster's members (`CLUSTER NODES`, every
//! time, since nodes come and go) and makes the change on every one of them, primaries and
//! replicas, so the services find their user wherever the slot map sends them and after a
//! failover. The admin user then also needs `CLUSTER NODES` and `CLUSTER INFO`.
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use super::{AdminCredentials, ProvisionError, bounded};

/// Whether an ACL change reached the server's ACL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing changed, so there was nothing to save.
    Unchanged,
    /// `ACL SAVE` wrote the change to the ACL file.
    Saved,
    /// The server has no ACL file: the change lives in memory until Redis restarts.
    InMemory,
}

/// The error Redis answers `ACL SAVE` with when it runs without an `aclfile`.
const NO_ACL_FILE: &str = "not configured to use an ACL file";

/// The admin connection of one Redis server, or of every node of a Redis Cluster.
pub struct RedisAdmin {
    /// The server, or the cluster node the stack names (the seed).
    client: redis::Client,
    /// On a cluster: how to reach the other nodes.
    cluster: Option<ClusterAccess>,
    timeout: Duration,
}

/// The login and trust the seed node is reached with, for the other nodes of its cluster.
struct ClusterAccess {
    /// The seed's URL with the admin credentials; a node's differs in host and port only.
    url: SecretString,
    ca_pem: Option<Vec<u8>>,
}

/// A server an ACL change must reach.
struct Node {
    /// `host:port` of a cluster node, for errors; `None` for the only server.
    address: Option<String>,
    client: redis::Client,
}

impl Node {
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, ProvisionError> {
        self.client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| self.error(&e))
    }

    /// A Redis error, naming the node on a cluster.
    fn error(&self, error: &redis::RedisError) -> ProvisionError {
        self.named(redis_error(error))
    }

    /// `error`, naming the node on a cluster.
    fn named(&self, error: ProvisionError) -> ProvisionError {
        match (&self.address, error) {
            (Some(address), ProvisionError::Redis(message)) => {
                ProvisionError::Redis(format!("cluster node {address}: {message}"))
            }
            (_, error) => error,
        }
    }
}

/// A member of a Redis Cluster, as `CLUSTER NODES` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its announced hostname where it has one (what a TLS certificate names), else its IP.
    pub host: String,
    /// Its client port (the TLS port when asked over TLS).
    pub port: u16,
}

impl std::fmt::Display for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The members of a `CLUSTER NODES` reply an ACL change must reach: every primary and replica
/// with an address, except those the cluster has given up on (`fail`), that have no address
/// (`noaddr`) or that are still joining (`handshake`). A node only suspected of failing
/// (`fail?`) stays: it may well answer, and if not the change fails and is retried.
///
/// A line is `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping-sent> <pong-recv>
/// <config-epoch> <link-state> <slot> ...`.
pub fn cluster_nodes(reply: &str) -> Vec<ClusterNode> {
    reply
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_id, address, flags) = (fields.next()?, fields.next()?, fields.next()?);
            if flags
                .split(',')
                .any(|flag| matches!(flag, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            let (ip_port, bus) = address.split_once('@').unwrap_or((address, ""));
            // After the bus port: the announced hostname (empty when none), then (in some
            // versions) `key=value` auxiliary fields.
            let hostname = bus
                .split(',')
                .nth(1)
                .filter(|h| !h.is_empty() && !h.contains('='));
            let (ip, port) = ip_port.rsplit_once(':')?;
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            let host = hostname.unwrap_or(ip);
            (!host.is_empty()).then(|| ClusterNode {
                host: host.to_owned(),
                port,
            })
        })
        .collect()
}

/// What ACL changes on several nodes amount to: `Unchanged` only if no node changed, and
/// `InMemory` if any node that changed keeps it in memory only.
pub fn combined(persistence: impl IntoIterator<Item = Persistence>) -> Persistence {
    persistence
        .into_iter()
        .fold(Persistence::Unchanged, |all, node| match (all, node) {
            (Persistence::InMemory, _) | (_, Persistence::InMemory) => Persistence::InMemory,
            (Persistence::Saved, _) | (_, Persistence::Saved) => Persistence::Saved,
            (Persistence::Unchanged, Persistence::Unchanged) => Persistence::Unchanged,
        })
}

/// The `cluster_state` line of a `CLUSTER INFO` reply.
fn cluster_state(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("cluster_state:"))
}

fn redis_error(error: &redis::RedisError) -> ProvisionError {
    ProvisionError::Redis(error.to_string())
}

/// `url` with `username`/`password` inserted (an empty password inserts nothing: the
/// server's `default` user without a password).
pub fn url_with_credentials(
    url: &str,
    username: &str,
    password: &str,
) -> Result<SecretString, ProvisionError> {
    let mut url =
        Url::parse(url).map_err(|e| ProvisionError::Redis(format!("invalid redis.url: {e}")))?;
    if !password.is_empty() {
        url.set_username(username)
            .and_then(|()| url.set_password(Some(password)))
            .map_err(|()| ProvisionError::Redis("redis.url cannot carry credentials".to_owned()))?;
    }
    Ok(SecretString::from(url.to_string()))
}

impl RedisAdmin {
    /// An admin connection to `url` as `credentials` (connects lazily, per call); a
    /// `rediss://` server's certificate must chain to `ca_pem` (PEM certificates) where given,
    /// else to the system's roots. With `cluster`, `url` is a node of a Redis Cluster and
    /// every call reaches every node of it, with the same credentials and trust.
    pub fn new(
        url: &str,
        credentials: &AdminCredentials,
        ca_pem: Option<&str>,
        cluster: bool,
        timeout: Duration,
    ) -> Result<Self, ProvisionError> {
        let url = url_with_credentials(
            url,
            &credentials.username,
            credentials.password.expose_secret(),
        )?;
        let ca_pem = ca_pem.map(|pem| pem.as_bytes().to_vec());
        let client = common::redis::client_trusting(url.expose_secret(), ca_pem.clone())
            .map_err(|e| redis_error(&e))?;
        Ok(Self {
            client,
            cluster: cluster.then_some(ClusterAccess { url, ca_pem }),
            timeout,
        })
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, ProvisionError> {
        self.client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| redis_error(&e))
    }

    /// The servers to reach: the server, or every node of the cluster now (`CLUSTER NODES`
    /// on the seed).
    async fn nodes(&self) -> Result<Vec<Node>, ProvisionError> {
        let Some(cluster) = &self.cluster else {
            return Ok(vec![Node {
                address: None,
                client: self.client.clone(),
            }]);
        };
        let mut conn = self.connection().await?;
        let reply: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(|e| cluster_error("CLUSTER NODES", &e))?;
        let members = cluster_nodes(&reply);
        if members.is_empty() {
            return Err(ProvisionError::Redis(
                "CLUSTER NODES lists no node with an address that has not failed".to_owned(),
            ));
        }
        members
            .into_iter()
            .map(|member| {
                let url = cluster.node_url(&member)?;
                let client =
                    common::redis::client_trusting(url.expose_secret(), cluster.ca_pem.clone())
                        .map_err(|e| {
                            ProvisionError::Redis(format!("cluster node {member}: {e}"))
                        })?;
                Ok(Node {
                    address: Some(member.to_string()),
                    client,
                })
            })
            .collect()
    }

    /// Runs `f` on every node (one: the server) at once; the nodes' results, or the errors
    /// of those that failed.
    async fn on_every_node<T, F, Fut>(&self, f: F) -> Result<Vec<T>, ProvisionError>
    where
        F: Fn(Node) -> Fut,
        Fut: Future<Output = Result<T, ProvisionError>>,
    {
        let nodes = self.nodes().await?;
        let results = futures::future::join_all(nodes.into_iter().map(f)).await;
        let mut done = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        for result in results {
            match result {
                Ok(value) => done.push(value),
                Err(error) => failed.push(error),
            }
        }
        match failed.len() {
            0 => Ok(done),
            1 => Err(failed.remove(0)),
            _ => Err(ProvisionError::Redis(
                failed
                    .iter()
                    .map(|e| match e {
                        ProvisionError::Redis(message) => message.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    }

    /// `PING`; on a cluster, `CLUSTER INFO` must also say `cluster_state:ok`, and every node
    /// must answer.
    pub async fn ping(&self) -> Result<(), ProvisionError> {
        bounded("Redis", self.timeout, async {
            if self.cluster.is_some() {
                let mut conn = self.connection().await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| cluster_error("CLUSTER INFO", &e))?;
                match cluster_state(&info) {
                    Some("ok") => {}
                    state => {
                        return Err(ProvisionError::Redis(format!(
                            "the Redis Cluster is not serving every slot: CLUSTER INFO says \
                             cluster_state:{}",
                            state.unwrap_or("(missing)")
                        )));
                    }
                }
            }
            self.on_every_node(|node| async move {
                let mut conn = node.connection().await?;
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| node.error(&e))?;
                Ok(())
            })
            .await?;
            Ok(())
        })
        .await
    }

    /// Creates or updates the ACL user `user`: enabled, with `passwords` (all accepted; on
    /// rotation the previous one stays valid until the pods have rolled), keys and channels
    /// under `prefix`. With `reset_passwords`, every other password is removed first. When
    /// this changed the user (compared with `ACL GETUSER` in the same round trip), the ACL
    /// file is saved if the server has one. On a cluster, on every node (each saving its own
    /// file): `Unchanged` only if no node changed.
    pub async fn ensure_user(
        &self,
        user: &str,
        prefix: &str,
        passwords: &[&SecretString],
        reset_passwords: bool,
    ) -> Result<Persistence, ProvisionError> {
        bounded("Redis", self.timeout, async {
            let mut set = redis::cmd("ACL");
            set.arg("SETUSER").arg(user).arg("on");
            if reset_passwords {
                set.arg("resetpass");
            }
            for password in passwords {
                set.arg(format!(">{}", password.expose_secret()));
            }
            set.arg(common::redis_acl::rules(prefix));
            let mut get = redis::cmd("ACL");
            get.arg("GETUSER").arg(user);
            let mut pipe = redis::pipe();
            pipe.add_command(get.clone())
                .add_command(set)
                .add_command(get);
            let pipe = &pipe;
            let nodes = self
                .on_every_node(|node| async move {
                    let mut conn = node.connection().await?;
                    let (before, (), after): (redis::Value, (), redis::Value) = pipe
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| node.error(&e))?;
                    if before == after {
                        return Ok(Persistence::Unchanged);
                    }
                    save(&mut conn).await.map_err(|e| node.named(e))
                })
                .await?;
            Ok(combined(nodes))
        })
        .await
    }

    /// Deletes the ACL user (and so disconnects its clients), saving the ACL file if the
    /// server has one; a missing user is fine. On a cluster, on every node.
    pub async fn delete_user(&self, user: &str) -> Result<Persistence, ProvisionError> {
        bounded("Redis", self.timeout, async {
            let nodes = self
                .on_every_node(|node| async move {
                    let mut conn = node.connection().await?;
                    let deleted: i64 = redis::cmd("ACL")
                        .arg("DELUSER")
                        .arg(user)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| node.error(&e))?;
                    if deleted == 0 {
                        return Ok(Persistence::Unchanged);
                    }
                    save(&mut conn).await.map_err(|e| node.named(e))
                })
                .await?;
            Ok(combined(nodes))
        })
        .await
    }
}

impl ClusterAccess {
    /// The URL of `node`: the seed's, at the node's host and port.
    fn node_url(&self, node: &ClusterNode) -> Result<SecretString, ProvisionError> {
        let invalid = || ProvisionError::Redis(format!("cluster node {node}: not a valid address"));
        let mut url = Url::parse(self.url.expose_secret()).map_err(|_| invalid())?;
        let host = if node.host.contains(':') {
            format!("[{}]", node.host)
        } else {
            node.host.clone()
        };
        url.set_host(Some(&host)).map_err(|_| invalid())?;
        url.set_port(Some(node.port)).map_err(|()| invalid())?;
        Ok(SecretString::from(url.to_string()))
    }
}

/// A cluster command's error, saying when the server is not a cluster node at all.
fn cluster_error(command: &str, error: &redis::RedisError) -> ProvisionError {
    let text = error.to_string();
    if text.contains("cluster support disabled") {
        ProvisionError::Redis(format!(
            "redis.cluster is true but the server is not a Redis Cluster node ({command}: {text})"
        ))
    } else {
        ProvisionError::Redis(format!("{command}: {text}"))
    }
}

/// `ACL SAVE`, where the server has an ACL file to save to.
async fn save(conn: &mut redis::aio::MultiplexedConnection) -> Result<Persistence, ProvisionError> {
    match redis::cmd("ACL").arg("SAVE").query_async::<()>(conn).await {
        Ok(()) => Ok(Persistence::Saved),
        Err(error) if error.to_string().contains(NO_ACL_FILE) => Ok(Persistence::InMemory),
        Err(error) => Err(ProvisionError::Redis(format!(
            "the ACL change was made but ACL SAVE failed: {error}"
        ))),
    }
}
