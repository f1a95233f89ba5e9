//! The stack's NetworkPolicy (`spec.networkPolicy`): the internal services — the command
//! service, the processor, the cache updater — take traffic only from the stack's gateway
//! (on the command service's port) and from metrics scrapers (on the ops port). The
//! gateway and the hub are the stack's entry points and stay open. Kubelet probes come from
//! the node, which a NetworkPolicy cannot block.
use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Component, MANAGED_BY, OPS_PORT, PART_OF, selector_labels};
use crate::validate::ValidatedStack;

/// The services no client outside the stack calls.
pub const INTERNAL: [Component; 3] = [
    Component::CommandService,
    Component::Processor,
    Component::CacheUpdater,
];

/// The policy's name: `<stack>-internal`.
pub fn network_policy_name(stack: &str) -> String {
    format!("{stack}-internal")
}

/// The default scrapers: Prometheus pods (`app.kubernetes.io/name: prometheus`) in any
/// namespace.
fn default_scrapers() -> Vec<NetworkPolicyPeer> {
    vec![NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "prometheus".to_owned(),
            )])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }]
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }
}

/// The policy, or `None` when `spec.networkPolicy.enabled` is false.
pub fn network_policy(stack: &ValidatedStack) -> Option<NetworkPolicy> {
    let spec = &stack.spec().network_policy;
    if !spec.enabled {
        return None;
    }
    let pods = LabelSelector {
        match_labels: Some(BTreeMap::from([
            (
                "app.kubernetes.io/instance".to_owned(),
                stack.name().to_owned(),
            ),
            ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                MANAGED_BY.to_owned(),
            ),
        ])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "app.kubernetes.io/name".to_owned(),
            operator: "In".to_owned(),
            values: Some(INTERNAL.iter().map(|c| c.name().to_owned()).collect()),
        }]),
    };
    let gateway = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(stack, Component::Gateway)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(vec![gateway]),
        ports: Some(vec![tcp(Component::CommandService.port())]),
    }];
    let scrapers = spec.scrapers.clone().unwrap_or_else(default_scrapers);
    if !scrapers.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(scrapers),
            ports: Some(vec![tcp(OPS_PORT)]),
        });
    }
    Some(NetworkPolicy {
        metadata: super::stack_metadata(stack, network_policy_name(stack.name())),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    })
}
