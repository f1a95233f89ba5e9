//! The cache updater service on real Kafka and Redis, fed with events produced directly to its
//! stack's `events` topic: projection, room notifications, invalidations, malformed and stale
//! events, and the `rebuild` subcommand.

use std::time::Duration;

use cache_updater::CacheUpdater;
use cache_updater::updater::{Invalidation, MESSAGE_TYPE_INVALIDATE};
use common::kafka;
use common::readmodel::Lookup;
use common::service::ServiceConfig as _;
use common::shutdown::CancellationToken;
use common::test_support::wait_until;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::{Message as _, TopicPartitionList};
use serde_json::json;

use crate::support::{Stack, event, next_publication};

#[tokio::test]
async fn events_are_projected_announced_and_invalidated_and_bad_ones_skipped() {
    let stack = Stack::new().await;
    let app = stack
        .start::<CacheUpdater>(&[("CACHE_TOMBSTONE_TTL_SECONDS", "60")])
        .await;
    let mut doc_room = stack.subscribe("doc:books:b1").await;
    let mut collection_room = stack.subscribe("collection:books").await;

    let v1 = event("created", "books", "b1", 1, Some(json!({"title": "Dune"})));
    let v2 = event(
        "patched",
        "books",
        "b1",
        2,
        Some(json!({"title": "Dune", "year": 1965})),
    );
    let mut cmd_room = stack.subscribe(&format!("cmd:{}", v2.command_id)).await;
    let v3 = event("deleted", "books", "b1", 3, None);
    let v4 = event(
        "created",
        "books",
        "b1",
        4,
        Some(json!({"title": "Dune Messiah"})),
    );

    // In one partition, in this order: garbage, v1, v2, a redelivered v1, the delete, a late
    // v2 after the delete (must not resurrect), then a re-create at v4.
    stack.produce_raw("books/b1", b"{not an event").await;
    stack.produce(&v1).await;
    stack.produce(&v2).await;
    stack.produce(&v1).await;
    stack.produce(&v3).await;
    stack.produce(&v2).await;
    stack.produce(&v4).await;

    // Exactly the four applied events reach the document's room, in order.
    let mut versions = Vec::new();
    while versions.last() != Some(&4) {
        versions.push(next_publication(&mut doc_room).await.version);
    }
    assert_eq!(versions, [1, 2, 3, 4]);
    assert_eq!(next_publication(&mut collection_room).await, v1);
    let announced = next_publication(&mut cmd_room).await;
    assert_eq!(announced, v2, "the command's room gets its own event");
    assert_eq!(
        stack.lookup("books", "b1").await,
        Lookup::Found {
            version: 4,
            data: json!({"title": "Dune Messiah"})
        }
    );

    // One invalidation per applied event, keyed by the document, with the documented header.
    let reader = stack.read_from_start(kafka::TOPIC_CACHE);
    let mut invalidations = Vec::new();
    while invalidations.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .expect("no invalidation within 30 s")
            .unwrap();
        assert_eq!(message.key(), Some(&b"books/b1"[..]));
        let message_type = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == kafka::HEADER_MESSAGE_TYPE))
            .and_then(|h| h.value)
            .unwrap();
        assert_eq!(message_type, MESSAGE_TYPE_INVALIDATE.as_bytes());
        let body: Invalidation = serde_json::from_slice(message.payload().unwrap()).unwrap();
        invalidations.push(body);
    }
    let expected: Vec<Invalidation> = (1..=4)
        .map(|version| Invalidation {
            collection: "books".into(),
            id: "b1".into(),
            version,
        })
        .collect();
    assert_eq!(invalidations, expected);

    // The skipped messages are counted.
    let metrics = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "cache_events_malformed_total",
        "cache_events_stale_total",
        "cache_events_applied_total",
        "cache_apply_duration_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    app.stop().await;
    stack.cleanup().await;
}

#[tokio::test]
async fn offsets_of_handled_messages_are_committed_on_shutdown() {
    let stack = Stack::new().await;
    let app = stack.start::<CacheUpdater>(&[]).await;
    stack.produce_raw("books/r1", b"malformed").await;
    stack
        .produce(&event("created", "books", "r1", 1, Some(json!({"n": 1}))))
        .await;
    stack
        .produce(&event("patched", "books", "r1", 2, Some(json!({"n": 2}))))
        .await;
    wait_until("v2 to be projected", Duration::from_secs(30), || async {
        matches!(
            stack.lookup("books", "r1").await,
            Lookup::Found { version: 2, .. }
        )
    })
    .await;
    app.stop().await;

    // The group's committed offsets cover all three messages (malformed one included), so a
    // restarted member resumes after them.
    let config = cache_updater::Config::from_vars(&stack.vars).unwrap();
    let group: StreamConsumer = kafka::client_config(&stack.kafka, "it-offsets")
        .set("group.id", config.consumer_group())
        .create()
        .unwrap();
    let topic = stack.topic(kafka::TOPIC_EVENTS);
    let mut tpl = TopicPartitionList::new();
    for partition in 0..crate::support::PARTITIONS {
        tpl.add_partition(&topic, partition);
    }
    let committed = group
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let total: i64 = committed
        .elements()
        .iter()
        .filter_map(|e| e.offset().to_raw())
        .filter(|offset| *offset >= 0)
        .sum();
    assert_eq!(total, 3, "committed offsets {committed:?}");
    stack.cleanup().await;
}

#[tokio::test]
async fn rebuild_replays_events_into_an_emptied_read_model() {
    let stack = Stack::new().await;
    let mut events = Vec::new();
    for i in 0..30 {
        let id = format!("d{i}");
        events.push(event("created", "books", &id, 1, Some(json!({"i": i}))));
        events.push(event(
            "patched",
            "books",
            &id,
            2,
            Some(json!({"i": i, "p": true})),
        ));
        if i % 3 == 0 {
            events.push(event("deleted", "books", &id, 3, None));
        }
    }
    for e in &events {
        stack.produce(e).await;
    }
    stack.produce_raw("books/bad", b"garbage").await;
    // A document that is not in the topic, left over in Redis: the rebuild removes it.
    let ghost = event("created", "books", "ghost", 7, Some(json!({})));
    let mut conn = stack.redis.clone();
    common::readmodel::apply(
        &mut conn,
        &stack.redis_prefix,
        &ghost,
        Duration::from_secs(60),
    )
    .await
    .unwrap();

    let config = cache_updater::Config::from_vars(&stack.vars).unwrap();
    let summary = cache_updater::rebuild::rebuild(&config, &CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(summary.cleared, 1);
    assert_eq!(summary.events, events.len() as u64 + 1);
    assert_eq!(summary.applied, events.len() as u64);
    assert_eq!(summary.malformed, 1);
    assert_eq!(stack.lookup("books", "ghost").await, Lookup::Missing);
    for i in 0..30 {
        let expected = if i % 3 == 0 {
            Lookup::Deleted { version: 3 }
        } else {
            Lookup::Found {
                version: 2,
                data: json!({"i": i, "p": true}),
            }
        };
        assert_eq!(stack.lookup("books", &format!("d{i}")).await, expected);
    }
    stack.cleanup().await;
}

#[tokio::test]
async fn rebuild_binary_prints_a_summary_and_exits() {
    let stack = Stack::new().await;
    stack
        .produce(&event("created", "books", "x", 1, Some(json!({"x": 1}))))
        .await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cache-updater"))
        .arg("rebuild")
        .env("KAFKA_TOPIC_PREFIX", stack.kafka.kafka_topic_prefix.clone())
        .env("REDIS_KEY_PREFIX", stack.redis_prefix.clone())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "rebuild failed: {output:?}");
    assert!(
        stdout.contains("replayed 1 events") && stdout.contains("1 applied"),
        "unexpected summary: {stdout}"
    );
    assert!(matches!(
        stack.lookup("books", "x").await,
        Lookup::Found { version: 1, .. }
    ));
    stack.cleanup().await;
}
