//! The read-model rebuild Job (`kubectl meridian rebuild-read-model`): the cache updater's pod
//! run once as `cache-updater rebuild`, which replays the `events` topic into an emptied read
//! model and exits with a summary (see the README's "Read model rebuild").

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource as _, ResourceExt as _};

use crate::crd::MiddlewareStack;

/// `app.kubernetes.io/name` of a rebuild Job and its pod: not the cache updater's, so neither
/// its Deployment, its Service nor its PodDisruptionBudget selects the Job's pod.
pub const REBUILD_NAME: &str = "read-model-rebuild";
/// How long a finished rebuild Job (and its pod's logs) stays before the API server deletes it.
pub const REBUILD_TTL_SECONDS: i32 = 86_400;

/// Why the cache updater's Deployment cannot be turned into a rebuild Job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The Deployment has no pod template with a container.
    #[error("Deployment {0} has no container to run the rebuild with")]
    NoContainer(String),
}

/// The Job `<stack>-rebuild-<suffix>` running the cache updater's container (same image,
/// environment, Secrets, security context) with the argument `rebuild`: no probes and no
/// ports (the rebuild serves nothing), never restarted (a failed rebuild is reported, and run
/// again by hand), owned by the stack, deleted a day after it finished.
pub fn rebuild_job(
    stack: &MiddlewareStack,
    cache_updater: &Deployment,
    suffix: &str,
) -> Result<Job, JobError> {
    let deployment = cache_updater.name_any();
    let mut template = cache_updater
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
    container.args = Some(vec!["rebuild".to_owned()]);
    container.liveness_probe = None;
    container.readiness_probe = None;
    container.startup_probe = None;
    container.ports = None;
    pod.restart_policy = Some("Never".to_owned());
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert("app.kubernetes.io/name".to_owned(), REBUILD_NAME.to_owned());
    // Not scraped: it serves no metrics.
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| !key.starts_with("prometheus.io/"));
    }
    let labels = labels.clone();
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(format!("{}-rebuild-{suffix}", stack.name_any())),
            namespace: cache_updater.namespace(),
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
