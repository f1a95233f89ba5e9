//! PostgreSQL: a lazily connecting pool (the service starts even when the database is down)
//! and migrations applied in the background with the shared backoff.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use secrecy::ExposeSecret;
use sqlx::Connection as _;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::config::PostgresConfig;
use crate::health::Check;
use crate::shutdown::CancellationToken;

/// How long a pooled connection may sit idle before it is checked with a round trip when it
/// is taken again (see [`Postgres::connect_lazy`], "Liveness checks"). HikariCP skips the
/// check for connections used within the last 500 ms (`aliveBypassWindowMs`); this is the
/// same idea.
pub const PING_IDLE_AFTER: Duration = Duration::from_millis(500);

/// How long a [`HeldConnection`] is kept with nothing to do before it goes back to the pool.
pub const HOLD_IDLE_FOR: Duration = Duration::from_millis(100);

/// The PostgreSQL settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// `DATABASE_URL` did not parse (the URL itself is not repeated: it holds a password).
    #[error("failed to parse DATABASE_URL: {0}")]
    Url(#[source] sqlx::Error),
}

/// A pool plus the state of this service's migrations. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Postgres {
    pool: PgPool,
    migrated: Arc<AtomicBool>,
}

impl Postgres {
    /// Builds the pool without connecting; connections open on first use.
    ///
    /// # Plans
    /// Sessions plan each prepared statement once (`plan_cache_mode = force_generic_plan`)
    /// and may only plan index access and nested loops (`enable_seqscan`, `enable_hashjoin`
    /// and `enable_mergejoin` off). Planning every execution instead cost a third of
    /// PostgreSQL's CPU in the pipeline at 1,000 commands/s, and that CPU is what the
    /// pipeline's latency waits for on a shared machine.
    ///
    /// A plan made once must be right for every table size, because the services' tables
    /// start empty, grow by thousands of rows a second and are emptied again (the planner
    /// sizes a table from its last `ANALYZE`; a generic plan keeps that size until the next
    /// one). With the settings above, the only freedom left is which side of a nested loop a
    /// table goes on, and a table believed empty goes outside, as a whole-index scan: measured
    /// on a new schema, `idempotency_keys` returned 365 rows per index scan. So every
    /// statement that joins a batch of keys to a table is written so that the keys drive
    /// primary-key probes in any plan: lookups as `LATERAL (… LIMIT 1)` subqueries (never
    /// flattened into joins), updates with the batch's keys as their index condition. The
    /// services' plan tests check each such statement on a new, empty schema.
    ///
    /// # Liveness checks
    /// A connection taken from the pool is checked with a round trip (a `Sync`) only when it
    /// sat idle for [`PING_IDLE_AFTER`] or longer: sqlx's default checks every one, which in
    /// a busy service doubled the round trips of every single-statement query and added one
    /// to every transaction. A connection used moments ago that has died meanwhile fails its
    /// next statement instead, which the callers handle like any other connection error.
    pub fn connect_lazy(config: &PostgresConfig) -> Result<Self, PostgresError> {
        let timeout = config.database_statement_timeout_ms.to_string();
        let options = PgConnectOptions::from_str(config.database_url.expose_secret())
            .map_err(PostgresError::Url)?
            .options([
                ("statement_timeout", timeout.as_str()),
                ("plan_cache_mode", "force_generic_plan"),
                ("enable_seqscan", "off"),
                ("enable_hashjoin", "off"),
                ("enable_mergejoin", "off"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(config.database_max_connections)
            .acquire_timeout(Duration::from_millis(config.database_acquire_timeout_ms))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            migrated: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `migrator` in the background, retrying until it succeeds or `shutdown` fires.
    /// Until then the readiness check reports the database as not ready.
    pub fn migrate_in_background(
        &self,
        service: &'static str,
        migrator: &'static Migrator,
        shutdown: &CancellationToken,
    ) {
        self.migrated.store(false, Ordering::SeqCst);
        let (pool, migrated, shutdown) =
            (self.pool.clone(), self.migrated.clone(), shutdown.clone());
        tokio::spawn(async move {
            let applied = crate::retry::until_connected(service, "postgres", &shutdown, || {
                migrator.run(&pool)
            })
            .await;
            if applied.is_some() {
                tracing::info!(service, "Database migrations applied.");
                migrated.store(true, Ordering::SeqCst);
            }
        });
    }

    /// Whether this service's migrations have been applied.
    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::SeqCst)
    }
}

/// A pooled connection that a task writing back-to-back batches keeps between them.
///
/// sqlx checks every connection that goes back to the pool with a round trip (a `Sync`,
/// whatever the pool options say), so a task that takes a connection for each batch pays
/// one round trip more per batch than its statements need: at 1,000 commands/s, the
/// processor's partition workers and the command service's writers made ~860 such checks a
/// second. A task keeps its connection instead while it has work, and gives it back
/// - after [`HOLD_IDLE_FOR`] with nothing to do ([`Self::release_when_idle`]),
/// - after an error ([`Self::release`]): the connection may be broken, and the pool's check
///   on its return closes it if it is,
/// - at once when the pool has no idle connection left for anybody else ([`Self::done`]);
///
/// [`Self::settle`] after each use does the right one of the last two.
///
/// A transaction begun on the held connection and dropped unfinished is rolled back before
/// the connection's next statement (sqlx queues the `ROLLBACK`), as with a pooled one.
#[derive(Debug)]
pub struct HeldConnection {
    pool: PgPool,
    conn: Option<PoolConnection<sqlx::Postgres>>,
}

impl HeldConnection {
    /// Holds nothing yet: [`Self::get`] takes a connection from `pool` when first needed.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, conn: None }
    }

    /// The held connection, taken from the pool first if none is held.
    pub async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// Whether a connection is held.
    pub fn is_held(&self) -> bool {
        self.conn.is_some()
    }

    /// Gives the connection back to the pool (which checks it, and closes it if it is broken).
    pub fn release(&mut self) {
        self.conn = None;
    }

    /// Call after each use, with whether it succeeded: after a failure the connection goes
    /// back to the pool ([`Self::release`]), after a success only if others need it
    /// ([`Self::done`]).
    pub fn settle(&mut self, succeeded: bool) {
        if succeeded {
            self.done();
        } else {
            self.release();
        }
    }

    /// Call after each successful use: gives the connection back if the pool has none idle
    /// and cannot open more, so that a task waiting for one is not kept waiting by a held one.
    pub fn done(&mut self) {
        let exhausted = self.pool.num_idle() == 0
            && self.pool.size() >= self.pool.options().get_max_connections();
        if exhausted {
            self.release();
        }
    }

    /// Gives the connection back after [`HOLD_IDLE_FOR`]; never completes while none is
    /// held. For a `select!` next to the wait for work.
    pub async fn release_when_idle(&mut self) {
        if self.conn.is_none() {
            return std::future::pending().await;
        }
        tokio::time::sleep(HOLD_IDLE_FOR).await;
        self.release();
    }
}

impl Check for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(|e| e.to_string())?;
            if self.is_migrated() {
                Ok(())
            } else {
                Err("migrations not applied yet".into())
            }
        })
    }
}
