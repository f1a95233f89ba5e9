use common::test_support::Deps;

/// The operator will create one ACL user per stack, restricted to the stack's key prefix and
/// channels; the local Redis must support exactly that.
#[tokio::test]
async fn an_acl_user_is_confined_to_its_key_prefix() {
    let deps = Deps::from_env();
    let admin = redis::Client::open(deps.redis_url.as_str()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let user = format!("smoke-{}", uuid::Uuid::new_v4().simple());
    let prefix = format!("{user}:");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("reset")
        .arg("on")
        .arg(">s3cret")
        .arg(format!("~{prefix}*"))
        .arg(format!("&{prefix}*"))
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .unwrap();

    let mut url = url::Url::parse(&deps.redis_url).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some("s3cret")).unwrap();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}k"))
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let denied = redis::cmd("SET")
        .arg("elsewhere:k")
        .arg("v")
        .query_async::<()>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some("NOPERM"), "{denied}");

    let wrong = url.clone();
    let mut wrong = wrong;
    wrong.set_password(Some("wrong")).unwrap();
    assert!(
        redis::Client::open(wrong.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .is_err()
    );

    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}k"))
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
}

/// Redis restarted without the stack's ACL user (users live in memory; the operator re-creates
/// them moments later): the handle's reconnect is refused, and once the user is back the
/// handle heals by itself, without a restart of the service.
#[tokio::test]
async fn a_handle_refused_after_its_user_vanished_heals_once_the_user_is_back() {
    use common::config::RedisConfig;
    use common::health::Check as _;
    use common::redis::Redis;
    use common::shutdown::CancellationToken;
    use common::test_support::wait_until;
    use std::time::Duration;

    let deps = Deps::from_env();
    let mut admin = redis::Client::open(deps.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let user = format!("heal-{}", uuid::Uuid::new_v4().simple());
    let acl = |verb: &'static str| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg(verb).arg(&user);
        if verb == "SETUSER" {
            cmd.arg("reset").arg("on").arg(">s3cret");
            cmd.arg(format!("~{user}:*"))
                .arg(format!("&{user}:*"))
                .arg("+@all");
        }
        cmd
    };
    let _: () = acl("SETUSER").query_async(&mut admin).await.unwrap();

    let mut url = url::Url::parse(&deps.redis_url).unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some("s3cret")).unwrap();
    let config = RedisConfig {
        redis_url: url.to_string().into(),
        redis_key_prefix: format!("{user}:"),
        redis_timeout_ms: 1_000,
        redis_ca_file: None,
    };
    let shutdown = CancellationToken::new();
    let handle = Redis::connect_in_background("test", &config, &shutdown).unwrap();
    let ready = || {
        let handle = handle.clone();
        async move { handle.check().await.is_ok() }
    };
    wait_until("the first connection", Duration::from_secs(10), ready).await;

    // The user goes (Redis closes its connections); the manager's reconnect is refused.
    let _: () = acl("DELUSER").query_async(&mut admin).await.unwrap();
    let refused = || {
        let handle = handle.clone();
        async move {
            handle
                .check()
                .await
                .is_err_and(|e| e.contains("uthentication"))
        }
    };
    wait_until(
        "the reconnect to be refused",
        Duration::from_secs(10),
        refused,
    )
    .await;

    // The user is back: the handle heals within the backoff's bound.
    let _: () = acl("SETUSER").query_async(&mut admin).await.unwrap();
    wait_until("the handle to heal", Duration::from_secs(15), ready).await;

    shutdown.cancel();
    let _: () = acl("DELUSER").query_async(&mut admin).await.unwrap();
}

/// A Redis server that speaks only TLS, on a free port, with a certificate for 127.0.0.1
/// from a CA of its own (Debian's `redis-server`, built with TLS); killed on drop.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("tls-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).expect("a temporary directory");
        let ca_key = rcgen::KeyPair::generate().expect("a key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test redis CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("a CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("server parameters")
            .signed_by(&key, &issuer)
            .expect("a server certificate");
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("a certificate file");
            path
        };
        let ca = write("ca.crt", ca_cert.pem());
        let crt = write("redis.crt", cert.pem());
        let key = write("redis.key", key.serialize_pem());
        let port = common::test_support::free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(&crt)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's, `just deps-up redis`) is on PATH");
        Self {
            child,
            port,
            ca,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `rediss://` with `REDIS_CA_FILE`: the services' client verifies the server against that CA
/// and talks to it; without the CA (the system's roots) the handshake is refused.
#[tokio::test]
async fn a_rediss_url_connects_over_tls_trusting_the_configured_ca() {
    use secrecy::SecretString;
    let server = TlsRedis::start();
    let config = |ca: Option<&std::path::Path>| common::config::RedisConfig {
        redis_url: SecretString::from(server.url()),
        redis_key_prefix: "tls:".to_owned(),
        redis_timeout_ms: 2000,
        redis_ca_file: ca.map(|p| p.display().to_string()),
    };
    let trusted = common::redis::client_for(&config(Some(&server.ca))).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut conn = loop {
        match trusted.get_multiplexed_async_connection().await {
            Ok(conn) => break conn,
            Err(error) if std::time::Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => panic!("no TLS connection with the CA: {error}"),
        }
    };
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    let untrusted = common::redis::client_for(&config(None)).unwrap();
    let refused = untrusted.get_multiplexed_async_connection().await;
    assert!(
        refused.is_err(),
        "a server whose CA is not trusted was accepted"
    );

    let missing =
        common::redis::client_for(&config(Some(std::path::Path::new("/nonexistent/ca.pem"))));
    assert!(
        matches!(missing, Err(common::redis::RedisError::CaFile { .. })),
        "an unreadable REDIS_CA_FILE must be named"
    );
}
