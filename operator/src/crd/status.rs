//! What the operator last observed of a stack.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

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
    /// How many of the stack's services have all their replicas ready, as `ready/total`
    /// (`kubectl get mws` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_ready: Option<String>,
    /// The ConfigMap with what applications need to use the stack: `GATEWAY_URL`, `HUB_URL`,
    /// `JWT_ISSUER`, `JWT_AUDIENCE` and the API's paths and room names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<String>,
    /// The operator version that last rolled the stack's services out: what they run is
    /// what that version generates. A newer operator rolls stacks onto its version in waves
    /// (`ROLLOUT_CONCURRENCY` at once), each Available before the next starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_version: Option<String>,
    /// One condition per stage (`DependenciesReady`, `TopicsReady`, `CredentialsReady`,
    /// `CoreAvailable`, `EdgeAvailable`) and `Ready`, each with `type`, `status`, `reason`,
    /// `message`, `lastTransitionTime` and `observedGeneration`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl MiddlewareStackStatus {
    /// `ready/total` of `services` (see [`Self::services_ready`]); `None` without services.
    pub fn count_ready(services: &BTreeMap<String, ServiceStatus>) -> Option<String> {
        if services.is_empty() {
            return None;
        }
        let ready = services
            .values()
            .filter(|s| s.ready_replicas >= s.replicas)
            .count();
        Some(format!("{ready}/{}", services.len()))
    }
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
