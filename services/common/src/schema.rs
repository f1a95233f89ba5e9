//! The stack's database schema: one sqlx migration set (`services/common/migrations`),
//! embedded here and applied by every service that uses PostgreSQL (command service,
//! processor) through [`Postgres::migrate_in_background`](crate::postgres::Postgres::migrate_in_background).
//!
//! Why one set in `common` rather than one per service: both services share one database and
//! one `_sqlx_migrations` table. sqlx refuses to run when the database holds a migration the
//! binary does not know (`VersionMissing`), so two independent sets would break each other;
//! per-service schemas would avoid that but the tables are genuinely shared (the processor
//! updates `commands.status` and writes through the same outbox relay). With one set, whichever
//! service starts first applies it; sqlx serialises concurrent runs with an advisory lock, and
//! a service started from an older build simply finds its migrations already applied.

use sqlx::migrate::Migrator;

/// Every migration of the stack's database, in order.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");
