//! How Prometheus finds a stack's metrics: one PodMonitor for all its services, or the
//! conventional scrape annotations on each pod.
use std::collections::BTreeMap;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{PART_OF, stack_labels};
use crate::crd::MonitoringSpec;
use crate::validate::ValidatedStack;

/// The prometheus-operator kind the operator creates when the cluster has it.
pub fn pod_monitor_kind() -> GroupVersionKind {
    GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor")
}

/// How the stack's services are scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scraping {
    /// A PodMonitor selects the pods; they carry no scrape annotations.
    PodMonitor,
    /// The pods carry `prometheus.io/*` annotations.
    #[default]
    Annotations,
}

impl Scraping {
    /// What `spec` asks for on a cluster that has (or lacks) the PodMonitor CRD: a PodMonitor
    /// unless turned off or impossible.
    pub fn choose(spec: &MonitoringSpec, pod_monitor_crd: bool) -> Self {
        if pod_monitor_crd && spec.pod_monitor != Some(false) {
            Self::PodMonitor
        } else {
            Self::Annotations
        }
    }
}

/// The scrape annotations of a service's pods (a user's own annotations of the same name win):
/// the `ops` port's `/metrics`.
pub(super) fn scrape_annotations() -> [(String, String); 3] {
    [
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), super::OPS_PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]
}

/// The name of the stack's PodMonitor.
pub fn pod_monitor_name(stack: &ValidatedStack) -> String {
    stack.name().to_owned()
}

/// The stack's PodMonitor: every pod of the stack (its `instance` and `part-of` labels), the
/// `ops` port's `/metrics`, with the stack's name as the `stack` target label.
pub fn pod_monitor(stack: &ValidatedStack) -> DynamicObject {
    let mut labels = stack.spec().monitoring.pod_monitor_labels.clone();
    labels.extend(stack_labels(stack));
    let resource = ApiResource::from_gvk(&pod_monitor_kind());
    let mut object = DynamicObject::new(&pod_monitor_name(stack), &resource)
        .within(stack.namespace())
        .data(json!({
            "spec": {
                "selector": {
                    "matchLabels": BTreeMap::from([
                        ("app.kubernetes.io/instance", stack.name()),
                        ("app.kubernetes.io/part-of", PART_OF),
                    ]),
                },
                "podMetricsEndpoints": [{
                    "port": "ops",
                    "path": "/metrics",
                    // Every series already carries `service`; the prometheus-operator adds
                    // `namespace` and `pod`; `stack` tells two stacks of a namespace apart.
                    "relabelings": [
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                            "targetLabel": "stack",
                        },
                    ],
                }],
            }
        }));
    object.metadata.labels = Some(labels);
    object.metadata.owner_references = Some(vec![stack.owner().clone()]);
    object
}
