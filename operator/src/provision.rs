//! The stack's external state: Kafka topics ([`kafka`]), the Redis ACL user ([`redis`]) and
//! the PostgreSQL role and database ([`postgres`]), each reached with the admin credentials
//! from the Secrets the stack refers to. Every call is bounded by a timeout, and every error
//! says which dependency failed without ever carrying a password.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use secrecy::SecretString;

pub mod kafka;
pub mod postgres;
pub mod redis;

#[cfg(test)]
mod tests;

/// Clients shared by the stacks that reach one dependency with the same credentials (a Kafka
/// admin client and its threads, a PostgreSQL pool), each dropped as soon as no stack uses it:
/// when the last one moves to other settings or credentials, or is deleted.
pub struct SharedClients<V> {
    inner: Mutex<Shared<V>>,
}

struct Shared<V> {
    /// Client key → the client.
    clients: HashMap<String, V>,
    /// Stack → the key of the client it uses.
    users: HashMap<String, String>,
}

impl<V> Default for SharedClients<V> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Shared {
                clients: HashMap::new(),
                users: HashMap::new(),
            }),
        }
    }
}

impl<V: Clone> SharedClients<V> {
    /// The client under `key` for the stack `user`, created with `create` if none exists; the
    /// client `user` used before, if another, is dropped when no stack uses it any more.
    ///
    /// # Errors
    /// What `create` returns.
    pub fn get<E>(
        &self,
        user: &str,
        key: String,
        create: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        let mut shared = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let client = match shared.clients.get(&key) {
            Some(client) => client.clone(),
            None => {
                let client = create()?;
                shared.clients.insert(key.clone(), client.clone());
                client
            }
        };
        if let Some(previous) = shared.users.insert(user.to_owned(), key) {
            shared.evict_unused(&previous);
        }
        Ok(client)
    }

    /// Forgets that the stack `user` uses a client; the client goes when no stack does.
    pub fn release(&self, user: &str) {
        let mut shared = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = shared.users.remove(user) {
            shared.evict_unused(&previous);
        }
    }

    /// How many clients are kept.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clients
            .len()
    }

    /// Whether no client is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V> Shared<V> {
    fn evict_unused(&mut self, key: &str) {
        if !self.users.values().any(|k| k == key) && self.clients.remove(key).is_some() {
            tracing::debug!("Dropped a dependency client no stack uses any more.");
        }
    }
}

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
