//! A service's Deployment (probes on `/health` and `/ready`, non-root, read-only root
//! filesystem, secrets from Secret refs), and the PodDisruptionBudget of its pods.
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::config_map::config_hash;
use super::{
    CONFIG_HASH_ANNOTATION, Component, OPS_PORT, RUN_AS, SHUTDOWN_GRACE_SECONDS, Scraping, URL_KEY,
    ca, kafka_secret_name, labels, metadata, object_name, postgres_secret_name, redis_secret_name,
    selector_labels,
};
use crate::crd::ServicePrincipal;
use crate::validate::ValidatedStack;

/// The variables that come from Secrets, never from the ConfigMap.
fn secret_env(stack: &ValidatedStack, component: Component) -> Vec<EnvVar> {
    let from_secret = |name: &str, secret: String, key: String| EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret,
                key,
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut env = Vec::new();
    if component.uses_postgres() {
        env.push(from_secret(
            "DATABASE_URL",
            postgres_secret_name(stack),
            URL_KEY.to_owned(),
        ));
    }
    if component.uses_redis() {
        env.push(from_secret(
            "REDIS_URL",
            redis_secret_name(stack),
            URL_KEY.to_owned(),
        ));
    }
    if component.uses_kafka() && stack.kafka_principal() == ServicePrincipal::Stack {
        for (variable, key) in [
            ("KAFKA_SASL_USERNAME", "username"),
            ("KAFKA_SASL_PASSWORD", "password"),
        ] {
            env.push(from_secret(
                variable,
                kafka_secret_name(stack),
                key.to_owned(),
            ));
        }
    }
    if component.verifies_tokens()
        && let Some(secret) = stack
            .spec()
            .auth
            .as_ref()
            .and_then(|a| a.jwt_secret_ref.as_ref())
    {
        env.push(from_secret(
            "JWT_SECRET",
            secret.name.clone(),
            secret.key.clone(),
        ));
    }
    env
}

/// `/tmp` (the root filesystem is read-only), and the CAs of the dependencies the service
/// uses where the stack names them.
fn volume_mounts(stack: &ValidatedStack, component: Component) -> Vec<VolumeMount> {
    let mut mounts = vec![VolumeMount {
        name: "tmp".to_owned(),
        mount_path: "/tmp".to_owned(),
        ..VolumeMount::default()
    }];
    mounts.extend(ca::volume_mounts(stack, component));
    mounts
}

fn volumes(stack: &ValidatedStack, component: Component) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: "tmp".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    volumes.extend(ca::volumes(stack, component));
    volumes
}

/// `ours`, then `extra`; an extra variable replaces ours of the same name in place (the
/// Deployment's `env` is a list keyed by name, so it must not hold duplicates).
fn merge_env(ours: Vec<EnvVar>, extra: &[EnvVar]) -> Vec<EnvVar> {
    let mut env = ours;
    for var in extra {
        match env.iter_mut().find(|e| e.name == var.name) {
            Some(existing) => *existing = var.clone(),
            None => env.push(var.clone()),
        }
    }
    env
}

fn image(stack: &ValidatedStack, component: Component) -> (String, String) {
    let defaults = &stack.spec().image;
    let overrides = component
        .spec(&stack.spec().services)
        .image
        .clone()
        .unwrap_or_default();
    let release = stack.release();
    let registry = overrides
        .registry
        .as_deref()
        .or(defaults.registry.as_deref())
        .unwrap_or(&release.registry);
    let tag = overrides
        .tag
        .as_deref()
        .or(defaults.tag.as_deref())
        .unwrap_or(&release.tag);
    let policy = overrides.pull_policy.unwrap_or(defaults.pull_policy);
    let policy = match policy {
        crate::crd::PullPolicy::Always => "Always",
        crate::crd::PullPolicy::IfNotPresent => "IfNotPresent",
        crate::crd::PullPolicy::Never => "Never",
    };
    (
        format!(
            "{}/{}:{tag}",
            registry.trim_end_matches('/'),
            component.name()
        ),
        policy.to_owned(),
    )
}

fn http_probe(path: &str, period: i32, timeout: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("ops".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

pub(super) fn deployment(
    stack: &ValidatedStack,
    component: Component,
    config_map: &ConfigMap,
    scraping: Scraping,
) -> Deployment {
    let spec = component.spec(&stack.spec().services);
    let (image, image_pull_policy) = image(stack, component);
    let mut annotations = spec.annotations.clone();
    if scraping == Scraping::Annotations {
        for (key, value) in super::monitoring::scrape_annotations() {
            annotations.entry(key).or_insert(value);
        }
    }
    annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash(config_map));
    let container = Container {
        name: component.name().to_owned(),
        image: Some(image),
        image_pull_policy: Some(image_pull_policy),
        // `http` for clients (the Service's port), `ops` for probes and scrapes.
        ports: Some(vec![
            ContainerPort {
                name: Some("http".to_owned()),
                container_port: component.port(),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("ops".to_owned()),
                container_port: OPS_PORT,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: object_name(stack, component),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: Some(merge_env(secret_env(stack, component), &spec.env)),
        resources: spec.resources.clone(),
        // Liveness never checks dependencies (a database outage must not restart every pod);
        // readiness does, each check bounded by READINESS_TIMEOUT_MS (2 s by default).
        liveness_probe: Some(http_probe("/health", 10, 1)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts(stack, component)),
        ..Container::default()
    };
    Deployment {
        metadata: metadata(stack, component),
        spec: Some(DeploymentSpec {
            // With an autoscaler the replica count is its to set: left out of the apply. A
            // service scaled on consumer lag starts at its minimum; the operator's decision
            // replaces it ([`super::with_replicas`]).
            replicas: match &spec.autoscaling {
                None => Some(spec.replicas),
                Some(autoscaling) if component.consumes().is_some() => {
                    Some(autoscaling.min_replicas)
                }
                Some(_) => None,
            },
            selector: LabelSelector {
                match_labels: Some(selector_labels(stack, component)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(stack, component)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // The drain window plus a margin, so SIGKILL never cuts a drain short.
                    termination_grace_period_seconds: Some(SHUTDOWN_GRACE_SECONDS + 5),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(volumes(stack, component)),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub(super) fn pod_disruption_budget(
    stack: &ValidatedStack,
    component: Component,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(stack, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(stack, component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The service's HorizontalPodAutoscaler (autoscaling/v2) on average CPU utilisation (and for
/// the hub, optionally its pods' average `hub_connections`), when `autoscaling` is set, except
/// for the consumers, which the operator scales on lag.
pub(super) fn autoscaler(
    stack: &ValidatedStack,
    component: Component,
) -> Option<HorizontalPodAutoscaler> {
    if component.consumes().is_some() {
        return None;
    }
    let autoscaling = component
        .spec(&stack.spec().services)
        .autoscaling
        .as_ref()?;
    let behavior =
        autoscaling
            .scale_down_delay_seconds
            .map(|seconds| HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(seconds),
                    ..HPAScalingRules::default()
                }),
                ..HorizontalPodAutoscalerBehavior::default()
            });
    let mut metrics = vec![MetricSpec {
        type_: "Resource".to_owned(),
        resource: Some(ResourceMetricSource {
            name: "cpu".to_owned(),
            target: MetricTarget {
                type_: "Utilization".to_owned(),
                average_utilization: Some(autoscaling.target_cpu_utilization_percentage),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }];
    if let Some(connections) = autoscaling.target_connections_per_replica {
        metrics.push(MetricSpec {
            type_: "Pods".to_owned(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: common::metrics::HUB_CONNECTIONS.to_owned(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".to_owned(),
                    average_value: Some(Quantity(connections.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    Some(HorizontalPodAutoscaler {
        metadata: metadata(stack, component),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: object_name(stack, component),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(metrics),
            behavior,
        }),
        ..HorizontalPodAutoscaler::default()
    })
}
