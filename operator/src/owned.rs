//! Compact copies of the objects the operator owns, as its reflector stores hold them.
//!
//! A reconcile reads little of an owned object: its identity, the applied-hash annotation,
//! its owners, whether it is being deleted, and per kind a few fields (a Deployment's rollout
//! and replica counts, a Service's `clusterIP`, a Secret's data and rotation token). [`Owned`]
//! keeps only that, because a `k8s-openapi` object holds every optional field inline even
//! when stripped.
//!
//! [`Owned<K>`] implements kube-runtime's [`Lookup`], so the maintained reflector [`Store`]
//! holds it; [`reflect`] feeds a store from a watch of the full objects and passes the
//! events on unchanged (the controller's owner triggers read them).
//!
//! [`Store`]: kube::runtime::reflector::Store
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use futures::{Stream, TryStreamExt as _};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::runtime::reflector::{Lookup, store::Writer};
use kube::runtime::watcher;

use crate::controller::{APPLIED_HASH_ANNOTATION, FIELD_MANAGER, ROTATED_ANNOTATION};

/// A kind the operator owns, and what of it a reconcile reads besides the metadata.
pub trait Compact: Resource<DynamicType = ()> + Clone + Send + Sync + 'static {
    /// The kind-specific part of [`Owned`].
    type State: Clone + Send + Sync + 'static;

    /// Extracts the kind-specific part.
    fn state(&self) -> Self::State;
}

/// What of an owned object the operator keeps (see the module docs).
#[derive(Clone)]
pub struct Owned<K: Compact> {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: Option<String>,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// `metadata.generation` (not every kind has one).
    pub generation: Option<i64>,
    /// The [`APPLIED_HASH_ANNOTATION`]: the fingerprint of the desired object last applied
    /// (`None` when absent or not a fingerprint: [`crate::build::parse_fingerprint`]).
    pub applied_hash: Option<u64>,
    /// The uids of the owner references.
    pub owner_uids: Vec<String>,
    /// Whether `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The kind-specific part.
    pub state: K::State,
    kind: PhantomData<fn() -> K>,
}

impl<K: Compact> Owned<K> {
    /// The compact copy of `object`.
    pub fn new(object: &K) -> Self {
        let meta = object.meta();
        Self {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            generation: meta.generation,
            applied_hash: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
                .and_then(|hash| crate::build::parse_fingerprint(hash)),
            owner_uids: meta
                .owner_references
                .iter()
                .flatten()
                .map(|o| o.uid.clone())
                .collect(),
            deleting: meta.deletion_timestamp.is_some(),
            state: object.state(),
            kind: PhantomData,
        }
    }

    /// Whether an owner reference names `uid`.
    pub fn owned_by(&self, uid: &str) -> bool {
        self.owner_uids.iter().any(|o| o == uid)
    }

    /// The object's version as the operator compares it ([`Version::of`]).
    pub fn version(&self) -> Version {
        Version::of(self.generation, self.resource_version.as_deref())
    }
}

/// An object's version as the operator compares it: its generation for kinds with one (it
/// changes only with the spec, so status updates do not count as changes), its
/// resourceVersion otherwise. Shown as `g<generation>` / `r<resourceVersion>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// `metadata.generation`.
    Generation(i64),
    /// `metadata.resourceVersion` (empty when unset).
    Resource(Box<str>),
}

impl Version {
    /// The generation when there is one, else the resourceVersion.
    pub fn of(generation: Option<i64>, resource_version: Option<&str>) -> Self {
        match generation {
            Some(generation) => Self::Generation(generation),
            None => Self::Resource(resource_version.unwrap_or_default().into()),
        }
    }

    /// Whether this version is older than `other`: generations compare as numbers;
    /// resourceVersions are opaque, so a different one counts as older (callers ask only
    /// while the store may lag behind an apply). Versions of different shapes are not
    /// ordered.
    pub fn older_than(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Generation(a), Self::Generation(b)) => a < b,
            (Self::Resource(a), Self::Resource(b)) => a != b,
            _ => false,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Generation(generation) => write!(f, "g{generation}"),
            Self::Resource(version) => write!(f, "r{version}"),
        }
    }
}

impl<K: Compact> Lookup for Owned<K> {
    type DynamicType = ();

    fn kind(dyntype: &()) -> Cow<'_, str> {
        K::kind(dyntype)
    }

    fn group(dyntype: &()) -> Cow<'_, str> {
        K::group(dyntype)
    }

    fn version(dyntype: &()) -> Cow<'_, str> {
        K::version(dyntype)
    }

    fn plural(dyntype: &()) -> Cow<'_, str> {
        K::plural(dyntype)
    }

    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }

    fn namespace(&self) -> Option<Cow<'_, str>> {
        self.namespace.as_deref().map(Cow::Borrowed)
    }

    fn resource_version(&self) -> Option<Cow<'_, str>> {
        self.resource_version.as_deref().map(Cow::Borrowed)
    }

    fn uid(&self) -> Option<Cow<'_, str>> {
        self.uid.as_deref().map(Cow::Borrowed)
    }
}

/// The same watch event, about the compact copy.
pub fn event<K: Compact>(event: &watcher::Event<K>) -> watcher::Event<Owned<K>> {
    match event {
        watcher::Event::Apply(object) => watcher::Event::Apply(Owned::new(object)),
        watcher::Event::Delete(object) => watcher::Event::Delete(Owned::new(object)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(Owned::new(object)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Feeds `writer`'s store with compact copies of what `events` delivers, and passes the
/// events on (like kube-runtime's `reflect`, which stores the full objects).
pub fn reflect<K, S>(
    events: S,
    mut writer: Writer<Owned<K>>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Compact,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    events.inspect_ok(move |e| writer.apply_watcher_event(&event(e)))
}

/// What of a Deployment's rollout a reconcile reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rollout {
    /// `spec.replicas` (1 when unset, the API default).
    pub desired: i32,
    /// `status.observedGeneration`, `None` without a status.
    pub observed_generation: Option<i64>,
    /// `status.replicas`.
    pub replicas: i32,
    /// `status.updatedReplicas`.
    pub updated_replicas: i32,
    /// `status.readyReplicas`.
    pub ready_replicas: i32,
    /// Whether the `Available` condition is `True`.
    pub available_condition: bool,
    /// Whether the Deployment has a status at all.
    pub has_status: bool,
    /// Whether the operator's field manager owns `spec.replicas` (it lets go when an
    /// autoscaler takes the count over).
    pub operator_owns_replicas: bool,
    /// A hash of `spec.template` (what the pods run): a new generation with the same template
    /// is a scale, not a rollout.
    pub template: u64,
}

impl Compact for Deployment {
    type State = Rollout;

    fn state(&self) -> Rollout {
        let status = self.status.as_ref();
        Rollout {
            desired: self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            observed_generation: status.and_then(|s| s.observed_generation),
            replicas: status.and_then(|s| s.replicas).unwrap_or(0),
            updated_replicas: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            ready_replicas: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            available_condition: status
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Available" && c.status == "True"),
            has_status: status.is_some(),
            operator_owns_replicas: self
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .filter(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
                .filter_map(|m| m.fields_v1.as_ref())
                .any(|f| f.0.pointer("/f:spec/f:replicas").is_some()),
            template: template_hash(self),
        }
    }
}

/// A hash of the Deployment's pod template (stable within this process).
fn template_hash(deployment: &Deployment) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if let Some(spec) = &deployment.spec {
        serde_json::to_vec(&spec.template)
            .unwrap_or_default()
            .hash(&mut hasher);
    }
    hasher.finish()
}

impl Rollout {
    /// Whether the Deployment at `generation` has rolled out its current spec and is
    /// Available: the controller-manager observed that generation, every desired replica
    /// runs the current template, and the `Available` condition is `True`.
    pub fn available(&self, generation: Option<i64>) -> bool {
        self.has_status
            && self.observed_generation >= generation
            && self.updated_replicas >= self.desired
            && self.available_condition
    }

    /// Whether the Deployment at `generation` finished rolling out, as `kubectl rollout
    /// status` sees it: [`Self::available`], no pod of an older template left, and every pod
    /// of the current one ready. Stricter than availability, which old pods can provide while
    /// the new ones never start.
    pub fn rolled_out(&self, generation: Option<i64>) -> bool {
        self.available(generation)
            && self.replicas <= self.updated_replicas
            && self.ready_replicas >= self.updated_replicas
    }

    /// Whether fewer replicas are ready than the Deployment asks for: it is rolling out, or
    /// its pods are failing (for instance refused by a dependency that lost their user).
    pub fn short_of_ready(&self) -> bool {
        self.ready_replicas < self.desired
    }
}

impl Owned<Deployment> {
    /// [`Rollout::available`] at the stored generation.
    pub fn available(&self) -> bool {
        self.state.available(self.generation)
    }

    /// [`Rollout::rolled_out`] at the stored generation.
    pub fn rolled_out(&self) -> bool {
        self.state.rolled_out(self.generation)
    }
}

impl Compact for Service {
    /// `spec.clusterIP` (`None` for a headless Service).
    type State = Option<String>;

    fn state(&self) -> Option<String> {
        self.spec.as_ref().and_then(|s| s.cluster_ip.clone())
    }
}

impl Compact for ConfigMap {
    type State = ();

    fn state(&self) {}
}

impl Compact for PodDisruptionBudget {
    type State = ();

    fn state(&self) {}
}

impl Compact for HorizontalPodAutoscaler {
    type State = ();

    fn state(&self) {}
}

impl Compact for NetworkPolicy {
    type State = ();

    fn state(&self) {}
}

/// What of a connection Secret a reconcile reads: its data (the kept passwords) and the
/// rotation token it was last written for.
#[derive(Clone, Default)]
pub struct SecretState {
    /// The [`ROTATED_ANNOTATION`].
    pub rotated: Option<String>,
    /// `data`.
    pub data: BTreeMap<String, ByteString>,
}

impl Compact for Secret {
    type State = SecretState;

    fn state(&self) -> SecretState {
        SecretState {
            rotated: self
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ROTATED_ANNOTATION))
                .cloned(),
            data: self.data.clone().unwrap_or_default(),
        }
    }
}

impl Owned<Secret> {
    /// The value under `key`, as text.
    pub fn value(&self, key: &str) -> Option<String> {
        self.state
            .data
            .get(key)
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    }
}

#[cfg(test)]
mod tests;
