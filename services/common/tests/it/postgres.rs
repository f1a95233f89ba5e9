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
