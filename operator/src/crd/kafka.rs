//! The Kafka cluster and the stack's topics on it.
use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::SecretRef;

/// The Kafka cluster and the stack's topics on it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list of brokers, for example `kafka-0.kafka:9092`.
    #[schemars(length(min = 1, max = 2048))]
    pub bootstrap_servers: String,
    /// The stack's topics (each name is prefixed with `<namespace>.<stack>.`).
    #[serde(default)]
    pub topics: TopicsSpec,
    /// A Secret in the stack's namespace with `username` and `password` (SASL) the operator
    /// uses to manage topics. Unset: the brokers need no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_secret_ref: Option<SecretRef>,
}

/// The four topics of a stack.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TopicsSpec {
    /// The `events` topic: what the processor emits, what the cache updater consumes.
    #[serde(default)]
    pub events: TopicSpec,
    /// The `commands` topic: accepted commands, relayed from the command service's outbox.
    #[serde(default)]
    pub commands: TopicSpec,
    /// The `cache` topic: cache invalidations from the cache updater.
    #[serde(default)]
    pub cache: TopicSpec,
    /// The `commands.dlq` topic: commands that failed after every retry.
    #[serde(default)]
    pub dlq: TopicSpec,
}

/// One topic's settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// The number of partitions (at least 1). It may grow but never shrink: Kafka cannot
    /// remove partitions.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message(
        "partitions may not be decreased: Kafka cannot remove partitions from a topic"
    ))]
    pub partitions: i32,
    /// How many brokers hold a copy of each partition (at least 1). Immutable: the operator
    /// does not reassign partitions.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "replicationFactor is immutable: the operator does not reassign partitions"
    ))]
    pub replication_factor: i32,
    /// Topic configuration, for example `retention.ms: "604800000"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl Default for TopicSpec {
    fn default() -> Self {
        Self {
            partitions: default_partitions(),
            replication_factor: default_replication_factor(),
            config: BTreeMap::new(),
        }
    }
}

fn default_partitions() -> i32 {
    3
}

fn default_replication_factor() -> i32 {
    1
}
