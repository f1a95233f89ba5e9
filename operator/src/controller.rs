//! The reconcile loop: a kube-runtime [`Controller`] on `MiddlewareStack`, owning the
//! Deployments, Services, ConfigMaps, PodDisruptionBudgets and Secrets it creates (shared
//! reflector stores, so reconciles read them locally) and watching the Secrets stacks refer to.
//!
//! Each reconcile is a pipeline: *dereference* (admin Secrets) → *validate* → *build* (pure)
//! → *apply* → *status*, with the stages gated per [`crate::gating`]: dependencies → topics →
//! credentials → core services → WebSocket hub → API gateway. An object is written only when
//! its desired content changed or someone else changed it, and the status only when it
//! changed, so a steady stack causes no API writes at all.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::build::{self, Component, MANAGED_BY, PART_OF, URL_KEY};
use crate::crd::{MiddlewareStack, MiddlewareStackStatus, Phase, Retention, ServiceStatus};
use crate::gating::{self, Decision, Observed, Step};
use crate::names;
use crate::owned::{self, Compact, Owned};
use crate::provision::kafka::{DesiredTopic, KafkaClients, KafkaCluster};
use crate::provision::postgres::{PostgresAdmin, PostgresAdmins};
use crate::provision::redis::RedisAdmin;
use crate::provision::{AdminCredentials, ProvisionError, generate_password};
use crate::status::{self, Report, Status};
use crate::validate::{ValidatedStack, validate};
use common::metrics::{
    OPERATOR_RECONCILE_DURATION_SECONDS, OPERATOR_RECONCILE_ERRORS_TOTAL,
    OPERATOR_RECONCILES_IN_FLIGHT, OPERATOR_RECONCILES_TOTAL, OPERATOR_STACKS,
    OPERATOR_STEP_DURATION_SECONDS,
};

/// Times one step of a reconcile into `operator_step_duration_seconds`.
async fn timed<T>(step: &'static str, work: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let result = work.await;
    metrics::histogram!(OPERATOR_STEP_DURATION_SECONDS, "step" => step)
        .record(started.elapsed().as_secs_f64());
    result
}

/// The field manager of every server-side apply and the reporting controller of Events.
pub const FIELD_MANAGER: &str = "meridian-operator";
/// The finalizer that cleans up topics and credentials per `spec.deletionPolicy`.
pub const FINALIZER: &str = "meridian.dev/cleanup";
/// Set this annotation on a stack to a new value to rotate its Redis and PostgreSQL
/// passwords (for example `kubectl annotate mws demo meridian.dev/rotate-credentials=$(date +%s) --overwrite`).
pub const ROTATE_ANNOTATION: &str = "meridian.dev/rotate-credentials";
/// On the connection Secrets: the rotation token their password was generated for.
pub const ROTATED_ANNOTATION: &str = "meridian.dev/rotation-token";
/// On every applied object: the fingerprint of the desired object last applied.
pub const APPLIED_HASH_ANNOTATION: &str = "meridian.dev/applied-hash";
/// The label selector of every object the operator creates.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=meridian-operator";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch stacks in this namespace only; `None`: the whole cluster.
    pub namespace: Option<String>,
    /// The bound of each dependency call (metadata request, `PING`, `SELECT 1`, DDL).
    pub dependency_timeout: Duration,
    /// How often a Ready stack is checked again (dependencies, topics, credentials, drift),
    /// and how long a successful external check is reused while its inputs are unchanged.
    pub resync: Duration,
    /// The first retry delay after a transient failure; it doubles up to `backoff_max`.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
    /// Failed cleanups of a deleted stack before its finalizer is released anyway.
    pub cleanup_attempts: u32,
    /// Stacks reconciled at once.
    pub concurrency: u16,
    /// The bound of one reconcile's work (the staged pipeline, or a deleted stack's cleanup
    /// of topics and credentials). A reconcile that takes longer is cancelled — every step
    /// is idempotent — and retried with backoff, so no stack holds one of the `concurrency`
    /// slots forever.
    pub reconcile_timeout: Duration,
    /// The Events' reporting instance (the pod name).
    pub instance: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            dependency_timeout: Duration::from_secs(3),
            resync: Duration::from_secs(300),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            cleanup_attempts: 5,
            concurrency: 16,
            reconcile_timeout: Duration::from_secs(120),
            instance: None,
        }
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed a request.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A stage failed (dependency unreachable, Secret missing, ...); retried with backoff.
    #[error("{stage}: {message}")]
    Stage {
        /// The condition type of the stage.
        stage: &'static str,
        /// The condition reason.
        reason: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Adding or removing the finalizer failed, or the cleanup did.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// An object could not be serialized (a bug).
    #[error("serialization failed: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The reconcile's work did not finish within [`Settings::reconcile_timeout`].
    #[error("{work} did not finish within {after:?}; cancelled, retried with backoff")]
    TimedOut {
        /// What timed out (`reconcile` or `cleanup`).
        work: &'static str,
        /// The bound.
        after: Duration,
    },
}

impl Error {
    /// The metric label of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesApiError",
            Self::Stage { reason, .. } => reason,
            Self::Finalizer(_) => "FinalizerFailed",
            Self::Serialize(_) => "SerializationFailed",
            Self::TimedOut { .. } => "ReconcileTimedOut",
        }
    }

    fn stage(stage: &'static str, error: &ProvisionError) -> Self {
        Self::Stage {
            stage,
            reason: error.reason(),
            message: error.to_string(),
        }
    }
}

/// A stack's condition types and statuses.
type StageStates = Vec<(String, String)>;

/// What the operator last applied to one object.
#[derive(Clone, Debug)]
struct Applied {
    /// The fingerprint of the desired object.
    hash: String,
    /// The generation (or resourceVersion) the API server answered with.
    version: String,
    /// When: the watch may not have delivered the object to the store yet.
    at: Instant,
}

/// The outcome of the last successful external stages (dependencies, topics, credentials)
/// of a stack, reused while its inputs are unchanged and it is younger than the resync period:
/// a Deployment's status change then costs no call to Kafka, Redis or PostgreSQL.
#[derive(Clone, Debug)]
struct Provisioned {
    /// Fingerprint of the inputs: generation, rotation token, the resourceVersions of the
    /// Secrets read and of the connection Secrets.
    key: String,
    at: Instant,
    reports: Vec<Report>,
    credentials_hash: String,
}

/// How long an applied object may be missing from the store before it is applied again
/// (the watch delivers it within milliseconds; a longer gap means it was deleted).
const STORE_LAG: Duration = Duration::from_secs(10);

/// The reflector stores of the objects the operator owns.
#[derive(Clone)]
struct Stores {
    deployments: Store<Owned<Deployment>>,
    services: Store<Owned<Service>>,
    config_maps: Store<Owned<ConfigMap>>,
    pdbs: Store<Owned<PodDisruptionBudget>>,
    secrets: Store<Owned<Secret>>,
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    /// Who publishes the operator's Events (see [`publish_events`]).
    reporter: Reporter,
    /// The Event recorders of the stacks whose reconciles are failing (see
    /// [`publish_events`]).
    recorders: Mutex<HashMap<ObjectRef<MiddlewareStack>, Recorder>>,
    settings: Settings,
    stores: Stores,
    kafka: KafkaClients,
    postgres: PostgresAdmins,
    /// Consecutive failures per stack (for the backoff).
    failures: Mutex<HashMap<ObjectRef<MiddlewareStack>, u32>>,
    /// Failed cleanups per stack uid.
    cleanup_failures: Mutex<HashMap<String, u32>>,
    /// What the operator last applied, per object: the desired fingerprint and the
    /// generation (or resourceVersion) the API server answered with. Anything else in the
    /// store means someone changed the object, and it is applied again.
    applied: Mutex<HashMap<String, Applied>>,
    /// The last successful external stages per stack.
    provisioned: Mutex<HashMap<ObjectRef<MiddlewareStack>, Provisioned>>,
    /// The last condition statuses per stack, for the per-stage gauges.
    stage_states: Mutex<HashMap<ObjectRef<MiddlewareStack>, StageStates>>,
    /// Every Secret's metadata in the watch scope (the referenced-Secrets watch).
    secret_versions: Store<PartialObjectMeta<Secret>>,
    /// Secrets the stacks refer to (admin credentials, JWT keys), as last read: used while
    /// their resourceVersion in `secret_versions` is unchanged, so a reconcile reads them
    /// from the API server only after they changed (1,000 stacks sharing one admin Secret
    /// would otherwise GET it on every reconcile).
    referenced: Mutex<HashMap<ObjectRef<Secret>, Arc<Secret>>>,
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` fires.
///
/// # Errors
/// Never at the moment: watch and reconcile errors are logged and retried; the `Result`
/// leaves room for start-up failures.
pub async fn run(
    client: Client,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let ns = settings.namespace.clone();
    let ns = ns.as_deref();
    let managed = watcher::Config::default().labels(MANAGED_SELECTOR);

    let (deployments, deployments_writer) = reflector::store();
    let (services, services_writer) = reflector::store();
    let (config_maps, config_maps_writer) = reflector::store();
    let (pdbs, pdbs_writer) = reflector::store();
    let (secrets, secrets_writer) = reflector::store();
    let stores = Stores {
        deployments,
        services,
        config_maps,
        pdbs,
        secrets,
    };
    // The stores hold compact copies (`crate::owned`); the full objects go on to the
    // controller's owner triggers and are dropped there.
    let owned_deployments =
        deployment_triggers(owned_events(&client, ns, &managed, deployments_writer));
    let owned_services = owned_events(&client, ns, &managed, services_writer).touched_objects();
    let owned_config_maps =
        owned_events(&client, ns, &managed, config_maps_writer).touched_objects();
    let owned_pdbs = owned_events(&client, ns, &managed, pdbs_writer).touched_objects();
    let owned_secrets = owned_events(&client, ns, &managed, secrets_writer).touched_objects();
    // The identity and resourceVersion of every Secret the operator did not create (never
    // their data): a change to an admin or JWT Secret a stack refers to reconciles that
    // stack. The stacks' own connection Secrets (two per stack) are in `owned_secrets`.
    let (secret_versions, secret_versions_writer) = reflector::store();
    let referenced_secrets = watcher(
        scoped::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default().labels(&MANAGED_SELECTOR.replacen('=', "!=", 1)),
    )
    .default_backoff()
    .modify(identity_only)
    .reflect(secret_versions_writer)
    .touched_objects();

    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: settings.instance.clone(),
    };
    let context = Arc::new(Context {
        reporter,
        recorders: Mutex::default(),
        client: client.clone(),
        stores,
        kafka: KafkaClients::default(),
        postgres: PostgresAdmins::default(),
        failures: Mutex::default(),
        cleanup_failures: Mutex::default(),
        applied: Mutex::default(),
        stage_states: Mutex::default(),
        provisioned: Mutex::default(),
        secret_versions,
        referenced: Mutex::default(),
        settings: settings.clone(),
    });

    // The stacks' own watch and store, stripped like the owned objects': a stack's managed
    // fields (every field of its spec and status, per field manager) were most of its size.
    let (stacks, stacks_writer) = reflector::store();
    let stack_changes = watcher(
        scoped::<MiddlewareStack>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(strip)
    .reflect(stacks_writer)
    .applied_objects();
    let controller = Controller::for_stream(stack_changes, stacks.clone()).with_config(
        ControllerConfig::default()
            .concurrency(settings.concurrency)
            .debounce(Duration::from_millis(100)),
    );
    let shutdown_signal = shutdown.clone();
    controller
        .owns_stream(owned_deployments)
        .owns_stream(owned_services)
        .owns_stream(owned_config_maps)
        .owns_stream(owned_pdbs)
        .owns_stream(owned_secrets)
        .watches_stream(referenced_secrets, move |secret| {
            let (Some(namespace), name) = (secret.namespace(), secret.name_any()) else {
                return Vec::new();
            };
            stacks
                .state()
                .into_iter()
                .filter(|s| s.namespace().as_deref() == Some(namespace.as_str()))
                .filter(|s| refers_to_secret(s, &name))
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move { shutdown_signal.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                Err(kube::runtime::controller::Error::ReconcilerFailed(error, object)) => {
                    tracing::warn!(stack = %object, %error, "Reconcile failed.");
                }
                Err(error) => tracing::warn!(%error, "Controller error."),
            }
        })
        .await;
    Ok(())
}

/// The watch of the operator's objects of kind `K` (selected by `config`), feeding `writer`'s
/// store with compact copies ([`owned::reflect`]).
fn owned_events<K>(
    client: &Client,
    namespace: Option<&str>,
    config: &watcher::Config,
    writer: reflector::store::Writer<Owned<K>>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + use<K>
where
    K: Compact<Scope = k8s_openapi::NamespaceResourceScope> + DeserializeOwned + Debug,
{
    owned::reflect(
        watcher(scoped::<K>(client, namespace), config.clone()).default_backoff(),
        writer,
    )
}

/// Drops what reconciles never read before a stack enters the store (managed fields are often
/// the largest part of an object). Owned objects are stored as compact copies instead
/// ([`owned`]), referenced Secrets as their identity ([`identity_only`]).
fn strip<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = &mut object.meta_mut().annotations {
        // kubectl's copy of a whole applied object, if someone used `kubectl apply` on it.
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Keeps only what the referenced-Secrets store is read for: name, namespace, uid and
/// resourceVersion (labels, annotations and owner references can be most of a Secret's
/// metadata).
fn identity_only(secret: &mut PartialObjectMeta<Secret>) {
    let meta = std::mem::take(&mut secret.metadata);
    secret.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    };
}

/// Whether the stack reads the named Secret (admin credentials or the JWT secret).
fn refers_to_secret(stack: &MiddlewareStack, name: &str) -> bool {
    let spec = &stack.spec;
    spec.redis.admin_credentials_secret == name
        || spec.postgres.admin_credentials_secret == name
        || spec.kafka.admin_credentials_secret.as_deref() == Some(name)
        || spec
            .auth
            .as_ref()
            .and_then(|a| a.jwt_secret_ref.as_ref())
            .is_some_and(|r| r.name == name)
}

async fn reconcile(stack: Arc<MiddlewareStack>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _in_flight = InFlight::start();
    let started = Instant::now();
    let namespace = stack.namespace().unwrap_or_default();
    let name = stack.name_any();
    let span = tracing::info_span!("reconcile", %namespace, stack = %name);
    let api: Api<MiddlewareStack> = Api::namespaced(ctx.client.clone(), &namespace);
    let bound = ctx.settings.reconcile_timeout;
    let result = finalizer(&api, FINALIZER, stack.clone(), |event| async {
        match event {
            Finalizer::Apply(stack) => deadline("reconcile", bound, apply(&stack, &ctx)).await,
            Finalizer::Cleanup(stack) => cleanup(&stack, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    if let Err(error @ Error::TimedOut { .. }) = &result {
        // The pipeline was cancelled before it could report: say so where users look.
        let event = Event {
            type_: EventType::Warning,
            reason: error.reason().to_owned(),
            note: Some(error.to_string()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        publish_events(&stack, &ctx, vec![event], true).await;
    }
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(OPERATOR_RECONCILES_TOTAL, "result" => label).increment(1);
    metrics::histogram!(OPERATOR_RECONCILE_DURATION_SECONDS, "result" => label)
        .record(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        metrics::counter!(OPERATOR_RECONCILE_ERRORS_TOTAL, "reason" => error.reason()).increment(1);
    }
    result
}

/// Runs `work` (named `name` in the error), or fails with [`Error::TimedOut`] once `bound`
/// has passed, dropping `work`: every step of a reconcile is idempotent, and what a step holds
/// (a `DROP DATABASE` turn, a pooled connection) is released on drop. The error is logged
/// with every other reconcile failure, in [`run`].
async fn deadline<T>(
    name: &'static str,
    bound: Duration,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(bound, work)
        .await
        .unwrap_or(Err(Error::TimedOut {
            work: name,
            after: bound,
        }))
}

/// Counts a reconcile in `operator_reconciles_in_flight` while it runs, including one that
/// is cancelled (dropped) midway.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!(OPERATOR_RECONCILES_IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(OPERATOR_RECONCILES_IN_FLIGHT).decrement(1.0);
    }
}

fn error_policy(stack: Arc<MiddlewareStack>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempts = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let attempts = failures.entry(ObjectRef::from_obj(&*stack)).or_insert(0);
        *attempts = attempts.saturating_add(1);
        *attempts
    };
    let delay = ctx
        .settings
        .backoff_base
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(16)))
        .min(ctx.settings.backoff_max);
    tracing::debug!(stack = %stack.name_any(), %error, attempts, ?delay, "Retrying.");
    Action::requeue(delay)
}

/// The outcome of the staged pipeline: the stage reports, and how the reconcile ends.
struct Outcome {
    reports: Vec<Report>,
    services: BTreeMap<String, ServiceStatus>,
    result: Result<Action, Error>,
    events: Vec<Event>,
}

impl Outcome {
    fn new() -> Self {
        Self {
            reports: Vec::new(),
            services: BTreeMap::new(),
            result: Ok(Action::await_change()),
            events: Vec::new(),
        }
    }

    fn report(
        &mut self,
        type_: &'static str,
        status: Status,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.reports
            .push(Report::new(type_, status, reason, message));
    }

    /// Marks every stage not reported yet as waiting for `blocker`.
    fn waiting_after(&mut self, blocker: &'static str) {
        for stage in status::STAGES {
            if !self.reports.iter().any(|r| r.type_ == stage) {
                self.report(
                    stage,
                    Status::Unknown,
                    "Waiting",
                    format!("waiting for {blocker}"),
                );
            }
        }
    }

    fn fail(&mut self, error: Error) {
        if let Error::Stage {
            stage,
            reason,
            message,
        } = &error
        {
            self.report(stage, Status::False, reason, message.clone());
            self.waiting_after(stage);
        }
        self.result = Err(error);
    }

    fn event(&mut self, type_: EventType, reason: &str, action: &str, note: String) {
        self.events.push(Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: action.to_owned(),
            secondary: None,
        });
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

async fn apply(stack: &MiddlewareStack, ctx: &Context) -> Result<Action, Error> {
    let mut outcome = Outcome::new();
    let mut phase = Phase::Progressing;
    match validate(stack) {
        Err(error) => {
            // An invalid spec waits for the next change: retrying cannot fix it.
            outcome.report(
                status::DEPENDENCIES_READY,
                Status::Unknown,
                "InvalidSpec",
                "the spec is invalid",
            );
            outcome.waiting_after(status::DEPENDENCIES_READY);
            outcome
                .reports
                .iter_mut()
                .for_each(|r| r.reason = "InvalidSpec".to_owned());
            outcome.reports[0].message = error.to_string();
            phase = Phase::Failed;
        }
        Ok(_) if stack.spec.paused => {
            let mut reports: Vec<Report> = status::STAGES
                .iter()
                .map(|t| {
                    let previous = stack
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.iter().find(|c| c.type_ == *t));
                    let status = match previous.map(|c| c.status.as_str()) {
                        Some("True") => Status::True,
                        Some("False") => Status::False,
                        _ => Status::Unknown,
                    };
                    Report::new(
                        t,
                        status,
                        "Paused",
                        "spec.paused is true: the operator changes nothing",
                    )
                })
                .collect();
            reports.push(Report::new(
                status::READY,
                Status::False,
                "Paused",
                "spec.paused is true: the operator changes nothing",
            ));
            outcome.reports = reports;
            phase = Phase::Paused;
        }
        Ok(validated) => {
            pipeline(&validated, stack, ctx, &mut outcome).await;
        }
    }
    let reports = if phase == Phase::Failed || phase == Phase::Paused {
        let mut all = outcome.reports.clone();
        if phase == Phase::Failed {
            all.push(Report::new(
                status::READY,
                Status::False,
                "InvalidSpec",
                all[0].message.clone(),
            ));
        }
        all
    } else {
        status::with_ready(outcome.reports.clone())
    };
    let ready = reports
        .iter()
        .any(|r| r.type_ == status::READY && r.status == Status::True);
    if phase == Phase::Progressing {
        // Degraded: it was Ready for this very spec; a spec change rolling out is Progressing.
        let was_ready = stack.status.as_ref().is_some_and(|s| {
            matches!(s.phase, Some(Phase::Ready | Phase::Degraded))
                && s.observed_generation == stack.metadata.generation
        });
        phase = if ready {
            Phase::Ready
        } else if was_ready {
            Phase::Degraded
        } else {
            Phase::Progressing
        };
    }
    timed(
        "status",
        write_status(
            stack,
            ctx,
            &reports,
            phase,
            outcome.services.clone(),
            &mut outcome.events,
        ),
    )
    .await?;
    let failing = outcome.result.is_err();
    timed(
        "events",
        publish_events(stack, ctx, outcome.events, failing),
    )
    .await;
    if outcome.result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ObjectRef::from_obj(stack));
    }
    match outcome.result {
        Ok(_) if ready => Ok(Action::requeue(ctx.settings.resync)),
        other => other,
    }
}

/// Publishes Events about `stack`, `failing` when its reconcile (or cleanup) failed.
///
/// kube-runtime's [`Recorder`] keeps every Event it published for six minutes, so that a
/// repeat becomes a series (`count` + 1, one PATCH) instead of a new Event. One Recorder for
/// the whole operator held every stack's Events of the last six minutes, ~1.5 KiB each:
/// 17 MiB of a 48 MiB heap while 300 stacks came up (heaptrack). Repeats happen while a stack
/// keeps failing (the same warning on every retry), so a failing stack keeps a Recorder of its
/// own until a reconcile succeeds; the Events of other reconciles (condition transitions and
/// applied changes, different each time) go through a Recorder that is dropped afterwards.
async fn publish_events(stack: &MiddlewareStack, ctx: &Context, events: Vec<Event>, failing: bool) {
    let key = ObjectRef::from_obj(stack);
    let recorder = {
        let mut recorders = ctx.recorders.lock().unwrap_or_else(|p| p.into_inner());
        if failing {
            recorders
                .entry(key)
                .or_insert_with(|| Recorder::new(ctx.client.clone(), ctx.reporter.clone()))
                .clone()
        } else {
            recorders
                .remove(&key)
                .unwrap_or_else(|| Recorder::new(ctx.client.clone(), ctx.reporter.clone()))
        }
    };
    let reference = stack.object_ref(&());
    for event in events {
        if let Err(error) = recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason = event.reason, "Failed to publish an Event.");
        }
    }
}

async fn write_status(
    stack: &MiddlewareStack,
    ctx: &Context,
    reports: &[Report],
    phase: Phase,
    services: BTreeMap<String, ServiceStatus>,
    events: &mut Vec<Event>,
) -> Result<(), Error> {
    let previous = stack.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let (conditions, transitions) = status::merge(
        &previous.conditions,
        reports,
        stack.metadata.generation,
        &now,
    );
    let status = MiddlewareStackStatus {
        observed_generation: stack.metadata.generation,
        phase: Some(phase),
        services,
        conditions,
    };
    // Transitions first, in condition order, then what the stages reported.
    let transition_events = transitions.iter().map(|transition| {
        let to = &transition.to;
        let type_ = if to.status == "False" {
            EventType::Warning
        } else {
            EventType::Normal
        };
        Event {
            type_,
            reason: format!("{}{}", to.type_, to.status),
            note: Some(truncate(
                format!(
                    "{} is {} ({}): {}",
                    to.type_, to.status, to.reason, to.message
                ),
                1000,
            )),
            action: "Reconcile".to_owned(),
            secondary: None,
        }
    });
    events.splice(0..0, transition_events);
    {
        let key = ObjectRef::from_obj(stack);
        let states = status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect();
        let mut all = ctx.stage_states.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(key, states);
        record_stage_gauges(&all);
    }
    if status == previous {
        return Ok(());
    }
    let api: Api<MiddlewareStack> =
        Api::namespaced(ctx.client.clone(), &stack.namespace().unwrap_or_default());
    api.patch_status(
        &stack.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

fn record_stage_gauges(all: &HashMap<ObjectRef<MiddlewareStack>, StageStates>) {
    let mut counts: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for stage in status::STAGES.iter().chain([&status::READY]) {
        for state in ["True", "False", "Unknown"] {
            counts.insert((stage, state), 0);
        }
    }
    for states in all.values() {
        for (stage, state) in states {
            if let Some(count) = counts.get_mut(&(stage.as_str(), state.as_str())) {
                *count += 1;
            }
        }
    }
    for ((stage, state), count) in counts {
        metrics::gauge!(OPERATOR_STACKS, "stage" => stage.to_owned(), "status" => state.to_owned())
            .set(f64::from(count));
    }
}

/// The admin credentials a stack refers to.
struct Dereferenced {
    redis: AdminCredentials,
    postgres: AdminCredentials,
    kafka: Option<AdminCredentials>,
    /// The resourceVersions of the Secrets read: a change invalidates the provisioning cache.
    versions: Vec<String>,
}

/// A Secret a stack refers to: from the cache while the watch reports the same
/// resourceVersion, otherwise read from the API server (and cached).
async fn referenced_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Arc<Secret>>, Error> {
    let key = ObjectRef::<Secret>::new(name).within(namespace);
    let watched = ctx
        .secret_versions
        .get(&ObjectRef::new(name).within(namespace))
        .and_then(|meta| meta.resource_version());
    let cached = ctx
        .referenced
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    if let (Some(watched), Some(cached)) = (&watched, cached)
        && cached.resource_version().as_ref() == Some(watched)
    {
        return Ok(Some(cached));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets.get_opt(name).await?.map(Arc::new);
    let mut cache = ctx.referenced.lock().unwrap_or_else(|p| p.into_inner());
    match &secret {
        Some(secret) => cache.insert(key, Arc::clone(secret)),
        None => cache.remove(&key),
    };
    Ok(secret)
}

async fn read_credentials(
    ctx: &Context,
    namespace: &str,
    name: &str,
    versions: &mut Vec<String>,
) -> Result<AdminCredentials, Error> {
    let missing = |message: String| Error::Stage {
        stage: status::DEPENDENCIES_READY,
        reason: "SecretNotFound",
        message,
    };
    let secret = referenced_secret(ctx, namespace, name)
        .await?
        .ok_or_else(|| missing(format!("Secret {name} not found")))?;
    versions.push(secret.resource_version().unwrap_or_default());
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let username =
        value("username").ok_or_else(|| missing(format!("Secret {name} has no key `username`")))?;
    let password = value("password").unwrap_or_default();
    Ok(AdminCredentials {
        username,
        password: SecretString::from(password),
    })
}

async fn dereference(stack: &ValidatedStack, ctx: &Context) -> Result<Dereferenced, Error> {
    let namespace = stack.namespace();
    let spec = stack.spec();
    let mut versions = Vec::new();
    let redis = read_credentials(
        ctx,
        namespace,
        &spec.redis.admin_credentials_secret,
        &mut versions,
    )
    .await?;
    let postgres = read_credentials(
        ctx,
        namespace,
        &spec.postgres.admin_credentials_secret,
        &mut versions,
    )
    .await?;
    let kafka = match &spec.kafka.admin_credentials_secret {
        Some(name) => Some(read_credentials(ctx, namespace, name, &mut versions).await?),
        None => None,
    };
    if let Some(reference) = spec.auth.as_ref().and_then(|a| a.jwt_secret_ref.as_ref()) {
        let secret = referenced_secret(ctx, namespace, &reference.name).await?;
        versions.extend(secret.as_ref().and_then(|s| s.resource_version()));
        let has_key = secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .is_some_and(|d| d.contains_key(&reference.key));
        if !has_key {
            return Err(Error::Stage {
                stage: status::DEPENDENCIES_READY,
                reason: "SecretNotFound",
                message: format!(
                    "Secret {} with key {} (auth.jwtSecretRef) not found",
                    reference.name, reference.key
                ),
            });
        }
    }
    Ok(Dereferenced {
        redis,
        postgres,
        kafka,
        versions,
    })
}

struct Clients {
    kafka: Arc<KafkaCluster>,
    redis: RedisAdmin,
    postgres: PostgresAdmin,
}

async fn dependencies(
    stack: &ValidatedStack,
    ctx: &Context,
    refs: &Dereferenced,
) -> Result<Clients, Error> {
    let spec = stack.spec();
    let timeout = ctx.settings.dependency_timeout;
    let stage = status::DEPENDENCIES_READY;
    let kafka = ctx
        .kafka
        .cluster(&spec.kafka.bootstrap_servers, refs.kafka.as_ref())
        .map_err(|e| Error::stage(stage, &e))?;
    let redis = RedisAdmin::new(&spec.redis.url, &refs.redis, timeout)
        .map_err(|e| Error::stage(stage, &e))?;
    let postgres = ctx
        .postgres
        .admin(&spec.postgres, &refs.postgres, timeout)
        .map_err(|e| Error::stage(stage, &e))?;
    let probe_topic = names::topic(stack, names::TOPICS[0]);
    let (k, r, p) = tokio::join!(
        kafka.ping(&probe_topic, timeout),
        redis.ping(),
        postgres.ping()
    );
    let failures: Vec<ProvisionError> = [k, r, p].into_iter().filter_map(Result::err).collect();
    if let Some(first) = failures.first() {
        let message = failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::Stage {
            stage,
            reason: first.reason(),
            message,
        });
    }
    Ok(Clients {
        kafka,
        redis,
        postgres,
    })
}

fn desired_topics(stack: &ValidatedStack) -> Vec<DesiredTopic> {
    let topics = &stack.spec().kafka.topics;
    [
        ("commands", &topics.commands),
        ("events", &topics.events),
        ("cache", &topics.cache),
        ("commands.dlq", &topics.dlq),
    ]
    .into_iter()
    .map(|(name, spec)| DesiredTopic {
        name: names::topic(stack, name),
        partitions: spec.partitions,
        replication_factor: spec.replication_factor,
        config: spec.config.clone(),
    })
    .collect()
}

fn stack_labels(stack: &ValidatedStack) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/instance".to_owned(),
            stack.name().to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
    ])
}

fn connection_secret(
    stack: &ValidatedStack,
    name: String,
    token: Option<&str>,
    data: [(&str, &str); 3],
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(stack.namespace().to_owned()),
            labels: Some(stack_labels(stack)),
            annotations: token
                .map(|t| BTreeMap::from([(ROTATED_ANNOTATION.to_owned(), t.to_owned())])),
            owner_references: Some(vec![stack.owner().clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        string_data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// Stage 3. Returns the fingerprint of the connection Secrets' contents.
async fn credentials(
    stack: &ValidatedStack,
    object: &MiddlewareStack,
    ctx: &Context,
    clients: &Clients,
    outcome: &mut Outcome,
) -> Result<String, Error> {
    let stage = status::CREDENTIALS_READY;
    let spec = stack.spec();
    let token = object.annotations().get(ROTATE_ANNOTATION).cloned();
    let lookup = |name: &str| {
        ctx.stores
            .secrets
            .get(&ObjectRef::new(name).within(stack.namespace()))
    };
    let redis_secret = lookup(&build::redis_secret_name(stack));
    let postgres_secret = lookup(&build::postgres_secret_name(stack));
    let rotate_of = |secret: Option<&Owned<Secret>>| {
        let applied = secret.and_then(|s| s.state.rotated.clone());
        token.is_some() && applied != token
    };

    // Redis: keep the password unless rotating; a rotation keeps the previous password valid
    // too, so pods that still run with it keep working until they have rolled.
    let previous = redis_secret
        .as_ref()
        .and_then(|s| s.value("password"))
        .map(SecretString::from);
    let rotate_redis = previous.is_some() && rotate_of(redis_secret.as_deref());
    let redis_password = match (&previous, rotate_redis) {
        (Some(p), false) => p.clone(),
        _ => generate_password(),
    };
    let user = names::redis_user(stack);
    let passwords: Vec<&SecretString> = match (&previous, rotate_redis) {
        (Some(p), true) => vec![p, &redis_password],
        _ => vec![&redis_password],
    };
    clients
        .redis
        .ensure_user(
            &user,
            &stack.redis_key_prefix(),
            &passwords,
            previous.is_none() || rotate_redis,
        )
        .await
        .map_err(|e| Error::stage(stage, &e))?;
    let redis_url = crate::provision::redis::url_with_credentials(
        &spec.redis.url,
        &user,
        redis_password.expose_secret(),
    )
    .map_err(|e| Error::stage(stage, &e))?;

    // PostgreSQL: two logins take turns (see `names::postgres_second_login`); a rotation
    // gives the one the services do not use a new password and switches the Secret to it.
    let role = names::postgres_role(stack);
    let second = names::postgres_second_login(stack);
    let database = names::postgres_database(stack);
    let previous = postgres_secret
        .as_ref()
        .and_then(|s| s.value("password"))
        .map(SecretString::from);
    let rotate_postgres = previous.is_some() && rotate_of(postgres_secret.as_deref());
    let in_use = match postgres_secret.as_ref().and_then(|s| s.value("username")) {
        Some(user) if user == second => &second,
        _ => &role,
    };
    let (login, postgres_password) = match (&previous, rotate_postgres) {
        (Some(p), false) => (in_use, p.clone()),
        (Some(_), true) if in_use == &role => (&second, generate_password()),
        _ => (&role, generate_password()),
    };
    clients
        .postgres
        .ensure_role_and_database(
            &role,
            &database,
            login,
            &postgres_password,
            previous.is_none() || rotate_postgres,
        )
        .await
        .map_err(|e| Error::stage(stage, &e))?;
    let postgres_url = crate::provision::postgres::service_url(
        &spec.postgres,
        login,
        &database,
        postgres_password.expose_secret(),
    );

    let redis_secret = connection_secret(
        stack,
        build::redis_secret_name(stack),
        token.as_deref(),
        [
            (URL_KEY, redis_url.expose_secret()),
            ("username", &user),
            ("password", redis_password.expose_secret()),
        ],
    );
    let postgres_secret = connection_secret(
        stack,
        build::postgres_secret_name(stack),
        token.as_deref(),
        [
            (URL_KEY, &postgres_url),
            ("username", login),
            ("password", postgres_password.expose_secret()),
        ],
    );
    apply_object(ctx, &ctx.stores.secrets, redis_secret).await?;
    apply_object(ctx, &ctx.stores.secrets, postgres_secret).await?;
    if rotate_redis || rotate_postgres {
        outcome.event(
            EventType::Normal,
            "CredentialsRotated",
            "RotateCredentials",
            format!(
                "new passwords for Redis user {user} and PostgreSQL login {login}; the pods roll \
                 onto them, and the previous passwords keep working until the next rotation"
            ),
        );
    }
    outcome.report(
        stage,
        Status::True,
        "Provisioned",
        format!(
            "Redis user {user} (keys and channels {}*), PostgreSQL role and database {role} \
             (services log in as {login})",
            stack.redis_key_prefix()
        ),
    );
    Ok(build::fingerprint([
        redis_url.expose_secret().as_bytes(),
        postgres_url.as_bytes(),
    ]))
}

fn object_key<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> String {
    format!(
        "{}/{}/{namespace}/{name}",
        K::api_version(&()),
        K::kind(&())
    )
}

/// The generation of an object with a spec, else its resourceVersion.
fn version_of<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    owned::version(meta.generation, meta.resource_version.as_deref())
}

/// Whether version `a` is older than `b` (generations compare as numbers; resourceVersions
/// are opaque, so a different one counts as older only while the store may lag).
fn older(a: &str, b: &str) -> bool {
    match (a.strip_prefix('g'), b.strip_prefix('g')) {
        (Some(a), Some(b)) => a.parse::<i64>().ok() < b.parse::<i64>().ok(),
        _ => a.starts_with('r') && b.starts_with('r'),
    }
}

/// Server-side applies `object` unless the store shows it exactly as last applied.
async fn apply_object<K>(
    ctx: &Context,
    store: &Store<Owned<K>>,
    mut object: K,
) -> Result<bool, Error>
where
    K: Compact<Scope = k8s_openapi::NamespaceResourceScope> + Serialize + DeserializeOwned + Debug,
{
    let hash = build::fingerprint([serde_json::to_vec(&object)?.as_slice()]);
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let key = object_key::<K>(&namespace, &name);
    let last = ctx
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    match store.get(&ObjectRef::new(&name).within(&namespace)) {
        Some(existing) => {
            let same_hash = existing.applied_hash.as_ref() == Some(&hash);
            let untouched = match &last {
                Some(last) => {
                    let current = existing.version();
                    last.hash == hash
                        && (last.version == current
                            || (last.at.elapsed() < STORE_LAG && older(&current, &last.version)))
                }
                // Not applied by this process yet: trust the annotation.
                None => true,
            };
            if same_hash && untouched {
                return Ok(false);
            }
        }
        // Just applied, and the watch has not delivered it yet.
        None if last.is_some_and(|l| l.hash == hash && l.at.elapsed() < STORE_LAG) => {
            return Ok(false);
        }
        None => {}
    }
    object
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            key,
            Applied {
                hash,
                version: version_of(&applied),
                at: Instant::now(),
            },
        );
    Ok(true)
}

/// Deletes the named object if the store holds it and the stack owns it.
async fn delete_owned<K>(
    ctx: &Context,
    store: &Store<Owned<K>>,
    stack: &ValidatedStack,
    name: &str,
) -> Result<bool, Error>
where
    K: Compact<Scope = k8s_openapi::NamespaceResourceScope> + DeserializeOwned + Debug,
{
    let Some(existing) = store.get(&ObjectRef::new(name).within(stack.namespace())) else {
        return Ok(false);
    };
    if !existing.owned_by(&stack.owner().uid) || existing.deleting {
        return Ok(false);
    }
    // Only the very object the store showed: until the watch reports a deletion the store
    // still holds the old object, and a name-only delete from the next reconcile would remove
    // a successor created meanwhile.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    let api: Api<K> = Api::namespaced(ctx.client.clone(), stack.namespace());
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        // Gone already, or replaced by a newer object (the precondition failed).
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn apply_service(
    ctx: &Context,
    stack: &ValidatedStack,
    objects: &build::ServiceObjects,
) -> Result<bool, Error> {
    let mut changed =
        apply_object(ctx, &ctx.stores.config_maps, objects.config_map.clone()).await?;
    changed |= recreate_service_if_needed(ctx, stack, &objects.service).await?;
    changed |= apply_object(ctx, &ctx.stores.services, objects.service.clone()).await?;
    changed |= apply_object(ctx, &ctx.stores.deployments, objects.deployment.clone()).await?;
    match &objects.pod_disruption_budget {
        Some(pdb) => changed |= apply_object(ctx, &ctx.stores.pdbs, pdb.clone()).await?,
        None => {
            let name = build::object_name(stack, objects.component);
            changed |= delete_owned(ctx, &ctx.stores.pdbs, stack, &name).await?;
        }
    }
    Ok(changed)
}

/// Deletes the stack's Service named like `desired` when `desired` cannot be applied over it
/// ([`build::service_needs_recreate`]); the apply that follows creates it anew. The Services
/// concerned are the headless ones, which carry no client traffic.
async fn recreate_service_if_needed(
    ctx: &Context,
    stack: &ValidatedStack,
    desired: &Service,
) -> Result<bool, Error> {
    let name = desired.name_any();
    let Some(existing) = ctx
        .stores
        .services
        .get(&ObjectRef::new(&name).within(stack.namespace()))
    else {
        return Ok(false);
    };
    if !build::service_needs_recreate(existing.state.as_deref(), desired) {
        return Ok(false);
    }
    let deleted = delete_owned(ctx, &ctx.stores.services, stack, &name).await?;
    if deleted {
        tracing::info!(service = %name, "Recreating a Service whose clusterIP cannot change in place.");
    }
    Ok(deleted)
}

/// Deletes every object of the services that are disabled.
async fn delete_disabled(
    ctx: &Context,
    stack: &ValidatedStack,
    enabled: &BTreeSet<Component>,
) -> Result<Vec<&'static str>, Error> {
    let mut deleted = Vec::new();
    for component in Component::ALL.into_iter().filter(|c| !enabled.contains(c)) {
        let name = build::object_name(stack, component);
        let mut any = delete_owned(ctx, &ctx.stores.deployments, stack, &name).await?;
        any |= delete_owned(ctx, &ctx.stores.services, stack, &name).await?;
        any |= delete_owned(ctx, &ctx.stores.config_maps, stack, &name).await?;
        any |= delete_owned(ctx, &ctx.stores.pdbs, stack, &name).await?;
        if any {
            deleted.push(component.name());
        }
    }
    Ok(deleted)
}

/// What of an owned Deployment a reconcile acts on: its generation (spec changed, by us or
/// someone else), the applied-hash annotation, availability and ready replicas (reported in
/// the stack's status). The controller-manager updates a Deployment's status several times
/// while it rolls out (observed generation, updated replicas, condition timestamps); only
/// changes of this hash reconcile the owning stack.
fn deployment_trigger_hash(deployment: &Deployment) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // Runs on every Deployment event: reads the object, copies no strings.
    let rollout = deployment.state();
    let generation = deployment.metadata.generation;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    generation.hash(&mut hasher);
    deployment
        .annotations()
        .get(APPLIED_HASH_ANNOTATION)
        .hash(&mut hasher);
    rollout.available(generation).hash(&mut hasher);
    rollout.ready_replicas.hash(&mut hasher);
    hasher.finish()
}

/// The owned-Deployment events that should reconcile the owner: every deletion, and changes
/// of [`deployment_trigger_hash`] (a plain predicate filter would also swallow deletions).
fn deployment_triggers(
    events: impl futures::Stream<Item = Result<watcher::Event<Deployment>, watcher::Error>>,
) -> impl futures::Stream<Item = Result<Deployment, watcher::Error>> {
    let mut seen: HashMap<ObjectRef<Deployment>, u64> = HashMap::new();
    events.filter_map(move |event| {
        let trigger = match event {
            Ok(watcher::Event::Apply(deployment) | watcher::Event::InitApply(deployment)) => {
                let hash = deployment_trigger_hash(&deployment);
                let previous = seen.insert(ObjectRef::from_obj(&deployment), hash);
                (previous != Some(hash)).then_some(Ok(deployment))
            }
            Ok(watcher::Event::Delete(deployment)) => {
                seen.remove(&ObjectRef::from_obj(&deployment));
                Some(Ok(deployment))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(error) => Some(Err(error)),
        };
        std::future::ready(trigger)
    })
}

/// Stages 1 to 3 (the external state). Returns the credentials hash, or `None` when a stage
/// failed or cannot proceed (the reports say why).
async fn provision(
    stack: &ValidatedStack,
    object: &MiddlewareStack,
    ctx: &Context,
    refs: &Dereferenced,
    outcome: &mut Outcome,
) -> Option<String> {
    // 1. Dependencies.
    let clients = match timed("dependencies", dependencies(stack, ctx, refs)).await {
        Ok(clients) => clients,
        Err(error) => {
            outcome.fail(error);
            return None;
        }
    };
    outcome.report(
        status::DEPENDENCIES_READY,
        Status::True,
        "Reachable",
        "Kafka, Redis and PostgreSQL answer with the admin credentials",
    );

    // 2. Topics.
    let topics = desired_topics(stack);
    match timed(
        "topics",
        clients
            .kafka
            .reconcile_topics(&topics, ctx.settings.dependency_timeout),
    )
    .await
    {
        Err(error) => {
            outcome.fail(Error::stage(status::TOPICS_READY, &error));
            return None;
        }
        Ok(result) if !result.unsupported.is_empty() => {
            let message = result.unsupported.join("; ");
            outcome.report(
                status::TOPICS_READY,
                Status::False,
                "UnsupportedChange",
                message,
            );
            outcome.waiting_after(status::TOPICS_READY);
            // Not an error: retrying cannot help, the spec (or the topic) has to change.
            outcome.result = Ok(Action::requeue(ctx.settings.resync));
            return None;
        }
        Ok(result) => {
            for (list, what) in [
                (&result.created, "created"),
                (&result.grown, "given more partitions"),
                (&result.configured, "reconfigured"),
            ] {
                if !list.is_empty() {
                    outcome.event(
                        EventType::Normal,
                        "TopicsUpdated",
                        "ReconcileTopics",
                        format!("{what}: {}", list.join(", ")),
                    );
                }
            }
            let summary = topics
                .iter()
                .map(|t| format!("{} ({}×{})", t.name, t.partitions, t.replication_factor))
                .collect::<Vec<_>>()
                .join(", ");
            outcome.report(
                status::TOPICS_READY,
                Status::True,
                "TopicsReconciled",
                summary,
            );
        }
    }

    // 3. Credentials.
    match timed(
        "credentials",
        credentials(stack, object, ctx, &clients, outcome),
    )
    .await
    {
        Ok(hash) => Some(hash),
        Err(error) => {
            outcome.fail(error);
            None
        }
    }
}

/// The inputs of the external stages, fingerprinted.
fn provisioning_key(
    stack: &ValidatedStack,
    object: &MiddlewareStack,
    ctx: &Context,
    refs: &Dereferenced,
) -> String {
    let connection_versions: Vec<String> = [
        build::redis_secret_name(stack),
        build::postgres_secret_name(stack),
    ]
    .iter()
    .map(|name| {
        ctx.stores
            .secrets
            .get(&ObjectRef::new(name).within(stack.namespace()))
            .and_then(|s| s.resource_version.clone())
            .unwrap_or_default()
    })
    .collect();
    let generation = object.metadata.generation.unwrap_or_default().to_string();
    let token = object
        .annotations()
        .get(ROTATE_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    build::fingerprint(
        [generation.as_str(), token.as_str()]
            .into_iter()
            .chain(refs.versions.iter().map(String::as_str))
            .chain(connection_versions.iter().map(String::as_str))
            .map(str::as_bytes),
    )
}

async fn pipeline(
    stack: &ValidatedStack,
    object: &MiddlewareStack,
    ctx: &Context,
    outcome: &mut Outcome,
) {
    let stores = &ctx.stores;
    let synced = stores.deployments.wait_until_ready().await.is_ok()
        && stores.services.wait_until_ready().await.is_ok()
        && stores.config_maps.wait_until_ready().await.is_ok()
        && stores.pdbs.wait_until_ready().await.is_ok()
        && stores.secrets.wait_until_ready().await.is_ok();
    {
        if !synced {
            outcome.fail(Error::Stage {
                stage: status::DEPENDENCIES_READY,
                reason: "CachesNotSynced",
                message: "the operator's caches are not synced yet".to_owned(),
            });
            return;
        }
    }
    let refs = match timed("dereference", dereference(stack, ctx)).await {
        Ok(refs) => refs,
        Err(error) => {
            outcome.fail(error);
            return;
        }
    };
    let key = provisioning_key(stack, object, ctx, &refs);
    let object_ref = ObjectRef::from_obj(object);
    let cached = ctx
        .provisioned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&object_ref)
        .filter(|p| p.key == key && p.at.elapsed() < ctx.settings.resync)
        .cloned();
    let credentials_hash = match cached {
        Some(cached) => {
            outcome.reports.extend(cached.reports);
            cached.credentials_hash
        }
        None => {
            let Some(hash) = provision(stack, object, ctx, &refs, outcome).await else {
                ctx.provisioned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&object_ref);
                return;
            };
            // The connection Secrets may just have been written: key on what is stored now.
            let key = provisioning_key(stack, object, ctx, &refs);
            ctx.provisioned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    object_ref,
                    Provisioned {
                        key,
                        at: Instant::now(),
                        reports: outcome.reports.clone(),
                        credentials_hash: hash.clone(),
                    },
                );
            hash
        }
    };

    // 4. Core, 5. edge: build (pure), then apply in the order gating allows.
    let desired = build::with_credentials_hash(build::build(stack), &credentials_hash);
    let enabled = stack.enabled();
    match delete_disabled(ctx, stack, &enabled).await {
        Ok(deleted) if !deleted.is_empty() => outcome.event(
            EventType::Normal,
            "ServicesRemoved",
            "DeleteDisabled",
            format!(
                "deleted the objects of disabled services: {}",
                deleted.join(", ")
            ),
        ),
        Ok(_) => {}
        Err(error) => {
            outcome.fail(error);
            return;
        }
    }
    let observe = |outcome: &mut Outcome| {
        let mut observed = Observed {
            dependencies_reachable: true,
            topics_reconciled: true,
            credentials_provisioned: true,
            available: BTreeSet::new(),
        };
        for component in &enabled {
            let name = build::object_name(stack, *component);
            let deployment = ctx
                .stores
                .deployments
                .get(&ObjectRef::new(&name).within(stack.namespace()));
            if let Some(deployment) = deployment {
                if deployment.available() {
                    observed.available.insert(*component);
                }
                outcome.services.insert(
                    component.name().to_owned(),
                    ServiceStatus {
                        replicas: deployment.state.replicas,
                        ready_replicas: deployment.state.ready_replicas,
                    },
                );
            }
        }
        observed
    };
    let mut observed = observe(outcome);
    let mut applied = Vec::new();
    for step in [Step::Core, Step::WsHub, Step::Gateway] {
        let plan = gating::plan(&enabled, &observed, false);
        let decision = plan
            .iter()
            .find(|(s, _)| *s == step)
            .map_or(Decision::Proceed, |(_, d)| *d);
        if decision != Decision::Proceed {
            break;
        }
        for objects in desired.services.iter().filter(|o| match step {
            Step::Core => o.component.tier() == build::Tier::Core,
            Step::WsHub => o.component == Component::WsHub,
            _ => o.component == Component::Gateway,
        }) {
            match timed("apply", apply_service(ctx, stack, objects)).await {
                Ok(true) => applied.push(objects.component.name()),
                Ok(false) => {}
                Err(error) => {
                    let message = error.to_string();
                    outcome.fail(Error::Stage {
                        stage: if step == Step::Core {
                            status::CORE_AVAILABLE
                        } else {
                            status::EDGE_AVAILABLE
                        },
                        reason: "ApplyFailed",
                        message,
                    });
                    return;
                }
            }
        }
        observed = observe(outcome);
    }
    if !applied.is_empty() {
        outcome.event(
            EventType::Normal,
            "Applied",
            "ApplyServices",
            format!("applied the objects of {}", applied.join(", ")),
        );
    }
    let waiting = |tier: build::Tier| {
        enabled
            .iter()
            .filter(|c| c.tier() == tier && !observed.available.contains(c))
            .map(|c| c.name())
            .collect::<Vec<_>>()
    };
    let core_waiting = waiting(build::Tier::Core);
    if core_waiting.is_empty() {
        outcome.report(
            status::CORE_AVAILABLE,
            Status::True,
            "Available",
            "command-service, processor and cache-updater are Available",
        );
    } else {
        outcome.report(
            status::CORE_AVAILABLE,
            Status::False,
            "Progressing",
            format!(
                "waiting for {} to become Available",
                core_waiting.join(", ")
            ),
        );
        outcome.waiting_after(status::CORE_AVAILABLE);
        return;
    }
    let edge_waiting = waiting(build::Tier::Edge);
    if edge_waiting.is_empty() {
        outcome.report(
            status::EDGE_AVAILABLE,
            Status::True,
            "Available",
            "ws-hub and api-gateway are Available",
        );
    } else {
        outcome.report(
            status::EDGE_AVAILABLE,
            Status::False,
            "Progressing",
            format!(
                "waiting for {} to become Available",
                edge_waiting.join(", ")
            ),
        );
    }
}

/// The finalizer's cleanup, per `spec.deletionPolicy`; released anyway (with a Warning
/// Event) after `cleanup_attempts` failures, so namespace deletion never blocks forever.
async fn cleanup(stack: &MiddlewareStack, ctx: &Context) -> Result<Action, Error> {
    let uid = stack.uid().unwrap_or_default();
    let bound = ctx.settings.reconcile_timeout;
    let result = deadline("cleanup", bound, cleanup_external(stack, ctx)).await;
    let Err(error) = result else {
        ctx.cleanup_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
        forget(stack, ctx);
        publish_events(
            stack,
            ctx,
            vec![Event {
                type_: EventType::Normal,
                reason: "CleanedUp".to_owned(),
                note: Some(format!(
                    "deletionPolicy applied (topics {:?}, credentials {:?}); finalizer released",
                    stack.spec.deletion_policy.topics, stack.spec.deletion_policy.credentials
                )),
                action: "Cleanup".to_owned(),
                secondary: None,
            }],
            false,
        )
        .await;
        return Ok(Action::await_change());
    };
    let attempts = {
        let mut failures = ctx
            .cleanup_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let attempts = failures.entry(uid.clone()).or_insert(0);
        *attempts += 1;
        *attempts
    };
    let abandon = attempts >= ctx.settings.cleanup_attempts;
    let note = if abandon {
        format!(
            "cleanup failed {attempts} times, releasing the finalizer; clean up by hand: {error}"
        )
    } else {
        format!(
            "cleanup attempt {attempts} of {} failed: {error}",
            ctx.settings.cleanup_attempts
        )
    };
    publish_events(
        stack,
        ctx,
        vec![Event {
            type_: EventType::Warning,
            reason: if abandon {
                "CleanupAbandoned"
            } else {
                "CleanupFailed"
            }
            .to_owned(),
            note: Some(truncate(note, 1000)),
            action: "Cleanup".to_owned(),
            secondary: None,
        }],
        // An abandoned cleanup is the last Event: its recorder goes.
        !abandon,
    )
    .await;
    if abandon {
        ctx.cleanup_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
        forget(stack, ctx);
        Ok(Action::await_change())
    } else {
        Err(error)
    }
}

/// Drops what the operator keeps about a stack whose finalizer it releases: its stage states
/// (so `operator_stacks` counts it no more), its provisioning cache, failure count and
/// Event recorder, and the fingerprints of the objects it applied for it.
fn forget(stack: &MiddlewareStack, ctx: &Context) {
    let key = ObjectRef::from_obj(stack);
    {
        let mut all = ctx.stage_states.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(&key);
        record_stage_gauges(&all);
    }
    ctx.provisioned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    ctx.recorders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    // An invalid stack never had objects applied.
    let Ok(validated) = validate(stack) else {
        return;
    };
    let namespace = validated.namespace();
    let mut keys = vec![
        object_key::<Secret>(namespace, &build::redis_secret_name(&validated)),
        object_key::<Secret>(namespace, &build::postgres_secret_name(&validated)),
    ];
    for component in Component::ALL {
        let name = build::object_name(&validated, component);
        keys.extend([
            object_key::<Deployment>(namespace, &name),
            object_key::<Service>(namespace, &name),
            object_key::<ConfigMap>(namespace, &name),
            object_key::<PodDisruptionBudget>(namespace, &name),
        ]);
    }
    let mut applied = ctx.applied.lock().unwrap_or_else(|p| p.into_inner());
    for key in keys {
        applied.remove(&key);
    }
}

async fn cleanup_external(stack: &MiddlewareStack, ctx: &Context) -> Result<(), Error> {
    let policy = &stack.spec.deletion_policy;
    if policy.topics == Retention::Retain && policy.credentials == Retention::Retain {
        return Ok(());
    }
    // An invalid stack never provisioned anything.
    let Ok(validated) = validate(stack) else {
        return Ok(());
    };
    let refs = dereference(&validated, ctx).await?;
    let clients = dependencies(&validated, ctx, &refs).await?;
    let timeout = ctx.settings.dependency_timeout;
    if policy.topics == Retention::Delete {
        let names: Vec<String> = desired_topics(&validated)
            .into_iter()
            .map(|t| t.name)
            .collect();
        clients
            .kafka
            .delete_topics(&names, timeout)
            .await
            .map_err(|e| Error::stage(status::TOPICS_READY, &e))?;
    }
    if policy.credentials == Retention::Delete {
        clients
            .redis
            .delete_user(&names::redis_user(&validated))
            .await
            .map_err(|e| Error::stage(status::CREDENTIALS_READY, &e))?;
        clients
            .postgres
            .drop_role_and_database(
                &[
                    &names::postgres_second_login(&validated),
                    &names::postgres_role(&validated),
                ],
                &names::postgres_database(&validated),
            )
            .await
            .map_err(|e| Error::stage(status::CREDENTIALS_READY, &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod store_tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    #[test]
    fn the_referenced_secrets_store_keeps_only_identity_and_version() {
        let mut secret = PartialObjectMeta::<Secret> {
            types: None,
            metadata: ObjectMeta {
                name: Some("kafka-admin".to_owned()),
                namespace: Some("team-a".to_owned()),
                uid: Some("u1".to_owned()),
                resource_version: Some("42".to_owned()),
                labels: Some(BTreeMap::from([("a".to_owned(), "b".to_owned())])),
                annotations: Some(BTreeMap::from([("c".to_owned(), "d".to_owned())])),
                owner_references: Some(vec![OwnerReference::default()]),
                ..ObjectMeta::default()
            },
            _phantom: std::marker::PhantomData,
        };
        identity_only(&mut secret);
        assert_eq!(
            secret.metadata,
            ObjectMeta {
                name: Some("kafka-admin".to_owned()),
                namespace: Some("team-a".to_owned()),
                uid: Some("u1".to_owned()),
                resource_version: Some("42".to_owned()),
                ..ObjectMeta::default()
            }
        );
    }
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[tokio::test]
    async fn work_past_its_bound_is_cancelled_with_a_timed_out_error() {
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let stuck = async move {
            let _held = dropped_tx;
            futures::future::pending::<Result<(), Error>>().await
        };
        let error = deadline("cleanup", Duration::from_millis(50), stuck)
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                Error::TimedOut {
                    work: "cleanup",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(error.reason(), "ReconcileTimedOut");
        assert!(
            error
                .to_string()
                .starts_with("cleanup did not finish within 50ms"),
            "{error}"
        );
        assert!(dropped_rx.await.is_err(), "the work was dropped");

        let done = deadline("reconcile", Duration::from_secs(5), async { Ok(7) }).await;
        assert_eq!(done.unwrap(), 7);
    }
}

#[cfg(test)]
mod trigger_tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};

    use super::*;

    fn deployment(generation: i64, status: DeploymentStatus) -> Deployment {
        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..DeploymentSpec::default()
            }),
            status: Some(status),
            ..Deployment::default()
        };
        deployment.metadata.generation = Some(generation);
        deployment
    }

    fn rolling_out(observed: i64) -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(observed),
            updated_replicas: Some(1),
            ..DeploymentStatus::default()
        }
    }

    fn available_status() -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(1),
            updated_replicas: Some(1),
            ready_replicas: Some(1),
            available_replicas: Some(1),
            conditions: Some(vec![DeploymentCondition {
                type_: "Available".into(),
                status: "True".into(),
                ..DeploymentCondition::default()
            }]),
            ..DeploymentStatus::default()
        }
    }

    #[test]
    fn status_bookkeeping_does_not_reconcile_but_availability_and_spec_changes_do() {
        let created = deployment_trigger_hash(&deployment(1, DeploymentStatus::default()));
        // The controller-manager observing the generation and updating replicas: no trigger.
        assert_eq!(
            created,
            deployment_trigger_hash(&deployment(1, rolling_out(1)))
        );
        // Available with a ready replica: trigger.
        let ready = deployment_trigger_hash(&deployment(1, available_status()));
        assert_ne!(created, ready);
        // Someone edited the spec: trigger.
        assert_ne!(
            ready,
            deployment_trigger_hash(&deployment(2, available_status()))
        );
        // Our applied hash changed: trigger.
        let mut annotated = deployment(1, available_status());
        annotated
            .annotations_mut()
            .insert(APPLIED_HASH_ANNOTATION.to_owned(), "other".to_owned());
        assert_ne!(ready, deployment_trigger_hash(&annotated));
    }

    #[tokio::test]
    async fn deletions_always_reconcile_and_repeated_states_do_not() {
        let mut object = deployment(1, available_status());
        object.metadata.name = Some("svc".into());
        object.metadata.namespace = Some("ns".into());
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(object.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(object.clone())),
            Ok(watcher::Event::Delete(object.clone())),
            Ok(watcher::Event::Apply(object.clone())),
        ]);
        let triggers: Vec<_> = deployment_triggers(events).collect().await;
        // InitApply, Delete, and the re-creation after the delete.
        assert_eq!(triggers.len(), 3);
    }
}
