//! Conversion between the served versions of `MiddlewareStack` (pure).
//!
//! `v1beta1` (storage) differs from `v1alpha1` by renames only, listed once in [`RENAMES`]:
//! each maps a field of one version to a field of the other, so a round trip through the other
//! version gives back the object byte for byte. Everything not renamed (metadata, status,
//! every other field, unknown ones) is passed through untouched: the conversion never
//! re-serializes a spec, so it adds no defaults and drops nothing.
//!
//! Fields only `v1beta1` has ([`V1BETA1_ONLY`]) travel through a `v1alpha1` view in the
//! annotation [`STASH`], and come back when the object is converted up again (if the object
//! that held them is still there). A test checks that every other field of either schema has
//! a home in the other.
use kube::core::Status;
use kube::core::conversion::{ConversionRequest, ConversionResponse, ConversionReview};
use serde_json::{Map, Value};

use crate::crd::GROUP;

/// The versions this operator serves, oldest first.
pub const VERSIONS: [&str; 2] = ["v1alpha1", "v1beta1"];

/// One renamed field: its path in `v1alpha1` and in `v1beta1`, from the object's root.
pub struct Rename {
    /// The field in `v1alpha1`.
    pub alpha: &'static [&'static str],
    /// The field in `v1beta1`.
    pub beta: &'static [&'static str],
}

/// Every difference between `v1alpha1` and `v1beta1`.
///
/// - `services.wsHub` is `services.hub`, like the other services named by what they do.
/// - Each dependency's `adminCredentialsSecret: <name>` is `adminSecretRef: {name: <name>}`,
///   a reference object like `auth.jwtSecretRef`, which can grow fields a string cannot.
pub const RENAMES: &[Rename] = &[
    Rename {
        alpha: &["spec", "services", "wsHub"],
        beta: &["spec", "services", "hub"],
    },
    Rename {
        alpha: &["spec", "kafka", "adminCredentialsSecret"],
        beta: &["spec", "kafka", "adminSecretRef", "name"],
    },
    Rename {
        alpha: &["spec", "redis", "adminCredentialsSecret"],
        beta: &["spec", "redis", "adminSecretRef", "name"],
    },
    Rename {
        alpha: &["spec", "postgres", "adminCredentialsSecret"],
        beta: &["spec", "postgres", "adminSecretRef", "name"],
    },
];

/// Fields `v1alpha1` has no place for, by their `v1beta1` path. (Every service's autoscaling
/// has `targetConnectionsPerReplica`; admission accepts it on the hub only.)
pub const V1BETA1_ONLY: &[&[&str]] = &[
    &[
        "spec",
        "services",
        "hub",
        "autoscaling",
        "targetConnectionsPerReplica",
    ],
    &[
        "spec",
        "services",
        "gateway",
        "autoscaling",
        "targetConnectionsPerReplica",
    ],
    &[
        "spec",
        "services",
        "commandService",
        "autoscaling",
        "targetConnectionsPerReplica",
    ],
    &[
        "spec",
        "services",
        "processor",
        "autoscaling",
        "targetConnectionsPerReplica",
    ],
    &[
        "spec",
        "services",
        "cacheUpdater",
        "autoscaling",
        "targetConnectionsPerReplica",
    ],
    &["spec", "kafka", "adminMechanism"],
    &["spec", "kafka", "tls"],
    &["spec", "kafka", "servicePrincipal"],
    &["spec", "redis", "caSecretRef"],
    &["spec", "redis", "cluster"],
    &["spec", "postgres", "caSecretRef"],
];

/// The annotation that carries [`V1BETA1_ONLY`] fields through a `v1alpha1` view: a JSON
/// object of dotted path → value.
pub const STASH: &str = "meridian.dev/v1beta1-fields";

/// Why an object could not be converted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConversionError {
    /// The object is not a `MiddlewareStack` of a version this operator serves.
    #[error(
        "cannot convert apiVersion {0:?}: this operator serves meridian.dev/v1alpha1 and \
         meridian.dev/v1beta1"
    )]
    UnknownVersion(String),
    /// The object is not a JSON object.
    #[error("the object to convert is not a JSON object")]
    NotAnObject,
}

/// `object` (a `MiddlewareStack` of any served version) as `desired_api_version`.
///
/// # Errors
/// When either version is not one this operator serves.
pub fn convert(mut object: Value, desired_api_version: &str) -> Result<Value, ConversionError> {
    let from = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let from = version_of(&from)?;
    let to = version_of(desired_api_version)?;
    let root = object.as_object_mut().ok_or(ConversionError::NotAnObject)?;
    match (from, to) {
        ("v1alpha1", "v1beta1") => {
            for rename in RENAMES {
                move_field(root, rename.alpha, rename.beta);
            }
            unstash(root);
        }
        ("v1beta1", "v1alpha1") => {
            stash(root);
            for rename in RENAMES {
                move_field(root, rename.beta, rename.alpha);
            }
        }
        _ => {}
    }
    root.insert(
        "apiVersion".to_owned(),
        Value::String(desired_api_version.to_owned()),
    );
    Ok(object)
}

/// The version of a `meridian.dev/<version>` apiVersion this operator serves.
fn version_of(api_version: &str) -> Result<&'static str, ConversionError> {
    api_version
        .strip_prefix(GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .and_then(|v| VERSIONS.iter().find(|known| **known == v))
        .copied()
        .ok_or_else(|| ConversionError::UnknownVersion(api_version.to_owned()))
}

/// Moves the [`V1BETA1_ONLY`] fields into the [`STASH`] annotation.
fn stash(root: &mut Map<String, Value>) {
    let stashed: Map<String, Value> = V1BETA1_ONLY
        .iter()
        .filter_map(|path| Some((path.join("."), take(root, path)?)))
        .collect();
    if stashed.is_empty() {
        return;
    }
    let text = Value::Object(stashed).to_string();
    if let Some(annotations) =
        object_at(root, "metadata").and_then(|metadata| object_at(metadata, "annotations"))
    {
        annotations.insert(STASH.to_owned(), Value::String(text));
    }
}

/// Puts the fields of the [`STASH`] annotation back where their parent object still is, and
/// removes the annotation.
fn unstash(root: &mut Map<String, Value>) {
    let Some(metadata) = root.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(annotations) = metadata
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let Some(Value::String(text)) = annotations.remove(STASH) else {
        return;
    };
    if annotations.is_empty() {
        metadata.remove("annotations");
    }
    // An annotation someone edited into something else is dropped, never an error.
    let Ok(Value::Object(stashed)) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    for path in V1BETA1_ONLY {
        let Some(value) = stashed.get(&path.join(".")) else {
            continue;
        };
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        let mut node = Some(&mut *root);
        for key in parents {
            node = node
                .and_then(|n| n.get_mut(*key))
                .and_then(Value::as_object_mut);
        }
        if let Some(parent) = node {
            parent.insert((*last).to_owned(), value.clone());
        }
    }
}

/// The object under `key`, created (or made an object) if it is not one.
fn object_at<'a>(
    node: &'a mut Map<String, Value>,
    key: &str,
) -> Option<&'a mut Map<String, Value>> {
    let child = node
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !child.is_object() {
        *child = Value::Object(Map::new());
    }
    child.as_object_mut()
}

/// Moves the value at `from` to `to`, creating the objects on the way; objects that `from`
/// leaves empty are removed (they existed only to hold it). Nothing at `from`: nothing moves.
fn move_field(root: &mut Map<String, Value>, from: &[&str], to: &[&str]) {
    let Some(value) = take(root, from) else {
        return;
    };
    let Some((last, parents)) = to.split_last() else {
        return;
    };
    let mut node = root;
    for key in parents {
        let Some(child) = object_at(node, key) else {
            return;
        };
        node = child;
    }
    node.insert((*last).to_owned(), value);
}

/// Removes and returns the value at `path`, and the objects it leaves empty.
fn take(node: &mut Map<String, Value>, path: &[&str]) -> Option<Value> {
    let (first, rest) = path.split_first()?;
    if rest.is_empty() {
        return node.remove(*first);
    }
    let child = node.get_mut(*first)?.as_object_mut()?;
    let value = take(child, rest)?;
    if child.is_empty() {
        node.remove(*first);
    }
    Some(value)
}

/// Answers a `ConversionReview`: every object converted, or a failure naming why (the API
/// server then fails the request that needed the conversion with that message).
pub fn review(review: ConversionReview) -> ConversionReview {
    let request = match ConversionRequest::from_review(review) {
        Ok(request) => request,
        Err(error) => {
            return ConversionResponse::invalid(Status::failure(&error.to_string(), "BadRequest"))
                .into_review();
        }
    };
    let desired = request.desired_api_version.clone();
    let objects = request.objects.clone();
    let response = ConversionResponse::for_request(request);
    let converted: Result<Vec<Value>, ConversionError> = objects
        .into_iter()
        .map(|object| convert(object, &desired))
        .collect();
    match converted {
        Ok(objects) => response.success(objects),
        Err(error) => response.failure(Status::failure(&error.to_string(), "BadRequest")),
    }
    .into_review()
}

#[cfg(test)]
mod tests;
