use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::SharedClients;

/// A cache of `Arc<String>` clients that counts how many it created.
fn counting() -> (SharedClients<Arc<String>>, Arc<AtomicUsize>) {
    (SharedClients::default(), Arc::new(AtomicUsize::new(0)))
}

fn get(
    cache: &SharedClients<Arc<String>>,
    created: &AtomicUsize,
    user: &str,
    key: &str,
) -> Arc<String> {
    cache
        .get(user, key.to_owned(), || {
            created.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Arc::new(key.to_owned()))
        })
        .unwrap()
}

#[test]
fn stacks_with_the_same_settings_share_one_client() {
    let (cache, created) = counting();
    let a = get(&cache, &created, "ns/a", "kafka:9092|admin");
    let b = get(&cache, &created, "ns/b", "kafka:9092|admin");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(created.load(Ordering::SeqCst), 1);
    assert_eq!(cache.len(), 1);
}

#[test]
fn a_client_goes_when_its_last_stack_moves_to_other_settings() {
    let (cache, created) = counting();
    get(&cache, &created, "ns/a", "old");
    get(&cache, &created, "ns/b", "old");
    get(&cache, &created, "ns/a", "new");
    assert_eq!(cache.len(), 2, "ns/b still uses the old client");
    get(&cache, &created, "ns/b", "new");
    assert_eq!(cache.len(), 1, "nobody uses the old client");
    // Asking again for the same settings reuses the client.
    get(&cache, &created, "ns/b", "new");
    assert_eq!(created.load(Ordering::SeqCst), 2);
}

#[test]
fn a_client_goes_when_its_last_stack_is_released() {
    let (cache, created) = counting();
    get(&cache, &created, "ns/a", "k");
    get(&cache, &created, "ns/b", "k");
    cache.release("ns/a");
    assert_eq!(cache.len(), 1);
    cache.release("ns/b");
    assert!(cache.is_empty());
    cache.release("ns/unknown");
    assert!(cache.is_empty());
}

#[test]
fn a_failed_creation_keeps_nothing() {
    let cache: SharedClients<Arc<String>> = SharedClients::default();
    let failed: Result<Arc<String>, &str> = cache.get("ns/a", "k".to_owned(), || Err("refused"));
    assert_eq!(failed, Err("refused"));
    assert!(cache.is_empty());
}

/// The services' `DATABASE_URL` names the mounted CA (`sslrootcert`) only when the stack has
/// one, and sqlx reads it from there.
#[test]
fn the_services_postgres_url_names_the_ca_file_only_when_the_stack_has_one() {
    use std::str::FromStr as _;

    use sqlx::ConnectOptions as _;
    use sqlx::postgres::PgConnectOptions;

    use crate::build::Ca;
    use crate::crd::{PostgresSpec, SecretRef, SslMode};
    use crate::provision::postgres::service_url;

    let spec = PostgresSpec {
        host: "db.example".into(),
        port: 5432,
        database: "postgres".into(),
        ssl_mode: SslMode::VerifyFull,
        admin_secret_ref: SecretRef {
            name: "admin".into(),
        },
        ca_secret_ref: None,
    };
    assert_eq!(
        service_url(&spec, "role", "db", "pw", None),
        "postgres://role:pw@db.example:5432/db?sslmode=verify-full"
    );
    let url = service_url(&spec, "role", "db", "pw", Some(&Ca::Postgres.path()));
    assert_eq!(
        url,
        "postgres://role:pw@db.example:5432/db?sslmode=verify-full\
         &sslrootcert=/etc/meridian/postgres/ca.crt"
    );
    // sqlx takes it as a file to read (it prints the file back as `file: <path>`).
    let parsed = PgConnectOptions::from_str(&url).unwrap().to_url_lossy();
    assert!(
        parsed
            .query_pairs()
            .any(|(k, v)| k == "sslrootcert" && v == "file: /etc/meridian/postgres/ca.crt"),
        "{parsed}"
    );
}
