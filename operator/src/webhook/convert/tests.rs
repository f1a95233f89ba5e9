use std::collections::BTreeSet;

use kube::core::conversion::ConversionReview;
use serde_json::{Value, json};

use super::*;
use crate::crd::MiddlewareStack;
use crate::crd::tests::version_schema;

/// The v1alpha1 fixture: every renamed field set.
fn alpha() -> Value {
    serde_saphyr::from_str(include_str!("../../../tests/fixtures/v1alpha1-stack.yaml")).unwrap()
}

#[test]
fn v1alpha1_converts_to_a_v1beta1_the_operator_reads() {
    let beta = convert(alpha(), "meridian.dev/v1beta1").unwrap();
    assert_eq!(beta["apiVersion"], "meridian.dev/v1beta1");
    let spec = &beta["spec"];
    assert_eq!(spec["services"]["hub"]["image"]["tag"], "0.1.0");
    assert!(spec["services"].get("wsHub").is_none());
    assert_eq!(
        spec["kafka"]["adminSecretRef"],
        json!({"name": "meridian-kafka-admin"})
    );
    assert_eq!(
        spec["redis"]["adminSecretRef"],
        json!({"name": "meridian-redis-admin"})
    );
    assert_eq!(
        spec["postgres"]["adminSecretRef"],
        json!({"name": "meridian-postgres-admin"})
    );
    for dependency in ["kafka", "redis", "postgres"] {
        assert!(spec[dependency].get("adminCredentialsSecret").is_none());
    }
    let stack: MiddlewareStack = serde_json::from_value(beta).unwrap();
    assert_eq!(stack.spec.services.hub.replicas, 1);
    assert_eq!(
        stack.spec.postgres.admin_secret_ref.name,
        "meridian-postgres-admin"
    );
}

#[test]
fn a_round_trip_through_either_version_gives_the_object_back_byte_for_byte() {
    let alpha = alpha();
    let beta = convert(alpha.clone(), "meridian.dev/v1beta1").unwrap();
    let back = convert(beta.clone(), "meridian.dev/v1alpha1").unwrap();
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        serde_json::to_string(&alpha).unwrap()
    );
    let again = convert(back, "meridian.dev/v1beta1").unwrap();
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        serde_json::to_string(&beta).unwrap()
    );
}

#[test]
fn fields_left_unset_stay_unset_and_other_fields_pass_through() {
    let minimal = json!({
        "apiVersion": "meridian.dev/v1alpha1",
        "kind": "MiddlewareStack",
        "metadata": {"name": "m", "annotations": {"a": "b"}},
        "spec": {"kafka": {"bootstrapServers": "k:9092"}, "paused": true},
        "status": {"phase": "Ready"}
    });
    let beta = convert(minimal.clone(), "meridian.dev/v1beta1").unwrap();
    assert_eq!(
        beta,
        json!({
            "apiVersion": "meridian.dev/v1beta1",
            "kind": "MiddlewareStack",
            "metadata": {"name": "m", "annotations": {"a": "b"}},
            "spec": {"kafka": {"bootstrapServers": "k:9092"}, "paused": true},
            "status": {"phase": "Ready"}
        })
    );
    assert_eq!(convert(beta, "meridian.dev/v1alpha1").unwrap(), minimal);
}

#[test]
fn the_same_version_is_returned_unchanged() {
    let alpha = alpha();
    assert_eq!(
        convert(alpha.clone(), "meridian.dev/v1alpha1").unwrap(),
        alpha
    );
}

#[test]
fn unknown_versions_are_refused_by_name() {
    let error = convert(alpha(), "meridian.dev/v2").unwrap_err();
    assert_eq!(
        error,
        ConversionError::UnknownVersion("meridian.dev/v2".into())
    );
    assert!(error.to_string().contains("meridian.dev/v1beta1"));
    let mut foreign = alpha();
    foreign["apiVersion"] = json!("example.com/v1alpha1");
    assert!(matches!(
        convert(foreign, "meridian.dev/v1beta1"),
        Err(ConversionError::UnknownVersion(v)) if v == "example.com/v1alpha1"
    ));
}

#[test]
fn a_review_converts_every_object_in_order_and_echoes_the_uid() {
    let mut second = alpha();
    second["metadata"]["name"] = json!("second");
    let request: ConversionReview = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "desiredAPIVersion": "meridian.dev/v1beta1",
            "objects": [alpha(), second]
        }
    }))
    .unwrap();
    let answer = serde_json::to_value(review(request)).unwrap();
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["result"]["status"], "Success");
    let names: Vec<&str> = response["convertedObjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo", "second"]);
}

#[test]
fn a_review_with_an_unknown_version_fails_with_the_reason() {
    let request: ConversionReview = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {"uid": "u", "desiredAPIVersion": "meridian.dev/v9", "objects": [alpha()]}
    }))
    .unwrap();
    let answer = serde_json::to_value(review(request)).unwrap();
    assert_eq!(answer["response"]["uid"], "u");
    assert_eq!(answer["response"]["result"]["status"], "Failure");
    assert!(
        answer["response"]["result"]["message"]
            .as_str()
            .unwrap()
            .contains("meridian.dev/v9")
    );
}

/// Every property path of a version's schema (`properties` of objects, of array items and
/// of map values), from the object's root.
fn paths(schema: &Value) -> BTreeSet<Vec<String>> {
    fn walk(node: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        if let Some(properties) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in properties {
                prefix.push(name.clone());
                out.insert(prefix.clone());
                walk(child, prefix, out);
                prefix.pop();
            }
        }
        for nested in ["items", "additionalProperties"] {
            if let Some(child) = node.get(nested) {
                prefix.push(format!("[{nested}]"));
                walk(child, prefix, out);
                prefix.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(schema, &mut Vec::new(), &mut out);
    out
}

/// A v1beta1 path in v1alpha1 terms; `None` for an object that exists only to hold a renamed
/// field (`adminSecretRef`).
fn as_alpha(path: &[String]) -> Option<Vec<String>> {
    for rename in RENAMES {
        let beta: Vec<String> = rename.beta.iter().map(|s| (*s).to_owned()).collect();
        if path.starts_with(&beta) {
            let mut mapped: Vec<String> = rename.alpha.iter().map(|s| (*s).to_owned()).collect();
            mapped.extend_from_slice(&path[beta.len()..]);
            return Some(mapped);
        }
        let alpha: Vec<String> = rename.alpha.iter().map(|s| (*s).to_owned()).collect();
        if beta.starts_with(path) && !alpha.starts_with(path) {
            return None;
        }
    }
    Some(path.to_vec())
}

#[test]
fn every_field_of_either_version_has_a_home_in_the_other() {
    let alpha = paths(&version_schema("v1alpha1"));
    let stashed: Vec<Vec<String>> = V1BETA1_ONLY
        .iter()
        .map(|p| p.iter().map(|s| (*s).to_owned()).collect())
        .collect();
    let beta: BTreeSet<Vec<String>> = paths(&version_schema("v1beta1"))
        .iter()
        .filter(|p| !stashed.iter().any(|s| p.starts_with(s)))
        .filter_map(|p| as_alpha(p))
        .collect();
    let only_beta: Vec<_> = beta.difference(&alpha).collect();
    let only_alpha: Vec<_> = alpha.difference(&beta).collect();
    assert!(
        only_beta.is_empty() && only_alpha.is_empty(),
        "fields a round trip would lose (add a rename to RENAMES, or carry them in an \
         annotation): only in v1beta1 {only_beta:?}, only in v1alpha1 {only_alpha:?}"
    );
}

/// A v1beta1 stack with the hub autoscaled on connections (a field v1alpha1 lacks).
fn beta_with_connections() -> Value {
    let mut beta = convert(alpha(), "meridian.dev/v1beta1").unwrap();
    beta["spec"]["services"]["hub"]["autoscaling"] = json!({
        "minReplicas": 1, "maxReplicas": 4, "targetConnectionsPerReplica": 5000
    });
    beta
}

#[test]
fn a_field_only_v1beta1_has_survives_a_round_trip_through_v1alpha1() {
    let beta = beta_with_connections();
    let alpha = convert(beta.clone(), "meridian.dev/v1alpha1").unwrap();
    let autoscaling = &alpha["spec"]["services"]["wsHub"]["autoscaling"];
    assert_eq!(autoscaling, &json!({"minReplicas": 1, "maxReplicas": 4}));
    assert_eq!(
        alpha["metadata"]["annotations"][STASH],
        r#"{"spec.services.hub.autoscaling.targetConnectionsPerReplica":5000}"#
    );
    let back = convert(alpha, "meridian.dev/v1beta1").unwrap();
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        serde_json::to_string(&beta).unwrap()
    );
}

#[test]
fn a_stashed_field_whose_object_was_removed_in_v1alpha1_is_dropped() {
    let mut alpha = convert(beta_with_connections(), "meridian.dev/v1alpha1").unwrap();
    alpha["spec"]["services"]["wsHub"]
        .as_object_mut()
        .unwrap()
        .remove("autoscaling");
    let back = convert(alpha, "meridian.dev/v1beta1").unwrap();
    assert!(back["spec"]["services"]["hub"].get("autoscaling").is_none());
    assert!(back["metadata"].get("annotations").is_none());
}

#[test]
fn a_stash_annotation_edited_into_nonsense_is_dropped() {
    let mut alpha = alpha();
    alpha["metadata"]["annotations"] = json!({ STASH: "not json", "keep": "me" });
    let beta = convert(alpha, "meridian.dev/v1beta1").unwrap();
    assert_eq!(beta["metadata"]["annotations"], json!({"keep": "me"}));
}

#[test]
fn redis_cluster_survives_a_round_trip_through_v1alpha1() {
    let mut beta = convert(alpha(), "meridian.dev/v1beta1").unwrap();
    beta["spec"]["redis"]["cluster"] = json!(true);
    let alpha = convert(beta.clone(), "meridian.dev/v1alpha1").unwrap();
    assert!(alpha["spec"]["redis"].get("cluster").is_none());
    assert_eq!(
        alpha["metadata"]["annotations"][STASH],
        r#"{"spec.redis.cluster":true}"#
    );
    let back = convert(alpha, "meridian.dev/v1beta1").unwrap();
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        serde_json::to_string(&beta).unwrap()
    );
    let stack: MiddlewareStack = serde_json::from_value(back).unwrap();
    assert!(stack.spec.redis.cluster);
}
