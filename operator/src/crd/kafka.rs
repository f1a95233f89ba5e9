//! The Kafka cluster and the stack's topics on it.
use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, SecretRef};

/// The Kafka cluster and the stack's topics on it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.servicePrincipal) || self.servicePrincipal != 'Stack' || has(self.adminSecretRef)").message(
    "kafka.servicePrincipal: Stack needs kafka.adminSecretRef: the operator creates the stack's user and ACLs with it"
))]
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
    /// The SASL mechanism of the operator's login with `adminSecretRef`: `PLAIN` (the
    /// default), `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_mechanism: Option<SaslMechanism>,
    /// TLS to the brokers (the operator and every service). Unset: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
    /// Who the services are to Kafka. `Stack`: a SCRAM-SHA-512 user of the stack's own
    /// (`<namespace>.<stack>`), allowed only the stack's topics and consumer groups (prefixed
    /// ACLs), its credentials in the Secret `<stack>-kafka`; the brokers need SCRAM-SHA-512 and
    /// an authorizer. `None`: the services connect without credentials. Default: `Stack` when
    /// `adminSecretRef` is set, `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_principal: Option<ServicePrincipal>,
}

/// A SASL mechanism Kafka offers.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum SaslMechanism {
    /// The password in the clear (use it over TLS).
    #[default]
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The mechanism's name in SASL and librdkafka.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// TLS to the brokers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTls {
    /// A key of a Secret in the stack's namespace holding the PEM certificates of the CA that
    /// signed the brokers' certificates. Unset: the system's trusted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Who the stack's services are to Kafka.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServicePrincipal {
    /// A SCRAM-SHA-512 user of the stack's own, confined to its topics and groups by ACLs.
    Stack,
    /// No credentials: the brokers must accept anonymous clients.
    None,
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
