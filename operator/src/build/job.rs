//! One-off maintenance Jobs run from a service's pod: the read-model rebuild (`kubectl meridian
//! rebuild-read-model`: the cache updater run once as `cache-updater rebuild`, which replays the
//! `events` topic into an emptied read model) and the dead-letter replay (`kubectl meridian dlq
//! replay`: the processor run once as `processor replay-dlq --max N`, which sends dead-lettered
//! commands through again). Each exits with a summary (see the README's "Day-2 commands").

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource as _, ResourceExt as _};

use crate::crd::MiddlewareStack;

/// `app.kubernetes.io/name` of a rebuild Job and its pod: not the cache updater's, so neither
/// its Deployment, its Service nor its PodDisruptionBudget selects the Job's pod.
pub const REBUILD_NAME: &str = "read-model-rebuild";
/// `app.kubernetes.io/name` of a dead-letter replay Job and its pod.
pub const REPLAY_NAME: &str = "dead-letter-replay";
/// How long a finished maintenance Job (and its pod's logs) stays before the API server
/// deletes it.
pub const REBUILD_TTL_SECONDS: i32 = 86_400;

/// A maintenance task, run once from a service's pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `cache-updater rebuild`.
    RebuildReadModel,
    /// `processor replay-dlq --max <max>`.
    ReplayDeadLetters {
        /// The most commands one run replays.
        max: u64,
    },
}

impl Task {
    /// The service whose pod runs the task.
    pub fn service(self) -> crate::build::Component {
        match self {
            Self::RebuildReadModel => crate::build::Component::CacheUpdater,
            Self::ReplayDeadLetters { .. } => crate::build::Component::Processor,
        }
    }

    /// `app.kubernetes.io/name` of its Job and pod.
    pub fn label(self) -> &'static str {
        match self {
            Self::RebuildReadModel => REBUILD_NAME,
            Self::ReplayDeadLetters { .. } => REPLAY_NAME,
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            Self::RebuildReadModel => vec!["rebuild".to_owned()],
            Self::ReplayDeadLetters { max } => {
                vec!["replay-dlq".to_owned(), "--max".to_owned(), max.to_string()]
            }
        }
    }

    fn job_name(self, stack: &str, suffix: &str) -> String {
        match self {
            Self::RebuildReadModel => format!("{stack}-rebuild-{suffix}"),
            Self::ReplayDeadLetters { .. } => format!("{stack}-dlq-replay-{suffix}"),
        }
    }
}

/// Why a service's Deployment cannot be turned into a maintenance Job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The Deployment has no pod template with a container.
    #[error("Deployment {0} has no container to run the task with")]
    NoContainer(String),
}

/// The rebuild Job ([`task_job`] with [`Task::RebuildReadModel`]).
pub fn rebuild_job(
    stack: &MiddlewareStack,
    cache_updater: &Deployment,
    suffix: &str,
) -> Result<Job, JobError> {
    task_job(stack, cache_updater, Task::RebuildReadModel, suffix)
}

/// The Job `<stack>-<task>-<suffix>` running the service's container (same image,
/// environment, Secrets, security context) with the task's arguments: no probes and no ports
/// (the task serves nothing), never restarted (a failed task is reported, and run again by
/// hand), owned by the stack, deleted a day after it finished.
pub fn task_job(
    stack: &MiddlewareStack,
    service: &Deployment,
    task: Task,
    suffix: &str,
) -> Result<Job, JobError> {
    let deployment = service.name_any();
    let mut template = service
        .spec
        .as_ref()
        .map(|spec| spec.template.clone())
        .unwrap_or_default();
    let pod = template
        .spec
        .as_mut()
        .ok_or_else(|| JobError::NoContainer(deployment.clone()))?;
    let container = pod
        .containers
        .first_mut()
        .ok_or_else(|| JobError::NoContainer(deployment.clone()))?;
    container.args = Some(task.args());
    container.liveness_probe = None;
    container.readiness_probe = None;
    container.startup_probe = None;
    container.ports = None;
    pod.restart_policy = Some("Never".to_owned());
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert("app.kubernetes.io/name".to_owned(), task.label().to_owned());
    // Not scraped: it serves no metrics.
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| !key.starts_with("prometheus.io/"));
    }
    let labels = labels.clone();
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(task.job_name(&stack.name_any(), suffix)),
            namespace: service.namespace(),
            labels: Some(labels),
            owner_references: stack.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            template,
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(REBUILD_TTL_SECONDS),
            ..JobSpec::default()
        }),
        status: None,
    })
}
