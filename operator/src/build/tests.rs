use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, EnvVar, Probe, ServiceSpec as CoreServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::fixtures;

fn example() -> DesiredState {
    build(
        &fixtures::validated(&fixtures::example()),
        Scraping::Annotations,
    )
}

fn objects(state: &DesiredState, component: Component) -> &ServiceObjects {
    state
        .service(component)
        .unwrap_or_else(|| panic!("{} was not built", component.name()))
}

fn pod(objects: &ServiceObjects) -> &k8s_openapi::api::core::v1::PodSpec {
    objects
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn container(objects: &ServiceObjects) -> &Container {
    let pod = pod(objects);
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

/// Every variable a container gets: the ConfigMap's keys (through `envFrom`) and `env`.
fn env_names(objects: &ServiceObjects) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = objects
        .config_map
        .data
        .as_ref()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.extend(
        container(objects)
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone()),
    );
    names
}

fn env_var<'a>(objects: &'a ServiceObjects, name: &str) -> Option<&'a EnvVar> {
    container(objects)
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
}

fn setting<'a>(objects: &'a ServiceObjects, name: &str) -> Option<&'a str> {
    objects
        .config_map
        .data
        .as_ref()
        .unwrap()
        .get(name)
        .map(String::as_str)
}

#[test]
fn every_enabled_service_gets_a_config_map_deployment_and_service_named_after_the_stack() {
    let state = example();
    let built: Vec<Component> = state.services.iter().map(|s| s.component).collect();
    assert_eq!(built, Component::ALL);
    for objects in &state.services {
        let name = format!("demo-{}", objects.component.name());
        assert_eq!(
            objects.deployment.metadata.name.as_deref(),
            Some(name.as_str())
        );
        assert_eq!(
            objects.service.metadata.name.as_deref(),
            Some(name.as_str())
        );
        assert_eq!(
            objects.config_map.metadata.name.as_deref(),
            Some(name.as_str())
        );
        assert_eq!(
            objects.deployment.metadata.namespace.as_deref(),
            Some("demo-ns")
        );
    }
}

#[test]
fn disabled_services_get_no_objects_at_all() {
    let state = build(
        &fixtures::validated(&fixtures::stack(fixtures::EDGE_DISABLED)),
        Scraping::Annotations,
    );
    assert!(state.service(Component::Gateway).is_none());
    assert!(state.service(Component::WsHub).is_none());
    assert_eq!(state.services.len(), 3);
}

#[test]
fn probes_hit_health_and_ready_on_the_ops_port_and_clients_the_http_port() {
    let cases = [
        (Component::Gateway, 8080),
        (Component::CommandService, 8082),
        (Component::Processor, 8083),
        (Component::CacheUpdater, 8084),
        (Component::WsHub, 8085),
    ];
    let state = example();
    for (component, port) in cases {
        let objects = objects(&state, component);
        let container = container(objects);
        let ports = container.ports.as_ref().unwrap();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].container_port),
            (Some("http"), port)
        );
        assert_eq!(
            (ports[1].name.as_deref(), ports[1].container_port),
            (Some("ops"), OPS_PORT)
        );
        let probe = |p: &Option<Probe>| {
            let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
            (get.path.clone().unwrap(), get.port.clone())
        };
        let http = IntOrString::String("http".to_owned());
        let ops = IntOrString::String("ops".to_owned());
        assert_eq!(
            probe(&container.liveness_probe),
            ("/health".to_owned(), ops.clone())
        );
        assert_eq!(
            probe(&container.readiness_probe),
            ("/ready".to_owned(), ops)
        );
        let service_port = &objects
            .service
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            (service_port.port, service_port.target_port.clone()),
            (port, Some(http))
        );
        assert_eq!(setting(objects, "PORT"), Some(port.to_string().as_str()));
        // The Service exposes the client port only: readiness and metrics stay off it.
        assert_eq!(setting(objects, "OPS_PORT"), Some("9090"));
    }
}

#[test]
fn each_service_gets_exactly_the_architecture_variables_it_uses() {
    let common = [
        "PORT",
        "OPS_PORT",
        "BIND_ADDRESS",
        "LOG_FORMAT",
        "RUST_LOG",
        "SHUTDOWN_GRACE_SECONDS",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_SAMPLER_ARG",
    ];
    let kafka = ["KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC_PREFIX"];
    let redis = ["REDIS_URL", "REDIS_KEY_PREFIX"];
    let postgres = ["DATABASE_URL"];
    let jwt = ["JWT_SECRET", "JWT_ISSUER", "JWT_AUDIENCE"];
    let gateway = [
        "GATEWAY_COMMAND_SERVICE_URL",
        "GATEWAY_HUB_URL",
        "GATEWAY_RATE_LIMITS",
    ];
    let cases: [(Component, Vec<&str>); 5] = [
        (Component::Gateway, [&redis[..], &jwt, &gateway].concat()),
        (
            Component::CommandService,
            [&kafka[..], &postgres, &jwt].concat(),
        ),
        // The example sets RUST_LOG on the processor; it overrides, it does not add a name.
        (Component::Processor, [&kafka[..], &postgres].concat()),
        (Component::CacheUpdater, [&kafka[..], &redis].concat()),
        (Component::WsHub, [&redis[..], &jwt].concat()),
    ];
    let state = example();
    for (component, specific) in cases {
        let expected: BTreeSet<String> = common
            .iter()
            .chain(&specific)
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            env_names(objects(&state, component)),
            expected,
            "{}",
            component.name()
        );
    }
}

#[test]
fn settings_carry_the_specs_values_and_the_derived_prefixes() {
    let state = example();
    let processor = objects(&state, Component::Processor);
    assert_eq!(setting(processor, "LOG_FORMAT"), Some("json"));
    assert_eq!(
        setting(processor, "KAFKA_BOOTSTRAP_SERVERS"),
        Some("127.0.0.1:9092")
    );
    assert_eq!(
        setting(processor, "KAFKA_TOPIC_PREFIX"),
        Some("demo-ns.demo.")
    );
    assert_eq!(setting(processor, "OTEL_SERVICE_NAME"), Some("processor"));
    assert_eq!(setting(processor, "OTEL_TRACES_SAMPLER_ARG"), Some("0.25"));
    assert_eq!(setting(processor, "OTEL_EXPORTER_OTLP_ENDPOINT"), None);
    let hub = objects(&state, Component::WsHub);
    assert_eq!(
        setting(hub, "REDIS_KEY_PREFIX"),
        Some("meridian:demo-ns:demo:")
    );
    let gateway = objects(&state, Component::Gateway);
    assert_eq!(
        setting(gateway, "GATEWAY_COMMAND_SERVICE_URL"),
        Some("http://demo-command-service.demo-ns.svc:8082")
    );
    assert_eq!(
        setting(gateway, "GATEWAY_HUB_URL"),
        Some("http://demo-ws-hub.demo-ns.svc:8085")
    );
    for edge in [gateway, hub, objects(&state, Component::CommandService)] {
        assert_eq!(
            setting(edge, "JWT_ISSUER"),
            Some("https://auth.example.invalid/")
        );
        assert_eq!(setting(edge, "JWT_AUDIENCE"), Some("meridian"));
    }
    let limits: serde_json::Value =
        serde_json::from_str(setting(gateway, "GATEWAY_RATE_LIMITS").unwrap()).unwrap();
    assert_eq!(
        limits,
        serde_json::json!([
            { "name": "per-user", "key": "user", "rate": 50, "period": "Second", "burst": 100 },
            { "name": "per-ip", "key": "ip", "rate": 600, "period": "Minute", "burst": 600 },
        ])
    );

    let core_only = build(
        &fixtures::validated(&fixtures::stack(fixtures::EDGE_DISABLED)),
        Scraping::Annotations,
    );
    let updater = objects(&core_only, Component::CacheUpdater);
    assert_eq!(
        setting(updater, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://otel-collector.observability:4318")
    );
    assert_eq!(setting(updater, "OTEL_TRACES_SAMPLER_ARG"), Some("0.1"));
}

#[test]
fn connection_urls_and_the_jwt_secret_come_from_secret_refs_never_from_the_config_map() {
    let state = example();
    let cases = [
        (
            Component::CommandService,
            "DATABASE_URL",
            "demo-postgres",
            "url",
        ),
        (Component::Processor, "DATABASE_URL", "demo-postgres", "url"),
        (Component::Gateway, "REDIS_URL", "demo-redis", "url"),
        (Component::CacheUpdater, "REDIS_URL", "demo-redis", "url"),
        (Component::WsHub, "REDIS_URL", "demo-redis", "url"),
        (
            Component::Gateway,
            "JWT_SECRET",
            "meridian-jwt",
            "hmac-secret",
        ),
        (
            Component::WsHub,
            "JWT_SECRET",
            "meridian-jwt",
            "hmac-secret",
        ),
        (
            Component::CommandService,
            "JWT_SECRET",
            "meridian-jwt",
            "hmac-secret",
        ),
    ];
    for (component, var, secret, key) in cases {
        let objects = objects(&state, component);
        let env = env_var(objects, var).unwrap_or_else(|| panic!("{var} missing"));
        assert_eq!(env.value, None, "{var} must not be a literal");
        let selector = env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str()),
            (secret, key),
            "{var}"
        );
        assert_eq!(
            setting(objects, var),
            None,
            "{var} leaked into the ConfigMap"
        );
    }
}

#[test]
fn a_jwks_issuer_is_a_plain_setting_and_no_secret_is_referenced() {
    let mut stack = fixtures::example();
    let auth = stack.spec.auth.as_mut().unwrap();
    auth.jwt_secret_ref = None;
    auth.jwks_url = Some("https://auth.example.invalid/jwks.json".to_owned());
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let gateway = objects(&state, Component::Gateway);
    for edge in [
        gateway,
        objects(&state, Component::WsHub),
        objects(&state, Component::CommandService),
    ] {
        assert_eq!(
            setting(edge, "JWT_JWKS_URL"),
            Some("https://auth.example.invalid/jwks.json")
        );
        assert!(env_var(edge, "JWT_SECRET").is_none());
    }
}

#[test]
fn containers_run_as_non_root_with_a_read_only_root_filesystem_and_no_capabilities() {
    for objects in &example().services {
        let pod = objects
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let pod_security = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(pod_security.run_as_user, Some(RUN_AS));
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let security = container(objects).security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        // A writable /tmp, since the root filesystem is not.
        assert_eq!(
            container(objects).volume_mounts.as_ref().unwrap()[0].mount_path,
            "/tmp"
        );
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(SHUTDOWN_GRACE_SECONDS + 5)
        );
    }
}

#[test]
fn every_object_has_the_standard_labels_and_a_controller_owner_reference_to_the_stack() {
    let stack = fixtures::example();
    for objects in &example().services {
        let mut metas = vec![
            &objects.config_map.metadata,
            &objects.deployment.metadata,
            &objects.service.metadata,
        ];
        metas.extend(objects.pod_disruption_budget.as_ref().map(|p| &p.metadata));
        let tier = match objects.component.tier() {
            Tier::Core => "core",
            Tier::Edge => "edge",
        };
        let expected = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                objects.component.name().to_owned(),
            ),
            ("app.kubernetes.io/instance".to_owned(), "demo".to_owned()),
            ("app.kubernetes.io/component".to_owned(), tier.to_owned()),
            (
                "app.kubernetes.io/part-of".to_owned(),
                "meridian".to_owned(),
            ),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "meridian-operator".to_owned(),
            ),
        ]);
        for meta in metas {
            assert_eq!(meta.labels.as_ref(), Some(&expected));
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "MiddlewareStack");
            assert_eq!(Some(&owners[0].uid), stack.metadata.uid.as_ref());
            assert_eq!(owners[0].controller, Some(true));
        }
        // The selector is the stable subset; the pods carry every label.
        let spec = objects.deployment.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector.len(), 2);
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(pod_labels, &expected);
        assert_eq!(
            objects.service.spec.as_ref().unwrap().selector.as_ref(),
            Some(selector)
        );
    }
}

#[test]
fn a_pod_disruption_budget_exists_only_above_one_replica() {
    let cases = [(0, false), (1, false), (2, true), (5, true)];
    for (replicas, expected) in cases {
        let mut stack = fixtures::example();
        stack.spec.services.processor.replicas = replicas;
        let state = build(&fixtures::validated(&stack), Scraping::Annotations);
        let processor = objects(&state, Component::Processor);
        assert_eq!(
            processor.deployment.spec.as_ref().unwrap().replicas,
            Some(replicas)
        );
        let pdb = processor.pod_disruption_budget.as_ref();
        assert_eq!(pdb.is_some(), expected, "{replicas} replicas");
        if let Some(pdb) = pdb {
            let spec = pdb.spec.as_ref().unwrap();
            assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
            assert_eq!(
                spec.selector.as_ref().unwrap().match_labels,
                processor
                    .deployment
                    .spec
                    .as_ref()
                    .unwrap()
                    .selector
                    .match_labels
            );
        }
    }
}

#[test]
fn image_overrides_replace_only_the_fields_they_set() {
    let state = build(
        &fixtures::validated(&fixtures::stack(fixtures::EDGE_DISABLED)),
        Scraping::Annotations,
    );
    let cases = [
        (
            Component::CommandService,
            "registry.invalid/meridian/command-service:0.2.0",
            "Always",
        ),
        (
            Component::CacheUpdater,
            "mirror.invalid/meridian/cache-updater:0.2.0",
            "Never",
        ),
    ];
    for (component, image, policy) in cases {
        let container = container(objects(&state, component));
        assert_eq!(container.image.as_deref(), Some(image));
        assert_eq!(container.image_pull_policy.as_deref(), Some(policy));
    }
}

#[test]
fn extra_env_replaces_the_operators_variable_of_the_same_name_without_duplicates() {
    let mut stack = fixtures::example();
    stack.spec.services.command_service.env = vec![
        EnvVar {
            name: "DATABASE_URL".to_owned(),
            value: Some("postgres://elsewhere/db".to_owned()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "COMMANDS_BATCH_SIZE".to_owned(),
            value: Some("100".to_owned()),
            ..EnvVar::default()
        },
    ];
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let env = container(objects(&state, Component::CommandService))
        .env
        .clone()
        .unwrap();
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["DATABASE_URL", "JWT_SECRET", "COMMANDS_BATCH_SIZE"]);
    assert_eq!(env[0].value.as_deref(), Some("postgres://elsewhere/db"));
    assert_eq!(env[0].value_from, None);

    // A ConfigMap variable named again in `env` wins through Kubernetes' precedence.
    let processor = container(objects(&state, Component::Processor));
    let rust_log = processor
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "RUST_LOG")
        .unwrap();
    assert_eq!(rust_log.value.as_deref(), Some("info,processor=debug"));
}

#[test]
fn resources_and_annotations_pass_through_to_the_pod() {
    let state = example();
    let gateway = objects(&state, Component::Gateway);
    let resources = container(gateway).resources.as_ref().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "100m");
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "128Mi");
    let template = gateway
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap();
    let annotations = template.annotations.as_ref().unwrap();
    assert_eq!(annotations["example.com/owner"], "storefront-team");
    assert!(annotations.contains_key(CONFIG_HASH_ANNOTATION));
}

#[test]
fn the_same_spec_always_builds_identical_objects() {
    assert_eq!(example(), example());
    let minimal = fixtures::validated(&fixtures::stack(fixtures::MINIMAL));
    assert_eq!(
        build(&minimal, Scraping::Annotations),
        build(&minimal, Scraping::Annotations)
    );
}

#[test]
fn a_settings_change_changes_the_config_hash_so_pods_roll() {
    let hash = |state: &DesiredState, component| {
        let template = objects(state, component)
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .clone();
        template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone()
    };
    let before = example();
    let mut stack = fixtures::example();
    stack.spec.telemetry.sampling_ratio = 0.5;
    stack.spec.kafka.bootstrap_servers = "kafka-0:9092".to_owned();
    let after = build(&fixtures::validated(&stack), Scraping::Annotations);
    assert_ne!(
        hash(&before, Component::Processor),
        hash(&after, Component::Processor)
    );
    // Replicas are not a setting: scaling does not roll the pods.
    let mut scaled = fixtures::example();
    scaled.spec.services.processor.replicas = 4;
    let scaled = build(&fixtures::validated(&scaled), Scraping::Annotations);
    assert_eq!(
        hash(&before, Component::Processor),
        hash(&scaled, Component::Processor)
    );
}

#[test]
fn the_minimal_fixture_builds_every_service_with_defaults() {
    let state = build(
        &fixtures::validated(&fixtures::stack(fixtures::MINIMAL)),
        Scraping::Annotations,
    );
    assert_eq!(state.services.len(), 5);
    for objects in &state.services {
        let spec = objects.deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert!(objects.pod_disruption_budget.is_none());
        let container = container(objects);
        assert_eq!(
            container.image.as_deref(),
            Some(
                format!(
                    "registry.invalid/meridian/{}:0.1.0",
                    objects.component.name()
                )
                .as_str()
            )
        );
        assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(container.resources, None);
    }
    let gateway = objects(&state, Component::Gateway);
    assert_eq!(setting(gateway, "GATEWAY_RATE_LIMITS"), None);
    assert!(env_var(gateway, "JWT_SECRET").is_none());
}

#[test]
fn the_cache_updater_keeps_as_much_room_history_as_the_hub_resumes_from() {
    let mut stack = fixtures::example();
    let plain = |name: &str, value: &str| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    };
    let defaults = settings(&fixtures::validated(&stack), Component::CacheUpdater);
    assert!(!defaults.contains_key("CACHE_ROOM_HISTORY_SIZE"));
    assert!(!defaults.contains_key("CACHE_ROOM_HISTORY_TTL_SECONDS"));

    stack.spec.services.hub.env = vec![
        plain("HUB_HISTORY_SIZE", "500"),
        plain("HUB_HISTORY_TTL_SECONDS", "900"),
    ];
    let cache = settings(&fixtures::validated(&stack), Component::CacheUpdater);
    assert_eq!(cache["CACHE_ROOM_HISTORY_SIZE"], "500");
    assert_eq!(cache["CACHE_ROOM_HISTORY_TTL_SECONDS"], "900");
    let hub = settings(&fixtures::validated(&stack), Component::WsHub);
    assert!(!hub.contains_key("CACHE_ROOM_HISTORY_SIZE"));

    // The cache updater's own `env` still wins (it comes after the ConfigMap).
    stack.spec.services.cache_updater.env = vec![plain("CACHE_ROOM_HISTORY_SIZE", "50")];
    let env = container(objects(
        &build(&fixtures::validated(&stack), Scraping::Annotations),
        Component::CacheUpdater,
    ))
    .env
    .clone()
    .unwrap();
    let own = env
        .iter()
        .find(|e| e.name == "CACHE_ROOM_HISTORY_SIZE")
        .unwrap();
    assert_eq!(own.value.as_deref(), Some("50"));
}

#[test]
fn only_services_that_clients_call_get_a_virtual_ip() {
    let cases = [
        (Component::Gateway, true),
        (Component::CommandService, true),
        (Component::WsHub, true),
        (Component::Processor, false),
        (Component::CacheUpdater, false),
    ];
    let state = example();
    for (component, virtual_ip) in cases {
        let spec = objects(&state, component).service.spec.clone().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"), "{component:?}");
        let expected = if virtual_ip { None } else { Some("None") };
        assert_eq!(spec.cluster_ip.as_deref(), expected, "{component:?}");
        assert_eq!(component.has_virtual_ip(), virtual_ip, "{component:?}");
    }
}

#[test]
fn a_service_is_recreated_only_when_it_turns_headless_or_gets_a_virtual_ip() {
    let with_cluster_ip = |ip: Option<&str>| Service {
        spec: Some(CoreServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            cluster_ip: ip.map(str::to_owned),
            ..CoreServiceSpec::default()
        }),
        ..Service::default()
    };
    // (existing clusterIP, desired clusterIP, recreate)
    let cases = [
        (Some("10.96.0.17"), Some("None"), true),
        (Some("None"), None, true),
        (Some("10.96.0.17"), None, false),
        (Some("None"), Some("None"), false),
        // Not set yet in the store's copy: applied in place like any other change.
        (None, None, false),
    ];
    for (existing, desired, recreate) in cases {
        assert_eq!(
            service_needs_recreate(existing, &with_cluster_ip(desired)),
            recreate,
            "{existing:?} -> {desired:?}"
        );
    }
}

#[test]
fn the_endpoints_config_map_gives_applications_the_urls_and_token_settings() {
    let stack = fixtures::example();
    let endpoints = example().endpoints;
    assert_eq!(
        endpoints.metadata.name.as_deref(),
        Some(format!("{}-endpoints", stack.metadata.name.as_deref().unwrap()).as_str())
    );
    assert_eq!(
        endpoints.metadata.owner_references.as_ref().unwrap().len(),
        1
    );
    let data = endpoints.data.unwrap();
    let namespace = stack.metadata.namespace.as_deref().unwrap();
    assert_eq!(
        data["GATEWAY_URL"],
        format!("http://demo-api-gateway.{namespace}.svc:8080")
    );
    assert_eq!(
        data["HUB_URL"],
        format!("ws://demo-ws-hub.{namespace}.svc:8085/ws")
    );
    let auth = stack.spec.auth.as_ref().unwrap();
    assert_eq!(data["JWT_ISSUER"], auth.issuer);
    assert_eq!(data["JWT_AUDIENCE"], auth.audience);
    assert_eq!(data["DOCUMENT_ROOM"], "doc:{collection}:{id}");

    // Without the edge services there is nothing to call: no URL.
    let core_only = build(
        &fixtures::validated(&fixtures::stack(fixtures::EDGE_DISABLED)),
        Scraping::Annotations,
    );
    let data = core_only.endpoints.data.unwrap();
    assert!(!data.contains_key("GATEWAY_URL") && !data.contains_key("HUB_URL"));
}

#[test]
fn without_spec_image_the_services_run_the_images_of_the_operators_release() {
    let release = env!("CARGO_PKG_VERSION");
    let mut stack = fixtures::example();
    stack.spec.image = crate::crd::ImageSpec::default();
    let cases = [
        (None, "ghcr.io/meridian-dev/meridian"),
        // A registry alone keeps the release's tag.
        (Some("mirror.example/meridian"), "mirror.example/meridian"),
    ];
    for (registry, expected) in cases {
        stack.spec.image.registry = registry.map(str::to_owned);
        let state = build(&fixtures::validated(&stack), Scraping::Annotations);
        let processor = container(objects(&state, Component::Processor));
        assert_eq!(
            processor.image.as_deref(),
            Some(format!("{expected}/processor:{release}").as_str())
        );
    }
}

fn pod_template(objects: &ServiceObjects) -> &ObjectMeta {
    objects
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
}

#[test]
fn without_a_pod_monitor_every_pod_carries_the_scrape_annotations_of_its_ops_port() {
    let minimal = fixtures::validated(&fixtures::stack(fixtures::MINIMAL));
    let state = build(&minimal, Scraping::Annotations);
    assert_eq!(state.services.len(), Component::ALL.len());
    for objects in &state.services {
        let annotations = pod_template(objects).annotations.as_ref().unwrap();
        let name = objects.component.name();
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(annotations["prometheus.io/port"], "9090", "{name}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{name}");
    }
}

#[test]
fn a_users_scrape_annotation_wins_over_the_generated_one() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack
        .spec
        .services
        .gateway
        .annotations
        .insert("prometheus.io/scrape".to_owned(), "false".to_owned());
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let annotations = pod_template(objects(&state, Component::Gateway))
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "false");
}

#[test]
fn with_a_pod_monitor_one_monitor_selects_every_pod_and_no_pod_is_annotated() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack
        .spec
        .monitoring
        .pod_monitor_labels
        .insert("release".to_owned(), "kube-prometheus".to_owned());
    let validated = fixtures::validated(&stack);
    let state = build(&validated, Scraping::PodMonitor);
    let monitor = pod_monitor(&validated);
    assert_eq!(monitor.types.as_ref().unwrap().kind, "PodMonitor");
    assert_eq!(
        monitor.types.as_ref().unwrap().api_version,
        "monitoring.coreos.com/v1"
    );
    assert_eq!(monitor.metadata.name.as_deref(), Some("mini"));
    assert_eq!(monitor.metadata.namespace.as_deref(), Some("team-a"));
    assert_eq!(
        monitor.metadata.owner_references.as_ref().unwrap()[0].kind,
        "MiddlewareStack"
    );
    let labels = monitor.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["release"], "kube-prometheus");
    assert_eq!(labels["app.kubernetes.io/managed-by"], MANAGED_BY);

    let spec = &monitor.data["spec"];
    let selector = spec["selector"]["matchLabels"].as_object().unwrap();
    let endpoint = &spec["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    for objects in &state.services {
        let name = objects.component.name();
        let template = pod_template(objects);
        let pod_labels = template.labels.as_ref().unwrap();
        for (key, value) in selector {
            assert_eq!(
                Some(pod_labels[key].as_str()),
                value.as_str(),
                "{name}: {key}"
            );
        }
        let port = &container(objects).ports.as_ref().unwrap()[1];
        assert_eq!(endpoint["port"], port.name.as_deref().unwrap(), "{name}");
        assert_eq!(port.container_port, OPS_PORT, "{name}");
        assert!(
            template
                .annotations
                .as_ref()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("prometheus.io/")),
            "{name} is annotated for scraping as well"
        );
    }
}

#[test]
fn a_pod_monitor_is_chosen_when_the_cluster_has_its_crd_unless_turned_off() {
    use crate::crd::MonitoringSpec;
    let spec = |pod_monitor| MonitoringSpec {
        pod_monitor,
        ..MonitoringSpec::default()
    };
    for (wanted, crd, chosen) in [
        (None, true, Scraping::PodMonitor),
        (None, false, Scraping::Annotations),
        (Some(true), true, Scraping::PodMonitor),
        (Some(true), false, Scraping::Annotations),
        (Some(false), true, Scraping::Annotations),
        (Some(false), false, Scraping::Annotations),
    ] {
        assert_eq!(
            Scraping::choose(&spec(wanted), crd),
            chosen,
            "{wanted:?}, CRD {crd}"
        );
    }
}

#[test]
fn an_autoscaled_service_gets_an_autoscaler_and_leaves_replicas_to_it() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack.spec.services.gateway.replicas = 1;
    stack.spec.services.gateway.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 6,
        target_cpu_utilization_percentage: 60,
        target_lag_per_replica: None,
        target_connections_per_replica: None,
        scale_down_delay_seconds: None,
    });
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let gateway = objects(&state, Component::Gateway);
    assert_eq!(gateway.deployment.spec.as_ref().unwrap().replicas, None);
    let serialized = serde_json::to_value(&gateway.deployment).unwrap();
    assert!(
        serialized["spec"].get("replicas").is_none(),
        "replicas would be applied: {serialized}"
    );
    let autoscaler = gateway.autoscaler.as_ref().unwrap();
    assert_eq!(
        autoscaler.metadata.name.as_deref(),
        Some("mini-api-gateway")
    );
    assert!(autoscaler.metadata.owner_references.is_some());
    let spec = autoscaler.spec.as_ref().unwrap();
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    assert_eq!(spec.scale_target_ref.name, "mini-api-gateway");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 6));
    let metric = &spec.metrics.as_ref().unwrap()[0];
    let resource = metric.resource.as_ref().unwrap();
    assert_eq!(resource.name, "cpu");
    assert_eq!(resource.target.average_utilization, Some(60));
    // It never scales below two: one pod at a time may be disrupted.
    assert!(gateway.pod_disruption_budget.is_some());

    // The others keep their fixed count and get no autoscaler.
    let processor = objects(&state, Component::Processor);
    assert!(processor.autoscaler.is_none());
    assert_eq!(
        processor.deployment.spec.as_ref().unwrap().replicas,
        Some(stack.spec.services.processor.replicas)
    );
}

#[test]
fn the_network_policy_opens_the_internal_services_to_the_gateway_and_scrapers_only() {
    let state = example();
    let policy = state.network_policy.as_ref().unwrap();
    assert_eq!(policy.metadata.name.as_deref(), Some("demo-internal"));
    let spec = policy.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    let pods = spec.pod_selector.as_ref().unwrap();
    assert_eq!(
        pods.match_labels.as_ref().unwrap()["app.kubernetes.io/instance"],
        "demo"
    );
    let names = pods.match_expressions.as_ref().unwrap()[0].values.clone();
    // Neither the gateway nor the hub: they are the stack's entry points.
    assert_eq!(
        names.unwrap(),
        ["command-service", "processor", "cache-updater"]
    );
    let ingress = spec.ingress.as_ref().unwrap();
    let gateway = &ingress[0];
    assert_eq!(
        gateway.from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels,
        Some(selector_labels(
            &fixtures::validated(&fixtures::example()),
            Component::Gateway
        ))
    );
    let ports = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        rule.ports
            .iter()
            .flatten()
            .map(|p| p.port.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ports(gateway), [IntOrString::Int(8082)]);
    let scrapers = &ingress[1];
    assert_eq!(ports(scrapers), [IntOrString::Int(9090)]);
    let prometheus = &scrapers.from.as_ref().unwrap()[0];
    assert!(prometheus.namespace_selector.is_some(), "any namespace");

    // Custom scrapers replace the default; none leaves only the gateway's rule.
    let mut stack = fixtures::example();
    stack.spec.network_policy.scrapers = Some(Vec::new());
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let spec = state.network_policy.unwrap().spec.unwrap();
    assert_eq!(spec.ingress.unwrap().len(), 1);
    stack.spec.network_policy.enabled = false;
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    assert!(state.network_policy.is_none());
}

#[test]
fn the_rebuild_job_runs_the_cache_updaters_pod_once_with_rebuild() {
    let mut stack = fixtures::example();
    stack.metadata.uid = Some("7d5c0c44-0000-4000-8000-000000000001".into());
    let state = example();
    let updater = objects(&state, Component::CacheUpdater);
    let job = rebuild_job(&stack, &updater.deployment, "1700000000").unwrap();

    assert_eq!(
        job.metadata.name,
        Some(format!(
            "{}-rebuild-1700000000",
            stack.metadata.name.clone().unwrap()
        ))
    );
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("MiddlewareStack", "7d5c0c44-0000-4000-8000-000000000001")
    );
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.ttl_seconds_after_finished, Some(REBUILD_TTL_SECONDS));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let (rebuild, original) = (&pod.containers[0], container(updater));
    assert_eq!(rebuild.args, Some(vec!["rebuild".to_owned()]));
    assert_eq!(
        (
            &rebuild.image,
            &rebuild.env,
            &rebuild.env_from,
            &rebuild.security_context
        ),
        (
            &original.image,
            &original.env,
            &original.env_from,
            &original.security_context
        ),
        "the same image, environment, Secrets and security context"
    );
    assert!(original.readiness_probe.is_some() && original.ports.is_some());
    assert!(rebuild.liveness_probe.is_none() && rebuild.readiness_probe.is_none());
    assert!(rebuild.ports.is_none());

    // Not one of the cache updater's pods for its Deployment, Service or budget.
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    let selector = updater
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone()
        .unwrap();
    assert!(
        selector
            .iter()
            .any(|(key, value)| labels.get(key) != Some(value)),
        "the Job's pod {labels:?} matches the Deployment's selector {selector:?}"
    );
    assert_eq!(labels["app.kubernetes.io/name"], REBUILD_NAME);
}

#[test]
fn the_replay_job_runs_the_processors_pod_once_with_replay_dlq() {
    let stack = fixtures::example();
    let state = example();
    let processor = objects(&state, Component::Processor);
    let job = task_job(
        &stack,
        &processor.deployment,
        Task::ReplayDeadLetters { max: 50 },
        "1700000000",
    )
    .unwrap();
    assert_eq!(
        job.metadata.name,
        Some(format!(
            "{}-dlq-replay-1700000000",
            stack.metadata.name.clone().unwrap()
        ))
    );
    let spec = job.spec.unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let (replay, original) = (&pod.containers[0], container(processor));
    assert_eq!(
        replay.args,
        Some(vec![
            "replay-dlq".to_owned(),
            "--max".to_owned(),
            "50".to_owned()
        ])
    );
    assert_eq!(
        (&replay.image, &replay.env),
        (&original.image, &original.env)
    );
    assert!(replay.readiness_probe.is_none() && replay.ports.is_none());
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["app.kubernetes.io/name"], REPLAY_NAME);
    assert_eq!(
        Task::ReplayDeadLetters { max: 1 }.service(),
        Component::Processor
    );
}

#[test]
fn a_consumer_scaled_on_lag_gets_the_operators_count_and_no_autoscaler() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack.spec.kafka.topics.commands.partitions = 8;
    stack.spec.services.processor.replicas = 5;
    stack.spec.services.processor.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 6,
        target_cpu_utilization_percentage: 70,
        target_lag_per_replica: Some(250),
        target_connections_per_replica: None,
        scale_down_delay_seconds: Some(60),
    });
    let validated = fixtures::validated(&stack);
    let state = build(&validated, Scraping::Annotations);
    let processor = objects(&state, Component::Processor);
    // No HPA: the operator scales it, starting from the minimum (not `replicas`).
    assert!(processor.autoscaler.is_none());
    assert_eq!(
        processor.deployment.spec.as_ref().unwrap().replicas,
        Some(2)
    );
    assert!(processor.pod_disruption_budget.is_some());
    let policy = lag_policy(&validated, Component::Processor).unwrap();
    assert_eq!(
        policy,
        crate::scaling::LagPolicy {
            min: 2,
            max: 6,
            partitions: 8,
            target_lag_per_replica: 250,
            scale_down_delay: std::time::Duration::from_secs(60),
        }
    );
    assert_eq!(lag_policy(&validated, Component::CacheUpdater), None);
    assert_eq!(lag_policy(&validated, Component::Gateway), None);
    assert_eq!(
        consumer_group(&validated, Component::Processor).as_deref(),
        Some("team-a.mini.processor")
    );
    assert_eq!(
        consumer_group(&validated, Component::CacheUpdater).as_deref(),
        Some("team-a.mini.cache-updater")
    );
    assert_eq!(consumer_group(&validated, Component::WsHub), None);

    // The decided count lands on the Deployment; a foreign autoscaler's target loses its count.
    let replicas = Replicas {
        decided: BTreeMap::from([(Component::Processor, 4)]),
        external: BTreeSet::from([Component::WsHub]),
    };
    let state = with_replicas(state, &replicas);
    let count = |c| {
        objects(&state, c)
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .replicas
    };
    assert_eq!(count(Component::Processor), Some(4));
    assert_eq!(count(Component::WsHub), None);
    assert_eq!(count(Component::CacheUpdater), Some(1));
    let hub = serde_json::to_value(&objects(&state, Component::WsHub).deployment).unwrap();
    assert!(hub["spec"].get("replicas").is_none(), "{hub}");
}

#[test]
fn a_consumer_group_set_in_env_is_the_one_scaled_on() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack.spec.services.cache_updater.env = vec![EnvVar {
        name: "CACHE_CONSUMER_GROUP".to_owned(),
        value: Some("projections".to_owned()),
        ..EnvVar::default()
    }];
    let validated = fixtures::validated(&stack);
    assert_eq!(
        consumer_group(&validated, Component::CacheUpdater).as_deref(),
        Some("projections")
    );
}

#[test]
fn a_scale_down_delay_becomes_the_autoscalers_stabilization_window() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack.spec.services.hub.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 1,
        max_replicas: 3,
        target_cpu_utilization_percentage: 70,
        target_lag_per_replica: None,
        target_connections_per_replica: None,
        scale_down_delay_seconds: Some(600),
    });
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let hpa = objects(&state, Component::WsHub)
        .autoscaler
        .clone()
        .unwrap();
    let behavior = hpa.spec.unwrap().behavior.unwrap();
    assert_eq!(
        behavior.scale_down.unwrap().stabilization_window_seconds,
        Some(600)
    );
}

#[test]
fn the_hub_can_also_scale_on_its_connections() {
    let mut stack = fixtures::stack(fixtures::MINIMAL);
    stack.spec.services.hub.autoscaling = Some(crate::crd::AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 10,
        target_cpu_utilization_percentage: 70,
        target_lag_per_replica: None,
        target_connections_per_replica: Some(20_000),
        scale_down_delay_seconds: None,
    });
    let state = build(&fixtures::validated(&stack), Scraping::Annotations);
    let hpa = objects(&state, Component::WsHub)
        .autoscaler
        .clone()
        .unwrap();
    let metrics = hpa.spec.unwrap().metrics.unwrap();
    assert_eq!(metrics.len(), 2, "CPU and connections");
    let pods = metrics[1].pods.as_ref().unwrap();
    assert_eq!(pods.metric.name, "hub_connections");
    assert_eq!(pods.target.type_, "AverageValue");
    assert_eq!(pods.target.average_value.as_ref().unwrap().0, "20000");
    assert_eq!(metrics[0].resource.as_ref().unwrap().name, "cpu");
}

/// Where a service's pods mount a dependency's CA: the Secret and key of its volume, the file
/// the services read.
#[derive(Debug, PartialEq)]
struct CaMount {
    secret: String,
    key: String,
    file: String,
}

impl CaMount {
    fn new(secret: &str, key: &str, file: &str) -> Self {
        Self {
            secret: secret.to_owned(),
            key: key.to_owned(),
            file: file.to_owned(),
        }
    }
}

/// The CA volume of `ca` in `objects`' pods and its mount (read-only), if there is one.
fn ca_mount(objects: &ServiceObjects, ca: Ca) -> Option<CaMount> {
    let volume = pod(objects)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == ca.volume());
    let mount = container(objects)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == ca.volume());
    let (volume, mount) = match (volume, mount) {
        (None, None) => return None,
        (Some(volume), Some(mount)) => (volume, mount),
        _ => panic!(
            "{} has a volume without a mount or a mount without a volume",
            ca.volume()
        ),
    };
    assert_eq!(mount.read_only, Some(true), "{} is read-only", ca.volume());
    let secret = volume.secret.as_ref().expect("a Secret volume");
    let [item] = secret.items.as_deref().expect("one item") else {
        panic!("{} projects exactly one key", ca.volume());
    };
    Some(CaMount {
        secret: secret.secret_name.clone().expect("a Secret name"),
        key: item.key.clone(),
        file: format!("{}/{}", mount.mount_path, item.path),
    })
}

#[test]
fn a_stack_principal_reaches_only_the_kafka_services_through_its_secret_and_the_ca_mount() {
    use crate::crd::{KafkaTls, SecretKeyRef, SecretRef};

    // Without an admin login the services connect as before: nothing about SASL or TLS.
    let plain = example();
    let processor = objects(&plain, Component::Processor);
    assert_eq!(setting(processor, "KAFKA_SECURITY_PROTOCOL"), None);
    assert!(env_var(processor, "KAFKA_SASL_PASSWORD").is_none());

    let mut stack = fixtures::example();
    stack.spec.kafka.admin_secret_ref = Some(SecretRef {
        name: "kafka-admin".into(),
    });
    let sasl = build(&fixtures::validated(&stack), Scraping::Annotations);
    for component in [
        Component::CommandService,
        Component::Processor,
        Component::CacheUpdater,
    ] {
        let service = objects(&sasl, component);
        assert_eq!(
            setting(service, "KAFKA_SECURITY_PROTOCOL"),
            Some("sasl_plaintext")
        );
        assert_eq!(
            setting(service, "KAFKA_SASL_MECHANISM"),
            Some("SCRAM-SHA-512")
        );
        for (variable, key) in [
            ("KAFKA_SASL_USERNAME", "username"),
            ("KAFKA_SASL_PASSWORD", "password"),
        ] {
            let reference = env_var(service, variable)
                .and_then(|v| v.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .unwrap_or_else(|| panic!("{variable} is not from a Secret"));
            assert_eq!(
                reference.name,
                format!("{}-kafka", stack.metadata.name.as_deref().unwrap())
            );
            assert_eq!(reference.key, key);
        }
        assert_eq!(setting(service, "KAFKA_SSL_CA_LOCATION"), None);
    }
    for component in [Component::Gateway, Component::WsHub] {
        let names = env_names(objects(&sasl, component));
        assert!(
            !names.iter().any(|n| n.starts_with("KAFKA_")),
            "{} got Kafka settings: {names:?}",
            component.name()
        );
    }

    stack.spec.kafka.tls = Some(KafkaTls {
        ca_secret_ref: Some(SecretKeyRef {
            name: "kafka-ca".into(),
            key: "ca.pem".into(),
        }),
    });
    let tls = build(&fixtures::validated(&stack), Scraping::Annotations);
    let processor = objects(&tls, Component::Processor);
    assert_eq!(
        setting(processor, "KAFKA_SECURITY_PROTOCOL"),
        Some("sasl_ssl")
    );
    assert_eq!(
        setting(processor, "KAFKA_SSL_CA_LOCATION"),
        Some("/etc/meridian/kafka/ca.crt")
    );
    assert_eq!(
        ca_mount(processor, Ca::Kafka),
        Some(CaMount::new(
            "kafka-ca",
            "ca.pem",
            "/etc/meridian/kafka/ca.crt"
        ))
    );
    // The services that do not talk to Kafka do not mount it.
    assert_eq!(ca_mount(objects(&tls, Component::Gateway), Ca::Kafka), None);

    // An explicit `None` keeps the admin login for the operator only.
    stack.spec.kafka.service_principal = Some(crate::crd::ServicePrincipal::None);
    let anonymous = build(&fixtures::validated(&stack), Scraping::Annotations);
    let processor = objects(&anonymous, Component::Processor);
    assert_eq!(setting(processor, "KAFKA_SECURITY_PROTOCOL"), Some("ssl"));
    assert!(env_var(processor, "KAFKA_SASL_USERNAME").is_none());
}

#[test]
fn redis_and_postgres_cas_reach_only_the_services_that_use_them_through_a_mount() {
    use crate::crd::{SecretKeyRef, SslMode};

    // Without CAs the pods mount nothing but `/tmp`.
    let plain = example();
    for component in Component::ALL {
        let service = objects(&plain, component);
        assert_eq!(pod(service).volumes.as_ref().map(Vec::len), Some(1));
        assert_eq!(setting(service, "REDIS_CA_FILE"), None);
    }

    let mut stack = fixtures::example();
    stack.spec.redis.url = "rediss://redis.demo-ns.svc:6380".into();
    stack.spec.redis.ca_secret_ref = Some(SecretKeyRef {
        name: "redis-ca".into(),
        key: "ca.pem".into(),
    });
    stack.spec.postgres.ssl_mode = SslMode::VerifyFull;
    stack.spec.postgres.ca_secret_ref = Some(SecretKeyRef {
        name: "postgres-ca".into(),
        key: "root.crt".into(),
    });
    let tls = build(&fixtures::validated(&stack), Scraping::Annotations);
    for component in Component::ALL {
        let service = objects(&tls, component);
        let redis = component
            .uses_redis()
            .then(|| CaMount::new("redis-ca", "ca.pem", "/etc/meridian/redis/ca.crt"));
        assert_eq!(ca_mount(service, Ca::Redis), redis, "{}", component.name());
        assert_eq!(
            setting(service, "REDIS_CA_FILE"),
            redis.as_ref().map(|m| m.file.as_str()),
            "{}",
            component.name()
        );
        // PostgreSQL's services find the CA through `sslrootcert` in their `DATABASE_URL`
        // (`provision::postgres::service_url`), not through a setting.
        let postgres = component
            .uses_postgres()
            .then(|| CaMount::new("postgres-ca", "root.crt", "/etc/meridian/postgres/ca.crt"));
        assert_eq!(
            ca_mount(service, Ca::Postgres),
            postgres,
            "{}",
            component.name()
        );
        assert_eq!(ca_mount(service, Ca::Kafka), None);
    }
}

#[test]
fn a_redis_cluster_reaches_the_services_that_use_redis_and_one_redis_changes_nothing() {
    // `cluster: false` (the default) adds no setting: the objects of stacks on one Redis are
    // those they always were, so their pods do not roll.
    let mut single = fixtures::example();
    single.spec.redis.cluster = false;
    let single = build(&fixtures::validated(&single), Scraping::Annotations);
    assert_eq!(single, example());
    for component in Component::ALL {
        assert_eq!(setting(objects(&single, component), "REDIS_CLUSTER"), None);
    }

    let mut stack = fixtures::example();
    stack.spec.redis.cluster = true;
    let cluster = build(&fixtures::validated(&stack), Scraping::Annotations);
    for component in Component::ALL {
        let service = objects(&cluster, component);
        let expected = component.uses_redis().then_some("true");
        assert_eq!(
            setting(service, "REDIS_CLUSTER"),
            expected,
            "{}",
            component.name()
        );
        // The rest of the Redis wiring is the same: one URL (a seed node) from the Secret,
        // the same key prefix.
        assert_eq!(
            setting(service, "REDIS_KEY_PREFIX"),
            setting(objects(&single, component), "REDIS_KEY_PREFIX")
        );
    }
}

#[test]
fn a_fingerprint_is_sixteen_hex_digits_of_its_number() {
    let parts = [b"stack".as_slice(), b"".as_slice()];
    // The digits the annotations and PostgreSQL names already carry must not change.
    assert_eq!(fingerprint(parts), "f2a1a9dae9aa25ac");
    let bits = fingerprint_bits(parts);
    assert_eq!(format!("{bits:016x}"), fingerprint(parts));
    assert_eq!(parse_fingerprint(&fingerprint(parts)), Some(bits));
    for not_one in [
        "abc",
        "",
        "0123456789ABCDEF",
        "0123456789abcdeg",
        "+123456789abcdef",
    ] {
        assert_eq!(parse_fingerprint(not_one), None, "{not_one:?}");
    }
}
