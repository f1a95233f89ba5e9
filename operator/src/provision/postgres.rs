//! PostgreSQL: `SELECT 1` with the admin credentials, and the stack's role (LOGIN, a generated
//! password) owning the stack's own database, which no other role may connect to (`CONNECT`
//! revoked from `PUBLIC`). The services run their migrations in that database.
//!
//! At most [`DROP_DATABASE_CONCURRENCY`] `DROP DATABASE` statements run at once per server,
//! fewer than the admin pool's connections. A burst of them — a namespace of hundreds of stacks
//! deleted at once — would otherwise take every connection and queue inside the server, where
//! each one's timeout runs out while it waits for the others, leaving databases behind.
//! Waiting for the turn does not count against the statement's timeout, and the statement itself
//! gets a longer bound ([`DROP_DATABASE_BOUND`] dependency timeouts) than other DDL: it waits for
//! a checkpoint, which on a busy server takes seconds. The limit is above one because concurrent
//! drops share checkpoints. `CREATE DATABASE` (WAL-logged since PostgreSQL 15, so no
//! checkpoint) runs without a limit.
//!
//! Role and database names are [`crate::names`] identifiers (`[a-z0-9_]`, at most 63 bytes)
//! and passwords are alphanumeric, so both are safe to splice into DDL, which takes no bind
//! parameters.
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Executor as _, PgPool};
use tokio::sync::Semaphore;

use super::{AdminCredentials, ProvisionError, SharedClients, bounded};
use crate::crd::{PostgresSpec, SslMode};

/// How many dependency timeouts one `DROP DATABASE` (see the module docs) may take.
pub const DROP_DATABASE_BOUND: u32 = 10;

/// How many `DROP DATABASE` statements run at once on one server (see the module docs).
pub const DROP_DATABASE_CONCURRENCY: usize = 4;

/// Connections of one server's admin pool; more than [`DROP_DATABASE_CONCURRENCY`], so pings
/// and role changes still get one during a burst of drops.
const ADMIN_POOL_CONNECTIONS: u32 = 8;

fn pg_error(error: &sqlx::Error) -> ProvisionError {
    ProvisionError::Postgres(error.to_string())
}

/// The SQLSTATEs of `CREATE` racing another `CREATE` of the same object.
const ALREADY_EXISTS: [&str; 3] = ["42P04", "42710", "23505"];

fn already_exists(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| ALREADY_EXISTS.contains(&code.as_ref()))
}

/// sqlx's TLS mode for libpq's `sslmode`.
pub fn ssl_mode(mode: SslMode) -> PgSslMode {
    match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Allow => PgSslMode::Allow,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    }
}

/// The admin pools of every server a stack uses (up to eight connections each, shared).
#[derive(Default)]
pub struct PostgresAdmins {
    pools: SharedClients<(PgPool, Arc<Semaphore>)>,
}

impl PostgresAdmins {
    /// The admin pool for `spec` and `credentials` for the stack `user`, created (lazily
    /// connecting) on first use (see [`SharedClients::get`]). The server's certificate must
    /// chain to `ca_pem` (PEM certificates) where given, else to the system's roots; it is
    /// checked with `sslMode` `verify-ca` and `verify-full` only.
    ///
    /// # Errors
    /// Never at the moment; the pool connects on first use.
    pub fn admin(
        &self,
        user: &str,
        spec: &PostgresSpec,
        credentials: &AdminCredentials,
        ca_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<PostgresAdmin, ProvisionError> {
        let fingerprint = |secret: &str| crate::build::fingerprint([secret.as_bytes()]);
        let key = format!(
            "{}|{}|{}|{}|{}|{}|{}",
            spec.host,
            spec.port,
            spec.database,
            spec.ssl_mode.as_str(),
            credentials.username,
            fingerprint(credentials.password.expose_secret()),
            ca_pem.map_or_else(String::new, fingerprint),
        );
        let (pool, databases) = self.pools.get(user, key, || {
            Ok::<_, ProvisionError>({
                let mut options = PgConnectOptions::new()
                    .host(&spec.host)
                    .port(u16::try_from(spec.port).unwrap_or(5432))
                    .username(&credentials.username)
                    .password(credentials.password.expose_secret())
                    .database(&spec.database)
                    .ssl_mode(ssl_mode(spec.ssl_mode))
                    .application_name("meridian-operator");
                if let Some(pem) = ca_pem {
                    options = options.ssl_root_cert_from_pem(pem.as_bytes().to_vec());
                }
                let pool = PgPoolOptions::new()
                    .max_connections(ADMIN_POOL_CONNECTIONS)
                    .min_connections(0)
                    .acquire_timeout(timeout)
                    .idle_timeout(Some(Duration::from_secs(60)))
                    .connect_lazy_with(options);
                (pool, Arc::new(Semaphore::new(DROP_DATABASE_CONCURRENCY)))
            })
        })?;
        Ok(PostgresAdmin {
            pool,
            databases,
            timeout,
        })
    }

    /// Forgets the stack `user` (deleted); a pool no stack uses any more is closed.
    pub fn release(&self, user: &str) {
        self.pools.release(user);
    }

    /// How many pools are kept.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether no pool is kept.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

/// An admin session on one server.
pub struct PostgresAdmin {
    pool: PgPool,
    /// Turns for `DROP DATABASE` on this server (see the module docs).
    databases: Arc<Semaphore>,
    timeout: Duration,
}

impl PostgresAdmin {
    /// `SELECT 1`.
    pub async fn ping(&self) -> Result<(), ProvisionError> {
        bounded("PostgreSQL", self.timeout, async {
            let _: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| pg_error(&e))?;
            Ok(())
        })
        .await
    }

    /// Makes sure the stack's `owner` role exists and owns `database`, to which `PUBLIC` may
    /// not connect, and that `login` — the owner itself or its second login (see
    /// [`crate::names::postgres_second_login`]) — can log in with `password`, which is set when
    /// the login is new or `set_password` is true. The other login's password is left alone:
    /// pods that have not rolled onto the new one keep connecting.
    ///
    /// The second login is a member of the owner and acts as it (`ALTER ROLE … SET role`), so
    /// tables its migrations create belong to the owner, readable after the next rotation.
    /// Passwords travel as SCRAM-SHA-256 verifiers, never in clear text: DDL can end up in the
    /// server log (`log_statement = ddl`) and in `pg_stat_activity`.
    pub async fn ensure_role_and_database(
        &self,
        owner: &str,
        database: &str,
        login: &str,
        password: &SecretString,
        set_password: bool,
    ) -> Result<(), ProvisionError> {
        bounded("PostgreSQL", self.timeout * 2, async {
            let owner_exists = self.role_exists(owner).await?;
            let login_exists = if login == owner {
                owner_exists
            } else {
                self.role_exists(login).await?
            };
            // PBKDF2 only when a password is actually set.
            let with_password = if set_password || !login_exists {
                format!(" PASSWORD '{}'", scram_verifier(password).await?)
            } else {
                String::new()
            };
            let owner_password = if login == owner {
                with_password.as_str()
            } else {
                ""
            };
            if !owner_exists {
                self.create(&format!("CREATE ROLE \"{owner}\" LOGIN{owner_password}"))
                    .await?;
            } else if set_password && login == owner {
                self.execute(&format!("ALTER ROLE \"{owner}\" WITH LOGIN{with_password}"))
                    .await?;
            }
            if login != owner {
                if !login_exists {
                    self.create(&format!(
                        "CREATE ROLE \"{login}\" LOGIN{with_password} IN ROLE \"{owner}\""
                    ))
                    .await?;
                } else if set_password {
                    self.execute(&format!("ALTER ROLE \"{login}\" WITH LOGIN{with_password}"))
                        .await?;
                }
                // Both idempotent; they also repair a login whose membership was revoked.
                self.execute(&format!("GRANT \"{owner}\" TO \"{login}\""))
                    .await?;
                self.execute(&format!("ALTER ROLE \"{login}\" SET role TO \"{owner}\""))
                    .await?;
            }
            Ok(())
        })
        .await?;
        if self.database_exists(database).await? {
            return Ok(());
        }
        bounded("PostgreSQL", self.timeout * 4, async {
            self.create(&format!("CREATE DATABASE \"{database}\" OWNER \"{owner}\""))
                .await?;
            self.execute(&format!(
                "REVOKE CONNECT, TEMPORARY ON DATABASE \"{database}\" FROM PUBLIC"
            ))
            .await
        })
        .await
    }

    /// Drops `database`, disconnecting its sessions; a missing one is fine.
    pub async fn drop_database(&self, database: &str) -> Result<(), ProvisionError> {
        if !self.database_exists(database).await? {
            return Ok(());
        }
        let _turn = self.turn().await?;
        bounded("PostgreSQL", self.timeout * DROP_DATABASE_BOUND, async {
            self.execute(&format!(
                "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
            ))
            .await
        })
        .await
    }

    /// Drops `roles`; missing ones are fine. A role that still owns a database cannot go.
    pub async fn drop_roles(&self, roles: &[&str]) -> Result<(), ProvisionError> {
        let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
        bounded(
            "PostgreSQL",
            self.timeout,
            self.execute(&format!("DROP ROLE IF EXISTS {}", roles.join(", "))),
        )
        .await
    }

    /// Takes `role`'s login away (no `LOGIN`, no password) and ends its sessions; it keeps
    /// what it owns. A missing role is fine.
    pub async fn revoke_login(&self, role: &str) -> Result<(), ProvisionError> {
        if !self.role_exists(role).await? {
            return Ok(());
        }
        bounded("PostgreSQL", self.timeout, async {
            self.execute(&format!("ALTER ROLE \"{role}\" WITH NOLOGIN PASSWORD NULL"))
                .await?;
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            )
            .bind(role)
            .execute(&self.pool)
            .await
            .map_err(|e| pg_error(&e))?;
            Ok(())
        })
        .await
    }

    async fn role_exists(&self, role: &str) -> Result<bool, ProvisionError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| pg_error(&e))
    }

    /// `CREATE …`; one created meanwhile by another reconcile is fine.
    async fn create(&self, statement: &str) -> Result<(), ProvisionError> {
        match self.pool.execute(statement).await {
            Ok(_) => Ok(()),
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => Err(pg_error(&e)),
        }
    }

    async fn execute(&self, statement: &str) -> Result<(), ProvisionError> {
        self.pool
            .execute(statement)
            .await
            .map(drop)
            .map_err(|e| pg_error(&e))
    }

    async fn database_exists(&self, database: &str) -> Result<bool, ProvisionError> {
        bounded("PostgreSQL", self.timeout, async {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(database)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| pg_error(&e))
        })
        .await
    }

    /// This server's turn for `DROP DATABASE` (see the module docs).
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ProvisionError> {
        self.databases
            .acquire()
            .await
            .map_err(|_| ProvisionError::Postgres("database DDL queue closed".to_owned()))
    }
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (4,096 PBKDF2 rounds, off the
/// async workers).
async fn scram_verifier(password: &SecretString) -> Result<String, ProvisionError> {
    let password = password.clone();
    tokio::task::spawn_blocking(move || {
        postgres_protocol::password::scram_sha_256(password.expose_secret().as_bytes())
    })
    .await
    .map_err(|e| ProvisionError::Postgres(format!("computing a password verifier: {e}")))
}

/// The services' connection URL: `postgres://<role>:<password>@<host>:<port>/<database>?sslmode=`,
/// with `&sslrootcert=<ca_file>` where the services trust a CA of the stack's (a path without
/// URL-reserved characters, as [`crate::build::Ca::path`] is).
pub fn service_url(
    spec: &PostgresSpec,
    role: &str,
    database: &str,
    password: &str,
    ca_file: Option<&str>,
) -> String {
    let mut url = format!(
        "postgres://{role}:{password}@{}:{}/{database}?sslmode={}",
        spec.host,
        spec.port,
        spec.ssl_mode.as_str()
    );
    if let Some(path) = ca_file {
        url.push_str("&sslrootcert=");
        url.push_str(path);
    }
    url
}
