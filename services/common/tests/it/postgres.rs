use common::config::{PostgresConfig, Vars};
use common::health::Check;
use common::postgres::Postgres;
use common::test_support::Deps;
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

/// A statement the services prepared while a table was empty (freshly created and analysed)
/// uses the index once the table has grown: before, the plan PostgreSQL settled on while the
/// table was small stayed, a sequential scan (4,213 of them on `commands` in one benchmark
/// run).
#[tokio::test]
async fn a_statement_prepared_on_an_empty_table_uses_the_index_once_it_has_grown() {
    let config: PostgresConfig = Vars::from_env().parse().unwrap();
    let postgres = Postgres::connect_lazy(&config).unwrap();
    let mut conn = postgres.pool().acquire().await.unwrap();
    let table = format!("plans_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, body text); ANALYZE {table}; \
         PREPARE early(bigint) AS SELECT body FROM {table} WHERE id = $1"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    // Run while the table is empty, more often than the five custom plans PostgreSQL tries
    // before it settles on a plan for good.
    for id in 0..8 {
        sqlx::raw_sql(&format!("EXECUTE early({id})"))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    sqlx::raw_sql(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 20000) AS g"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE early(1)")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(
        plan.iter().any(|line| line.contains("Index Cond")),
        "{plan:#?}"
    );
    let mode: String = sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(mode, "force_custom_plan");
    sqlx::raw_sql(&format!("DEALLOCATE early; DROP TABLE {table}"))
        .execute(&mut *conn)
        .await
        .unwrap();
}
