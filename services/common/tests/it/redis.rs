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
