//! How Prometheus finds the services' metrics.
use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How Prometheus finds the services' metrics (`/metrics` on each service's HTTP port).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Whether the operator creates a prometheus-operator PodMonitor (named after the stack)
    /// that selects every service's pods. Unset: when the cluster has the PodMonitor CRD
    /// (`monitoring.coreos.com/v1`). Without a PodMonitor the pods carry the conventional
    /// `prometheus.io/scrape`, `prometheus.io/port` and `prometheus.io/path` annotations
    /// instead; `true` on a cluster without the CRD falls back to those annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_monitor: Option<bool>,
    /// Labels added to the PodMonitor, for example the `release` label a Prometheus selects
    /// its monitors by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_monitor_labels: BTreeMap<String, String>,
}
