//! The CAs a stack may name for its dependencies' server certificates
//! (`kafka.tls.caSecretRef`, `redis.caSecretRef`, `postgres.caSecretRef`): each is mounted,
//! read-only, into the pods of the services that use that dependency, at
//! `/etc/meridian/<dependency>/ca.crt`, and the services are pointed at that file
//! (`KAFKA_SSL_CA_LOCATION`, `REDIS_CA_FILE`, `sslrootcert` in `DATABASE_URL`).
use k8s_openapi::api::core::v1::{KeyToPath, SecretVolumeSource, Volume, VolumeMount};

use super::Component;
use crate::crd::{MiddlewareStackSpec, SecretKeyRef};
use crate::validate::ValidatedStack;

/// The name of every CA file in its directory.
const FILE: &str = "ca.crt";

/// A dependency whose server certificate may chain to a CA the stack names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ca {
    /// `kafka.tls.caSecretRef`.
    Kafka,
    /// `redis.caSecretRef`.
    Redis,
    /// `postgres.caSecretRef`.
    Postgres,
}

impl Ca {
    /// Every dependency, in the order their volumes appear in a pod.
    pub const ALL: [Self; 3] = [Self::Kafka, Self::Redis, Self::Postgres];

    /// The field that names the CA, as messages quote it.
    pub fn field(self) -> &'static str {
        match self {
            Self::Kafka => "kafka.tls.caSecretRef",
            Self::Redis => "redis.caSecretRef",
            Self::Postgres => "postgres.caSecretRef",
        }
    }

    /// The stack's reference to the CA, if it names one.
    pub fn secret_ref(self, spec: &MiddlewareStackSpec) -> Option<&SecretKeyRef> {
        match self {
            Self::Kafka => spec
                .kafka
                .tls
                .as_ref()
                .and_then(|t| t.ca_secret_ref.as_ref()),
            Self::Redis => spec.redis.ca_secret_ref.as_ref(),
            Self::Postgres => spec.postgres.ca_secret_ref.as_ref(),
        }
    }

    /// Whether `component` talks to the dependency.
    pub fn used_by(self, component: Component) -> bool {
        match self {
            Self::Kafka => component.uses_kafka(),
            Self::Redis => component.uses_redis(),
            Self::Postgres => component.uses_postgres(),
        }
    }

    /// The name of the CA's volume in a service's pods.
    pub fn volume(self) -> &'static str {
        match self {
            Self::Kafka => "kafka-ca",
            Self::Redis => "redis-ca",
            Self::Postgres => "postgres-ca",
        }
    }

    /// The directory the CA's volume is mounted at.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Kafka => "/etc/meridian/kafka",
            Self::Redis => "/etc/meridian/redis",
            Self::Postgres => "/etc/meridian/postgres",
        }
    }

    /// The CA file in a service's pods.
    pub fn path(self) -> String {
        format!("{}/{FILE}", self.dir())
    }

    /// The setting that points a service at [`Self::path`], where one does (PostgreSQL's is
    /// `sslrootcert` in the connection URL instead).
    pub fn variable(self) -> Option<&'static str> {
        match self {
            Self::Kafka => Some("KAFKA_SSL_CA_LOCATION"),
            Self::Redis => Some("REDIS_CA_FILE"),
            Self::Postgres => None,
        }
    }

    /// The CA's reference when `component`'s pods mount it: the stack names one and the
    /// service uses the dependency.
    pub fn mounted_by(self, stack: &ValidatedStack, component: Component) -> Option<&SecretKeyRef> {
        self.secret_ref(stack.spec())
            .filter(|_| self.used_by(component))
    }
}

/// The CA volumes of `component`'s pods: one per dependency it uses whose CA the stack names,
/// holding just that Secret key as [`Ca::path`].
pub(super) fn volumes(stack: &ValidatedStack, component: Component) -> Vec<Volume> {
    Ca::ALL
        .into_iter()
        .filter_map(|ca| {
            let reference = ca.mounted_by(stack, component)?;
            Some(Volume {
                name: ca.volume().to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(reference.name.clone()),
                    items: Some(vec![KeyToPath {
                        key: reference.key.clone(),
                        path: FILE.to_owned(),
                        ..KeyToPath::default()
                    }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            })
        })
        .collect()
}

/// The read-only mounts of [`volumes`].
pub(super) fn volume_mounts(stack: &ValidatedStack, component: Component) -> Vec<VolumeMount> {
    Ca::ALL
        .into_iter()
        .filter(|ca| ca.mounted_by(stack, component).is_some())
        .map(|ca| VolumeMount {
            name: ca.volume().to_owned(),
            mount_path: ca.dir().to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        })
        .collect()
}
