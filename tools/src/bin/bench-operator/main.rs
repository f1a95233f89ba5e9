//! `bench-operator` (`just bench-operator`): the operator on the local kwok control plane with
//! real provisioning (Kafka topics, Redis ACL users, PostgreSQL roles and databases on the
//! local dependencies). For each N in `BENCH_STACKS` it starts the release
//! `meridian-operator` binary (next to this one) on a fresh namespace, creates N stacks, and
//! measures:
//! - the time until all N are `Ready=True`, against the floor below (goal ≤ 1.10×);
//! - the operator's API writes per stack until Ready, by verb and resource (where the API
//!   server's load comes from);
//! - every client's API writes per stack until Ready, from the API server's own
//!   `apiserver_request_total` (the operator's, Kubernetes' controllers', the scheduler's,
//!   kwok's), and the CPU each process used meanwhile (`/proc`): where a slow rollout's time
//!   goes on the local host;
//! - the operator's peak RSS (`VmHWM`, target ≤ 64 MiB) during the ramp-up, and that of the
//!   operator restarted for the steady-state window below (its initial lists hold every
//!   stack's objects at once);
//! - API writes per stack in steady state over `BENCH_STEADY_SECONDS` (default 60), from the
//!   operator's own `operator_api_requests_total` (target 0; Lease renewals are leader
//!   election, not per stack, and are reported separately). The operator is restarted for
//!   this window with a resync of 30 s: every stack is reconciled when it starts and re-checked
//!   (Kafka, Redis, PostgreSQL, objects) during the window. The ramp-up runs with the
//!   deployed resync (300 s).
//!
//! Then it deletes the stacks (topics, databases and credentials deleted per `deletionPolicy`),
//! waits for the finalizers, stops the operator, deletes the namespace and waits for it to be
//! gone.
//!
//! # The floor
//! The goal is N stacks Ready within 10 % of the control plane's *floor*: the time the same
//! Kubernetes objects take when a plain client applies them. So after each operator run (and
//! its clean-up) comes a floor run ([`floor`]), on a fresh namespace with the operator
//! stopped: for each of the N stacks, the objects the operator applies for it are built with
//! the operator's own pure builders (`operator::validate` on the spec the benchmark posts, as
//! the API server stores it; `operator::build`), with the connection Secrets the credentials
//! stage writes filled with dummy passwords, and server-side applied (field manager
//! `bench-floor`), one object after the other per stack and as many stacks at once as the
//! operator reconciles (`RECONCILE_CONCURRENCY`, default 16). No Kafka, Redis or PostgreSQL
//! provisioning, no stack object, status or Event: that is the operator's share. The floor is
//! the time from the first apply until every Deployment is Available as the operator judges
//! it for `CoreAvailable`/`EdgeAvailable` (generation observed, every replica updated,
//! `Available=True`). Unlike the operator, the plain client does not wait for the core
//! services before starting the hub and the gateway. The objects carry no owner reference (no
//! stack exists to own them, and the garbage collector would delete them). The report puts
//! the floor next to the operator's time to Ready (ratio, goal ≤ 1.10×) and the plain client's
//! API writes per stack next to the operator's; then the floor's namespace is deleted (and
//! waited for).
//!
//! Environment: `KUBECONFIG`, `KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL`, `DATABASE_URL` (the
//! `dev/deps.sh env` values), `BENCH_STACKS` (default `100,1000`), `BENCH_STEADY_SECONDS`,
//! `BENCH_READY_TIMEOUT_SECONDS` (default 300), `BENCH_REPLICAS` (pods per service, default 1),
//! `BENCH_FLOOR` (default on; `0` skips the floor runs), `RECONCILE_CONCURRENCY` (passed on to
//! the operator; the floor's concurrency too).
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::Retryable as _;
use common::procstat::{self, CpuSnapshot};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Client, ResourceExt as _};
use operator::crd::MiddlewareStack;
use serde_json::json;

mod floor;

/// The goal: N stacks Ready within 10 % of the control plane's floor.
const FLOOR_GOAL: f64 = 1.10;

/// Write verbs, as the operator's and the API server's request counters name them (the API
/// server counts a server-side apply as `APPLY`).
const WRITE_VERBS: [&str; 5] = ["POST", "PUT", "PATCH", "APPLY", "DELETE"];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let counts: Vec<usize> = std::env::var("BENCH_STACKS")
        .unwrap_or_else(|_| "100,1000".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let steady = Duration::from_secs(env_or("BENCH_STEADY_SECONDS", 60));
    let timeout = Duration::from_secs(env_or("BENCH_READY_TIMEOUT_SECONDS", 300));
    let replicas: i32 = env_or("BENCH_REPLICAS", 1);
    let with_floor = std::env::var("BENCH_FLOOR").map_or(true, |v| v.trim() != "0");
    let client = Client::try_default()
        .await
        .context("no KUBECONFIG: eval \"$(bash dev/deps.sh env)\"")?;
    operator_crd(&client).await?;
    let mut results = Vec::new();
    for n in counts {
        let mut result = run(&client, n, steady, timeout, replicas)
            .await
            .with_context(|| format!("the operator run of {n} stacks"))?;
        if with_floor {
            result.floor = Some(
                floor::run(&client, n, timeout, replicas)
                    .await
                    .with_context(|| format!("the floor run of {n} stacks"))?,
            );
        }
        results.push(result);
    }
    println!();
    println!("bench-operator: real provisioning (Kafka topics 1 partition each, Redis ACL user,");
    println!("PostgreSQL role + database per stack), {replicas} pod(s) per service on kwok,");
    println!(
        "ramp-up with the deployed resync (300 s); steady-state window {} s (300 s for a long \
         soak) after a restart with a resync of {STEADY_RESYNC_SECONDS} s",
        steady.as_secs()
    );
    for r in &results {
        r.print();
    }
    Ok(())
}

struct Result_ {
    n: usize,
    provisioned_after: Option<Duration>,
    ready_after: Option<Duration>,
    ready: usize,
    /// The ramp-up operator's peak RSS.
    rss_kib: u64,
    /// The restarted operator's peak RSS: its initial lists of every stack's objects, then a
    /// reconcile of every stack.
    restart_rss_kib: u64,
    /// The operator's API writes from its start until 5 s after the last stack was Ready.
    ramp_writes: BTreeMap<String, f64>,
    /// Its API writes during the steady-state window.
    writes: BTreeMap<String, f64>,
    window: Duration,
    /// What the API server served from the first stack created until all were Ready (or the
    /// timeout), every client's; `None` when its metrics could not be read.
    apiserver_ramp: Option<ApiServer>,
    /// CPU over the same span: share of one core per process name, and the machine's idle.
    ramp_cpu: (Vec<(String, f64)>, f64),
    /// The control plane's floor for the same stacks (`None`: `BENCH_FLOOR=0`).
    floor: Option<floor::Floor>,
    /// Where the reconciles' time went until Ready: per step of
    /// `operator_step_duration_seconds`, the seconds summed over every reconcile and the count.
    steps: BTreeMap<String, (f64, f64)>,
}

/// Lease renewals are leader election, not work for any stack.
fn is_lease(verb_resource: &str) -> bool {
    verb_resource.ends_with("/leases")
}

impl Result_ {
    /// `writes` per stack, by verb/resource, without Lease renewals.
    fn per_stack<'a>(&self, writes: &'a BTreeMap<String, f64>) -> BTreeMap<&'a str, f64> {
        writes
            .iter()
            .filter(|(k, _)| !is_lease(k))
            .map(|(k, v)| (k.as_str(), v / self.n as f64))
            .collect()
    }

    fn print(&self) {
        // `+ 0.0`: an empty sum is -0.0, which would print as "-0.000".
        let per_stack: f64 = self.per_stack(&self.writes).values().sum::<f64>() + 0.0;
        let leases: f64 = self
            .writes
            .iter()
            .filter(|(k, _)| is_lease(k))
            .map(|(_, v)| v)
            .sum();
        let target_ready = if self.n >= 1000 {
            " (target ≤ 120 s)"
        } else {
            ""
        };
        match self.provisioned_after {
            Some(t) => println!(
                "N={:>5}: all provisioned by the operator (DependenciesReady, TopicsReady, CredentialsReady True: topics, Redis users, PG roles+databases, Secrets) after {:.1} s",
                self.n,
                t.as_secs_f64()
            ),
            None => println!("N={:>5}: not all provisioned before the timeout", self.n),
        }
        match self.ready_after {
            Some(t) => println!(
                "N={:>5}: all Ready after {:.1} s{target_ready}{}",
                self.n,
                t.as_secs_f64(),
                if self.n >= 1000 {
                    if t.as_secs() <= 120 {
                        " — met"
                    } else {
                        " — NOT met"
                    }
                } else {
                    ""
                }
            ),
            None => println!(
                "N={:>5}: only {} of {} Ready before the timeout — NOT met",
                self.n, self.ready, self.n
            ),
        }
        let ramp: BTreeMap<&str, f64> = self
            .per_stack(&self.ramp_writes)
            .into_iter()
            .map(|(k, v)| (k, (v * 10.0).round() / 10.0))
            .collect();
        println!(
            "         API writes per stack until Ready: {:.1}; by verb/resource: {ramp:?}",
            ramp.values().sum::<f64>()
        );
        let span = self
            .ready_after
            .unwrap_or(self.window)
            .as_secs_f64()
            .max(1.0);
        if let Some(api) = &self.apiserver_ramp {
            let total: f64 = api.writes.values().sum();
            let by = per_stack_rounded(&api.writes, self.n as f64);
            println!(
                "         API server writes until Ready, every client (operator, Kubernetes' controllers, scheduler, kwok, this benchmark): {:.1} per stack, {:.0}/s; by verb/resource: {by:?}",
                total / self.n as f64,
                total / span
            );
            println!(
                "         API server request time until Ready, every client, reads included: {}",
                busiest(&api.seconds, self.n as f64)
            );
        }
        if !self.steps.is_empty() {
            let total: f64 = self.steps.values().map(|(seconds, _)| seconds).sum();
            let by: Vec<String> = self
                .steps
                .iter()
                .map(|(step, (seconds, count))| {
                    format!(
                        "{step} {seconds:.1} s ({:.0} %, {count:.0}× {:.0} ms)",
                        seconds / total.max(f64::EPSILON) * 100.0,
                        seconds / count * 1000.0
                    )
                })
                .collect();
            println!(
                "         reconcile steps until Ready, summed over the reconciles (up to RECONCILE_CONCURRENCY at once): {}",
                by.join(", ")
            );
        }
        let (shares, idle) = &self.ramp_cpu;
        let top = (shares.iter().take(10).cloned().collect(), *idle);
        println!(
            "         CPU until Ready (share of one core): {}",
            procstat::describe(&top)
        );
        if let Some(floor) = &self.floor {
            self.print_floor(floor, ramp.values().sum());
        }
        let rss_verdict = |kib: u64| if kib <= 64 * 1024 { "met" } else { "NOT met" };
        println!(
            "         operator peak RSS {:.1} MiB during the ramp-up, {:.1} MiB after a restart \
             (target ≤ 64 MiB — {} / {})",
            self.rss_kib as f64 / 1024.0,
            self.restart_rss_kib as f64 / 1024.0,
            rss_verdict(self.rss_kib),
            rss_verdict(self.restart_rss_kib),
        );
        // Before every stack is Ready the window still holds the ramp's writes.
        let verdict = if self.ready < self.n {
            "not measured: the stacks were still rolling out"
        } else if per_stack == 0.0 {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "         steady-state API writes per stack over {} s: {per_stack:.3} (target 0 — {verdict}); by verb/resource: {:?}; Lease renewals (leader election, not per stack): {leases}",
            self.window.as_secs(),
            self.writes
        );
    }

    /// The floor's lines: its time next to the operator's, and its writes per stack next to
    /// the operator's `operator_writes` per stack until Ready.
    fn print_floor(&self, floor: &floor::Floor, operator_writes: f64) {
        let n = self.n as f64;
        match (floor.took, self.ready_after) {
            (Some(took), Some(ready)) => {
                let ratio = ready.as_secs_f64() / took.as_secs_f64().max(0.001);
                println!(
                    "         floor (plain client, the same objects, {} stacks at once): all {} Deployments Available after {:.1} s; operator time to Ready {:.1} s = {ratio:.2}× the floor (goal ≤ {FLOOR_GOAL:.2}× — {})",
                    floor.concurrency,
                    floor.deployments,
                    took.as_secs_f64(),
                    ready.as_secs_f64(),
                    if ratio <= FLOOR_GOAL {
                        "met"
                    } else {
                        "NOT met"
                    }
                );
            }
            (Some(took), None) => println!(
                "         floor (plain client, the same objects, {} stacks at once): all {} Deployments Available after {:.1} s; the operator did not get every stack Ready (goal ≤ {FLOOR_GOAL:.2}× — NOT met)",
                floor.concurrency,
                floor.deployments,
                took.as_secs_f64()
            ),
            (None, _) => println!(
                "         floor: only {} of {} Deployments Available before the timeout: no ratio",
                floor.available, floor.deployments
            ),
        }
        let writes: f64 = floor.writes.values().sum();
        let by = per_stack_rounded(&floor.writes, n);
        println!(
            "         floor API writes per stack by the plain client: {:.1} (objects per stack: {:?}); by verb/resource: {by:?}; the operator's until Ready: {operator_writes:.1} ({:+.1} over the floor)",
            writes / n,
            floor.objects,
            operator_writes - writes / n
        );
        if let Some(api) = &floor.apiserver {
            let total: f64 = api.writes.values().sum();
            let span = floor
                .took
                .unwrap_or(Duration::from_secs(1))
                .as_secs_f64()
                .max(1.0);
            let by = per_stack_rounded(&api.writes, n);
            println!(
                "         floor API server writes until Available, every client (plain client, Kubernetes' controllers, scheduler, kwok): {:.1} per stack, {:.0}/s; by verb/resource: {by:?}",
                total / n,
                total / span
            );
            println!(
                "         floor API server request time until Available, every client, reads included: {}",
                busiest(&api.seconds, n)
            );
        }
        let (shares, idle) = &floor.cpu;
        let top = (shares.iter().take(10).cloned().collect(), *idle);
        println!(
            "         floor CPU until Available (share of one core): {}",
            procstat::describe(&top)
        );
    }
}

async fn operator_crd(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = operator::crd().context("rendering the CRD")?;
    // Without the conversion webhook's `clientConfig`: the stacks are written and read as
    // v1beta1, the storage version (no conversion), and the operator runs without its
    // webhook. Another client's config stays as it is; applying the chart's Service next to
    // the `url` a local operator (the e2e's) wrote would make it invalid (both set).
    crd.spec.conversion = None;
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("bench-operator").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("applying CRD {name}"))?;
    let established = kube::runtime::wait::await_condition(
        crds,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .with_context(|| format!("CRD {name} not Established after 30 s"))??;
    Ok(())
}

fn stack(name: &str, replicas: i32) -> serde_json::Value {
    let topic = json!({ "partitions": 1 });
    let service = json!({ "replicas": replicas });
    json!({
        "apiVersion": "meridian.dev/v1beta1",
        "kind": "MiddlewareStack",
        "metadata": { "name": name },
        "spec": {
            "image": { "registry": "registry.invalid/meridian", "tag": "0.1.0" },
            "services": {
                "gateway": service, "commandService": service, "processor": service,
                "cacheUpdater": service, "hub": service
            },
            "kafka": {
                "bootstrapServers": std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned()),
                "topics": { "commands": topic, "events": topic, "cache": topic, "dlq": topic }
            },
            "redis": {
                "url": std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
                "adminSecretRef": { "name": "redis-admin" }
            },
            "postgres": {
                "host": "127.0.0.1", "port": 5432, "database": "postgres",
                "sslMode": "disable", "adminSecretRef": { "name": "pg-admin" }
            },
            "deletionPolicy": { "topics": "Delete", "database": "Delete", "credentials": "Delete" }
        }
    })
}

/// Sums `operator_api_requests_total` write counters by `verb/resource`.
async fn writes(port: u16) -> anyhow::Result<BTreeMap<String, f64>> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(write_counters(&body, "operator_api_requests_total"))
}

/// `operator_step_duration_seconds` by step: the seconds summed over every reconcile, and how
/// many times the step ran.
async fn step_seconds(port: u16) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .context("the operator's metrics do not parse")?;
    // A histogram's `_sum` and `_count` lines parse as samples of their own.
    let mut steps = BTreeMap::new();
    for sample in &scrape.samples {
        let step = sample.labels.get("step").unwrap_or_default().to_owned();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let entry = steps.entry(step).or_insert((0.0, 0.0));
        match sample.metric.as_str() {
            "operator_step_duration_seconds_sum" => entry.0 += value,
            "operator_step_duration_seconds_count" => entry.1 += value,
            _ => {}
        }
    }
    steps.retain(|step, (_, count)| !step.is_empty() && *count > 0.0);
    Ok(steps)
}

/// What each counter in `after` grew by since `before` (the ones that grew).
fn counter_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// What the API server's own metrics say, every client's (the operator, Kubernetes'
/// controllers, the scheduler, kwok), by `verb/resource`; read from one scrape.
struct ApiServer {
    /// The writes it served (`apiserver_request_total`).
    writes: BTreeMap<String, f64>,
    /// The seconds its requests took (`apiserver_request_duration_seconds_sum`), every verb
    /// but those that last as long as their clients keep them ([`timed_verb`]): where its time
    /// goes, reads included.
    seconds: BTreeMap<String, f64>,
}

/// Reads the API server's metrics.
async fn apiserver(client: &Client) -> anyhow::Result<ApiServer> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let body = client.request_text(request).await?;
    Ok(ApiServer {
        writes: write_counters(&body, "apiserver_request_total"),
        seconds: counters(&body, "apiserver_request_duration_seconds_sum", timed_verb),
    })
}

/// The API server's counters between two reads of [`apiserver`]; `None` (said on stderr, as
/// `who`) when either failed.
fn apiserver_delta(
    who: &str,
    before: anyhow::Result<ApiServer>,
    after: anyhow::Result<ApiServer>,
) -> Option<ApiServer> {
    match (before, after) {
        (Ok(before), Ok(after)) => Some(ApiServer {
            writes: counter_delta(&before.writes, &after.writes),
            seconds: counter_delta(&before.seconds, &after.seconds),
        }),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("{who}: the API server's metrics could not be read: {error}");
            None
        }
    }
}

/// Whether the request time of `verb` says where the API server's time goes: not `WATCH`
/// and `CONNECT`, which last as long as their clients keep them.
fn timed_verb(verb: &str) -> bool {
    !matches!(verb, "WATCH" | "CONNECT")
}

/// `counts` per stack of `n`, to one decimal, those that round to zero left out (the
/// report's by-verb/resource maps).
fn per_stack_rounded(counts: &BTreeMap<String, f64>, n: f64) -> BTreeMap<&str, f64> {
    counts
        .iter()
        .map(|(k, v)| (k.as_str(), (v / n * 10.0).round() / 10.0))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// The API server's busiest request kinds of a run (from [`ApiServer::seconds`] deltas), as
/// milliseconds per stack, the largest first.
fn busiest(seconds: &BTreeMap<String, f64>, n: f64) -> String {
    let total: f64 = seconds.values().sum();
    let mut by: Vec<(&String, f64)> = seconds.iter().map(|(k, v)| (k, *v)).collect();
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = by
        .iter()
        .take(8)
        .map(|(k, v)| format!("{k} {:.0} ms", v * 1000.0 / n))
        .collect();
    format!(
        "{:.0} ms per stack; busiest: {}",
        total * 1000.0 / n,
        top.join(", ")
    )
}

/// Sums the samples of counter `metric` in Prometheus text `body` whose `verb` label is a
/// write, by `verb/resource`.
fn write_counters(body: &str, metric: &str) -> BTreeMap<String, f64> {
    counters(body, metric, |verb| WRITE_VERBS.contains(&verb))
}

/// Sums the samples of `metric` in Prometheus text `body` whose `verb` label `keep` accepts,
/// by `verb/resource[/subresource]`.
fn counters(body: &str, metric: &str, keep: impl Fn(&str) -> bool) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(scrape) = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))) else {
        return out;
    };
    for sample in scrape.samples.iter().filter(|s| s.metric == metric) {
        let label = |name: &str| sample.labels.get(name).unwrap_or_default();
        let verb = label("verb");
        if !keep(verb) {
            continue;
        }
        let mut key = format!("{verb}/{}", label("resource"));
        let subresource = label("subresource");
        if !subresource.is_empty() {
            key = format!("{key}/{subresource}");
        }
        let value = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How many stacks in `store` have `CredentialsReady=True` (the operator's provisioning done)
/// and how many `Ready=True`. The store is fed by a watch: polling with LISTs of 1,000 stacks
/// twice a second would load the API server the operator is being measured against.
fn count_ready(store: &reflector::Store<MiddlewareStack>) -> (usize, usize) {
    let stacks = store.state();
    let count = |type_: &str| {
        stacks
            .iter()
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.conditions
                        .iter()
                        .any(|c| c.type_ == type_ && c.status == "True")
                })
            })
            .count()
    };
    (count("CredentialsReady"), count("Ready"))
}

/// Deletes namespace `ns` and waits until it is gone (its pods too), for at most `timeout`
/// (then warns and returns).
async fn delete_namespace(client: &Client, ns: &str, timeout: Duration) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.delete(ns, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("deleting namespace {ns}")),
    }
    let deadline = Instant::now() + timeout;
    loop {
        match namespaces.get_opt(ns).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) if Instant::now() > deadline => {
                eprintln!("namespace {ns} still terminating after {timeout:?}; going on");
                return Ok(());
            }
            Ok(Some(_)) => {}
            Err(error) => eprintln!("reading namespace {ns} failed ({error}); retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes the kwok nodes `names`.
async fn delete_nodes(client: &Client, names: Vec<String>) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for node in names {
        match nodes.delete(&node, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error).with_context(|| format!("deleting node {node}")),
        }
    }
    Ok(())
}

/// Pods per stack and replica: one per service.
const SERVICES: usize = 5;
/// Pods per added kwok node, as `dev/k8s/node.yaml` gives the cluster's one node.
const PODS_PER_NODE: usize = 500;
/// The annotation that makes kwok play a node (`--manage-nodes-with-annotation-selector`).
const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// Adds kwok nodes (named after `ns`) until the fake nodes can hold `pods` more pods, and waits
/// for them to be Ready; returns their names. The e2e cluster has one node of 500 pods:
/// without more, 1,000 stacks (5,000 pods) could never all be Ready ("Too many pods").
async fn ensure_node_capacity(
    client: &Client,
    ns: &str,
    pods: usize,
) -> anyhow::Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let capacity: usize = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| {
            n.annotations()
                .get(KWOK_NODE_ANNOTATION)
                .map(String::as_str)
                == Some("fake")
        })
        .filter_map(|n| {
            n.status
                .as_ref()?
                .allocatable
                .as_ref()?
                .get("pods")?
                .0
                .parse::<usize>()
                .ok()
        })
        .sum();
    let running = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
        .await?
        .items
        .len();
    let count = (pods + running)
        .saturating_sub(capacity)
        .div_ceil(PODS_PER_NODE);
    let mut added = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("{ns}-node-{i}");
        let resources =
            json!({ "cpu": "64", "memory": "256Gi", "pods": PODS_PER_NODE.to_string() });
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "annotations": { KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0" },
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "status": { "allocatable": resources, "capacity": resources },
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        added.push(name);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in &added {
        loop {
            let ready = nodes
                .get(name)
                .await?
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "kwok node {name} not Ready after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if count > 0 {
        eprintln!("{ns}: added {count} kwok node(s) of {PODS_PER_NODE} pods for {pods} pods");
    }
    Ok(added)
}

/// Creates a namespace named `prefix` plus a random suffix; returns its name.
async fn create_namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
    let ns = format!("{prefix}-{:08x}", rand::random::<u32>());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    Ok(ns)
}

/// The resync period of the operator restarted for the steady-state window: short, so that
/// the window re-checks every stack (Kafka, Redis, PostgreSQL, objects) more than once. The
/// ramp-up runs with the deployed default (`RESYNC_SECONDS` unset: 300 s).
const STEADY_RESYNC_SECONDS: &str = "30";

/// Starts the release `meridian-operator` next to this binary on `ns`, as the Helm chart runs
/// it (log level included), its metrics on `port`, its log in `log`; `resync` overrides the
/// resync period.
fn spawn_operator(
    ns: &str,
    port: u16,
    resync: Option<&str>,
    log: &str,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .context("no parent directory")?
        .join("meridian-operator");
    let log = std::fs::File::create(log)?;
    let mut command = tokio::process::Command::new(&binary);
    command
        .env("WATCH_NAMESPACE", ns)
        .env("LEASE_NAMESPACE", ns)
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        // The stacks are written as v1beta1: no conversion to serve.
        .env("WEBHOOK_ENABLED", "false")
        // As the Helm chart runs it (charts/meridian-operator/templates/deployment.yaml):
        // `logLevel: info`, JSON logs, and `MALLOC_ARENA_MAX=2` unless the caller sets it
        // (16 is glibc's default on two cores).
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "json")
        .env(
            "MALLOC_ARENA_MAX",
            std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".to_owned()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(resync) = resync {
        command.env("RESYNC_SECONDS", resync);
    }
    command.spawn().with_context(|| {
        format!(
            "failed to start {} (build it: cargo build --release -p operator --bins)",
            binary.display()
        )
    })
}

/// Stops the operator as Kubernetes would (SIGTERM: it releases its Lease, so the next one
/// leads at once), killing it after 30 s.
async fn stop_operator(child: &mut tokio::process::Child, pid: u32) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        eprintln!("the operator (pid {pid}) did not stop within 30 s of SIGTERM; killing it");
        child.start_kill().context("killing the operator")?;
        let _ = child.wait().await;
    }
    Ok(())
}

async fn run(
    client: &Client,
    n: usize,
    steady: Duration,
    timeout: Duration,
    replicas: i32,
) -> anyhow::Result<Result_> {
    let ns = create_namespace(client, &format!("bench-{n}")).await?;
    let added_nodes = ensure_node_capacity(client, &ns, n * SERVICES * replicas.max(0) as usize)
        .await
        .context("adding kwok nodes")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, data) in [
        (
            "pg-admin",
            json!({ "username": "postgres", "password": "postgres" }),
        ),
        (
            "redis-admin",
            json!({ "username": "default", "password": "" }),
        ),
    ] {
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({ "metadata": { "name": name }, "stringData": data }),
                )?,
            )
            .await?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = spawn_operator(&ns, port, None, &format!("/tmp/bench-operator-{n}.log"))?;
    let pid = child.id().context("the operator exited at once")?;
    eprintln!("N={n}: namespace {ns}, operator pid {pid}, creating stacks...");

    let stacks: Api<MiddlewareStack> = Api::namespaced(client.clone(), &ns);
    let cpu_before = CpuSnapshot::take();
    let apiserver_before = apiserver(client).await;
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let stacks = stacks.clone();
            async move {
                let stack: MiddlewareStack =
                    serde_json::from_value(stack(&format!("s{i:04}"), replicas))?;
                stacks.create(&PostParams::default(), &stack).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!("N={n}: created in {:.1} s", started.elapsed().as_secs_f64());
    let (store, writer) = reflector::store();
    let watch = tokio::spawn(
        reflector::reflector(
            writer,
            watcher::watcher(stacks.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    let mut ready;
    let mut provisioned_after = None;
    let ready_after = loop {
        let (provisioned, all_ready) = count_ready(&store);
        ready = all_ready;
        if provisioned == n && provisioned_after.is_none() {
            provisioned_after = Some(started.elapsed());
            eprintln!(
                "N={n}: all provisioned after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        if ready == n {
            break Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    watch.abort();
    let steps = step_seconds(port).await.unwrap_or_else(|error| {
        eprintln!("N={n}: the operator's step durations could not be read: {error}");
        BTreeMap::new()
    });
    let ramp_cpu = CpuSnapshot::take().since(&cpu_before);
    let apiserver_ramp =
        apiserver_delta(&format!("N={n}"), apiserver_before, apiserver(client).await);
    eprintln!(
        "N={n}: {ready}/{n} Ready after {:.1} s; steady-state window {} s...",
        started.elapsed().as_secs_f64(),
        steady.as_secs()
    );
    // Let the last status writes and Events of the ramp-up land, then restart the operator
    // for the steady-state window: the new one reconciles every stack when it starts and
    // again every `STEADY_RESYNC_SECONDS`; all of it must write nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ramp_writes = writes(port).await?;
    let rss_kib = peak_rss_kib(pid);
    stop_operator(&mut child, pid).await?;
    let mut child = spawn_operator(
        &ns,
        port,
        Some(STEADY_RESYNC_SECONDS),
        &format!("/tmp/bench-operator-{n}-steady.log"),
    )?;
    let before = (|| writes(port))
        .retry(
            backon::ConstantBuilder::default()
                .with_delay(Duration::from_millis(100))
                .with_max_times(100),
        )
        .sleep(tokio::time::sleep)
        .await
        .context("the restarted operator's metrics did not answer within 10 s")?;
    tokio::time::sleep(steady).await;
    let after = writes(port).await?;
    let delta = counter_delta(&before, &after);
    let restart_rss_kib = child.id().map_or(0, peak_rss_kib);

    eprintln!("N={n}: deleting the stacks (cleanup per deletionPolicy)...");
    // One stack per request, 16 at a time: a collection delete of 1,000 stacks (each an
    // update setting its deletionTimestamp) outlasted the API server's request timeout under
    // load, and the connection was closed on every retry. A loaded API server drops
    // connections now and then: each delete is retried rather than leave a namespace of
    // stacks whose finalizers nobody will ever run.
    futures::stream::iter(0..n)
        .map(|i| {
            let stacks = stacks.clone();
            async move {
                let name = format!("s{i:04}");
                (|| async {
                    match stacks.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => Ok(()),
                        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                        Err(error) => Err(error),
                    }
                })
                .retry(
                    backon::ConstantBuilder::default()
                        .with_delay(Duration::from_secs(2))
                        .with_max_times(10),
                )
                .sleep(tokio::time::sleep)
                .notify(|error, _| {
                    eprintln!("N={n}: deleting stack {name} failed ({error}); retrying");
                })
                .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let deadline = Instant::now() + timeout;
    loop {
        match stacks.list(&ListParams::default()).await {
            Ok(list) if list.items.is_empty() => break,
            Ok(list) if Instant::now() > deadline => {
                eprintln!(
                    "N={n}: {} stacks still present after {timeout:?}; releasing their finalizers \
                     so that {ns} can be deleted (their topics and credentials may be left behind)",
                    list.items.len()
                );
                let release = serde_json::json!({"metadata": {"finalizers": null}});
                for stack in list.items {
                    let _ = stacks
                        .patch(
                            &stack.name_any(),
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&release),
                        )
                        .await;
                }
                break;
            }
            Ok(_) => {}
            Err(error) => eprintln!("N={n}: listing the stacks failed ({error}); retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    child.start_kill().context("stopping the operator")?;
    let _ = child.wait().await;
    // Gone, pods and all, before the next run (the floor's) starts on the control plane.
    eprintln!("N={n}: deleting namespace {ns}...");
    delete_namespace(client, &ns, timeout).await?;
    delete_nodes(client, added_nodes).await?;
    Ok(Result_ {
        n,
        provisioned_after,
        ready_after,
        ready,
        rss_kib,
        restart_rss_kib,
        ramp_writes,
        steps,
        writes: delta,
        window: steady,
        apiserver_ramp,
        ramp_cpu,
        floor: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_counters_sum_the_write_verbs_by_resource() {
        let body = r#"# HELP apiserver_request_total Counter of apiserver requests.
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",resource="deployments",verb="PATCH"} 3
apiserver_request_total{code="409",component="apiserver",resource="deployments",verb="PATCH"} 1
apiserver_request_total{code="200",resource="middlewarestacks",subresource="status",verb="PATCH"} 2
apiserver_request_total{code="200",resource="deployments",verb="GET"} 40
"#;
        let counters = write_counters(body, "apiserver_request_total");
        assert_eq!(
            counters,
            BTreeMap::from([
                ("PATCH/deployments".to_owned(), 4.0),
                ("PATCH/middlewarestacks/status".to_owned(), 2.0),
            ])
        );
    }

    #[test]
    fn request_seconds_leave_out_long_lived_watches_and_rank_the_busiest() {
        let body = r#"# HELP apiserver_request_duration_seconds Response latency.
# TYPE apiserver_request_duration_seconds histogram
apiserver_request_duration_seconds_bucket{resource="secrets",verb="GET",le="+Inf"} 4
apiserver_request_duration_seconds_sum{resource="secrets",verb="GET"} 0.5
apiserver_request_duration_seconds_count{resource="secrets",verb="GET"} 4
apiserver_request_duration_seconds_sum{resource="events",verb="POST"} 2
apiserver_request_duration_seconds_sum{resource="pods",verb="WATCH"} 900
"#;
        let seconds = counters(body, "apiserver_request_duration_seconds_sum", timed_verb);
        assert_eq!(
            seconds,
            BTreeMap::from([
                ("GET/secrets".to_owned(), 0.5),
                ("POST/events".to_owned(), 2.0),
            ])
        );
        assert_eq!(
            busiest(&seconds, 10.0),
            "250 ms per stack; busiest: POST/events 200 ms, GET/secrets 50 ms"
        );
    }
}
