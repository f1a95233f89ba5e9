//! Which traffic reaches the stack's internal services.
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The stack's NetworkPolicy: the command service, the processor and the cache updater take
/// traffic only from the stack's gateway (the command service's API) and from metrics
/// scrapers; the gateway and the hub, the stack's public entry points, are not restricted.
/// Enforced by the cluster's network plugin (Calico, Cilium, …); without one the policy is
/// inert.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Whether the operator creates the NetworkPolicy `<stack>-internal`. Default true;
    /// false deletes it.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Who may scrape `/metrics` on the internal services' ops port (9090). Default: pods
    /// labelled `app.kubernetes.io/name: prometheus` in any namespace (the Prometheus
    /// pods of prometheus-operator and kube-prometheus-stack). An empty list lets no scraper
    /// in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrapers: Option<Vec<NetworkPolicyPeer>>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: enabled(),
            scrapers: None,
        }
    }
}

fn enabled() -> bool {
    true
}
