//! The `MiddlewareStack` custom resource (`meridian.dev/v1alpha1`): its spec, its status and the
//! admission rules the API server enforces (OpenAPI constraints and CEL
//! `x-kubernetes-validations`).
//!
//! Types only: no client code lives here. Every field's doc comment is the text
//! `kubectl explain middlewarestack.spec.<field>` shows, so it is written for users.
//! `crds/middlewarestack.yaml` is generated from these types (`just crds`) and checked for drift.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The API group of every Meridian resource.
pub const GROUP: &str = "meridian.dev";
/// The version of the `MiddlewareStack` API.
pub const VERSION: &str = "v1alpha1";

/// One Meridian platform: the five services, wired to Kafka, Redis and PostgreSQL.
// Two printer columns both say `type_ = "string"`, which clippy mistakes for a repeated attribute.
#[allow(
    clippy::duplicated_attributes,
    reason = "distinct printcolumn(...) entries"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "meridian.dev",
    version = "v1alpha1",
    kind = "MiddlewareStack",
    namespaced,
    shortname = "mws",
    status = "MiddlewareStackStatus",
    derive = "PartialEq",
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
        name = "Phase",
        type_ = "string",
        description = "The stage the stack is in",
        json_path = ".status.phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MiddlewareStackSpec {
    /// Where the services' container images come from. Each service may override it.
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
    /// What happens to topics and credentials when the stack is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// While true the operator makes no changes to the stack's objects, topics or
    /// credentials; it still reports status.
    #[serde(default)]
    pub paused: bool,
}

/// Where container images come from: `<registry>/<service>:<tag>`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// The registry and path prefix of the images, for example `ghcr.io/example/meridian`.
    /// The service name is appended (`<registry>/api-gateway`).
    #[schemars(length(min = 1, max = 253))]
    pub registry: String,
    /// The image tag every service uses, for example `0.1.0`.
    #[schemars(length(min = 1, max = 128))]
    pub tag: String,
    /// When the kubelet pulls the images.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

/// A service's deviation from the stack-wide image settings; unset fields inherit them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageOverride {
    /// The registry of this service's image, instead of `spec.image.registry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub registry: Option<String>,
    /// The tag of this service's image, instead of `spec.image.tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub tag: Option<String>,
    /// The pull policy of this service's image, instead of `spec.image.pullPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// When the kubelet pulls an image (the container's `imagePullPolicy`).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull only when the image is not on the node.
    #[default]
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

/// The five services of a stack.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServicesSpec {
    /// The API gateway (port 8080): authentication, rate limits, reads from Redis, commands
    /// forwarded to the command service. Starts only after the core services are Available.
    #[serde(default)]
    pub gateway: ServiceSpec,
    /// The command service (port 8082): accepts commands with idempotency keys and relays
    /// them to Kafka through the outbox.
    #[serde(default)]
    pub command_service: ServiceSpec,
    /// The processor (port 8083): applies commands to the write model and emits events.
    #[serde(default)]
    pub processor: ServiceSpec,
    /// The cache updater (port 8084): projects events into Redis and notifies rooms.
    #[serde(default)]
    pub cache_updater: ServiceSpec,
    /// The WebSocket hub (port 8085): pushes changes to connected clients.
    #[serde(default)]
    pub ws_hub: ServiceSpec,
}

/// How one service runs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Whether the service runs at all. A disabled service has no Deployment.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The number of pods. At least 0; a PodDisruptionBudget is created when it is above 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// CPU and memory requests and limits of the service's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables, added after (and so overriding) the ones the operator
    /// sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Annotations added to the service's pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// This service's image, where it differs from `spec.image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageOverride>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            replicas: default_replicas(),
            resources: None,
            env: Vec::new(),
            annotations: BTreeMap::new(),
            image: None,
        }
    }
}

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
    /// The name of a Secret in the stack's namespace with `username` and `password` (SASL)
    /// the operator uses to manage topics. Unset: the brokers need no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub admin_credentials_secret: Option<String>,
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

/// The Redis server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.url.startsWith('redis://') || self.url.startsWith('rediss://')"
).message("redis.url must start with redis:// or rediss://"))]
#[x_kube(validation = Rule::new("!self.url.contains('@')").message(
    "redis.url must not contain credentials: put them in adminCredentialsSecret"
))]
pub struct RedisSpec {
    /// The server's URL without credentials, `redis://host:port` or `rediss://host:port` (TLS).
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// The name of a Secret in the stack's namespace with `username` and `password` of a
    /// Redis user allowed to manage ACL users. The stack's services get their own user.
    #[schemars(length(min = 1, max = 253))]
    pub admin_credentials_secret: String,
}

/// The PostgreSQL server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// The server's host name or IP address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// The server's port (1 to 65535).
    #[serde(default = "default_postgres_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The database the operator connects to with the admin credentials (for example
    /// `postgres`). The stack's services get their own database, `mws_<namespace>_<name>`
    /// (with a hash suffix when a name has `-` or `.`), owned by the stack's role, which holds
    /// the write model and the outbox. Immutable: the stack's data is found through this
    /// server.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "postgres.database is immutable: moving a stack to another database would abandon its data"
    ))]
    pub database: String,
    /// How the services use TLS to the server (libpq's `sslmode`).
    #[serde(default)]
    pub ssl_mode: SslMode,
    /// The name of a Secret in the stack's namespace with `username` and `password` of a role
    /// allowed to create roles. The stack's services get their own role.
    #[schemars(length(min = 1, max = 253))]
    pub admin_credentials_secret: String,
}

/// libpq's `sslmode`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS only if the server insists.
    Allow,
    /// TLS if the server supports it.
    #[default]
    Prefer,
    /// TLS, without verifying the certificate.
    Require,
    /// TLS, verifying the certificate's chain.
    VerifyCa,
    /// TLS, verifying the certificate's chain and host name.
    VerifyFull,
}

impl SslMode {
    /// The value libpq and sqlx understand in `?sslmode=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// How the API gateway validates JWTs: an HMAC secret or a JWKS endpoint, exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.jwtSecretRef) && has(self.jwksUrl))").message(
    "auth.jwtSecretRef and auth.jwksUrl are mutually exclusive: set only one"
))]
#[x_kube(validation = Rule::new("has(self.jwtSecretRef) || has(self.jwksUrl)").message(
    "auth needs either jwtSecretRef or jwksUrl"
))]
pub struct AuthSpec {
    /// A key of a Secret in the stack's namespace holding the HMAC secret that signs tokens.
    /// Mutually exclusive with `jwksUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// The HTTPS URL of the issuer's JSON Web Key Set. Mutually exclusive with
    /// `jwtSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub jwks_url: Option<String>,
    /// The `iss` claim every token must carry.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,
    /// The `aud` claim every token must carry.
    #[schemars(length(min = 1, max = 2048))]
    pub audience: String,
}

/// A key of a Secret in the stack's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The gateway's rate limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// The policies, each with a unique name; a request must pass every policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub policies: Vec<RateLimitPolicy>,
}

/// One token-bucket rate limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicy {
    /// The policy's name, unique in the stack (lower-case letters, digits and `-`); it is
    /// part of the Redis key of the limit's state.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// What is limited: each `user` (JWT subject), `client` (client id), `ip` or `route`.
    pub key: RateLimitKey,
    /// How many requests are allowed per `period` (at least 1).
    #[schemars(range(min = 1))]
    pub rate: i32,
    /// The period `rate` counts over.
    #[serde(default)]
    pub period: RatePeriod,
    /// How many requests may arrive at once (the bucket's size, at least 1); the gateway
    /// advertises it as `q` of `RateLimit-Policy`, over the seconds it takes to refill at
    /// `rate`. Unset: equal to `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<i32>,
}

/// What a rate limit counts requests by.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitKey {
    /// The authenticated user (the JWT's `sub`).
    User,
    /// The calling client (the JWT's client id).
    Client,
    /// The client's IP address.
    Ip,
    /// The route template, for all callers together.
    Route,
}

/// The period a rate counts over.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum RatePeriod {
    /// Per second.
    #[default]
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

/// Trace export.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// The OTLP/HTTP collector, for example `http://otel-collector:4318`. Unset: no export
    /// (trace context still propagates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces that is sampled, from 0 to 1.
    #[serde(default = "default_sampling_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: f64,
}

impl Default for TelemetrySpec {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: default_sampling_ratio(),
        }
    }
}

/// What the operator does with external state when the stack is deleted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeletionPolicy {
    /// The stack's Kafka topics (and the data in them). Default `Retain`.
    #[serde(default = "Retention::retain")]
    pub topics: Retention,
    /// The stack's Redis ACL user and PostgreSQL role. Default `Delete`.
    #[serde(default = "Retention::delete")]
    pub credentials: Retention,
}

impl Default for DeletionPolicy {
    fn default() -> Self {
        Self {
            topics: Retention::Retain,
            credentials: Retention::Delete,
        }
    }
}

/// Keep or remove something when the stack is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Retention {
    /// Leave it in place.
    Retain,
    /// Remove it.
    Delete,
}

impl Retention {
    fn retain() -> Self {
        Self::Retain
    }

    fn delete() -> Self {
        Self::Delete
    }
}

/// What the operator last observed of the stack.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MiddlewareStackStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The stage the stack is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Each service's replicas, keyed by service name (`api-gateway`, `command-service`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceStatus>,
    /// One condition per stage (`DependenciesReady`, `TopicsReady`, `CredentialsReady`,
    /// `CoreAvailable`, `EdgeAvailable`) and `Ready`, each with `type`, `status`, `reason`,
    /// `message`, `lastTransitionTime` and `observedGeneration`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// One service's replicas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// The replicas the Deployment asks for.
    pub replicas: i32,
    /// The replicas whose readiness probe passes.
    pub ready_replicas: i32,
}

/// The stage a stack is in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// Nothing has been reconciled yet.
    Pending,
    /// Stages are being brought up.
    Progressing,
    /// Every stage is healthy.
    Ready,
    /// A stage that was healthy no longer is.
    Degraded,
    /// The spec is invalid or asks for a change the operator cannot make.
    Failed,
    /// `spec.paused` is true.
    Paused,
}

fn default_true() -> bool {
    true
}

fn default_replicas() -> i32 {
    1
}

fn default_partitions() -> i32 {
    3
}

fn default_replication_factor() -> i32 {
    1
}

fn default_postgres_port() -> i32 {
    5432
}

fn default_sampling_ratio() -> f64 {
    1.0
}

#[cfg(test)]
mod tests;
