//! The *status* step: the stack's conditions and phase, the status patch (only when it
//! changed), the Events (condition transitions first, then what the stages did) and the
//! per-stage gauges `operator_stacks{stage, status}`.
use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource as _, ResourceExt as _};

use super::Context;
use crate::crd::{MiddlewareStack, MiddlewareStackStatus, Phase, ServiceStatus};
use crate::status::{self as conditions, DEPENDENCIES_READY, READY, Report, STAGES, Status};
use crate::validate::ValidateError;
use common::metrics::OPERATOR_STACKS;

/// Why the status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed the status patch.
    #[error("failed to patch the status of MiddlewareStack {namespace}/{name}")]
    Patch {
        /// The stack's namespace.
        namespace: String,
        /// The stack's name.
        name: String,
        /// What the API server (or the connection to it) said.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Patch { .. } => "KubernetesApiError",
        }
    }
}

/// A stack's condition types and statuses.
pub(super) type StageStates = Vec<(String, String)>;

/// The reports of a stack whose spec is invalid: every stage `Unknown`, and `Ready=False`,
/// all with reason `InvalidSpec`; the first stage and `Ready` say what is wrong.
pub(super) fn invalid(error: &ValidateError) -> Vec<Report> {
    let mut reports = vec![Report::new(
        DEPENDENCIES_READY,
        Status::Unknown,
        "InvalidSpec",
        error.to_string(),
    )];
    waiting_after(&mut reports, DEPENDENCIES_READY);
    for report in &mut reports {
        report.reason = "InvalidSpec".to_owned();
    }
    reports.push(Report::new(
        READY,
        Status::False,
        "InvalidSpec",
        error.to_string(),
    ));
    reports
}

/// The reports of a paused stack: every stage keeps its status, and `Ready=False`, all with
/// reason `Paused`.
pub(super) fn paused(stack: &MiddlewareStack) -> Vec<Report> {
    const MESSAGE: &str = "spec.paused is true: the operator changes nothing";
    let mut reports: Vec<Report> = STAGES
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
            Report::new(t, status, "Paused", MESSAGE)
        })
        .collect();
    reports.push(Report::new(READY, Status::False, "Paused", MESSAGE));
    reports
}

/// The phase of a stack whose stages ran: `Ready`, `Failed` when Kafka refused the topics the
/// spec asks for, or `Degraded` when it was Ready for this very spec, else `Progressing` (a
/// spec change rolling out).
pub(super) fn phase(stack: &MiddlewareStack, reports: &[Report]) -> Phase {
    if reports
        .iter()
        .any(|r| r.reason == super::provision::INVALID_TOPIC_CONFIG)
    {
        return Phase::Failed;
    }
    let ready = reports
        .iter()
        .any(|r| r.type_ == READY && r.status == Status::True);
    let was_ready = stack.status.as_ref().is_some_and(|s| {
        matches!(s.phase, Some(Phase::Ready | Phase::Degraded))
            && s.observed_generation == stack.metadata.generation
    });
    if ready {
        Phase::Ready
    } else if was_ready {
        Phase::Degraded
    } else {
        Phase::Progressing
    }
}

/// Reports every stage not reported yet as waiting for `blocker`.
pub(super) fn waiting_after(reports: &mut Vec<Report>, blocker: &'static str) {
    for stage in STAGES {
        if !reports.iter().any(|r| r.type_ == stage) {
            reports.push(Report::new(
                stage,
                Status::Unknown,
                "Waiting",
                format!("waiting for {blocker}"),
            ));
        }
    }
}

/// An Event about the stack; `note` is cut to the API's limit.
pub(super) fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, 1000)),
        action: action.to_owned(),
        secondary: None,
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

/// Merges `reports` into the stack's conditions, updates the stage gauges, and patches the
/// status if it changed. Returns an Event per condition whose status changed in a way that is
/// news ([`Transition::is_news`]), in condition order.
pub(super) async fn write(
    stack: &MiddlewareStack,
    ctx: &Context,
    reports: &[Report],
    phase: Phase,
    services: BTreeMap<String, ServiceStatus>,
    operator_version: Option<String>,
) -> Result<Vec<Event>, Error> {
    let previous = stack.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let (conditions, transitions) = conditions::merge(
        &previous.conditions,
        reports,
        stack.metadata.generation,
        &now,
    );
    let status = MiddlewareStackStatus {
        observed_generation: stack.metadata.generation,
        phase: Some(phase),
        services_ready: MiddlewareStackStatus::count_ready(&services),
        // The services are rolled out only after the endpoints ConfigMap is applied.
        endpoints: (!services.is_empty()).then(|| crate::build::endpoints_name(&stack.name_any())),
        services,
        operator_version: operator_version.or_else(|| previous.operator_version.clone()),
        conditions,
    };
    let events = transitions
        .iter()
        .filter(|transition| transition.is_news())
        .map(|transition| {
            let to = &transition.to;
            let type_ = if to.status == "False" {
                EventType::Warning
            } else {
                EventType::Normal
            };
            event(
                type_,
                &format!("{}{}", to.type_, to.status),
                "Reconcile",
                format!(
                    "{} is {} ({}): {}",
                    to.type_, to.status, to.reason, to.message
                ),
            )
        })
        .collect();
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
        return Ok(events);
    }
    let namespace = stack.namespace().unwrap_or_default();
    let name = stack.name_any();
    let api: Api<MiddlewareStack> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map_err(|source| Error::Patch {
        namespace,
        name,
        source,
    })?;
    Ok(events)
}

/// Sets `operator_stacks{stage, status}` from every stack's condition statuses.
pub(super) fn record_stage_gauges(all: &HashMap<ObjectRef<MiddlewareStack>, StageStates>) {
    let mut counts: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for stage in STAGES.iter().chain([&READY]) {
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

/// Publishes Events about `stack`, `failing` when its reconcile (or cleanup) failed.
///
/// kube-runtime's [`Recorder`] keeps every Event it published for six minutes, so that a
/// repeat becomes a series (`count` + 1, one PATCH) instead of a new Event; one Recorder for
/// the whole operator would hold every stack's recent Events. Repeats happen while a stack
/// keeps failing (the same warning on every retry), so a failing stack keeps a Recorder of its
/// own until a reconcile succeeds; the Events of other reconciles (condition transitions and
/// applied changes, different each time) go through a Recorder that is dropped afterwards.
pub(super) async fn publish_events(
    stack: &MiddlewareStack,
    ctx: &Context,
    events: Vec<Event>,
    failing: bool,
) {
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
