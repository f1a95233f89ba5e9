//! Where a stack's container images come from.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The registry of the images of the operator's release (see [`ImageSpec::registry`]).
pub const RELEASE_REGISTRY: &str = "ghcr.io/meridian-dev/meridian";

/// The tag of the images of the operator's release: its own version.
pub const RELEASE_TAG: &str = env!("CARGO_PKG_VERSION");

/// The images an operator deploys where a stack leaves the registry or the tag unset: by
/// default its own release's ([`RELEASE_REGISTRY`], [`RELEASE_TAG`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The registry and path prefix.
    pub registry: String,
    /// The tag.
    pub tag: String,
}

impl Default for Release {
    fn default() -> Self {
        Self {
            registry: RELEASE_REGISTRY.to_owned(),
            tag: RELEASE_TAG.to_owned(),
        }
    }
}

/// What a registry (host, optional port, lowercase path) may look like, for CEL.
const REGISTRY_RULE: &str = "self.matches('^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*/?$')";
const REGISTRY_MESSAGE: &str = "image.registry must be a registry host and path such as \
    ghcr.io/example/meridian: no scheme (https://), no spaces, a lowercase path";
/// What a tag may look like (the OCI distribution grammar), for CEL.
const TAG_RULE: &str = "self.matches('^[a-zA-Z0-9_][a-zA-Z0-9_.-]*$')";
const TAG_MESSAGE: &str =
    "image.tag must be letters, digits, '_', '.' and '-', not starting with '.' or '-'";

/// Where container images come from: `<registry>/<service>:<tag>`. Unset fields follow the
/// operator's release, so upgrading the operator rolls the services onto its images.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// The registry and path prefix of the images, for example `ghcr.io/example/meridian`
    /// (no scheme). The service name is appended (`<registry>/api-gateway`). Default: the
    /// operator release's, `ghcr.io/meridian-dev/meridian`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(REGISTRY_RULE).message(REGISTRY_MESSAGE))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// The image tag every service uses, for example `0.1.0`. Default: the operator's own
    /// version.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(TAG_RULE).message(TAG_MESSAGE))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// When the kubelet pulls the images.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

/// A service's deviation from the stack-wide image settings; unset fields inherit them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageOverride {
    /// The registry of this service's image, instead of `spec.image.registry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(REGISTRY_RULE).message(REGISTRY_MESSAGE))]
    pub registry: Option<String>,
    /// The tag of this service's image, instead of `spec.image.tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(TAG_RULE).message(TAG_MESSAGE))]
    pub tag: Option<String>,
    /// The pull policy of this service's image, instead of `spec.image.pullPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// When the kubelet pulls an image (the container's `imagePullPolicy`).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull only when the image is not on the node.
    #[default]
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}
