//! The cache updater service on real Kafka and Redis, fed with events produced directly to its
//! stack's `events` topic: projection, room notifications, invalidations, malformed and stale
//! events, a burst handled in batches, and the `rebuild` subcommand.

use std::collections::HashMap;
use std::time::Duration;

use cache_updater::CacheUpdater;
use cache_updater::updater::{Invalidation, MESSAGE_TYPE_INVALIDATE};
use common::envelope::EventEnvelope;
use common::kafka;
use common::readmodel::Lookup;
use common::service::ServiceConfig as _;
use common::shutdown::CancellationToken;
use common::test_support::{wait_ready, wait_until};
use futures::FutureExt as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::{Message as _, TopicPartitionList};
use serde_json::json;

use crate::support::{Stack, event, next_publication, next_traced_publication, spawn_binary};

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
    let metrics = common::test_support::metrics_text(&app.url("")).await;
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
    assert_eq!(committed_messages(&stack), 3);
    stack.cleanup().await;
}

/// How many `events` messages the updater's consumer group has committed, over all partitions.
fn committed_messages(stack: &Stack) -> i64 {
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
    committed
        .elements()
        .iter()
        .filter_map(|e| e.offset().to_raw())
        .filter(|offset| *offset >= 0)
        .sum()
}

#[tokio::test]
async fn a_burst_is_handled_in_batches_in_order_without_stale_events_and_with_each_trace() {
    const DOCS: usize = 4;
    const VERSIONS: i64 = 100;
    let stack = Stack::new().await;
    // Redis forgets its scripts, so the first pipelines take the NOSCRIPT fallback. Every
    // script user of the platform reloads on NOSCRIPT, so concurrent tests are unaffected.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut stack.redis.clone())
        .await
        .unwrap();
    let ids: Vec<String> = (0..DOCS).map(|d| format!("burst{d}")).collect();
    let mut doc_rooms = Vec::new();
    for id in &ids {
        doc_rooms.push(stack.subscribe(&format!("doc:books:{id}")).await);
    }
    let mut collection_room = stack.subscribe("collection:books").await;

    // Before the updater starts: versions 1..=VERSIONS of each document, interleaved; before
    // some versions a redelivery of an older one (stale by then), each with its original trace;
    // two malformed messages. Each document's last message is its last version; the first
    // document ends deleted.
    let trace_id = |d: usize, version: i64| format!("{:016x}{version:016x}", d + 1);
    let message = |d: usize, event: &EventEnvelope| {
        let traceparent = format!("00-{}-00f067aa0ba902b7-01", trace_id(d, event.version));
        (
            event.key(),
            serde_json::to_vec(event).unwrap(),
            Some(traceparent),
        )
    };
    let mut sent: HashMap<(usize, i64), EventEnvelope> = HashMap::new();
    let mut messages = vec![("books/bad".to_owned(), b"not an event".to_vec(), None)];
    let mut stale = 0;
    for version in 1..=VERSIONS {
        for (d, id) in ids.iter().enumerate() {
            for redelivered in [version - 3, version - 1] {
                if redelivered >= 1 && (version % 5 == 0 || version % 7 == 0) {
                    messages.push(message(d, &sent[&(d, redelivered)]));
                    stale += 1;
                }
            }
            let event = if d == 0 && version == VERSIONS {
                event("deleted", "books", id, version, None)
            } else {
                let data = json!({"id": id, "version": version});
                event("patched", "books", id, version, Some(data))
            };
            messages.push(message(d, &event));
            sent.insert((d, version), event);
        }
        if version == VERSIONS / 2 {
            messages.push(("books/bad".to_owned(), b"{}".to_vec(), None));
        }
    }
    stack.produce_burst(&messages).await;

    // The binary, so its /metrics are its own, with its `cache.apply` spans enabled (their
    // context is what the invalidations carry).
    let (process, base, log) = spawn_binary(&stack, "burst", "warn,cache_updater=info");
    wait_ready(&format!("{base}/ready"), Duration::from_secs(60)).await;

    // Each document's room gets exactly its versions in order: no stale event, none missing
    // (a stale one would come before the document's last version, its last message); each
    // publication continues its event's trace (the hub's fan-out span joins it).
    let all: Vec<i64> = (1..=VERSIONS).collect();
    for (d, room) in doc_rooms.iter_mut().enumerate() {
        let mut versions = Vec::new();
        while versions.last() != Some(&VERSIONS) {
            let (event, traceparent) = next_traced_publication(room).await;
            assert_eq!(event, sent[&(d, event.version)], "log: {}", log.display());
            let traceparent = traceparent.expect("a publication without traceparent");
            assert_eq!(
                traceparent.split('-').nth(1),
                Some(trace_id(d, event.version).as_str())
            );
            versions.push(event.version);
        }
        assert_eq!(versions, all, "room of {} (log: {})", ids[d], log.display());
    }
    let mut per_doc: HashMap<String, Vec<i64>> = HashMap::new();
    for _ in 0..DOCS * all.len() {
        let event = next_publication(&mut collection_room).await;
        per_doc.entry(event.id).or_default().push(event.version);
    }
    for id in &ids {
        assert_eq!(per_doc[id], all, "collection room, {id}");
    }

    // The read model holds each document's last version.
    for (d, id) in ids.iter().enumerate() {
        let expected = if d == 0 {
            Lookup::Deleted { version: VERSIONS }
        } else {
            Lookup::Found {
                version: VERSIONS,
                data: json!({"id": id, "version": VERSIONS}),
            }
        };
        assert_eq!(stack.lookup("books", id).await, expected);
    }

    // One invalidation per applied event, in order per document, each carrying its event's
    // trace.
    let reader = stack.read_from_start(kafka::TOPIC_CACHE);
    let mut invalidated: HashMap<String, Vec<i64>> = HashMap::new();
    for _ in 0..DOCS * all.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .expect("no invalidation within 30 s")
            .unwrap();
        let body: Invalidation = serde_json::from_slice(message.payload().unwrap()).unwrap();
        let d = ids.iter().position(|id| *id == body.id).unwrap();
        let traceparent = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .expect("an invalidation without traceparent");
        let expected = trace_id(d, body.version);
        assert_eq!(traceparent.split('-').nth(1), Some(expected.as_str()));
        invalidated.entry(body.id).or_default().push(body.version);
    }
    for id in &ids {
        assert_eq!(invalidated[id], all, "invalidations of {id}");
    }

    // Every message was counted once, and the burst went through in batches.
    let metrics_url = format!("{base}/metrics");
    let value = |metrics: &str, name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let scrape = || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let total = messages.len() as f64;
    wait_until(
        "every message to be counted",
        Duration::from_secs(30),
        || async {
            let metrics = scrape().await;
            value(&metrics, "cache_events_applied_total")
                + value(&metrics, "cache_events_stale_total")
                + value(&metrics, "cache_events_malformed_total")
                >= total
        },
    )
    .await;
    let metrics = scrape().await;
    let counted = |name: &str| value(&metrics, name);
    assert_eq!(
        counted("cache_events_applied_total"),
        (DOCS * all.len()) as f64
    );
    assert_eq!(counted("cache_events_stale_total"), f64::from(stale));
    assert_eq!(counted("cache_events_malformed_total"), 2.0);
    let (batches, batched) = (
        counted("cache_batch_size_count"),
        counted("cache_batch_size_sum"),
    );
    assert_eq!(batched, total, "every message in one batch");
    assert!(batches < total, "{batches} batches for {total} messages");

    let status = process.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exited with {status} (log: {})",
        log.display()
    );
    assert_eq!(committed_messages(&stack), messages.len() as i64);
    stack.cleanup().await;
}

#[tokio::test]
async fn rebuild_replays_events_into_the_documents_it_emptied() {
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
    // A document no event is about, left over in Redis: the rebuild leaves it (it never
    // enumerates the stack's keys); the documents the events are about were not projected.
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

    assert_eq!(summary.cleared, 0);
    assert_eq!(summary.events, events.len() as u64 + 1);
    assert_eq!(summary.applied, events.len() as u64);
    assert_eq!(summary.malformed, 1);
    assert_eq!(
        stack.lookup("books", "ghost").await,
        Lookup::Found {
            version: 7,
            data: json!({})
        }
    );
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

/// On a cluster a document and its rooms live on different shards, so applying an event and
/// announcing it are separate steps; an updater that stopped between them left the document
/// marked by the event's message. That message, redelivered, is announced then; a duplicate of
/// the event in another message is stale, as on one Redis.
#[tokio::test]
async fn on_redis_cluster_an_event_applied_but_not_announced_is_announced_on_redelivery() {
    assert!(
        common::test_support::Deps::from_env().redis_cluster,
        "runs on Redis Cluster: REDIS_CLUSTER=true REDIS_URL=$MERIDIAN_REDIS_CLUSTER_URL (`just test` does)"
    );
    let stack = Stack::new().await;
    let mut doc_room = stack.subscribe("doc:books:b1").await;
    let v1 = event("created", "books", "b1", 1, Some(json!({"title": "Dune"})));
    let v2 = event(
        "patched",
        "books",
        "b1",
        2,
        Some(json!({"title": "Dune", "year": 1965})),
    );

    // What an updater stopped after the first step leaves: v1's message applied and marked.
    let (partition, offset) = stack.produce(&v1).await;
    let claim = format!("{partition}:{offset}");
    let call = common::readmodel::apply_announcing_call(
        &stack.redis_prefix,
        &v1,
        Duration::from_secs(60),
        &claim,
    );
    let mut conn = stack.redis.clone();
    let applied: i64 = call.invocation.invoke_async(&mut conn).await.unwrap();
    assert_eq!(applied, 1);
    let key = common::readmodel::document_key(&stack.redis_prefix, "books", "b1");
    let mark = |mut conn: common::redis::RedisConnection, key: String| async move {
        let marked: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("announce")
            .query_async(&mut conn)
            .await
            .unwrap();
        marked
    };
    assert_eq!(mark(conn.clone(), key.clone()).await, Some(claim));

    // The updater reads from the start: v1's message again, a duplicate of v1, then v2.
    stack.produce(&v1).await;
    stack.produce(&v2).await;
    let app = stack.start::<CacheUpdater>(&[]).await;
    assert_eq!(
        next_publication(&mut doc_room).await,
        v1,
        "announced on redelivery"
    );
    assert_eq!(next_publication(&mut doc_room).await, v2, "and only once");
    wait_until("the mark to be cleared", Duration::from_secs(10), || {
        mark(conn.clone(), key.clone()).map(|marked| marked.is_none())
    })
    .await;
    assert_eq!(
        stack.lookup("books", "b1").await,
        Lookup::Found {
            version: 2,
            data: json!({"title": "Dune", "year": 1965})
        }
    );
    app.stop().await;
    stack.cleanup().await;
}
