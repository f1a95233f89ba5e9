//! The five services of a stack and how each runs.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::ImageOverride;

/// The five services of a stack.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.commandService.enabled || self.commandService.replicas >= 1").message(
    "services.commandService.replicas must be at least 1 while it is enabled: without a replica the \
     command service accepts no command (set spec.paused to stop the operator's changes instead)"
))]
#[x_kube(validation = Rule::new("!self.processor.enabled || self.processor.replicas >= 1").message(
    "services.processor.replicas must be at least 1 while it is enabled: without a replica the \
     processor processes no command (set spec.paused to stop the operator's changes instead)"
))]
#[x_kube(validation = Rule::new("!self.cacheUpdater.enabled || self.cacheUpdater.replicas >= 1").message(
    "services.cacheUpdater.replicas must be at least 1 while it is enabled: without a replica the \
     cache updater projects no event (set spec.paused to stop the operator's changes instead)"
))]
#[x_kube(validation = Rule::new(
    "(!has(self.gateway.autoscaling) || !has(self.gateway.autoscaling.targetLagPerReplica)) && \
     (!has(self.commandService.autoscaling) || !has(self.commandService.autoscaling.targetLagPerReplica)) && \
     (!has(self.hub.autoscaling) || !has(self.hub.autoscaling.targetLagPerReplica))"
).message(
    "autoscaling.targetLagPerReplica applies to the processor and the cache updater, which the \
     operator scales on consumer lag; the gateway, the command service and the hub scale on CPU \
     (targetCPUUtilizationPercentage)"
))]
#[x_kube(validation = Rule::new(
    "(!has(self.gateway.autoscaling) || !has(self.gateway.autoscaling.targetConnectionsPerReplica)) && \
     (!has(self.commandService.autoscaling) || !has(self.commandService.autoscaling.targetConnectionsPerReplica)) && \
     (!has(self.processor.autoscaling) || !has(self.processor.autoscaling.targetConnectionsPerReplica)) && \
     (!has(self.cacheUpdater.autoscaling) || !has(self.cacheUpdater.autoscaling.targetConnectionsPerReplica))"
).message(
    "autoscaling.targetConnectionsPerReplica applies to the hub, the one service that holds \
     WebSocket connections"
))]
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
    pub hub: ServiceSpec,
}

/// How one service runs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Whether the service runs at all. A disabled service has no Deployment.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The number of pods, from 0 to 500 (at least 1 for the command service, processor and
    /// cache updater while enabled); a PodDisruptionBudget is created when it is above 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 500))]
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
    /// Scale automatically. The gateway, the command service and the hub scale on CPU with a
    /// HorizontalPodAutoscaler the operator owns; the processor and the cache updater are
    /// scaled by the operator on their Kafka consumer lag, never beyond the partitions of the
    /// topic they consume. While set, `replicas` is ignored.
    ///
    /// Without it, a HorizontalPodAutoscaler of your own (or KEDA's) that targets the
    /// service's Deployment takes the replica count over, and the operator leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// How a service scales: on CPU through a HorizontalPodAutoscaler (the gateway, the command
/// service and the hub; their pods need a CPU request), or on Kafka consumer lag by the
/// operator (the processor and the cache updater).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message(
    "autoscaling.maxReplicas must be at least autoscaling.minReplicas"
))]
pub struct AutoscalingSpec {
    /// The fewest pods, from 1 to 500; a PodDisruptionBudget is created when it is above 1.
    #[schemars(range(min = 1, max = 500))]
    pub min_replicas: i32,
    /// The most pods, from 1 to 500.
    #[schemars(range(min = 1, max = 500))]
    pub max_replicas: i32,
    /// The average CPU use, in percent of the pods' CPU request, the autoscaler keeps the
    /// service at (default 70).
    #[serde(
        default = "default_cpu_target",
        rename = "targetCPUUtilizationPercentage"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
    /// Processor and cache updater only: the consumer lag (messages on their topic not yet
    /// processed) one replica is expected to work off (default 1000). The operator runs
    /// `ceil(lag / targetLagPerReplica)` replicas, within `minReplicas` and `maxReplicas`,
    /// and never more than the topic's partitions; it looks again at every health check
    /// (30 s by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_lag_per_replica: Option<i64>,
    /// Hub only: the WebSocket connections one replica is expected to hold. The hub's
    /// HorizontalPodAutoscaler then also scales on the pods' `hub_connections` metric (the
    /// replicas the average over this target asks for, or the CPU target, whichever is
    /// more); it needs a custom metrics API serving that metric (prometheus-adapter, KEDA),
    /// and without one the autoscaler keeps scaling on CPU alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_connections_per_replica: Option<i64>,
    /// How long the load must stay low before the service scales down, in seconds, from 0 to
    /// 3600 (default 300): the HorizontalPodAutoscaler's scale-down stabilization window, or
    /// for the processor and the cache updater how long the lag must fit fewer replicas
    /// (with a fifth to spare). Scaling up is never delayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_delay_seconds: Option<i32>,
}

impl AutoscalingSpec {
    /// The default of `targetLagPerReplica`.
    pub const DEFAULT_TARGET_LAG_PER_REPLICA: u64 = 1000;
    /// The default of `scaleDownDelaySeconds`.
    pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: i32 = 300;

    /// `targetLagPerReplica`, or its default.
    pub fn target_lag_per_replica(&self) -> u64 {
        self.target_lag_per_replica
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(Self::DEFAULT_TARGET_LAG_PER_REPLICA)
    }

    /// `scaleDownDelaySeconds`, or its default.
    pub fn scale_down_delay_seconds(&self) -> i32 {
        self.scale_down_delay_seconds
            .unwrap_or(Self::DEFAULT_SCALE_DOWN_DELAY_SECONDS)
    }
}

fn default_cpu_target() -> i32 {
    70
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
            autoscaling: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_replicas() -> i32 {
    1
}
