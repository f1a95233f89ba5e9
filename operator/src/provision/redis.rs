//! Redis: `PING` with the admin credentials, and the stack's ACL user, confined to the stack's
//! key prefix (`~<prefix>*`) and channel prefix (`&<prefix>*`), with every command except the
//! `@dangerous` ones (no `KEYS`, `FLUSHALL`, `CONFIG`, `DEBUG`, `ACL`, ...).
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use super::{AdminCredentials, ProvisionError, bounded};

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
    /// An admin connection to `url` as `credentials` (connects lazily, per call).
    pub fn new(
        url: &str,
        credentials: &AdminCredentials,
        timeout: Duration,
    ) -> Result<Self, ProvisionError> {
        let url = url_with_credentials(
            url,
            &credentials.username,
            credentials.password.expose_secret(),
        )?;
        let client = common::redis::client(url.expose_secret()).map_err(|e| redis_error(&e))?;
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
    /// under `prefix`. With `reset_passwords`, every other password is removed first.
    pub async fn ensure_user(
        &self,
        user: &str,
        prefix: &str,
        passwords: &[&SecretString],
        reset_passwords: bool,
    ) -> Result<(), ProvisionError> {
        bounded("Redis", self.timeout, async {
            let mut conn = self.connection().await?;
            let mut cmd = redis::cmd("ACL");
            cmd.arg("SETUSER").arg(user).arg("on");
            if reset_passwords {
                cmd.arg("resetpass");
            }
            for password in passwords {
                cmd.arg(format!(">{}", password.expose_secret()));
            }
            cmd.arg("resetkeys")
                .arg(format!("~{prefix}*"))
                .arg("resetchannels")
                .arg(format!("&{prefix}*"))
                .arg("-@all")
                .arg("+@all")
                .arg("-@dangerous");
            let _: () = cmd
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(())
        })
        .await
    }

    /// Deletes the ACL user (and so disconnects its clients); a missing user is fine.
    pub async fn delete_user(&self, user: &str) -> Result<(), ProvisionError> {
        bounded("Redis", self.timeout, async {
            let mut conn = self.connection().await?;
            let _: i64 = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(user)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))?;
            Ok(())
        })
        .await
    }
}
