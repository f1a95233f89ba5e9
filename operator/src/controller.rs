//! The reconcile loop: a kube-runtime [`Controller`] on `MiddlewareStack`, owning the
//! Deployments, Services, ConfigMaps, PodDisruptionBudgets and Secrets it creates (shared
//! reflector stores, so reconciles read them locally) and watching the Secrets stacks refer to
//! ([`watch`]).
//!
//! A reconcile runs these steps, in this order:
//!
//! 1. *validate* the spec ([`crate::validate`]); an invalid or paused stack skips to 8.
//! 2. *dereference*: read the admin and JWT Secrets the stack refers to ([`dereference`]).
//! 3. *dependencies*: Kafka, Redis and PostgreSQL answer with those credentials
//!    ([`dereference`]).
//! 4. *topics*, then 5. *credentials*: the Redis user, the PostgreSQL role and the connection
//!    Secrets ([`provision`]). Steps 3 to 5 are reused while their inputs are unchanged.
//! 6. *build* the desired objects (pure, [`crate::build`]) with the replica counts of
//!    [`scaling`] (the consumers' lag, foreign autoscalers); delete those of disabled services.
//! 7. *apply* (server-side, [`apply`]) the objects of the core services, then the WebSocket
//!    hub, then the API gateway.
//! 8. *status*: merge the conditions, update the stage gauges, patch the status, publish the
//!    Events ([`status`]).
//!
//! Steps 3 to 7 are the stages ([`stages`]), gated per [`crate::gating`]: each runs only once
//! every stage before it is healthy. A deleted stack runs the finalizer's *cleanup* instead
//! ([`cleanup`]). An object is written only when its desired content changed or someone else
//! changed it, and the status only when it changed, so a steady stack causes no API writes at
//! all.
//!
//! [`Controller`]: kube::runtime::Controller
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt as _};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::crd::{MiddlewareStack, Phase};
use crate::provision::kafka::KafkaClients;
use crate::provision::postgres::PostgresAdmins;
use crate::status::{self as conditions, Report, Status};
use crate::validate::validate;
use common::metrics::{
    OPERATOR_RECONCILE_DURATION_SECONDS, OPERATOR_RECONCILE_ERRORS_TOTAL,
    OPERATOR_RECONCILES_IN_FLIGHT, OPERATOR_RECONCILES_TOTAL, OPERATOR_STEP_DURATION_SECONDS,
};

mod admin_secrets;
mod apply;
mod cleanup;
mod dereference;
mod monitoring;
mod provision;
mod scaling;
mod stages;
mod status;
mod watch;
mod waves;

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
    /// How often the dependencies of a stack whose external stages are reused are checked
    /// again; also the longest a Ready stack waits before it is looked at again.
    pub health_check: Duration,
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
    /// This operator's version: recorded in a stack's `status.operatorVersion` once its
    /// services run what this version generates. A stack that records another version is
    /// rolled onto this one in a wave ([`waves`]).
    pub version: String,
    /// The images of services whose registry or tag the stack leaves unset.
    pub release: crate::crd::Release,
    /// Stacks rolled onto a new operator version at once (an upgrade wave's width).
    pub rollout_concurrency: usize,
    /// How long a stack in an upgrade wave may take to become Available before the wave
    /// halts.
    pub rollout_timeout: Duration,
}

impl Settings {
    /// When a stack with nothing to wait for is looked at again: at the next health check.
    pub fn next_look(&self) -> Duration {
        self.health_check.min(self.resync)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            dependency_timeout: Duration::from_secs(3),
            resync: Duration::from_secs(300),
            health_check: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            cleanup_attempts: 5,
            concurrency: 16,
            reconcile_timeout: Duration::from_secs(120),
            instance: None,
            version: crate::crd::RELEASE_TAG.to_owned(),
            release: crate::crd::Release::default(),
            rollout_concurrency: 2,
            rollout_timeout: Duration::from_secs(600),
        }
    }
}

/// Why a reconcile failed: the step that failed, with its cause as the [`source`].
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the Secrets the stack refers to, or reaching its dependencies, failed.
    #[error("failed to dereference the stack's Secrets and dependencies")]
    Dereference(#[from] dereference::Error),
    /// Provisioning the topics or the credentials failed.
    #[error("failed to provision the stack's topics and credentials")]
    Provision(#[from] provision::Error),
    /// The stages could not run, or writing a service's objects failed.
    #[error("failed to roll out the stack's services")]
    Stages(#[from] stages::Error),
    /// Writing the stack's status failed.
    #[error("failed to write the stack's status")]
    Status(#[from] status::Error),
    /// Cleaning up a deleted stack's topics or credentials failed.
    #[error("failed to clean up the deleted stack")]
    Cleanup(#[from] cleanup::Error),
    /// Adding or removing the finalizer failed, or the cleanup did.
    #[error("failed to run the finalizer")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
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
    /// The metric label of this error, and the reason of the condition it sets.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dereference(error) => error.reason(),
            Self::Provision(error) => error.reason(),
            Self::Stages(error) => error.reason(),
            Self::Status(error) => error.reason(),
            Self::Cleanup(error) => error.reason(),
            Self::Finalizer(_) => "FinalizerFailed",
            Self::TimedOut { .. } => "ReconcileTimedOut",
        }
    }

    /// The `False` condition of the stage this error stopped, if it stopped one (a failed
    /// Kubernetes API request outside the service stages sets none).
    fn report(&self) -> Option<Report> {
        match self {
            Self::Dereference(error) => error.report(),
            Self::Provision(error) => error.report(),
            Self::Stages(error) => error.report(),
            Self::Status(_) | Self::Cleanup(_) | Self::Finalizer(_) | Self::TimedOut { .. } => None,
        }
    }
}

/// Displays an error and its sources, `: `-separated.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    /// Who publishes the operator's Events (see [`status::publish_events`]).
    reporter: Reporter,
    /// The Event recorders of the stacks whose reconciles are failing (see
    /// [`status::publish_events`]).
    recorders: Mutex<HashMap<ObjectRef<MiddlewareStack>, Recorder>>,
    settings: Settings,
    stores: watch::Stores,
    kafka: KafkaClients,
    postgres: PostgresAdmins,
    /// Consecutive failures per stack (for the backoff).
    failures: Mutex<HashMap<ObjectRef<MiddlewareStack>, u32>>,
    /// Failed cleanups per stack uid.
    cleanup_failures: Mutex<HashMap<String, u32>>,
    /// The admin credentials each stack last provisioned with, for its cleanup: deleting a
    /// namespace deletes its admin Secrets too, often before the stack's finalizer runs.
    admin_credentials: Mutex<HashMap<ObjectRef<MiddlewareStack>, dereference::Dereferenced>>,
    /// What the operator last applied, per object: the desired fingerprint and the
    /// generation (or resourceVersion) the API server answered with. Anything else in the
    /// store means someone changed the object, and it is applied again.
    applied: Mutex<HashMap<apply::ObjectKey, apply::Applied>>,
    /// The last successful external stages per stack.
    provisioned: Mutex<HashMap<ObjectRef<MiddlewareStack>, provision::Provisioned>>,
    /// The last condition statuses per stack, for the per-stage gauges.
    stage_states: Mutex<HashMap<ObjectRef<MiddlewareStack>, status::StageStates>>,
    /// Every Secret's metadata in the watch scope (the referenced-Secrets watch).
    secret_versions: Store<PartialObjectMeta<Secret>>,
    /// Secrets the stacks refer to (admin credentials, JWT keys), as last read: used while
    /// their resourceVersion in `secret_versions` is unchanged, so a reconcile reads them
    /// from the API server only after they changed (many stacks may share one admin Secret).
    referenced: Mutex<HashMap<ObjectRef<Secret>, Arc<Secret>>>,
    /// Whether the cluster serves PodMonitors, and the ones this process wrote.
    pod_monitors: monitoring::PodMonitors,
    /// What the consumers' lag scalers remember between reconciles.
    scalers: scaling::Memories,
    /// The upgrade waves: which stacks roll onto this operator's version, which wait.
    waves: Mutex<waves::Waves>,
    /// Per Deployment (its `apply::object_key`), the pod template it was last Available with
    /// (see `stages::services::available`); forgotten with its stack.
    available_templates: Mutex<HashMap<apply::ObjectKey, u64>>,
    /// The stacks in the watch scope (the controller's store).
    stacks: Store<MiddlewareStack>,
    /// The uids of stacks whose cleanup finished, until the store drops them (see
    /// `admin_secrets::release_unreferenced`).
    cleaned: Mutex<HashSet<String>>,
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
    let watch::Watches {
        controller,
        stores,
        secret_versions,
        stacks,
    } = watch::watches(&client, &settings);
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: settings.instance.clone(),
    };
    let context = Arc::new(Context {
        reporter,
        recorders: Mutex::default(),
        client,
        stores,
        kafka: KafkaClients::default(),
        postgres: PostgresAdmins::default(),
        failures: Mutex::default(),
        cleanup_failures: Mutex::default(),
        admin_credentials: Mutex::default(),
        applied: Mutex::default(),
        stage_states: Mutex::default(),
        provisioned: Mutex::default(),
        secret_versions,
        referenced: Mutex::default(),
        pod_monitors: monitoring::PodMonitors::default(),
        scalers: scaling::Memories::default(),
        waves: Mutex::default(),
        available_templates: Mutex::default(),
        stacks,
        cleaned: Mutex::default(),
        settings,
    });
    let stacks = controller.store();
    let stopping = shutdown.clone();
    let running = controller
        .graceful_shutdown_on(async move { stopping.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                Err(kube::runtime::controller::Error::ReconcilerFailed(error, object)) => {
                    tracing::warn!(stack = %object, error = %Chain(&error), "Reconcile failed.");
                }
                Err(error) => tracing::warn!(error = %Chain(&error), "Controller error."),
            }
        });
    // kube-runtime holds reconciles until the first list of stacks has arrived, and a graceful
    // shutdown stops the watch that would deliver it: stopped before then, the controller
    // would wait forever. No reconcile can have started, so there is nothing to wait for.
    let stopped_before_the_first_list = async {
        shutdown.cancelled().await;
        if stacks.wait_until_ready().now_or_never().is_none() {
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = running => {}
        () = stopped_before_the_first_list => {
            tracing::info!("Stopped before the first list of stacks arrived: nothing to finish.");
        }
    }
    Ok(())
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
            Finalizer::Apply(stack) => {
                deadline("reconcile", bound, reconcile_stack(&stack, &ctx)).await
            }
            Finalizer::Cleanup(stack) => cleanup::cleanup(&stack, &ctx).await,
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
        let event = status::event(
            EventType::Warning,
            error.reason(),
            "Reconcile",
            error.to_string(),
        );
        status::publish_events(&stack, &ctx, vec![event], true).await;
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

/// The reconcile of a stack that is not being deleted: validate it, run the stages (unless
/// it is invalid or paused), then write its status and publish the Events.
async fn reconcile_stack(stack: &MiddlewareStack, ctx: &Context) -> Result<Action, Error> {
    let (phase, reports, outcome) = match validate(stack) {
        // An invalid spec waits for the next change: retrying cannot fix it.
        Err(error) => {
            waves::forget(ctx, &ObjectRef::from_obj(stack));
            (
                Phase::Failed,
                status::invalid(&error),
                stages::Outcome::skipped(),
            )
        }
        Ok(_) if stack.spec.paused => {
            waves::forget(ctx, &ObjectRef::from_obj(stack));
            (
                Phase::Paused,
                status::paused(stack),
                stages::Outcome::skipped(),
            )
        }
        Ok(validated) => {
            let validated = validated.with_release(ctx.settings.release.clone());
            let outcome = stages::run(ctx, stack, &validated).await;
            let reports = conditions::with_ready(outcome.reports.clone());
            (status::phase(stack, &reports), reports, outcome)
        }
    };
    let ready = reports
        .iter()
        .any(|r| r.type_ == conditions::READY && r.status == Status::True);
    // Transitions first, in condition order, then what the stages reported.
    let transitions = timed(
        "status",
        status::write(
            stack,
            ctx,
            &reports,
            phase,
            outcome.services,
            outcome.operator_version,
        ),
    )
    .await?;
    let events = transitions.into_iter().chain(outcome.events).collect();
    let failing = outcome.result.is_err();
    timed(
        "events",
        status::publish_events(stack, ctx, events, failing),
    )
    .await;
    if outcome.result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ObjectRef::from_obj(stack));
    }
    match outcome.result {
        Ok(_) if ready => Ok(Action::requeue(ctx.settings.next_look())),
        other => other,
    }
}

/// Times one step of a reconcile into `operator_step_duration_seconds`.
async fn timed<T>(step: &'static str, work: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let result = work.await;
    metrics::histogram!(OPERATOR_STEP_DURATION_SECONDS, "step" => step)
        .record(started.elapsed().as_secs_f64());
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
    let stack = stack.name_any();
    tracing::debug!(%stack, error = %Chain(error), attempts, ?delay, "Retrying.");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests;
