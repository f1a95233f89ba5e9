//! Stage 3, *credentials*: the Redis ACL user, the PostgreSQL role and database, and the
//! connection Secrets the services read them from; new passwords when the stack's
//! [`ROTATE_ANNOTATION`] asks for them.
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use secrecy::{ExposeSecret as _, SecretString};

use super::Error;
use crate::build::{self, URL_KEY};
use crate::controller::dereference::Clients;
use crate::controller::{Context, ROTATE_ANNOTATION, apply, status};
use crate::crd::{MiddlewareStack, ServicePrincipal};
use crate::names;
use crate::owned::Owned;
use crate::provision::generate_password;
use crate::provision::kafka::STACK_MECHANISM;
use crate::provision::redis::Persistence;
use crate::status::{CREDENTIALS_READY, Report, Status};
use crate::validate::ValidatedStack;

/// What the credentials stage did.
pub(in crate::controller) struct Credentials {
    /// The fingerprint of the connection Secrets' contents (stamped on the pod templates).
    pub(in crate::controller) hash: String,
    /// `CredentialsReady=True`.
    pub(in crate::controller) report: Report,
    /// `CredentialsRotated` when a rotation gave new passwords.
    pub(in crate::controller) events: Vec<Event>,
}

/// Provisions the Redis ACL user, the PostgreSQL role and database, and writes the connection
/// Secrets.
pub(in crate::controller) async fn credentials(
    ctx: &Context,
    stack: &MiddlewareStack,
    validated: &ValidatedStack,
    clients: &Clients,
) -> Result<Credentials, Error> {
    let spec = validated.spec();
    let token = stack.annotations().get(ROTATE_ANNOTATION).cloned();
    let lookup = |name: &str| {
        ctx.stores
            .secrets
            .get(&ObjectRef::new(name).within(validated.namespace()))
    };
    let redis_secret = lookup(&build::redis_secret_name(validated));
    let postgres_secret = lookup(&build::postgres_secret_name(validated));
    let rotate_of = |secret: Option<&Owned<Secret>>| {
        let applied = secret.and_then(|s| s.state.rotated.clone());
        token.is_some() && applied != token
    };

    // Redis: keep the password unless rotating; a rotation keeps the previous password valid
    // too, so pods that still run with it keep working until they have rolled.
    let previous = redis_secret
        .as_ref()
        .and_then(|s| s.value("password"))
        .map(SecretString::from);
    let rotate_redis = previous.is_some() && rotate_of(redis_secret.as_deref());
    let redis_password = match (&previous, rotate_redis) {
        (Some(p), false) => p.clone(),
        _ => generate_password(),
    };
    let user = names::redis_user(validated);
    let passwords: Vec<&SecretString> = match (&previous, rotate_redis) {
        (Some(p), true) => vec![p, &redis_password],
        _ => vec![&redis_password],
    };
    let persistence = clients
        .redis
        .ensure_user(
            &user,
            &validated.redis_key_prefix(),
            &passwords,
            previous.is_none() || rotate_redis,
        )
        .await
        .map_err(|source| Error::RedisUser {
            user: user.clone(),
            source,
        })?;
    log_acl_change(&user, "updated", persistence);
    let redis_url = crate::provision::redis::url_with_credentials(
        &spec.redis.url,
        &user,
        redis_password.expose_secret(),
    )
    .map_err(Error::RedisUrl)?;

    // PostgreSQL: two logins take turns ([`take_turns`], `names::postgres_second_login`).
    let role = names::postgres_role(validated);
    let second = names::postgres_second_login(validated);
    let database = names::postgres_database(validated);
    let Turn {
        login,
        password: postgres_password,
        rotated: rotate_postgres,
        new: new_postgres,
    } = take_turns(postgres_secret.as_deref(), &role, &second, &rotate_of);
    clients
        .postgres
        .ensure_role_and_database(
            &role,
            &database,
            login,
            &postgres_password,
            new_postgres || rotate_postgres,
        )
        .await
        .map_err(|source| Error::PostgresRole {
            role: role.clone(),
            source,
        })?;
    let postgres_ca = build::Ca::Postgres
        .secret_ref(spec)
        .map(|_| build::Ca::Postgres.path());
    let postgres_url = crate::provision::postgres::service_url(
        &spec.postgres,
        login,
        &database,
        postgres_password.expose_secret(),
        postgres_ca.as_deref(),
    );

    let redis_secret = build::connection_secret(
        validated,
        build::redis_secret_name(validated),
        token.as_deref(),
        [
            (URL_KEY, redis_url.expose_secret()),
            ("username", &user),
            ("password", redis_password.expose_secret()),
        ],
    );
    let postgres_secret = build::connection_secret(
        validated,
        build::postgres_secret_name(validated),
        token.as_deref(),
        [
            (URL_KEY, &postgres_url),
            ("username", login),
            ("password", postgres_password.expose_secret()),
        ],
    );
    let mut events = Vec::new();
    let kafka = if validated.kafka_principal() == ServicePrincipal::Stack {
        Some(kafka_principal(ctx, validated, clients, token.as_deref(), &rotate_of).await?)
    } else {
        events.extend(retire_kafka_principal(ctx, validated, clients).await?);
        None
    };
    apply::apply(ctx, &ctx.stores.secrets, redis_secret).await?;
    apply::apply(ctx, &ctx.stores.secrets, postgres_secret).await?;
    if let Some(kafka) = &kafka {
        apply::apply(ctx, &ctx.stores.secrets, kafka.secret.clone()).await?;
    }
    let rotated_kafka = kafka
        .as_ref()
        .filter(|k| k.rotated)
        .map(|k| k.login.as_str());
    if rotate_redis || rotate_postgres || rotated_kafka.is_some() {
        let kafka_login = rotated_kafka
            .map(|login| format!(", Kafka login {login}"))
            .unwrap_or_default();
        events.push(status::event(
            EventType::Normal,
            "CredentialsRotated",
            "RotateCredentials",
            format!(
                "new passwords for Redis user {user}, PostgreSQL login {login}{kafka_login}; the \
                 pods roll onto them, and the previous passwords keep working until the next \
                 rotation"
            ),
        ));
    }
    let kafka_summary = kafka
        .as_ref()
        .map(|k| {
            format!(
                ", Kafka principal {} (topics and groups {}*, services log in as {})",
                names::kafka_user(validated),
                validated.topic_prefix(),
                k.login
            )
        })
        .unwrap_or_default();
    let report = Report::new(
        CREDENTIALS_READY,
        Status::True,
        "Provisioned",
        format!(
            "Redis user {user} (keys and channels {}*), PostgreSQL role and database {role} \
             (services log in as {login}){kafka_summary}",
            validated.redis_key_prefix()
        ),
    );
    let kafka_password = kafka
        .as_ref()
        .map(|k| k.password.expose_secret().to_owned())
        .unwrap_or_default();
    Ok(Credentials {
        hash: build::fingerprint([
            redis_url.expose_secret().as_bytes(),
            postgres_url.as_bytes(),
            kafka_password.as_bytes(),
        ]),
        report,
        events,
    })
}

/// The login a stack's services use, of two that take turns.
struct Turn<'a> {
    /// The login.
    login: &'a String,
    /// Its password: the stored one, or a new one.
    password: SecretString,
    /// Whether a rotation switched to the other login (with a new password).
    rotated: bool,
    /// Whether there was no password yet (a new one was generated).
    new: bool,
}

/// Two logins take turns (PostgreSQL allows one password per role, Kafka one SCRAM
/// credential per user): a rotation gives the one the services do not use a new password and
/// switches the connection Secret to it, so pods still on the other keep working until they
/// have rolled. Without a rotation the Secret's login and password stay.
fn take_turns<'a>(
    secret: Option<&Owned<Secret>>,
    primary: &'a String,
    second: &'a String,
    rotate_of: &(dyn Fn(Option<&Owned<Secret>>) -> bool + Sync),
) -> Turn<'a> {
    let previous = secret
        .and_then(|s| s.value("password"))
        .map(SecretString::from);
    let rotated = previous.is_some() && rotate_of(secret);
    let in_use = match secret.and_then(|s| s.value("username")) {
        Some(user) if user == *second => second,
        _ => primary,
    };
    let (login, password) = match (&previous, rotated) {
        (Some(p), false) => (in_use, p.clone()),
        (Some(_), true) if in_use == primary => (second, generate_password()),
        _ => (primary, generate_password()),
    };
    Turn {
        login,
        password,
        rotated,
        new: previous.is_none(),
    }
}

/// A stack that no longer asks for a Kafka principal of its own (`servicePrincipal: None`)
/// but had one (its `<stack>-kafka` Secret is there): its logins and ACLs are removed (with the
/// operator's admin login; without one they cannot be, and the Event says so), then the Secret,
/// so no valid login to the stack's topics is left behind. Returns the Event.
async fn retire_kafka_principal(
    ctx: &Context,
    validated: &ValidatedStack,
    clients: &Clients,
) -> Result<Option<Event>, Error> {
    let name = build::kafka_secret_name(validated);
    if ctx
        .stores
        .secrets
        .get(&ObjectRef::new(&name).within(validated.namespace()))
        .is_none()
    {
        return Ok(None);
    }
    let primary = names::kafka_user(validated);
    let second = names::kafka_second_user(validated);
    let removed = clients.kafka.has_admin_login();
    if removed {
        clients
            .kafka
            .remove_principal(&[&primary, &second], ctx.settings.dependency_timeout)
            .await
            .map_err(|source| Error::KafkaPrincipal {
                user: primary.clone(),
                source,
            })?;
    }
    let secrets: kube::Api<Secret> =
        kube::Api::namespaced(ctx.client.clone(), validated.namespace());
    match secrets.delete(&name, &Default::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(source) => {
            return Err(Error::ConnectionSecret(apply::Error::Patch {
                key: apply::describe::<Secret>(validated.namespace(), &name),
                source,
            }));
        }
    }
    tracing::info!(user = %primary, removed, "Kafka principal retired (servicePrincipal: None)");
    let note = if removed {
        format!(
            "servicePrincipal is None: removed Kafka logins {primary} and {second} with their \
             ACLs, and Secret {name}"
        )
    } else {
        format!(
            "servicePrincipal is None: deleted Secret {name}; Kafka logins {primary} and \
             {second} are left on the cluster (no kafka.adminSecretRef to remove them with)"
        )
    };
    Ok(Some(status::event(
        EventType::Normal,
        "KafkaPrincipalRetired",
        "RetireKafkaPrincipal",
        note,
    )))
}

/// The stack's Kafka login as provisioned.
struct KafkaLogin {
    /// The `<stack>-kafka` Secret.
    secret: Secret,
    /// The login the services use.
    login: String,
    password: SecretString,
    /// Whether a rotation gave it a new password.
    rotated: bool,
}

/// The stack's Kafka principal: two SCRAM logins taking turns like PostgreSQL's (a rotation
/// sets a new password on the one the services do not use and switches them to it), with the
/// ACLs that confine both to the stack's topics and groups.
async fn kafka_principal(
    ctx: &Context,
    validated: &ValidatedStack,
    clients: &Clients,
    token: Option<&str>,
    rotate_of: &(dyn Fn(Option<&Owned<Secret>>) -> bool + Sync),
) -> Result<KafkaLogin, Error> {
    let name = build::kafka_secret_name(validated);
    let existing = ctx
        .stores
        .secrets
        .get(&ObjectRef::new(&name).within(validated.namespace()));
    let primary = names::kafka_user(validated);
    let second = names::kafka_second_user(validated);
    let Turn {
        login,
        password,
        rotated: rotate,
        new,
    } = take_turns(existing.as_deref(), &primary, &second, rotate_of);
    let changed = clients
        .kafka
        .ensure_principal(
            &[&primary, &second],
            login,
            &password,
            new || rotate,
            &validated.topic_prefix(),
            ctx.settings.dependency_timeout,
        )
        .await
        .map_err(|source| Error::KafkaPrincipal {
            user: login.clone(),
            source,
        })?;
    if changed {
        tracing::info!(user = %login, "Kafka principal provisioned (SCRAM credential, ACLs)");
    }
    let secret = build::connection_secret(
        validated,
        name,
        token,
        [
            ("username", login),
            ("password", password.expose_secret()),
            ("mechanism", STACK_MECHANISM),
        ],
    );
    Ok(KafkaLogin {
        secret,
        login: login.clone(),
        password,
        rotated: rotate,
    })
}

/// Logs where a changed ACL user now lives (nothing when nothing changed).
pub(in crate::controller) fn log_acl_change(user: &str, change: &str, persistence: Persistence) {
    match persistence {
        Persistence::Unchanged => {}
        Persistence::Saved => {
            tracing::info!(
                user,
                change,
                "Redis ACL user {change}; saved to the ACL file"
            );
        }
        Persistence::InMemory => tracing::info!(
            user,
            change,
            "Redis ACL user {change} in memory only (the server has no aclfile): \
             re-created after a Redis restart"
        ),
    }
}
