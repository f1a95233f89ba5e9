//! The container-free end-to-end test: the real operator binary reconciles a stack on the
//! local control plane, `meridian-runner` plays the kubelet for the kwok node (every pod of
//! the stack runs as a local process of its service binary, with exactly the container's
//! environment and the operator's provisioned credentials), and `meridian-smoke` walks the
//! user's path: JWT → command through the gateway → `succeeded` → document → WebSocket event.
//! Then `kubectl describe` must show every condition True and the Events, and the spans every
//! service exported to an in-process OTLP receiver must make one trace per command, from the
//! gateway to the hub's fan-out.
//!
//! Needs every binary built (`just test` builds them first; by hand: `cargo build --workspace
//! --bins`).
use std::path::PathBuf;
use std::time::Duration;

use common::test_support::otlp::{OtlpReceiver, ReceivedSpan};
use common::test_support::{ChildProcess, free_port, wait_until, workspace_binary};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use operator::crd::MiddlewareStack;
use serde_json::{Value, json};

use crate::admission::{TestNamespace, client, install_crd};

const EXAMPLE: &str = include_str!("../../../crds/example-stack.yaml");
const JWT_SECRET: &str = "e2e-only-secret";
/// A caller's sampled trace, and one its caller chose not to sample.
const SAMPLED: &str = "00-5e2e5e2e5e2e5e2e5e2e5e2e5e2e0001-00f067aa0ba902b7-01";
const UNSAMPLED: &str = "00-5e2e5e2e5e2e5e2e5e2e5e2e5e2e0002-00f067aa0ba902b7-00";

/// The hops of a command, as (service, span) along the ancestry of the hub's fan-out span.
const HOPS: [(&str, &str); 7] = [
    ("api-gateway", "http.request"),
    ("command-service", "http.request"),
    ("command-service", "outbox.publish"),
    ("processor", "processor.command"),
    ("processor", "outbox.publish"),
    ("cache-updater", "cache.apply"),
    ("ws-hub", "hub.fan_out"),
];

/// The first span `matches` accepts, once exported (batches leave every 5 s).
async fn await_span(
    traces: &OtlpReceiver,
    matches: impl Fn(&ReceivedSpan) -> bool,
) -> ReceivedSpan {
    let mut found = None;
    wait_until("the span to be exported", Duration::from_secs(60), || {
        found = traces.spans().into_iter().find(&matches);
        std::future::ready(found.is_some())
    })
    .await;
    found.unwrap()
}

/// Waits (60 s at most) until the trace holds a hub fan-out span whose ancestry is [`HOPS`] in
/// order (other spans may sit between them) and whose root's parent is `caller` (the caller's
/// span, not exported) or none; then no span of the trace may be an orphan.
async fn assert_one_trace_through_every_hop(
    traces: &OtlpReceiver,
    trace_id: &str,
    caller: Option<&str>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let spans = traces.trace(trace_id);
        match trace_through_every_hop(&spans, caller) {
            Ok(path) => {
                eprintln!("trace {trace_id}: {path}");
                break;
            }
            Err(why) if tokio::time::Instant::now() > deadline => {
                panic!("trace {trace_id}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let spans = traces.trace(trace_id);
    for span in &spans {
        let parent = span.parent_span_id.as_deref();
        assert!(
            parent.is_none_or(|p| Some(p) == caller || spans.iter().any(|s| s.span_id == p)),
            "trace {trace_id}: orphan span {}/{}",
            span.service,
            span.name,
        );
    }
}

/// The described path from the root to the hub's fan-out, or why it is not complete yet.
fn trace_through_every_hop(spans: &[ReceivedSpan], caller: Option<&str>) -> Result<String, String> {
    let leaf = spans
        .iter()
        .find(|s| s.name == "hub.fan_out")
        .ok_or("no hub.fan_out span")?;
    let mut path = vec![leaf];
    while let Some(parent) = path.last().and_then(|s| s.parent_span_id.as_deref()) {
        match spans.iter().find(|s| s.span_id == parent) {
            Some(span) => path.push(span),
            None => break,
        }
    }
    path.reverse();
    let described = path
        .iter()
        .map(|s| format!("{}/{}", s.service, s.name))
        .collect::<Vec<_>>()
        .join(" -> ");
    if path[0].parent_span_id.as_deref() != caller {
        return Err(format!("starts elsewhere than {caller:?}: {described}"));
    }
    let mut hops = HOPS.iter().peekable();
    for span in &path {
        if hops
            .peek()
            .is_some_and(|(service, name)| span.service == *service && span.name == *name)
        {
            hops.next();
        }
    }
    match hops.next() {
        Some(missing) => Err(format!("no {missing:?} in {described}")),
        None => Ok(described),
    }
}

fn kubectl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl is on PATH after `eval \"$(bash dev/deps.sh env)\"`")
}

fn log_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().join("e2e-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_brings_up_a_stack_whose_real_services_pass_the_smoke_flow() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "e2e").await;
    let logs = log_dir();

    // The admin Secrets of the example, and the JWT secret the smoke client signs with.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let documents: Vec<Value> = serde_saphyr::from_multiple(EXAMPLE).unwrap();
    for mut doc in documents.iter().filter(|d| d["kind"] == "Secret").cloned() {
        if doc["metadata"]["name"] == "meridian-jwt" {
            doc["stringData"]["hmac-secret"] = json!(JWT_SECRET);
        }
        let secret: Secret = serde_json::from_value(doc).unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    // The operator and the runner, as processes, scoped to the test namespace.
    let state = logs.join(&ns.name);
    std::fs::create_dir_all(&state).unwrap();
    let operator_port = free_port();
    let operator = ChildProcess::spawn(
        &workspace_binary("meridian-operator"),
        &[
            ("PORT", operator_port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".to_owned()),
            ("WATCH_NAMESPACE", ns.name.clone()),
            ("LEASE_NAMESPACE", ns.name.clone()),
            ("RESYNC_SECONDS", "30".to_owned()),
            // The conversion webhook is the conversion test's to point the CRD at.
            ("WEBHOOK_ENABLED", "false".to_owned()),
            ("BACKOFF_MAX_SECONDS", "3".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ],
        &state.join("operator.log"),
    );
    let runner = ChildProcess::spawn(
        &workspace_binary("meridian-runner"),
        &[
            ("RUNNER_NAMESPACE", ns.name.clone()),
            ("RUNNER_STATE_DIR", state.display().to_string()),
            ("RUST_LOG", "info".to_owned()),
        ],
        &state.join("runner.log"),
    );

    // The example stack with one replica per service (two cores run all of it).
    let mut stack = documents
        .iter()
        .find(|d| d["kind"] == "MiddlewareStack")
        .cloned()
        .unwrap();
    stack["metadata"] = json!({ "name": "shop" });
    for service in [
        "gateway",
        "commandService",
        "processor",
        "cacheUpdater",
        "hub",
    ] {
        stack["spec"]["services"][service]["replicas"] = json!(1);
    }
    // Each run's namespace is new: drop its database when done rather than keep one per run.
    stack["spec"]["deletionPolicy"]["database"] = json!("Delete");
    // Every service exports its spans to the test.
    let traces = OtlpReceiver::start().await;
    stack["spec"]["telemetry"] = json!({ "otlpEndpoint": traces.endpoint(), "samplingRatio": 1.0 });
    let stacks: Api<MiddlewareStack> = ns.stacks();
    stacks
        .patch(
            "shop",
            &PatchParams::apply("meridian-e2e").force(),
            &Patch::Apply(&stack),
        )
        .await
        .unwrap();

    let wait = kubectl(&[
        "-n",
        &ns.name,
        "wait",
        "--for=condition=Ready",
        "middlewarestack/shop",
        "--timeout=240s",
    ]);
    assert!(
        wait.status.success(),
        "the stack did not become Ready: {}\n{}\n(logs in {})",
        String::from_utf8_lossy(&wait.stderr),
        String::from_utf8_lossy(
            &kubectl(&["-n", &ns.name, "describe", "middlewarestack", "shop"]).stdout
        ),
        state.display()
    );

    // Where the runner exposes the gateway and the hub.
    let endpoints = state.join("endpoints.json");
    let endpoint = |service: &str, port: u16| {
        let key = format!("{}/shop-{service}:{port}", ns.name);
        std::fs::read_to_string(&endpoints)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v["services"][&key].as_str().map(str::to_owned))
    };
    wait_until(
        "the runner to proxy the gateway and the hub",
        Duration::from_secs(30),
        || async { endpoint("api-gateway", 8080).is_some() && endpoint("ws-hub", 8085).is_some() },
    )
    .await;
    let gateway = endpoint("api-gateway", 8080).unwrap();
    let hub = endpoint("ws-hub", 8085).unwrap();
    // Readiness is on each pod's ops port, not on the port the Service exposes.
    let gateway_ops = || {
        let text = std::fs::read_to_string(&endpoints).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        value["pods"].as_array()?.iter().find_map(|pod| {
            (pod["namespace"] == ns.name.as_str()
                && pod["pod"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("shop-api-gateway-")))
            .then(|| pod["ops_port"].as_u64())
            .flatten()
        })
    };
    wait_until(
        "the gateway to be ready",
        Duration::from_secs(60),
        || async {
            let Some(port) = gateway_ops() else {
                return false;
            };
            common::test_support::get_json(&format!("http://127.0.0.1:{port}/ready"))
                .await
                .is_some_and(|(status, _)| status == 200)
        },
    )
    .await;
    let public_ready = common::test_support::get_json(&format!("http://{gateway}/ready")).await;
    assert_eq!(
        public_ready.map(|(status, _)| status),
        Some(404),
        "readiness is not served on the gateway's public port"
    );

    let smoke = |traceparent: Option<&'static str>| {
        let (gateway, hub, state) = (gateway.clone(), hub.clone(), state.clone());
        async move {
            let mut command = tokio::process::Command::new(workspace_binary("meridian-smoke"));
            command
                .args([
                    "--gateway",
                    &format!("http://{gateway}"),
                    "--hub",
                    &format!("ws://{hub}"),
                ])
                .env("SMOKE_JWT_SECRET", JWT_SECRET);
            if let Some(traceparent) = traceparent {
                command.args(["--traceparent", traceparent]);
            }
            let smoke = command.output().await.unwrap();
            let out = String::from_utf8_lossy(&smoke.stdout).into_owned();
            assert!(
                smoke.status.success(),
                "the smoke flow failed:\n{out}{}\n(service logs in {}/logs)",
                String::from_utf8_lossy(&smoke.stderr),
                state.display()
            );
            eprintln!("{out}");
            assert!(out.contains("smoke flow passed"), "{out}");
            out
        }
    };
    // A caller whose trace is not sampled, one with no trace, one with a sampled trace.
    smoke(Some(UNSAMPLED)).await;
    let untraced = smoke(None).await;
    smoke(Some(SAMPLED)).await;

    // One trace per command, through every hop, with the caller's parent when it sent one.
    let (caller_trace, caller_span) = (&SAMPLED[3..35], &SAMPLED[36..52]);
    assert_one_trace_through_every_hop(&traces, caller_trace, Some(caller_span)).await;
    let command_id = untraced
        .split_whitespace()
        .skip_while(|word| *word != "command")
        .nth(1)
        .unwrap()
        .to_owned();
    let processed = await_span(&traces, |span| {
        span.name == "processor.command" && span.attributes.get("command_id") == Some(&command_id)
    })
    .await;
    assert_one_trace_through_every_hop(&traces, &processed.trace_id, None).await;
    // Not sampled by the caller: dropped at every hop (its spans would have been exported
    // before the later traces' spans).
    assert_eq!(
        traces.trace(&UNSAMPLED[3..35]),
        vec![],
        "an unsampled trace was exported"
    );

    // Prometheus finds every service: through the stack's PodMonitor when the cluster serves
    // them (`just test` installs the prometheus-operator CRDs first), else through the pods'
    // scrape annotations.
    let kind = operator::build::pod_monitor_kind();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let templates = deployments
        .list(&ListParams::default().labels("app.kubernetes.io/instance=shop"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| d.spec.unwrap().template.metadata.unwrap())
        .collect::<Vec<_>>();
    assert_eq!(templates.len(), 5);
    let scrape_annotated = |meta: &ObjectMeta| {
        meta.annotations
            .as_ref()
            .is_some_and(|a| a.get("prometheus.io/scrape").map(String::as_str) == Some("true"))
    };
    if let Ok((resource, _)) = kube::discovery::pinned_kind(&client, &kind).await {
        let monitors: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns.name, &resource);
        let monitor = monitors.get("shop").await.unwrap();
        let selector = monitor.data["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .clone();
        for meta in &templates {
            let labels = meta.labels.as_ref().unwrap();
            assert!(
                selector
                    .iter()
                    .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()),
                "the PodMonitor does not select {labels:?}"
            );
            assert!(!scrape_annotated(meta), "scraped twice: {labels:?}");
        }
        eprintln!("ok   PodMonitor shop selects every service's pods");
    } else {
        assert!(templates.iter().all(scrape_annotated), "{templates:?}");
        eprintln!("ok   no PodMonitor API: every service's pods carry scrape annotations");
    }

    // `kubectl describe` tells the whole story.
    let describe = kubectl(&["-n", &ns.name, "describe", "middlewarestack", "shop"]);
    let text = String::from_utf8_lossy(&describe.stdout);
    for condition in [
        "DependenciesReady",
        "TopicsReady",
        "CredentialsReady",
        "CoreAvailable",
        "EdgeAvailable",
        "Ready",
    ] {
        assert!(
            text.contains(condition),
            "describe lacks {condition}:\n{text}"
        );
    }
    assert!(
        text.contains("Events:") && text.contains("Normal"),
        "describe shows no Events:\n{text}"
    );
    let status = stacks.get_status("shop").await.unwrap();
    let conditions = status.status.unwrap().conditions;
    assert!(
        conditions.iter().all(|c| c.status == "True"),
        "not every condition is True: {conditions:?}"
    );

    // Delete: the finalizer is released, the runner stops the processes.
    stacks
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the stack to be gone", Duration::from_secs(60), || async {
        stacks.get_opt("shop").await.unwrap().is_none()
    })
    .await;
    runner.terminate(Duration::from_secs(30)).await;
    operator.terminate(Duration::from_secs(30)).await;
    ns.delete().await;
}
