//! The *dereference* step: the Secrets a stack refers to (the Redis, PostgreSQL and Kafka
//! admin credentials and CAs, the JWT secret), read through a cache that the
//! referenced-Secrets watch keeps current; and whether Kafka, Redis and PostgreSQL answer with
//! those credentials (the *dependencies* stage).
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use secrecy::SecretString;

use super::Context;
use crate::build::Ca;
use crate::crd::MiddlewareStack;
use crate::names;
use crate::provision::kafka::{KafkaAccess, KafkaCluster, KafkaTlsAccess};
use crate::provision::postgres::PostgresAdmin;
use crate::provision::redis::RedisAdmin;
use crate::provision::{AdminCredentials, ProvisionError};
use crate::status::{DEPENDENCIES_READY, Report, Status};
use crate::validate::ValidatedStack;

/// Why the Secrets a stack refers to could not be read, or its dependencies not reached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a Secret from the API server failed.
    #[error("failed to read Secret {name}")]
    ReadSecret {
        /// The Secret's name.
        name: String,
        /// What the API server (or the connection to it) said.
        #[source]
        source: kube::Error,
    },
    /// An admin credentials Secret the stack refers to does not exist.
    #[error("failed to find Secret {name}")]
    SecretNotFound {
        /// The Secret's name.
        name: String,
    },
    /// An admin credentials Secret has no `username` key.
    #[error("failed to find key `username` in Secret {name}")]
    NoUsername {
        /// The Secret's name.
        name: String,
    },
    /// The JWT Secret (`auth.jwtSecretRef`), or its key, does not exist.
    #[error("failed to find key {key} in Secret {name} (auth.jwtSecretRef)")]
    NoJwtSecret {
        /// The Secret's name.
        name: String,
        /// The key.
        key: String,
    },
    /// A CA Secret (`kafka.tls.caSecretRef`, `redis.caSecretRef`, `postgres.caSecretRef`) has
    /// no such key.
    #[error("failed to find key {key} in Secret {name} ({field})")]
    NoCa {
        /// The field that names the Secret.
        field: &'static str,
        /// The Secret's name.
        name: String,
        /// The key.
        key: String,
    },
    /// The Kafka admin client could not be created.
    #[error("failed to create the Kafka admin client")]
    KafkaClient(#[source] ProvisionError),
    /// The Redis admin client could not be created.
    #[error("failed to create the Redis admin client")]
    RedisClient(#[source] ProvisionError),
    /// The PostgreSQL admin pool could not be created.
    #[error("failed to create the PostgreSQL admin pool")]
    PostgresClient(#[source] ProvisionError),
    /// Kafka, Redis or PostgreSQL did not answer with the admin credentials. Every failure is
    /// in the message (they have no single source).
    #[error("failed to reach the stack's dependencies: {}", failures(.first, .rest))]
    Unreachable {
        /// The first dependency that failed (Kafka, then Redis, then PostgreSQL).
        first: ProvisionError,
        /// The others that failed.
        rest: Vec<ProvisionError>,
    },
}

/// The failures of the dependencies, `; `-separated.
fn failures(first: &ProvisionError, rest: &[ProvisionError]) -> String {
    std::iter::once(first)
        .chain(rest)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// The metric label and condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadSecret { .. } => "KubernetesApiError",
            Self::SecretNotFound { .. }
            | Self::NoUsername { .. }
            | Self::NoJwtSecret { .. }
            | Self::NoCa { .. } => "SecretNotFound",
            Self::KafkaClient(error) | Self::RedisClient(error) | Self::PostgresClient(error) => {
                error.reason()
            }
            Self::Unreachable { first, .. } => first.reason(),
        }
    }

    /// The `DependenciesReady=False` condition, except for a failed API request.
    pub(super) fn report(&self) -> Option<Report> {
        let message = match self {
            Self::ReadSecret { .. } => return None,
            Self::SecretNotFound { name } => format!("Secret {name} not found"),
            Self::NoUsername { name } => format!("Secret {name} has no key `username`"),
            Self::NoJwtSecret { name, key } => {
                format!("Secret {name} with key {key} (auth.jwtSecretRef) not found")
            }
            Self::NoCa { field, name, key } => {
                format!("Secret {name} with key {key} ({field}) not found")
            }
            Self::KafkaClient(error) | Self::RedisClient(error) | Self::PostgresClient(error) => {
                error.to_string()
            }
            Self::Unreachable { first, rest } => failures(first, rest),
        };
        Some(Report::new(
            DEPENDENCIES_READY,
            Status::False,
            self.reason(),
            message,
        ))
    }
}

/// Whether the stack reads the named Secret (admin credentials, a CA or the JWT secret): the
/// Secrets [`secrets`] reads.
pub(super) fn refers_to(stack: &MiddlewareStack, name: &str) -> bool {
    let spec = &stack.spec;
    spec.redis.admin_secret_ref.name == name
        || spec.postgres.admin_secret_ref.name == name
        || spec
            .kafka
            .admin_secret_ref
            .as_ref()
            .is_some_and(|r| r.name == name)
        || Ca::ALL
            .into_iter()
            .any(|ca| ca.secret_ref(spec).is_some_and(|r| r.name == name))
        || spec
            .auth
            .as_ref()
            .and_then(|a| a.jwt_secret_ref.as_ref())
            .is_some_and(|r| r.name == name)
}

/// The admin credentials and CAs a stack refers to.
#[derive(Clone)]
pub(super) struct Dereferenced {
    redis: AdminCredentials,
    postgres: AdminCredentials,
    kafka: Option<AdminCredentials>,
    /// The PEM certificates of the CAs the stack names (`caSecretRef`), by dependency.
    cas: Vec<(Ca, String)>,
    /// The resourceVersions of the Secrets read: a change invalidates the provisioning cache.
    pub(super) versions: Vec<String>,
}

impl Dereferenced {
    /// The PEM certificates of the CA the stack names for `dependency`, if it does.
    fn ca(&self, dependency: Ca) -> Option<&str> {
        self.cas
            .iter()
            .find(|(ca, _)| *ca == dependency)
            .map(|(_, pem)| pem.as_str())
    }
}

/// Reads the Secrets the stack refers to: the admin credentials, and whether the JWT secret
/// exists.
pub(super) async fn secrets(
    ctx: &Context,
    validated: &ValidatedStack,
) -> Result<Dereferenced, Error> {
    let mut refs = admin_credentials(ctx, validated).await?;
    let namespace = validated.namespace();
    if let Some(reference) = validated
        .spec()
        .auth
        .as_ref()
        .and_then(|a| a.jwt_secret_ref.as_ref())
    {
        let secret = referenced_secret(ctx, namespace, &reference.name).await?;
        refs.versions
            .extend(secret.as_ref().and_then(|s| s.resource_version()));
        let has_key = secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .is_some_and(|d| d.contains_key(&reference.key));
        if !has_key {
            return Err(Error::NoJwtSecret {
                name: reference.name.clone(),
                key: reference.key.clone(),
            });
        }
    }
    Ok(refs)
}

/// Reads the admin credentials and CAs the stack refers to (all a cleanup needs: the JWT
/// Secret may be gone with its namespace).
pub(super) async fn admin_credentials(
    ctx: &Context,
    validated: &ValidatedStack,
) -> Result<Dereferenced, Error> {
    let namespace = validated.namespace();
    let spec = validated.spec();
    let mut versions = Vec::new();
    let redis = read_credentials(
        ctx,
        namespace,
        &spec.redis.admin_secret_ref.name,
        &mut versions,
    )
    .await?;
    let postgres = read_credentials(
        ctx,
        namespace,
        &spec.postgres.admin_secret_ref.name,
        &mut versions,
    )
    .await?;
    let kafka = match &spec.kafka.admin_secret_ref {
        Some(secret) => Some(read_credentials(ctx, namespace, &secret.name, &mut versions).await?),
        None => None,
    };
    let mut cas = Vec::new();
    for ca in Ca::ALL {
        let Some(reference) = ca.secret_ref(spec) else {
            continue;
        };
        let secret = referenced_secret(ctx, namespace, &reference.name)
            .await?
            .ok_or_else(|| Error::SecretNotFound {
                name: reference.name.clone(),
            })?;
        versions.push(secret.resource_version().unwrap_or_default());
        let pem = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&reference.key))
            .ok_or_else(|| Error::NoCa {
                field: ca.field(),
                name: reference.name.clone(),
                key: reference.key.clone(),
            })?;
        cas.push((ca, String::from_utf8_lossy(&pem.0).into_owned()));
    }
    Ok(Dereferenced {
        redis,
        postgres,
        kafka,
        cas,
        versions,
    })
}

/// A referenced Secret as last read, if it was.
pub(super) fn cached(ctx: &Context, key: &ObjectRef<Secret>) -> Option<Arc<Secret>> {
    ctx.referenced
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned()
}

/// A Secret a stack refers to: from the cache while the watch reports the same
/// resourceVersion, otherwise read from the API server (and cached).
async fn referenced_secret(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Arc<Secret>>, Error> {
    let key = ObjectRef::<Secret>::new(name).within(namespace);
    let watched = ctx
        .secret_versions
        .get(&ObjectRef::new(name).within(namespace))
        .and_then(|meta| meta.resource_version());
    let cached = cached(ctx, &key);
    if let (Some(watched), Some(cached)) = (&watched, cached)
        && cached.resource_version().as_ref() == Some(watched)
    {
        return Ok(Some(cached));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadSecret {
            name: name.to_owned(),
            source,
        })?
        .map(Arc::new);
    let mut cache = ctx.referenced.lock().unwrap_or_else(|p| p.into_inner());
    match &secret {
        Some(secret) => cache.insert(key, Arc::clone(secret)),
        None => cache.remove(&key),
    };
    Ok(secret)
}

async fn read_credentials(
    ctx: &Context,
    namespace: &str,
    name: &str,
    versions: &mut Vec<String>,
) -> Result<AdminCredentials, Error> {
    let secret = referenced_secret(ctx, namespace, name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            name: name.to_owned(),
        })?;
    versions.push(secret.resource_version().unwrap_or_default());
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let username = value("username").ok_or_else(|| Error::NoUsername {
        name: name.to_owned(),
    })?;
    let password = value("password").unwrap_or_default();
    Ok(AdminCredentials {
        username,
        password: SecretString::from(password),
    })
}

/// The admin clients of a stack's dependencies.
pub(super) struct Clients {
    pub(super) kafka: Arc<KafkaCluster>,
    pub(super) redis: RedisAdmin,
    pub(super) postgres: PostgresAdmin,
}

/// How the shared dependency clients know a stack.
fn client_user(validated: &ValidatedStack) -> String {
    format!("{}/{}", validated.namespace(), validated.name())
}

/// Releases the stack's share of the dependency clients (it is deleted).
pub(super) fn release_clients(ctx: &Context, stack: &MiddlewareStack) {
    if let Ok(validated) = crate::validate::validate(stack) {
        let user = client_user(&validated);
        ctx.kafka.release(&user);
        ctx.postgres.release(&user);
    }
}

/// The admin clients of the stack's Kafka cluster (shared with every stack on it).
pub(super) fn kafka(
    ctx: &Context,
    validated: &ValidatedStack,
    refs: &Dereferenced,
) -> Result<Arc<KafkaCluster>, ProvisionError> {
    let spec = &validated.spec().kafka;
    let access = KafkaAccess {
        bootstrap_servers: spec.bootstrap_servers.clone(),
        credentials: refs.kafka.clone(),
        mechanism: spec.admin_mechanism.unwrap_or_default(),
        tls: spec.tls.as_ref().map(|_| KafkaTlsAccess {
            ca_pem: refs.ca(Ca::Kafka).map(str::to_owned),
        }),
    };
    ctx.kafka.cluster(&client_user(validated), &access)
}

/// Stage 1: the admin clients of Kafka, Redis and PostgreSQL, once each has answered (a
/// metadata request, `PING`, `SELECT 1`).
pub(super) async fn dependencies(
    ctx: &Context,
    validated: &ValidatedStack,
    refs: &Dereferenced,
) -> Result<Clients, Error> {
    let spec = validated.spec();
    let timeout = ctx.settings.dependency_timeout;
    let kafka = kafka(ctx, validated, refs).map_err(Error::KafkaClient)?;
    let redis = RedisAdmin::new(
        &spec.redis.url,
        &refs.redis,
        refs.ca(Ca::Redis),
        spec.redis.cluster,
        timeout,
    )
    .map_err(Error::RedisClient)?;
    let postgres = ctx
        .postgres
        .admin(
            &client_user(validated),
            &spec.postgres,
            &refs.postgres,
            refs.ca(Ca::Postgres),
            timeout,
        )
        .map_err(Error::PostgresClient)?;
    let probe_topic = names::topic(validated, names::TOPICS[0]);
    let (k, r, p) = tokio::join!(
        kafka.ping(&probe_topic, timeout),
        redis.ping(),
        postgres.ping()
    );
    let mut failures = [k, r, p].into_iter().filter_map(Result::err);
    if let Some(first) = failures.next() {
        return Err(Error::Unreachable {
            first,
            rest: failures.collect(),
        });
    }
    Ok(Clients {
        kafka,
        redis,
        postgres,
    })
}

/// Keeps `refs` as the admin credentials `stack` last used (see [`remembered`]); copied only
/// when the Secrets they come from changed.
pub(super) fn remember(ctx: &Context, stack: &MiddlewareStack, refs: &Dereferenced) {
    let mut all = ctx
        .admin_credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let key = ObjectRef::from_obj(stack);
    if all.get(&key).map(|known| &known.versions) != Some(&refs.versions) {
        all.insert(key, refs.clone());
    }
}

/// The admin credentials `stack` last used in this process, if any: the cleanup's fallback
/// once the Secrets holding them are gone (a namespace being deleted).
pub(super) fn remembered(ctx: &Context, stack: &MiddlewareStack) -> Option<Dereferenced> {
    ctx.admin_credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&ObjectRef::from_obj(stack))
        .cloned()
}

/// Forgets the admin credentials of `stack` (it is gone).
pub(super) fn forget(ctx: &Context, stack: &MiddlewareStack) {
    ctx.admin_credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&ObjectRef::from_obj(stack));
}
