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

/// The members of a Redis Cluster the operator reaches: primaries and replicas with an
/// address, not those failed, without an address or still in handshake; the announced
/// hostname where there is one.
#[test]
fn cluster_nodes_lists_every_reachable_primary_and_replica() {
    use crate::provision::redis::{ClusterNode, cluster_nodes};

    let reply = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:7004@17004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:7002@17002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:7003@17003 master,fail? - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:7005@17005 slave,fail 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 disconnected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 :0@0 slave,noaddr 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 disconnected
a1b2c3d4e5f60718293a4b5c6d7e8f9012345678 127.0.0.1:7007@17007 handshake - 0 0 0 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 10.0.0.1:6379@16379,redis-0.redis.demo.svc myself,master - 0 0 1 connected 0-5460
f0e1d2c3b4a5968778695a4b3c2d1e0f12345678 ::1:6380@16380 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 0 1 connected
";
    let node = |host: &str, port| ClusterNode {
        host: host.to_owned(),
        port,
    };
    let nodes = cluster_nodes(reply);
    assert_eq!(
        nodes,
        [
            node("127.0.0.1", 7004),
            node("127.0.0.1", 7002),
            node("127.0.0.1", 7003),
            node("redis-0.redis.demo.svc", 6379),
            node("::1", 6380),
        ]
    );
    assert_eq!(nodes[4].to_string(), "[::1]:6380");
    assert!(cluster_nodes("").is_empty());
}

/// ACL changes on several nodes: `Unchanged` only if none changed; `InMemory` wins over
/// `Saved` (some node would lose the change on a restart).
#[test]
fn acl_changes_on_several_nodes_combine_into_the_weakest_persistence() {
    use crate::provision::redis::Persistence::{InMemory, Saved, Unchanged};
    use crate::provision::redis::combined;

    assert_eq!(combined([]), Unchanged);
    assert_eq!(combined([Unchanged, Unchanged, Unchanged]), Unchanged);
    assert_eq!(combined([Unchanged, Saved, Unchanged]), Saved);
    assert_eq!(combined([Saved, InMemory, Unchanged]), InMemory);
    assert_eq!(combined([InMemory, Saved]), InMemory);
}
