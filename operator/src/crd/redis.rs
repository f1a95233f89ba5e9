//! The Redis server.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, SecretRef};

/// The Redis server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.url.startsWith('redis://') || self.url.startsWith('rediss://')"
).message("redis.url must start with redis:// or rediss://"))]
#[x_kube(validation = Rule::new("!self.url.contains('@')").message(
    "redis.url must not contain credentials: put them in the Secret of adminSecretRef"
))]
#[x_kube(validation = Rule::new("!has(self.caSecretRef) || self.url.startsWith('rediss://')").message(
    "redis.caSecretRef needs a rediss:// url: the CA verifies the server's TLS certificate"
))]
pub struct RedisSpec {
    /// The server's URL without credentials, `redis://host:port` or `rediss://host:port` (TLS).
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// A Secret in the stack's namespace with `username` and `password` of a Redis user
    /// allowed to manage ACL users. The stack's services get their own user.
    pub admin_secret_ref: SecretRef,
    /// A key of a Secret in the stack's namespace holding the PEM certificates of the CA a
    /// `rediss://` server's certificate chains to, trusted by the operator and the services
    /// (mounted into their pods). Only with a `rediss://` url. Unset: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// `url` names a node of a Redis Cluster (the others are discovered); the stack's ACL user
    /// is created on every node and the services connect in cluster mode (hash-tagged keys,
    /// sharded pub/sub). Redis 7.0 or later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
}
