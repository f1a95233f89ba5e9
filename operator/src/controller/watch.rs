//! The *watch* step: the [`Controller`] on `MiddlewareStack`, the watches of the objects the
//! operator owns (feeding the reflector stores reconciles read) and of the Secrets stacks refer
//! to, and which of their events reconcile which stack.
use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;

use super::{APPLIED_HASH_ANNOTATION, MANAGED_SELECTOR, Settings, dereference};
use crate::build::Component;
use crate::crd::MiddlewareStack;
use crate::owned::{self, Compact, Owned};

/// The objects per page of a watch's initial list. With kube-runtime's default of 500, an
/// operator starting on 1,000 stacks held a page of 500 full objects (a Deployment is ~6 KiB
/// of JSON, more once parsed) per watch, nine watches at once: its RSS peaked at 106–114 MiB
/// (the chart's limit is 128 MiB). With 100 it peaks at 62–63 MiB; 50 saved 4 MiB more for
/// twice the list requests.
const LIST_PAGE_SIZE: u32 = 100;

/// The reflector stores of the objects the operator owns.
#[derive(Clone)]
pub(super) struct Stores {
    pub(super) deployments: Store<Owned<Deployment>>,
    pub(super) services: Store<Owned<Service>>,
    pub(super) config_maps: Store<Owned<ConfigMap>>,
    pub(super) pdbs: Store<Owned<PodDisruptionBudget>>,
    pub(super) autoscalers: Store<Owned<HorizontalPodAutoscaler>>,
    pub(super) network_policies: Store<Owned<NetworkPolicy>>,
    pub(super) secrets: Store<Owned<Secret>>,
    /// The HorizontalPodAutoscalers the operator does not own, reduced to their identity and
    /// scale target ([`scale_target_only`]): a service's Deployment one of them targets
    /// leaves its replica count to it.
    pub(super) foreign_autoscalers: Store<HorizontalPodAutoscaler>,
}

impl Stores {
    /// Whether every store has received its watch's initial list.
    pub(super) async fn synced(&self) -> bool {
        self.deployments.wait_until_ready().await.is_ok()
            && self.services.wait_until_ready().await.is_ok()
            && self.config_maps.wait_until_ready().await.is_ok()
            && self.pdbs.wait_until_ready().await.is_ok()
            && self.autoscalers.wait_until_ready().await.is_ok()
            && self.network_policies.wait_until_ready().await.is_ok()
            && self.secrets.wait_until_ready().await.is_ok()
            && self.foreign_autoscalers.wait_until_ready().await.is_ok()
    }
}

/// The controller, its triggers wired, and the stores its watches fill.
pub(super) struct Watches {
    /// The controller on `MiddlewareStack`, owning the objects in [`Stores`] and watching the
    /// Secrets stacks refer to.
    pub(super) controller: Controller<MiddlewareStack>,
    /// The objects the operator owns.
    pub(super) stores: Stores,
    /// Every Secret's metadata in the watch scope (the referenced-Secrets watch).
    pub(super) secret_versions: Store<PartialObjectMeta<Secret>>,
    /// The stacks (stripped), the controller's own store.
    pub(super) stacks: Store<MiddlewareStack>,
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

/// The watches of the stacks (in `settings.namespace`, or the whole cluster), of the objects
/// they own and of the Secrets they refer to, wired into one [`Controller`].
pub(super) fn watches(client: &Client, settings: &Settings) -> Watches {
    let ns = settings.namespace.as_deref();
    let list = watcher::Config::default().page_size(LIST_PAGE_SIZE);
    let managed = list.clone().labels(MANAGED_SELECTOR);
    let unmanaged = list
        .clone()
        .labels(&MANAGED_SELECTOR.replacen('=', "!=", 1));

    let (deployments, deployments_writer) = reflector::store();
    let (services, services_writer) = reflector::store();
    let (config_maps, config_maps_writer) = reflector::store();
    let (pdbs, pdbs_writer) = reflector::store();
    let (autoscalers, autoscalers_writer) = reflector::store();
    let (network_policies, network_policies_writer) = reflector::store();
    let (secrets, secrets_writer) = reflector::store();
    let (foreign_autoscalers, foreign_autoscalers_writer) = reflector::store();
    let stores = Stores {
        deployments,
        services,
        config_maps,
        pdbs,
        autoscalers,
        network_policies,
        secrets,
        foreign_autoscalers,
    };
    // The stores hold compact copies (`crate::owned`); the full objects go on to the
    // controller's owner triggers and are dropped there.
    let owned_deployments =
        deployment_triggers(owned_events(client, ns, &managed, deployments_writer));
    let owned_services = owned_events(client, ns, &managed, services_writer).touched_objects();
    let owned_config_maps =
        owned_events(client, ns, &managed, config_maps_writer).touched_objects();
    let owned_pdbs = owned_events(client, ns, &managed, pdbs_writer).touched_objects();
    // An autoscaler's status changes every sync period: only its spec or its deletion matter.
    let owned_autoscalers =
        generation_triggers(owned_events(client, ns, &managed, autoscalers_writer));
    let owned_network_policies =
        generation_triggers(owned_events(client, ns, &managed, network_policies_writer));
    let owned_secrets = owned_events(client, ns, &managed, secrets_writer).touched_objects();
    // The identity and resourceVersion of every Secret the operator did not create (never
    // their data): a change to an admin or JWT Secret a stack refers to reconciles that
    // stack. The stacks' own connection Secrets (two per stack) are in `owned_secrets`.
    let (secret_versions, secret_versions_writer) = reflector::store();
    let referenced_secrets = watcher(
        scoped::<PartialObjectMeta<Secret>>(client, ns),
        unmanaged.clone(),
    )
    .default_backoff()
    .modify(identity_only)
    .reflect(secret_versions_writer)
    .touched_objects();

    // Every other autoscaler: one that starts or stops targeting a stack's Deployment
    // reconciles that stack, so the operator lets go of (or takes back) its replica count.
    let foreign_autoscalers = watcher(
        scoped::<HorizontalPodAutoscaler>(client, ns),
        unmanaged.clone(),
    )
    .default_backoff()
    .modify(scale_target_only)
    .reflect(foreign_autoscalers_writer)
    .touched_objects();

    // The stacks' own watch and store, stripped like the owned objects': a stack's managed
    // fields (every field of its spec and status, per field manager) can be most of its size.
    let (stacks, stacks_writer) = reflector::store();
    let stack_changes = watcher(scoped::<MiddlewareStack>(client, ns), list)
        .default_backoff()
        .modify(strip)
        .reflect(stacks_writer)
        .applied_objects();
    let autoscaled_stacks = stacks.clone();
    let referencing_stacks = stacks.clone();
    let controller = Controller::for_stream(stack_changes, stacks.clone())
        .with_config(
            ControllerConfig::default()
                .concurrency(settings.concurrency)
                .debounce(Duration::from_millis(100)),
        )
        .owns_stream(owned_deployments)
        .owns_stream(owned_services)
        .owns_stream(owned_config_maps)
        .owns_stream(owned_pdbs)
        .owns_stream(owned_autoscalers)
        .owns_stream(owned_network_policies)
        .owns_stream(owned_secrets)
        .watches_stream(referenced_secrets, move |secret| {
            let (Some(namespace), name) = (secret.namespace(), secret.name_any()) else {
                return Vec::new();
            };
            stacks
                .state()
                .into_iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
                .filter(|s| dereference::refers_to(s, &name))
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        })
        .watches_stream(foreign_autoscalers, move |autoscaler| {
            let namespace = autoscaler.namespace();
            let Some(target) = autoscaler.spec.map(|s| s.scale_target_ref.name) else {
                return Vec::new();
            };
            // A stack's Deployments are named `<stack>-<service>`.
            autoscaled_stacks
                .state()
                .into_iter()
                .filter(|s| s.metadata.namespace == namespace)
                .filter(|s| {
                    target
                        .strip_prefix(s.metadata.name.as_deref().unwrap_or_default())
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|service| Component::ALL.iter().any(|c| c.name() == service))
                })
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        });
    Watches {
        controller,
        stores,
        secret_versions,
        stacks: referencing_stacks,
    }
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

/// Keeps only an autoscaler's identity and scale target: what the foreign-autoscalers store
/// is read for.
fn scale_target_only(autoscaler: &mut HorizontalPodAutoscaler) {
    autoscaler.metadata = identity(std::mem::take(&mut autoscaler.metadata));
    autoscaler.status = None;
    if let Some(spec) = &mut autoscaler.spec {
        spec.metrics = None;
        spec.behavior = None;
    }
}

/// Keeps only what the referenced-Secrets store is read for: name, namespace, uid,
/// resourceVersion, and whether it is held or deleted (finalizers, deletion timestamp; see
/// `admin_secrets`). Labels, annotations and owner references can be most of a Secret's
/// metadata.
fn identity_only(secret: &mut PartialObjectMeta<Secret>) {
    let meta = std::mem::take(&mut secret.metadata);
    let (finalizers, deletion_timestamp) =
        (meta.finalizers.clone(), meta.deletion_timestamp.clone());
    secret.metadata = ObjectMeta {
        finalizers,
        deletion_timestamp,
        ..identity(meta)
    };
}

/// An object's name, namespace, uid and resourceVersion, nothing else.
fn identity(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
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

/// Passes on an owned object's events only when its generation (its spec) changed or it was
/// deleted.
fn generation_triggers<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let mut seen: HashMap<ObjectRef<K>, Option<i64>> = HashMap::new();
    events.filter_map(move |event| {
        let trigger = match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let generation = object.meta().generation;
                let previous = seen.insert(ObjectRef::from_obj(&object), generation);
                (previous != Some(generation)).then_some(Ok(object))
            }
            Ok(watcher::Event::Delete(object)) => {
                seen.remove(&ObjectRef::from_obj(&object));
                Some(Ok(object))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(error) => Some(Err(error)),
        };
        std::future::ready(trigger)
    })
}

#[cfg(test)]
mod tests;
