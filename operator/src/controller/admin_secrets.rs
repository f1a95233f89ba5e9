//! The admin Secrets' finalizer: an admin credentials Secret (Redis, PostgreSQL, Kafka) a
//! stack refers to carries `meridian.dev/admin-credentials` until no stack that may still need
//! it for its cleanup is left.
//!
//! Deleting a namespace deletes its stacks and its Secrets at once. Without the finalizer the
//! admin Secrets often go first, and a stack's cleanup has only the credentials this process
//! remembers, none after an operator restart; the stack's Redis user, PostgreSQL roles and
//! database would be left behind. With it, the Secrets stay (Terminating, still readable)
//! until the last stack using them is cleaned up, then go with the namespace.
//!
//! The finalizer is added when a reconcile has read the Secret, and removed (a patch that
//! carries the resourceVersion, so a concurrent change fails it instead of being overwritten)
//! once no stack in the namespace refers to the Secret: after a cleanup, and by every
//! reconcile for Secrets a stack stopped referring to.
use std::collections::HashSet;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::{Context, dereference};
use crate::crd::MiddlewareStack;

/// The finalizer on admin Secrets.
pub const FINALIZER: &str = "meridian.dev/admin-credentials";

/// The admin Secrets `stack` refers to (not its JWT Secret: a cleanup does not need it).
pub(super) fn names(stack: &MiddlewareStack) -> Vec<&str> {
    let spec = &stack.spec;
    let mut names = vec![
        spec.redis.admin_secret_ref.name.as_str(),
        spec.postgres.admin_secret_ref.name.as_str(),
    ];
    names.extend(
        spec.kafka
            .admin_secret_ref
            .as_ref()
            .map(|r| r.name.as_str()),
    );
    names
}

/// Adds the finalizer to the admin Secrets of `stack` that lack it (read just before, so
/// cached in `referenced`). A Secret already being deleted is left alone.
///
/// # Errors
/// When the API server refuses the patch (it is retried with the reconcile).
pub(super) async fn hold(ctx: &Context, stack: &MiddlewareStack) -> Result<(), kube::Error> {
    let Some(namespace) = stack.namespace() else {
        return Ok(());
    };
    for name in names(stack) {
        let key = ObjectRef::<Secret>::new(name).within(&namespace);
        let Some(secret) = dereference::cached(ctx, &key) else {
            continue;
        };
        if secret.metadata.deletion_timestamp.is_some()
            || secret.finalizers().iter().any(|f| f == FINALIZER)
        {
            continue;
        }
        let mut finalizers = secret.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        match set(ctx, &namespace, name, secret.resource_version(), finalizers).await {
            Ok(()) => {
                tracing::info!(secret = %key, "Holding the admin Secret until the stacks using it are cleaned up.");
            }
            // Changed since it was read (by this operator's own patch, the watch not yet
            // caught up, or by someone else): the next reconcile reads it again.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Removes the finalizer from the admin Secrets in `namespace` no stack there refers to any
/// more, counting a stack whose cleanup finished ([`cleaned`]) as gone although the watch
/// may not have said so yet.
pub(super) async fn release_unreferenced(ctx: &Context, namespace: &str) {
    // Every reconcile runs this: it reads the stores in place, copying no names.
    let stacks = ctx.stacks.state();
    let referenced: HashSet<&str> = {
        let mut cleaned = ctx.cleaned.lock().unwrap_or_else(|p| p.into_inner());
        // A cleaned stack the store no longer has needs no remembering.
        if !cleaned.is_empty() {
            let present: HashSet<&str> = stacks
                .iter()
                .filter_map(|s| s.metadata.uid.as_deref())
                .collect();
            cleaned.retain(|uid| present.contains(uid.as_str()));
        }
        stacks
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
            .filter(|s| {
                s.metadata
                    .uid
                    .as_ref()
                    .is_none_or(|uid| !cleaned.contains(uid))
            })
            .flat_map(|s| names(s))
            .collect()
    };
    let held: Vec<_> = ctx
        .secret_versions
        .state()
        .into_iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
        .filter(|s| s.finalizers().iter().any(|f| f == FINALIZER))
        .filter(|s| !referenced.contains(s.metadata.name.as_deref().unwrap_or_default()))
        .collect();
    for secret in held {
        let name = secret.name_any();
        let finalizers = secret
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        match set(ctx, namespace, &name, secret.resource_version(), finalizers).await {
            Ok(()) => {
                tracing::info!(secret = %name, %namespace, "Released the admin Secret: no stack uses it.")
            }
            // Changed since the watch saw it, or gone: the next reconcile looks again.
            Err(error) => {
                tracing::debug!(secret = %name, %namespace, %error, "Failed to release the admin Secret.")
            }
        }
    }
}

/// Records that `stack`'s cleanup finished, for [`release_unreferenced`].
pub(super) fn cleaned(ctx: &Context, stack: &MiddlewareStack) {
    if let Some(uid) = stack.uid() {
        ctx.cleaned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid);
    }
}

/// Sets the Secret's finalizers, provided its resourceVersion is still `version` (the API
/// server refuses the patch with 409 Conflict otherwise).
async fn set(
    ctx: &Context,
    namespace: &str,
    name: &str,
    version: Option<String>,
    finalizers: Vec<String>,
) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({ "metadata": { "resourceVersion": version, "finalizers": finalizers } });
    secrets
        .patch_metadata(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
