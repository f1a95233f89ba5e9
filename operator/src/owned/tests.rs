use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentSpec, DeploymentStatus,
};
use k8s_openapi::api::core::v1::{Secret, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::runtime::reflector::{self, Lookup as _, ObjectRef};
use kube::runtime::watcher;

use super::*;

fn deployment(
    generation: i64,
    replicas: Option<i32>,
    status: Option<(i64, i32, &str)>,
) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            name: Some("s-processor".to_owned()),
            namespace: Some("ns".to_owned()),
            uid: Some("d-uid".to_owned()),
            resource_version: Some("42".to_owned()),
            generation: Some(generation),
            annotations: Some(BTreeMap::from([
                (
                    APPLIED_HASH_ANNOTATION.to_owned(),
                    "00000000000000ab".to_owned(),
                ),
                ("other".to_owned(), "x".to_owned()),
            ])),
            owner_references: Some(vec![OwnerReference {
                uid: "stack-uid".to_owned(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas,
            ..DeploymentSpec::default()
        }),
        status: status.map(|(observed, updated, available)| DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(updated),
            updated_replicas: Some(updated),
            ready_replicas: Some(updated),
            conditions: Some(vec![DeploymentCondition {
                type_: "Available".to_owned(),
                status: available.to_owned(),
                ..DeploymentCondition::default()
            }]),
            ..DeploymentStatus::default()
        }),
    }
}

#[test]
fn keeps_what_reconciles_read() {
    let owned = Owned::new(&deployment(3, Some(2), Some((3, 2, "True"))));
    assert_eq!(owned.name, "s-processor");
    assert_eq!(owned.namespace.as_deref(), Some("ns"));
    assert_eq!(owned.uid.as_deref(), Some("d-uid"));
    assert_eq!(owned.resource_version.as_deref(), Some("42"));
    assert_eq!(owned.applied_hash, Some(0xab));
    assert!(owned.owned_by("stack-uid"));
    assert!(!owned.owned_by("another-uid"));
    assert!(!owned.deleting);
    assert_eq!(owned.version(), Version::Generation(3));
    assert_eq!(owned.version().to_string(), "g3");
    assert_eq!(owned.state.ready_replicas, 2);
    assert_eq!(owned.state.replicas, 2);
    // The store finds it under the same reference as the full object.
    assert_eq!(
        owned.to_object_ref(()),
        ObjectRef::<Owned<Deployment>>::new("s-processor").within("ns")
    );
}

#[test]
fn deployment_availability() {
    let cases = [
        // (generation, spec.replicas, status, available)
        (3, Some(2), Some((3, 2, "True")), true),
        (3, None, Some((3, 1, "True")), true),
        (3, Some(2), Some((2, 2, "True")), false),
        (3, Some(2), Some((3, 1, "True")), false),
        (3, Some(2), Some((3, 2, "False")), false),
        (3, Some(0), Some((3, 0, "True")), true),
        (3, Some(2), None, false),
    ];
    for (generation, replicas, status, expected) in cases {
        let owned = Owned::new(&deployment(generation, replicas, status));
        assert_eq!(
            owned.available(),
            expected,
            "generation {generation}, replicas {replicas:?}, status {status:?}"
        );
    }
}

#[test]
fn short_of_ready_compares_ready_with_desired_replicas() {
    let mut rollout = Owned::new(&deployment(3, Some(2), Some((3, 2, "True")))).state;
    assert!(!rollout.short_of_ready());
    rollout.ready_replicas = 1;
    assert!(rollout.short_of_ready());
    rollout.desired = 0;
    assert!(!rollout.short_of_ready(), "scaled to zero");
}

#[test]
fn versions() {
    assert_eq!(Version::of(Some(7), Some("100")).to_string(), "g7");
    assert_eq!(Version::of(None, Some("100")).to_string(), "r100");
    assert_eq!(Version::of(None, None).to_string(), "r");
}

#[test]
fn service_keeps_its_cluster_ip() {
    let service = |ip: Option<&str>| Service {
        metadata: ObjectMeta {
            name: Some("s-gateway".to_owned()),
            deletion_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: ip.map(str::to_owned),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    assert_eq!(
        Owned::new(&service(Some("None"))).state.as_deref(),
        Some("None")
    );
    assert_eq!(Owned::new(&service(None)).state, None);
    assert!(Owned::new(&service(None)).deleting);
    assert_eq!(Owned::new(&service(None)).version().to_string(), "r");
}

#[test]
fn secret_values_and_rotation_token() {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("s-redis".to_owned()),
            annotations: Some(BTreeMap::from([(
                ROTATED_ANNOTATION.to_owned(),
                "t1".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "password".to_owned(),
            ByteString(b"hunter2".to_vec()),
        )])),
        ..Secret::default()
    };
    let owned = Owned::new(&secret);
    assert_eq!(owned.value("password").as_deref(), Some("hunter2"));
    assert_eq!(owned.value("username"), None);
    assert_eq!(owned.state.rotated.as_deref(), Some("t1"));
}

#[test]
fn store_follows_the_watch() {
    let (store, mut writer) = reflector::store::<Owned<Deployment>>();
    let first = deployment(1, Some(1), None);
    let second = deployment(2, Some(1), Some((2, 1, "True")));
    for e in [
        watcher::Event::Init,
        watcher::Event::InitApply(first),
        watcher::Event::InitDone,
        watcher::Event::Apply(second.clone()),
    ] {
        writer.apply_watcher_event(&event(&e));
    }
    let key = ObjectRef::new("s-processor").within("ns");
    let stored = store.get(&key).expect("stored");
    assert_eq!(stored.generation, Some(2));
    assert!(stored.available());
    writer.apply_watcher_event(&event(&watcher::Event::Delete(second)));
    assert!(store.get(&key).is_none());
}
