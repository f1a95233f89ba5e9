//! The *cleanup* step: the finalizer's work on a deleted stack — its topics, database and
//! credentials deleted or retained per `spec.deletionPolicy` — and forgetting what the
//! operator kept about it. The admin credentials come from the stack's Secrets or, once those
//! are gone (its namespace is being deleted), from the ones it last provisioned with; a
//! cleanup given up names everything it leaves behind.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt as _;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use super::apply::object_key;
use super::status::{event, publish_events, record_stage_gauges};
use super::{Chain, Context, admin_secrets, deadline, dereference, provision, scaling, waves};
use crate::build::{self, Component};
use crate::crd::{MiddlewareStack, Retention, ServicePrincipal};
use crate::names;
use crate::provision::ProvisionError;
use crate::validate::{ValidatedStack, validate};

/// Why a deleted stack's topics or credentials could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin credentials could not be read, or the dependencies not reached.
    #[error("failed to reach the stack's dependencies")]
    Dereference(#[from] dereference::Error),
    /// Kafka failed to delete the topics.
    #[error("failed to delete the topics")]
    DeleteTopics(#[source] ProvisionError),
    /// Redis failed to delete the ACL user.
    #[error("failed to delete Redis user {user}")]
    DeleteRedisUser {
        /// The ACL user.
        user: String,
        /// What Redis said.
        #[source]
        source: ProvisionError,
    },
    /// Kafka failed to delete the stack's SCRAM logins or their ACLs.
    #[error("failed to delete Kafka principal {user}")]
    DeleteKafkaPrincipal {
        /// The principal.
        user: String,
        /// What Kafka said.
        #[source]
        source: ProvisionError,
    },
    /// PostgreSQL failed to drop the database, drop the logins or revoke the owner's login.
    #[error("failed to clean up PostgreSQL database {database} and its roles")]
    DropPostgresRole {
        /// The database.
        database: String,
        /// What PostgreSQL said.
        #[source]
        source: ProvisionError,
    },
}

impl Error {
    /// The reason of the failed dependency.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dereference(error) => error.reason(),
            Self::DeleteTopics(source)
            | Self::DeleteRedisUser { source, .. }
            | Self::DeleteKafkaPrincipal { source, .. }
            | Self::DropPostgresRole { source, .. } => source.reason(),
        }
    }
}

/// The finalizer's cleanup, per `spec.deletionPolicy`; released anyway (with a Warning
/// Event) after `cleanup_attempts` failures, so namespace deletion never blocks forever.
pub(super) async fn cleanup(
    stack: &MiddlewareStack,
    ctx: &Context,
) -> Result<Action, super::Error> {
    let uid = stack.uid().unwrap_or_default();
    let bound = ctx.settings.reconcile_timeout;
    let external = async { Ok(cleanup_external(stack, ctx).await?) };
    let result = deadline("cleanup", bound, external).await;
    let Err(error) = result else {
        ctx.cleanup_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
        forget(stack, ctx);
        release_admin_secrets(stack, ctx).await;
        let note = format!(
            "deletionPolicy applied (topics {:?}, database {:?}, credentials {:?}); finalizer released",
            stack.spec.deletion_policy.topics,
            stack.spec.deletion_policy.database,
            stack.spec.deletion_policy.credentials
        );
        let cleaned = event(EventType::Normal, "CleanedUp", "Cleanup", note);
        publish_events(stack, ctx, vec![cleaned], false).await;
        return Ok(Action::await_change());
    };
    let attempts = {
        let mut failures = ctx
            .cleanup_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let attempts = failures.entry(uid.clone()).or_insert(0);
        *attempts += 1;
        *attempts
    };
    let abandon = attempts >= ctx.settings.cleanup_attempts;
    let note = if abandon {
        let left = validate(stack).map_or_else(|_| "nothing".to_owned(), |v| leftovers(&v));
        tracing::error!(
            stack = %ObjectRef::from_obj(stack),
            leftovers = %left,
            error = %Chain(&error),
            "Cleanup abandoned; remove what is left by hand."
        );
        format!(
            "cleanup failed {attempts} times, releasing the finalizer; left behind, to remove \
             by hand: {left}; last error: {}",
            Chain(&error)
        )
    } else {
        format!(
            "cleanup attempt {attempts} of {} failed: {}",
            ctx.settings.cleanup_attempts,
            Chain(&error)
        )
    };
    let reason = if abandon {
        "CleanupAbandoned"
    } else {
        "CleanupFailed"
    };
    let failed = event(EventType::Warning, reason, "Cleanup", note);
    // Each attempt is an Event of its own (a fresh recorder): as a series of one Event, every
    // retry would show the first attempt's note ("attempt 1 of 5") and error. There are at
    // most `cleanup_attempts` of them.
    publish_events(stack, ctx, vec![failed], false).await;
    if abandon {
        ctx.cleanup_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
        forget(stack, ctx);
        release_admin_secrets(stack, ctx).await;
        Ok(Action::await_change())
    } else {
        Err(error)
    }
}

/// Lets the admin Secrets this stack held go, unless another stack still needs them.
async fn release_admin_secrets(stack: &MiddlewareStack, ctx: &Context) {
    admin_secrets::cleaned(ctx, stack);
    if let Some(namespace) = stack.namespace() {
        admin_secrets::release_unreferenced(ctx, &namespace).await;
    }
}

/// Drops what the operator keeps about a stack whose finalizer it releases: its stage states
/// (so `operator_stacks` counts it no more), its provisioning cache, scaler memory, failure
/// count and Event recorder, the pod templates its Deployments were Available with, and the
/// fingerprints of the objects it applied for it.
fn forget(stack: &MiddlewareStack, ctx: &Context) {
    let key = ObjectRef::from_obj(stack);
    {
        let mut all = ctx.stage_states.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(&key);
        record_stage_gauges(&all);
    }
    provision::forget(ctx, stack);
    dereference::forget(ctx, stack);
    dereference::release_clients(ctx, stack);
    scaling::forget_stack(ctx, &key);
    waves::forget(ctx, &key);
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    ctx.recorders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    // An invalid stack never had objects applied.
    let Ok(validated) = validate(stack) else {
        return;
    };
    let namespace = validated.namespace();
    let mut keys = vec![
        object_key::<ConfigMap>(namespace, &build::endpoints_name(validated.name())),
        object_key::<NetworkPolicy>(namespace, &build::network_policy_name(validated.name())),
        object_key::<Secret>(namespace, &build::redis_secret_name(&validated)),
        object_key::<Secret>(namespace, &build::postgres_secret_name(&validated)),
    ];
    for component in Component::ALL {
        let name = build::object_name(&validated, component);
        keys.extend([
            object_key::<Deployment>(namespace, &name),
            object_key::<Service>(namespace, &name),
            object_key::<ConfigMap>(namespace, &name),
            object_key::<PodDisruptionBudget>(namespace, &name),
            object_key::<HorizontalPodAutoscaler>(namespace, &name),
        ]);
    }
    let mut applied = ctx.applied.lock().unwrap_or_else(|p| p.into_inner());
    let mut templates = ctx
        .available_templates
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for key in keys {
        templates.remove(&key);
        applied.remove(&key);
    }
}

/// Deletes the topics, database and credentials `spec.deletionPolicy` does not retain.
async fn cleanup_external(stack: &MiddlewareStack, ctx: &Context) -> Result<(), Error> {
    let policy = &stack.spec.deletion_policy;
    if [policy.topics, policy.database, policy.credentials]
        .iter()
        .all(|p| *p == Retention::Retain)
    {
        return Ok(());
    }
    // An invalid stack never provisioned anything.
    let Ok(validated) = validate(stack) else {
        return Ok(());
    };
    let refs = match dereference::admin_credentials(ctx, &validated).await {
        Ok(refs) => refs,
        Err(error) => match dereference::remembered(ctx, stack) {
            Some(refs) => {
                tracing::info!(
                    stack = %ObjectRef::from_obj(stack),
                    error = %Chain(&error),
                    "Cleaning up with the admin credentials the stack last used."
                );
                refs
            }
            None => return Err(error.into()),
        },
    };
    let clients = dereference::dependencies(ctx, &validated, &refs).await?;
    let timeout = ctx.settings.dependency_timeout;
    if policy.topics == Retention::Delete {
        let names: Vec<String> = provision::desired_topics(&validated)
            .into_iter()
            .map(|t| t.name)
            .collect();
        clients
            .kafka
            .delete_topics(&names, timeout)
            .await
            .map_err(Error::DeleteTopics)?;
    }
    let database = names::postgres_database(&validated);
    let postgres_error = |source| Error::DropPostgresRole {
        database: database.clone(),
        source,
    };
    if policy.database == Retention::Delete {
        clients
            .postgres
            .drop_database(&database)
            .await
            .map_err(postgres_error)?;
    }
    if policy.credentials == Retention::Delete {
        let user = names::redis_user(&validated);
        let persistence =
            clients
                .redis
                .delete_user(&user)
                .await
                .map_err(|source| Error::DeleteRedisUser {
                    user: user.clone(),
                    source,
                })?;
        super::provision::log_acl_change(&user, "deleted", persistence);
        if validated.kafka_principal() == ServicePrincipal::Stack {
            let user = names::kafka_user(&validated);
            let second = names::kafka_second_user(&validated);
            clients
                .kafka
                .remove_principal(&[&user, &second], timeout)
                .await
                .map_err(|source| Error::DeleteKafkaPrincipal { user, source })?;
        }
        let owner = names::postgres_role(&validated);
        let second = names::postgres_second_login(&validated);
        let result = if policy.database == Retention::Delete {
            clients.postgres.drop_roles(&[&second, &owner]).await
        } else {
            // The retained database keeps its owner; only logging in as it ends.
            match clients.postgres.drop_roles(&[&second]).await {
                Ok(()) => clients.postgres.revoke_login(&owner).await,
                Err(error) => Err(error),
            }
        };
        result.map_err(postgres_error)?;
    }
    Ok(())
}

/// What the cleanup of `validated` was to remove, per its `deletionPolicy`, for a user who
/// has to remove it by hand.
fn leftovers(validated: &ValidatedStack) -> String {
    let spec = validated.spec();
    let policy = &spec.deletion_policy;
    let mut left = Vec::new();
    if policy.topics == Retention::Delete {
        let topics: Vec<String> = provision::desired_topics(validated)
            .into_iter()
            .map(|t| t.name)
            .collect();
        left.push(format!(
            "Kafka topics {} on {}",
            topics.join(", "),
            spec.kafka.bootstrap_servers
        ));
    }
    let server = format!("{}:{}", spec.postgres.host, spec.postgres.port);
    let database = names::postgres_database(validated);
    if policy.database == Retention::Delete {
        left.push(format!("PostgreSQL database {database} on {server}"));
    }
    if policy.credentials == Retention::Delete {
        left.push(format!(
            "Redis ACL user {} on {}",
            names::redis_user(validated),
            spec.redis.url
        ));
        if validated.kafka_principal() == ServicePrincipal::Stack {
            left.push(format!(
                "Kafka SCRAM logins {} and {} and their ACLs on {}",
                names::kafka_user(validated),
                names::kafka_second_user(validated),
                spec.kafka.bootstrap_servers
            ));
        }
        let owner = names::postgres_role(validated);
        let second = names::postgres_second_login(validated);
        left.push(if policy.database == Retention::Delete {
            format!("PostgreSQL roles {owner} and {second} on {server}")
        } else {
            format!("PostgreSQL role {second}, and the login of role {owner}, on {server}")
        });
    }
    if left.is_empty() {
        "nothing".to_owned()
    } else {
        left.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_name_what_the_policy_deletes() {
        let mut stack = crate::fixtures::example();
        let left = leftovers(&crate::fixtures::validated(&stack));
        assert!(left.starts_with("Redis ACL user meridian:"), "{left}");
        assert!(left.contains("the login of role mws_"), "{left}");
        assert!(
            !left.contains("topics") && !left.contains("database"),
            "{left}"
        );

        stack.spec.deletion_policy.topics = Retention::Delete;
        stack.spec.deletion_policy.database = Retention::Delete;
        let left = leftovers(&crate::fixtures::validated(&stack));
        assert!(left.starts_with("Kafka topics "), "{left}");
        assert!(left.contains("PostgreSQL database mws_"), "{left}");
        assert!(left.contains("PostgreSQL roles mws_"), "{left}");

        stack.spec.deletion_policy.credentials = Retention::Retain;
        stack.spec.deletion_policy.database = Retention::Retain;
        stack.spec.deletion_policy.topics = Retention::Retain;
        assert_eq!(leftovers(&crate::fixtures::validated(&stack)), "nothing");
    }
}
