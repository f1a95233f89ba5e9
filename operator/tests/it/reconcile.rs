//! The controller against the real control plane and the real Kafka, Redis and PostgreSQL:
//! each test runs `operator::run` in-process, watching only its own namespace.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::test_support::{Deps, TcpToggle, wait_until};
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use operator::crd::MiddlewareStack;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admission::{TestNamespace, client, install_crd};

const READY_TIMEOUT: Duration = Duration::from_secs(40);

/// The operator running in-process on one test namespace.
struct Harness {
    client: Client,
    ns: TestNamespace,
    settings: operator::Settings,
    stop: CancellationToken,
    task: JoinHandle<Result<(), operator::controller::Error>>,
}

impl Harness {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, Duration::from_secs(2)).await
    }

    /// An operator that redoes the external stages every `resync` and checks the
    /// dependencies every second.
    async fn start_with(prefix: &str, resync: Duration) -> Self {
        Self::start_configured(prefix, |s| s.resync = resync).await
    }

    /// An operator with the test settings, changed by `change`.
    async fn start_configured(prefix: &str, change: impl FnOnce(&mut operator::Settings)) -> Self {
        let client = client().await;
        install_crd(&client).await;
        let ns = TestNamespace::create(&client, prefix).await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
        for (name, data) in [
            (
                "pg-admin",
                json!({ "username": "postgres", "password": "postgres" }),
            ),
            (
                "redis-admin",
                json!({ "username": "default", "password": "" }),
            ),
            ("jwt", json!({ "hmac-secret": "test-only-secret" })),
        ] {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": { "name": name }, "stringData": data
            }))
            .unwrap();
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
        }
        let settings = operator::Settings {
            namespace: Some(ns.name.clone()),
            dependency_timeout: Duration::from_secs(2),
            resync: Duration::from_secs(2),
            health_check: Duration::from_secs(1),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(2),
            cleanup_attempts: 3,
            concurrency: 4,
            reconcile_timeout: Duration::from_secs(60),
            instance: Some("it".to_owned()),
            ..operator::Settings::default()
        };
        let mut settings = settings;
        change(&mut settings);
        let stop = CancellationToken::new();
        let task = tokio::spawn(operator::run(
            client.clone(),
            settings.clone(),
            stop.clone(),
        ));
        Self {
            client,
            ns,
            settings,
            stop,
            task,
        }
    }

    /// Stops the operator and starts it again with its settings changed by `change` (an
    /// upgrade to another version, say).
    async fn restart(&mut self, change: impl FnOnce(&mut operator::Settings)) {
        self.stop_operator().await;
        change(&mut self.settings);
        self.start_operator();
    }

    /// Stops the operator (its memory goes with it).
    async fn stop_operator(&mut self) {
        self.stop.cancel();
        (&mut self.task).await.unwrap().unwrap();
    }

    /// Starts a new operator with the harness's settings.
    fn start_operator(&mut self) {
        self.stop = CancellationToken::new();
        self.task = tokio::spawn(operator::run(
            self.client.clone(),
            self.settings.clone(),
            self.stop.clone(),
        ));
    }

    fn stacks(&self) -> Api<MiddlewareStack> {
        self.ns.stacks()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Applies `stack` and waits until it is Ready.
    async fn apply_ready(&self, stack: &Value) {
        self.apply(stack).await;
        let name = stack["metadata"]["name"].as_str().unwrap();
        self.wait_for_condition(name, "Ready", "True", None).await;
    }

    async fn apply(&self, stack: &Value) -> MiddlewareStack {
        crate::admission::apply(&self.stacks(), stack)
            .await
            .unwrap()
    }

    async fn get(&self, name: &str) -> MiddlewareStack {
        self.stacks().get(name).await.unwrap()
    }

    /// The message of the stack's condition `type_`.
    async fn condition_message(&self, name: &str, type_: &str) -> String {
        self.get(name)
            .await
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("{name} has no {type_} condition"))
            .message
    }

    async fn wait_for_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) {
        let stacks = self.stacks();
        wait_until(
            &format!("{name}: {type_}={status} ({reason:?})"),
            READY_TIMEOUT,
            || {
                let stacks = stacks.clone();
                async move {
                    let stack = stacks.get(name).await.unwrap();
                    condition(&stack, type_).is_some_and(|(s, r)| {
                        s == status && reason.is_none_or(|reason| r == reason)
                    })
                }
            },
        )
        .await;
    }

    /// Deletes the stacks (while the operator runs, so their finalizers are released), stops
    /// the operator, deletes the namespace.
    async fn finish(self) {
        let stacks = self.stacks();
        for stack in stacks.list(&ListParams::default()).await.unwrap() {
            let _ = stacks
                .delete(&stack.name_any(), &DeleteParams::default())
                .await;
        }
        wait_until("every stack to be gone", READY_TIMEOUT, || {
            let stacks = stacks.clone();
            async move {
                stacks
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .is_empty()
            }
        })
        .await;
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.ns.delete().await;
    }
}

fn condition(stack: &MiddlewareStack, type_: &str) -> Option<(String, String)> {
    stack
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// A small stack on the local dependencies, its Redis behind `redis_url`.
fn stack(name: &str, redis_url: &str, topics_policy: &str) -> Value {
    json!({
        "apiVersion": "meridian.dev/v1beta1",
        "kind": "MiddlewareStack",
        "metadata": { "name": name },
        "spec": {
            "image": { "registry": "registry.invalid/meridian", "tag": "0.1.0" },
            "kafka": {
                "bootstrapServers": Deps::from_env().kafka_bootstrap_servers,
                "topics": {
                    "commands": { "partitions": 2 },
                    "events": { "partitions": 3, "config": { "retention.ms": "3600000" } },
                    "cache": { "partitions": 1 },
                    "dlq": { "partitions": 1 }
                }
            },
            "redis": { "url": redis_url, "adminSecretRef": { "name": "redis-admin" } },
            "postgres": {
                "host": "127.0.0.1", "port": 5432, "database": "postgres",
                "sslMode": "disable", "adminSecretRef": { "name": "pg-admin" }
            },
            "auth": {
                "jwtSecretRef": { "name": "jwt", "key": "hmac-secret" },
                "issuer": "https://issuer.test/", "audience": "meridian"
            },
            "deletionPolicy": {
                "topics": topics_policy, "database": topics_policy, "credentials": "Delete"
            }
        }
    })
}

fn secret_url(secret: &Secret) -> String {
    secret_key(secret, "url")
}

fn secret_key(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// Partition counts of the named topics (`None`: missing), from a fresh metadata request.
fn topic_partitions(names: &[String]) -> BTreeMap<String, Option<usize>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set(
            "bootstrap.servers",
            Deps::from_env().kafka_bootstrap_servers,
        )
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(5))
        .unwrap();
    names
        .iter()
        .map(|name| {
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len());
            (name.clone(), partitions)
        })
        .collect()
}

/// Records the order in which the stack's Secrets and Deployments first appear.
fn record_creation_order(harness: &Harness) -> Arc<Mutex<Vec<String>>> {
    let order = Arc::new(Mutex::new(Vec::new()));
    let config = watcher::Config::default().labels(operator::controller::MANAGED_SELECTOR);
    let deployments = watcher(harness.api::<Deployment>(), config.clone())
        .applied_objects()
        .map(|d| d.map(|d| format!("deployment/{}", d.name_any())))
        .boxed();
    let secrets = watcher(harness.api::<Secret>(), config)
        .applied_objects()
        .map(|s| s.map(|s| format!("secret/{}", s.name_any())))
        .boxed();
    let sink = order.clone();
    tokio::spawn(async move {
        let mut both = futures::stream::select(deployments, secrets);
        while let Some(Ok(name)) = both.next().await {
            let mut order = sink.lock().unwrap();
            if !order.contains(&name) {
                order.push(name);
            }
        }
    });
    order
}

#[tokio::test]
async fn a_stack_is_provisioned_in_stage_order_becomes_ready_follows_changes_and_cleans_up() {
    let harness = Harness::start("reconcile").await;
    let deps = Deps::from_env();
    let order = record_creation_order(&harness);
    let ns = harness.ns.name.clone();

    harness
        .apply(&stack("alpha", &deps.redis_url, "Retain"))
        .await;
    harness
        .apply(&stack("beta", &deps.redis_url, "Delete"))
        .await;
    for name in ["alpha", "beta"] {
        harness
            .wait_for_condition(name, "Ready", "True", Some("AllStagesReady"))
            .await;
    }

    // Stage order: connection Secrets, then the core Deployments, then the hub, then the gateway.
    let order = order.lock().unwrap().clone();
    let position = |name: &str| {
        order
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} never appeared: {order:?}"))
    };
    let secrets = position("secret/alpha-redis").max(position("secret/alpha-postgres"));
    let core = ["command-service", "processor", "cache-updater"]
        .map(|c| position(&format!("deployment/alpha-{c}")));
    let hub = position("deployment/alpha-ws-hub");
    let gateway = position("deployment/alpha-api-gateway");
    assert!(core.iter().all(|c| *c > secrets), "{order:?}");
    assert!(core.iter().all(|c| *c < hub), "{order:?}");
    assert!(hub < gateway, "{order:?}");

    let alpha = harness.get("alpha").await;
    let status = alpha.status.clone().unwrap();
    // Applications find the stack's URLs in its endpoints ConfigMap, named in the status.
    assert_eq!(status.endpoints.as_deref(), Some("alpha-endpoints"));
    assert_eq!(status.services_ready.as_deref(), Some("5/5"));
    let endpoints = harness
        .api::<k8s_openapi::api::core::v1::ConfigMap>()
        .get("alpha-endpoints")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(
        endpoints["GATEWAY_URL"],
        format!("http://alpha-api-gateway.{}.svc:8080", harness.ns.name)
    );
    assert_eq!(endpoints["JWT_AUDIENCE"], "meridian");
    // The internal services take traffic only from the stack's gateway and metrics scrapers.
    let policies: Api<NetworkPolicy> = harness.api();
    let policy = policies.get("alpha-internal").await.unwrap().spec.unwrap();
    let selected = policy.pod_selector.unwrap().match_expressions.unwrap();
    assert_eq!(
        selected[0].values.as_deref().unwrap(),
        ["command-service", "processor", "cache-updater"]
    );
    let ingress = policy.ingress.unwrap();
    let from_gateway = ingress[0].from.as_ref().unwrap()[0].pod_selector.as_ref();
    assert_eq!(
        from_gateway.unwrap().match_labels.as_ref().unwrap()["app.kubernetes.io/name"],
        "api-gateway"
    );
    assert_eq!(ingress.len(), 2, "the gateway and the default scrapers");
    assert_eq!(status.observed_generation, alpha.metadata.generation);
    assert_eq!(status.phase, Some(operator::crd::Phase::Ready));
    for type_ in [
        "DependenciesReady",
        "TopicsReady",
        "CredentialsReady",
        "CoreAvailable",
        "EdgeAvailable",
    ] {
        assert_eq!(condition(&alpha, type_).unwrap().0, "True", "{type_}");
    }
    assert_eq!(status.services.len(), 5);
    assert_eq!(status.services["api-gateway"].ready_replicas, 1);

    // The topics exist with the requested partitions.
    let topic = |stack: &str, t: &str| format!("{ns}.{stack}.{t}");
    let alpha_topics: Vec<String> = ["commands", "events", "cache", "commands.dlq"]
        .iter()
        .map(|t| topic("alpha", t))
        .collect();
    let partitions = topic_partitions(&alpha_topics);
    let expected: BTreeMap<String, Option<usize>> = alpha_topics
        .iter()
        .cloned()
        .zip([Some(2), Some(3), Some(1), Some(1)])
        .collect();
    assert_eq!(partitions, expected);

    // The Redis user works under its prefix only.
    let secrets: Api<Secret> = harness.api();
    let redis_url = secret_url(&secrets.get("alpha-redis").await.unwrap());
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let prefix = format!("meridian:{ns}:alpha:");
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}probe"))
        .arg("1")
        .query_async(&mut redis)
        .await
        .unwrap();
    let denied: Result<(), _> = redis::cmd("SET")
        .arg(format!("meridian:{ns}:beta:probe"))
        .arg("1")
        .query_async(&mut redis)
        .await;
    let denied = denied.unwrap_err();
    assert!(denied.to_string().contains("no permissions"), "{denied}");
    let denied: Result<i64, _> = redis::cmd("PUBLISH")
        .arg("elsewhere")
        .arg("x")
        .query_async(&mut redis)
        .await;
    let denied = denied.unwrap_err();
    assert!(denied.to_string().contains("no permissions"), "{denied}");
    let denied: Result<redis::Value, _> = redis::cmd("FLUSHALL").query_async(&mut redis).await;
    assert!(denied.is_err(), "a @dangerous command must be refused");

    // The PostgreSQL role connects to its own database, not to another stack's.
    let alpha_url = secret_url(&secrets.get("alpha-postgres").await.unwrap());
    let beta_url = secret_url(&secrets.get("beta-postgres").await.unwrap());
    let beta_role = secret_key(&secrets.get("beta-postgres").await.unwrap(), "username");
    let mut pg = sqlx::PgConnection::connect(&alpha_url).await.unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut pg)
        .await
        .unwrap();
    let alpha_role = secret_key(&secrets.get("alpha-postgres").await.unwrap(), "username");
    assert!(alpha_role.starts_with("mws_"), "{alpha_role}");
    assert_eq!(database, alpha_role);
    sqlx::query("CREATE TABLE probe (id int)")
        .execute(&mut pg)
        .await
        .unwrap();
    pg.close().await.unwrap();
    let beta_db = beta_url
        .rsplit_once('/')
        .unwrap()
        .1
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let cross = alpha_url.replacen(&format!("/{alpha_role}?"), &format!("/{beta_db}?"), 1);
    let refused = sqlx::PgConnection::connect(&cross)
        .await
        .expect_err("connected to beta's database");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );

    // `kubectl wait` sees the Ready condition.
    let out = tokio::process::Command::new("kubectl")
        .args([
            "wait",
            "--for=condition=Ready",
            "middlewarestack/alpha",
            "-n",
            &ns,
            "--timeout=20s",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A spec change rolls through: the Deployment follows and the generation is observed.
    let mut changed = stack("alpha", &deps.redis_url, "Retain");
    changed["spec"]["services"] = json!({ "processor": { "replicas": 2 } });
    changed["spec"]["networkPolicy"] = json!({ "enabled": false });
    let applied = harness.apply(&changed).await;
    let generation = applied.metadata.generation;
    let deployments: Api<Deployment> = harness.api();
    wait_until("the processor to scale to 2", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("alpha-processor").await.unwrap();
            d.spec.unwrap().replicas == Some(2)
        }
    })
    .await;
    let stacks = harness.stacks();
    wait_until(
        "the new generation to be observed and Ready",
        READY_TIMEOUT,
        || {
            let stacks = stacks.clone();
            async move {
                let s = stacks.get("alpha").await.unwrap();
                let status = s.status.clone().unwrap_or_default();
                status.observed_generation == generation
                    && condition(&s, "Ready").is_some_and(|(st, _)| st == "True")
                    && status
                        .services
                        .get("processor")
                        .is_some_and(|p| p.ready_replicas == 2)
            }
        },
    )
    .await;
    wait_until("the NetworkPolicy to be deleted", READY_TIMEOUT, || {
        let policies = policies.clone();
        async move { policies.get_opt("alpha-internal").await.unwrap().is_none() }
    })
    .await;
    let pdbs: Api<PodDisruptionBudget> = harness.api();
    assert!(
        pdbs.get_opt("alpha-processor").await.unwrap().is_some(),
        "2 replicas get a PDB"
    );

    // Clients call the command service, the hub and the gateway through a virtual IP; the
    // processor and the cache updater are headless. A processor Service with a virtual IP (as
    // an older operator made it) is replaced by a headless one: clusterIP cannot change in
    // place. The stack is paused while the old-style Service is put in place.
    let services: Api<Service> = harness.api();
    let cluster_ip = |service: Service| service.spec.and_then(|s| s.cluster_ip);
    for (name, headless) in [
        ("alpha-processor", true),
        ("alpha-cache-updater", true),
        ("alpha-command-service", false),
        ("alpha-ws-hub", false),
        ("alpha-api-gateway", false),
    ] {
        let ip = cluster_ip(services.get(name).await.unwrap()).unwrap();
        assert_eq!(ip == "None", headless, "{name}: clusterIP {ip}");
        assert!(
            headless || ip.parse::<std::net::IpAddr>().is_ok(),
            "{name}: {ip}"
        );
    }
    let mut paused = changed.clone();
    paused["spec"]["paused"] = json!(true);
    harness.apply(&paused).await;
    harness
        .wait_for_condition("alpha", "Ready", "False", Some("Paused"))
        .await;
    let current = services.get("alpha-processor").await.unwrap();
    services
        .delete("alpha-processor", &DeleteParams::default())
        .await
        .unwrap();
    let legacy = Service {
        metadata: kube::api::ObjectMeta {
            name: current.metadata.name.clone(),
            labels: current.metadata.labels.clone(),
            owner_references: current.metadata.owner_references.clone(),
            ..kube::api::ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: current.spec.as_ref().and_then(|s| s.selector.clone()),
            ports: current.spec.as_ref().and_then(|s| s.ports.clone()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let created = services
        .create(&PostParams::default(), &legacy)
        .await
        .unwrap();
    assert_ne!(cluster_ip(created).as_deref(), Some("None"));
    harness.apply(&changed).await;
    wait_until(
        "the processor's Service to be headless again",
        READY_TIMEOUT,
        || {
            let services = services.clone();
            async move {
                services
                    .get_opt("alpha-processor")
                    .await
                    .unwrap()
                    .and_then(cluster_ip)
                    .as_deref()
                    == Some("None")
            }
        },
    )
    .await;
    harness
        .wait_for_condition("alpha", "Ready", "True", None)
        .await;

    // Events tell the story.
    let events: Api<Event> = harness.api();
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("alpha"))
        .filter_map(|e| e.reason)
        .collect();
    for expected in [
        "DependenciesReadyTrue",
        "TopicsUpdated",
        "CredentialsReadyTrue",
        "Applied",
        "ReadyTrue",
    ] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "{expected} missing in {reasons:?}"
        );
    }
    let describe = tokio::process::Command::new("kubectl")
        .args(["describe", "middlewarestack", "alpha", "-n", &ns])
        .output()
        .await
        .unwrap();
    let describe = String::from_utf8_lossy(&describe.stdout).into_owned();
    assert!(describe.contains("ReadyTrue"), "{describe}");
    println!("{describe}");

    // Delete: logins dropped (policy Delete); alpha's topics and database kept (its owner
    // role can no longer log in), beta's deleted.
    let stacks = harness.stacks();
    for name in ["alpha", "beta"] {
        stacks.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_until("the finalizers to be released", READY_TIMEOUT, || {
        let stacks = stacks.clone();
        async move {
            stacks
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
        }
    })
    .await;
    let mut admin = redis::Client::open(deps.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let user: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(format!("meridian:{ns}:alpha"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(user, redis::Value::Nil, "the Redis user is deleted");
    let mut pg = sqlx::PgConnection::connect(&deps.database_url)
        .await
        .unwrap();
    let can_login = |role: String| {
        sqlx::query_scalar::<_, bool>("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
            .bind(role)
    };
    let alpha_login = can_login(alpha_role.clone())
        .fetch_optional(&mut pg)
        .await
        .unwrap();
    assert_eq!(
        alpha_login,
        Some(false),
        "alpha's owner role stays, without login"
    );
    let beta_login = can_login(beta_role.clone())
        .fetch_optional(&mut pg)
        .await
        .unwrap();
    assert_eq!(beta_login, None, "beta's role is dropped");
    let databases: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname = ANY($1) ORDER BY datname",
    )
    .bind(vec![alpha_role.clone(), beta_db.clone()])
    .fetch_all(&mut pg)
    .await
    .unwrap();
    assert_eq!(
        databases,
        vec![alpha_role.clone()],
        "alpha's database alone is kept"
    );
    let alpha_admin_url = {
        let mut url = url::Url::parse(&deps.database_url).unwrap();
        url.set_path(&alpha_role);
        url.to_string()
    };
    let mut alpha_db = sqlx::PgConnection::connect(&alpha_admin_url).await.unwrap();
    let probe: Option<String> = sqlx::query_scalar("SELECT to_regclass('probe')::text")
        .fetch_one(&mut alpha_db)
        .await
        .unwrap();
    assert_eq!(probe.as_deref(), Some("probe"), "alpha's tables are kept");
    alpha_db.close().await.unwrap();
    sqlx::query(&format!("DROP DATABASE \"{alpha_role}\" WITH (FORCE)"))
        .execute(&mut pg)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE \"{alpha_role}\""))
        .execute(&mut pg)
        .await
        .unwrap();
    assert!(
        topic_partitions(&alpha_topics)
            .values()
            .all(Option::is_some),
        "alpha's topics are retained"
    );
    let beta_topics: Vec<String> = ["commands", "events"]
        .iter()
        .map(|t| topic("beta", t))
        .collect();
    wait_until(
        "beta's topics to be deleted",
        Duration::from_secs(10),
        || {
            let beta_topics = beta_topics.clone();
            async move { topic_partitions(&beta_topics).values().all(Option::is_none) }
        },
    )
    .await;
    // alpha's retained topics are this test's to remove.
    let admin: rdkafka::admin::AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", deps.kafka_bootstrap_servers)
        .create()
        .unwrap();
    let names: Vec<&str> = alpha_topics.iter().map(String::as_str).collect();
    admin
        .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    harness.finish().await;
}

#[tokio::test]
async fn a_dependency_outage_turns_its_condition_false_and_the_stack_recovers_by_itself() {
    // The external stages are reused for 5 minutes: only the health check can notice.
    let harness = Harness::start_with("outage", Duration::from_secs(300)).await;
    let deps = Deps::from_env();
    let mut redis = TcpToggle::new(Deps::socket_of(&deps.redis_url));
    redis.up().await;
    let url = format!("redis://127.0.0.1:{}", redis.port());
    harness.apply_ready(&stack("gamma", &url, "Delete")).await;

    redis.down().await;
    harness
        .wait_for_condition(
            "gamma",
            "DependenciesReady",
            "False",
            Some("RedisUnavailable"),
        )
        .await;
    harness
        .wait_for_condition("gamma", "Ready", "False", Some("RedisUnavailable"))
        .await;
    let stack = harness.get("gamma").await;
    assert_eq!(
        stack.status.unwrap().phase,
        Some(operator::crd::Phase::Degraded)
    );

    redis.up().await;
    // No poke: the backoff retries on its own.
    harness
        .wait_for_condition("gamma", "DependenciesReady", "True", None)
        .await;
    harness
        .wait_for_condition("gamma", "Ready", "True", None)
        .await;
    harness.finish().await;
}

#[tokio::test]
async fn a_paused_stack_is_left_alone_and_a_rotation_rolls_new_credentials() {
    let harness = Harness::start("rotate").await;
    let deps = Deps::from_env();
    harness
        .apply_ready(&stack("delta", &deps.redis_url, "Delete"))
        .await;
    let secrets: Api<Secret> = harness.api();
    let deployments: Api<Deployment> = harness.api();
    let before = secret_url(&secrets.get("delta-postgres").await.unwrap());
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[operator::build::CREDENTIALS_HASH_ANNOTATION]
            .clone()
    };
    let hash_before = hash(&deployments.get("delta-processor").await.unwrap());

    // Paused: a spec change is not applied, and the condition says why.
    let mut paused = stack("delta", &deps.redis_url, "Delete");
    paused["spec"]["paused"] = json!(true);
    paused["spec"]["services"] = json!({ "processor": { "replicas": 3 } });
    harness.apply(&paused).await;
    harness
        .wait_for_condition("delta", "Ready", "False", Some("Paused"))
        .await;
    assert_eq!(
        deployments
            .get("delta-processor")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(1)
    );

    // Unpaused with a rotation request: new passwords, Secrets updated, pods rolled.
    let mut rotated = stack("delta", &deps.redis_url, "Delete");
    rotated["metadata"]["annotations"] = json!({ "meridian.dev/rotate-credentials": "1" });
    harness.apply(&rotated).await;
    let secrets_ = secrets.clone();
    let before_ = before.clone();
    wait_until("the postgres Secret to change", READY_TIMEOUT, move || {
        let (secrets, before) = (secrets_.clone(), before_.clone());
        async move { secret_url(&secrets.get("delta-postgres").await.unwrap()) != before }
    })
    .await;
    let deployments_ = deployments.clone();
    wait_until("the processor to roll", READY_TIMEOUT, move || {
        let (deployments, hash_before) = (deployments_.clone(), hash_before.clone());
        async move { hash(&deployments.get("delta-processor").await.unwrap()) != hash_before }
    })
    .await;
    harness
        .wait_for_condition("delta", "Ready", "True", None)
        .await;
    // The new password belongs to the second login; the first keeps working, so pods that
    // have not rolled yet still connect. Tables made through either login belong to the owner.
    let after = secret_url(&secrets.get("delta-postgres").await.unwrap());
    let second = secret_key(&secrets.get("delta-postgres").await.unwrap(), "username");
    assert!(second.starts_with("mwsr_"), "{second}");
    let mut pg = sqlx::PgConnection::connect(&after).await.unwrap();
    let (user, acting_as): (String, String) =
        sqlx::query_as("SELECT session_user::text, current_user::text")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert_eq!(user, second);
    assert_eq!(format!("mwsr_{}", &acting_as["mws_".len()..]), second);
    sqlx::query("CREATE TABLE made_by_the_second_login (id int)")
        .execute(&mut pg)
        .await
        .unwrap();
    pg.close().await.unwrap();
    let mut old = sqlx::PgConnection::connect(&before)
        .await
        .expect("the previous password keeps working until the next rotation");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM made_by_the_second_login")
        .fetch_one(&mut old)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    old.close().await.unwrap();

    // The next rotation goes back to the first login with a new password: the second login
    // still works, the first login's old password does not.
    let mut again = stack("delta", &deps.redis_url, "Delete");
    again["metadata"]["annotations"] = json!({ "meridian.dev/rotate-credentials": "2" });
    harness.apply(&again).await;
    let secrets_ = secrets.clone();
    let after_ = after.clone();
    wait_until(
        "the postgres Secret to change again",
        READY_TIMEOUT,
        move || {
            let (secrets, after) = (secrets_.clone(), after_.clone());
            async move { secret_url(&secrets.get("delta-postgres").await.unwrap()) != after }
        },
    )
    .await;
    let latest = secret_url(&secrets.get("delta-postgres").await.unwrap());
    assert_eq!(
        secret_key(&secrets.get("delta-postgres").await.unwrap(), "username"),
        acting_as
    );
    for (url, what) in [(&latest, "the new password"), (&after, "the second login")] {
        let mut pg = sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        sqlx::query("SELECT count(*) FROM made_by_the_second_login")
            .fetch_one(&mut pg)
            .await
            .unwrap();
        pg.close().await.unwrap();
    }
    assert!(
        sqlx::PgConnection::connect(&before).await.is_err(),
        "the first password is revoked by the second rotation"
    );
    let redis_url = secret_url(&secrets.get("delta-redis").await.unwrap());
    let mut redis = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut redis).await.unwrap();
    assert_eq!(pong, "PONG");
    harness.finish().await;
}

/// Deleting a namespace deletes the stack's admin Secrets too, often before its finalizer
/// runs: they stay Terminating (the operator's finalizer on them) until the cleanup has used
/// them to remove its Redis user, PostgreSQL roles and database; then the namespace goes.
#[tokio::test]
async fn a_deleted_namespace_is_cleaned_up_although_its_admin_secrets_went_first() {
    let harness = Harness::start("nsdelete").await;
    let deps = Deps::from_env();
    harness
        .apply_ready(&stack("epsilon", &deps.redis_url, "Delete"))
        .await;
    let secrets = harness.api::<Secret>();
    let role = secret_key(&secrets.get("epsilon-postgres").await.unwrap(), "username");
    let user = secret_key(&secrets.get("epsilon-redis").await.unwrap(), "username");

    // The worst order the namespace controller may pick: the admin Secrets first.
    for name in ["redis-admin", "pg-admin"] {
        secrets
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let Harness {
        client,
        ns,
        stop,
        task,
        ..
    } = harness;
    let name = ns.name.clone();
    ns.delete().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    wait_until("the namespace to be gone", READY_TIMEOUT, || {
        let namespaces = namespaces.clone();
        let name = name.clone();
        async move { namespaces.get_opt(&name).await.unwrap().is_none() }
    })
    .await;

    assert_cleaned_up(&deps, &user, &role).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A namespace deleted while the operator is down: its admin Secrets wait (the operator's
/// finalizer) until the operator is back and has cleaned the stack up with them, then go with
/// the namespace; nothing of the stack is left in Redis or PostgreSQL.
#[tokio::test]
async fn a_namespace_deleted_while_the_operator_is_down_is_cleaned_up_when_it_returns() {
    let mut harness = Harness::start("nsrestart").await;
    let deps = Deps::from_env();
    harness
        .apply_ready(&stack("zeta", &deps.redis_url, "Delete"))
        .await;
    let secrets = harness.api::<Secret>();
    let role = secret_key(&secrets.get("zeta-postgres").await.unwrap(), "username");
    let user = secret_key(&secrets.get("zeta-redis").await.unwrap(), "username");
    let held = |s: &Secret| {
        s.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "meridian.dev/admin-credentials")
    };
    for name in ["redis-admin", "pg-admin"] {
        assert!(held(&secrets.get(name).await.unwrap()), "{name} is held");
    }
    assert!(
        !held(&secrets.get("jwt").await.unwrap()),
        "the JWT Secret is not"
    );

    harness.stop_operator().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(harness.client.clone());
    let name = harness.ns.name.clone();
    namespaces
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    // The namespace controller has deleted what it could: the admin Secrets stay, Terminating.
    wait_until("the admin Secrets to be Terminating", READY_TIMEOUT, || {
        let secrets = secrets.clone();
        async move {
            let mut terminating = 0;
            for name in ["redis-admin", "pg-admin"] {
                let secret = secrets.get(name).await.unwrap();
                terminating += usize::from(secret.metadata.deletion_timestamp.is_some());
            }
            terminating == 2
        }
    })
    .await;

    harness.start_operator();
    wait_until("the namespace to be gone", READY_TIMEOUT, || {
        let namespaces = namespaces.clone();
        let name = name.clone();
        async move { namespaces.get_opt(&name).await.unwrap().is_none() }
    })
    .await;
    assert_cleaned_up(&deps, &user, &role).await;
    harness.stop_operator().await;
}

/// A stack deleted while its PostgreSQL is down: each failed cleanup is a Warning Event that
/// counts its attempt; once PostgreSQL is back, the next attempt drops the database and
/// roles, deletes the Redis user and releases the stack. (PostgreSQL "down" for this stack
/// alone: it reaches the server through a forwarder the test takes down and brings back.)
#[tokio::test]
async fn a_stack_deleted_while_postgres_is_down_is_cleaned_up_once_it_is_back() {
    let deps = Deps::from_env();
    let mut postgres = TcpToggle::new(Deps::socket_of(&deps.database_url));
    postgres.up().await;
    let harness = Harness::start_configured("pgdown", |s| s.cleanup_attempts = 30).await;
    let mut spec = stack("eta", &deps.redis_url, "Delete");
    spec["spec"]["postgres"]["port"] = json!(postgres.port());
    harness.apply_ready(&spec).await;
    let secrets = harness.api::<Secret>();
    let role = secret_key(&secrets.get("eta-postgres").await.unwrap(), "username");
    let user = secret_key(&secrets.get("eta-redis").await.unwrap(), "username");

    postgres.down().await;
    harness
        .stacks()
        .delete("eta", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("two failed cleanups", READY_TIMEOUT, || async {
        event_times(&harness, "eta", "CleanupFailed").await.len() >= 2
    })
    .await;
    let failed: Vec<String> = event_times(&harness, "eta", "CleanupFailed")
        .await
        .into_iter()
        .map(|(_, note)| note)
        .collect();
    assert!(failed[0].contains("attempt 1 of 30"), "{failed:?}");
    assert!(failed[1].contains("attempt 2 of 30"), "{failed:?}");

    postgres.up().await;
    let stacks = harness.stacks();
    wait_until("the stack to be gone", READY_TIMEOUT, || {
        let stacks = stacks.clone();
        async move { stacks.get_opt("eta").await.unwrap().is_none() }
    })
    .await;
    assert_cleaned_up(&deps, &user, &role).await;
    assert_eq!(event_times(&harness, "eta", "CleanedUp").await.len(), 1);
    assert!(
        event_times(&harness, "eta", "CleanupAbandoned")
            .await
            .is_empty()
    );
    harness.finish().await;
}

/// Asserts that the stack whose Redis user and PostgreSQL role are `user` and `role` left
/// nothing in Redis or PostgreSQL: the user, both roles and the database are gone.
async fn assert_cleaned_up(deps: &Deps, user: &str, role: &str) {
    let mut admin = redis::Client::open(deps.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let acl: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(user)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(acl, redis::Value::Nil, "the Redis user is deleted");
    let mut pg = sqlx::PgConnection::connect(&deps.database_url)
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_roles WHERE rolname IN ($1, 'mwsr_' || substr($1, 5))) \
              + (SELECT count(*) FROM pg_database WHERE datname = $1)",
    )
    .bind(role)
    .fetch_one(&mut pg)
    .await
    .unwrap();
    assert_eq!(left, 0, "the roles and the database of {role} are dropped");
}

/// Whether the operator's own field manager still owns the Deployment's `spec.replicas`.
fn operator_owns_replicas(deployment: &Deployment) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some("meridian-operator"))
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| f.0.pointer("/f:spec/f:replicas").is_some())
}

/// Changes the pod annotations of `service` (its field under `spec.services`) so its pods
/// roll, and waits until its Deployment `deployment` carries the new template.
async fn roll_pods(harness: &Harness, spec: &mut Value, service: &str, deployment: &str) {
    spec["spec"]["services"][service]["annotations"] = json!({ "example.com/rev": "2" });
    harness.apply(spec).await;
    let deployments: Api<Deployment> = harness.api();
    wait_until("the pod template to change", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let deployment = deployments.get(deployment).await.unwrap();
            deployment
                .spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
                .is_some_and(|a| a.get("example.com/rev").map(String::as_str) == Some("2"))
        }
    })
    .await;
}

#[tokio::test]
async fn an_autoscaled_service_keeps_the_replica_count_its_autoscaler_sets() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use kube::api::{Patch, PatchParams};

    let harness = Harness::start("autoscale").await;
    let deps = Deps::from_env();
    let mut spec = stack("delta", &deps.redis_url, "Delete");
    spec["spec"]["services"]["gateway"]["replicas"] = json!(3);
    harness.apply_ready(&spec).await;
    let deployments: Api<Deployment> = harness.api();
    let autoscalers: Api<HorizontalPodAutoscaler> = harness.api();
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    let gateway = "delta-api-gateway";
    assert_eq!(replicas(&deployments.get(gateway).await.unwrap()), Some(3));

    // Autoscaling on: an autoscaler appears and the operator lets go of the count without the
    // Deployment ever falling back to one replica.
    spec["spec"]["services"]["gateway"]["autoscaling"] =
        json!({ "minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 50 });
    spec["spec"]["services"]["hub"]["autoscaling"] =
        json!({ "minReplicas": 1, "maxReplicas": 4, "targetConnectionsPerReplica": 5000 });
    harness.apply(&spec).await;
    wait_until("the operator to let go of replicas", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let deployment = deployments.get(gateway).await.unwrap();
            assert_eq!(
                replicas(&deployment),
                Some(3),
                "the count changed on hand-over"
            );
            !operator_owns_replicas(&deployment)
        }
    })
    .await;
    // The autoscaler is applied right after the Deployment.
    wait_until("the autoscaler to appear", READY_TIMEOUT, || {
        let autoscalers = autoscalers.clone();
        async move { autoscalers.get_opt(gateway).await.unwrap().is_some() }
    })
    .await;
    let autoscaler = autoscalers.get(gateway).await.unwrap();
    let hpa = autoscaler.spec.unwrap();
    assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 6));
    assert_eq!(hpa.scale_target_ref.name, gateway);
    // The hub's autoscaler also follows its connections (the API server took the metric).
    wait_until("the hub's autoscaler to appear", READY_TIMEOUT, || {
        let autoscalers = autoscalers.clone();
        async move { autoscalers.get_opt("delta-ws-hub").await.unwrap().is_some() }
    })
    .await;
    let hub = autoscalers.get("delta-ws-hub").await.unwrap().spec.unwrap();
    let metrics: Vec<&str> = hub
        .metrics
        .iter()
        .flatten()
        .map(|m| m.type_.as_str())
        .collect();
    assert_eq!(metrics, ["Resource", "Pods"]);

    // The autoscaler's decision (written through the scale subresource, as its controller
    // does) survives the reconciles that follow, including one that rolls the pods.
    deployments
        .patch_scale(
            gateway,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 5 } })),
        )
        .await
        .unwrap();
    roll_pods(&harness, &mut spec, "gateway", gateway).await;
    assert_eq!(replicas(&deployments.get(gateway).await.unwrap()), Some(5));

    // Off again: the autoscaler goes and the spec's count applies.
    spec["spec"]["services"]["gateway"]
        .as_object_mut()
        .unwrap()
        .remove("autoscaling");
    harness.apply(&spec).await;
    wait_until("the autoscaler to go", READY_TIMEOUT, || {
        let (autoscalers, deployments) = (autoscalers.clone(), deployments.clone());
        async move {
            autoscalers.get_opt(gateway).await.unwrap().is_none()
                && replicas(&deployments.get(gateway).await.unwrap()) == Some(3)
        }
    })
    .await;
    harness.finish().await;
}

/// Sends `count` messages to `topic`, spread over its partitions by key.
fn produce(topic: &str, count: usize) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set(
            "bootstrap.servers",
            Deps::from_env().kafka_bootstrap_servers,
        )
        .create()
        .unwrap();
    for i in 0..count {
        let key = format!("k{i}");
        producer
            .send(BaseRecord::to(topic).key(&key).payload("{}"))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Commits `group`'s offsets at the end of every partition of `topic`, as a consumer that
/// caught up would.
fn catch_up(group: &str, topic: &str) {
    use rdkafka::consumer::CommitMode;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set(
            "bootstrap.servers",
            Deps::from_env().kafka_bootstrap_servers,
        )
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    let mut offsets = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(5))
            .unwrap();
        offsets
            .add_partition_offset(topic, partition.id(), rdkafka::Offset::Offset(high))
            .unwrap();
    }
    consumer.commit(&offsets, CommitMode::Sync).unwrap();
}

/// The notes of the stack's Events with `reason`, oldest first.
async fn event_notes(harness: &Harness, stack: &str, reason: &str) -> Vec<String> {
    event_times(harness, stack, reason)
        .await
        .into_iter()
        .map(|(_, note)| note)
        .collect()
}

#[tokio::test]
async fn a_consumer_scales_on_its_kafka_lag_within_its_partitions_and_back() {
    let harness = Harness::start("lagscale").await;
    let deps = Deps::from_env();
    let mut spec = stack("echo", &deps.redis_url, "Delete");
    spec["spec"]["kafka"]["topics"]["commands"]["partitions"] = json!(4);
    spec["spec"]["services"]["processor"]["autoscaling"] = json!({
        "minReplicas": 1, "maxReplicas": 6, "targetLagPerReplica": 10, "scaleDownDelaySeconds": 0
    });
    harness.apply_ready(&spec).await;
    let deployments: Api<Deployment> = harness.api();
    let processor = "echo-processor";
    let replicas = |d: Deployment| d.spec.and_then(|s| s.replicas);
    assert_eq!(replicas(deployments.get(processor).await.unwrap()), Some(1));
    let unready = event_notes(&harness, "echo", "ReadyFalse").await;

    // 45 commands nobody consumes (no processor runs on the simulated node): 5 replicas'
    // worth at 10 each, but the topic has 4 partitions.
    let ns = harness.ns.name.clone();
    let topic = format!("{ns}.echo.commands");
    produce(&topic, 45);
    wait_until("the processor to scale up to 4", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move { replicas(deployments.get(processor).await.unwrap()) == Some(4) }
    })
    .await;
    // The decision's Event follows the apply.
    wait_until("the ScaledUp Event", READY_TIMEOUT, || async {
        !event_notes(&harness, "echo", "ScaledUp").await.is_empty()
    })
    .await;
    let up = event_notes(&harness, "echo", "ScaledUp").await;
    assert!(
        up.iter().any(|n| n.starts_with("processor 1 → 4 replicas")
            && n.contains(&format!(
                "consumer group {ns}.echo.processor is 45 messages behind"
            ))
            && n.contains("4 partitions")),
        "{up:?}"
    );
    // The cache updater does not scale: it keeps its count.
    assert_eq!(
        replicas(deployments.get("echo-cache-updater").await.unwrap()),
        Some(1)
    );

    // The group catches up: back to the minimum (no delay asked for).
    catch_up(&format!("{ns}.echo.processor"), &topic);
    wait_until("the processor to scale down to 1", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move { replicas(deployments.get(processor).await.unwrap()) == Some(1) }
    })
    .await;
    wait_until("the ScaledDown Event", READY_TIMEOUT, || async {
        !event_notes(&harness, "echo", "ScaledDown").await.is_empty()
    })
    .await;
    let down = event_notes(&harness, "echo", "ScaledDown").await;
    assert!(
        down.iter()
            .any(|n| n.starts_with("processor 4 → 1 replicas") && n.contains("0 messages behind")),
        "{down:?}"
    );
    // Steady: no further decision while the lag stays where it is, and scaling never made the
    // stack look unready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(event_notes(&harness, "echo", "ScaledUp").await.len(), 1);
    assert_eq!(event_notes(&harness, "echo", "ScaledDown").await.len(), 1);
    assert_eq!(event_notes(&harness, "echo", "ReadyFalse").await, unready);
    harness.finish().await;
}

#[tokio::test]
async fn a_foreign_autoscaler_takes_the_replica_count_over_and_gives_it_back() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use kube::api::{Patch, PatchParams};

    let harness = Harness::start("foreignhpa").await;
    let deps = Deps::from_env();
    let mut spec = stack("fox", &deps.redis_url, "Delete");
    spec["spec"]["services"]["hub"]["replicas"] = json!(2);
    harness.apply_ready(&spec).await;
    let deployments: Api<Deployment> = harness.api();
    let hub = "fox-ws-hub";
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    assert!(operator_owns_replicas(&deployments.get(hub).await.unwrap()));

    // The user's own autoscaler (or KEDA's) on the hub's Deployment.
    let autoscalers: Api<HorizontalPodAutoscaler> = harness.api();
    let mine: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": { "name": "hub-on-connections" },
        "spec": {
            "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": hub },
            "minReplicas": 2, "maxReplicas": 8,
            "metrics": [{ "type": "Resource", "resource": {
                "name": "cpu", "target": { "type": "Utilization", "averageUtilization": 60 } } }]
        }
    }))
    .unwrap();
    autoscalers
        .create(&PostParams::default(), &mine)
        .await
        .unwrap();
    wait_until("the operator to let go of replicas", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let deployment = deployments.get(hub).await.unwrap();
            assert_eq!(
                replicas(&deployment),
                Some(2),
                "the count changed on hand-over"
            );
            !operator_owns_replicas(&deployment)
        }
    })
    .await;

    // Its decision survives the reconciles that follow, including one that rolls the pods.
    deployments
        .patch_scale(
            hub,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 6 } })),
        )
        .await
        .unwrap();
    roll_pods(&harness, &mut spec, "hub", hub).await;
    assert_eq!(replicas(&deployments.get(hub).await.unwrap()), Some(6));
    // The operator never deletes an autoscaler it does not own.
    assert!(
        autoscalers
            .get_opt("hub-on-connections")
            .await
            .unwrap()
            .is_some()
    );

    // The autoscaler goes: the spec's count applies again.
    autoscalers
        .delete("hub-on-connections", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the spec's count to apply again", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let deployment = deployments.get(hub).await.unwrap();
            replicas(&deployment) == Some(2) && operator_owns_replicas(&deployment)
        }
    })
    .await;
    harness.finish().await;
}

/// The times and notes of the stack's Events with `reason`, oldest first.
async fn event_times(
    harness: &Harness,
    stack: &str,
    reason: &str,
) -> Vec<(k8s_openapi::jiff::Timestamp, String)> {
    let events: Api<Event> = harness.api();
    let mut found: Vec<_> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(stack))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| Some((e.event_time?.0, e.note?)))
        .collect();
    found.sort();
    found
}

/// The operator version a stack's status records.
async fn recorded_version(harness: &Harness, stack: &str) -> Option<String> {
    harness.get(stack).await.status?.operator_version
}

/// Restarts the harness's operator as version `version` (its release images tagged alike).
async fn upgrade(
    harness: &mut Harness,
    version: &str,
    change: impl FnOnce(&mut operator::Settings),
) {
    harness
        .restart(|s| {
            s.version = version.to_owned();
            s.release.tag = version.to_owned();
            change(s);
        })
        .await;
}

/// Waits until each of the stacks `names` has an Event saying it rolled onto `version`.
async fn wait_rolled(harness: &Harness, names: &[&str], version: &str) {
    let prefix = format!("rolled onto operator {version}");
    wait_until(
        &format!("every stack to roll onto {version}"),
        READY_TIMEOUT * 2,
        || async {
            let mut rolled = 0;
            for name in names {
                rolled += event_times(harness, name, "UpgradeRolled")
                    .await
                    .iter()
                    .filter(|(_, note)| note.starts_with(&prefix))
                    .count();
            }
            rolled == names.len()
        },
    )
    .await;
}

#[tokio::test]
async fn an_operator_upgrade_rolls_stacks_in_waves_and_a_stack_that_cannot_roll_halts_it() {
    use k8s_openapi::api::core::v1::{Pod, ResourceQuota};

    let mut harness = Harness::start_configured("waves", |s| {
        s.version = "1.0.0".to_owned();
        s.release.tag = "1.0.0".to_owned();
    })
    .await;
    let deps = Deps::from_env();
    let names = ["wa", "wb", "wc"];
    for name in names {
        let mut spec = stack(name, &deps.redis_url, "Delete");
        // The release's images: whatever the operator's version says.
        spec["spec"].as_object_mut().unwrap().remove("image");
        harness.apply(&spec).await;
    }
    for name in names {
        harness
            .wait_for_condition(name, "Ready", "True", None)
            .await;
        assert_eq!(
            recorded_version(&harness, name).await.as_deref(),
            Some("1.0.0")
        );
    }
    let deployments: Api<Deployment> = harness.api();
    let processor = deployments.get("wa-processor").await.unwrap();
    let processor = processor.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        processor.containers[0].image.as_deref(),
        Some("ghcr.io/meridian-dev/meridian/processor:1.0.0")
    );

    // 1.1.0, one stack at a time: each starts only once the one before has rolled out.
    upgrade(&mut harness, "1.1.0", |s| s.rollout_concurrency = 1).await;
    wait_rolled(&harness, &names, "1.1.0").await;
    let mut waves = Vec::new();
    for name in names {
        let started = event_times(&harness, name, "UpgradeStarted").await;
        let rolled = event_times(&harness, name, "UpgradeRolled").await;
        assert_eq!(
            (started.len(), rolled.len()),
            (1, 1),
            "{name}: {started:?} {rolled:?}"
        );
        assert!(
            started[0].1.contains("from operator 1.0.0 onto 1.1.0"),
            "{started:?}"
        );
        waves.push((started[0].0, rolled[0].0, name));
        assert_eq!(
            recorded_version(&harness, name).await.as_deref(),
            Some("1.1.0")
        );
    }
    waves.sort();
    for pair in waves.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "{} started before {} had rolled out: {waves:?}",
            pair[1].2,
            pair[0].2
        );
    }
    // The ones that waited were told so.
    let queued: usize =
        futures::future::join_all(names.map(|name| event_times(&harness, name, "UpgradeQueued")))
            .await
            .iter()
            .map(Vec::len)
            .sum();
    assert!(queued >= 1, "no stack was queued");

    // 1.2.0 while no new pod can start (a quota of the pods running now): the first stack's
    // roll never completes, the wave halts after the timeout and the others stay on 1.1.0.
    let pods: Api<Pod> = harness.api();
    let running = pods.list(&ListParams::default()).await.unwrap().items.len();
    let quotas: Api<ResourceQuota> = harness.api();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": { "name": "no-more-pods" },
        "spec": { "hard": { "pods": running.to_string() } }
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    wait_until("the quota to count the pods", READY_TIMEOUT, || {
        let quotas = quotas.clone();
        async move {
            let quota = quotas.get("no-more-pods").await.unwrap();
            quota
                .status
                .and_then(|s| s.used)
                .is_some_and(|used| used.contains_key("pods"))
        }
    })
    .await;
    upgrade(&mut harness, "1.2.0", |s| {
        s.rollout_concurrency = 1;
        s.rollout_timeout = Duration::from_secs(3);
    })
    .await;
    async fn halted(harness: &Harness, names: [&str; 3]) -> Option<String> {
        for name in names {
            if !event_times(harness, name, "UpgradeHalted").await.is_empty() {
                return Some(name.to_owned());
            }
        }
        None
    }
    wait_until("the wave to halt", READY_TIMEOUT, || async {
        halted(&harness, names).await.is_some()
    })
    .await;
    let halted_by = halted(&harness, names).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for name in names.iter().filter(|n| **n != halted_by) {
        assert_eq!(
            recorded_version(&harness, name).await.as_deref(),
            Some("1.1.0"),
            "{name} started while {halted_by} halted the wave"
        );
        let queued = event_times(&harness, name, "UpgradeQueued").await;
        assert!(
            queued.iter().any(|(_, n)| n.contains("onto 1.2.0")),
            "{name}: {queued:?}"
        );
    }

    // Room for the new pods: the halted stack rolls out, the wave resumes and finishes.
    quotas
        .delete("no-more-pods", &DeleteParams::default())
        .await
        .unwrap();
    wait_rolled(&harness, &names, "1.2.0").await;
    let resumed = event_times(&harness, &halted_by, "UpgradeRolled").await;
    assert!(
        resumed.iter().any(|(_, n)| n.ends_with("the wave resumes")),
        "{resumed:?}"
    );
    harness.finish().await;
}

#[tokio::test]
async fn an_operator_stopped_before_its_first_list_of_stacks_exits_at_once() {
    let harness = Harness::start("quickstop").await;
    harness.stop.cancel();
    let exited = tokio::time::timeout(Duration::from_secs(10), harness.task).await;
    assert!(
        matches!(exited, Ok(Ok(Ok(())))),
        "the operator did not exit: {exited:?}"
    );
    harness.ns.delete().await;
}

/// A stack on the broker's SASL port with the operator's admin login gets a principal of its
/// own: the `<stack>-kafka` Secret the Kafka services read, whose login writes the stack's
/// topics; a rotation moves the services to the second login while the first keeps working;
/// `servicePrincipal: None` ends both logins and deletes the Secret; deleting the stack ends
/// the login it had then.
#[tokio::test]
async fn a_stack_with_a_kafka_admin_login_gets_its_own_principal_rotated_retired_and_removed() {
    use crate::provision::{metadata, produce, sasl_access, tenant_config};
    use k8s_openapi::api::core::v1::ConfigMap;

    let harness = Harness::start("kafkauser").await;
    let deps = Deps::from_env();
    let access = sasl_access(false);
    let admin = access.credentials.as_ref().unwrap();
    let admin_secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "kafka-admin" },
        "stringData": {
            "username": admin.username,
            "password": secrecy::ExposeSecret::expose_secret(&admin.password),
        }
    }))
    .unwrap();
    let secrets = harness.api::<Secret>();
    secrets
        .create(&PostParams::default(), &admin_secret)
        .await
        .unwrap();
    let mut spec = stack("zeta", &deps.redis_url, "Delete");
    spec["spec"]["kafka"]["bootstrapServers"] = json!(access.bootstrap_servers);
    spec["spec"]["kafka"]["adminSecretRef"] = json!({ "name": "kafka-admin" });
    harness.apply_ready(&spec).await;

    let ns = harness.ns.name.clone();
    let login = secrets.get("zeta-kafka").await.unwrap();
    assert_eq!(
        secret_key(&login, "username"),
        format!("meridian:{ns}:zeta")
    );
    assert_eq!(secret_key(&login, "mechanism"), "SCRAM-SHA-512");
    let first = tenant_config(
        &access,
        &secret_key(&login, "username"),
        &secret_key(&login, "password"),
    );
    let topic = format!("{ns}.zeta.commands");
    produce(&first, &topic)
        .await
        .expect("the stack's login writes its commands topic");
    let message = harness.condition_message("zeta", "CredentialsReady").await;
    assert!(
        message.contains(&format!("Kafka principal meridian:{ns}:zeta")),
        "{message}"
    );
    let processor = harness
        .api::<ConfigMap>()
        .get("zeta-processor")
        .await
        .unwrap();
    let data = processor.data.unwrap();
    assert_eq!(data["KAFKA_SECURITY_PROTOCOL"], "sasl_plaintext");
    assert_eq!(data["KAFKA_SASL_MECHANISM"], "SCRAM-SHA-512");

    let mut rotated = spec.clone();
    rotated["metadata"]["annotations"] = json!({ "meridian.dev/rotate-credentials": "1" });
    harness.apply(&rotated).await;
    wait_until("the Kafka login to rotate", READY_TIMEOUT, || {
        let secrets = secrets.clone();
        let ns = ns.clone();
        async move {
            let login = secrets.get("zeta-kafka").await.unwrap();
            secret_key(&login, "username") == format!("meridian:{ns}:zeta:b")
        }
    })
    .await;
    let login = secrets.get("zeta-kafka").await.unwrap();
    let second = tenant_config(
        &access,
        &secret_key(&login, "username"),
        &secret_key(&login, "password"),
    );
    produce(&second, &topic)
        .await
        .expect("the rotated login writes the topic");
    produce(&first, &topic)
        .await
        .expect("the first login keeps working until the next rotation");

    // Switched off: both logins, their ACLs and the Secret go.
    let mut anonymous = rotated.clone();
    anonymous["spec"]["kafka"]["servicePrincipal"] = json!("None");
    harness.apply(&anonymous).await;
    wait_until("zeta-kafka to be deleted", READY_TIMEOUT, || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("zeta-kafka").await.unwrap().is_none() }
    })
    .await;
    metadata(&first)
        .await
        .expect_err("the first login outlived servicePrincipal: None");
    metadata(&second)
        .await
        .expect_err("the second login outlived servicePrincipal: None");
    let retired = event_notes(&harness, "zeta", "KafkaPrincipalRetired").await;
    assert!(
        retired.iter().any(|n| n.contains("removed Kafka logins")),
        "{retired:?}"
    );

    // Switched on again: a new login, which deleting the stack removes.
    harness.apply(&rotated).await;
    wait_until("a new zeta-kafka", READY_TIMEOUT, || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("zeta-kafka").await.unwrap().is_some() }
    })
    .await;
    let login = secrets.get("zeta-kafka").await.unwrap();
    let third = tenant_config(
        &access,
        &secret_key(&login, "username"),
        &secret_key(&login, "password"),
    );
    produce(&third, &topic)
        .await
        .expect("the new login writes the topic");

    harness
        .stacks()
        .delete("zeta", &DeleteParams::default())
        .await
        .unwrap();
    let stacks = harness.stacks();
    wait_until("the stack to be gone", READY_TIMEOUT, || {
        let stacks = stacks.clone();
        async move { stacks.get_opt("zeta").await.unwrap().is_none() }
    })
    .await;
    metadata(&third)
        .await
        .expect_err("the login outlived its stack");
    harness.finish().await;
}

/// A stack that verifies PostgreSQL against a CA of its own (`postgres.caSecretRef` with
/// `sslMode: verify-full`): while the CA Secret lacks the key, the dependencies stage says so;
/// once it holds the local server's CA, the operator's admin pool trusts it and the stack
/// becomes Ready, its `DATABASE_URL` names the mounted file, and only the PostgreSQL services
/// mount it. The clean-up (database dropped) goes through the same pool.
#[tokio::test]
async fn a_stack_with_a_postgres_ca_reaches_the_server_through_it_and_mounts_it() {
    use kube::api::{Patch, PatchParams};

    let harness = Harness::start("pgca").await;
    let deps = Deps::from_env();
    let ca = std::fs::read_to_string(
        std::env::var("MERIDIAN_POSTGRES_CA_FILE")
            .expect("MERIDIAN_POSTGRES_CA_FILE (eval \"$(bash dev/deps.sh env)\")"),
    )
    .unwrap();
    let secrets = harness.api::<Secret>();
    let ca_secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "pg-ca" }, "stringData": { "other.crt": ca }
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &ca_secret)
        .await
        .unwrap();
    let mut spec = stack("theta", &deps.redis_url, "Delete");
    spec["spec"]["postgres"]["sslMode"] = json!("verify-full");
    spec["spec"]["postgres"]["caSecretRef"] = json!({ "name": "pg-ca", "key": "ca.crt" });
    harness.apply(&spec).await;
    harness
        .wait_for_condition(
            "theta",
            "DependenciesReady",
            "False",
            Some("SecretNotFound"),
        )
        .await;
    assert_eq!(
        harness
            .condition_message("theta", "DependenciesReady")
            .await,
        "Secret pg-ca with key ca.crt (postgres.caSecretRef) not found"
    );

    secrets
        .patch(
            "pg-ca",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "ca.crt": ca } })),
        )
        .await
        .unwrap();
    harness
        .wait_for_condition("theta", "Ready", "True", None)
        .await;
    let url = secret_url(&secrets.get("theta-postgres").await.unwrap());
    assert!(
        url.ends_with("?sslmode=verify-full&sslrootcert=/etc/meridian/postgres/ca.crt"),
        "the services' URL names the mounted CA"
    );
    let deployments = harness.api::<Deployment>();
    for (deployment, mounted) in [
        ("theta-processor", true),
        ("theta-command-service", true),
        ("theta-cache-updater", false),
    ] {
        let pod = deployments
            .get(deployment)
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        let volume = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.name == "postgres-ca");
        assert_eq!(
            volume
                .and_then(|v| v.secret)
                .and_then(|s| s.secret_name)
                .as_deref(),
            mounted.then_some("pg-ca"),
            "{deployment}"
        );
    }
    harness.finish().await;
}

/// A stack on the local Redis Cluster (`redis.cluster`): Ready with its user on every node,
/// the services that use Redis told so (`REDIS_CLUSTER=true`); deleted, its user leaves
/// every node.
#[tokio::test]
async fn a_stack_on_a_redis_cluster_has_its_user_on_every_node_and_cluster_mode_services() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use operator::provision::redis::cluster_nodes;

    let harness = Harness::start("rcluster").await;
    let seed_url = std::env::var("MERIDIAN_REDIS_CLUSTER_URL")
        .expect("MERIDIAN_REDIS_CLUSTER_URL (eval \"$(bash dev/deps.sh env)\")");
    let mut spec = stack("iota", &seed_url, "Delete");
    spec["spec"]["redis"]["cluster"] = json!(true);
    harness.apply_ready(&spec).await;
    let config_maps = harness.api::<ConfigMap>();
    for (service, cluster) in [
        ("api-gateway", Some("true")),
        ("cache-updater", Some("true")),
        ("ws-hub", Some("true")),
        ("processor", None),
    ] {
        let data = config_maps
            .get(&format!("iota-{service}"))
            .await
            .unwrap()
            .data;
        let setting = data.as_ref().and_then(|d| d.get("REDIS_CLUSTER"));
        assert_eq!(setting.map(String::as_str), cluster, "{service}");
    }
    let user = secret_key(
        &harness.api::<Secret>().get("iota-redis").await.unwrap(),
        "username",
    );
    let mut seed = redis::Client::open(seed_url.as_str()).unwrap();
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut seed).unwrap();
    let has_user = |node: &operator::provision::redis::ClusterNode| {
        let mut conn = redis::Client::open(format!("redis://{node}")).unwrap();
        let user: redis::Value = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(&user)
            .query(&mut conn)
            .unwrap();
        user != redis::Value::Nil
    };
    let nodes = cluster_nodes(&nodes);
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(has_user), "{user} on every node");
    harness.finish().await;
    assert!(!nodes.iter().any(has_user), "{user} left every node");
}

/// A restarted operator (an upgrade, a leader change) finds a Ready stack as it left it and
/// writes nothing — no apply, no status patch, no Event — in its start-up reconcile and in
/// the resyncs after it (every 2 s here); the PodMonitor too when the cluster serves the kind.
#[tokio::test]
async fn a_restarted_operator_writes_nothing_for_a_ready_stack() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::DynamicObject;

    let mut harness = Harness::start("restartquiet").await;
    let deps = Deps::from_env();
    harness
        .apply_ready(&stack("kappa", &deps.redis_url, "Delete"))
        .await;
    let pod_monitors =
        kube::discovery::pinned_kind(&harness.client, &operator::build::pod_monitor_kind())
            .await
            .ok()
            .map(|(resource, _)| {
                Api::<DynamicObject>::namespaced_with(
                    harness.client.clone(),
                    &harness.ns.name,
                    &resource,
                )
            });
    // What the operator writes, by object: the stack's resourceVersion (status), the Events
    // about it, the spec generations and data versions of what it applies.
    async fn written(
        harness: &Harness,
        pod_monitors: Option<&Api<DynamicObject>>,
    ) -> BTreeMap<String, Option<String>> {
        let mut seen = BTreeMap::new();
        seen.insert(
            "stack".to_owned(),
            harness.get("kappa").await.resource_version(),
        );
        let events: Api<Event> = harness.api();
        let mut names: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("kappa"))
            .map(|e| format!("{}:{:?}", e.name_any(), e.deprecated_count))
            .collect();
        names.sort();
        seen.insert("events".to_owned(), Some(names.join(",")));
        for d in harness
            .api::<Deployment>()
            .list(&ListParams::default())
            .await
            .unwrap()
        {
            let generation = d.metadata.generation.map(|g| g.to_string());
            seen.insert(format!("deployment/{}", d.name_any()), generation);
        }
        let versions = [
            (
                "configmap",
                resource_versions(&harness.api::<ConfigMap>()).await,
            ),
            ("secret", resource_versions(&harness.api::<Secret>()).await),
            (
                "networkpolicy",
                resource_versions(&harness.api::<NetworkPolicy>()).await,
            ),
        ];
        let monitors = match pod_monitors {
            Some(monitors) => resource_versions(monitors).await,
            None => Vec::new(),
        };
        for (kind, objects) in versions.into_iter().chain([("podmonitor", monitors)]) {
            for (name, version) in objects {
                seen.insert(format!("{kind}/{name}"), version);
            }
        }
        seen
    }

    /// Every object of `api`'s kind in the namespace: its name and resourceVersion.
    async fn resource_versions<K>(api: &Api<K>) -> Vec<(String, Option<String>)>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let list = api.list(&ListParams::default()).await.unwrap();
        list.into_iter()
            .map(|o| (o.name_any(), o.resource_version()))
            .collect()
    }

    // The last status write and Events of the rollout land first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = written(&harness, pod_monitors.as_ref()).await;
    assert!(
        before.contains_key("deployment/kappa-api-gateway"),
        "{before:?}"
    );
    harness.restart(|_| {}).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = written(&harness, pod_monitors.as_ref()).await;
    assert_eq!(before, after, "the restarted operator wrote");
    harness.finish().await;
}
