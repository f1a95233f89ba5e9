//! The build step's output is accepted by the real API server: the objects built from the
//! example stack (as stored, with its real uid) pass a strict server-side-apply dry run.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use operator::build::{Component, Scraping, build};
use operator::validate::validate;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admission::{TestNamespace, apply, client, example_stack, install_crd};

/// Server-side applies `object` as a strict dry run (unknown or duplicate fields fail).
async fn dry_run_apply<K>(client: &kube::Client, namespace: &str, object: &K)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().expect("built objects are named");
    let params = PatchParams::apply("meridian-tests")
        .dry_run()
        .validation_strict();
    // SSA needs apiVersion and kind in the body; k8s-openapi types leave them to serde.
    let mut body = serde_json::to_value(object).expect("objects serialize");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    let error = api
        .patch(&name, &params, &Patch::Apply(&body))
        .await
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        error,
        None,
        "the API server rejected {} {name}",
        K::kind(&())
    );
}

#[tokio::test]
async fn every_object_built_from_the_example_stack_passes_a_strict_server_side_dry_run() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "built-objects").await;
    let mut stack = example_stack("demo");
    // Scale every service above one replica so the PodDisruptionBudgets are built too.
    for service in [
        "gateway",
        "commandService",
        "processor",
        "cacheUpdater",
        "hub",
    ] {
        stack["spec"]["services"][service]["replicas"] = 2.into();
    }
    let stored = apply(&ns.stacks(), &stack).await.unwrap();

    let desired = build(&validate(&stored).unwrap(), Scraping::Annotations);
    assert_eq!(desired.services.len(), Component::ALL.len());
    for objects in &desired.services {
        dry_run_apply::<ConfigMap>(&client, &ns.name, &objects.config_map).await;
        dry_run_apply::<Deployment>(&client, &ns.name, &objects.deployment).await;
        dry_run_apply::<Service>(&client, &ns.name, &objects.service).await;
        let pdb = objects.pod_disruption_budget.as_ref().unwrap();
        dry_run_apply::<PodDisruptionBudget>(&client, &ns.name, pdb).await;
    }
    let policy = desired.network_policy.as_ref().unwrap();
    dry_run_apply::<NetworkPolicy>(&client, &ns.name, policy).await;
    ns.delete().await;
}
