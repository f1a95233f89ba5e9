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
use crate::owned::{self, Compact, Owned};

/// Why an object could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be serialized (a bug).
    #[error("failed to serialize {key}")]
    Serialize {
        /// The object ([`object_key`]).
        key: String,
        /// What the serializer said.
        #[source]
        source: serde_json::Error,
    },
    /// The API server refused or failed the apply.
    #[error("failed to apply {key}")]
    Patch {
        /// The object ([`object_key`]).
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

/// What the operator last applied to one object.
#[derive(Clone, Debug)]
pub(super) struct Applied {
    /// The fingerprint of the desired object.
    hash: String,
    /// The generation (or resourceVersion) the API server answered with.
    version: String,
    /// When: the watch may not have delivered the object to the store yet.
    at: Instant,
}

/// How long an applied object may be missing from the store before it is applied again
/// (the watch delivers it within milliseconds; a longer gap means it was deleted).
const STORE_LAG: Duration = Duration::from_secs(10);

/// The key of an object in [`Context::applied`]: `<apiVersion>/<kind>/<namespace>/<name>`.
pub(super) fn object_key<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> String {
    format!(
        "{}/{}/{namespace}/{name}",
        K::api_version(&()),
        K::kind(&())
    )
}

/// The generation of an object with a spec, else its resourceVersion.
fn version_of<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    owned::version(meta.generation, meta.resource_version.as_deref())
}

/// Whether version `a` is older than `b` (generations compare as numbers; resourceVersions
/// are opaque, so a different one counts as older only while the store may lag).
fn older(a: &str, b: &str) -> bool {
    match (a.strip_prefix('g'), b.strip_prefix('g')) {
        (Some(a), Some(b)) => a.parse::<i64>().ok() < b.parse::<i64>().ok(),
        _ => a.starts_with('r') && b.starts_with('r'),
    }
}

/// Whether the store still shows an older version (`current`) of the object `key` than this
/// process last applied: the watch has not delivered that apply yet, so what the store says
/// of the object's rollout is about its previous spec.
pub(super) fn store_behind(ctx: &Context, key: &str, current: &str) -> bool {
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .is_some_and(|last| older(current, &last.version))
}

/// The version of object `key` as it stands: what this process last applied while the store
/// has not caught up with it yet (it lags by the watch's delay), else what the store shows
/// (`stored`, [`owned::version`]; `None` when the store has no such object).
pub(super) fn settled_version(ctx: &Context, key: &str, stored: Option<String>) -> String {
    let last = ctx
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned();
    settled(last.as_ref(), stored)
}

/// [`settled_version`] given what was last applied.
fn settled(last: Option<&Applied>, stored: Option<String>) -> String {
    match (last, stored) {
        (Some(last), stored)
            if last.at.elapsed() < STORE_LAG
                && stored
                    .as_deref()
                    .is_none_or(|current| older(current, &last.version)) =>
        {
            last.version.clone()
        }
        (_, stored) => stored.unwrap_or_default(),
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
        key: key.clone(),
        source,
    })?;
    let hash = build::fingerprint([serialized.as_slice()]);
    let last = ctx
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    match store.get(&ObjectRef::new(&name).within(&namespace)) {
        Some(existing) => {
            let same_hash = existing.applied_hash.as_ref() == Some(&hash);
            // The store shows what this process last applied (or lags behind it); not applied
            // by this process yet: trust the annotation.
            let untouched = last.as_ref().is_none_or(|last| {
                last.hash == hash && settled(Some(last), Some(existing.version())) == last.version
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
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let applied = api
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

    fn applied(version: &str, ago: Duration) -> Applied {
        Applied {
            hash: "h".to_owned(),
            version: version.to_owned(),
            at: Instant::now() - ago,
        }
    }

    #[test]
    fn a_version_just_applied_stands_until_the_store_shows_it() {
        let just = applied("r7", Duration::ZERO);
        assert_eq!(settled(Some(&just), None), "r7", "not in the store yet");
        assert_eq!(settled(Some(&just), Some("r5".into())), "r7", "store lags");
        assert_eq!(
            settled(Some(&just), Some("r7".into())),
            "r7",
            "store caught up"
        );
        let generation = applied("g3", Duration::ZERO);
        assert_eq!(settled(Some(&generation), Some("g4".into())), "g4", "newer");
        assert_eq!(settled(Some(&generation), Some("g2".into())), "g3", "older");
    }

    #[test]
    fn past_the_store_lag_the_store_decides() {
        let long_ago = applied("r7", STORE_LAG + Duration::from_secs(1));
        assert_eq!(
            settled(Some(&long_ago), Some("r9".into())),
            "r9",
            "changed since"
        );
        assert_eq!(settled(Some(&long_ago), None), "", "deleted since");
        assert_eq!(settled(None, Some("r9".into())), "r9", "never applied here");
        assert_eq!(settled(None, None), "");
    }
}
