//! The *stages*: the gated pipeline of [`crate::gating`] — dependencies → topics →
//! credentials → core services → WebSocket hub → API gateway. A stage runs only once every
//! stage before it is healthy; a stage that fails or cannot proceed reports why, and every
//! later stage reports that it is waiting. Each stage returns what it did (its report, Events
//! about its changes, or its error); [`run`] combines them into an [`Outcome`].
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};

use super::provision::Topics;
use super::status::{event, waiting_after};
use super::{
    Context, admin_secrets, apply, dereference, monitoring, provision, scaling, timed, waves,
};
use crate::build::{self, Component, Scraping, Tier};
use crate::crd::{MiddlewareStack, ServiceStatus};
use crate::status::{CORE_AVAILABLE, DEPENDENCIES_READY, EDGE_AVAILABLE, TOPICS_READY};
use crate::status::{Report, Status};
use crate::validate::ValidatedStack;

mod services;

/// How often a stack waiting for its turn in an upgrade wave looks for a free slot.
const WAVE_POLL: Duration = Duration::from_secs(5);

/// Why the stages could not run, or a service's objects could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reflector stores have not received their initial lists yet.
    #[error("failed to read the operator's caches: they are not synced yet")]
    CachesNotSynced,
    /// Deleting the objects of a service that is no longer enabled failed.
    #[error("failed to delete the objects of disabled service {}", .component.name())]
    DeleteDisabled {
        /// The disabled service.
        component: Component,
        /// What the API server (or the connection to it) said.
        #[source]
        source: kube::Error,
    },
    /// Applying one of a service's objects failed.
    #[error("failed to apply the objects of {}", .component.name())]
    Apply {
        /// The service.
        component: Component,
        /// The object that failed.
        #[source]
        source: apply::Error,
    },
    /// Deleting an object of a service that cannot be applied over (a Service whose
    /// `clusterIP` must change) or is no longer wanted (a PodDisruptionBudget) failed.
    #[error("failed to delete the stale {kind} of {}", .component.name())]
    DeleteStale {
        /// The service.
        component: Component,
        /// The object's kind.
        kind: &'static str,
        /// What the API server (or the connection to it) said.
        #[source]
        source: kube::Error,
    },
    /// Applying the stack's endpoints ConfigMap failed.
    #[error("failed to apply the stack's endpoints ConfigMap")]
    ApplyEndpoints(#[source] apply::Error),
    /// Applying the stack's NetworkPolicy failed.
    #[error("failed to apply the stack's NetworkPolicy")]
    ApplyNetworkPolicy(#[source] apply::Error),
    /// Deleting the stack's NetworkPolicy (`spec.networkPolicy.enabled: false`) failed.
    #[error("failed to delete the stack's NetworkPolicy")]
    DeleteNetworkPolicy(#[source] kube::Error),
}

impl Error {
    /// The metric label and condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CachesNotSynced => "CachesNotSynced",
            Self::DeleteDisabled { .. } | Self::DeleteNetworkPolicy(_) => "KubernetesApiError",
            Self::Apply { .. }
            | Self::DeleteStale { .. }
            | Self::ApplyEndpoints(_)
            | Self::ApplyNetworkPolicy(_) => "ApplyFailed",
        }
    }

    /// The `False` condition of the stage that failed, except for a failed deletion of a
    /// disabled service's objects.
    pub(super) fn report(&self) -> Option<Report> {
        let (stage, message) = match self {
            Self::CachesNotSynced => (
                DEPENDENCIES_READY,
                "the operator's caches are not synced yet".to_owned(),
            ),
            Self::DeleteDisabled { .. } => return None,
            Self::Apply { component, source } => (stage_of(*component), source.message()),
            Self::ApplyEndpoints(source) => (EDGE_AVAILABLE, source.message()),
            Self::ApplyNetworkPolicy(source) => (CORE_AVAILABLE, source.message()),
            Self::DeleteNetworkPolicy(source) => (
                CORE_AVAILABLE,
                format!("Kubernetes API request failed: {source}"),
            ),
            Self::DeleteStale {
                component, source, ..
            } => (
                stage_of(*component),
                format!("Kubernetes API request failed: {source}"),
            ),
        };
        Some(Report::new(stage, Status::False, self.reason(), message))
    }
}

/// The condition of the stage a service is started in.
fn stage_of(component: Component) -> &'static str {
    match component.tier() {
        Tier::Core => CORE_AVAILABLE,
        Tier::Edge => EDGE_AVAILABLE,
    }
}

/// What the stages did.
pub(super) struct Outcome {
    /// The stage reports, in order (`Ready` is derived from them).
    pub(super) reports: Vec<Report>,
    /// Each service's replicas, as last observed.
    pub(super) services: BTreeMap<String, ServiceStatus>,
    /// Events about what the stages changed.
    pub(super) events: Vec<Event>,
    /// This operator's version, when its objects were written (`None`: the status keeps the
    /// version it records).
    pub(super) operator_version: Option<String>,
    /// How the reconcile ends.
    pub(super) result: Result<Action, super::Error>,
}

impl Outcome {
    /// The outcome of stages that did not run (an invalid or paused stack).
    pub(super) fn skipped() -> Self {
        Self {
            reports: Vec::new(),
            services: BTreeMap::new(),
            events: Vec::new(),
            operator_version: None,
            result: Ok(Action::await_change()),
        }
    }

    /// Stopped by `error`: the failed stage's report, if the error concerns one, and every
    /// later stage waiting for it.
    fn failed(
        mut reports: Vec<Report>,
        services: BTreeMap<String, ServiceStatus>,
        events: Vec<Event>,
        error: super::Error,
    ) -> Self {
        if let Some(report) = error.report() {
            let stage = report.type_;
            reports.push(report);
            waiting_after(&mut reports, stage);
        }
        Self {
            reports,
            services,
            events,
            operator_version: None,
            result: Err(error),
        }
    }
}

/// Runs the stages of `stack` (`validated`) as far as they can go.
pub(super) async fn run(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
) -> Outcome {
    if !ctx.stores.synced().await {
        let error = Error::CachesNotSynced.into();
        return Outcome::failed(Vec::new(), BTreeMap::new(), Vec::new(), error);
    }
    let refs = match timed("dereference", dereference::secrets(ctx, validated)).await {
        Ok(refs) => {
            dereference::remember(ctx, stack, &refs);
            // Admin Secrets wait for the cleanups that need them (a namespace deletion).
            if let Err(error) = admin_secrets::hold(ctx, stack).await {
                tracing::warn!(stack = %kube::runtime::reflector::ObjectRef::from_obj(stack), %error, "Failed to put the finalizer on an admin Secret.");
            }
            admin_secrets::release_unreferenced(ctx, validated.namespace()).await;
            refs
        }
        Err(error) => {
            return Outcome::failed(Vec::new(), BTreeMap::new(), Vec::new(), error.into());
        }
    };

    // 1. Dependencies, 2. topics, 3. credentials, unless their last outcome can be reused.
    let (mut reports, mut events, credentials_hash) =
        match provision::cached(ctx, stack, validated, &refs) {
            Some(cached) => {
                // Reused, but the dependencies are checked again every health-check period.
                if cached.checked.elapsed() >= ctx.settings.health_check {
                    let dependencies = dereference::dependencies(ctx, validated, &refs);
                    if let Err(error) = timed("dependencies", dependencies).await {
                        provision::forget(ctx, stack);
                        let error = error.into();
                        return Outcome::failed(Vec::new(), BTreeMap::new(), Vec::new(), error);
                    }
                    provision::checked(ctx, stack);
                }
                (cached.reports, Vec::new(), cached.credentials_hash)
            }
            None => {
                let External {
                    mut reports,
                    events,
                    end,
                } = external(ctx, stack, validated, &refs).await;
                match end {
                    End::Provisioned(hash) => {
                        provision::remember(ctx, stack, validated, &refs, &reports, &hash);
                        (reports, events, hash)
                    }
                    End::Failed(error) => {
                        provision::forget(ctx, stack);
                        return Outcome::failed(reports, BTreeMap::new(), events, error);
                    }
                    End::Unsupported => {
                        provision::forget(ctx, stack);
                        waiting_after(&mut reports, TOPICS_READY);
                        return Outcome {
                            reports,
                            services: BTreeMap::new(),
                            events,
                            operator_version: None,
                            result: Ok(Action::requeue(ctx.settings.resync)),
                        };
                    }
                }
            }
        };

    // 4. Core, 5. edge: build (pure), then apply in the order gating allows.
    let pod_monitor_api = monitoring::pod_monitor_api(ctx).await;
    let scraping = Scraping::choose(&validated.spec().monitoring, pod_monitor_api.is_some());
    let enabled = validated.enabled();
    // A stack due to roll onto this operator's version waits for its turn in the wave, its
    // services left as they are (scaled neither).
    let (rollout, rolled) = match waves::turn(ctx, stack) {
        waves::Turn::Go(started) => {
            events.extend(started);
            let scaled = timed("scaling", scaling::replicas(ctx, stack, validated, &refs)).await;
            events.extend(scaled.events);
            let desired =
                build::with_credentials_hash(build::build(validated, scraping), &credentials_hash);
            let desired = build::with_replicas(desired, &scaled.replicas);
            let written = write_services(
                ctx,
                validated,
                &desired,
                &enabled,
                pod_monitor_api.as_ref(),
                events,
            )
            .await;
            match written {
                Ok((rollout, written)) => {
                    events = written;
                    (rollout, true)
                }
                Err((error, services, written)) => {
                    return Outcome::failed(reports, services, written, error);
                }
            }
        }
        waves::Turn::Wait(queued) => {
            events.extend(queued);
            (services::observed(ctx, validated, &enabled), false)
        }
    };
    let waiting = |tier: Tier| {
        enabled
            .iter()
            .filter(|c| c.tier() == tier && !rollout.observed.available.contains(c))
            .map(|c| c.name())
            .collect::<Vec<_>>()
    };
    let core_waiting = waiting(Tier::Core);
    if core_waiting.is_empty() {
        reports.push(Report::new(
            CORE_AVAILABLE,
            Status::True,
            "Available",
            "command-service, processor and cache-updater are Available",
        ));
        let edge_waiting = waiting(Tier::Edge);
        reports.push(if edge_waiting.is_empty() {
            Report::new(
                EDGE_AVAILABLE,
                Status::True,
                "Available",
                "ws-hub and api-gateway are Available",
            )
        } else {
            Report::new(
                EDGE_AVAILABLE,
                Status::False,
                "Progressing",
                format!(
                    "waiting for {} to become Available",
                    edge_waiting.join(", ")
                ),
            )
        });
    } else {
        reports.push(Report::new(
            CORE_AVAILABLE,
            Status::False,
            "Progressing",
            format!(
                "waiting for {} to become Available",
                core_waiting.join(", ")
            ),
        ));
        waiting_after(&mut reports, CORE_AVAILABLE);
    }
    let rolled_out = services::rolled_out(ctx, validated, &enabled);
    events.extend(waves::observe(ctx, stack, rolled_out));
    Outcome {
        reports,
        services: rollout.services,
        events,
        operator_version: rolled.then(|| ctx.settings.version.clone()),
        // A stack whose services are short of ready replicas is looked at again soon: what
        // they wait for may need the external stages redone (a Redis restart loses the
        // stack's ACL user, and the services stay unready until it is back). One waiting
        // for its turn in an upgrade wave is looked at again soon too.
        result: Ok(Action::requeue(if rolled {
            provision::next_look(ctx, stack, validated)
        } else {
            WAVE_POLL.min(ctx.settings.next_look())
        })),
    }
}

/// What failed while writing the services' objects: the error, the services' replicas as last
/// observed, and the Events so far.
type WriteFailure = (super::Error, BTreeMap<String, ServiceStatus>, Vec<Event>);

/// Writes the stack's objects: deletes those of disabled services, applies the endpoints
/// ConfigMap, the NetworkPolicy and the PodMonitor, then the services stage by stage.
/// Returns the rollout and `events` with what changed added: one `Applied` Event for
/// everything this pass applied (a new stack's first pass applies five kinds of objects).
async fn write_services(
    ctx: &Context,
    validated: &ValidatedStack,
    desired: &build::DesiredState,
    enabled: &BTreeSet<Component>,
    pod_monitor_api: Option<&kube::api::ApiResource>,
    mut events: Vec<Event>,
) -> Result<(services::Rollout, Vec<Event>), WriteFailure> {
    match services::delete_disabled(ctx, validated, enabled).await {
        Ok(deleted) if !deleted.is_empty() => events.push(event(
            EventType::Normal,
            "ServicesRemoved",
            "DeleteDisabled",
            format!(
                "deleted the objects of disabled services: {}",
                deleted.join(", ")
            ),
        )),
        Ok(_) => {}
        Err(error) => return Err((error.into(), BTreeMap::new(), events)),
    }
    // What this pass applied, for its one `Applied` Event.
    let mut applied: Vec<String> = Vec::new();
    let applied_event =
        |applied: &[String]| event(EventType::Normal, "Applied", "Apply", applied.join("; "));
    let endpoints = apply::apply(ctx, &ctx.stores.config_maps, desired.endpoints.clone()).await;
    match endpoints {
        Ok(true) => applied.push(format!(
            "applied ConfigMap {} (the stack's URLs for applications)",
            build::endpoints_name(validated.name())
        )),
        Ok(false) => {}
        Err(error) => {
            return Err((Error::ApplyEndpoints(error).into(), BTreeMap::new(), events));
        }
    }
    match network_policy(ctx, validated, desired).await {
        Ok(Some(message)) => applied.push(message),
        Ok(None) => {}
        Err(error) => {
            if !applied.is_empty() {
                events.push(applied_event(&applied));
            }
            return Err((error.into(), BTreeMap::new(), events));
        }
    }
    // Monitoring never holds the stack back: a failure is a Warning Event, tried again on the
    // next reconcile.
    match monitoring::reconcile(ctx, validated, desired, pod_monitor_api).await {
        Ok(monitoring::Outcome::Unchanged) => {}
        Ok(monitoring::Outcome::Applied) => applied.push(format!(
            "applied PodMonitor {} (Prometheus scrapes every service's /metrics)",
            build::pod_monitor_name(validated)
        )),
        Ok(monitoring::Outcome::Deleted) => events.push(event(
            EventType::Normal,
            "Deleted",
            "DeletePodMonitor",
            format!(
                "deleted PodMonitor {}: the pods carry scrape annotations instead",
                build::pod_monitor_name(validated)
            ),
        )),
        Err(error) => events.push(event(
            EventType::Warning,
            "PodMonitorFailed",
            "ApplyPodMonitor",
            error.message(),
        )),
    }
    let mut rollout = services::roll_out(ctx, validated, desired, enabled).await;
    if !rollout.applied.is_empty() {
        applied.push(format!(
            "applied the objects of {}",
            rollout.applied.join(", ")
        ));
    }
    if !applied.is_empty() {
        events.push(applied_event(&applied));
    }
    if let Err(error) = std::mem::replace(&mut rollout.result, Ok(())) {
        return Err((error.into(), rollout.services, events));
    }
    Ok((rollout, events))
}

/// What stages 1 to 3 did.
struct External {
    /// The reports of the stages that ran, in order.
    reports: Vec<Report>,
    /// Events about what they changed.
    events: Vec<Event>,
    /// How they ended.
    end: End,
}

/// How stages 1 to 3 ended.
enum End {
    /// All three succeeded: the fingerprint of the connection Secrets' contents.
    Provisioned(String),
    /// One failed.
    Failed(super::Error),
    /// The topics ask for changes Kafka cannot make (the last report says which).
    Unsupported,
}

/// Stages 1 to 3 (the external state): dependencies, topics, credentials.
/// Applies the stack's NetworkPolicy, or deletes it when it is turned off. Returns the Event
/// message when something changed.
async fn network_policy(
    ctx: &Context,
    validated: &ValidatedStack,
    desired: &build::DesiredState,
) -> Result<Option<String>, Error> {
    let name = build::network_policy_name(validated.name());
    let stores = &ctx.stores;
    match &desired.network_policy {
        Some(policy) => {
            let applied = apply::apply(ctx, &stores.network_policies, policy.clone())
                .await
                .map_err(Error::ApplyNetworkPolicy)?;
            Ok(applied.then(|| {
                format!(
                    "applied NetworkPolicy {name} (the command service, processor and cache \
                     updater take traffic only from the gateway and metrics scrapers)"
                )
            }))
        }
        None => {
            let deleted = services::delete_owned(ctx, &stores.network_policies, validated, &name)
                .await
                .map_err(Error::DeleteNetworkPolicy)?;
            Ok(deleted
                .then(|| format!("deleted NetworkPolicy {name} (networkPolicy.enabled is false)")))
        }
    }
}

async fn external(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
    refs: &dereference::Dereferenced,
) -> External {
    let mut reports = Vec::new();
    let mut events = Vec::new();
    let dependencies = dereference::dependencies(ctx, validated, refs);
    let clients = match timed("dependencies", dependencies).await {
        Ok(clients) => clients,
        Err(error) => {
            let end = End::Failed(error.into());
            return External {
                reports,
                events,
                end,
            };
        }
    };
    reports.push(Report::new(
        DEPENDENCIES_READY,
        Status::True,
        "Reachable",
        "Kafka, Redis and PostgreSQL answer with the admin credentials",
    ));
    let end = match timed("topics", provision::topics(ctx, validated, &clients)).await {
        Ok(Topics::Reconciled {
            report,
            events: changed,
        }) => {
            reports.push(report);
            events.extend(changed);
            None
        }
        Ok(Topics::Unsupported(report)) => {
            reports.push(report);
            Some(End::Unsupported)
        }
        Err(error) => Some(End::Failed(error.into())),
    };
    let end = match end {
        Some(end) => end,
        None => {
            let credentials = provision::credentials(ctx, stack, validated, &clients);
            match timed("credentials", credentials).await {
                Ok(credentials) => {
                    reports.push(credentials.report);
                    events.extend(credentials.events);
                    End::Provisioned(credentials.hash)
                }
                Err(error) => End::Failed(error.into()),
            }
        }
    };
    External {
        reports,
        events,
        end,
    }
}
