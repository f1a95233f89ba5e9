#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: failing loudly is the point

use common::config::{PostgresConfig, Vars};
use common::health::Check;
use common::postgres::{HOLD_IDLE_FOR, HeldConnection, Postgres};
use common::test_support::Deps;
use common::test_support::plans::{plan_on_empty_tables, probes};
use sqlx::Connection;

/// The operator will create a login role per stack; the local server must allow it and let
/// that role connect with its password.
#[tokio::test]
async fn a_login_role_can_be_created_and_used() {
    let deps = Deps::from_env();
    let config: PostgresConfig = Vars::from_env().parse().unwrap();
    let admin = Postgres::connect_lazy(&config).unwrap();
    admin.check().await.unwrap();

    let role = format!("smoke_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN PASSWORD 's3cret'"))
        .execute(admin.pool())
        .await
        .unwrap();

    let mut url = url::Url::parse(&deps.database_url).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some("s3cret")).unwrap();
    let mut conn = sqlx::PgConnection::connect(url.as_str()).await.unwrap();
    let (user,): (String,) = sqlx::query_as("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(user, role);
    conn.close().await.unwrap();

    url.set_password(Some("wrong")).unwrap();
    assert!(sqlx::PgConnection::connect(url.as_str()).await.is_err());

    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(admin.pool())
        .await
        .unwrap();
}

async fn backend_pid(held: &mut HeldConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(held.get().await.unwrap())
        .await
        .unwrap()
}

/// A held connection stays the same session across uses, goes back to the pool when idle,
/// when the pool has none left for others and when released after an error — and one whose
/// session died is replaced, not handed out again.
#[tokio::test]
async fn a_held_connection_is_kept_between_uses_and_given_back_when_others_need_it() {
    let config: PostgresConfig = Vars::from_env()
        .with("DATABASE_MAX_CONNECTIONS", "2")
        .parse()
        .unwrap();
    let postgres = Postgres::connect_lazy(&config).unwrap();
    let pool = postgres.pool().clone();
    let mut held = HeldConnection::new(pool.clone());
    assert!(!held.is_held());

    // Kept: the same session for back-to-back uses, while the pool can still open another.
    let first = backend_pid(&mut held).await;
    held.done();
    assert!(held.is_held());
    assert_eq!(backend_pid(&mut held).await, first);
    held.done();
    assert!(held.is_held());

    // Given back after a while with nothing to do.
    tokio::time::timeout(HOLD_IDLE_FOR * 5, held.release_when_idle())
        .await
        .expect("an idle held connection goes back to the pool");
    assert!(!held.is_held());
    wait_until_idle(&pool, 1).await;

    // Given back at once when the pool is exhausted: the other connection is taken.
    let other = pool.acquire().await.unwrap();
    backend_pid(&mut held).await;
    held.done();
    assert!(!held.is_held(), "the pool had no idle connection left");
    drop(other);

    // A session that died is not kept: released after the error, the pool checks and closes
    // it, and the next use gets a live one.
    let doomed = backend_pid(&mut held).await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(doomed)
        .execute(&pool)
        .await
        .unwrap();
    let failed = loop {
        // The terminated backend's socket closes asynchronously.
        match sqlx::query("SELECT 1")
            .execute(held.get().await.unwrap())
            .await
        {
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            Err(error) => break error,
        }
    };
    assert!(
        matches!(
            failed,
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Database(_)
        ),
        "{failed:?}"
    );
    held.release();
    let replaced = backend_pid(&mut held).await;
    assert_ne!(replaced, doomed);
}

/// Waits until `pool` has `idle` idle connections (a returned connection is checked first).
async fn wait_until_idle(pool: &sqlx::PgPool, idle: usize) {
    for _ in 0..100 {
        if pool.num_idle() >= idle {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "the pool has {} idle connections, not {idle}",
        pool.num_idle()
    );
}

/// The services' sessions plan each statement once, with index access and nested loops only.
#[tokio::test]
async fn service_sessions_plan_once_with_index_access_and_nested_loops_only() {
    let config: PostgresConfig = Vars::from_env().parse().unwrap();
    let postgres = Postgres::connect_lazy(&config).unwrap();
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN \
         ('plan_cache_mode', 'enable_seqscan', 'enable_hashjoin', 'enable_mergejoin') ORDER BY name",
    )
    .fetch_all(postgres.pool())
    .await
    .unwrap();
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    assert_eq!(
        settings,
        [
            ("enable_hashjoin", "off"),
            ("enable_mergejoin", "off"),
            ("enable_seqscan", "off"),
            ("plan_cache_mode", "force_generic_plan"),
        ]
    );
}

/// The rule the services' batch statements follow (`common::postgres`, "Plans"): planned once
/// on tables believed empty, a join of a batch of keys to a table scans the whole table's
/// index, while the same lookup written as a lateral subquery probes it once per key — and a
/// point lookup by a parameter is a probe either way.
#[tokio::test]
async fn planned_on_empty_tables_only_lateral_lookups_probe_by_key() {
    let join = plan_on_empty_tables(
        &["commands"],
        "",
        "SELECT c.status FROM unnest($1::uuid[]) AS t(id) JOIN commands c ON c.id = t.id",
        1,
    )
    .await;
    let error = probes(&join, "commands", &["id"]).unwrap_err();
    assert!(error.contains("without a key condition"), "{error}");

    let lateral = plan_on_empty_tables(
        &["commands"],
        "",
        "SELECT c.status FROM unnest($1::uuid[]) AS t(id) \
         CROSS JOIN LATERAL (SELECT status FROM commands c WHERE c.id = t.id LIMIT 1) AS c",
        1,
    )
    .await;
    probes(&lateral, "commands", &["id"]).unwrap();

    let point = plan_on_empty_tables(
        &["documents"],
        "",
        "SELECT version FROM documents WHERE collection = $1 AND id = $2",
        2,
    )
    .await;
    probes(&point, "documents", &["collection", "id"]).unwrap();
}

/// The migrations apply to an empty database and leave `commands` with its primary key only;
/// a database migrated by a newer release (a version this build does not know) is still
/// accepted, as a rollback or an older pod during a rolling upgrade needs; a changed migration
/// this build does know is still refused.
#[tokio::test]
async fn migrations_apply_and_tolerate_a_newer_release_but_not_a_changed_migration() {
    let deps = Deps::from_env();
    let config: PostgresConfig = Vars::from_env().parse().unwrap();
    let admin = Postgres::connect_lazy(&config).unwrap();
    let database = format!("migrations_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(admin.pool())
        .await
        .unwrap();
    let mut url = url::Url::parse(&deps.database_url).unwrap();
    url.set_path(&database);
    let pool = sqlx::PgPool::connect(url.as_str()).await.unwrap();

    common::schema::MIGRATOR.run(&pool).await.unwrap();
    let indexes: Vec<(String,)> = sqlx::query_as(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'commands' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(indexes, [("commands_pkey".to_owned(),)]);

    // A newer release applied a migration this build has never seen.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99991231000000, 'from a newer release', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    common::schema::MIGRATOR.run(&pool).await.unwrap();

    // A migration this build knows, changed after it was applied.
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = '\\x00' \
         WHERE version = (SELECT min(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let refused = common::schema::MIGRATOR.run(&pool).await.unwrap_err();
    assert!(
        matches!(refused, sqlx::migrate::MigrateError::VersionMismatch(_)),
        "{refused}"
    );

    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(admin.pool())
        .await
        .unwrap();
}
