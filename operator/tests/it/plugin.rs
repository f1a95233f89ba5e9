//! `kubectl meridian` against the real API server: `status` shows a stack's phase, conditions,
//! services, endpoints and Events in one screen; `token` mints what the stack's gateway and hub
//! accept, and says why when a stack takes no HMAC tokens.
use std::time::Duration;

use common::auth::{AuthConfig, Verifier};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::admission::{TestNamespace, apply, client, example_stack, install_crd};

/// 32 bytes or more, as the services require of an HMAC secret.
const SECRET: &str = "plugin-test-secret-of-at-least-32-bytes";

fn plugin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-meridian"))
        .args(args)
        .output()
        .expect("kubectl-meridian runs")
}

#[tokio::test]
async fn status_shows_the_stack_in_one_screen_and_token_mints_what_it_accepts() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "plugin").await;
    let stacks = ns.stacks();

    // The example stack and its JWT Secret; its status as the operator writes it (no operator
    // runs here).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("meridian-jwt".into()),
            ..ObjectMeta::default()
        },
        string_data: Some([("hmac-secret".to_owned(), SECRET.to_owned())].into()),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let stack = example_stack("shop");
    apply(&stacks, &stack).await.unwrap();
    let status = json!({
        "apiVersion": "meridian.dev/v1beta1",
        "kind": "MiddlewareStack",
        "status": {
            "observedGeneration": 1,
            "phase": "Degraded",
            "servicesReady": "1/2",
            "services": {
                "api-gateway": {"replicas": 2, "readyReplicas": 2},
                "processor": {"replicas": 2, "readyReplicas": 0},
            },
            "endpoints": "shop-endpoints",
            "conditions": [
                {"type": "DependenciesReady", "status": "True", "reason": "Reachable",
                 "message": "Kafka, Redis and PostgreSQL answer", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "CoreAvailable", "status": "False", "reason": "ProcessorUnavailable",
                 "message": "processor: 0 of 2 replicas ready", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        }
    });
    stacks
        .patch_status(
            "shop",
            &PatchParams::apply("meridian-tests").force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let endpoints = ConfigMap {
        metadata: ObjectMeta {
            name: Some("shop-endpoints".into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [(
                "GATEWAY_URL".to_owned(),
                "http://shop-api-gateway:8080".to_owned(),
            )]
            .into(),
        ),
        ..ConfigMap::default()
    };
    config_maps
        .create(&PostParams::default(), &endpoints)
        .await
        .unwrap();

    let out = plugin(&["status", "shop", "-n", &ns.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        &format!("Stack      {}/shop", ns.name),
        "Phase      Degraded",
        "CoreAvailable      False   ProcessorUnavailable",
        "processor: 0 of 2 replicas ready",
        "Services   1/2",
        "processor    0      2",
        "GATEWAY_URL  http://shop-api-gateway:8080",
        "Pipeline   (the pods' /metrics, through the API server's pod proxy)",
        "unavailable: no running pods",
        "Events (latest 10)",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let missing = plugin(&["status", "nope", "-n", &ns.name]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains(&format!("no middlewarestack {}/nope", ns.name)),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // A token the stack's own verifier accepts, with the claims asked for.
    let out = plugin(&[
        "token",
        "shop",
        "-n",
        &ns.name,
        "--subject",
        "alice",
        "--read",
        "orders/*",
        "--write",
        "orders/alice-*",
        "--room",
        "cmd:*",
        "--client-id",
        "cli",
        "--ttl-seconds",
        "600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier = Verifier::new(&AuthConfig {
        jwt_secret: Some(SECRET.into()),
        jwt_issuer: stack["spec"]["auth"]["issuer"].as_str().map(str::to_owned),
        jwt_audience: stack["spec"]["auth"]["audience"]
            .as_str()
            .map(str::to_owned),
        ..AuthConfig::default()
    })
    .unwrap();
    let claims = verifier.verify(token.trim()).await.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.read, ["orders/*"]);
    assert_eq!(claims.write, ["orders/alice-*"]);
    assert_eq!(claims.rooms, ["cmd:*"]);
    assert_eq!(claims.client_id.as_deref(), Some("cli"));
    let ttl = claims.exp - k8s_openapi::jiff::Timestamp::now().as_second();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");

    // A stack without auth takes no tokens: said plainly, nothing printed on stdout.
    let mut open = example_stack("open");
    open["spec"].as_object_mut().unwrap().remove("auth");
    apply(&stacks, &open).await.unwrap();
    let out = plugin(&["token", "open", "-n", &ns.name, "--subject", "alice"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no spec.auth"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::timeout(Duration::from_secs(60), ns.delete())
        .await
        .unwrap();
}

/// `rotate-credentials` sets a new rotation token on the stack each time; `rebuild-read-model`
/// creates a Job from the cache updater's Deployment, running `rebuild`, owned by the stack.
#[tokio::test]
async fn rotate_credentials_asks_the_operator_and_rebuild_creates_a_job() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::Job;
    use kube::ResourceExt as _;
    use kube::api::ListParams;
    use operator::build::{Component, Scraping, build};
    use operator::controller::ROTATE_ANNOTATION;

    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "plugin-ops").await;
    let stacks = ns.stacks();
    apply(&stacks, &example_stack("shop")).await.unwrap();

    let token = || async {
        stacks
            .get("shop")
            .await
            .unwrap()
            .annotations()
            .get(ROTATE_ANNOTATION)
            .cloned()
    };
    assert_eq!(token().await, None);
    let out = plugin(&["rotate-credentials", "shop", "-n", &ns.name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = token().await.expect("the rotation annotation is set");
    let out = plugin(&["rotate-credentials", "shop", "-n", &ns.name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = token().await.unwrap();
    assert_ne!(first, second, "each rotation asks with a new token");

    // No cache updater yet: a clear refusal.
    let out = plugin(&["rebuild-read-model", "shop", "-n", &ns.name]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shop-cache-updater"), "{stderr}");

    // The Deployment the operator would apply for it, then the rebuild.
    let stack = stacks.get("shop").await.unwrap();
    let validated = operator::validate::validate(&stack).unwrap();
    let desired = build(&validated, Scraping::Annotations);
    let mut deployment = desired
        .service(Component::CacheUpdater)
        .unwrap()
        .deployment
        .clone();
    deployment.metadata.namespace = Some(ns.name.clone());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let out = plugin(&["rebuild-read-model", "shop", "-n", &ns.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let listed = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/name=read-model-rebuild"))
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 1);
    let job = &listed[0];
    assert!(
        text.contains(&format!("logs -f job/{}", job.name_any())),
        "{text}"
    );
    assert_eq!(job.owner_references()[0].uid, stack.uid().unwrap());
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers[0].args, Some(vec!["rebuild".to_owned()]));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));

    // The dead-letter replay: a Job from the processor's Deployment.
    let out = plugin(&["dlq", "replay", "shop", "-n", &ns.name, "--max", "50"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shop-processor"), "{stderr}");
    let mut processor = desired
        .service(Component::Processor)
        .unwrap()
        .deployment
        .clone();
    processor.metadata.namespace = Some(ns.name.clone());
    deployments
        .create(&PostParams::default(), &processor)
        .await
        .unwrap();
    let out = plugin(&["dlq", "replay", "shop", "-n", &ns.name, "--max", "50"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = jobs
        .list(&ListParams::default().labels("app.kubernetes.io/name=dead-letter-replay"))
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 1);
    let pod = listed[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(
        pod.containers[0].args,
        Some(vec![
            "replay-dlq".to_owned(),
            "--max".to_owned(),
            "50".to_owned()
        ])
    );
    let out = plugin(&["dlq", "replay", "shop", "-n", &ns.name, "--max", "0"]);
    assert!(!out.status.success(), "--max 0 is refused");
    tokio::time::timeout(Duration::from_secs(60), ns.delete())
        .await
        .unwrap();
}
