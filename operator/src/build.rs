//! The *build* step: a [`ValidatedStack`] → the Kubernetes objects it should own
//! ([`DesiredState`]). Pure: no API client, no clock, no randomness, so the same spec always
//! builds byte-identical objects (and server-side apply of an unchanged stack writes nothing).
//!
//! Per enabled service: a ConfigMap with its plain settings, a Deployment (probes on `/health`
//! and `/ready`, non-root, read-only root filesystem, secrets from Secret refs), a Service, and
//! a PodDisruptionBudget when it runs more than one replica. Every object carries the
//! `app.kubernetes.io/*` labels and a controller owner reference to the stack.
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext, Service,
    ServicePort, ServiceSpec as CoreServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{RateLimitPolicy, ServiceSpec, ServicesSpec};
use crate::validate::ValidatedStack;

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
/// The non-root user and group the containers run as.
pub const RUN_AS: i64 = 65532;

/// One of the five services, in start-up order (core first, then edge: hub, then gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `command-service`.
    CommandService,
    /// `processor`.
    Processor,
    /// `cache-updater`.
    CacheUpdater,
    /// `ws-hub`.
    WsHub,
    /// `api-gateway`.
    Gateway,
}

/// Whether a service belongs to the core stage or the edge stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Command service, processor, cache updater.
    Core,
    /// WebSocket hub and API gateway: exposed to clients, started after the core.
    Edge,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::Edge => "edge",
        }
    }
}

impl Component {
    /// Every service, in start-up order.
    pub const ALL: [Self; 5] = [
        Self::CommandService,
        Self::Processor,
        Self::CacheUpdater,
        Self::WsHub,
        Self::Gateway,
    ];

    /// The service's name: its image, its `app.kubernetes.io/name` and `OTEL_SERVICE_NAME`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "api-gateway",
            Self::CommandService => "command-service",
            Self::Processor => "processor",
            Self::CacheUpdater => "cache-updater",
            Self::WsHub => "ws-hub",
        }
    }

    /// The service's field under `spec.services`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::CommandService => "commandService",
            Self::Processor => "processor",
            Self::CacheUpdater => "cacheUpdater",
            Self::WsHub => "wsHub",
        }
    }

    /// The HTTP port (API, `/health`, `/ready`, `/metrics`).
    pub fn port(self) -> i32 {
        match self {
            Self::Gateway => 8080,
            Self::CommandService => 8082,
            Self::Processor => 8083,
            Self::CacheUpdater => 8084,
            Self::WsHub => 8085,
        }
    }

    /// The stage the service is started in.
    pub fn tier(self) -> Tier {
        match self {
            Self::CommandService | Self::Processor | Self::CacheUpdater => Tier::Core,
            Self::WsHub | Self::Gateway => Tier::Edge,
        }
    }

    /// The service's settings in the spec.
    pub fn spec(self, services: &ServicesSpec) -> &ServiceSpec {
        match self {
            Self::Gateway => &services.gateway,
            Self::CommandService => &services.command_service,
            Self::Processor => &services.processor,
            Self::CacheUpdater => &services.cache_updater,
            Self::WsHub => &services.ws_hub,
        }
    }

    /// Whether clients call the service through its Service's virtual IP: the gateway, the
    /// hub and the command service (called by the gateway). The processor and the cache
    /// updater only consume Kafka; nothing calls them but the kubelet's probes (direct to the
    /// pod) and metrics scrapers (which discover pods through the Service's endpoints), so
    /// their Services are headless. That keeps two of a stack's five Services out of the
    /// cluster's service CIDR and out of kube-proxy's rules on every node, and skips the API
    /// server's ClusterIP allocation, which Kubernetes serialises cluster-wide (one
    /// `IPAddress` create at a time): at 1,000 stacks it set the pace of the whole rollout.
    pub fn has_virtual_ip(self) -> bool {
        matches!(self, Self::Gateway | Self::CommandService | Self::WsHub)
    }

    /// Whether the service talks to PostgreSQL (`DATABASE_URL`).
    pub fn uses_postgres(self) -> bool {
        matches!(self, Self::CommandService | Self::Processor)
    }

    /// Whether the service talks to Redis (`REDIS_URL`, `REDIS_KEY_PREFIX`).
    pub fn uses_redis(self) -> bool {
        matches!(self, Self::Gateway | Self::CacheUpdater | Self::WsHub)
    }

    /// Whether the service talks to Kafka (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_TOPIC_PREFIX`).
    pub fn uses_kafka(self) -> bool {
        matches!(
            self,
            Self::CommandService | Self::Processor | Self::CacheUpdater
        )
    }
}

/// Everything a stack should own in its namespace.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DesiredState {
    /// One entry per enabled service, in start-up order.
    pub services: Vec<ServiceObjects>,
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
    /// Present when it runs more than one replica.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
}

/// The name of the Secret (key [`URL_KEY`]) with the stack's PostgreSQL connection URL.
pub fn postgres_secret_name(stack: &ValidatedStack) -> String {
    format!("{}-postgres", stack.name())
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

/// Builds the objects of every enabled service.
pub fn build(stack: &ValidatedStack) -> DesiredState {
    DesiredState {
        services: Component::ALL
            .into_iter()
            .filter(|c| c.spec(&stack.spec().services).enabled)
            .map(|c| build_service(stack, c))
            .collect(),
    }
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
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn build_service(stack: &ValidatedStack, component: Component) -> ServiceObjects {
    let spec = component.spec(&stack.spec().services);
    let config_map = config_map(stack, component);
    let pod_disruption_budget =
        (spec.replicas > 1).then(|| pod_disruption_budget(stack, component));
    ServiceObjects {
        component,
        deployment: deployment(stack, component, &config_map),
        service: service(stack, component),
        config_map,
        pod_disruption_budget,
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

/// The plain settings of a service, by the variable names of ARCHITECTURE.md.
pub fn settings(stack: &ValidatedStack, component: Component) -> BTreeMap<String, String> {
    let spec = stack.spec();
    let mut env = BTreeMap::new();
    let mut set = |key: &str, value: String| {
        env.insert(key.to_owned(), value);
    };
    set("PORT", component.port().to_string());
    set("BIND_ADDRESS", "0.0.0.0".to_owned());
    set("LOG_FORMAT", "json".to_owned());
    set("RUST_LOG", "info".to_owned());
    set("SHUTDOWN_GRACE_SECONDS", SHUTDOWN_GRACE_SECONDS.to_string());
    set("OTEL_SERVICE_NAME", component.name().to_owned());
    set(
        "OTEL_TRACES_SAMPLER_ARG",
        spec.telemetry.sampling_ratio.to_string(),
    );
    if let Some(endpoint) = &spec.telemetry.otlp_endpoint {
        set("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone());
    }
    if component.uses_kafka() {
        set(
            "KAFKA_BOOTSTRAP_SERVERS",
            spec.kafka.bootstrap_servers.clone(),
        );
        set("KAFKA_TOPIC_PREFIX", stack.topic_prefix());
    }
    if component.uses_redis() {
        set("REDIS_KEY_PREFIX", stack.redis_key_prefix());
    }
    if matches!(component, Component::Gateway | Component::WsHub)
        && let Some(auth) = &spec.auth
    {
        // The JWT settings both edge services share (`common::auth`); the HMAC secret itself
        // comes from a Secret ref in the Deployment, never from the ConfigMap.
        set("JWT_ISSUER", auth.issuer.clone());
        set("JWT_AUDIENCE", auth.audience.clone());
        if let Some(url) = &auth.jwks_url {
            set("JWT_JWKS_URL", url.clone());
        }
    }
    if component == Component::CacheUpdater {
        // The cache updater writes the rooms' history the hub resumes clients from: its size
        // and lifetime follow the hub's (set through the hub's `env`) unless the cache
        // updater's own `env` says otherwise (it is applied after these).
        for (hub, cache) in [
            ("HUB_HISTORY_SIZE", "CACHE_ROOM_HISTORY_SIZE"),
            ("HUB_HISTORY_TTL_SECONDS", "CACHE_ROOM_HISTORY_TTL_SECONDS"),
        ] {
            if let Some(value) = spec
                .services
                .ws_hub
                .env
                .iter()
                .find(|e| e.name == hub && e.value_from.is_none())
                .and_then(|e| e.value.clone())
            {
                set(cache, value);
            }
        }
    }
    if component == Component::Gateway {
        // Gateway-specific settings (prefix `GATEWAY_`, ARCHITECTURE.md).
        set(
            "GATEWAY_COMMAND_SERVICE_URL",
            service_url(stack, Component::CommandService),
        );
        set("GATEWAY_HUB_URL", service_url(stack, Component::WsHub));
        if !spec.rate_limits.policies.is_empty() {
            set(
                "GATEWAY_RATE_LIMITS",
                rate_limits_json(&spec.rate_limits.policies),
            );
        }
    }
    env
}

/// The in-cluster base URL of a service of the stack: `http://<stack>-<service>.<ns>.svc:<port>`.
pub fn service_url(stack: &ValidatedStack, component: Component) -> String {
    format!(
        "http://{}.{}.svc:{}",
        object_name(stack, component),
        stack.namespace(),
        component.port()
    )
}

/// The rate-limit policies as compact JSON, with `burst` filled in (default: `rate`).
fn rate_limits_json(policies: &[RateLimitPolicy]) -> String {
    let policies: Vec<serde_json::Value> = policies
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "key": p.key,
                "rate": p.rate,
                "period": p.period,
                "burst": p.burst.unwrap_or(p.rate),
            })
        })
        .collect();
    serde_json::Value::Array(policies).to_string()
}

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
    if matches!(component, Component::Gateway | Component::WsHub)
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

fn config_map(stack: &ValidatedStack, component: Component) -> ConfigMap {
    ConfigMap {
        metadata: metadata(stack, component),
        data: Some(settings(stack, component)),
        ..ConfigMap::default()
    }
}

/// The fingerprint of the ConfigMap's data (keys and values, in order).
fn config_hash(config_map: &ConfigMap) -> String {
    fingerprint(
        config_map
            .data
            .iter()
            .flatten()
            .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()]),
    )
}

fn image(stack: &ValidatedStack, component: Component) -> (String, String) {
    let defaults = &stack.spec().image;
    let overrides = component
        .spec(&stack.spec().services)
        .image
        .clone()
        .unwrap_or_default();
    let registry = overrides.registry.as_deref().unwrap_or(&defaults.registry);
    let tag = overrides.tag.as_deref().unwrap_or(&defaults.tag);
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
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn deployment(stack: &ValidatedStack, component: Component, config_map: &ConfigMap) -> Deployment {
    let spec = component.spec(&stack.spec().services);
    let (image, image_pull_policy) = image(stack, component);
    let mut annotations = spec.annotations.clone();
    annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash(config_map));
    let container = Container {
        name: component.name().to_owned(),
        image: Some(image),
        image_pull_policy: Some(image_pull_policy),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: component.port(),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
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
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Deployment {
        metadata: metadata(stack, component),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
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
                    volumes: Some(vec![Volume {
                        name: "tmp".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

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

fn service(stack: &ValidatedStack, component: Component) -> Service {
    Service {
        metadata: metadata(stack, component),
        spec: Some(CoreServiceSpec {
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
            ..CoreServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pod_disruption_budget(stack: &ValidatedStack, component: Component) -> PodDisruptionBudget {
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

#[cfg(test)]
mod tests;
