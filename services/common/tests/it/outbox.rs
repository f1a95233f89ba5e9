//! The outbox relay on real PostgreSQL and Kafka, each test on its own outbox table (shaped
//! like `outbox`) and its own topic.
#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: failing loudly is the point

use std::collections::HashMap;
use std::time::Duration;

use common::config::{KafkaConfig, Vars};
use common::kafka;
use common::outbox::{self, NewMessage, OutboxTable, Relay, RelaySettings, TraceContext};
use common::shutdown::CancellationToken;
use common::test_support::{Deps, wait_until};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use sqlx::PgPool;

struct Fixture {
    db: PgPool,
    table: OutboxTable,
    topic: String,
    kafka: KafkaConfig,
}

impl Fixture {
    async fn new() -> Self {
        let db = PgPool::connect(&Deps::from_env().database_url)
            .await
            .unwrap();
        common::schema::MIGRATOR.run(&db).await.unwrap();
        let name: &'static str =
            Box::leak(format!("outbox_it_{}", uuid::Uuid::new_v4().simple()).into_boxed_str());
        sqlx::query(&format!("CREATE TABLE {name} (LIKE outbox INCLUDING ALL)"))
            .execute(&db)
            .await
            .unwrap();
        let kafka: KafkaConfig = Vars::from_env().parse().unwrap();
        let topic = format!("it-outbox-{name}");
        let admin = kafka::admin(&kafka, "it-admin").unwrap();
        kafka::ensure_topics(&admin, &[(&topic, 3)], 1)
            .await
            .unwrap();
        Self {
            db,
            table: OutboxTable::new(name).unwrap(),
            topic,
            kafka,
        }
    }

    fn relay(&self, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
        self.relay_polling_every(Duration::from_millis(100), shutdown)
    }

    fn relay_polling_every(
        &self,
        poll_interval: Duration,
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.new_relay(poll_interval).run(shutdown.clone()))
    }

    /// A relay of this fixture's table (not started).
    fn new_relay(&self, poll_interval: Duration) -> Relay {
        let producer = kafka::producer(&self.kafka, "it-relay").unwrap();
        Relay::new(
            self.db.clone(),
            producer,
            RelaySettings {
                service: "it",
                table: self.table,
                batch_size: 16,
                poll_interval,
            },
        )
    }

    async fn insert(&self, conn: &mut sqlx::PgConnection, key: &str, seq: usize) {
        outbox::enqueue(
            conn,
            self.table,
            &NewMessage {
                topic: &self.topic,
                key,
                message_type: "test.message",
                command_id: None,
                payload: &serde_json::json!({"key": key, "seq": seq}),
                trace: &TraceContext::default(),
            },
        )
        .await
        .unwrap();
    }

    fn consumer(&self) -> StreamConsumer {
        let group = format!("it-{}", uuid::Uuid::new_v4());
        let consumer = kafka::consumer(&self.kafka, "it-consumer", &group).unwrap();
        consumer.subscribe(&[&self.topic]).unwrap();
        consumer
    }

    async fn remaining(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.table.name()))
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    async fn drop_all(self) {
        sqlx::query(&format!("DROP TABLE {}", self.table.name()))
            .execute(&self.db)
            .await
            .unwrap();
        let admin = kafka::admin(&self.kafka, "it-admin").unwrap();
        let _ = admin
            .delete_topics(&[&self.topic], &rdkafka::admin::AdminOptions::new())
            .await;
    }
}

/// Receives `n` messages as (key, seq) pairs, failing after `timeout`.
async fn receive(consumer: &StreamConsumer, n: usize, timeout: Duration) -> Vec<(String, u64)> {
    let mut got = Vec::with_capacity(n);
    tokio::time::timeout(timeout, async {
        while got.len() < n {
            let message = consumer.recv().await.unwrap();
            let body: serde_json::Value =
                serde_json::from_slice(message.payload().unwrap()).unwrap();
            let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
            assert_eq!(body["key"], key.as_str());
            got.push((key, body["seq"].as_u64().unwrap()));
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "received {} of {n} messages within {timeout:?}: {got:?}",
            got.len()
        )
    });
    got
}

#[tokio::test]
async fn a_row_committed_after_later_rows_were_relayed_is_still_relayed() {
    let f = Fixture::new().await;
    let consumer = f.consumer();
    let shutdown = CancellationToken::new();
    let relay = f.relay(&shutdown);

    // A long transaction takes the lowest id first…
    let mut slow = f.db.begin().await.unwrap();
    f.insert(&mut slow, "docs/slow", 0).await;
    // …then later rows commit and are relayed (and deleted) while it is still open.
    let mut conn = f.db.acquire().await.unwrap();
    f.insert(&mut conn, "docs/fast", 1).await;
    f.insert(&mut conn, "docs/fast", 2).await;
    let first = receive(&consumer, 2, Duration::from_secs(20)).await;
    assert_eq!(
        first,
        vec![("docs/fast".into(), 1), ("docs/fast".into(), 2)]
    );
    wait_until(
        "the fast rows to be deleted",
        Duration::from_secs(10),
        || async {
            f.remaining().await == 0 // the open transaction's row is invisible here
        },
    )
    .await;

    slow.commit().await.unwrap();
    let late = receive(&consumer, 1, Duration::from_secs(20)).await;
    assert_eq!(late, vec![("docs/slow".into(), 0)]);
    wait_until(
        "the late row to be deleted",
        Duration::from_secs(10),
        || async { f.remaining().await == 0 },
    )
    .await;

    shutdown.cancel();
    relay.await.unwrap();
    f.drop_all().await;
}

#[tokio::test]
async fn two_relays_at_once_keep_each_keys_order() {
    const KEYS: usize = 5;
    const MESSAGES: usize = 200;
    let f = Fixture::new().await;
    let consumer = f.consumer();
    let (first_stop, second_stop) = (CancellationToken::new(), CancellationToken::new());
    let first = f.relay(&first_stop);
    let second = f.relay(&second_stop);

    // Commit in small transactions while both relays run; stop the first relay half-way so
    // that, if it was the leader, the second takes over mid-stream.
    let mut conn = f.db.acquire().await.unwrap();
    for chunk in 0..MESSAGES / 10 {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        for i in chunk * 10..chunk * 10 + 10 {
            f.insert(&mut tx, &format!("docs/{}", i % KEYS), i / KEYS)
                .await;
        }
        tx.commit().await.unwrap();
        if chunk == MESSAGES / 20 {
            first_stop.cancel();
        }
    }
    let got = receive(&consumer, MESSAGES, Duration::from_secs(30)).await;
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for (key, seq) in got {
        per_key.entry(key).or_default().push(seq);
    }
    assert_eq!(per_key.len(), KEYS);
    let expected: Vec<u64> = (0..(MESSAGES / KEYS) as u64).collect();
    for (key, seqs) in &per_key {
        assert_eq!(seqs, &expected, "order of {key}");
    }
    wait_until(
        "the outbox to be empty",
        Duration::from_secs(10),
        || async { f.remaining().await == 0 },
    )
    .await;

    second_stop.cancel();
    first.await.unwrap();
    second.await.unwrap();
    f.drop_all().await;
}

/// Three times: one row of `key` written and `waker` woken; the row must reach Kafka within
/// seconds (the relays under test poll only once a minute).
async fn woken_rounds(f: &Fixture, consumer: &StreamConsumer, waker: &outbox::Waker, key: &str) {
    for round in 0..3 {
        let mut conn = f.db.acquire().await.unwrap();
        f.insert(&mut conn, key, round).await;
        waker.wake();
        let got = receive(consumer, 1, Duration::from_secs(10)).await;
        assert_eq!(got, vec![(key.to_owned(), round as u64)]);
    }
}

#[tokio::test]
async fn a_waker_notifies_relays_in_other_processes_long_before_their_poll() {
    let f = Fixture::new().await;
    let consumer = f.consumer();
    let shutdown = CancellationToken::new();
    // The relay is not woken by this waker directly (as if in another process), and would
    // only poll after a minute: the message can only arrive in time through NOTIFY.
    let relay = f.relay_polling_every(Duration::from_secs(60), &shutdown);
    let waker = outbox::Waker::new(f.table);
    let notifier = tokio::spawn(waker.clone().run(f.db.clone(), shutdown.clone()));
    // Let the relay take leadership, drain the (empty) table and start listening.
    tokio::time::sleep(Duration::from_secs(2)).await;

    woken_rounds(&f, &consumer, &waker, "docs/woken").await;

    shutdown.cancel();
    relay.await.unwrap();
    notifier.await.unwrap();
    f.drop_all().await;
}

#[tokio::test]
async fn a_waker_whose_relay_leads_wakes_it_without_notify_and_notifies_again_after() {
    let f = Fixture::new().await;
    let consumer = f.consumer();
    let mut listener = sqlx::postgres::PgListener::connect_with(&f.db)
        .await
        .unwrap();
    listener.listen(f.table.name()).await.unwrap();
    let waker = outbox::Waker::new(f.table);
    let shutdown = CancellationToken::new();
    // Polls only after a minute: the messages can only arrive in time through the waker.
    let relay = f.new_relay(Duration::from_secs(60)).woken_by(&waker);
    let running = tokio::spawn(relay.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await; // leadership, first drain, LISTEN

    woken_rounds(&f, &consumer, &waker, "docs/local").await;
    // The leader was woken in-process: nobody else was told.
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(heard.is_err(), "a NOTIFY was sent while this process led");

    // Not leading any more (stopped): a wake-up is for a leader elsewhere again.
    shutdown.cancel();
    running.await.unwrap();
    let notifier_stop = CancellationToken::new();
    let notifier = tokio::spawn(waker.clone().run(f.db.clone(), notifier_stop.clone()));
    waker.wake();
    let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no NOTIFY after the local relay stopped leading")
        .unwrap();
    assert_eq!(heard.channel(), f.table.name());

    notifier_stop.cancel();
    notifier.await.unwrap();
    f.drop_all().await;
}

#[tokio::test]
async fn rows_of_a_topic_that_does_not_exist_do_not_hold_up_later_rows() {
    let f = Fixture::new().await;
    let consumer = f.consumer();
    // The oldest row is for a topic that does not exist (deleted with its stack, say).
    let gone = format!("{}-gone", f.topic);
    let mut conn = f.db.acquire().await.unwrap();
    outbox::enqueue(
        &mut conn,
        f.table,
        &NewMessage {
            topic: &gone,
            key: "docs/gone",
            message_type: "test.message",
            command_id: None,
            payload: &serde_json::json!({"key": "docs/gone", "seq": 0}),
            trace: &TraceContext::default(),
        },
    )
    .await
    .unwrap();
    f.insert(&mut conn, "docs/live", 1).await;

    let shutdown = CancellationToken::new();
    let relay = f.relay(&shutdown);
    // Far below librdkafka's wait for an unknown topic (the producer's message timeout).
    let got = receive(&consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![("docs/live".into(), 1)]);
    wait_until(
        "the live row to be deleted",
        Duration::from_secs(10),
        || async { f.remaining().await == 1 },
    )
    .await;
    // The other row waits for its topic.
    let waiting: String = sqlx::query_scalar(&format!("SELECT topic FROM {}", f.table.name()))
        .fetch_one(&f.db)
        .await
        .unwrap();
    assert_eq!(waiting, gone);

    shutdown.cancel();
    relay.await.unwrap();
    f.drop_all().await;
}
