use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::*;

#[test]
fn the_referenced_secrets_store_keeps_only_identity_and_version() {
    let mut secret = PartialObjectMeta::<Secret> {
        types: None,
        metadata: ObjectMeta {
            name: Some("kafka-admin".to_owned()),
            namespace: Some("team-a".to_owned()),
            uid: Some("u1".to_owned()),
            resource_version: Some("42".to_owned()),
            labels: Some(BTreeMap::from([("a".to_owned(), "b".to_owned())])),
            annotations: Some(BTreeMap::from([("c".to_owned(), "d".to_owned())])),
            owner_references: Some(vec![OwnerReference::default()]),
            ..ObjectMeta::default()
        },
        _phantom: std::marker::PhantomData,
    };
    identity_only(&mut secret);
    assert_eq!(
        secret.metadata,
        ObjectMeta {
            name: Some("kafka-admin".to_owned()),
            namespace: Some("team-a".to_owned()),
            uid: Some("u1".to_owned()),
            resource_version: Some("42".to_owned()),
            ..ObjectMeta::default()
        }
    );
}

fn deployment(generation: i64, status: DeploymentStatus) -> Deployment {
    let mut deployment = Deployment {
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            ..DeploymentSpec::default()
        }),
        status: Some(status),
        ..Deployment::default()
    };
    deployment.metadata.generation = Some(generation);
    deployment
}

fn rolling_out(observed: i64) -> DeploymentStatus {
    DeploymentStatus {
        observed_generation: Some(observed),
        updated_replicas: Some(1),
        ..DeploymentStatus::default()
    }
}

fn available_status() -> DeploymentStatus {
    DeploymentStatus {
        observed_generation: Some(1),
        updated_replicas: Some(1),
        ready_replicas: Some(1),
        available_replicas: Some(1),
        conditions: Some(vec![DeploymentCondition {
            type_: "Available".into(),
            status: "True".into(),
            ..DeploymentCondition::default()
        }]),
        ..DeploymentStatus::default()
    }
}

#[test]
fn status_bookkeeping_does_not_reconcile_but_availability_and_spec_changes_do() {
    let created = deployment_trigger_hash(&deployment(1, DeploymentStatus::default()));
    // The controller-manager observing the generation and updating replicas: no trigger.
    assert_eq!(
        created,
        deployment_trigger_hash(&deployment(1, rolling_out(1)))
    );
    // Available with a ready replica: trigger.
    let ready = deployment_trigger_hash(&deployment(1, available_status()));
    assert_ne!(created, ready);
    // Someone edited the spec: trigger.
    assert_ne!(
        ready,
        deployment_trigger_hash(&deployment(2, available_status()))
    );
    // Our applied hash changed: trigger.
    let mut annotated = deployment(1, available_status());
    annotated
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), "other".to_owned());
    assert_ne!(ready, deployment_trigger_hash(&annotated));
}

#[tokio::test]
async fn deletions_always_reconcile_and_repeated_states_do_not() {
    let mut object = deployment(1, available_status());
    object.metadata.name = Some("svc".into());
    object.metadata.namespace = Some("ns".into());
    let events = futures::stream::iter(vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(object.clone())),
        Ok(watcher::Event::InitDone),
        Ok(watcher::Event::Apply(object.clone())),
        Ok(watcher::Event::Delete(object.clone())),
        Ok(watcher::Event::Apply(object.clone())),
    ]);
    let triggers: Vec<_> = deployment_triggers(events).collect().await;
    // InitApply, Delete, and the re-creation after the delete.
    assert_eq!(triggers.len(), 3);
}
