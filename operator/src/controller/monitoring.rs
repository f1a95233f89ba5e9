//! The stack's PodMonitor: applied when the cluster has the prometheus-operator CRDs and the
//! stack wants one, deleted when it no longer does. PodMonitors are not watched (the kind may
//! not exist): an unchanged one is applied again every [`REAPPLY`], which also brings back one
//! deleted by hand.
use std::collections::HashMap;
use std::sync::{Mutex as SyncMutex, PoisonError};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use tokio::sync::Mutex;

use super::apply::Error;
use super::{APPLIED_HASH_ANNOTATION, Context, FIELD_MANAGER};
use crate::build::{self, DesiredState, Scraping};
use crate::validate::ValidatedStack;

/// How long the answer to "does the cluster have the PodMonitor CRD" is trusted.
const REDISCOVER: Duration = Duration::from_secs(60);
/// How often an unchanged PodMonitor is applied again.
const REAPPLY: Duration = Duration::from_secs(300);

/// What the operator knows about PodMonitors in this cluster.
#[derive(Default)]
pub(super) struct PodMonitors {
    /// When the API was last discovered, and whether it was there.
    discovered: Mutex<Option<(Instant, Option<ApiResource>)>>,
    /// Per PodMonitor: the fingerprint last applied (`None`: deleted or confirmed absent), and
    /// when.
    written: SyncMutex<HashMap<String, (Option<String>, Instant)>>,
}

impl PodMonitors {
    fn last(&self, key: &str) -> Option<(Option<String>, Instant)> {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn remember(&self, key: String, hash: Option<String>) {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (hash, Instant::now()));
    }
}

/// The PodMonitor API, if the cluster serves it (asked at most every [`REDISCOVER`]).
pub(super) async fn pod_monitor_api(ctx: &Context) -> Option<ApiResource> {
    let mut discovered = ctx.pod_monitors.discovered.lock().await;
    if let Some((at, resource)) = discovered.as_ref()
        && at.elapsed() < REDISCOVER
    {
        return resource.clone();
    }
    let resource = match kube::discovery::pinned_kind(&ctx.client, &build::pod_monitor_kind()).await
    {
        Ok((resource, _)) => Some(resource),
        Err(error) => {
            tracing::debug!(%error, "No PodMonitor API: the services carry scrape annotations.");
            None
        }
    };
    *discovered = Some((Instant::now(), resource.clone()));
    resource
}

/// What [`reconcile`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing changed.
    Unchanged,
    /// The PodMonitor was applied.
    Applied,
    /// The PodMonitor was deleted (the stack no longer wants one).
    Deleted,
}

/// Applies or deletes the stack's PodMonitor as `desired.scraping` says; `api` is the
/// PodMonitor API when the cluster has one.
pub(super) async fn reconcile(
    ctx: &Context,
    stack: &ValidatedStack,
    desired: &DesiredState,
    api: Option<&ApiResource>,
) -> Result<Outcome, Error> {
    let Some(resource) = api else {
        return Ok(Outcome::Unchanged);
    };
    let name = build::pod_monitor_name(stack);
    let key = format!(
        "monitoring.coreos.com/v1/PodMonitor/{}/{name}",
        stack.namespace()
    );
    let monitors: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), stack.namespace(), resource);
    let last = ctx.pod_monitors.last(&key);
    match desired.scraping {
        Scraping::PodMonitor => {
            let mut object = build::pod_monitor(stack);
            let serialized = serde_json::to_vec(&object).map_err(|source| Error::Serialize {
                key: key.clone(),
                source,
            })?;
            let hash = build::fingerprint([serialized.as_slice()]);
            if last.is_some_and(|(last, at)| {
                last.as_deref() == Some(hash.as_str()) && at.elapsed() < REAPPLY
            }) {
                return Ok(Outcome::Unchanged);
            }
            object
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
            monitors
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await
                .map_err(|source| Error::Patch {
                    key: key.clone(),
                    source,
                })?;
            ctx.pod_monitors.remember(key, Some(hash));
            Ok(Outcome::Applied)
        }
        Scraping::Annotations => {
            // Once per process per stack (and after each apply): delete one left from when the
            // stack wanted it; "not found" is the usual answer.
            if last.is_some_and(|(last, _)| last.is_none()) {
                return Ok(Outcome::Unchanged);
            }
            let deleted = match monitors.delete(&name, &DeleteParams::default()).await {
                Ok(_) => true,
                Err(kube::Error::Api(status)) if status.code == 404 => false,
                Err(source) => return Err(Error::Patch { key, source }),
            };
            ctx.pod_monitors.remember(key, None);
            Ok(if deleted {
                Outcome::Deleted
            } else {
                Outcome::Unchanged
            })
        }
    }
}
