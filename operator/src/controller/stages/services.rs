//! The service stages (4 to 6): the core services, the WebSocket hub and the API gateway,
//! each service's objects written once gating lets its stage proceed, and the objects of
//! disabled services deleted.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use serde::de::DeserializeOwned;

use super::Error;
use crate::build::{self, Component, DesiredState, ServiceObjects, Tier};
use crate::controller::{Context, apply, timed};
use crate::crd::ServiceStatus;
use crate::gating::{self, Decision, Observed, Step};
use crate::owned::{Compact, Owned};
use crate::validate::ValidatedStack;

/// What the service stages did.
pub(super) struct Rollout {
    /// The health the last observation saw.
    pub(super) observed: Observed,
    /// Each service's replicas, as last observed.
    pub(super) services: BTreeMap<String, ServiceStatus>,
    /// The services whose objects were applied.
    pub(super) applied: Vec<&'static str>,
    /// Whether writing a service's objects failed.
    pub(super) result: Result<(), Error>,
}

/// Stages 4 to 6: writes the services' objects in the order gating allows — the core
/// services, then the WebSocket hub, then the API gateway, each once every earlier stage is
/// Available.
pub(super) async fn roll_out(
    ctx: &Context,
    validated: &ValidatedStack,
    desired: &DesiredState,
    enabled: &BTreeSet<Component>,
) -> Rollout {
    let (mut observed, mut services) = observe(ctx, validated, enabled);
    let mut applied = Vec::new();
    for step in [Step::Core, Step::WsHub, Step::Gateway] {
        let plan = gating::plan(enabled, &observed, false);
        let decision = plan
            .iter()
            .find(|(s, _)| *s == step)
            .map_or(Decision::Proceed, |(_, d)| *d);
        if decision != Decision::Proceed {
            break;
        }
        for objects in desired.services.iter().filter(|o| match step {
            Step::Core => o.component.tier() == Tier::Core,
            Step::WsHub => o.component == Component::WsHub,
            _ => o.component == Component::Gateway,
        }) {
            match timed("apply", write_service(ctx, validated, objects)).await {
                Ok(true) => applied.push(objects.component.name()),
                Ok(false) => {}
                Err(error) => {
                    return Rollout {
                        observed,
                        services,
                        applied,
                        result: Err(error),
                    };
                }
            }
        }
        let (now, replicas) = observe(ctx, validated, enabled);
        observed = now;
        services.extend(replicas);
    }
    Rollout {
        observed,
        services,
        applied,
        result: Ok(()),
    }
}

/// The services as they are, nothing written: a stack that waits for its turn in an upgrade
/// wave.
pub(super) fn observed(
    ctx: &Context,
    validated: &ValidatedStack,
    enabled: &BTreeSet<Component>,
) -> Rollout {
    let (observed, services) = observe(ctx, validated, enabled);
    Rollout {
        observed,
        services,
        applied: Vec::new(),
        result: Ok(()),
    }
}

/// Whether every enabled service's Deployment has finished rolling out
/// ([`crate::owned::Rollout::rolled_out`]) the spec this process last applied to it.
pub(super) fn rolled_out(
    ctx: &Context,
    validated: &ValidatedStack,
    enabled: &BTreeSet<Component>,
) -> bool {
    let namespace = validated.namespace();
    enabled.iter().all(|component| {
        let name = build::object_name(validated, *component);
        let key = apply::object_key::<Deployment>(namespace, &name);
        ctx.stores
            .deployments
            .get(&ObjectRef::new(&name).within(namespace))
            .is_some_and(|d| d.rolled_out() && !apply::store_behind(ctx, &key, &d.version()))
    })
}

/// Which enabled services' Deployments are Available (the external stages succeeded to get
/// here), and the replicas of those in the store.
fn observe(
    ctx: &Context,
    validated: &ValidatedStack,
    enabled: &BTreeSet<Component>,
) -> (Observed, BTreeMap<String, ServiceStatus>) {
    let mut services = BTreeMap::new();
    let mut observed = Observed {
        dependencies_reachable: true,
        topics_reconciled: true,
        credentials_provisioned: true,
        available: BTreeSet::new(),
    };
    for component in enabled {
        let name = build::object_name(validated, *component);
        let deployment = ctx
            .stores
            .deployments
            .get(&ObjectRef::new(&name).within(validated.namespace()));
        if let Some(deployment) = deployment {
            if available(ctx, &deployment) {
                observed.available.insert(*component);
            }
            services.insert(
                component.name().to_owned(),
                ServiceStatus {
                    replicas: deployment.state.replicas,
                    ready_replicas: deployment.state.ready_replicas,
                },
            );
        }
    }
    (observed, services)
}

/// Whether the Deployment is Available ([`Owned::available`]), or only scaled since it last
/// was: its pod template is the one it was Available with and a pod of it is ready. A scale
/// (the operator's lag decision, an autoscaler's) is a new generation the controller-manager
/// observes moments later, and a scale-up makes the Deployment's own `Available` condition
/// false until most new pods are ready; neither means the service cannot serve, and reading
/// them as a rollout would flip the stack's Ready on every scaling decision.
fn available(ctx: &Context, deployment: &Owned<Deployment>) -> bool {
    let key = apply::object_key::<Deployment>(
        deployment.namespace.as_deref().unwrap_or_default(),
        &deployment.name,
    );
    let mut templates = ctx
        .available_templates
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if deployment.available() {
        templates.insert(key, deployment.state.template);
        return true;
    }
    deployment.state.ready_replicas > 0 && templates.get(&key) == Some(&deployment.state.template)
}

/// Writes one service's objects: applies its ConfigMap, its Service (deleted first when it
/// cannot be applied over), its Deployment, and its PodDisruptionBudget or deletes the one it
/// no longer needs. Returns whether anything was written.
async fn write_service(
    ctx: &Context,
    validated: &ValidatedStack,
    objects: &ServiceObjects,
) -> Result<bool, Error> {
    let component = objects.component;
    let applied = |source| Error::Apply { component, source };
    let stale = |kind| {
        move |source| Error::DeleteStale {
            component,
            kind,
            source,
        }
    };
    let stores = &ctx.stores;
    let mut changed = apply::apply(ctx, &stores.config_maps, objects.config_map.clone())
        .await
        .map_err(applied)?;
    changed |= recreate_service_if_needed(ctx, validated, &objects.service)
        .await
        .map_err(stale("Service"))?;
    changed |= apply::apply(ctx, &stores.services, objects.service.clone())
        .await
        .map_err(applied)?;
    let replicas_left_out = objects
        .deployment
        .spec
        .as_ref()
        .is_some_and(|s| s.replicas.is_none());
    if replicas_left_out {
        hand_replicas_over(ctx, validated, objects)
            .await
            .map_err(applied)?;
    }
    changed |= apply::apply(ctx, &stores.deployments, objects.deployment.clone())
        .await
        .map_err(applied)?;
    match &objects.autoscaler {
        Some(autoscaler) => {
            changed |= apply::apply(ctx, &stores.autoscalers, autoscaler.clone())
                .await
                .map_err(applied)?;
        }
        None => {
            let name = build::object_name(validated, component);
            changed |= delete_owned(ctx, &stores.autoscalers, validated, &name)
                .await
                .map_err(stale("HorizontalPodAutoscaler"))?;
        }
    }
    match &objects.pod_disruption_budget {
        Some(pdb) => {
            changed |= apply::apply(ctx, &stores.pdbs, pdb.clone())
                .await
                .map_err(applied)?;
        }
        None => {
            let name = build::object_name(validated, component);
            changed |= delete_owned(ctx, &stores.pdbs, validated, &name)
                .await
                .map_err(stale("PodDisruptionBudget"))?;
        }
    }
    Ok(changed)
}

/// The field manager that keeps a Deployment's replica count while an autoscaler takes it over.
const REPLICAS_HANDOVER: &str = "meridian-operator-replicas-handover";

/// Before the operator applies a Deployment without `replicas` (its service now scales
/// automatically, or a HorizontalPodAutoscaler of the user's targets it) while it still owns
/// that field, another field manager applies the current
/// count: when the operator drops a field it alone owned, the API server removes it and the
/// Deployment would fall back to one replica until the autoscaler scaled it up again. With a
/// co-owner the count stays; the autoscaler's scale updates take the field over from there.
/// Once the operator no longer owns the field nothing is written here, so a count the
/// autoscaler set is never overwritten.
async fn hand_replicas_over(
    ctx: &Context,
    validated: &ValidatedStack,
    objects: &ServiceObjects,
) -> Result<(), apply::Error> {
    let name = build::object_name(validated, objects.component);
    let Some(existing) = ctx
        .stores
        .deployments
        .get(&ObjectRef::new(&name).within(validated.namespace()))
    else {
        return Ok(());
    };
    if !existing.state.operator_owns_replicas {
        return Ok(());
    }
    let key = apply::describe::<Deployment>(validated.namespace(), &name);
    let handover = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "namespace": validated.namespace() },
        "spec": { "replicas": existing.state.desired },
    });
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), validated.namespace());
    api.patch(
        &name,
        &PatchParams::apply(REPLICAS_HANDOVER),
        &Patch::Apply(&handover),
    )
    .await
    .map_err(|source| apply::Error::Patch { key, source })?;
    Ok(())
}

/// Deletes the stack's Service named like `desired` when `desired` cannot be applied over it
/// ([`build::service_needs_recreate`]); the apply that follows creates it anew. The Services
/// concerned are the headless ones, which carry no client traffic.
async fn recreate_service_if_needed(
    ctx: &Context,
    validated: &ValidatedStack,
    desired: &Service,
) -> Result<bool, kube::Error> {
    let name = desired.name_any();
    let Some(existing) = ctx
        .stores
        .services
        .get(&ObjectRef::new(&name).within(validated.namespace()))
    else {
        return Ok(false);
    };
    if !build::service_needs_recreate(existing.state.as_deref(), desired) {
        return Ok(false);
    }
    let deleted = delete_owned(ctx, &ctx.stores.services, validated, &name).await?;
    if deleted {
        tracing::info!(service = %name, "Recreating a Service whose clusterIP cannot change in place.");
    }
    Ok(deleted)
}

/// Deletes every object of the services that are disabled. Returns the services that had
/// objects.
pub(super) async fn delete_disabled(
    ctx: &Context,
    validated: &ValidatedStack,
    enabled: &BTreeSet<Component>,
) -> Result<Vec<&'static str>, Error> {
    let mut deleted = Vec::new();
    for component in Component::ALL.into_iter().filter(|c| !enabled.contains(c)) {
        let name = build::object_name(validated, component);
        let stores = &ctx.stores;
        let any = async {
            let mut any = delete_owned(ctx, &stores.deployments, validated, &name).await?;
            any |= delete_owned(ctx, &stores.services, validated, &name).await?;
            any |= delete_owned(ctx, &stores.config_maps, validated, &name).await?;
            any |= delete_owned(ctx, &stores.pdbs, validated, &name).await?;
            any |= delete_owned(ctx, &stores.autoscalers, validated, &name).await?;
            Ok(any)
        };
        if any
            .await
            .map_err(|source| Error::DeleteDisabled { component, source })?
        {
            deleted.push(component.name());
        }
    }
    Ok(deleted)
}

/// Deletes the named object if the store holds it and the stack owns it. Returns whether it
/// was deleted.
pub(in crate::controller) async fn delete_owned<K>(
    ctx: &Context,
    store: &Store<Owned<K>>,
    validated: &ValidatedStack,
    name: &str,
) -> Result<bool, kube::Error>
where
    K: Compact<Scope = k8s_openapi::NamespaceResourceScope> + DeserializeOwned + Debug,
{
    let Some(existing) = store.get(&ObjectRef::new(name).within(validated.namespace())) else {
        return Ok(false);
    };
    if !existing.owned_by(&validated.owner().uid) || existing.deleting {
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
    let api: Api<K> = Api::namespaced(ctx.client.clone(), validated.namespace());
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        // Gone already, or replaced by a newer object (the precondition failed).
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
