//! Provisioning against the real local PostgreSQL, without a cluster.

use std::time::{Duration, Instant};

use operator::crd::{PostgresSpec, SslMode};
use operator::provision::AdminCredentials;
use operator::provision::postgres::PostgresAdmins;
use secrecy::SecretString;
use uuid::Uuid;

/// A burst of stacks created and deleted at once: their `DROP DATABASE` statements take turns
/// on the server, so none of them runs out of its timeout waiting for the others (before, a
/// namespace of stacks deleted together left databases behind).
#[tokio::test]
async fn a_burst_of_databases_is_created_and_dropped_without_timeouts() {
    let spec = PostgresSpec {
        host: "127.0.0.1".into(),
        port: 5432,
        database: "postgres".into(),
        ssl_mode: SslMode::Disable,
        admin_credentials_secret: "unused".into(),
    };
    let credentials = AdminCredentials {
        username: "postgres".into(),
        password: SecretString::from("postgres"),
    };
    let admins = PostgresAdmins::default();
    // One statement may take at most 4 × 1 s; twenty of them queued inside the server could
    // not all finish within that.
    let admin = admins
        .admin(&spec, &credentials, Duration::from_secs(1))
        .unwrap();
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let names: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("it_burst_{run}_{i}"),
                format!("it_burst_{run}_{i}_db"),
            )
        })
        .collect();
    let password = SecretString::from("Burst0Password");

    let started = Instant::now();
    let created = futures::future::join_all(
        names
            .iter()
            .map(|(role, db)| admin.ensure_role_and_database(role, db, &password, false)),
    )
    .await;
    for (result, (_, db)) in created.iter().zip(&names) {
        assert!(result.is_ok(), "creating {db}: {result:?}");
    }
    eprintln!("20 databases created in {:?}", started.elapsed());

    let started = Instant::now();
    let dropped = futures::future::join_all(
        names
            .iter()
            .map(|(role, db)| admin.drop_role_and_database(role, db)),
    )
    .await;
    for (result, (_, db)) in dropped.iter().zip(&names) {
        assert!(result.is_ok(), "dropping {db}: {result:?}");
    }
    eprintln!("20 databases dropped in {:?}", started.elapsed());

    let pool = sqlx::PgPool::connect("postgres://postgres:postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_database WHERE datname LIKE $1) \
         + (SELECT count(*) FROM pg_roles WHERE rolname LIKE $1)",
    )
    .bind(format!("it_burst_{run}_%"))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "databases or roles left behind");
}
