//! The `MiddlewareStack` custom resource (`meridian.dev/v1beta1`): its spec, its status and the
//! admission rules the API server enforces (OpenAPI constraints and CEL
//! `x-kubernetes-validations`).
//!
//! Types only: no client code lives here. Every field's doc comment is the text
//! `kubectl explain middlewarestack.spec.<field>` shows, so it is written for users.
//! `crds/middlewarestack.yaml` is generated from these types (`just crds`) and checked for drift.
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

mod auth;
mod deletion_policy;
mod image;
mod kafka;
mod monitoring;
mod network;
mod postgres;
mod rate_limits;
mod redis;
mod services;
mod status;
mod telemetry;

pub use auth::{AuthSpec, SecretKeyRef, SecretRef};
pub use deletion_policy::{DeletionPolicy, Retention};
pub use image::{ImageOverride, ImageSpec, PullPolicy, RELEASE_REGISTRY, RELEASE_TAG, Release};
pub use kafka::{KafkaSpec, KafkaTls, SaslMechanism, ServicePrincipal, TopicSpec, TopicsSpec};
pub use monitoring::MonitoringSpec;
pub use network::NetworkPolicySpec;
pub use postgres::{PostgresSpec, SslMode};
pub use rate_limits::{RateLimitKey, RateLimitPolicy, RateLimitsSpec, RatePeriod};
pub use redis::RedisSpec;
pub use services::{AutoscalingSpec, ServiceSpec, ServicesSpec};
pub use status::{MiddlewareStackStatus, Phase, ServiceStatus};
pub use telemetry::TelemetrySpec;

/// The API group of every Meridian resource.
pub const GROUP: &str = "meridian.dev";
/// The version of the `MiddlewareStack` API: the storage version, the one the operator reads.
pub const VERSION: &str = "v1beta1";

/// The `v1alpha1` version of the CRD, frozen as released (served next to [`VERSION`]).
pub const V1ALPHA1: &str = include_str!("crd/v1alpha1.yaml");

/// One Meridian platform: the five services, wired to Kafka, Redis and PostgreSQL.
// Two printer columns both say `type_ = "string"`, which clippy mistakes for a repeated attribute.
#[allow(
    clippy::duplicated_attributes,
    reason = "distinct printcolumn(...) entries"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "meridian.dev",
    version = "v1beta1",
    kind = "MiddlewareStack",
    namespaced,
    shortname = "mws",
    category = "meridian",
    status = "MiddlewareStackStatus",
    derive = "PartialEq",
    validation = Rule::new("size(self.metadata.name) <= 47").message(
        "metadata.name must be at most 47 characters: the stack's object names \
         (<name>-command-service) must fit in 63"
    ),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting \
         with a letter): the stack's Services are named after it, and its Kafka topics, groups \
         and ACLs use it as a prefix that must not cover another stack's"
    ),
    doc = "A MiddlewareStack is one Meridian platform: the API gateway, command service, \
           processor, cache updater and WebSocket hub, with the Kafka topics, Redis ACL user \
           and PostgreSQL role they use.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether every stage of the stack is ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Services",
        type_ = "string",
        description = "Services with all their replicas ready, of those enabled",
        json_path = ".status.servicesReady"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "The stage the stack is in",
        json_path = ".status.phase"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "Why the stack is or is not Ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MiddlewareStackSpec {
    /// Where the services' container images come from; by default the images of the
    /// operator's release (`ghcr.io/meridian-dev/meridian/<service>:<operator version>`). Each
    /// service may override it.
    #[serde(default)]
    pub image: ImageSpec,
    /// The five services: replicas, resources, extra environment, annotations, and whether
    /// each runs at all.
    #[serde(default)]
    pub services: ServicesSpec,
    /// The Kafka cluster the stack's topics live on.
    pub kafka: KafkaSpec,
    /// The Redis server that holds the read model, rate-limit state and WebSocket fan-out.
    pub redis: RedisSpec,
    /// The PostgreSQL server that holds the write model and the outbox.
    pub postgres: PostgresSpec,
    /// How the API gateway authenticates clients (JWT). Without it the gateway accepts no
    /// authenticated requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// The API gateway's rate-limit policies.
    #[serde(default)]
    pub rate_limits: RateLimitsSpec,
    /// Where traces are exported, and how many are sampled.
    #[serde(default)]
    pub telemetry: TelemetrySpec,
    /// How Prometheus finds the services' metrics: a PodMonitor when the cluster has the
    /// prometheus-operator CRDs, scrape annotations on the pods otherwise.
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    /// Which traffic reaches the internal services (a NetworkPolicy the operator owns).
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// What happens to topics and credentials when the stack is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// While true the operator makes no changes to the stack's objects, topics or
    /// credentials; it still reports status.
    #[serde(default)]
    pub paused: bool,
}

#[cfg(test)]
pub(crate) mod tests;
