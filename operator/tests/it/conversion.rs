//! The conversion webhook on the real API server: a stack written as `v1alpha1` is stored as
//! `v1beta1`, reads back in either version, and round-trips byte for byte; the webhook's
//! self-managed certificate is issued into a Secret, trusted by the CRD, and replaced (with a
//! new CA) without a conversion failing for longer than the API server takes to notice.
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use operator::crd::MiddlewareStack;
use operator::webhook::{
    CRD_NAME, Certificates, ClientConfig, Webhook, WebhookSettings, certs, convert,
};
use serde_json::{Value, json};

use crate::admission::{TestNamespace, client, install_crd};

const ALPHA_STACK: &str = include_str!("../fixtures/v1alpha1-stack.yaml");

fn alpha_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meridian.dev", "v1alpha1", "MiddlewareStack"),
        "middlewarestacks",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The CRD's `caBundle`.
async fn ca_bundle(client: &kube::Client) -> Option<String> {
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(CRD_NAME)
        .await
        .unwrap();
    crd.spec
        .conversion?
        .webhook?
        .client_config?
        .ca_bundle
        .map(|b| String::from_utf8(b.0).unwrap())
}

/// Retries `attempt` until it succeeds or 30 s pass (the API server picks a changed CRD
/// `clientConfig` up asynchronously).
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let started = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("{what}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("{what} failed for 30 s: {error}"),
        }
    }
}

#[tokio::test]
async fn a_v1alpha1_stack_is_stored_as_v1beta1_and_round_trips_through_the_webhook() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "conversion").await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let webhook = Arc::new(Webhook::new(
        client.clone(),
        WebhookSettings {
            client: ClientConfig::Url(format!("https://127.0.0.1:{port}/convert")),
            certificates: Certificates::SelfManaged {
                namespace: ns.name.clone(),
                secret: "webhook-tls".to_owned(),
                lifetimes: certs::Lifetimes::default(),
            },
            refresh: Duration::from_secs(300),
        },
    ));
    webhook.refresh().await.expect("the first certificate");
    let stop = common::shutdown::CancellationToken::new();
    let server = tokio::spawn(webhook.clone().run(
        listener,
        common::http::ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            max_concurrent_requests: 64,
        },
        stop.clone(),
    ));

    // The certificates are in the Secret, and the CRD trusts their CA.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret = secrets.get("webhook-tls").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let first_ca = ca_bundle(&client).await.expect("a caBundle in the CRD");
    assert!(first_ca.contains("BEGIN CERTIFICATE"));

    // Written as v1alpha1 (the API server converts it to the storage version)...
    let alpha = alpha_api(&client, &ns.name);
    let written: DynamicObject = serde_saphyr::from_str(ALPHA_STACK).unwrap();
    let create = PostParams::default();
    eventually("create as v1alpha1", || alpha.create(&create, &written)).await;

    // ... it reads back as v1beta1, renamed fields in their new places ...
    let stacks: Api<MiddlewareStack> = ns.stacks();
    let beta = stacks.get("demo").await.unwrap();
    assert_eq!(
        beta.spec
            .services
            .hub
            .image
            .as_ref()
            .and_then(|i| i.tag.as_deref()),
        Some("0.1.0")
    );
    assert_eq!(
        beta.spec.redis.admin_secret_ref.name,
        "meridian-redis-admin"
    );
    assert_eq!(
        beta.spec.postgres.admin_secret_ref.name,
        "meridian-postgres-admin"
    );
    assert_eq!(
        beta.spec
            .kafka
            .admin_secret_ref
            .as_ref()
            .map(|r| r.name.as_str()),
        Some("meridian-kafka-admin")
    );

    // ... and as v1alpha1 exactly as the webhook's own conversion of the stored object says,
    // byte for byte.
    let as_alpha = serde_json::to_value(alpha.get("demo").await.unwrap()).unwrap();
    let stored = serde_json::to_value(&beta).unwrap();
    let expected = convert::convert(stored, "meridian.dev/v1alpha1").unwrap();
    assert_eq!(
        serde_json::to_string(&as_alpha["spec"]).unwrap(),
        serde_json::to_string(&expected["spec"]).unwrap()
    );
    assert_eq!(
        as_alpha["spec"]["services"]["wsHub"]["image"]["tag"],
        "0.1.0"
    );
    assert_eq!(
        as_alpha["spec"]["redis"]["adminCredentialsSecret"],
        "meridian-redis-admin"
    );
    assert!(as_alpha["spec"]["services"].get("hub").is_none());

    // Writing the v1alpha1 object back unchanged changes nothing (no field lost or added).
    let unchanged: DynamicObject = serde_json::from_value(as_alpha.clone()).unwrap();
    let replaced = alpha
        .replace("demo", &PostParams::default(), &unchanged)
        .await
        .unwrap();
    assert_eq!(
        replaced.metadata.resource_version, unchanged.metadata.resource_version,
        "a no-op write through v1alpha1 must not change the stored object"
    );

    // A change through v1beta1 shows through v1alpha1.
    stacks
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"services": {"hub": {"replicas": 3}}}})),
        )
        .await
        .unwrap();
    let changed = alpha.get("demo").await.unwrap();
    assert_eq!(changed.data["spec"]["services"]["wsHub"]["replicas"], 3);

    // Every stack (in the whole cluster) is stored as v1beta1 from now on.
    let migrated = operator::webhook::migrate_storage(&client).await.unwrap();
    eprintln!("{migrated:?}");
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get_status(CRD_NAME)
        .await
        .unwrap();
    assert_eq!(
        crd.status.and_then(|s| s.stored_versions),
        Some(vec!["v1beta1".to_owned()])
    );

    // The Secret lost: the webhook issues a new CA and certificate, the CRD trusts the new CA,
    // and conversions work again once the API server has the new bundle.
    secrets
        .delete("webhook-tls", &DeleteParams::default())
        .await
        .unwrap();
    webhook.refresh().await.expect("a new certificate");
    let second_ca = ca_bundle(&client).await.unwrap();
    assert_ne!(first_ca, second_ca, "a new CA is trusted");
    let read: Value = eventually("read as v1alpha1 after rotation", || async {
        alpha.get("demo").await.map(|o| o.data)
    })
    .await;
    assert_eq!(read["spec"]["services"]["wsHub"]["replicas"], 3);

    stop.cancel();
    server.await.unwrap().unwrap();
    ns.delete().await;
}
