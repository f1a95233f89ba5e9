//! Provisioning against the real local PostgreSQL, without a cluster.

use std::time::{Duration, Instant};

use operator::controller::Settings;
use operator::crd::{PostgresSpec, SecretRef, SslMode};
use operator::provision::AdminCredentials;
use operator::provision::postgres::{DROP_DATABASE_CONCURRENCY, PostgresAdmins};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::Connection as _;
use uuid::Uuid;

fn admin() -> operator::provision::postgres::PostgresAdmin {
    let spec = PostgresSpec {
        host: "127.0.0.1".into(),
        port: 5432,
        database: "postgres".into(),
        ssl_mode: SslMode::Disable,
        admin_secret_ref: SecretRef {
            name: "unused".into(),
        },
        ca_secret_ref: None,
    };
    let credentials = AdminCredentials {
        username: "postgres".into(),
        password: SecretString::from("postgres"),
    };
    PostgresAdmins::default()
        .admin(
            "test/admin",
            &spec,
            &credentials,
            None,
            Settings::default().dependency_timeout,
        )
        .unwrap()
}

/// `deletionPolicy: {database: Retain, credentials: Delete}`: the owner loses its login and
/// keeps its database; provisioned again (a stack of the same name), it logs in and finds it.
#[tokio::test]
async fn a_retained_database_outlives_its_login_and_is_found_again() {
    let admin = admin();
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (role, db) = (format!("it_keep_{run}"), format!("it_keep_{run}_db"));
    let url = |password: &str| format!("postgres://{role}:{password}@127.0.0.1:5432/{db}");
    let first = SecretString::from("Keep0Password");
    admin
        .ensure_role_and_database(&role, &db, &role, &first, true)
        .await
        .unwrap();
    let mut session = sqlx::PgConnection::connect(&url("Keep0Password"))
        .await
        .unwrap();
    sqlx::raw_sql("CREATE TABLE documents (id int); INSERT INTO documents VALUES (7)")
        .execute(&mut session)
        .await
        .unwrap();

    admin.revoke_login(&role).await.unwrap();
    assert!(
        sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
        "the owner's open session is ended"
    );
    let refused = sqlx::PgConnection::connect(&url("Keep0Password"))
        .await
        .expect_err("the owner logged in after its login was revoked");
    let refused = refused.to_string();
    assert!(
        refused.contains("password authentication failed")
            || refused.contains("not permitted to log in"),
        "{refused}"
    );

    let second = SecretString::from("Keep1Password");
    admin
        .ensure_role_and_database(&role, &db, &role, &second, true)
        .await
        .unwrap();
    let mut session = sqlx::PgConnection::connect(&url("Keep1Password"))
        .await
        .unwrap();
    let kept: i32 = sqlx::query_scalar("SELECT id FROM documents")
        .fetch_one(&mut session)
        .await
        .unwrap();
    assert_eq!(kept, 7);
    session.close().await.unwrap();
    admin.drop_database(&db).await.unwrap();
    admin.drop_roles(&[&role]).await.unwrap();
}

/// A burst of stacks created and deleted at once: their `DROP DATABASE` statements take turns
/// on the server, a few at a time (before, a namespace of stacks deleted together queued them
/// all inside PostgreSQL and for the pool's connections, where their timeouts ran out and
/// databases were left behind). A sampler watches `pg_stat_activity` during the burst: never
/// more of this burst's drops run at once than the limit, and all of them finish within their
/// bound of the operator's default dependency timeout.
#[tokio::test]
async fn a_burst_of_databases_is_created_and_dropped_without_timeouts() {
    let admin = admin();
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
            .map(|(role, db)| admin.ensure_role_and_database(role, db, role, &password, false)),
    )
    .await;
    for (result, (_, db)) in created.iter().zip(&names) {
        assert!(result.is_ok(), "creating {db}: {result:?}");
    }
    eprintln!("20 databases created in {:?}", started.elapsed());

    let observer = sqlx::PgPool::connect("postgres://postgres:postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let done = tokio::sync::watch::channel(false);
    let sampler = {
        let observer = observer.clone();
        let mut done = done.1.clone();
        let pattern = format!("DROP DATABASE IF EXISTS \"it_burst_{run}_%");
        tokio::spawn(async move {
            let (mut most, mut samples_with_a_drop) = (0_i64, 0_u32);
            loop {
                let running: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE state = 'active' AND query LIKE $1",
                )
                .bind(&pattern)
                .fetch_one(&observer)
                .await
                .unwrap();
                most = most.max(running);
                samples_with_a_drop += u32::from(running > 0);
                tokio::select! {
                    _ = done.changed() => return (most, samples_with_a_drop),
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        })
    };

    let started = Instant::now();
    let dropped = futures::future::join_all(names.iter().map(|(role, db)| async {
        admin.drop_database(db).await?;
        admin.drop_roles(&[role]).await
    }))
    .await;
    done.0.send(true).unwrap();
    let (most, samples_with_a_drop) = sampler.await.unwrap();
    for (result, (_, db)) in dropped.iter().zip(&names) {
        assert!(result.is_ok(), "dropping {db}: {result:?}");
    }
    eprintln!(
        "20 databases dropped in {:?}; at most {most} drop(s) running at once in \
         {samples_with_a_drop} samples that saw one",
        started.elapsed()
    );
    assert!(
        samples_with_a_drop > 0,
        "the sampler never saw a drop running"
    );
    assert!(
        most <= DROP_DATABASE_CONCURRENCY as i64,
        "drops on one server must take turns, {DROP_DATABASE_CONCURRENCY} at a time"
    );

    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_database WHERE datname LIKE $1) \
         + (SELECT count(*) FROM pg_roles WHERE rolname LIKE $1)",
    )
    .bind(format!("it_burst_{run}_%"))
    .fetch_one(&observer)
    .await
    .unwrap();
    assert_eq!(left, 0, "databases or roles left behind");
}

/// The local server's CA (`dev/deps/postgres.sh` offers TLS with a certificate for
/// 127.0.0.1/localhost from a local CA): its file and its PEM, as a `caSecretRef` holds it.
fn postgres_ca() -> (String, String) {
    let file = std::env::var("MERIDIAN_POSTGRES_CA_FILE")
        .expect("MERIDIAN_POSTGRES_CA_FILE (eval \"$(bash dev/deps.sh env)\")");
    let pem = std::fs::read_to_string(&file).unwrap();
    (file, pem)
}

/// `error` says a TLS handshake failed because the server's certificate chains to no root the
/// client trusts.
fn assert_unknown_issuer(error: &impl std::fmt::Display) {
    let error = error.to_string();
    assert!(
        error.contains("invalid peer certificate: UnknownIssuer"),
        "{error}"
    );
}

/// A TCP forwarder from a free port on `host` (a loopback address) to `target`, for as long
/// as the test runs: the same server under another address.
async fn forward(host: &str, target: std::net::SocketAddr) -> u16 {
    let listener = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// `postgres.caSecretRef` with `sslMode: verify-full`: the operator's admin pool trusts the
/// stack's CA and its sessions use TLS; without the CA (the system's roots) it is refused, and
/// so it is under an address the certificate does not name. The services' URL (`service_url`
/// with `sslrootcert`) connects the same way through their own pool, and not without the CA.
#[tokio::test]
async fn postgres_over_tls_is_verified_against_the_stacks_ca_and_host_name() {
    use common::config::PostgresConfig;
    use common::postgres::Postgres;
    use operator::provision::postgres::service_url;

    let (ca_file, ca_pem) = postgres_ca();
    let server =
        common::test_support::Deps::socket_of(&common::test_support::Deps::from_env().database_url);
    let plain = admin();
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (role, db) = (format!("it_tls_{run}"), format!("it_tls_{run}_db"));
    let password = SecretString::from(format!("Tls0Password{run}"));
    plain
        .ensure_role_and_database(&role, &db, &role, &password, true)
        .await
        .unwrap();
    let spec = |host: &str, port: u16, ssl_mode: SslMode| PostgresSpec {
        host: host.into(),
        port: port.into(),
        database: db.clone(),
        ssl_mode,
        admin_secret_ref: SecretRef {
            name: "unused".into(),
        },
        ca_secret_ref: None,
    };
    let credentials = AdminCredentials {
        username: role.clone(),
        password: password.clone(),
    };
    let timeout = Settings::default().dependency_timeout;
    let admins = PostgresAdmins::default();
    let verify_full = spec("127.0.0.1", server.port(), SslMode::VerifyFull);

    let trusted = admins
        .admin(
            "test/ca",
            &verify_full,
            &credentials,
            Some(&ca_pem),
            timeout,
        )
        .unwrap();
    trusted.ping().await.unwrap();
    let sessions: Vec<(bool, Option<String>)> = sqlx::query_as(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.usename = $1",
    )
    .bind(&role)
    .fetch_all(
        &mut sqlx::PgConnection::connect(&format!(
            "postgres://postgres:postgres@{server}/postgres?sslmode=disable"
        ))
        .await
        .unwrap(),
    )
    .await
    .unwrap();
    assert!(!sessions.is_empty(), "the admin pool keeps its session");
    assert!(
        sessions
            .iter()
            .all(|(ssl, version)| *ssl && version.is_some()),
        "the admin pool's sessions use TLS: {sessions:?}"
    );

    // Another stack on the same server without the CA gets a pool of its own (the CA is part
    // of the pool's key), which trusts only the system's roots.
    let untrusted = admins
        .admin(
            "test/system-roots",
            &verify_full,
            &credentials,
            None,
            timeout,
        )
        .unwrap();
    assert_eq!(admins.len(), 2, "the CA is part of the shared pool's key");
    assert_unknown_issuer(&untrusted.ping().await.unwrap_err());

    // The same server, the same CA, under names its certificate carries (IP:127.0.0.1,
    // DNS:localhost) and one it does not (127.0.0.2, forwarded to it): refused for the name
    // alone (the message names the certificate's names: the handshake reached the server).
    // (sqlx 0.8 checks the name with `verify-ca` too, launchbadge/sqlx#3793: not tested here.)
    let other_port = forward("127.0.0.2", server).await;
    let under = |user: &str, host: &str, port: u16| {
        admins
            .admin(
                user,
                &spec(host, port, SslMode::VerifyFull),
                &credentials,
                Some(&ca_pem),
                timeout,
            )
            .unwrap()
    };
    under("test/localhost", "localhost", server.port())
        .ping()
        .await
        .unwrap();
    let refused = under("test/misnamed", "127.0.0.2", other_port)
        .ping()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("not valid for name \"127.0.0.2\"") && refused.contains("localhost"),
        "{refused}"
    );

    // The services: `DATABASE_URL` as the credentials stage writes it, with the CA file.
    let url = service_url(
        &verify_full,
        &role,
        &db,
        password.expose_secret(),
        Some(&ca_file),
    );
    assert!(url.ends_with(&format!("?sslmode=verify-full&sslrootcert={ca_file}")));
    let config = |url: String| PostgresConfig {
        database_url: SecretString::from(url),
        database_max_connections: 1,
        database_acquire_timeout_ms: 5_000,
        database_statement_timeout_ms: 5_000,
    };
    let service = Postgres::connect_lazy(&config(url)).unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert!(ssl, "the service's session uses TLS");
    let without_ca = service_url(&verify_full, &role, &db, password.expose_secret(), None);
    let without_ca = Postgres::connect_lazy(&config(without_ca)).unwrap();
    assert_unknown_issuer(&without_ca.pool().acquire().await.unwrap_err());

    service.pool().close().await;
    plain.drop_database(&db).await.unwrap();
    plain.drop_roles(&[&role]).await.unwrap();
}

/// What the broker refuses for what it asks — a setting it rejects, more replicas than there
/// are brokers — is reported as refused (the spec has to change), not as Kafka unavailable;
/// the valid topics of the same request are created.
#[tokio::test]
async fn topics_the_broker_refuses_are_reported_as_refused_and_the_others_created() {
    use std::collections::BTreeMap;

    use operator::provision::kafka::{DesiredTopic, KafkaClients};

    let bootstrap = common::test_support::Deps::from_env().kafka_bootstrap_servers;
    let clients = KafkaClients::default();
    let cluster = clients
        .cluster("test/cluster", &plain_access(&bootstrap))
        .unwrap();
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let topic = |name: &str, replication_factor: i32, config: &[(&str, &str)]| DesiredTopic {
        name: format!("it-refused-{run}-{name}"),
        partitions: 1,
        replication_factor,
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    };
    let topics = [
        topic("good", 1, &[("retention.ms", "3600000")]),
        topic("days", 1, &[("retention.ms", "7d")]),
        topic("replicas", 3, &[]),
    ];
    let timeout = Settings::default().dependency_timeout;
    let outcome = cluster.reconcile_topics(&topics, timeout).await.unwrap();
    assert_eq!(outcome.created, vec![topics[0].name.clone()]);
    assert_eq!(outcome.refused.len(), 2, "{outcome:?}");
    assert!(outcome.refused[0].contains(&topics[1].name), "{outcome:?}");
    assert!(outcome.refused[1].contains(&topics[2].name), "{outcome:?}");

    // A valid change is applied once, and then there is nothing left to change.
    let valid = [topic("good", 1, &[("retention.ms", "7200000")])];
    let outcome = cluster.reconcile_topics(&valid, timeout).await.unwrap();
    assert_eq!(
        outcome.configured,
        vec![valid[0].name.clone()],
        "{outcome:?}"
    );
    let outcome = cluster.reconcile_topics(&valid, timeout).await.unwrap();
    assert!(outcome.configured.is_empty(), "{outcome:?}");
    // A value the broker cannot parse is acknowledged but never applied: refused.
    let altered = [topic("good", 1, &[("retention.ms", "7d")])];
    let outcome = cluster.reconcile_topics(&altered, timeout).await.unwrap();
    assert!(outcome.configured.is_empty(), "{outcome:?}");
    assert_eq!(outcome.refused.len(), 1, "{outcome:?}");
    assert!(
        outcome.refused[0].contains("retention.ms=7d (it keeps 7200000)"),
        "{outcome:?}"
    );
    cluster
        .delete_topics(&[topics[0].name.clone()], timeout)
        .await
        .unwrap();
}

/// A stack's Redis user is written to the server's ACL file (so a restarted Redis loads it
/// without waiting for the operator) whenever the operator changes it, and only then; its
/// deletion is saved too.
#[tokio::test]
async fn redis_users_are_saved_to_the_acl_file_when_they_change() {
    use operator::provision::redis::{Persistence, RedisAdmin};

    let url = common::test_support::Deps::from_env().redis_url;
    let credentials = AdminCredentials {
        username: "default".into(),
        password: SecretString::from(""),
    };
    let admin = RedisAdmin::new(&url, &credentials, None, false, Duration::from_secs(5)).unwrap();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("aclfile")
        .query_async(&mut conn)
        .await
        .unwrap();
    let aclfile = config.get(1).cloned().unwrap_or_default();
    assert!(
        !aclfile.is_empty(),
        "the test Redis (dev/deps/redis.sh) keeps its users in an ACL file"
    );
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let user = format!("it-acl-{run}");
    let prefix = format!("it-acl-{run}:");
    let saved_line = || {
        std::fs::read_to_string(&aclfile)
            .unwrap()
            .lines()
            .find(|line| line.starts_with(&format!("user {user} ")))
            .map(str::to_owned)
    };
    let first = SecretString::from(format!("Acl0Password{run}"));
    let second = SecretString::from(format!("Acl1Password{run}"));

    let created = admin.ensure_user(&user, &prefix, &[&first], true).await;
    assert_eq!(created.unwrap(), Persistence::Saved);
    let line = saved_line().expect("the new user is in the ACL file");
    assert!(line.contains(&format!("~{prefix}*")), "{line}");
    assert_eq!(line.matches(" #").count(), 1, "one password hash: {line}");

    let again = admin.ensure_user(&user, &prefix, &[&first], false).await;
    assert_eq!(again.unwrap(), Persistence::Unchanged);

    let rotated = admin
        .ensure_user(&user, &prefix, &[&first, &second], false)
        .await;
    assert_eq!(rotated.unwrap(), Persistence::Saved);
    let line = saved_line().expect("the rotated user is in the ACL file");
    assert_eq!(
        line.matches(" #").count(),
        2,
        "both password hashes: {line}"
    );

    assert_eq!(admin.delete_user(&user).await.unwrap(), Persistence::Saved);
    assert_eq!(saved_line(), None, "the deleted user left the ACL file");
    assert_eq!(
        admin.delete_user(&user).await.unwrap(),
        Persistence::Unchanged
    );
}

/// The local Redis Cluster's seed node (`dev/deps.sh env`).
fn redis_cluster_url() -> String {
    std::env::var("MERIDIAN_REDIS_CLUSTER_URL")
        .expect("MERIDIAN_REDIS_CLUSTER_URL: the local Redis Cluster (eval \"$(dev/deps.sh env)\")")
}

/// A connection to one Redis Cluster node by itself (no redirects), as the `default` user.
async fn cluster_node(
    node: &operator::provision::redis::ClusterNode,
) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{node}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The key pattern of the ACL user `user` on one node (`ACL GETUSER`), `None` without one.
async fn acl_keys(conn: &mut redis::aio::MultiplexedConnection, user: &str) -> Option<String> {
    let reply: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(user)
        .query_async(conn)
        .await
        .unwrap();
    let fields: Vec<redis::Value> = match reply {
        redis::Value::Nil => return None,
        redis::Value::Array(fields) => fields,
        other => panic!("ACL GETUSER answered {other:?}"),
    };
    let position = fields
        .iter()
        .position(|f| matches!(f, redis::Value::BulkString(b) if b == b"keys"))
        .expect("ACL GETUSER lists the key patterns");
    Some(redis::from_redis_value(fields[position + 1].clone()).unwrap())
}

/// `redis.cluster`: on the local three-node Redis Cluster, the stack's user is created on
/// every node (ACLs are per node), so a cluster client logged in as it works wherever the slot
/// map sends it: keys under its prefix on every primary, sharded pub/sub on its channels,
/// nothing outside its prefix. Ensuring it again changes nothing; deleting it removes it from
/// every node.
#[tokio::test]
async fn a_stack_user_on_a_redis_cluster_exists_on_every_node_and_reaches_only_its_prefix() {
    use operator::provision::redis::{
        Persistence, RedisAdmin, cluster_nodes, url_with_credentials,
    };
    use redis::AsyncCommands as _;

    let seed_url = redis_cluster_url();
    let credentials = AdminCredentials {
        username: "default".into(),
        password: SecretString::from(""),
    };
    let timeout = Duration::from_secs(5);
    let admin = RedisAdmin::new(&seed_url, &credentials, None, true, timeout).unwrap();
    admin.ping().await.unwrap();
    let mut seed = redis::Client::open(seed_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let reply: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut seed)
        .await
        .unwrap();
    let nodes = cluster_nodes(&reply);
    assert_eq!(nodes.len(), 3, "the local cluster has three nodes: {reply}");

    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let user = format!("it-cluster-{run}");
    let prefix = format!("it-cluster-{run}:");
    let password = SecretString::from(format!("Cluster0Password{run}"));

    let created = admin.ensure_user(&user, &prefix, &[&password], true).await;
    assert_eq!(
        created.unwrap(),
        Persistence::Saved,
        "every node of the local cluster has an ACL file"
    );
    for node in &nodes {
        let keys = acl_keys(&mut cluster_node(node).await, &user).await;
        assert_eq!(keys.as_deref(), Some(&*format!("~{prefix}*")), "on {node}");
    }

    // A cluster client logged in as the stack's user, as the services connect.
    let stack_url = url_with_credentials(&seed_url, &user, password.expose_secret()).unwrap();
    let client = common::redis::cluster_client_builder(stack_url.expose_secret(), None, timeout)
        .unwrap()
        .build()
        .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let slots: Vec<(u16, u16, (String, u16))> = {
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut seed)
            .await
            .unwrap();
        ranges
            .into_iter()
            .map(|range| {
                let redis::Value::Array(range) = range else {
                    panic!("CLUSTER SLOTS: {range:?}")
                };
                let start: u16 = redis::from_redis_value(range[0].clone()).unwrap();
                let end: u16 = redis::from_redis_value(range[1].clone()).unwrap();
                let primary: (String, u16) = match &range[2] {
                    redis::Value::Array(p) => (
                        redis::from_redis_value(p[0].clone()).unwrap(),
                        redis::from_redis_value(p[1].clone()).unwrap(),
                    ),
                    other => panic!("CLUSTER SLOTS primary: {other:?}"),
                };
                (start, end, primary)
            })
            .collect()
    };
    let mut primaries_hit = std::collections::BTreeSet::new();
    for tag in ["a", "b", "c", "d", "e", "f"] {
        let key = format!("{prefix}doc{{{tag}}}");
        let () = conn.set(&key, tag).await.unwrap();
        let value: String = conn.get(&key).await.unwrap();
        assert_eq!(value, tag);
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query_async(&mut seed)
            .await
            .unwrap();
        let (_, _, (host, port)) = slots
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .unwrap_or_else(|| panic!("no node serves slot {slot}"));
        // The key is on that primary itself (read there without redirects).
        let mut primary = redis::Client::open(format!("redis://{host}:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let stored: String = primary.get(&key).await.unwrap();
        assert_eq!(stored, tag, "{key} on {host}:{port}");
        primaries_hit.insert(format!("{host}:{port}"));
        let () = primary.del(&key).await.unwrap();
    }
    assert!(
        primaries_hit.len() >= 2,
        "the keys reached several primaries: {primaries_hit:?}"
    );

    // Nothing outside the prefix.
    let outside = format!("it-other-{run}:doc{{a}}");
    let refused = conn.set::<_, _, ()>(&outside, "x").await.unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");

    // Sharded pub/sub on the stack's channels (a RESP3 connection receives the pushes, as
    // the hub's does), refused on others.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscriber =
        common::redis::cluster_client_builder(stack_url.expose_secret(), None, timeout)
            .unwrap()
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()
            .unwrap();
    let mut subscriber = subscriber.get_async_connection().await.unwrap();
    let channel = format!("{prefix}room:{{x}}");
    subscriber.ssubscribe(&channel).await.unwrap();
    let receivers: i64 = redis::cmd("SPUBLISH")
        .arg(&channel)
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    let message = tokio::time::timeout(timeout, async {
        loop {
            let push = rx.recv().await.expect("the push channel stays open");
            if push.kind == redis::PushKind::SMessage {
                return push.data;
            }
        }
    })
    .await
    .expect("the sharded message arrives");
    assert_eq!(
        message,
        [
            redis::Value::BulkString(channel.clone().into_bytes()),
            redis::Value::BulkString(b"hello".to_vec())
        ]
    );
    subscriber.sunsubscribe(&channel).await.unwrap();
    let other_channel = format!("it-other-{run}:room:{{x}}");
    let refused = redis::cmd("SPUBLISH")
        .arg(&other_channel)
        .arg("hello")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
    let refused = subscriber.ssubscribe(&other_channel).await.unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");

    let again = admin.ensure_user(&user, &prefix, &[&password], false).await;
    assert_eq!(again.unwrap(), Persistence::Unchanged);

    assert_eq!(admin.delete_user(&user).await.unwrap(), Persistence::Saved);
    for node in &nodes {
        let keys = acl_keys(&mut cluster_node(node).await, &user).await;
        assert_eq!(keys, None, "the user left {node}");
    }
    assert_eq!(
        admin.delete_user(&user).await.unwrap(),
        Persistence::Unchanged
    );
}

/// `redis.cluster: true` on a server that is not a cluster node: the health check says so.
#[tokio::test]
async fn a_redis_cluster_admin_on_a_single_redis_fails_its_health_check_by_name() {
    use operator::provision::redis::RedisAdmin;

    let url = common::test_support::Deps::from_env().redis_url;
    let credentials = AdminCredentials {
        username: "default".into(),
        password: SecretString::from(""),
    };
    let admin = RedisAdmin::new(&url, &credentials, None, true, Duration::from_secs(5)).unwrap();
    let error = admin.ping().await.unwrap_err().to_string();
    assert!(
        error.contains("redis.cluster is true but the server is not a Redis Cluster node"),
        "{error}"
    );
}

/// `redis.caSecretRef` with a `rediss://` url: the operator's admin client verifies the server
/// against the stack's CA (the PEM the Secret holds) and talks to it; without it (the system's
/// roots) the handshake is refused.
#[tokio::test]
async fn the_redis_admin_client_trusts_the_stacks_ca_over_rediss() {
    use common::test_support::tls_redis::TlsRedis;
    use operator::provision::redis::RedisAdmin;

    let server = TlsRedis::start().await;
    let credentials = AdminCredentials {
        username: "default".into(),
        password: SecretString::from(""),
    };
    let timeout = Duration::from_secs(5);
    let ca = server.ca_pem();
    RedisAdmin::new(&server.url(), &credentials, Some(&ca), false, timeout)
        .unwrap()
        .ping()
        .await
        .unwrap();
    let untrusted = RedisAdmin::new(&server.url(), &credentials, None, false, timeout).unwrap();
    assert_unknown_issuer(&untrusted.ping().await.unwrap_err());
}

/// Access to the local broker's plaintext port, with no login.
fn plain_access(bootstrap: &str) -> operator::provision::kafka::KafkaAccess {
    operator::provision::kafka::KafkaAccess {
        bootstrap_servers: bootstrap.to_owned(),
        credentials: None,
        mechanism: operator::crd::SaslMechanism::Plain,
        tls: None,
    }
}

/// The local broker's SASL ports (`dev/deps/kafka.sh`): SASL_PLAINTEXT, or SASL_SSL with its
/// CA, as its `admin`.
pub(crate) fn sasl_access(tls: bool) -> operator::provision::kafka::KafkaAccess {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let (bootstrap, tls) = if tls {
        let ca_file = std::env::var("MERIDIAN_KAFKA_CA_FILE").expect("MERIDIAN_KAFKA_CA_FILE");
        let ca = std::fs::read_to_string(&ca_file).expect("the local Kafka CA");
        (
            var("MERIDIAN_KAFKA_SSL_BOOTSTRAP", "127.0.0.1:9095"),
            Some(operator::provision::kafka::KafkaTlsAccess { ca_pem: Some(ca) }),
        )
    } else {
        (var("MERIDIAN_KAFKA_SASL_BOOTSTRAP", "127.0.0.1:9094"), None)
    };
    operator::provision::kafka::KafkaAccess {
        bootstrap_servers: bootstrap,
        credentials: Some(AdminCredentials {
            username: var("MERIDIAN_KAFKA_ADMIN_USER", "admin"),
            password: SecretString::from(var(
                "MERIDIAN_KAFKA_ADMIN_PASSWORD",
                "meridian-kafka-admin",
            )),
        }),
        mechanism: operator::crd::SaslMechanism::Plain,
        tls,
    }
}

/// A tenant's client settings: a SCRAM-SHA-512 login on `access`'s port.
pub(crate) fn tenant_config(
    access: &operator::provision::kafka::KafkaAccess,
    user: &str,
    password: &str,
) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", &access.bootstrap_servers)
        .set("security.protocol", access.security_protocol())
        .set("sasl.mechanisms", "SCRAM-SHA-512")
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("message.timeout.ms", "5000")
        .set("socket.timeout.ms", "5000")
        .set("log_level", "0");
    if access.tls.is_some() {
        config.set(
            "ssl.ca.location",
            std::env::var("MERIDIAN_KAFKA_CA_FILE").expect("MERIDIAN_KAFKA_CA_FILE"),
        );
    }
    config
}

/// A metadata request as the tenant (librdkafka reports a refused login as a transport
/// failure: the broker closes the connection).
pub(crate) async fn metadata(config: &rdkafka::ClientConfig) -> Result<(), String> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer as _;
        let producer: rdkafka::producer::BaseProducer =
            config.create().map_err(|e| e.to_string())?;
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Produces one record to `topic` as the tenant.
pub(crate) async fn produce(config: &rdkafka::ClientConfig, topic: &str) -> Result<(), String> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
    producer
        .send(
            FutureRecord::<(), _>::to(topic).payload("isolation"),
            Duration::from_secs(5),
        )
        .await
        .map(drop)
        .map_err(|(e, _)| e.to_string())
}

/// Reads `topic` from the start in `group` as the tenant: the records' count, or the error.
fn consume(config: &rdkafka::ClientConfig, topic: &str, group: &str) -> Result<usize, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| e.to_string())?;
    consumer.subscribe(&[topic]).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut read = 0;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(_)) => {
                read += 1;
                if read > 0 {
                    return Ok(read);
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
    }
    Ok(read)
}

/// Two stacks' principals on the real broker (SASL, StandardAuthorizer): each reads and writes
/// its own topics, in its own groups, and is refused the other's; provisioning twice changes
/// nothing; removing a principal ends its login. Once over SASL_PLAINTEXT, once over SASL_SSL
/// (the operator's admin connection and the tenant's both trusting the local CA).
#[tokio::test]
async fn a_stack_principal_reaches_only_its_own_topics_and_groups() {
    use operator::provision::kafka::{DesiredTopic, KafkaClients, KafkaCluster};

    async fn create_topic(cluster: &KafkaCluster, name: &str) {
        let topic = DesiredTopic {
            name: name.to_owned(),
            partitions: 1,
            replication_factor: 1,
            config: Default::default(),
        };
        cluster
            .reconcile_topics(&[topic], Duration::from_secs(10))
            .await
            .unwrap();
    }

    for tls in [false, true] {
        let access = sasl_access(tls);
        let clients = KafkaClients::default();
        let cluster = clients.cluster("test/acl", &access).unwrap();
        let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let timeout = Duration::from_secs(10);
        let mut stacks = Vec::new();
        for name in ["a", "b"] {
            let prefix = format!("itacl{run}.{name}.");
            let user = format!("meridian:itacl{run}:{name}");
            let second = format!("{user}:b");
            let password = operator::provision::generate_password();
            let topic = format!("{prefix}commands");
            create_topic(&cluster, &topic).await;
            let changed = cluster
                .ensure_principal(&[&user, &second], &user, &password, true, &prefix, timeout)
                .await
                .unwrap();
            assert!(changed, "a new principal is a change");
            let again = cluster
                .ensure_principal(&[&user, &second], &user, &password, false, &prefix, timeout)
                .await
                .unwrap();
            assert!(
                !again,
                "provisioning an unchanged principal again changed something"
            );
            stacks.push((prefix, user, second, password, topic));
        }
        use secrecy::ExposeSecret as _;
        let (a, b) = (&stacks[0], &stacks[1]);
        let as_a = tenant_config(&access, &a.1, a.3.expose_secret());

        produce(&as_a, &a.4).await.expect("a writes its own topic");
        let own =
            consume(&as_a, &a.4, &format!("{}processor", a.0)).expect("a reads its own topic");
        assert_eq!(own, 1, "tls={tls}");
        let write = produce(&as_a, &b.4).await.expect_err("a wrote b's topic");
        assert!(
            write.contains("authoriz") || write.contains("Authoriz"),
            "tls={tls}: {write}"
        );
        let read =
            consume(&as_a, &b.4, &format!("{}processor", a.0)).expect_err("a read b's topic");
        assert!(
            read.to_lowercase().contains("authoriz"),
            "tls={tls}: {read}"
        );
        let group =
            consume(&as_a, &a.4, &format!("{}processor", b.0)).expect_err("a joined b's group");
        assert!(
            group.to_lowercase().contains("authoriz"),
            "tls={tls}: {group}"
        );
        // A name that merely starts like a's prefix without its dot is not a's.
        let lookalike = format!("{}x.commands", a.0.trim_end_matches('.'));
        create_topic(&cluster, &lookalike).await;
        let write = produce(&as_a, &lookalike)
            .await
            .expect_err("a wrote a look-alike topic");
        assert!(
            write.to_lowercase().contains("authoriz"),
            "tls={tls}: {write}"
        );

        metadata(&as_a)
            .await
            .expect("a reads metadata before its removal");
        for (_, user, second, ..) in &stacks {
            cluster
                .remove_principal(&[user, second], timeout)
                .await
                .unwrap();
        }
        metadata(&as_a)
            .await
            .expect_err("a removed login still reads metadata");

        let mut names: Vec<String> = stacks.iter().map(|s| s.4.clone()).collect();
        names.push(lookalike);
        cluster.delete_topics(&names, timeout).await.unwrap();
    }
}
