//! The *build* step: a [`ValidatedStack`] → the Kubernetes objects it should own
//! ([`DesiredState`]). Pure: no API client, no clock, no randomness, so the same spec always
//! builds byte-identical objects (and server-side apply of an unchanged stack writes nothing).
//!
//! Per enabled service: a ConfigMap with its plain settings, a Deployment (probes on `/health`
//! and `/ready`, non-root, read-only root filesystem, secrets from Secret refs), a Service, a
//! PodDisruptionBudget when it runs more than one replica, and a HorizontalPodAutoscaler when
//! it scales on CPU (the Deployment then leaves `replicas` to it; the processor and the cache
//! updater scale on consumer lag instead, [`with_replicas`] sets the count the operator
//! decided, [`crate::scaling`]); per stack, the
//! endpoints ConfigMap and a NetworkPolicy around the internal services. Every object carries the
//! `app.kubernetes.io/*` labels and a controller owner reference to the stack.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::scaling::LagPolicy;
use crate::validate::ValidatedStack;

mod ca;
mod component;
mod config_map;
mod deployment;
mod job;
mod monitoring;
mod network_policy;
mod service;

pub use ca::Ca;
pub use component::{Component, Consumption, Tier};
pub use config_map::{service_url, settings};
pub use job::{
    JobError, REBUILD_NAME, REBUILD_TTL_SECONDS, REPLAY_NAME, Task, rebuild_job, task_job,
};
pub use monitoring::{Scraping, pod_monitor, pod_monitor_kind, pod_monitor_name};
pub use network_policy::{network_policy, network_policy_name};
pub use service::service_needs_recreate;

/// `app.kubernetes.io/part-of` of everything the operator creates.
pub const PART_OF: &str = "meridian";
/// `app.kubernetes.io/managed-by` of everything the operator creates.
pub const MANAGED_BY: &str = "meridian-operator";
/// The pod-template annotation holding a hash of the service's ConfigMap, so that a settings
/// change rolls the pods (environment from a ConfigMap is read only at container start).
pub const CONFIG_HASH_ANNOTATION: &str = "meridian.dev/config-hash";
/// The pod-template annotation holding a hash of the stack's connection Secrets, so that a
/// credentials rotation rolls the pods onto the new password.
pub const CREDENTIALS_HASH_ANNOTATION: &str = "meridian.dev/credentials-hash";
/// The key of the connection URL in the Secrets the credentials stage writes.
pub const URL_KEY: &str = "url";
/// How long the services drain in-flight requests after SIGTERM (`SHUTDOWN_GRACE_SECONDS`).
pub const SHUTDOWN_GRACE_SECONDS: i64 = 25;
/// The port every service serves `/ready` and `/metrics` on (`OPS_PORT`, container port
/// `ops`), away from the port its Service exposes.
pub const OPS_PORT: i32 = 9090;
/// The non-root user and group the containers run as.
pub const RUN_AS: i64 = 65532;

/// Everything a stack should own in its namespace.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DesiredState {
    /// The stack's endpoints ConfigMap, for applications.
    pub endpoints: ConfigMap,
    /// One entry per enabled service, in start-up order.
    pub services: Vec<ServiceObjects>,
    /// The stack's NetworkPolicy ([`network_policy`]), unless `spec.networkPolicy.enabled` is
    /// false.
    pub network_policy: Option<NetworkPolicy>,
    /// How the services are scraped; with [`Scraping::PodMonitor`] the stack owns a PodMonitor
    /// ([`pod_monitor`]), otherwise its pods carry scrape annotations.
    pub scraping: Scraping,
}

impl DesiredState {
    /// The objects of one service, if it is enabled.
    pub fn service(&self, component: Component) -> Option<&ServiceObjects> {
        self.services.iter().find(|s| s.component == component)
    }
}

/// The objects of one service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceObjects {
    /// Which service.
    pub component: Component,
    /// Its plain (non-secret) settings, read through `envFrom`.
    pub config_map: ConfigMap,
    /// Its pods.
    pub deployment: Deployment,
    /// Its Service on the HTTP port: a ClusterIP Service, headless unless
    /// [`Component::has_virtual_ip`].
    pub service: Service,
    /// Present when it runs more than one replica (or may scale down to more than one).
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// Present when the service scales automatically (`autoscaling`).
    pub autoscaler: Option<HorizontalPodAutoscaler>,
}

/// The name of the Secret (key [`URL_KEY`]) with the stack's PostgreSQL connection URL.
pub fn postgres_secret_name(stack: &ValidatedStack) -> String {
    format!("{}-postgres", stack.name())
}

/// The name of the Secret with the stack's Kafka login (`username`, `password`, `mechanism`),
/// when its services have a principal of their own.
pub fn kafka_secret_name(stack: &ValidatedStack) -> String {
    format!("{}-kafka", stack.name())
}

/// The name of the Secret (key [`URL_KEY`]) with the stack's Redis connection URL.
pub fn redis_secret_name(stack: &ValidatedStack) -> String {
    format!("{}-redis", stack.name())
}

/// The name of a service's Deployment, Service, ConfigMap and PodDisruptionBudget.
pub fn object_name(stack: &ValidatedStack, component: Component) -> String {
    format!("{}-{}", stack.name(), component.name())
}

/// The labels that select a service's pods (stable: a Deployment's selector is immutable).
pub fn selector_labels(stack: &ValidatedStack, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            component.name().to_owned(),
        ),
        (
            "app.kubernetes.io/instance".to_owned(),
            stack.name().to_owned(),
        ),
    ])
}

/// Every label of a service's objects.
pub fn labels(stack: &ValidatedStack, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(stack, component);
    labels.extend([
        (
            "app.kubernetes.io/component".to_owned(),
            component.tier().label().to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
    ]);
    labels
}

/// The labels of the stack's own objects (its connection Secrets, its endpoints ConfigMap).
pub fn stack_labels(stack: &ValidatedStack) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/instance".to_owned(),
            stack.name().to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
    ])
}

/// The name of the endpoints ConfigMap of the stack named `stack`.
pub fn endpoints_name(stack: &str) -> String {
    format!("{stack}-endpoints")
}

/// What an application needs to use the stack, as a ConfigMap it can mount or read through
/// `envFrom`: the gateway's and the hub's in-cluster URLs (of the enabled ones), the JWT
/// issuer and audience its tokens must carry, and the API's conventions.
pub fn endpoints(stack: &ValidatedStack) -> ConfigMap {
    let spec = stack.spec();
    let host = |component: Component| {
        format!(
            "{}.{}.svc:{}",
            object_name(stack, component),
            stack.namespace(),
            component.port()
        )
    };
    let mut data = BTreeMap::from([
        ("COMMANDS_PATH".to_owned(), "/v1/commands".to_owned()),
        (
            "DOCUMENTS_PATH".to_owned(),
            "/v1/documents/{collection}/{id}".to_owned(),
        ),
        (
            "DOCUMENT_ROOM".to_owned(),
            "doc:{collection}:{id}".to_owned(),
        ),
    ]);
    if spec.services.gateway.enabled {
        data.insert(
            "GATEWAY_URL".to_owned(),
            format!("http://{}", host(Component::Gateway)),
        );
    }
    if spec.services.hub.enabled {
        data.insert(
            "HUB_URL".to_owned(),
            format!("ws://{}/ws", host(Component::WsHub)),
        );
    }
    if let Some(auth) = &spec.auth {
        data.insert("JWT_ISSUER".to_owned(), auth.issuer.clone());
        data.insert("JWT_AUDIENCE".to_owned(), auth.audience.clone());
    }
    ConfigMap {
        metadata: stack_metadata(stack, endpoints_name(stack.name())),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Builds the objects of every enabled service, scraped as `scraping` says.
pub fn build(stack: &ValidatedStack, scraping: Scraping) -> DesiredState {
    DesiredState {
        endpoints: endpoints(stack),
        network_policy: network_policy(stack),
        services: Component::ALL
            .into_iter()
            .filter(|c| c.spec(&stack.spec().services).enabled)
            .map(|c| build_service(stack, c, scraping))
            .collect(),
        scraping,
    }
}

/// Who sets the replica count of the Deployments whose count the spec's `replicas` does not
/// give.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// The counts the operator decided for the services that scale on consumer lag.
    pub decided: BTreeMap<Component, i32>,
    /// The services whose Deployment a HorizontalPodAutoscaler the operator does not own
    /// targets (the user's, or KEDA's): their count is left out of the apply.
    pub external: BTreeSet<Component>,
}

/// Sets the replica counts of `replicas` on the Deployments of `state`.
pub fn with_replicas(mut state: DesiredState, replicas: &Replicas) -> DesiredState {
    for objects in &mut state.services {
        let Some(spec) = objects.deployment.spec.as_mut() else {
            continue;
        };
        if replicas.external.contains(&objects.component) {
            spec.replicas = None;
        } else if let Some(count) = replicas.decided.get(&objects.component) {
            spec.replicas = Some(*count);
        }
    }
    state
}

/// The consumer group of a consumer service: the literal value of its group variable in the
/// service's `env`, or `<KAFKA_TOPIC_PREFIX><service>` as the service defaults to.
pub fn consumer_group(stack: &ValidatedStack, component: Component) -> Option<String> {
    let consumes = component.consumes()?;
    let overridden = component
        .spec(&stack.spec().services)
        .env
        .iter()
        .find(|e| e.name == consumes.group_variable)
        .and_then(|e| e.value.clone());
    Some(overridden.unwrap_or_else(|| format!("{}{}", stack.topic_prefix(), consumes.group_suffix)))
}

/// The lag policy of a consumer service that scales automatically ([`crate::scaling`]).
pub fn lag_policy(stack: &ValidatedStack, component: Component) -> Option<LagPolicy> {
    let consumes = component.consumes()?;
    let spec = component.spec(&stack.spec().services);
    let autoscaling = spec.autoscaling.as_ref().filter(|_| spec.enabled)?;
    let topics = &stack.spec().kafka.topics;
    let partitions = match consumes.topic {
        "commands" => topics.commands.partitions,
        _ => topics.events.partitions,
    };
    Some(LagPolicy {
        min: autoscaling.min_replicas,
        max: autoscaling.max_replicas,
        partitions,
        target_lag_per_replica: autoscaling.target_lag_per_replica(),
        scale_down_delay: std::time::Duration::from_secs(
            u64::try_from(autoscaling.scale_down_delay_seconds()).unwrap_or(0),
        ),
    })
}

/// Stamps `hash` (of the connection Secrets' contents) on the pod template of every service
/// that reads one of them, so a rotated password rolls exactly those Deployments.
pub fn with_credentials_hash(mut state: DesiredState, hash: &str) -> DesiredState {
    for objects in &mut state.services {
        if !(objects.component.uses_postgres() || objects.component.uses_redis()) {
            continue;
        }
        let template = objects
            .deployment
            .spec
            .as_mut()
            .and_then(|s| s.template.metadata.as_mut());
        if let Some(meta) = template {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(CREDENTIALS_HASH_ANNOTATION.to_owned(), hash.to_owned());
        }
    }
    state
}

/// The first 64 bits of the SHA-256 of a sequence of byte strings (each prefixed by its
/// length, so the split between them counts), as 16 hex digits: stable across Rust releases
/// and platforms, unlike `std`'s `DefaultHasher`. Used for change detection (a hash of the
/// connection Secrets lands in pod annotations, so it must not help anyone guess a password)
/// and in PostgreSQL names, where it keeps two stacks apart.
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    format!("{:016x}", fingerprint_bits(parts))
}

/// [`fingerprint`] as the number its 16 hex digits spell, for maps that keep many of them.
pub fn fingerprint_bits<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The number a [`fingerprint`] spells, if `text` is one (exactly 16 lowercase hex digits).
pub fn parse_fingerprint(text: &str) -> Option<u64> {
    let digits = text.len() == 16
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    digits.then(|| u64::from_str_radix(text, 16).ok()).flatten()
}

fn build_service(
    stack: &ValidatedStack,
    component: Component,
    scraping: Scraping,
) -> ServiceObjects {
    let spec = component.spec(&stack.spec().services);
    let config_map = config_map::config_map(stack, component);
    let fewest = spec
        .autoscaling
        .as_ref()
        .map_or(spec.replicas, |a| a.min_replicas);
    let pod_disruption_budget =
        (fewest > 1).then(|| deployment::pod_disruption_budget(stack, component));
    ServiceObjects {
        component,
        autoscaler: deployment::autoscaler(stack, component),
        deployment: deployment::deployment(stack, component, &config_map, scraping),
        service: service::service(stack, component),
        config_map,
        pod_disruption_budget,
    }
}

/// The metadata of an object the stack itself owns (not one service's): `name` in the stack's
/// namespace, the stack's labels, the stack as controller owner.
fn stack_metadata(stack: &ValidatedStack, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(stack.namespace().to_owned()),
        labels: Some(stack_labels(stack)),
        owner_references: Some(vec![stack.owner().clone()]),
        ..ObjectMeta::default()
    }
}

fn metadata(stack: &ValidatedStack, component: Component) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(stack, component)),
        namespace: Some(stack.namespace().to_owned()),
        labels: Some(labels(stack, component)),
        owner_references: Some(vec![stack.owner().clone()]),
        ..ObjectMeta::default()
    }
}

/// A connection Secret of the stack (`<stack>-redis`, `-postgres`, `-kafka`): `data` as
/// string data, the stack's labels and owner, and `rotated` (the rotation token it was made
/// for) in [`crate::controller::ROTATED_ANNOTATION`] when set.
pub fn connection_secret(
    validated: &ValidatedStack,
    name: String,
    rotated: Option<&str>,
    data: [(&str, &str); 3],
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(validated.namespace().to_owned()),
            labels: Some(stack_labels(validated)),
            annotations: rotated.map(|t| {
                BTreeMap::from([(
                    crate::controller::ROTATED_ANNOTATION.to_owned(),
                    t.to_owned(),
                )])
            }),
            owner_references: Some(vec![validated.owner().clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        string_data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        ),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests;
