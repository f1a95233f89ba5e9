//! The *validate* step: a `MiddlewareStack` as read from the API server → a [`ValidatedStack`]
//! the build step can trust, or a [`ValidateError`] that lists everything that is wrong.
//!
//! The API server already enforces most of these rules at admission (OpenAPI bounds and CEL);
//! they are checked again here because objects stored under an older CRD, or written around
//! admission, must never reach the build step. Some rules cannot be expressed in the schema
//! (the length of the generated object names). Pure: no API calls.
use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource as _;

use crate::build::Component;
use crate::crd::{MiddlewareStack, MiddlewareStackSpec, Release, ServicePrincipal, TopicSpec};

/// The longest object name the stack produces is `<stack>-<service>`, and Service names are
/// DNS-1035 labels (at most 63 characters).
pub const MAX_STACK_NAME_LEN: usize = 63 - "-command-service".len();

/// A stack whose spec passed every check, with the identity the build step needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedStack {
    name: String,
    namespace: String,
    owner: OwnerReference,
    spec: MiddlewareStackSpec,
    release: Release,
}

impl ValidatedStack {
    /// The same stack, its unset image fields following `release` instead of the images of
    /// this build's own release.
    #[must_use]
    pub fn with_release(mut self, release: Release) -> Self {
        self.release = release;
        self
    }

    /// Where the images whose registry or tag the spec leaves unset come from.
    pub fn release(&self) -> &Release {
        &self.release
    }

    /// The stack's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stack's namespace, where every object it owns lives.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The controller owner reference every generated object carries.
    pub fn owner(&self) -> &OwnerReference {
        &self.owner
    }

    /// The validated spec.
    pub fn spec(&self) -> &MiddlewareStackSpec {
        &self.spec
    }

    /// The services that run (`enabled: true`), in start-up order.
    pub fn enabled(&self) -> BTreeSet<Component> {
        Component::ALL
            .into_iter()
            .filter(|c| c.spec(&self.spec.services).enabled)
            .collect()
    }

    /// The prefix of the stack's Kafka topics (`KAFKA_TOPIC_PREFIX`): `<namespace>.<name>.`.
    /// Derived from immutable names, so it can never change under a running stack.
    pub fn topic_prefix(&self) -> String {
        format!("{}.{}.", self.namespace, self.name)
    }

    /// Who the stack's services are to Kafka: `kafka.servicePrincipal`, by default `Stack` when
    /// the operator has an admin login (`kafka.adminSecretRef`), `None` otherwise.
    pub fn kafka_principal(&self) -> ServicePrincipal {
        let kafka = &self.spec.kafka;
        kafka
            .service_principal
            .unwrap_or(if kafka.admin_secret_ref.is_some() {
                ServicePrincipal::Stack
            } else {
                ServicePrincipal::None
            })
    }

    /// The prefix of the stack's Redis keys and channels (`REDIS_KEY_PREFIX`), which its ACL
    /// user is confined to: `meridian:<namespace>:<name>:`.
    pub fn redis_key_prefix(&self) -> String {
        format!("meridian:{}:{}:", self.namespace, self.name)
    }
}

/// Why a stack could not be validated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidateError {
    /// The object lacks metadata the API server always sets (it was not read from one).
    #[error("failed to validate the stack: metadata.{0} is missing")]
    MissingMetadata(&'static str),
    /// The spec breaks one or more rules.
    #[error("failed to validate the stack: {0}")]
    InvalidSpec(Problems),
}

impl ValidateError {
    /// The `error` label of the reconcile-error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingMetadata(_) => "missing_metadata",
            Self::InvalidSpec(_) => "invalid_spec",
        }
    }
}

/// Every rule a spec breaks, in the order of the spec's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// One broken rule, named after the field, saying what a valid value looks like.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    /// The generated object names would exceed 63 characters.
    #[error("metadata.name is {len} characters long, more than the {MAX_STACK_NAME_LEN} allowed")]
    NameTooLong {
        /// The name's length.
        len: usize,
    },
    /// A service asks for fewer than 0 replicas.
    #[error("spec.services.{service}.replicas is {replicas} but must be at least 0")]
    NegativeReplicas {
        /// The service's field name.
        service: &'static str,
        /// The requested replicas.
        replicas: i32,
    },
    /// A topic asks for fewer than 1 partition.
    #[error("spec.kafka.topics.{topic}.partitions is {partitions} but must be at least 1")]
    TooFewPartitions {
        /// The topic's field name.
        topic: &'static str,
        /// The requested partitions.
        partitions: i32,
    },
    /// A topic asks for a replication factor below 1.
    #[error(
        "spec.kafka.topics.{topic}.replicationFactor is {replication_factor} but must be at least 1"
    )]
    TooLowReplicationFactor {
        /// The topic's field name.
        topic: &'static str,
        /// The requested replication factor.
        replication_factor: i32,
    },
    /// The Redis URL is not `redis://` or `rediss://`.
    #[error("spec.redis.url must start with redis:// or rediss://")]
    RedisUrlScheme,
    /// The Redis URL carries credentials (they belong in the admin Secret).
    #[error(
        "spec.redis.url must not contain credentials: put them in the Secret of adminSecretRef"
    )]
    RedisUrlCredentials,
    /// The PostgreSQL port is outside 1..=65535.
    #[error("spec.postgres.port is {0} but must be between 1 and 65535")]
    PortOutOfRange(i32),
    /// Both JWT modes are set.
    #[error("spec.auth.jwtSecretRef and spec.auth.jwksUrl are mutually exclusive: set only one")]
    AuthBothModes,
    /// Neither JWT mode is set.
    #[error("spec.auth needs either jwtSecretRef or jwksUrl")]
    AuthNoMode,
    /// Two rate-limit policies share a name.
    #[error("spec.rateLimits.policies has two policies named {0:?} but names must be unique")]
    DuplicateRateLimitPolicy(String),
    /// The sampling ratio is outside 0..=1 (or not a number).
    #[error("spec.telemetry.samplingRatio is {0} but must be between 0 and 1")]
    SamplingRatioOutOfRange(f64),
}

/// Checks `stack` and returns what the build step needs.
///
/// # Errors
/// [`ValidateError::MissingMetadata`] without a name, namespace or uid;
/// [`ValidateError::InvalidSpec`] listing every broken rule.
pub fn validate(stack: &MiddlewareStack) -> Result<ValidatedStack, ValidateError> {
    let name = stack
        .metadata
        .name
        .clone()
        .ok_or(ValidateError::MissingMetadata("name"))?;
    let namespace = stack
        .metadata
        .namespace
        .clone()
        .ok_or(ValidateError::MissingMetadata("namespace"))?;
    stack
        .metadata
        .uid
        .as_ref()
        .ok_or(ValidateError::MissingMetadata("uid"))?;
    let owner = stack
        .controller_owner_ref(&())
        .ok_or(ValidateError::MissingMetadata("uid"))?;

    let problems = problems(&name, &stack.spec);
    if !problems.is_empty() {
        return Err(ValidateError::InvalidSpec(Problems(problems)));
    }
    Ok(ValidatedStack {
        name,
        namespace,
        owner,
        spec: stack.spec.clone(),
        release: Release::default(),
    })
}

fn problems(name: &str, spec: &MiddlewareStackSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    if name.len() > MAX_STACK_NAME_LEN {
        problems.push(Problem::NameTooLong { len: name.len() });
    }
    for component in Component::ALL {
        let replicas = component.spec(&spec.services).replicas;
        if replicas < 0 {
            problems.push(Problem::NegativeReplicas {
                service: component.field(),
                replicas,
            });
        }
    }
    let topics = &spec.kafka.topics;
    let topics: [(&'static str, &TopicSpec); 4] = [
        ("events", &topics.events),
        ("commands", &topics.commands),
        ("cache", &topics.cache),
        ("dlq", &topics.dlq),
    ];
    for (topic, settings) in topics {
        if settings.partitions < 1 {
            problems.push(Problem::TooFewPartitions {
                topic,
                partitions: settings.partitions,
            });
        }
        if settings.replication_factor < 1 {
            problems.push(Problem::TooLowReplicationFactor {
                topic,
                replication_factor: settings.replication_factor,
            });
        }
    }
    let url = &spec.redis.url;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        problems.push(Problem::RedisUrlScheme);
    }
    if url.contains('@') {
        problems.push(Problem::RedisUrlCredentials);
    }
    if !(1..=65535).contains(&spec.postgres.port) {
        problems.push(Problem::PortOutOfRange(spec.postgres.port));
    }
    if let Some(auth) = &spec.auth {
        match (&auth.jwt_secret_ref, &auth.jwks_url) {
            (Some(_), Some(_)) => problems.push(Problem::AuthBothModes),
            (None, None) => problems.push(Problem::AuthNoMode),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    for policy in &spec.rate_limits.policies {
        if !names.insert(policy.name.as_str()) {
            problems.push(Problem::DuplicateRateLimitPolicy(policy.name.clone()));
        }
    }
    let ratio = spec.telemetry.sampling_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        problems.push(Problem::SamplingRatioOutOfRange(ratio));
    }
    problems
}

#[cfg(test)]
mod tests;
