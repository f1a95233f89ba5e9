//! `meridian-runner` plays the kubelet (and kube-proxy) for the container-free e2e and the
//! demo: for every pod of a Meridian stack that the scheduler placed on a node (the kwok node
//! of the local control plane, where no container ever runs), it starts the matching service
//! binary on the local host with exactly the container's environment — Secret and ConfigMap
//! references resolved as the kubelet resolves them — and stops it when the pod goes.
//!
//! Because processes share the host's network, each gets a free `PORT` (and
//! `BIND_ADDRESS=127.0.0.1`), and every in-cluster Service address in its environment
//! (`name.namespace.svc:port`) is rewritten to a local TCP proxy that forwards to the running
//! processes of the pods the Service selects. Nothing else is changed, so the operator's
//! generated configuration and provisioned credentials are what the services really use.
//!
//! The runner writes `<state dir>/endpoints.json` (Service → local address, pod → process)
//! so scripts and tests find the gateway and the hub.
//!
//! Configuration (environment): `KUBECONFIG` (standard), `RUNNER_BIN_DIR` (the service
//! binaries; default: this binary's folder), `RUNNER_STATE_DIR` (endpoints file and process
//! logs; default `$MERIDIAN_STATE_DIR/runner` or `./runner`), `RUNNER_NAMESPACE` (default:
//! every namespace), `RUNNER_LABEL_SELECTOR` (default `app.kubernetes.io/part-of=meridian`),
//! `RUNNER_PREFER_SERVICE_PORTS` (`true`: a Service's proxy listens on the Service's own port
//! when it is free, e.g. the gateway on 8080; default `false`: ephemeral ports), `RUST_LOG`.

mod env;
mod process;
mod proxy;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, Client};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The runner's settings (environment variables `RUNNER_*`).
#[derive(Debug, Deserialize)]
struct Config {
    #[serde(default)]
    runner_bin_dir: Option<PathBuf>,
    #[serde(default)]
    runner_state_dir: Option<PathBuf>,
    #[serde(default)]
    meridian_state_dir: Option<PathBuf>,
    #[serde(default)]
    runner_namespace: Option<String>,
    #[serde(default = "default_selector")]
    runner_label_selector: String,
    #[serde(default)]
    runner_prefer_service_ports: bool,
}

fn default_selector() -> String {
    "app.kubernetes.io/part-of=meridian".to_owned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let vars = common::config::Vars::from_env();
    let common: common::config::CommonConfig = vars.parse().context("invalid settings")?;
    let _telemetry = common::telemetry::init("meridian-runner", &common)?;
    let config: Config = vars.parse().context("invalid RUNNER_* settings")?;
    let bin_dir = match config.runner_bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("the runner binary has no folder")?
            .to_path_buf(),
    };
    let state_dir = config
        .runner_state_dir
        .or(config.meridian_state_dir.map(|d| d.join("runner")))
        .unwrap_or_else(|| PathBuf::from("runner"));
    std::fs::create_dir_all(state_dir.join("logs"))
        .with_context(|| format!("cannot create {}", state_dir.display()))?;

    let client = Client::try_default()
        .await
        .context("cannot build a Kubernetes client (KUBECONFIG)")?;
    let shutdown = common::shutdown::on_signal();

    let (pod_api, services_api) = match &config.runner_namespace {
        Some(ns) => (
            Api::<Pod>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<Pod>::all(client.clone()),
            Api::<Service>::all(client.clone()),
        ),
    };
    let selector = watcher::Config::default().labels(&config.runner_label_selector);
    let (pod_store, pod_writer) = reflector::store();
    let (service_store, service_writer) = reflector::store();
    tokio::spawn(
        reflector(pod_writer, watcher(pod_api, selector.clone()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    tokio::spawn(
        reflector(service_writer, watcher(services_api, selector))
            .default_backoff()
            .for_each(|_| async {}),
    );
    pod_store
        .wait_until_ready()
        .await
        .context("pod watch failed")?;
    service_store
        .wait_until_ready()
        .await
        .context("service watch failed")?;

    let proxies = proxy::Proxies::new(
        service_store,
        pod_store.clone(),
        config.runner_prefer_service_ports,
        shutdown.clone(),
    );
    let mut supervisor =
        process::Supervisor::new(client, bin_dir, state_dir.clone(), Arc::clone(&proxies));
    tracing::info!(state = %state_dir.display(), "runner started");
    run(&mut supervisor, &pod_store, &proxies, &state_dir, &shutdown).await;
    supervisor.stop_all().await;
    Ok(())
}

async fn run(
    supervisor: &mut process::Supervisor,
    pods: &reflector::Store<Pod>,
    proxies: &Arc<proxy::Proxies>,
    state_dir: &std::path::Path,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut last_state = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        proxies.ensure_all();
        supervisor.sync(&pods.state()).await;
        let state = serde_json::json!({
            "services": proxies.snapshot(),
            "pods": supervisor.snapshot(),
        });
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        if text != last_state {
            let tmp = state_dir.join("endpoints.json.tmp");
            let written = std::fs::write(&tmp, &text)
                .and_then(|()| std::fs::rename(&tmp, state_dir.join("endpoints.json")));
            if let Err(error) = written {
                tracing::warn!(%error, "cannot write endpoints.json");
            }
            last_state = text;
        }
    }
}
