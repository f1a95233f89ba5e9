//! The stack's PodMonitor: applied when the cluster has the prometheus-operator CRDs and the
//! stack wants one, deleted when it no longer does. PodMonitors are not watched (the kind may
//! not exist): an unchanged one is read again (its metadata only) every [`RECHECK`], and
//! applied again only if it is gone, carries another desired state's fingerprint, or its spec
//! changed since this process applied it (a new generation). A restarted operator reads each
//! stack's PodMonitor once and writes nothing for one as it left it.
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
/// How often an unchanged PodMonitor is read again.
const RECHECK: Duration = Duration::from_secs(300);

/// What the operator knows about PodMonitors in this cluster.
#[derive(Default)]
pub(super) struct PodMonitors {
    /// When the API was last discovered, and whether it was there.
    discovered: Mutex<Option<(Instant, Option<ApiResource>)>>,
    /// Per PodMonitor: what this process last wrote or saw of it.
    written: SyncMutex<HashMap<String, Seen>>,
}

/// What the operator last wrote or read of one PodMonitor.
#[derive(Clone, Debug)]
struct Seen {
    /// The fingerprint of the desired object (`None`: deleted or confirmed absent).
    hash: Option<String>,
    /// Its generation then (`None` when unknown: a read that showed no generation).
    generation: Option<i64>,
    /// When.
    at: Instant,
}

impl PodMonitors {
    fn last(&self, key: &str) -> Option<Seen> {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn remember(&self, key: String, hash: Option<String>, generation: Option<i64>) {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                key,
                Seen {
                    hash,
                    generation,
                    at: Instant::now(),
                },
            );
    }
}

/// Whether a PodMonitor read as `stored` (its applied-fingerprint annotation and generation)
/// still holds the desired object of fingerprint `hash`, given what this process last wrote
/// (`last`): the fingerprint matches, and its spec did not change since this process applied
/// it. With no record of its own (a restarted operator), the annotation is trusted, as for
/// every other object the operator owns.
fn still_applied(stored: (Option<&str>, Option<i64>), hash: &str, last: Option<&Seen>) -> bool {
    let (annotation, generation) = stored;
    annotation == Some(hash)
        && last
            .and_then(|seen| seen.generation)
            .is_none_or(|applied| generation == Some(applied))
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
            let known = last
                .as_ref()
                .filter(|seen| seen.hash.as_deref() == Some(hash.as_str()));
            if known.is_some_and(|seen| seen.at.elapsed() < RECHECK) {
                return Ok(Outcome::Unchanged);
            }
            // Not written by this process, or due for a check: read it before writing.
            if last.is_none() || known.is_some() {
                let stored =
                    monitors
                        .get_metadata_opt(&name)
                        .await
                        .map_err(|source| Error::Patch {
                            key: key.clone(),
                            source,
                        })?;
                if let Some(stored) = stored {
                    let annotation = stored
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
                        .map(String::as_str);
                    let generation = stored.metadata.generation;
                    if still_applied((annotation, generation), &hash, last.as_ref()) {
                        ctx.pod_monitors.remember(key, Some(hash), generation);
                        return Ok(Outcome::Unchanged);
                    }
                }
            }
            object
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
            let applied = monitors
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
            ctx.pod_monitors
                .remember(key, Some(hash), applied.metadata.generation);
            Ok(Outcome::Applied)
        }
        Scraping::Annotations => {
            // Once per process per stack (and after each apply): delete one left from when the
            // stack wanted it; "not found" is the usual answer.
            if last.is_some_and(|seen| seen.hash.is_none()) {
                return Ok(Outcome::Unchanged);
            }
            let deleted = match monitors.delete(&name, &DeleteParams::default()).await {
                Ok(_) => true,
                Err(kube::Error::Api(status)) if status.code == 404 => false,
                Err(source) => return Err(Error::Patch { key, source }),
            };
            ctx.pod_monitors.remember(key, None, None);
            Ok(if deleted {
                Outcome::Deleted
            } else {
                Outcome::Unchanged
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(generation: Option<i64>) -> Seen {
        Seen {
            hash: Some("h".to_owned()),
            generation,
            at: Instant::now(),
        }
    }

    #[test]
    fn a_pod_monitor_as_left_is_not_written_again() {
        assert!(still_applied((Some("h"), Some(1)), "h", None), "restarted");
        assert!(still_applied(
            (Some("h"), Some(3)),
            "h",
            Some(&seen(Some(3)))
        ));
        assert!(still_applied((Some("h"), Some(3)), "h", Some(&seen(None))));
    }

    #[test]
    fn a_changed_or_foreign_pod_monitor_is_applied_again() {
        assert!(
            !still_applied((Some("old"), Some(1)), "h", None),
            "other desired state"
        );
        assert!(
            !still_applied((None, Some(1)), "h", None),
            "not the operator's"
        );
        assert!(
            !still_applied((Some("h"), Some(4)), "h", Some(&seen(Some(3)))),
            "spec edited by hand"
        );
    }
}
