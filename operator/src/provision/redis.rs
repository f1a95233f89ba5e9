//! Redis: `PING` with the admin credentials, and the stack's ACL user, confined to the stack's
//! key prefix (`~<prefix>*`) and channel prefix (`&<prefix>*`), allowed only the commands the
//! services send (`common::redis_acl`: no `SCAN`, `KEYS`, `FLUSHALL`, `CONFIG`, ...).
//!
//! When the server keeps its users in an ACL file (`aclfile`), every change the operator
//! makes is written there with `ACL SAVE`, so a restarted Redis loads the stack users itself
//! instead of refusing the services until the operator's next health check re-creates them.
//! Without an ACL file the users live in memory only, and that re-creation is what restores
//! them.
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use super::{AdminCredentials, ProvisionError, bounded};

/// Whether an ACL change reached the server's ACL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing changed, so there was nothing to save.
    Unchanged,
    /// `ACL SAVE` wrote the change to the ACL file.
    Saved,
    /// The server has no ACL file: the change lives in memory until Redis restarts.
    InMemory,
}

/// The error Redis answers `ACL SAVE` with when it runs without an `aclfile`.
const NO_ACL_FILE: &str = "not configured to use an ACL file";

/// The admin connection of one Redis server.
pub struct RedisAdmin {
    client: redis::Client,
    timeout: Duration,
}

fn redis_error(error: &redis::RedisError) -> ProvisionError {
    ProvisionError::Redis(error.to_string())
}

/// `url` with `username`/`password` inserted (an empty password inserts nothing: the
/// server's `default` user without a password).
pub fn url_with_credentials(
    url: &str,
    username: &str,
    password: &str,
) -> Result<SecretString, ProvisionError> {
    let mut url =
        Url::parse(url).map_err(|e| ProvisionError::Redis(format!("invalid redis.url: {e}")))?;
    if !password.is_empty() {
        url.set_username(username)
            .and_then(|()| url.set_password(Some(password)))
            .map_err(|()| ProvisionError::Redis("redis.url cannot carry credentials".to_owned()))?;
    }
    Ok(SecretString::from(url.to_string()))
}

impl RedisAdmin {
    /// An admin connection to `url` as `credentials` (connects lazily, per call); a
    /// `rediss://` server's certificate must chain to `ca_pem` (PEM certificates) where given,
    /// else to the system's roots.
    pub fn new(
        url: &str,
        credentials: &AdminCredentials,
        ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ProvisionError> {
        let url = url_with_credentials(
            url,
            &credentials.username,
            credentials.password.expose_secret(),
        )?;
        let client = common::redis::client_trusting(
            url.expose_secret(),
            ca_pem.map(|pem| pem.as_bytes().to_vec()),
        )
        .map_err(|e| redis_error(&e))?;
        Ok(Self { client, timeout })
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, ProvisionError> {
        self.client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| redis_error(&e))
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), ProvisionError> {
        bounded("Redis", self.timeout, async {
            let mut conn = self.connection().await?;
            let _: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(())
        })
        .await
    }

    /// Creates or updates the ACL user `user`: enabled, with `passwords` (all accepted; on
    /// rotation the previous one stays valid until the pods have rolled), keys and channels
    /// under `prefix`. With `reset_passwords`, every other password is removed first. When
    /// this changed the user (compared with `ACL GETUSER` in the same round trip), the ACL
    /// file is saved if the server has one.
    pub async fn ensure_user(
        &self,
        user: &str,
        prefix: &str,
        passwords: &[&SecretString],
        reset_passwords: bool,
    ) -> Result<Persistence, ProvisionError> {
        bounded("Redis", self.timeout, async {
            let mut conn = self.connection().await?;
            let mut set = redis::cmd("ACL");
            set.arg("SETUSER").arg(user).arg("on");
            if reset_passwords {
                set.arg("resetpass");
            }
            for password in passwords {
                set.arg(format!(">{}", password.expose_secret()));
            }
            set.arg(common::redis_acl::rules(prefix));
            let mut get = redis::cmd("ACL");
            get.arg("GETUSER").arg(user);
            let (before, (), after): (redis::Value, (), redis::Value) = redis::pipe()
                .add_command(get.clone())
                .add_command(set)
                .add_command(get)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            if before == after {
                return Ok(Persistence::Unchanged);
            }
            save(&mut conn).await
        })
        .await
    }

    /// Deletes the ACL user (and so disconnects its clients), saving the ACL file if the
    /// server has one; a missing user is fine.
    pub async fn delete_user(&self, user: &str) -> Result<Persistence, ProvisionError> {
        bounded("Redis", self.timeout, async {
            let mut conn = self.connection().await?;
            let deleted: i64 = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(user)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            if deleted == 0 {
                return Ok(Persistence::Unchanged);
            }
            save(&mut conn).await
        })
        .await
    }
}

/// `ACL SAVE`, where the server has an ACL file to save to.
async fn save(conn: &mut redis::aio::MultiplexedConnection) -> Result<Persistence, ProvisionError> {
    match redis::cmd("ACL").arg("SAVE").query_async::<()>(conn).await {
        Ok(()) => Ok(Persistence::Saved),
        Err(error) if error.to_string().contains(NO_ACL_FILE) => Ok(Persistence::InMemory),
        Err(error) => Err(ProvisionError::Redis(format!(
            "the ACL change was made but ACL SAVE failed: {error}"
        ))),
    }
}
