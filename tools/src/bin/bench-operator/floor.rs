//! The control plane's floor for N stacks: the Kubernetes objects the operator applies for
//! them, built with the operator's own pure builders ([`operator::build`]) and applied by a
//! plain client, timed until every Deployment is Available (see the crate's documentation).
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::Retryable as _;
use common::procstat::CpuSnapshot;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use operator::build::{self, Scraping, URL_KEY};
use operator::controller::APPLIED_HASH_ANNOTATION;
use operator::crd::{MiddlewareStack, ServicePrincipal};
use operator::owned::Compact as _;
use operator::validate::{ValidatedStack, validate};
use secrecy::ExposeSecret as _;

/// The plain client's field manager.
const FIELD_MANAGER: &str = "bench-floor";

/// What the floor run measured.
pub struct Floor {
    /// From the first apply until the last Deployment was Available; `None`: not all were
    /// before the timeout.
    pub took: Option<Duration>,
    /// Deployments Available at the end, of `deployments`.
    pub available: usize,
    pub deployments: usize,
    /// Stacks applied at once (the operator's reconcile concurrency).
    pub concurrency: usize,
    /// The plain client's writes (every apply attempt), by `verb/resource`.
    pub writes: BTreeMap<String, f64>,
    /// What the plain client applied for one stack, by kind (for the report).
    pub objects: BTreeMap<String, usize>,
    /// What the API server served over the same span, every client's (the plain client's,
    /// Kubernetes' controllers', the scheduler's, kwok's); `None` when its metrics could not
    /// be read.
    pub apiserver: Option<crate::ApiServer>,
    /// CPU over the same span, as for the operator's run.
    pub cpu: (Vec<(String, f64)>, f64),
}

/// One object to apply: its API and its body.
struct Object {
    resource: ApiResource,
    name: String,
    body: DynamicObject,
}

impl Object {
    /// `object` as the operator would apply it (with its applied-hash annotation, computed as
    /// the operator does), less its owner references: the stack they name does not exist in
    /// the floor's namespace, and the garbage collector would delete the object at once.
    fn new<K>(object: &K) -> anyhow::Result<Self>
    where
        K: Resource<DynamicType = ()> + serde::Serialize,
    {
        let serialized = serde_json::to_vec(object).context("serializing a built object")?;
        let hash = build::fingerprint([serialized.as_slice()]);
        let resource = ApiResource::erase::<K>(&());
        let mut body: DynamicObject = serde_json::from_slice(&serialized)
            .context("converting a built object to a dynamic one")?;
        Self::finish(&mut body, hash);
        Ok(Self {
            name: body.name_any(),
            resource,
            body,
        })
    }

    /// A PodMonitor (already dynamic).
    fn dynamic(mut body: DynamicObject, resource: ApiResource) -> anyhow::Result<Self> {
        let serialized = serde_json::to_vec(&body).context("serializing the PodMonitor")?;
        Self::finish(&mut body, build::fingerprint([serialized.as_slice()]));
        Ok(Self {
            name: body.name_any(),
            resource,
            body,
        })
    }

    fn finish(body: &mut DynamicObject, hash: String) {
        body.metadata.owner_references = None;
        body.metadata
            .annotations
            .get_or_insert_default()
            .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash);
    }
}

/// The operator's reconcile concurrency, as the operator started by this benchmark reads it
/// (it inherits this process's environment).
pub fn operator_concurrency() -> usize {
    std::env::var("RECONCILE_CONCURRENCY")
        .ok()
        .and_then(|v| v.trim().parse::<u16>().ok())
        .unwrap_or(operator::Settings::default().concurrency)
        .max(1)
        .into()
}

/// The stack the benchmark creates, as the API server would store it (its defaults applied,
/// by a dry-run create in `ns`), for any name.
async fn stored_spec(client: &Client, ns: &str, replicas: i32) -> anyhow::Result<MiddlewareStack> {
    let stacks: Api<MiddlewareStack> = Api::namespaced(client.clone(), ns);
    let stack: MiddlewareStack = serde_json::from_value(crate::stack("s0000", replicas))
        .context("the benchmark's stack does not parse")?;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    stacks
        .create(&dry_run, &stack)
        .await
        .context("dry-run create of the benchmark's stack")
}

/// The stack named `name` in `ns`, validated as the operator validates it (the uid is made
/// up: no stack object exists).
fn validated(template: &MiddlewareStack, ns: &str, name: &str) -> anyhow::Result<ValidatedStack> {
    let mut stack = template.clone();
    stack.metadata = ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(ns.to_owned()),
        uid: Some(uuid::Uuid::new_v4().to_string()),
        generation: Some(1),
        ..ObjectMeta::default()
    };
    let validated = validate(&stack).with_context(|| format!("validating stack {name}"))?;
    Ok(validated.with_release(operator::Settings::default().release))
}

/// Every object the operator applies for `validated`, in the order it applies them: the
/// connection Secrets (dummy passwords; the credentials stage's), the endpoints ConfigMap,
/// the NetworkPolicy, the PodMonitor (when the cluster serves them), then per service in
/// start-up order its ConfigMap, Service, Deployment, HorizontalPodAutoscaler and
/// PodDisruptionBudget (those it has).
fn objects(
    validated: &ValidatedStack,
    pod_monitors: Option<&ApiResource>,
) -> anyhow::Result<Vec<Object>> {
    let spec = validated.spec();
    let redis_user = operator::names::redis_user(validated);
    let redis_password = operator::provision::generate_password();
    let redis_url = operator::provision::redis::url_with_credentials(
        &spec.redis.url,
        &redis_user,
        redis_password.expose_secret(),
    )
    .context("the stack's Redis URL")?;
    let login = operator::names::postgres_role(validated);
    let database = operator::names::postgres_database(validated);
    let postgres_password = operator::provision::generate_password();
    let ca = build::Ca::Postgres
        .secret_ref(spec)
        .map(|_| build::Ca::Postgres.path());
    let postgres_url = operator::provision::postgres::service_url(
        &spec.postgres,
        &login,
        &database,
        postgres_password.expose_secret(),
        ca.as_deref(),
    );
    let mut secrets = vec![
        build::connection_secret(
            validated,
            build::redis_secret_name(validated),
            None,
            [
                (URL_KEY, redis_url.expose_secret()),
                ("username", &redis_user),
                ("password", redis_password.expose_secret()),
            ],
        ),
        build::connection_secret(
            validated,
            build::postgres_secret_name(validated),
            None,
            [
                (URL_KEY, &postgres_url),
                ("username", &login),
                ("password", postgres_password.expose_secret()),
            ],
        ),
    ];
    let mut kafka_password = String::new();
    if validated.kafka_principal() == ServicePrincipal::Stack {
        kafka_password = operator::provision::generate_password()
            .expose_secret()
            .to_owned();
        secrets.push(build::connection_secret(
            validated,
            build::kafka_secret_name(validated),
            None,
            [
                ("username", &operator::names::kafka_user(validated)),
                ("password", &kafka_password),
                ("mechanism", operator::provision::kafka::STACK_MECHANISM),
            ],
        ));
    }
    let hash = build::fingerprint([
        redis_url.expose_secret().as_bytes(),
        postgres_url.as_bytes(),
        kafka_password.as_bytes(),
    ]);
    let scraping = Scraping::choose(&spec.monitoring, pod_monitors.is_some());
    let desired = build::with_credentials_hash(build::build(validated, scraping), &hash);

    let mut out = Vec::new();
    for secret in &secrets {
        out.push(Object::new(secret)?);
    }
    out.push(Object::new(&desired.endpoints)?);
    if let Some(policy) = &desired.network_policy {
        out.push(Object::new(policy)?);
    }
    if let (Scraping::PodMonitor, Some(resource)) = (scraping, pod_monitors) {
        out.push(Object::dynamic(
            build::pod_monitor(validated),
            resource.clone(),
        )?);
    }
    for service in &desired.services {
        out.push(Object::new(&service.config_map)?);
        out.push(Object::new(&service.service)?);
        out.push(Object::new(&service.deployment)?);
        if let Some(autoscaler) = &service.autoscaler {
            out.push(Object::new(autoscaler)?);
        }
        if let Some(pdb) = &service.pod_disruption_budget {
            out.push(Object::new(pdb)?);
        }
    }
    Ok(out)
}

/// Server-side applies `objects` one after the other (as one reconcile does), each retried on
/// failure; returns the writes by `verb/resource` (every attempt).
async fn apply_stack(
    client: &Client,
    ns: &str,
    objects: Vec<Object>,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut writes = BTreeMap::new();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in objects {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &object.resource);
        let attempts = AtomicU32::new(0);
        (|| async {
            attempts.fetch_add(1, Ordering::Relaxed);
            api.patch(&object.name, &params, &Patch::Apply(&object.body))
                .await
        })
        .retry(
            backon::ConstantBuilder::default()
                .with_delay(Duration::from_secs(1))
                .with_max_times(5),
        )
        .sleep(tokio::time::sleep)
        .notify(|error, _| {
            eprintln!(
                "floor: applying {} {} failed ({error}); retrying",
                object.resource.kind, object.name
            );
        })
        .await
        .with_context(|| format!("applying {} {}", object.resource.kind, object.name))?;
        *writes
            .entry(format!("APPLY/{}", object.resource.plural))
            .or_insert(0.0) += f64::from(attempts.load(Ordering::Relaxed));
    }
    Ok(writes)
}

/// Watches the Deployments of `ns` until `total` of them are Available, as the operator judges
/// a service Available for `CoreAvailable`/`EdgeAvailable` ([`operator::owned::Rollout::available`]:
/// the generation observed, every replica updated, the `Available` condition true), or until
/// `deadline`. Returns when the last one became Available, and how many were.
async fn wait_available(
    api: Api<Deployment>,
    total: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<(Option<Instant>, usize)> {
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut available = HashSet::new();
    loop {
        let event = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Ok((None, available.len())),
            Ok(None) => anyhow::bail!("the watch of the floor's Deployments ended"),
            Ok(Some(Err(error))) => {
                eprintln!("floor: watching the Deployments failed ({error}); retrying");
                continue;
            }
            Ok(Some(Ok(event))) => event,
        };
        match event {
            watcher::Event::Init => available.clear(),
            watcher::Event::InitDone => {}
            watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                if d.state().available(d.metadata.generation) {
                    available.insert(d.name_any());
                } else {
                    available.remove(&d.name_any());
                }
            }
            watcher::Event::Delete(d) => {
                available.remove(&d.name_any());
            }
        }
        if available.len() >= total {
            return Ok((Some(Instant::now()), available.len()));
        }
    }
}

/// The floor for `n` stacks: in a fresh namespace, applies what the operator applies for each
/// (`concurrency` stacks at once), waits for every Deployment to be Available, then deletes
/// the namespace (waiting for it to be gone) and the kwok nodes it added.
pub async fn run(
    client: &Client,
    n: usize,
    timeout: Duration,
    replicas: i32,
) -> anyhow::Result<Floor> {
    let ns = super::create_namespace(client, &format!("bench-floor-{n}")).await?;
    let nodes =
        crate::ensure_node_capacity(client, &ns, n * crate::SERVICES * replicas.max(0) as usize)
            .await
            .context("adding kwok nodes for the floor");
    let result = match &nodes {
        Ok(_) => measure(client, &ns, n, timeout, replicas).await,
        Err(_) => Err(anyhow::anyhow!("no kwok nodes for the floor")),
    };
    // Cleaned up whatever happened: the namespace (and its pods) first, then the nodes.
    eprintln!("floor N={n}: deleting namespace {ns}...");
    let deleted = crate::delete_namespace(client, &ns, timeout).await;
    let nodes_deleted = crate::delete_nodes(client, nodes?).await;
    let floor = result?;
    deleted?;
    nodes_deleted?;
    Ok(floor)
}

async fn measure(
    client: &Client,
    ns: &str,
    n: usize,
    timeout: Duration,
    replicas: i32,
) -> anyhow::Result<Floor> {
    let template = stored_spec(client, ns, replicas).await?;
    // As the operator decides (asked again every minute there): a PodMonitor per stack when
    // the cluster serves the kind.
    let pod_monitors = kube::discovery::pinned_kind(client, &build::pod_monitor_kind())
        .await
        .ok()
        .map(|(resource, _)| resource);
    let mut stacks = Vec::with_capacity(n);
    for i in 0..n {
        let validated = validated(&template, ns, &format!("s{i:04}"))?;
        stacks.push(objects(&validated, pod_monitors.as_ref())?);
    }
    let kinds: BTreeMap<String, usize> =
        stacks
            .first()
            .into_iter()
            .flatten()
            .fold(BTreeMap::new(), |mut by_kind, o| {
                *by_kind.entry(o.resource.kind.clone()).or_insert(0) += 1;
                by_kind
            });
    let deployments = stacks
        .iter()
        .flatten()
        .filter(|o| o.resource.kind == "Deployment")
        .count();
    let concurrency = operator_concurrency();
    eprintln!(
        "floor N={n}: namespace {ns}, applying {} objects ({kinds:?} per stack), \
         {concurrency} stacks at once...",
        stacks.iter().map(Vec::len).sum::<usize>()
    );

    let cpu_before = CpuSnapshot::take();
    let apiserver_before = crate::apiserver(client).await;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let apply = async {
        let per_stack: Vec<BTreeMap<String, f64>> = futures::stream::iter(stacks)
            .map(|objects| apply_stack(client, ns, objects))
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        eprintln!(
            "floor N={n}: applied in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        anyhow::Ok(per_stack.into_iter().fold(
            BTreeMap::new(),
            |mut sum: BTreeMap<String, f64>, writes| {
                for (k, v) in writes {
                    *sum.entry(k).or_insert(0.0) += v;
                }
                sum
            },
        ))
    };
    let wait = wait_available(Api::namespaced(client.clone(), ns), deployments, deadline);
    let (writes, (done, available)) = tokio::try_join!(apply, wait)?;
    let took = done.map(|at| at.duration_since(started));
    let cpu = CpuSnapshot::take().since(&cpu_before);
    let apiserver = crate::apiserver_delta(
        &format!("floor N={n}"),
        apiserver_before,
        crate::apiserver(client).await,
    );
    match took {
        Some(t) => eprintln!(
            "floor N={n}: all {deployments} Deployments Available after {:.1} s",
            t.as_secs_f64()
        ),
        None => eprintln!(
            "floor N={n}: only {available} of {deployments} Deployments Available after {} s",
            timeout.as_secs()
        ),
    }
    Ok(Floor {
        took,
        available,
        deployments,
        concurrency,
        writes,
        objects: kinds,
        apiserver,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_applies_what_the_operator_builds_for_the_benchmarks_stack() {
        let template: MiddlewareStack =
            serde_json::from_value(crate::stack("s0000", 1)).expect("the stack parses");
        let validated = validated(&template, "ns", "s0001").expect("the stack is valid");
        let objects = objects(&validated, None).expect("the objects build");
        let kinds: Vec<(&str, &str)> = objects
            .iter()
            .map(|o| (o.resource.kind.as_str(), o.name.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("Secret", "s0001-redis"),
                ("Secret", "s0001-postgres"),
                ("ConfigMap", "s0001-endpoints"),
                ("NetworkPolicy", "s0001-internal"),
                ("ConfigMap", "s0001-command-service"),
                ("Service", "s0001-command-service"),
                ("Deployment", "s0001-command-service"),
                ("ConfigMap", "s0001-processor"),
                ("Service", "s0001-processor"),
                ("Deployment", "s0001-processor"),
                ("ConfigMap", "s0001-cache-updater"),
                ("Service", "s0001-cache-updater"),
                ("Deployment", "s0001-cache-updater"),
                ("ConfigMap", "s0001-ws-hub"),
                ("Service", "s0001-ws-hub"),
                ("Deployment", "s0001-ws-hub"),
                ("ConfigMap", "s0001-api-gateway"),
                ("Service", "s0001-api-gateway"),
                ("Deployment", "s0001-api-gateway"),
            ]
        );
        for object in &objects {
            assert_eq!(object.body.metadata.owner_references, None);
            assert_eq!(object.body.metadata.namespace.as_deref(), Some("ns"));
            assert!(
                object
                    .body
                    .annotations()
                    .contains_key(APPLIED_HASH_ANNOTATION)
            );
        }
    }
}
