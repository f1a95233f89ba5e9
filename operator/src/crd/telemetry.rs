//! Trace export.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

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

fn default_sampling_ratio() -> f64 {
    1.0
}
