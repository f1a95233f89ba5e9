//! The PostgreSQL server.
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::{SecretKeyRef, SecretRef};

/// The PostgreSQL server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.caSecretRef) || !has(self.sslMode) || self.sslMode != 'disable'").message(
    "postgres.caSecretRef needs TLS: it cannot go with sslMode disable"
))]
pub struct PostgresSpec {
    /// The server's host name or IP address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// The server's port (1 to 65535).
    #[serde(default = "default_postgres_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The database the operator connects to with the admin credentials (for example
    /// `postgres`). The stack's services get their own database, `mws_<namespace>_<name>`
    /// (with a hash suffix when a name has `-` or `.`), owned by the stack's role, which holds
    /// the write model and the outbox. Immutable: the stack's data is found through this
    /// server.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "postgres.database is immutable: moving a stack to another database would abandon its data"
    ))]
    pub database: String,
    /// How the services use TLS to the server (libpq's `sslmode`).
    #[serde(default)]
    pub ssl_mode: SslMode,
    /// A Secret in the stack's namespace with `username` and `password` of a role allowed to
    /// create roles. The stack's services get their own role.
    pub admin_secret_ref: SecretRef,
    /// A key of a Secret in the stack's namespace holding the PEM certificates of the CA the
    /// server's certificate chains to, trusted by the operator and the services (mounted into
    /// their pods) instead of the system's roots; what `sslMode` `verify-ca` and `verify-full`
    /// check against. Not with `sslMode` `disable`. Unset: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// libpq's `sslmode`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS only if the server insists.
    Allow,
    /// TLS if the server supports it.
    #[default]
    Prefer,
    /// TLS, without verifying the certificate.
    Require,
    /// TLS, verifying the certificate's chain.
    VerifyCa,
    /// TLS, verifying the certificate's chain and host name.
    VerifyFull,
}

impl SslMode {
    /// The value libpq and sqlx understand in `?sslmode=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

fn default_postgres_port() -> i32 {
    5432
}
