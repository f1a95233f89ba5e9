use kube::CustomResourceExt as _;
use serde_json::Value;

use super::*;

/// The storage version's `openAPIV3Schema` as JSON, for walking.
fn schema() -> Value {
    version_schema(VERSION)
}

/// A served version's `openAPIV3Schema` as JSON.
pub(crate) fn version_schema(name: &str) -> Value {
    let crd = crate::crd().unwrap();
    let version = crd.spec.versions.iter().find(|v| v.name == name).unwrap();
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap(),
    )
    .unwrap()
}

/// The schema at a dotted path of property names below the root.
fn at(path: &str) -> Value {
    let mut node = schema();
    for part in path.split('.') {
        node = node["properties"][part].clone();
        assert!(!node.is_null(), "no property {part} in {path}");
    }
    node
}

/// The messages of the CEL rules at a path.
fn messages(node: &Value) -> Vec<String> {
    node["x-kubernetes-validations"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| r["message"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_crd_is_namespaced_v1beta1_in_the_meridian_group_with_a_short_name() {
    let crd = MiddlewareStack::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("middlewarestacks.meridian.dev")
    );
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["mws".to_owned()]));
    assert_eq!(crd.spec.versions.len(), 1);
    assert_eq!(crd.spec.versions[0].name, VERSION);
}

#[test]
fn v1beta1_is_stored_v1alpha1_served_and_both_converted_by_the_webhook() {
    let crd = crate::crd().unwrap();
    let versions: Vec<(&str, bool, bool)> = crd
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(
        versions,
        [("v1beta1", true, true), ("v1alpha1", true, false)]
    );
    let conversion = crd.spec.conversion.unwrap();
    assert_eq!(conversion.strategy, "Webhook");
    let webhook = conversion.webhook.unwrap();
    assert_eq!(webhook.conversion_review_versions, ["v1"]);
    let service = webhook.client_config.unwrap().service.unwrap();
    assert_eq!(
        (
            service.namespace.as_str(),
            service.name.as_str(),
            service.path.as_deref()
        ),
        (
            "meridian-system",
            "meridian-operator-webhook",
            Some("/convert")
        )
    );
    // The frozen version still has the fields v1alpha1 manifests use.
    let alpha = version_schema("v1alpha1");
    let spec = &alpha["properties"]["spec"]["properties"];
    assert!(spec["services"]["properties"]["wsHub"].is_object());
    assert!(spec["redis"]["properties"]["adminCredentialsSecret"].is_object());
}

#[test]
fn the_admitted_name_length_is_the_one_validation_allows() {
    let crd = serde_json::to_string(&MiddlewareStack::crd()).unwrap();
    let rule = format!(
        "size(self.metadata.name) <= {}",
        crate::validate::MAX_STACK_NAME_LEN
    );
    assert!(crd.contains(&rule), "the CRD lacks `{rule}`");
}

#[test]
fn the_crd_has_a_status_subresource_columns_and_a_category() {
    let crd = MiddlewareStack::crd();
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<(&str, &str)> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Ready", r#".status.conditions[?(@.type=="Ready")].status"#),
            ("Services", ".status.servicesReady"),
            ("Phase", ".status.phase"),
            ("Reason", r#".status.conditions[?(@.type=="Ready")].reason"#),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
    assert_eq!(crd.spec.names.categories, Some(vec!["meridian".to_owned()]));
}

#[test]
fn services_ready_counts_services_with_every_replica_ready() {
    use std::collections::BTreeMap;
    let service = |replicas, ready_replicas| ServiceStatus {
        replicas,
        ready_replicas,
    };
    let services = BTreeMap::from([
        ("api-gateway".to_owned(), service(2, 2)),
        ("processor".to_owned(), service(3, 1)),
        ("ws-hub".to_owned(), service(1, 1)),
    ]);
    assert_eq!(
        MiddlewareStackStatus::count_ready(&services).as_deref(),
        Some("2/3")
    );
    assert_eq!(MiddlewareStackStatus::count_ready(&BTreeMap::new()), None);
}

/// Walks every property below `node`, calling `f(path, property)`.
fn each_property(path: &str, node: &Value, f: &mut dyn FnMut(&str, &Value)) {
    if let Some(properties) = node["properties"].as_object() {
        for (name, property) in properties {
            let path = format!("{path}.{name}");
            f(&path, property);
            each_property(&path, property, f);
        }
    }
    for nested in [&node["items"], &node["additionalProperties"]] {
        if nested.is_object() {
            each_property(path, nested, f);
        }
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    let mut undocumented = Vec::new();
    each_property("", &at("spec"), &mut |path, property| {
        if property["description"].as_str().is_none_or(str::is_empty) {
            undocumented.push(format!("spec{path}"));
        }
    });
    each_property("", &at("status"), &mut |path, property| {
        if property["description"].as_str().is_none_or(str::is_empty) {
            undocumented.push(format!("status{path}"));
        }
    });
    assert!(
        undocumented.is_empty(),
        "fields without a doc comment: {undocumented:?}"
    );
}

#[test]
fn numeric_fields_carry_their_openapi_bounds() {
    let cases = [
        ("spec.services.gateway.replicas", Some(0.0), Some(500.0)),
        ("spec.services.hub.replicas", Some(0.0), Some(500.0)),
        ("spec.kafka.topics.events.partitions", Some(1.0), None),
        ("spec.kafka.topics.dlq.replicationFactor", Some(1.0), None),
        ("spec.postgres.port", Some(1.0), Some(65535.0)),
        ("spec.telemetry.samplingRatio", Some(0.0), Some(1.0)),
        ("spec.rateLimits.policies", None, None),
    ];
    for (path, minimum, maximum) in cases {
        let node = at(path);
        assert_eq!(node["minimum"].as_f64(), minimum, "minimum of {path}");
        assert_eq!(node["maximum"].as_f64(), maximum, "maximum of {path}");
    }
}

#[test]
fn unsafe_changes_are_forbidden_by_transition_rules() {
    let cases = [
        (
            "spec.postgres.database",
            "self == oldSelf",
            "postgres.database is immutable",
        ),
        (
            "spec.kafka.topics.commands.replicationFactor",
            "self == oldSelf",
            "replicationFactor is immutable",
        ),
        (
            "spec.kafka.topics.events.partitions",
            "self >= oldSelf",
            "partitions may not be decreased",
        ),
    ];
    for (path, rule, message) in cases {
        let node = at(path);
        let rules = node["x-kubernetes-validations"].as_array().unwrap();
        assert!(
            rules
                .iter()
                .any(|r| r["rule"] == rule && r["message"].as_str().unwrap().starts_with(message)),
            "{path} lacks `{rule}` with message `{message}`: {rules:?}"
        );
    }
}

#[test]
fn auth_requires_exactly_one_of_jwt_secret_ref_and_jwks_url() {
    let messages = messages(&at("spec.auth"));
    assert!(
        messages.iter().any(|m| m.contains("mutually exclusive")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("needs either")),
        "{messages:?}"
    );
}

#[test]
fn rate_limit_policies_are_a_list_map_keyed_by_name() {
    let node = at("spec.rateLimits.policies");
    assert_eq!(node["x-kubernetes-list-type"], "map");
    assert_eq!(
        node["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    let conditions = at("status.conditions");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
}

#[test]
fn a_minimal_spec_gets_the_documented_defaults() {
    let spec: MiddlewareStackSpec = serde_json::from_value(serde_json::json!({
        "image": { "registry": "registry.invalid/meridian", "tag": "0.1.0" },
        "kafka": { "bootstrapServers": "127.0.0.1:9092" },
        "redis": { "url": "redis://127.0.0.1:6379", "adminSecretRef": { "name": "redis-admin" } },
        "postgres": { "host": "127.0.0.1", "database": "middleware", "adminSecretRef": { "name": "pg-admin" } },
    }))
    .unwrap();
    assert_eq!(spec.image.pull_policy, PullPolicy::IfNotPresent);
    assert!(spec.services.gateway.enabled);
    assert_eq!(spec.services.processor.replicas, 1);
    assert_eq!(spec.kafka.topics.dlq.partitions, 3);
    assert_eq!(spec.kafka.topics.dlq.replication_factor, 1);
    assert_eq!(spec.postgres.port, 5432);
    assert_eq!(spec.postgres.ssl_mode, SslMode::Prefer);
    assert_eq!(spec.telemetry.sampling_ratio, 1.0);
    assert_eq!(spec.deletion_policy.topics, Retention::Retain);
    assert_eq!(spec.deletion_policy.database, Retention::Retain);
    assert_eq!(spec.deletion_policy.credentials, Retention::Delete);
    assert!(!spec.paused);
    assert!(spec.auth.is_none());
    assert!(!spec.redis.cluster);
}

#[test]
fn redis_cluster_is_written_only_when_true() {
    let mut redis: crate::crd::RedisSpec = serde_json::from_value(serde_json::json!({
        "url": "redis://redis-0.redis:6379", "adminSecretRef": { "name": "redis-admin" },
    }))
    .unwrap();
    // Left out when false: stored objects of stacks on one Redis do not change.
    assert!(
        serde_json::to_value(&redis)
            .unwrap()
            .get("cluster")
            .is_none()
    );
    redis.cluster = true;
    assert_eq!(serde_json::to_value(&redis).unwrap()["cluster"], true);
    assert_eq!(
        at("spec.redis.cluster")["type"],
        "boolean",
        "{}",
        at("spec.redis.cluster")
    );
}

#[test]
fn ssl_mode_serializes_as_libpq_spells_it() {
    for mode in [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        assert_eq!(serde_json::to_value(mode).unwrap(), mode.as_str());
    }
}

#[test]
fn the_checked_in_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/middlewarestack.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    let generated = crate::crd_yaml().unwrap();
    assert!(
        checked_in == generated,
        "crds/middlewarestack.yaml is out of date with operator/src/crd.rs: run `just crds`"
    );
}
