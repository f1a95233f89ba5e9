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
        redis_cluster: false,
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

/// `rediss://` with `REDIS_CA_FILE`: the services' client verifies the server against that CA
/// and talks to it; without the CA (the system's roots) the handshake is refused.
#[tokio::test]
async fn a_rediss_url_connects_over_tls_trusting_the_configured_ca() {
    use common::test_support::tls_redis::TlsRedis;
    use secrecy::SecretString;
    let server = TlsRedis::start().await;
    let config = |ca: Option<&std::path::Path>| common::config::RedisConfig {
        redis_url: SecretString::from(server.url()),
        redis_key_prefix: "tls:".to_owned(),
        redis_timeout_ms: 2000,
        redis_ca_file: ca.map(|p| p.display().to_string()),
        redis_cluster: false,
    };
    let trusted = common::redis::client_for(&config(Some(server.ca_file()))).unwrap();
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

/// A stack's ACL user (the operator's rules) runs what the services run — the read model's
/// scripts, reads and removals, room history and publications — and is refused every command
/// that would show it other stacks' key or channel names, and any key outside its prefix.
#[tokio::test]
async fn a_stack_user_runs_the_services_commands_and_cannot_list_other_stacks() {
    use common::readmodel::{self, Lookup};
    use common::test_support::stack_redis_url;

    let prefix = format!("it-acl-{}:", uuid::Uuid::new_v4().simple());
    let url = stack_redis_url(&prefix);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let event: common::envelope::EventEnvelope = serde_json::from_value(serde_json::json!({
        "eventId": uuid::Uuid::new_v4(), "type": "created", "collection": "books", "id": "b1",
        "version": 1, "data": {"t": 1}, "commandId": uuid::Uuid::new_v4(),
        "occurredAt": "2026-01-01T00:00:00Z"
    }))
    .unwrap();
    let ttl = std::time::Duration::from_secs(60);
    readmodel::apply(&mut conn, &prefix, &event, ttl)
        .await
        .unwrap();
    assert!(matches!(
        readmodel::read(&mut conn, &prefix, "books", "b1")
            .await
            .unwrap(),
        Lookup::Found { version: 1, .. }
    ));
    assert_eq!(
        readmodel::unlink(&mut conn, &prefix, [("books", "b1")])
            .await
            .unwrap(),
        1
    );
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    for command in [
        vec!["SCAN", "0"],
        vec!["KEYS", "*"],
        vec!["RANDOMKEY"],
        vec!["DBSIZE"],
        vec!["PUBSUB", "CHANNELS"],
        vec!["INFO", "keyspace"],
        vec!["CLIENT", "LIST"],
        vec!["FLUSHDB"],
        vec!["CONFIG", "GET", "*"],
    ] {
        let refused = redis::cmd(command[0])
            .arg(&command[1..])
            .query_async::<redis::Value>(&mut conn)
            .await
            .expect_err(&format!("{command:?} was allowed"));
        assert_eq!(refused.code(), Some("NOPERM"), "{command:?}: {refused}");
    }
    let outside = redis::cmd("GET")
        .arg("another-stack:doc:books:b1")
        .query_async::<Option<String>>(&mut conn)
        .await
        .expect_err("a key outside the prefix was readable");
    assert_eq!(outside.code(), Some("NOPERM"), "{outside}");
}
