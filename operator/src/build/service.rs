//! A service's Service on its HTTP port: a ClusterIP Service, headless unless
//! [`Component::has_virtual_ip`].
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Component, metadata, selector_labels};
use crate::validate::ValidatedStack;

/// `spec.clusterIP` of a headless Service.
const HEADLESS: &str = "None";

/// Whether an existing Service with `spec.clusterIP` `existing_cluster_ip` must be deleted
/// before `desired` can be applied: `spec.clusterIP` cannot change once set, so a Service that
/// turns headless (or gets a virtual IP) after an operator upgrade is created anew. A Service
/// is headless exactly when its `clusterIP` is `None`.
pub fn service_needs_recreate(existing_cluster_ip: Option<&str>, desired: &Service) -> bool {
    let desired_cluster_ip = desired.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    (existing_cluster_ip == Some(HEADLESS)) != (desired_cluster_ip == Some(HEADLESS))
}

pub(super) fn service(stack: &ValidatedStack, component: Component) -> Service {
    Service {
        metadata: metadata(stack, component),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            cluster_ip: (!component.has_virtual_ip()).then(|| HEADLESS.to_owned()),
            selector: Some(selector_labels(stack, component)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: component.port(),
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
