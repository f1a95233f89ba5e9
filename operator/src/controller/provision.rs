//! The *provision* step: the stack's Kafka topics (the *topics* stage), and its credentials —
//! the Redis ACL user, the PostgreSQL role and database, and the connection Secrets the
//! services read them from (the *credentials* stage) — through [`crate::provision`]. Each
//! returns its stage's report and Events about what it changed; the outcome of both is reused
//! while their inputs are unchanged ([`Provisioned`]).
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;

use super::dereference::{Clients, Dereferenced};
use super::{Context, ROTATE_ANNOTATION, apply, status};
use crate::build;
use crate::crd::MiddlewareStack;
use crate::names;
use crate::owned::Owned;
use crate::provision::ProvisionError;
use crate::provision::kafka::DesiredTopic;
use crate::status::{CREDENTIALS_READY, Report, Status, TOPICS_READY};
use crate::validate::ValidatedStack;

mod credentials;

pub(super) use credentials::{credentials, log_acl_change};

/// Why the topics or the credentials could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka failed to bring the topics to the requested state.
    #[error("failed to reconcile the topics")]
    Topics(#[source] ProvisionError),
    /// Redis failed to create or update the stack's ACL user.
    #[error("failed to provision Redis user {user}")]
    RedisUser {
        /// The ACL user.
        user: String,
        /// What Redis said.
        #[source]
        source: ProvisionError,
    },
    /// The services' Redis URL could not be built.
    #[error("failed to build the Redis connection URL")]
    RedisUrl(#[source] ProvisionError),
    /// PostgreSQL failed to create or update the stack's role and database.
    #[error("failed to provision PostgreSQL role {role}")]
    PostgresRole {
        /// The role.
        role: String,
        /// What PostgreSQL said.
        #[source]
        source: ProvisionError,
    },
    /// Kafka failed to create or update the stack's principal (SCRAM login, ACLs).
    #[error("failed to provision Kafka principal {user}")]
    KafkaPrincipal {
        /// The SCRAM login.
        user: String,
        /// What Kafka said.
        #[source]
        source: ProvisionError,
    },
    /// A connection Secret could not be applied.
    #[error("failed to write the connection Secrets")]
    ConnectionSecret(#[from] apply::Error),
}

impl Error {
    /// The metric label and condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Topics(source)
            | Self::RedisUser { source, .. }
            | Self::RedisUrl(source)
            | Self::PostgresRole { source, .. }
            | Self::KafkaPrincipal { source, .. } => source.reason(),
            Self::ConnectionSecret(error) => error.reason(),
        }
    }

    /// The `TopicsReady=False` or `CredentialsReady=False` condition, except for a failed
    /// API request.
    pub(super) fn report(&self) -> Option<Report> {
        let (stage, source) = match self {
            Self::Topics(source) => (TOPICS_READY, source),
            Self::RedisUser { source, .. }
            | Self::RedisUrl(source)
            | Self::PostgresRole { source, .. }
            | Self::KafkaPrincipal { source, .. } => (CREDENTIALS_READY, source),
            Self::ConnectionSecret(_) => return None,
        };
        Some(Report::new(
            stage,
            Status::False,
            source.reason(),
            source.to_string(),
        ))
    }
}

/// The outcome of the last successful external stages (dependencies, topics, credentials)
/// of a stack, reused while its inputs are unchanged and it is younger than the resync period:
/// a Deployment's status change then costs no call to Kafka, Redis or PostgreSQL. A service
/// whose replicas were all ready since and is now short of ready ones may have lost what was
/// provisioned for it (Redis keeps ACL users in memory and forgets them when it restarts):
/// the outcome is then reused for [`DEGRADED_REUSE`] only, and the stages put it back without
/// waiting for the resync. Services that were not yet ready since (a first rollout) are far
/// more likely waiting for their pods: the outcome is reused for [`ROLLOUT_REUSE`] then.
#[derive(Clone, Debug)]
pub(super) struct Provisioned {
    /// Fingerprint of the inputs: generation, rotation token, the resourceVersions of the
    /// Secrets read and of the connection Secrets (as last written by this process while the
    /// store lags behind it: [`apply::settled_version`]).
    key: String,
    at: Instant,
    /// When the dependencies last answered (at `at`, then at each health check).
    pub(super) checked: Instant,
    /// Whether every service existed with all its replicas ready at some point since `at` (or
    /// before, when the stages were redone for the same inputs).
    served: bool,
    /// The stages' reports.
    pub(super) reports: Vec<Report>,
    /// The fingerprint of the connection Secrets' contents.
    pub(super) credentials_hash: String,
}

/// How long the outcome of the external stages is reused once a service that was ready is
/// short of ready replicas (see [`Provisioned`]).
pub(super) const DEGRADED_REUSE: Duration = Duration::from_secs(10);

/// How long the outcome of the external stages is reused while the services have not been
/// ready since it (see [`Provisioned`]): long enough for a first rollout on a busy cluster
/// (image pulls, a saturated control plane), short enough that a dependency restarted during
/// one is provisioned again within two minutes.
pub(super) const ROLLOUT_REUSE: Duration = Duration::from_secs(120);

/// How long an outcome is reused: the resync period, shortened while a service is short of
/// ready replicas — to [`DEGRADED_REUSE`] if the services were ready since the outcome, to
/// [`ROLLOUT_REUSE`] if they were not yet.
pub(super) fn reuse_for(short_of_ready: bool, served: bool, resync: Duration) -> Duration {
    match (short_of_ready, served) {
        (false, _) => resync,
        (true, true) => DEGRADED_REUSE.min(resync),
        (true, false) => ROLLOUT_REUSE.min(resync),
    }
}

/// The last successful external stages of `stack`, if their inputs are unchanged and they are
/// younger than [`reuse_for`] allows. Notes whether the services are all ready now.
pub(super) fn cached(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
    refs: &Dereferenced,
) -> Option<Provisioned> {
    let key = provisioning_key(ctx, stack, validated, refs);
    let services = Readiness::of(ctx, validated);
    let mut provisioned = ctx.provisioned.lock().unwrap_or_else(|p| p.into_inner());
    let entry = provisioned.get_mut(&ObjectRef::from_obj(stack))?;
    entry.served |= services == Readiness::AllReady;
    let max_age = reuse_for(
        services == Readiness::Short,
        entry.served,
        ctx.settings.resync,
    );
    (entry.key == key && entry.at.elapsed() < max_age).then(|| entry.clone())
}

/// When to look at a stack whose services rolled out again: soon while one of them is short
/// of ready replicas ([`reuse_for`]: what they wait for may need the external stages redone),
/// else at the next regular look.
pub(super) fn next_look(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
) -> Duration {
    if Readiness::of(ctx, validated) != Readiness::Short {
        return ctx.settings.next_look();
    }
    let served = ctx
        .provisioned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&ObjectRef::from_obj(stack))
        .is_some_and(|p| p.served);
    reuse_for(true, served, ctx.settings.resync)
}

/// Where the stack's services stand, from the stored Deployments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readiness {
    /// One of them has fewer ready replicas than it asks for.
    Short,
    /// None is short, but not every one is stored yet (a new stack's are applied after its
    /// credentials are provisioned).
    Incomplete,
    /// Every one is stored with all its replicas ready.
    AllReady,
}

impl Readiness {
    fn of(ctx: &Context, validated: &ValidatedStack) -> Self {
        let mut all_stored = true;
        for component in validated.enabled() {
            match deployment(ctx, validated, component) {
                Some(deployment) if deployment.state.short_of_ready() => return Self::Short,
                Some(_) => {}
                None => all_stored = false,
            }
        }
        if all_stored {
            Self::AllReady
        } else {
            Self::Incomplete
        }
    }
}

/// The stored Deployment of one of the stack's services.
fn deployment(
    ctx: &Context,
    validated: &ValidatedStack,
    component: build::Component,
) -> Option<Arc<Owned<Deployment>>> {
    let name = build::object_name(validated, component);
    ctx.stores
        .deployments
        .get(&ObjectRef::new(&name).within(validated.namespace()))
}

/// Keeps the outcome of successful external stages for [`cached`].
pub(super) fn remember(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
    refs: &Dereferenced,
    reports: &[Report],
    credentials_hash: &str,
) {
    // The connection Secrets may just have been written: key on what is stored now.
    let key = provisioning_key(ctx, stack, validated, refs);
    let mut provisioned = ctx.provisioned.lock().unwrap_or_else(|p| p.into_inner());
    let reference = ObjectRef::from_obj(stack);
    // Provisioned again for the same inputs (services that lost readiness): they were served,
    // and stay looked at every [`DEGRADED_REUSE`] until they are ready again.
    let served = provisioned
        .get(&reference)
        .is_some_and(|previous| previous.served && previous.key == key);
    provisioned.insert(
        reference,
        Provisioned {
            key,
            at: Instant::now(),
            checked: Instant::now(),
            served,
            reports: reports.to_vec(),
            credentials_hash: credentials_hash.to_owned(),
        },
    );
}

/// Records that the dependencies of `stack` answered a health check just now.
pub(super) fn checked(ctx: &Context, stack: &MiddlewareStack) {
    if let Some(provisioned) = ctx
        .provisioned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&ObjectRef::from_obj(stack))
    {
        provisioned.checked = Instant::now();
    }
}

/// Drops the last outcome of the external stages of `stack` (they failed or stopped, or the
/// stack is gone).
pub(super) fn forget(ctx: &Context, stack: &MiddlewareStack) {
    ctx.provisioned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&ObjectRef::from_obj(stack));
}

/// The inputs of the external stages, fingerprinted.
fn provisioning_key(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
    refs: &Dereferenced,
) -> String {
    let connection_versions: Vec<String> = [
        build::redis_secret_name(validated),
        build::postgres_secret_name(validated),
        build::kafka_secret_name(validated),
    ]
    .iter()
    .map(|name| {
        let stored = ctx
            .stores
            .secrets
            .get(&ObjectRef::new(name).within(validated.namespace()))
            .map(|s| s.version());
        let key = apply::object_key::<Secret>(validated.namespace(), name);
        apply::settled_version(ctx, &key, stored).map_or_else(String::new, |v| v.to_string())
    })
    .collect();
    let generation = stack.metadata.generation.unwrap_or_default().to_string();
    let token = stack
        .annotations()
        .get(ROTATE_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    build::fingerprint(
        [generation.as_str(), token.as_str()]
            .into_iter()
            .chain(refs.versions.iter().map(String::as_str))
            .chain(connection_versions.iter().map(String::as_str))
            .map(str::as_bytes),
    )
}

/// The stack's four topics as its spec asks for them.
pub(super) fn desired_topics(validated: &ValidatedStack) -> Vec<DesiredTopic> {
    let topics = &validated.spec().kafka.topics;
    [
        ("commands", &topics.commands),
        ("events", &topics.events),
        ("cache", &topics.cache),
        ("commands.dlq", &topics.dlq),
    ]
    .into_iter()
    .map(|(name, spec)| DesiredTopic {
        name: names::topic(validated, name),
        partitions: spec.partitions,
        replication_factor: spec.replication_factor,
        config: spec.config.clone(),
    })
    .collect()
}

/// What the topics stage did.
/// The `TopicsReady=False` reason when the broker refuses what the spec asks for; the phase is
/// then `Failed` (the spec has to change).
pub(super) const INVALID_TOPIC_CONFIG: &str = "InvalidTopicConfig";

pub(super) enum Topics {
    /// Every topic is as requested: the `TopicsReady=True` report, and Events about the
    /// topics created, grown or reconfigured.
    Reconciled { report: Report, events: Vec<Event> },
    /// The spec asks for changes Kafka cannot make (`TopicsReady=False`). Not an error:
    /// retrying cannot help, the spec (or the topic) has to change.
    Unsupported(Report),
}

/// Stage 2: creates the missing topics, adds partitions, sets the requested configuration.
pub(super) async fn topics(
    ctx: &Context,
    validated: &ValidatedStack,
    clients: &Clients,
) -> Result<Topics, Error> {
    let topics = desired_topics(validated);
    let result = clients
        .kafka
        .reconcile_topics(&topics, ctx.settings.dependency_timeout)
        .await
        .map_err(Error::Topics)?;
    if !result.refused.is_empty() {
        return Ok(Topics::Unsupported(Report::new(
            TOPICS_READY,
            Status::False,
            INVALID_TOPIC_CONFIG,
            result.refused.join("; "),
        )));
    }
    if !result.unsupported.is_empty() {
        let message = result.unsupported.join("; ");
        return Ok(Topics::Unsupported(Report::new(
            TOPICS_READY,
            Status::False,
            "UnsupportedChange",
            message,
        )));
    }
    let events = [
        (&result.created, "created"),
        (&result.grown, "given more partitions"),
        (&result.configured, "reconfigured"),
    ]
    .into_iter()
    .filter(|(list, _)| !list.is_empty())
    .map(|(list, what)| {
        status::event(
            EventType::Normal,
            "TopicsUpdated",
            "ReconcileTopics",
            format!("{what}: {}", list.join(", ")),
        )
    })
    .collect();
    let summary = topics
        .iter()
        .map(|t| format!("{} ({}×{})", t.name, t.partitions, t.replication_factor))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Topics::Reconciled {
        report: Report::new(TOPICS_READY, Status::True, "TopicsReconciled", summary),
        events,
    })
}
