//! The stack's external state: Kafka topics ([`kafka`]), the Redis ACL user ([`redis`]) and
//! the PostgreSQL role and database ([`postgres`]), each reached with the admin credentials
//! from the Secrets the stack refers to. Every call is bounded by a timeout, and every error
//! says which dependency failed without ever carrying a password.
use std::time::Duration;

use secrecy::SecretString;

pub mod kafka;
pub mod postgres;
pub mod redis;

/// A user name and password read from an admin credentials Secret.
#[derive(Clone, Debug)]
pub struct AdminCredentials {
    /// The `username` key.
    pub username: String,
    /// The `password` key (may be empty: a `nopass` Redis user).
    pub password: SecretString,
}

/// Why talking to a dependency failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Kafka refused or failed a request.
    #[error("Kafka: {0}")]
    Kafka(String),
    /// Redis refused or failed a command.
    #[error("Redis: {0}")]
    Redis(String),
    /// PostgreSQL refused or failed a statement.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// A dependency did not answer in time.
    #[error("{dependency} did not answer within {timeout:?}")]
    Timeout {
        /// `Kafka`, `Redis` or `PostgreSQL`.
        dependency: &'static str,
        /// The bound that passed.
        timeout: Duration,
    },
}

impl ProvisionError {
    /// The condition reason for this error (`KafkaUnavailable`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kafka(_)
            | Self::Timeout {
                dependency: "Kafka",
                ..
            } => "KafkaUnavailable",
            Self::Redis(_)
            | Self::Timeout {
                dependency: "Redis",
                ..
            } => "RedisUnavailable",
            Self::Postgres(_) | Self::Timeout { .. } => "PostgresUnavailable",
        }
    }
}

/// Runs `future` with a timeout, naming `dependency` when it passes.
pub(crate) async fn bounded<T>(
    dependency: &'static str,
    timeout: Duration,
    future: impl Future<Output = Result<T, ProvisionError>>,
) -> Result<T, ProvisionError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| ProvisionError::Timeout {
            dependency,
            timeout,
        })?
}

/// A random password of 32 ASCII letters and digits (about 190 bits): safe in any URL and
/// in SQL string literals without escaping.
pub fn generate_password() -> SecretString {
    use rand::Rng as _;
    use rand::distr::Alphanumeric;
    let password: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    SecretString::from(password)
}
