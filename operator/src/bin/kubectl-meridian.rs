//! `kubectl meridian`: day-2 commands for MiddlewareStacks (a kubectl plugin: put
//! `kubectl-meridian` on the `PATH`).
//!
//! - `kubectl meridian status <stack>`: one screen with the phase, every stage's condition,
//!   each service's ready/desired replicas, the pipeline (outbox backlog, consumer lag,
//!   dead-lettered commands, from the pods' metrics), the endpoints applications use, and the
//!   stack's latest Events.
//! - `kubectl meridian token <stack> --subject alice --read 'orders/*'`: a JWT signed with
//!   the stack's own HMAC secret (`spec.auth.jwtSecretRef`), with its issuer and audience.
//!
//! - `kubectl meridian rotate-credentials <stack> [--wait]`: asks the operator for new Redis
//!   and PostgreSQL passwords (the stack's rotation annotation); with `--wait`, until the
//!   connection Secrets carry them.
//! - `kubectl meridian rebuild-read-model <stack> [--wait]`: a Job running the cache updater's
//!   pod with `rebuild` (replays `events` into an emptied read model); with `--wait`, until it
//!   finished.
//! - `kubectl meridian dlq replay <stack> [--max N] [--wait]`: a Job running the processor's
//!   pod with `replay-dlq` (sends dead-lettered commands through again, each at most once).
//!
//! It talks to the cluster of the current kubeconfig context, as kubectl does, and needs only
//! read access to the stack, its ConfigMap and Events (`status`) or its JWT Secret (`token`);
//! `rotate-credentials` patches the stack, `rebuild-read-model` and `dlq replay` read the cache
//! updater's or the processor's Deployment and create a Job.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use common::metrics::{
    COMMANDS_DEAD_LETTERED_TOTAL, DEAD_LETTERS_PENDING, KAFKA_CONSUMER_LAG, OUTBOX_BACKLOG,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use operator::build::{self, Component};
use operator::controller::{ROTATE_ANNOTATION, ROTATED_ANNOTATION};
use operator::crd::MiddlewareStack;
use operator::validate::validate;

#[derive(Parser)]
#[command(
    name = "kubectl meridian",
    version,
    about = "Day-2 commands for Meridian stacks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The stack in one screen: phase, conditions, services, endpoints, latest Events.
    Status(Target),
    /// Print a JWT signed with the stack's HMAC secret (for curl, WebSocket clients, tests).
    Token(TokenArgs),
    /// Ask the operator to rotate the stack's Redis and PostgreSQL passwords (the pods roll;
    /// the previous passwords stay valid until they have).
    RotateCredentials(WaitArgs),
    /// Rebuild the read model from the `events` topic: a Job running the cache updater's pod
    /// with `rebuild`.
    RebuildReadModel(WaitArgs),
    /// Dead-lettered commands.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Send dead-lettered commands through the processor again, once what failed them is
    /// fixed: a Job running the processor's pod with `replay-dlq`. A dead letter is never
    /// replayed twice; a command that already finished is skipped.
    Replay(ReplayArgs),
}

#[derive(Args)]
struct ReplayArgs {
    #[command(flatten)]
    run: WaitArgs,
    /// The most commands this run replays (run it again for more).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max: u64,
}

#[derive(Args)]
struct WaitArgs {
    #[command(flatten)]
    target: Target,
    /// Wait until the operation finished (or failed).
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

#[derive(Args)]
struct Target {
    /// The MiddlewareStack.
    stack: String,
    /// Its namespace (default: the current context's).
    #[arg(short, long)]
    namespace: Option<String>,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    target: Target,
    /// The `sub` claim: who the token is for.
    #[arg(long)]
    subject: String,
    /// A document pattern the token may read (`read` claim: `<collection>/<id>`, `*` and `?`
    /// wildcards, e.g. `orders/*`); also lets it join those documents' rooms. Repeatable.
    #[arg(long)]
    read: Vec<String>,
    /// A document pattern the token may send commands for (`write` claim); repeatable.
    #[arg(long)]
    write: Vec<String>,
    /// A further room pattern the token allows on the hub (`rooms` claim, e.g. `cmd:*`);
    /// repeatable.
    #[arg(long = "room")]
    rooms: Vec<String>,
    /// The `client_id` claim (rate limits are per client when present).
    #[arg(long)]
    client_id: Option<String>,
    /// How long the token is valid, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    ttl_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::try_default()
        .await
        .context("cannot reach the cluster of the current kubeconfig context")?;
    match cli.command {
        Command::Status(target) => status(&client, &target).await,
        Command::Token(args) => token(&client, &args).await,
        Command::RotateCredentials(args) => rotate_credentials(&client, &args).await,
        Command::RebuildReadModel(args) => {
            run_task(&client, &args, build::Task::RebuildReadModel, "the rebuild").await
        }
        Command::Dlq(DlqCommand::Replay(args)) => {
            let task = build::Task::ReplayDeadLetters { max: args.max };
            run_task(&client, &args.run, task, "the replay").await
        }
    }
}

async fn stack(client: &Client, target: &Target) -> anyhow::Result<(String, MiddlewareStack)> {
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let stacks: Api<MiddlewareStack> = Api::namespaced(client.clone(), &namespace);
    let stack = stacks
        .get_opt(&target.stack)
        .await
        .with_context(|| format!("cannot read middlewarestack {namespace}/{}", target.stack))?
        .with_context(|| format!("no middlewarestack {namespace}/{}", target.stack))?;
    Ok((namespace, stack))
}

async fn status(client: &Client, target: &Target) -> anyhow::Result<()> {
    let (namespace, stack) = stack(client, target).await?;
    let status = stack.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let phase = status
        .phase
        .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
    let generation = stack.metadata.generation.unwrap_or_default();
    let observed = status.observed_generation.unwrap_or_default();
    println!("Stack      {namespace}/{}", stack.name_any());
    println!(
        "Phase      {phase}{}",
        if stack.spec.paused { " (paused)" } else { "" }
    );
    println!(
        "Generation {generation}{}",
        if observed == generation {
            String::new()
        } else {
            format!(" (status describes {observed}: the operator has not caught up)")
        }
    );

    println!("\nConditions");
    let mut rows = vec![row(["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"])];
    for c in &status.conditions {
        rows.push(row([
            &c.type_,
            &c.status,
            &c.reason,
            &age(now, c.last_transition_time.0),
            &c.message,
        ]));
    }
    print_table(&rows);

    println!(
        "\nServices   {}",
        status
            .services_ready
            .as_deref()
            .unwrap_or("none observed yet")
    );
    let mut rows = vec![row(["SERVICE", "READY", "DESIRED"])];
    for (name, service) in &status.services {
        rows.push(row([
            name,
            &service.ready_replicas.to_string(),
            &service.replicas.to_string(),
        ]));
    }
    print_table(&rows);

    pipeline(client, &namespace, &stack).await;

    if let Some(name) = &status.endpoints {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        if let Some(endpoints) = config_maps.get_opt(name).await? {
            println!("\nEndpoints  (ConfigMap {name})");
            let data = endpoints.data.unwrap_or_default();
            let rows: Vec<Vec<String>> = data
                .iter()
                .map(|(key, value)| row([key.as_str(), value.as_str()]))
                .collect();
            print_table(&rows);
        }
    }

    println!("\nEvents (latest 10)");
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let selector = format!(
        "involvedObject.kind=MiddlewareStack,involvedObject.name={}",
        stack.name_any()
    );
    let mut listed = events
        .list(&ListParams::default().fields(&selector))
        .await
        .context("cannot list the stack's Events")?
        .items;
    let when = |e: &Event| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
            .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or(Timestamp::UNIX_EPOCH)
    };
    listed.sort_by_key(|e| std::cmp::Reverse(when(e)));
    let mut rows = vec![row(["AGE", "TYPE", "REASON", "MESSAGE"])];
    for event in listed.iter().take(10) {
        rows.push(row([
            &age(now, when(event)),
            event.type_.as_deref().unwrap_or(""),
            event.reason.as_deref().unwrap_or(""),
            event.message.as_deref().unwrap_or(""),
        ]));
    }
    print_table(&rows);
    Ok(())
}

async fn token(client: &Client, args: &TokenArgs) -> anyhow::Result<()> {
    let (namespace, stack) = stack(client, &args.target).await?;
    let Some(auth) = &stack.spec.auth else {
        bail!(
            "middlewarestack {namespace}/{} has no spec.auth: its gateway accepts no tokens",
            stack.name_any()
        );
    };
    let Some(reference) = &auth.jwt_secret_ref else {
        bail!(
            "middlewarestack {namespace}/{} verifies tokens against a JWKS URL: mint them with \
             that identity provider",
            stack.name_any()
        );
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = secrets
        .get(&reference.name)
        .await
        .with_context(|| format!("cannot read Secret {namespace}/{}", reference.name))?;
    let key = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .with_context(|| {
            format!(
                "Secret {namespace}/{} has no key {}",
                reference.name, reference.key
            )
        })?;
    let grant = common::auth::Grant {
        subject: args.subject.clone(),
        issuer: Some(auth.issuer.clone()),
        audience: Some(auth.audience.clone()),
        client_id: args.client_id.clone(),
        rooms: args.rooms.clone(),
        read: args.read.clone(),
        write: args.write.clone(),
        ttl: Duration::from_secs(args.ttl_seconds),
    };
    let token = common::auth::mint_hs256(&key.0, &grant).context("cannot sign the token")?;
    println!("{token}");
    Ok(())
}

/// The pipeline's state as the stack's pods report it on their ops port (`/metrics`, read
/// through the API server's pod proxy).
#[derive(Debug, Default, PartialEq)]
struct Pipeline {
    /// Rows waiting in each outbox table (`outbox_backlog`; every relay reports the leader's
    /// view, so the largest).
    backlog: BTreeMap<String, f64>,
    /// Messages not yet consumed, by consuming service (`kafka_consumer_lag`, summed over
    /// the partitions each pod holds).
    lag: BTreeMap<String, f64>,
    /// Commands copied to the dead-letter topic since the processor pods started.
    dead_lettered: f64,
    /// Dead letters not replayed yet (`dead_letters_pending`; every processor pod reports
    /// the topic's figure, so the largest), if a pod reported it.
    pending: Option<f64>,
    /// Pods read, and the first failure to read one.
    scraped: usize,
    failure: Option<String>,
}

impl Pipeline {
    /// Adds one pod's metrics (Prometheus text format).
    fn add(&mut self, text: &str) {
        let Ok(scrape) = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        else {
            return;
        };
        self.scraped += 1;
        for sample in &scrape.samples {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
            match sample.metric.as_str() {
                OUTBOX_BACKLOG => {
                    let rows = self.backlog.entry(label("table")).or_insert(0.0);
                    *rows = rows.max(value);
                }
                KAFKA_CONSUMER_LAG => *self.lag.entry(label("service")).or_insert(0.0) += value,
                COMMANDS_DEAD_LETTERED_TOTAL => self.dead_lettered += value,
                DEAD_LETTERS_PENDING => {
                    self.pending = Some(self.pending.unwrap_or(0.0).max(value));
                }
                _ => {}
            }
        }
    }

    fn print(&self) {
        println!("\nPipeline   (the pods' /metrics, through the API server's pod proxy)");
        if self.scraped == 0 {
            let why = self.failure.as_deref().unwrap_or("no running pods");
            println!("  unavailable: {why}");
            return;
        }
        let join = |values: &BTreeMap<String, f64>| {
            if values.is_empty() {
                return "none reported yet".to_owned();
            }
            values
                .iter()
                .map(|(name, value)| format!("{name} {value:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut rows = vec![
            row(["outbox backlog", &join(&self.backlog)]),
            row(["consumer lag", &join(&self.lag)]),
            row([
                "dead-lettered",
                &format!("{:.0} since the processor pods started", self.dead_lettered),
            ]),
        ];
        if let Some(pending) = self.pending {
            let hint = if pending > 0.0 {
                " (kubectl meridian dlq replay)"
            } else {
                ""
            };
            rows.push(row([
                "dead letters",
                &format!("{pending:.0} not replayed yet{hint}"),
            ]));
        }
        if let Some(failure) = &self.failure {
            rows.push(row(["not read", failure]));
        }
        print_table(&rows);
    }
}

/// Reads the metrics of the command service's, processor's and cache updater's running pods
/// and prints the pipeline's state; says why when they cannot be read (no pods, no
/// `pods/proxy` permission), without failing the command.
async fn pipeline(client: &Client, namespace: &str, stack: &MiddlewareStack) {
    let mut pipeline = Pipeline::default();
    let Ok(validated) = validate(stack) else {
        pipeline.failure = Some("the stack is invalid, so it has no pods".to_owned());
        pipeline.print();
        return;
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for component in [
        Component::CommandService,
        Component::Processor,
        Component::CacheUpdater,
    ] {
        // The labels the service's Deployment selects its pods by.
        let selector = build::selector_labels(&validated, component)
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",");
        let listed = match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(listed) => listed.items,
            Err(error) => {
                pipeline
                    .failure
                    .get_or_insert(format!("cannot list pods: {error}"));
                continue;
            }
        };
        for pod in listed {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if !running {
                continue;
            }
            let path = format!(
                "/api/v1/namespaces/{namespace}/pods/{}:{}/proxy/metrics",
                pod.name_any(),
                build::OPS_PORT
            );
            let text = match http::Request::get(path).body(Vec::new()) {
                Ok(request) => client.request_text(request).await,
                Err(error) => {
                    pipeline.failure.get_or_insert(error.to_string());
                    continue;
                }
            };
            match text {
                Ok(text) => pipeline.add(&text),
                Err(error) => {
                    pipeline
                        .failure
                        .get_or_insert(format!("{}: {error}", pod.name_any()));
                }
            }
        }
    }
    pipeline.print();
}

/// Polls `done` every 2 s until it returns a result or `args.timeout_seconds` pass.
async fn wait_for<T, F>(
    args: &WaitArgs,
    what: &str,
    mut done: impl FnMut() -> F,
) -> anyhow::Result<T>
where
    F: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        if let Some(result) = done().await? {
            return Ok(result);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what} did not happen within {} s", args.timeout_seconds);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn rotate_credentials(client: &Client, args: &WaitArgs) -> anyhow::Result<()> {
    let (namespace, stack) = stack(client, &args.target).await?;
    let validated = validate(&stack).map_err(|e| anyhow::anyhow!("the stack is invalid: {e}"))?;
    // A new value each time (to the nanosecond), readable as when it was asked.
    let token = Timestamp::now().to_string();
    let stacks: Api<MiddlewareStack> = Api::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {ROTATE_ANNOTATION: token}}});
    stacks
        .patch(
            &stack.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| {
            format!(
                "cannot annotate middlewarestack {namespace}/{}",
                stack.name_any()
            )
        })?;
    println!(
        "Asked the operator to rotate the credentials of {namespace}/{} ({ROTATE_ANNOTATION}={token}).",
        stack.name_any()
    );
    if !args.wait {
        println!(
            "Follow it with `kubectl meridian status {} -n {namespace}` (Event CredentialsRotated).",
            stack.name_any()
        );
        return Ok(());
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let names = [
        build::redis_secret_name(&validated),
        build::postgres_secret_name(&validated),
    ];
    wait_for(args, "the rotation", || async {
        for name in &names {
            let rotated = secrets
                .get_opt(name)
                .await?
                .and_then(|s| s.annotations().get(ROTATED_ANNOTATION).cloned());
            if rotated.as_deref() != Some(token.as_str()) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    println!(
        "Rotated: {} carry the new passwords; the pods are rolling onto them.",
        names.join(" and ")
    );
    Ok(())
}

/// Creates the Job of `task` from its service's Deployment; with `--wait`, waits until it
/// finished. `what` names the task in messages.
async fn run_task(
    client: &Client,
    args: &WaitArgs,
    task: build::Task,
    what: &str,
) -> anyhow::Result<()> {
    let (namespace, stack) = stack(client, &args.target).await?;
    let validated = validate(&stack).map_err(|e| anyhow::anyhow!("the stack is invalid: {e}"))?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let service = task.service();
    let name = build::object_name(&validated, service);
    let deployment = deployments
        .get_opt(&name)
        .await
        .with_context(|| format!("cannot read deployment {namespace}/{name}"))?
        .with_context(|| {
            format!(
                "no deployment {namespace}/{name}: is the stack's {} deployed?",
                service.name()
            )
        })?;
    let suffix = Timestamp::now().as_second().to_string();
    let job = build::task_job(&stack, &deployment, task, &suffix)?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let job = jobs
        .create(&PostParams::default(), &job)
        .await
        .with_context(|| format!("cannot create the Job of {what} in {namespace}"))?;
    let job_name = job.name_any();
    println!(
        "Job {namespace}/{job_name} runs {what} for {}.",
        stack.name_any()
    );
    println!("Its summary: kubectl -n {namespace} logs -f job/{job_name}");
    if !args.wait {
        return Ok(());
    }
    let succeeded = wait_for(args, what, || async {
        let status = jobs.get(&job_name).await?.status.unwrap_or_default();
        Ok(
            match (status.succeeded.unwrap_or(0), status.failed.unwrap_or(0)) {
                (0, 0) => None,
                (done, _) => Some(done > 0),
            },
        )
    })
    .await?;
    if !succeeded {
        bail!("{what} failed: kubectl -n {namespace} logs job/{job_name}");
    }
    println!("{} finished.", capitalized(what));
    Ok(())
}

/// `text` with its first letter upper-case.
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns, two spaces apart (like kubectl's tables); the last one unpadded.
fn print_table(rows: &[Vec<String>]) {
    let mut widths: BTreeMap<usize, usize> = BTreeMap::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let width = widths.entry(i).or_default();
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[&i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// How long ago `then` was, as kubectl shows ages: `42s`, `7m`, `3h`, `2d`.
fn age(now: Timestamp, then: Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(then.as_second()).max(0);
    match seconds {
        0..=119 => format!("{seconds}s"),
        120..=7_199 => format!("{}m", seconds / 60),
        7_200..=172_799 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectls() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let ago = |s: i64| age(now, Timestamp::from_second(1_000_000 - s).unwrap());
        assert_eq!(ago(0), "0s");
        assert_eq!(ago(119), "119s");
        assert_eq!(ago(600), "10m");
        assert_eq!(ago(3 * 3_600), "3h");
        assert_eq!(ago(3 * 86_400), "3d");
        // A clock behind the server's never shows a negative age.
        assert_eq!(age(now, Timestamp::from_second(1_000_100).unwrap()), "0s");
    }

    #[test]
    fn the_pipeline_sums_lag_and_dead_letters_and_takes_the_largest_backlog() {
        let mut pipeline = Pipeline::default();
        pipeline.add(
            "# TYPE outbox_backlog gauge\n\
             outbox_backlog{service=\"processor\",table=\"processor_outbox\"} 3\n\
             # TYPE kafka_consumer_lag gauge\n\
             kafka_consumer_lag{service=\"processor\",topic=\"commands\",partition=\"0\"} 4\n\
             kafka_consumer_lag{service=\"processor\",topic=\"commands\",partition=\"1\"} 1\n\
             # TYPE commands_dead_lettered_total counter\n\
             commands_dead_lettered_total{service=\"processor\",reason=\"malformed\"} 2\n\
             # TYPE dead_letters_pending gauge\n\
             dead_letters_pending{service=\"processor\"} 6\n",
        );
        pipeline.add(
            "# TYPE outbox_backlog gauge\n\
             outbox_backlog{service=\"processor\",table=\"processor_outbox\"} 7\n\
             # TYPE kafka_consumer_lag gauge\n\
             kafka_consumer_lag{service=\"processor\",topic=\"commands\",partition=\"2\"} 5\n\
             # TYPE dead_letters_pending gauge\n\
             dead_letters_pending{service=\"processor\"} 6\n",
        );
        assert_eq!(pipeline.scraped, 2);
        assert_eq!(pipeline.backlog["processor_outbox"], 7.0);
        assert_eq!(pipeline.lag["processor"], 10.0);
        assert_eq!(pipeline.dead_lettered, 2.0);
        // Both pods report the topic's figure: not summed.
        assert_eq!(pipeline.pending, Some(6.0));
    }
}
