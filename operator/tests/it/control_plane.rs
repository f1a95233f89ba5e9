use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use kube::{Client, ResourceExt};

async fn client() -> Client {
    Client::try_default()
        .await
        .expect("no usable KUBECONFIG: run `just deps-up` and `source` the env file it prints")
}

#[tokio::test]
async fn the_api_server_answers_readyz_through_kube_and_kubectl() {
    let client = client().await;
    let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
    assert_eq!(client.request_text(request).await.unwrap(), "ok");

    let out = tokio::process::Command::new("kubectl")
        .args(["get", "--raw", "/readyz"])
        .output()
        .await
        .expect("kubectl on PATH (the env file from `just deps-up` puts the built one first)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[tokio::test]
async fn a_deployment_becomes_available_on_the_kwok_node() {
    let client = client().await;
    let ns_name = format!("smoke-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ssa = PatchParams::apply("meridian-tests").force();
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns_name }
    }))
    .unwrap();
    namespaces
        .patch(&ns_name, &ssa, &Patch::Apply(&ns))
        .await
        .unwrap();

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns_name);
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "smoke" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "smoke" } },
            "template": {
                "metadata": { "labels": { "app": "smoke" } },
                "spec": { "containers": [{ "name": "smoke", "image": "registry.invalid/smoke:1" }] }
            }
        }
    }))
    .unwrap();
    deployments
        .patch("smoke", &ssa, &Patch::Apply(&deployment))
        .await
        .unwrap();

    let available = await_condition(deployments.clone(), "smoke", |d: Option<&Deployment>| {
        let status = d.and_then(|d| d.status.as_ref());
        let available = status.and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Available" && c.status == "True")
        });
        available && status.and_then(|s| s.available_replicas) == Some(2)
    });
    let deployment = tokio::time::timeout(Duration::from_secs(90), available)
        .await
        .expect("Deployment not Available within 90 s (is kwok running? `just deps-status`)")
        .unwrap()
        .unwrap();
    assert_eq!(deployment.name_any(), "smoke");

    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .unwrap();
}
