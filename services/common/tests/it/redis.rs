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
