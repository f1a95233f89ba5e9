//! The *apply* step: server-side apply of one object the operator owns, skipped while the
//! store shows the object exactly as this operator last applied it.
use std::fmt::Debug;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{APPLIED_HASH_ANNOTATION, Context, FIELD_MANAGER};
use crate::build;
use crate::owned::{Compact, Owned, Version};

/// Why an object could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be serialized (a bug).
    #[error("failed to serialize {key}")]
    Serialize {
        /// The object ([`describe`]).
        key: String,
        /// What the serializer said.
        #[source]
        source: serde_json::Error,
    },
    /// The API server refused or failed the apply.
    #[error("failed to apply {key}")]
    Patch {
        /// The object ([`describe`]).
        key: String,
        /// What the API server (or the connection to it) said.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Serialize { .. } => "SerializationFailed",
            Self::Patch { .. } => "KubernetesApiError",
        }
    }

    /// The cause, as a condition message.
    pub(super) fn message(&self) -> String {
        match self {
            Self::Serialize { source, .. } => format!("serialization failed: {source}"),
            Self::Patch { source, .. } => format!("Kubernetes API request failed: {source}"),
        }
    }
}

/// What the operator last applied to one object (one per owned object: 20 per stack).
#[derive(Clone, Debug)]
pub(super) struct Applied {
    /// The fingerprint of the desired object ([`build::fingerprint_bits`]).
    hash: u64,
    /// The generation (or resourceVersion) the API server answered with.
    version: Version,
    /// When: the watch may not have delivered the object to the store yet.
    at: Instant,
}

/// How long an applied object may be missing from the store before it is applied again
/// (the watch delivers it within milliseconds; a longer gap means it was deleted).
const STORE_LAG: Duration = Duration::from_secs(10);

/// An owned object's identity in the operator's per-object maps ([`Context::applied`]):
/// the first 128 bits of the SHA-256 of `<apiVersion>/<kind>/<namespace>/<name>`. Sixteen
/// bytes where the text took about ninety with its allocation, for some 20,000 objects at
/// 1,000 stacks; the text itself is [`describe`]d in errors and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ObjectKey(u128);

/// The [`ObjectKey`] of the object `namespace`/`name` of kind `K`.
pub(super) fn object_key<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> ObjectKey {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(describe::<K>(namespace, name))
        .finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    ObjectKey(u128::from_be_bytes(first))
}

/// The object `namespace`/`name` of kind `K` as people read it:
/// `<apiVersion>/<kind>/<namespace>/<name>`.
pub(super) fn describe<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> String {
    format!(
        "{}/{}/{namespace}/{name}",
        K::api_version(&()),
        K::kind(&())
    )
}

/// The generation of an object with a spec, else its resourceVersion.
fn version_of<K: Resource>(object: &K) -> Version {
    let meta = object.meta();
    Version::of(meta.generation, meta.resource_version.as_deref())
}

/// Whether the store still shows an older version (`current`) of the object `key` than this
/// process last applied: the watch has not delivered that apply yet, so what the store says
/// of the object's rollout is about its previous spec.
pub(super) fn store_behind(ctx: &Context, key: &ObjectKey, current: &Version) -> bool {
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .is_some_and(|last| current.older_than(&last.version))
}

/// The version of object `key` as it stands: what this process last applied while the store
/// has not caught up with it yet (it lags by the watch's delay), else what the store shows
/// (`stored`, [`Owned::version`]; `None` when the store has no such object, nor this process
/// applied it lately).
pub(super) fn settled_version(
    ctx: &Context,
    key: &ObjectKey,
    stored: Option<Version>,
) -> Option<Version> {
    let last = ctx
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned();
    settled(last.as_ref(), stored)
}

/// [`settled_version`] given what was last applied.
fn settled(last: Option<&Applied>, stored: Option<Version>) -> Option<Version> {
    match (last, stored) {
        (Some(last), stored)
            if last.at.elapsed() < STORE_LAG
                && stored
                    .as_ref()
                    .is_none_or(|current| current.older_than(&last.version)) =>
        {
            Some(last.version.clone())
        }
        (_, stored) => stored,
    }
}

/// Server-side applies `object` unless the store shows it exactly as last applied. Returns
/// whether it was applied.
pub(super) async fn apply<K>(
    ctx: &Context,
    store: &Store<Owned<K>>,
    mut object: K,
) -> Result<bool, Error>
where
    K: Compact<Scope = k8s_openapi::NamespaceResourceScope> + Serialize + DeserializeOwned + Debug,
{
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let key = object_key::<K>(&namespace, &name);
    let serialized = serde_json::to_vec(&object).map_err(|source| Error::Serialize {
        key: describe::<K>(&namespace, &name),
        source,
    })?;
    let hash = build::fingerprint_bits([serialized.as_slice()]);
    let last = ctx
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    match store.get(&ObjectRef::new(&name).within(&namespace)) {
        Some(existing) => {
            let same_hash = existing.applied_hash == Some(hash);
            // The store shows what this process last applied (or lags behind it); not applied
            // by this process yet: trust the annotation.
            let untouched = last.as_ref().is_none_or(|last| {
                last.hash == hash
                    && settled(Some(last), Some(existing.version())).as_ref() == Some(&last.version)
            });
            if same_hash && untouched {
                return Ok(false);
            }
        }
        // Just applied, and the watch has not delivered it yet.
        None if last.is_some_and(|l| l.hash == hash && l.at.elapsed() < STORE_LAG) => {
            return Ok(false);
        }
        None => {}
    }
    object
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), format!("{hash:016x}"));
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|source| Error::Patch {
            key: describe::<K>(&namespace, &name),
            source,
        })?;
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            key,
            Applied {
                hash,
                version: version_of(&applied),
                at: Instant::now(),
            },
        );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(version: &str) -> Version {
        Version::Resource(version.into())
    }

    fn applied(version: Version, ago: Duration) -> Applied {
        Applied {
            hash: 0,
            version,
            at: Instant::now() - ago,
        }
    }

    #[test]
    fn a_version_just_applied_stands_until_the_store_shows_it() {
        let just = applied(r("7"), Duration::ZERO);
        assert_eq!(
            settled(Some(&just), None),
            Some(r("7")),
            "not in the store yet"
        );
        assert_eq!(
            settled(Some(&just), Some(r("5"))),
            Some(r("7")),
            "store lags"
        );
        assert_eq!(
            settled(Some(&just), Some(r("7"))),
            Some(r("7")),
            "store caught up"
        );
        let generation = applied(Version::Generation(3), Duration::ZERO);
        let g = Version::Generation;
        assert_eq!(settled(Some(&generation), Some(g(4))), Some(g(4)), "newer");
        assert_eq!(settled(Some(&generation), Some(g(2))), Some(g(3)), "older");
    }

    #[test]
    fn past_the_store_lag_the_store_decides() {
        let long_ago = applied(r("7"), STORE_LAG + Duration::from_secs(1));
        assert_eq!(
            settled(Some(&long_ago), Some(r("9"))),
            Some(r("9")),
            "changed since"
        );
        assert_eq!(settled(Some(&long_ago), None), None, "deleted since");
        assert_eq!(
            settled(None, Some(r("9"))),
            Some(r("9")),
            "never applied here"
        );
        assert_eq!(settled(None, None), None);
    }

    #[test]
    fn generations_are_ordered_and_resource_versions_only_differ() {
        let g = Version::Generation;
        assert!(g(2).older_than(&g(3)));
        assert!(!g(3).older_than(&g(3)) && !g(4).older_than(&g(3)));
        assert!(r("5").older_than(&r("7")) && r("9").older_than(&r("7")));
        assert!(!r("7").older_than(&r("7")));
        assert!(!g(1).older_than(&r("7")) && !r("7").older_than(&g(1)));
    }

    #[test]
    fn object_keys_tell_kinds_namespaces_and_names_apart() {
        use k8s_openapi::api::apps::v1::Deployment;
        use k8s_openapi::api::core::v1::Service;
        let key = object_key::<Deployment>("ns", "s-gateway");
        assert_eq!(key, object_key::<Deployment>("ns", "s-gateway"));
        assert_ne!(key, object_key::<Service>("ns", "s-gateway"));
        assert_ne!(key, object_key::<Deployment>("other", "s-gateway"));
        assert_ne!(key, object_key::<Deployment>("ns", "s-hub"));
        assert_eq!(
            describe::<Deployment>("ns", "s-gateway"),
            "apps/v1/Deployment/ns/s-gateway"
        );
        assert_eq!(std::mem::size_of::<ObjectKey>(), 16);
    }
}
