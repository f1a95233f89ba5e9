//! The operator binary: its environment ([`OperatorConfig`]), its Kubernetes client (which
//! counts every request it sends, by verb, in `operator_api_requests_total`), and
//! [`Operator`], the [`common::service::Service`] that serves `/health`, `/ready` and
//! `/metrics` and runs the controller while it holds the leader Lease.
use std::time::Duration;

use anyhow::Context as _;
use common::config::{CommonConfig, ConfigError, Vars};
use common::metrics::{OPERATOR_API_REQUESTS_TOTAL, OPERATOR_LEADER};
use common::service::{Service, ServiceConfig};
use common::shutdown::CancellationToken;
use kube::Client;
use kube::client::ClientBuilder;
use kube_lease_manager::LeaseManagerBuilder;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::controller::Settings;

/// The operator's own settings (besides [`CommonConfig`]).
#[derive(Debug, Clone, Deserialize)]
pub struct OperatorSettings {
    /// `WATCH_NAMESPACE`: reconcile stacks in this namespace only. Unset or empty: the whole
    /// cluster.
    pub watch_namespace: Option<String>,
    /// `LEASE_NAME`: the coordination Lease the replicas elect a leader with. Default
    /// `meridian-operator`.
    #[serde(default = "defaults::lease_name")]
    pub lease_name: String,
    /// `LEASE_NAMESPACE`: where the Lease lives. Default: `WATCH_NAMESPACE`, else `default`.
    pub lease_namespace: Option<String>,
    /// `LEASE_DURATION_SECONDS`: how long a leader's Lease lasts without renewal. Default 15.
    #[serde(default = "defaults::lease_duration_seconds")]
    pub lease_duration_seconds: u64,
    /// `POD_NAME`: this replica's identity in the Lease and in Events. Default: a random id.
    pub pod_name: Option<String>,
    /// `DEPENDENCY_TIMEOUT_MS`: the bound of each call to Kafka, Redis or PostgreSQL.
    /// Default 3000.
    #[serde(default = "defaults::dependency_timeout_ms")]
    pub dependency_timeout_ms: u64,
    /// `RESYNC_SECONDS`: how often a Ready stack is checked again (dependencies, topics,
    /// credentials, drift); also how long the result of those external checks is reused while
    /// nothing they depend on changed. Default 300.
    #[serde(default = "defaults::resync_seconds")]
    pub resync_seconds: u64,
    /// `HEALTH_CHECK_SECONDS`: how often a stack's Kafka, Redis and PostgreSQL are checked
    /// (a metadata request, `PING`, `SELECT 1`) between resyncs, so that `DependenciesReady`
    /// follows an outage within this period. Default 30.
    #[serde(default = "defaults::health_check_seconds")]
    pub health_check_seconds: u64,
    /// `BACKOFF_MAX_SECONDS`: the longest retry delay after failures (it starts at 1 s and
    /// doubles). Default 60.
    #[serde(default = "defaults::backoff_max_seconds")]
    pub backoff_max_seconds: u64,
    /// `CLEANUP_ATTEMPTS`: failed cleanups of a deleted stack before its finalizer is released
    /// with a Warning Event. Default 5.
    #[serde(default = "defaults::cleanup_attempts")]
    pub cleanup_attempts: u32,
    /// `RECONCILE_CONCURRENCY`: stacks reconciled at once. Default 16.
    #[serde(default = "defaults::concurrency")]
    pub reconcile_concurrency: u16,
    /// `RECONCILE_TIMEOUT_SECONDS`: the bound of one reconcile's work (see
    /// [`Settings::reconcile_timeout`]). Default 120.
    #[serde(default = "defaults::reconcile_timeout_seconds")]
    pub reconcile_timeout_seconds: u64,
    /// `KUBE_READ_TIMEOUT_SECONDS`: how long the Kubernetes client waits for a response (or
    /// for the next bytes of a watch) before failing the request. Default 295: the API server
    /// ends every watch after 290 s, so no healthy connection stays silent longer. kube-rs sets
    /// no bound by default, and one request the API server never answers would hold a
    /// reconcile — and the operator's shutdown — forever.
    #[serde(default = "defaults::kube_read_timeout_seconds")]
    pub kube_read_timeout_seconds: u64,
    /// `ROLLOUT_CONCURRENCY`: after an operator upgrade changes what it generates, stacks
    /// rolled onto the new version at once; each must become Available before another
    /// starts. Default 2.
    #[serde(default = "defaults::rollout_concurrency")]
    pub rollout_concurrency: usize,
    /// `ROLLOUT_TIMEOUT_SECONDS`: how long a stack in an upgrade wave may take to become
    /// Available before the wave halts (with a Warning Event on it). Default 600.
    #[serde(default = "defaults::rollout_timeout_seconds")]
    pub rollout_timeout_seconds: u64,
    /// `DEFAULT_IMAGE_REGISTRY`: the registry of services whose stack sets none (a mirror of
    /// the release's images). Default `ghcr.io/meridian-dev/meridian`.
    pub default_image_registry: Option<String>,
    /// `DEFAULT_IMAGE_TAG`: the tag of services whose stack sets none. Default: the
    /// operator's version.
    pub default_image_tag: Option<String>,
    /// `POD_NAMESPACE`: the namespace the operator runs in (the downward API); where the
    /// webhook's Secret and Service are. Default: `LEASE_NAMESPACE`, else `meridian-system`.
    pub pod_namespace: Option<String>,
    /// `WEBHOOK_ENABLED`: whether this operator serves the CRD's conversion webhook and keeps
    /// the CRD pointed at it. Default true; false when another installation of the operator
    /// in the cluster (one per watched namespace, say) serves it.
    #[serde(default = "defaults::webhook_enabled")]
    pub webhook_enabled: bool,
    /// `WEBHOOK_PORT`: the conversion webhook's HTTPS port (on `BIND_ADDRESS`). Default 9443.
    #[serde(default = "defaults::webhook_port")]
    pub webhook_port: u16,
    /// `WEBHOOK_SERVICE`: the Service the API server calls the webhook through (its
    /// certificate's names). Default `meridian-operator-webhook`.
    #[serde(default = "defaults::webhook_service")]
    pub webhook_service: String,
    /// `WEBHOOK_URL`: instead of a Service, the URL the API server calls (an operator running
    /// outside the cluster), for example `https://127.0.0.1:9443/convert`.
    pub webhook_url: Option<String>,
    /// `WEBHOOK_CERT_DIR`: serve `tls.crt` and `tls.key` from this directory (cert-manager's
    /// Secret, mounted) instead of certificates the operator issues; the CRD's `caBundle` is
    /// then cert-manager's CA injector's to write.
    pub webhook_cert_dir: Option<String>,
    /// `WEBHOOK_SECRET`: the Secret holding the certificates the operator issues. Default
    /// `meridian-operator-webhook-tls`.
    #[serde(default = "defaults::webhook_secret")]
    pub webhook_secret: String,
    /// `WEBHOOK_REFRESH_SECONDS`: how often the webhook's certificate is checked (renewed
    /// when due, re-read from the Secret or the directory). Default 300.
    #[serde(default = "defaults::webhook_refresh_seconds")]
    pub webhook_refresh_seconds: u64,
}

mod defaults {
    pub fn lease_name() -> String {
        "meridian-operator".to_owned()
    }
    pub fn lease_duration_seconds() -> u64 {
        15
    }
    pub fn dependency_timeout_ms() -> u64 {
        3000
    }
    pub fn health_check_seconds() -> u64 {
        30
    }
    pub fn resync_seconds() -> u64 {
        300
    }
    pub fn backoff_max_seconds() -> u64 {
        60
    }
    pub fn cleanup_attempts() -> u32 {
        5
    }
    pub fn concurrency() -> u16 {
        16
    }
    pub fn reconcile_timeout_seconds() -> u64 {
        120
    }
    pub fn kube_read_timeout_seconds() -> u64 {
        295
    }
    pub fn rollout_concurrency() -> usize {
        2
    }
    pub fn rollout_timeout_seconds() -> u64 {
        600
    }
    pub fn webhook_enabled() -> bool {
        true
    }
    pub fn webhook_port() -> u16 {
        crate::webhook::DEFAULT_PORT
    }
    pub fn webhook_service() -> String {
        crate::webhook::DEFAULT_SERVICE.to_owned()
    }
    pub fn webhook_secret() -> String {
        crate::webhook::DEFAULT_SECRET.to_owned()
    }
    pub fn webhook_refresh_seconds() -> u64 {
        300
    }
}

/// Everything the operator binary reads from the environment.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// `PORT` (default 8090), `LOG_FORMAT`, `RUST_LOG`, `OTEL_*`, ...
    pub common: CommonConfig,
    /// The operator's own settings.
    pub operator: OperatorSettings,
}

impl ServiceConfig for OperatorConfig {
    fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            common: vars.parse()?,
            operator: vars.parse()?,
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

impl OperatorConfig {
    /// The controller's settings.
    pub fn settings(&self) -> Settings {
        let o = &self.operator;
        Settings {
            namespace: o.watch_namespace.clone().filter(|n| !n.is_empty()),
            dependency_timeout: Duration::from_millis(o.dependency_timeout_ms),
            resync: Duration::from_secs(o.resync_seconds),
            health_check: Duration::from_secs(o.health_check_seconds.max(1)),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(o.backoff_max_seconds),
            cleanup_attempts: o.cleanup_attempts,
            concurrency: o.reconcile_concurrency,
            reconcile_timeout: Duration::from_secs(o.reconcile_timeout_seconds),
            instance: o.pod_name.clone(),
            version: crate::crd::RELEASE_TAG.to_owned(),
            release: crate::crd::Release {
                registry: o
                    .default_image_registry
                    .clone()
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| crate::crd::RELEASE_REGISTRY.to_owned()),
                tag: o
                    .default_image_tag
                    .clone()
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| crate::crd::RELEASE_TAG.to_owned()),
            },
            rollout_concurrency: o.rollout_concurrency.max(1),
            rollout_timeout: Duration::from_secs(o.rollout_timeout_seconds),
        }
    }
}

impl OperatorConfig {
    /// The conversion webhook's settings.
    pub fn webhook(&self) -> crate::webhook::WebhookSettings {
        use crate::webhook::{Certificates, ClientConfig};
        let o = &self.operator;
        let namespace = [&o.pod_namespace, &o.lease_namespace]
            .into_iter()
            .flatten()
            .find(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| crate::webhook::DEFAULT_NAMESPACE.to_owned());
        let client = match o.webhook_url.clone().filter(|u| !u.is_empty()) {
            Some(url) => ClientConfig::Url(url),
            None => ClientConfig::Service {
                namespace: namespace.clone(),
                name: o.webhook_service.clone(),
            },
        };
        let certificates = match o.webhook_cert_dir.clone().filter(|d| !d.is_empty()) {
            Some(dir) => Certificates::Directory(dir.into()),
            None => Certificates::SelfManaged {
                namespace,
                secret: o.webhook_secret.clone(),
                lifetimes: crate::webhook::certs::Lifetimes::default(),
            },
        };
        crate::webhook::WebhookSettings {
            client,
            certificates,
            refresh: Duration::from_secs(o.webhook_refresh_seconds.max(1)),
        }
    }
}

/// A Kubernetes client (from `KUBECONFIG` or the in-cluster service account), see
/// [`client_with`].
///
/// # Errors
/// When no configuration is found or the client cannot be built.
pub async fn counting_client(read_timeout: Duration) -> anyhow::Result<Client> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    client_with(config, read_timeout)
}

/// A Kubernetes client for `config` that fails a request whose response (or next watch event)
/// does not come within `read_timeout`, counted from when the request was written, and that
/// counts every request it sends in `operator_api_requests_total{verb, resource}` (`verb` =
/// HTTP method, so `POST`, `PUT`, `PATCH` and `DELETE` are writes; `resource` = the plural
/// resource name, e.g. `deployments`, `leases`, `events`).
///
/// # Errors
/// When the client cannot be built from `config`.
pub fn client_with(mut config: kube::Config, read_timeout: Duration) -> anyhow::Result<Client> {
    config.read_timeout = Some(read_timeout);
    // Otherwise the time a pooled connection sat idle counts against the next response.
    config.reset_reader_on_write = true;
    let count = tower::util::MapRequestLayer::new(|request: http::Request<kube::client::Body>| {
        metrics::counter!(
            OPERATOR_API_REQUESTS_TOTAL,
            "verb" => request.method().as_str().to_owned(),
            "resource" => resource_of(request.uri().path()).to_owned()
        )
        .increment(1);
        request
    });
    Ok(ClientBuilder::try_from(config)
        .context("invalid Kubernetes configuration")?
        .with_layer(&count)
        .build())
}

/// The plural resource of an API path: `/apis/apps/v1/namespaces/x/deployments/y` →
/// `deployments`, `/api/v1/namespaces/x` → `namespaces`, `/apis/g/v1/things` → `things`.
pub fn resource_of(path: &str) -> &str {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Skip `api/<version>` or `apis/<group>/<version>`.
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    match rest {
        ["namespaces", _, resource, ..] => resource,
        [resource, ..] => resource,
        [] => "other",
    }
}

/// The operator as a [`Service`]: `common::service::main::<Operator>()` is its `main`.
pub struct Operator;

impl Service for Operator {
    const NAME: &'static str = "meridian-operator";
    const DEFAULT_PORT: u16 = 8090;
    type Config = OperatorConfig;

    #[allow(
        clippy::manual_async_fn,
        reason = "the trait requires a Send + 'static future"
    )]
    fn start(
        listener: TcpListener,
        config: OperatorConfig,
        shutdown: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
        async move {
            let read_timeout = Duration::from_secs(config.operator.kube_read_timeout_seconds);
            let client = counting_client(read_timeout).await?;
            let mut ops = common::http::Ops::new(Self::NAME, &config.common);
            // Every replica serves conversions, leader or not; it is ready once it can.
            let webhook = if config.operator.webhook_enabled {
                let addr = std::net::SocketAddr::new(
                    config.common.bind_address,
                    config.operator.webhook_port,
                );
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("failed to bind the webhook's port {addr}"))?;
                let webhook = std::sync::Arc::new(crate::webhook::Webhook::new(
                    client.clone(),
                    config.webhook(),
                ));
                ops = ops.with(webhook.serving());
                Some(tokio::spawn(webhook.run(
                    listener,
                    ops.limits,
                    shutdown.clone(),
                )))
            } else {
                None
            };
            let router = common::http::instrument(common::http::ops_router(&ops), Self::NAME);
            let server = {
                let (ops, shutdown) = (ops.clone(), shutdown.clone());
                tokio::spawn(
                    async move { common::http::serve(listener, router, &ops, shutdown).await },
                )
            };
            let result = lead(client, &config, shutdown.clone()).await;
            shutdown.cancel();
            server.await.context("the HTTP server panicked")??;
            if let Some(webhook) = webhook {
                webhook.await.context("the webhook panicked")??;
            }
            result
        }
    }
}

/// Runs the controller while this replica holds the Lease; stops it when the Lease is lost
/// and campaigns again, until `shutdown`.
async fn lead(
    client: Client,
    config: &OperatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let o = &config.operator;
    let identity = o
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("meridian-operator-{}", uuid_like()));
    let namespace = o
        .lease_namespace
        .clone()
        .or_else(|| o.watch_namespace.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let manager = LeaseManagerBuilder::new(client.clone(), &o.lease_name)
        .with_namespace(&namespace)
        .with_identity(&identity)
        .with_duration(o.lease_duration_seconds)
        .with_grace(o.lease_duration_seconds.div_ceil(3).max(1))
        .build()
        .await
        .context("failed to set up leader election")?;
    let (mut leader, task) = manager.watch().await;
    tracing::info!(%identity, lease = %o.lease_name, %namespace, "Campaigning for leadership.");
    loop {
        metrics::gauge!(OPERATOR_LEADER).set(0.0);
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = leader.wait_for(|is_leader| *is_leader) => {
                if changed.is_err() { break; }
            }
        }
        tracing::info!(%identity, "Leading: starting the controller.");
        metrics::gauge!(OPERATOR_LEADER).set(1.0);
        let stop = shutdown.child_token();
        if o.webhook_enabled && o.watch_namespace.as_deref().is_none_or(str::is_empty) {
            tokio::spawn(migrate_storage(client.clone(), stop.clone()));
        }
        let controller = tokio::spawn(crate::controller::run(
            client.clone(),
            config.settings(),
            stop.clone(),
        ));
        tokio::select! {
            () = shutdown.cancelled() => {}
            _ = leader.wait_for(|is_leader| !*is_leader) => {
                tracing::warn!(%identity, "Lost the Lease: stopping the controller.");
            }
        }
        stop.cancel();
        stop_controller(controller, CONTROLLER_STOP_GRACE).await?;
        if shutdown.is_cancelled() {
            break;
        }
    }
    drop(leader);
    match task.await {
        Ok(Ok(_)) => tracing::info!(%identity, "Released the Lease."),
        Ok(Err(error)) => tracing::warn!(%error, "Releasing the Lease failed."),
        Err(error) => tracing::warn!(%error, "The leader-election task panicked."),
    }
    Ok(())
}

/// Retries [`crate::webhook::migrate_storage`] (which needs the webhook serving) until it
/// succeeds or `stop` fires.
async fn migrate_storage(client: Client, stop: CancellationToken) {
    let mut retry = Duration::from_secs(2);
    loop {
        match crate::webhook::migrate_storage(&client).await {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, retry_seconds = retry.as_secs(), "Failed to migrate the stacks to the storage version.");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(300));
    }
}

/// How long a stopping controller may take to finish its reconciles before they are cancelled.
/// Without the Lease another replica is about to lead; this one must stop writing soon.
const CONTROLLER_STOP_GRACE: Duration = Duration::from_secs(10);

/// Waits up to `grace` for the (cancelled) controller to finish its running reconciles, then
/// aborts it, which drops them (they are idempotent and retried by the next leader).
async fn stop_controller(
    mut controller: tokio::task::JoinHandle<Result<(), crate::controller::Error>>,
    grace: Duration,
) -> anyhow::Result<()> {
    let finished = match tokio::time::timeout(grace, &mut controller).await {
        Ok(finished) => finished,
        Err(_) => {
            tracing::warn!(
                ?grace,
                "Reconciles still running after the grace period: cancelling them."
            );
            controller.abort();
            controller.await
        }
    };
    match finished {
        Err(error) if error.is_cancelled() => Ok(()),
        finished => Ok(finished.context("the controller panicked")??),
    }
}

fn uuid_like() -> String {
    use rand::Rng as _;
    format!("{:016x}", rand::rng().random::<u64>())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{client_with, resource_of, stop_controller};

    /// An API server that accepts connections and reads requests but never answers.
    async fn silent_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut socket, &mut tokio::io::sink()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_request_the_api_server_never_answers_fails_after_the_read_timeout() {
        let addr = silent_server().await;
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = client_with(config, Duration::from_millis(300)).unwrap();
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
            .await
            .expect("the request must fail on its own, not hang");
        assert!(answer.is_err(), "{answer:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_controller_that_does_not_stop_is_cancelled_after_the_grace_period() {
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let stuck = tokio::spawn(async move {
            let _dropped = dropped_tx; // dropped (closing the channel) when the task is aborted
            futures::future::pending::<Result<(), crate::controller::Error>>().await
        });
        stop_controller(stuck, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(dropped_rx.await.is_err(), "the stuck reconcile was dropped");

        let finished = tokio::spawn(async { Ok(()) });
        stop_controller(finished, Duration::from_secs(10))
            .await
            .unwrap();
        let failed = tokio::spawn(async {
            Err(crate::controller::Error::TimedOut {
                work: "reconcile",
                after: Duration::from_secs(1),
            })
        });
        assert!(
            stop_controller(failed, Duration::from_secs(10))
                .await
                .is_err()
        );
    }

    #[test]
    fn resources_are_read_from_api_paths() {
        let cases = [
            ("/apis/apps/v1/namespaces/x/deployments/y", "deployments"),
            ("/api/v1/namespaces/x/secrets", "secrets"),
            ("/api/v1/namespaces/x", "namespaces"),
            (
                "/apis/meridian.dev/v1beta1/middlewarestacks",
                "middlewarestacks",
            ),
            (
                "/apis/coordination.k8s.io/v1/namespaces/x/leases/l",
                "leases",
            ),
            ("/version", "other"),
        ];
        for (path, resource) in cases {
            assert_eq!(resource_of(path), resource, "{path}");
        }
    }
}
