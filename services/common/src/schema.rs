//! The stack's database schema: one sqlx migration set (`services/common/migrations`),
//! embedded here and applied by every service that uses PostgreSQL (command service,
//! processor) through [`Postgres::migrate_in_background`](crate::postgres::Postgres::migrate_in_background).
//!
//! Why one set in `common` rather than one per service: both services share one database and
//! one `_sqlx_migrations` table. sqlx refuses to run when the database holds a migration the
//! binary does not know (`VersionMissing`), so two independent sets would break each other;
//! per-service schemas would avoid that but the tables are genuinely shared (the processor
//! updates `commands.status` and writes through the same outbox relay). With one set, whichever
//! service starts first applies it; sqlx serialises concurrent runs with an advisory lock.
//!
//! Rolling upgrades and rollbacks: the first pod of a new release applies its migrations while
//! pods of the previous one still run, restart, or come back after a rollback. So every
//! migration must keep the schema usable by the previous release (add, or drop only what it
//! never used), and [`MIGRATOR`] ignores applied migrations it does not know
//! (`ignore_missing`): without that, sqlx refuses with `VersionMissing` and an older pod would
//! never become ready again. Migrations it does know are still checked against their
//! checksums (`VersionMismatch`).

use std::sync::LazyLock;

use sqlx::migrate::Migrator;

/// Every migration of the stack's database, in order; applied migrations newer than this
/// build are ignored (see the module documentation).
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
});
