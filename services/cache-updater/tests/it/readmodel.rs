//! The version-guarded script of `common::readmodel` against the real Redis.

use std::time::Duration;

use common::readmodel::{self, Lookup, Outcome};
use common::test_support::Deps;
use serde_json::json;
use uuid::Uuid;

use crate::support::event;

const TTL: Duration = Duration::from_secs(60);

async fn redis() -> (redis::aio::MultiplexedConnection, String) {
    let client = redis::Client::open(Deps::from_env().redis_url).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (conn, format!("it:rm:{}:", Uuid::new_v4().simple()))
}

/// Removes the test's keys (as the default user, who may `SCAN`; a stack's user may not).
async fn cleanup(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("UNLINK")
            .arg(&keys)
            .query_async(conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn stale_event_never_overwrites_newer_version() {
    let (mut conn, prefix) = redis().await;
    let newer = event("patched", "books", "b1", 5, Some(json!({"title": "v5"})));
    let older = event("patched", "books", "b1", 4, Some(json!({"title": "v4"})));

    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &newer, TTL)
            .await
            .unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &older, TTL)
            .await
            .unwrap(),
        Outcome::Stale
    );
    assert_eq!(
        readmodel::read(&mut conn, &prefix, "books", "b1")
            .await
            .unwrap(),
        Lookup::Found {
            version: 5,
            data: json!({"title": "v5"})
        }
    );
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn delete_tombstone_blocks_an_older_create_and_expires() {
    let (mut conn, prefix) = redis().await;
    let created = event("created", "books", "b1", 1, Some(json!({"title": "v1"})));
    let deleted = event("deleted", "books", "b1", 2, None);

    // The delete overtakes the create (e.g. a replay that starts mid-history).
    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &deleted, TTL)
            .await
            .unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &created, TTL)
            .await
            .unwrap(),
        Outcome::Stale
    );
    assert_eq!(
        readmodel::read(&mut conn, &prefix, "books", "b1")
            .await
            .unwrap(),
        Lookup::Deleted { version: 2 }
    );
    let key = readmodel::document_key(&prefix, "books", "b1");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "tombstone TTL {ttl}");
    let has_data: bool = redis::cmd("HEXISTS")
        .arg(&key)
        .arg("data")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!has_data, "a tombstone keeps no data");

    // A re-create continues the version sequence, replaces the tombstone and never expires.
    let recreated = event("created", "books", "b1", 3, Some(json!({"title": "again"})));
    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &recreated, TTL)
            .await
            .unwrap(),
        Outcome::Applied
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "a live document has no TTL");
    assert_eq!(
        readmodel::read(&mut conn, &prefix, "books", "b1")
            .await
            .unwrap(),
        Lookup::Found {
            version: 3,
            data: json!({"title": "again"})
        }
    );
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn equal_version_is_a_no_op() {
    let (mut conn, prefix) = redis().await;
    let first = event("created", "books", "b1", 1, Some(json!({"title": "first"})));
    // Same version, different content: a redelivery must not change anything.
    let again = event("created", "books", "b1", 1, Some(json!({"title": "other"})));

    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &first, TTL)
            .await
            .unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        readmodel::apply(&mut conn, &prefix, &again, TTL)
            .await
            .unwrap(),
        Outcome::Stale
    );
    assert_eq!(
        readmodel::read(&mut conn, &prefix, "books", "b1")
            .await
            .unwrap(),
        Lookup::Found {
            version: 1,
            data: json!({"title": "first"})
        }
    );
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn unlink_removes_only_the_named_documents_of_this_stack() {
    let (mut conn, prefix) = redis().await;
    let (_, other) = redis().await;
    for (p, id) in [(&prefix, "a"), (&prefix, "b"), (&other, "a")] {
        let e = event("created", "books", id, 1, Some(json!({})));
        readmodel::apply(&mut conn, p, &e, TTL).await.unwrap();
    }
    let unrelated = format!("{prefix}epoch:doc:books:a");
    let _: () = redis::cmd("SET")
        .arg(&unrelated)
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();

    let named = [("books", "a"), ("books", "b"), ("books", "never-written")];
    assert_eq!(
        readmodel::unlink(&mut conn, &prefix, named).await.unwrap(),
        2
    );
    assert_eq!(readmodel::unlink(&mut conn, &prefix, []).await.unwrap(), 0);
    assert_eq!(
        readmodel::read(&mut conn, &prefix, "books", "a")
            .await
            .unwrap(),
        Lookup::Missing
    );
    assert!(matches!(
        readmodel::read(&mut conn, &other, "books", "a")
            .await
            .unwrap(),
        Lookup::Found { version: 1, .. }
    ));
    let kept: bool = redis::cmd("EXISTS")
        .arg(&unrelated)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(kept, "keys other than doc:* are left alone");
    let _: () = redis::cmd("DEL")
        .arg(&unrelated)
        .query_async(&mut conn)
        .await
        .unwrap();
    cleanup(&mut conn, &other).await;
}

/// The cache updater's script: an applied event is announced to each of its rooms (history
/// and channel, the same offsets), a stale one changes and announces nothing.
#[tokio::test]
async fn apply_and_publish_announces_applied_events_only() {
    use common::config::RedisConfig;
    use common::redis::Redis;
    use common::rooms::{HistorySettings, Position, Publication, Rooms};
    use common::shutdown::CancellationToken;
    use common::test_support::{test_vars, wait_until};
    use futures::StreamExt as _;

    let (mut conn, prefix) = redis().await;
    let config: RedisConfig = test_vars()
        .with("REDIS_KEY_PREFIX", &prefix)
        .parse()
        .unwrap();
    let shared = Redis::connect_in_background("it", &config, &CancellationToken::new()).unwrap();
    wait_until("Redis to connect", Duration::from_secs(10), || {
        let shared = shared.clone();
        async move { shared.connection().is_ok() }
    })
    .await;
    const TRACE_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let rooms = Rooms::new(shared, HistorySettings::default());
    let names = ["doc:books:b1".to_owned(), "collection:books".to_owned()];
    let client = redis::Client::open(Deps::from_env().redis_url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    for name in &names {
        pubsub.subscribe(rooms.channel(name)).await.unwrap();
    }
    let mut messages = pubsub.into_on_message();

    let run = |event: common::envelope::EventEnvelope, payload: &'static [u8]| {
        let (mut conn, prefix, rooms, names) =
            (conn.clone(), prefix.clone(), rooms.clone(), names.clone());
        async move {
            let applied: i64 = readmodel::apply_and_publish_invocation(
                &prefix,
                &event,
                TTL,
                &rooms,
                &names,
                payload,
                Some(TRACE_PARENT),
            )
            .invoke_async(&mut conn)
            .await
            .unwrap();
            Outcome::from_reply(applied)
        }
    };
    let v2 = event("patched", "books", "b1", 2, Some(json!({"title": "v2"})));
    let v1 = event("created", "books", "b1", 1, Some(json!({"title": "v1"})));
    assert_eq!(run(v2, b"\x00event two\xff").await, Outcome::Applied);
    // Overtaken by version 2: neither the read model nor the rooms see it.
    assert_eq!(run(v1, b"event one").await, Outcome::Stale);

    let mut got = Vec::new();
    for _ in 0..names.len() {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a notification per room")
            .unwrap();
        let publication = Publication::decode(axum::body::Bytes::from(
            message.get_payload_bytes().to_vec(),
        ))
        .unwrap();
        got.push((message.get_channel_name().to_owned(), publication));
    }
    for (name, (channel, publication)) in names.iter().zip(&got) {
        assert_eq!(channel, &rooms.channel(name));
        assert_eq!(publication.offset, 1);
        assert_eq!(&publication.payload[..], b"\x00event two\xff");
        assert_eq!(publication.trace_parent.as_deref(), Some(TRACE_PARENT));
        let recovery = rooms
            .recover(
                name,
                &Position {
                    epoch: publication.epoch.clone(),
                    offset: 0,
                },
            )
            .await
            .unwrap();
        assert_eq!(recovery.position.offset, 1, "{name}: one publication");
        assert_eq!(recovery.publications.unwrap(), vec![publication.clone()]);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), messages.next())
            .await
            .is_err(),
        "the stale event was announced"
    );
    assert_eq!(
        readmodel::read(&mut conn, &prefix, "books", "b1")
            .await
            .unwrap(),
        Lookup::Found {
            version: 2,
            data: json!({"title": "v2"})
        }
    );
    for name in &names {
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}epoch:{name}"))
            .arg(format!("{prefix}history:{name}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    cleanup(&mut conn, &prefix).await;
}
