//! `just bench-pipeline`: the command pipeline's throughput and latency on the local
//! dependencies (PostgreSQL, Kafka, Redis co-located with the services on one machine).
//!
//! The three services run in this process through the same `Service::start` their binaries
//! use (release build); the load generator shares the machine with them and the dependencies.
//! Each phase uses its own Kafka topic prefix, Redis key prefix and client id, and removes
//! what it wrote (then vacuums the tables it deleted from, so autovacuum does not do it during
//! the next measurement).
//!
//! 1. **Accepted commands/s**: `POST /v1/commands` (a `create` of a new document, each with its
//!    own idempotency key) from N concurrent closed-loop clients against the command service
//!    alone; a command counts once its `202 Accepted` arrived, i.e. after the transaction
//!    holding the command, its idempotency record and its outbox row committed.
//!
//!    **The peer, pgbench** (`BENCH_PGBENCH`: its binary; `just bench-pipeline` finds
//!    PostgreSQL's): the command service's own intake statement
//!    (`command_service::intake::INTAKE_SQL`, claim + command + idempotency record + outbox
//!    row) with its parameters generated in SQL, 8 commands per statement as the service's
//!    group commit writes them under load, from 16 clients (`-c 16 -j 2 -M prepared`) for the
//!    same 10 s: PostgreSQL's limit for this write on this machine, without HTTP, validation
//!    or the service. The ratio accepted / pgbench is printed (goal >= 0.8).
//! 2. **Relayed events/s**: rows bulk-inserted into an outbox table of its own (shaped like
//!    `outbox`), then `common::outbox::Relay` started; the time until the table is empty, i.e.
//!    until Kafka acknowledged every row and the relay deleted it.
//! 3. **End-to-end latency** at a fixed offered rate (open loop: commands are sent on schedule
//!    whether or not earlier ones finished): from the `202` of a command to the moment a Redis
//!    subscriber on the collection's room channel receives the cache updater's notification of
//!    its event. Recorded in an HDR histogram. Also printed: the CPU each process used
//!    meanwhile (`/proc`), and how idle the machine was.
//!
//! 4. **Highest sustained rate**: the same at increasing offered rates; a rate is sustained
//!    when the command service accepted at least 95 % of the offered rate, every notification
//!    arrived within 5 s of the last command, and p99 stayed under 1 s.
//!
//! `BENCH_PIPELINE_ONLY=e2e` skips phases 1 and 2, `BENCH_PIPELINE_ONLY=fixed` also phase 4
//! (for A/B comparisons of the fixed-rate latency); `BENCH_PIPELINE_RATE=N` offers N/s in
//! phase 3 instead of 1,000 (the target verdict then says NOT MET: it is set at 1,000/s);
//! `BENCH_PIPELINE_PARTITIONS=N` gives the benchmark's topics N partitions instead of the
//! operator's default of 3; `BENCH_PIPELINE_TIMELINE=1` also prints each run's latency per
//! second of sending (p50, max), which tells a steady delay from a growing queue;
//! `BENCH_PIPELINE_STAGES=1` taps the `commands` and `events` topics and splits the latency
//! into its hops (command service's relay, processor + its relay, cache updater), each from
//! the Kafka message's create time (when the relay handed it to the producer) and its arrival
//! at the tap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark binary

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use cache_updater::CacheUpdater;
use command_service::CommandService;
use common::config::{KafkaConfig, Vars};
use common::envelope::EventEnvelope;
use common::kafka;
use common::outbox::{OutboxTable, Relay, RelaySettings};
use common::procstat::{self, CpuSnapshot};
use common::rooms::Publication;
use common::service::Service;
use common::shutdown::CancellationToken;
use common::test_support::{Deps, TestApp, get_json, test_vars, wait_until};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use processor::Processor;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

// The services' binaries run on mimalloc; so do they here.
common::global_allocator!();

const TARGET_ACCEPTED_PER_SECOND: f64 = 5_000.0;
const TARGET_RELAYED_PER_SECOND: f64 = 100_000.0;
const TARGET_P99_MS: f64 = 25.0;
const TARGET_SUSTAINED_PER_SECOND: u32 = 10_000;

const TARGET_PGBENCH_RATIO: f64 = 0.8;
/// Commands per intake statement in the pgbench peer, and its clients.
const PGBENCH_BATCH: usize = 8;
const PGBENCH_CLIENTS: usize = 16;

const ACCEPT_CONCURRENCY: usize = 64;
const ACCEPT_DURATION: Duration = Duration::from_secs(10);
const RELAY_ROWS: i64 = 100_000;
const RELAY_BATCH_SIZE: u32 = 500; // the services' default (COMMANDS_/PROCESSOR_OUTBOX_BATCH_SIZE)
const FIXED_RATE: u32 = 1_000;
const FIXED_DURATION: Duration = Duration::from_secs(15);
const STEP_RATES: [u32; 5] = [1_500, 2_000, 3_000, 4_000, 5_000];
const STEP_DURATION: Duration = Duration::from_secs(8);
const MAX_IN_FLIGHT: usize = 512;
/// Partitions of each benchmark topic: 3, what the operator gives each topic of a
/// `MiddlewareStack` that does not set `partitions` (`BENCH_PIPELINE_PARTITIONS=N` for others).
fn topic_partitions() -> i32 {
    static PARTITIONS: std::sync::LazyLock<i32> =
        std::sync::LazyLock::new(|| positive_from_env("BENCH_PIPELINE_PARTITIONS", 3));
    *PARTITIONS
}

/// The positive number in variable `name`, `default` when it is unset; anything else stops
/// the benchmark (a typo must not quietly measure the default).
fn positive_from_env<T>(name: &str, default: T) -> T
where
    T: std::str::FromStr + PartialOrd + Default,
{
    match std::env::var(name) {
        Err(_) => default,
        Ok(value) => match value.parse::<T>() {
            Ok(n) if n > T::default() => n,
            _ => panic!("{name}={value:?}: expected a positive whole number"),
        },
    }
}

/// One isolated stack: variables with its own prefixes and its topics.
struct Stack {
    vars: Vars,
    kafka: KafkaConfig,
    redis_prefix: String,
}

impl Stack {
    async fn new(label: &str) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let redis_prefix = format!("bench:{label}:{id}:");
        let vars = test_vars()
            .with("RUST_LOG", "error")
            .with("KAFKA_TOPIC_PREFIX", format!("bench-{label}-{id}."))
            .with("REDIS_KEY_PREFIX", redis_prefix.clone())
            .with("COMMANDS_OUTBOX_POLL_INTERVAL_MS", "100")
            .with("PROCESSOR_OUTBOX_POLL_INTERVAL_MS", "100");
        let kafka: KafkaConfig = vars.parse().unwrap();
        let admin = kafka::admin(&kafka, "bench-admin").unwrap();
        let topics = Self::topics(&kafka);
        let specs: Vec<(&str, i32)> = topics
            .iter()
            .map(|t| (t.as_str(), topic_partitions()))
            .collect();
        kafka::ensure_topics(&admin, &specs, 1).await.unwrap();
        Self {
            vars,
            kafka,
            redis_prefix,
        }
    }

    fn topics(kafka: &KafkaConfig) -> Vec<String> {
        [
            kafka::TOPIC_COMMANDS,
            kafka::TOPIC_EVENTS,
            kafka::TOPIC_CACHE,
            kafka::TOPIC_COMMANDS_DLQ,
        ]
        .iter()
        .map(|t| kafka.topic(t))
        .collect()
    }

    async fn start<S: Service>(&self) -> TestApp {
        let app = TestApp::start::<S>(&self.vars).await;
        let ready = app.url("/ready");
        wait_until(S::NAME, Duration::from_secs(60), || {
            let ready = ready.clone();
            async move { matches!(get_json(&ready).await, Some((200, _))) }
        })
        .await;
        app
    }

    async fn remove(self, redis: &redis::Client) {
        let admin = kafka::admin(&self.kafka, "bench-admin").unwrap();
        let topics = Self::topics(&self.kafka);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = admin
            .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
            .await;
        let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.redis_prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

/// POSTs `create` commands for new documents of `collection`.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    url: String,
    client_id: String,
    collection: String,
}

impl Client {
    fn new(app: &TestApp, label: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(512)
                .build()
                .unwrap(),
            url: app.url("/v1/commands"),
            client_id: format!("bench-{label}-{}", Uuid::new_v4().simple()),
            collection: format!("bench{}", Uuid::new_v4().simple()),
        }
    }

    /// The accepted command's id, or why it was not accepted (an HTTP status or "transport").
    async fn create(&self, n: u64) -> Result<Uuid, String> {
        let response = self
            .http
            .post(&self.url)
            .header("x-client-id", &self.client_id)
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(&json!({
                "type": "create", "collection": self.collection, "id": format!("d{n}"),
                "payload": {"n": n, "title": "benchmark document"}
            }))
            .send()
            .await
            .map_err(|_| "transport".to_owned())?;
        if response.status() != 202 {
            return Err(response.status().as_u16().to_string());
        }
        let body: serde_json::Value = response.json().await.map_err(|_| "body".to_owned())?;
        body["commandId"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| "body".to_owned())
    }

    async fn remove(&self, db: &PgPool) {
        for statement in [
            "DELETE FROM idempotency_keys WHERE client_id = $1",
            "DELETE FROM commands WHERE client_id = $1",
        ] {
            sqlx::query(statement)
                .bind(&self.client_id)
                .execute(db)
                .await
                .unwrap();
        }
        sqlx::query("DELETE FROM documents WHERE collection = $1")
            .bind(&self.collection)
            .execute(db)
            .await
            .unwrap();
        vacuum(db).await;
    }
}

/// Vacuums and analyses the pipeline's tables, so that the dead rows a phase's clean-up (or
/// an earlier run) left behind are not vacuumed by autovacuum in the middle of the next
/// measurement: it started within seconds of every run and made its first seconds the
/// slowest.
async fn vacuum(db: &PgPool) {
    sqlx::query("VACUUM (ANALYZE) commands, documents, idempotency_keys, outbox, processor_outbox")
        .execute(db)
        .await
        .unwrap();
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

/// Phase 1: accepted commands/s.
async fn accepted_per_second(db: &PgPool, redis: &redis::Client) -> f64 {
    let stack = Stack::new("accept").await;
    let app = stack.start::<CommandService>().await;
    let client = Client::new(&app, "accept");
    // Warm-up: connections, prepared statements.
    futures::stream::iter(0..500u64)
        .for_each_concurrent(ACCEPT_CONCURRENCY, |n| {
            let client = client.clone();
            async move {
                let _ = client.create(1_000_000_000 + n).await;
            }
        })
        .await;

    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..ACCEPT_CONCURRENCY as u64 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let (mut accepted, mut n) = (0u64, worker * 10_000_000);
            while started.elapsed() < ACCEPT_DURATION {
                n += 1;
                if client.create(n).await.is_ok() {
                    accepted += 1;
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for worker in workers {
        accepted += worker.await.unwrap();
    }
    let rate = accepted as f64 / started.elapsed().as_secs_f64();

    // Let this stack's outbox rows reach Kafka before stopping (they would otherwise wait for
    // the next relay leader), then remove everything the phase wrote.
    let topic = stack.kafka.topic(kafka::TOPIC_COMMANDS);
    wait_until(
        "the accepted commands to be relayed",
        Duration::from_secs(120),
        || async {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = $1")
                .bind(&topic)
                .fetch_one(db)
                .await
                .unwrap();
            left == 0
        },
    )
    .await;
    app.stop().await;
    client.remove(db).await;
    stack.remove(redis).await;
    rate
}

/// Phase 2: relayed events/s, through an outbox table of its own.
async fn relayed_per_second(db: &PgPool, redis: &redis::Client) -> (f64, i64) {
    let stack = Stack::new("relay").await;
    let name: &'static str =
        Box::leak(format!("bench_outbox_{}", Uuid::new_v4().simple()).into_boxed_str());
    let table = OutboxTable::new(name).unwrap();
    sqlx::query(&format!("CREATE TABLE {name} (LIKE outbox INCLUDING ALL)"))
        .execute(db)
        .await
        .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {name} (topic, message_key, message_type, payload) \
         SELECT $1, 'bench/' || (g % 1000), 'event.bench', \
                jsonb_build_object('n', g, 'title', 'benchmark event') \
         FROM generate_series(1, $2) AS g"
    ))
    .bind(stack.kafka.topic(kafka::TOPIC_EVENTS))
    .bind(RELAY_ROWS)
    .execute(db)
    .await
    .unwrap();

    let producer = kafka::producer(&stack.kafka, "bench-relay").unwrap();
    let relay = Relay::new(
        db.clone(),
        producer,
        RelaySettings {
            service: "bench",
            table,
            batch_size: RELAY_BATCH_SIZE,
            poll_interval: Duration::from_millis(50),
        },
    );
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let count = format!("SELECT count(*) FROM {name}");
    let mut left = RELAY_ROWS;
    while left > 0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = sqlx::query_scalar(&count).fetch_one(db).await.unwrap();
    }
    let rate = (RELAY_ROWS - left) as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    running.await.unwrap();
    sqlx::query(&format!("DROP TABLE {name}"))
        .execute(db)
        .await
        .unwrap();
    stack.remove(redis).await;
    (rate, left)
}

/// `(on events?, command id)` → (create time, arrival), both since the UNIX epoch.
type Seen = HashMap<(bool, Uuid), (Duration, Duration)>;

/// When each command's messages were created (handed to the relay's producer) and arrived at
/// a consumer of its own, on `commands` and on `events` (`BENCH_PIPELINE_STAGES=1`).
struct Tap {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(stack: &Stack) -> Self {
        use rdkafka::consumer::{Consumer as _, StreamConsumer};
        use rdkafka::message::{Headers as _, Message as _};
        let group = format!("bench-tap-{}", Uuid::new_v4().simple());
        let consumer: StreamConsumer = kafka::consumer_config(&stack.kafka, "bench-tap", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let events = stack.kafka.topic(kafka::TOPIC_EVENTS);
        let mut partitions = rdkafka::TopicPartitionList::new();
        for topic in [stack.kafka.topic(kafka::TOPIC_COMMANDS), events.clone()] {
            for partition in 0..topic_partitions() {
                partitions
                    .add_partition_offset(&topic, partition, rdkafka::Offset::End)
                    .unwrap();
            }
        }
        consumer.assign(&partitions).unwrap();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(message) = consumer.recv().await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let arrived = since_epoch(std::time::SystemTime::now());
                    let id = message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == kafka::HEADER_COMMAND_ID)
                            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                    });
                    if let (Some(id), Some(created)) = (id, message.timestamp().to_millis()) {
                        let created = Duration::from_millis(u64::try_from(created).unwrap_or(0));
                        let on_events = message.topic() == events;
                        seen.lock()
                            .unwrap()
                            .insert((on_events, id), (created, arrived));
                    }
                }
            })
        };
        // Let the assignment resolve its end offsets before anything is sent.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Self { seen, task }
    }

    /// Prints each hop's p50/p99 over the commands of one run (`accepted` and `notified`
    /// converted to time since the UNIX epoch).
    fn report(&self, accepted: &HashMap<Uuid, Duration>, notified: &HashMap<Uuid, Duration>) {
        let seen = self.seen.lock().unwrap();
        let hops = [
            "accepted -> produced on commands (command service relay)",
            "produced -> consumed (commands)",
            "consumed -> produced on events (processor + its relay)",
            "produced -> consumed (events)",
            "consumed -> notified (cache updater)",
        ];
        let mut histograms: Vec<Histogram<u64>> = hops
            .iter()
            .map(|_| Histogram::new_with_bounds(1, 60_000_000, 3).unwrap())
            .collect();
        for (id, accepted) in accepted {
            let (Some(command), Some(event), Some(notified)) = (
                seen.get(&(false, *id)),
                seen.get(&(true, *id)),
                notified.get(id),
            ) else {
                continue;
            };
            let points = [*accepted, command.0, command.1, event.0, event.1, *notified];
            for (hop, pair) in points.windows(2).enumerate() {
                let us = pair[1].saturating_sub(pair[0]).as_micros().max(1);
                histograms[hop].saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
            }
        }
        for (hop, histogram) in hops.iter().zip(&histograms) {
            println!(
                "    {hop:<58} n={:>5} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
                histogram.len(),
                histogram.value_at_quantile(0.5) as f64 / 1000.0,
                histogram.value_at_quantile(0.99) as f64 / 1000.0,
                histogram.max() as f64 / 1000.0,
            );
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn since_epoch(at: std::time::SystemTime) -> Duration {
    at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// The outcome of one open-loop run.
struct Run {
    offered: u32,
    accepted_rate: f64,
    sent: u64,
    accepted: u64,
    notified: u64,
    /// Commands not accepted, by reason.
    failures: std::collections::BTreeMap<String, u64>,
    latency_us: Histogram<u64>,
}

impl Run {
    fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn sustained(&self) -> bool {
        self.accepted_rate >= 0.95 * f64::from(self.offered)
            && self.notified == self.accepted
            && self.ms(0.99) < 1000.0
    }

    fn line(&self) -> String {
        format!(
            "offered {}/s: accepted {:.0}/s ({} of {} sent{}), notified {}, latency p50 {:.1} ms, \
             p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            self.offered,
            self.accepted_rate,
            self.accepted,
            self.sent,
            if self.failures.is_empty() {
                String::new()
            } else {
                format!("; not accepted: {:?}", self.failures)
            },
            self.notified,
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999),
            self.latency_us.max() as f64 / 1000.0
        )
    }
}

/// Phases 3 and 4: offered `rate` for `duration` through the running pipeline.
async fn open_loop(
    commands: &TestApp,
    stack: &Stack,
    redis: &redis::Client,
    db: &PgPool,
    rate: u32,
    duration: Duration,
    tap: Option<&Tap>,
) -> Run {
    let client = Client::new(commands, "e2e");
    let notified: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let mut pubsub = redis.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!(
            "{}room:collection:{}",
            stack.redis_prefix, client.collection
        ))
        .await
        .unwrap();
    let listener = {
        let notified = notified.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let at = Instant::now();
                let frame = Publication::decode(Bytes::from(message.get_payload_bytes().to_vec()));
                if let Ok(frame) = frame
                    && let Ok(event) = serde_json::from_slice::<EventEnvelope>(&frame.payload)
                {
                    notified.lock().unwrap().insert(event.command_id, at);
                }
            }
        })
    };

    let accepted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let failures: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    // Bounds the requests in flight: past it the generator falls behind the offered rate
    // (and the run counts as not sustained) instead of piling up connections.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let total = u64::from(rate) * duration.as_secs();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(2));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    let mut requests = Vec::with_capacity(total as usize);
    while sent < total {
        ticker.tick().await;
        let due = ((started.elapsed().as_secs_f64() * f64::from(rate)) as u64).min(total);
        while sent < due {
            let (client, accepted, failures) = (client.clone(), accepted.clone(), failures.clone());
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let n = sent;
            requests.push(tokio::spawn(async move {
                match client.create(n).await {
                    Ok(id) => {
                        accepted.lock().unwrap().insert(id, Instant::now());
                    }
                    Err(reason) => *failures.lock().unwrap().entry(reason).or_default() += 1,
                }
                drop(permit);
            }));
            sent += 1;
        }
    }
    for request in requests {
        request.await.unwrap();
    }
    let accepted_rate = accepted.lock().unwrap().len() as f64 / started.elapsed().as_secs_f64();
    let expected = accepted.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while notified.lock().unwrap().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.abort();

    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let accepted = std::mem::take(&mut *accepted.lock().unwrap());
    let notified = std::mem::take(&mut *notified.lock().unwrap());
    let mut matched = 0;
    let mut by_second: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for (id, at) in accepted.iter() {
        if let Some(done) = notified.get(id) {
            by_second
                .entry(at.saturating_duration_since(started).as_secs())
                .or_default()
                .push(done.saturating_duration_since(*at).as_millis() as u64);
            matched += 1;
            let us = done.saturating_duration_since(*at).as_micros().max(1);
            latency_us.saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
        }
    }
    if let Some(tap) = tap {
        let (now, wall) = (Instant::now(), since_epoch(std::time::SystemTime::now()));
        let wall_of = |at: &Instant| wall.saturating_sub(now.saturating_duration_since(*at));
        let accepted = accepted.iter().map(|(id, at)| (*id, wall_of(at))).collect();
        let notified = notified.iter().map(|(id, at)| (*id, wall_of(at))).collect();
        tap.report(&accepted, &notified);
    }
    if std::env::var_os("BENCH_PIPELINE_TIMELINE").is_some() {
        for (second, mut ms) in by_second {
            ms.sort_unstable();
            println!(
                "    t={second:>2}s n={:>5} p50={:>5} ms max={:>5} ms",
                ms.len(),
                ms[ms.len() / 2],
                ms[ms.len() - 1]
            );
        }
    }
    let run = Run {
        offered: rate,
        accepted_rate,
        sent,
        accepted: accepted.len() as u64,
        notified: matched,
        failures: std::mem::take(&mut *failures.lock().unwrap()),
        latency_us,
    };
    client.remove(db).await;
    run
}

#[tokio::main]
async fn main() {
    // The services' logs, when asked for (`RUST_LOG=warn just bench-pipeline`).
    let _telemetry = std::env::var_os("RUST_LOG").map(|_| {
        let config: common::config::CommonConfig = Vars::from_env().parse().unwrap();
        common::telemetry::init("bench-pipeline", &config).unwrap()
    });
    let deps = Deps::from_env();
    let db = PgPool::connect(&deps.database_url).await.unwrap();
    // The services migrate when they start; the benchmark touches the tables before that.
    common::schema::MIGRATOR.run(&db).await.unwrap();
    let redis = common::redis::client(deps.redis_url.as_str()).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "Meridian pipeline benchmark: release build, services in one process, PostgreSQL, \
         Kafka and Redis on the same {cores}-core machine; topics of {} partitions.",
        topic_partitions()
    );
    println!(
        "Differences from a deployed stack: the three services share this process (deployed: \
         a pod each); COMMANDS_OUTBOX_POLL_INTERVAL_MS and PROCESSOR_OUTBOX_POLL_INTERVAL_MS \
         100 (deployed: 1000, the relays' fallback poll); logs {} (deployed: RUST_LOG=info, \
         LOG_FORMAT=json; set both to log as deployed).",
        match std::env::var("RUST_LOG") {
            Ok(level) => format!("RUST_LOG={level}"),
            Err(_) => "off (RUST_LOG unset)".to_owned(),
        }
    );

    let only = std::env::var("BENCH_PIPELINE_ONLY").unwrap_or_default();
    let fixed_only = only == "fixed";
    let only_e2e = only == "e2e" || fixed_only;
    let fixed_rate: u32 = positive_from_env("BENCH_PIPELINE_RATE", FIXED_RATE);
    if only_e2e {
        vacuum(&db).await; // an earlier run's leftovers (phase 1 vacuums after itself)
    } else {
        accept_and_relay(&db, &redis).await;
    }

    let stack = Stack::new("e2e").await;
    let commands = stack.start::<CommandService>().await;
    let processor = stack.start::<Processor>().await;
    let cache = stack.start::<CacheUpdater>().await;
    let tap = match std::env::var_os("BENCH_PIPELINE_STAGES") {
        Some(_) => Some(Tap::start(&stack).await),
        None => None,
    };
    // Warm-up (discarded): connections, consumer group assignments, script caches.
    open_loop(
        &commands,
        &stack,
        &redis,
        &db,
        200,
        Duration::from_secs(3),
        None,
    )
    .await;

    let cpu_before = tokio::task::spawn_blocking(CpuSnapshot::take)
        .await
        .unwrap();
    let fixed = open_loop(
        &commands,
        &stack,
        &redis,
        &db,
        fixed_rate,
        FIXED_DURATION,
        tap.as_ref(),
    )
    .await;
    let cpu = tokio::task::spawn_blocking(CpuSnapshot::take)
        .await
        .unwrap();
    println!(
        "end-to-end            {}   target p99 <= {TARGET_P99_MS:.0} ms at {FIXED_RATE}/s: {}",
        fixed.line(),
        verdict(fixed_rate == FIXED_RATE && fixed.sustained() && fixed.ms(0.99) <= TARGET_P99_MS)
    );
    println!(
        "  cpu at {fixed_rate}/s       (share of one core, this process = services + load generator) {}",
        procstat::describe(&cpu.since(&cpu_before))
    );

    let mut best = fixed.sustained().then_some(fixed);
    let steps = if fixed_only { &[][..] } else { &STEP_RATES[..] };
    for rate in steps.iter().copied().filter(|r| *r > fixed_rate) {
        let run = open_loop(
            &commands,
            &stack,
            &redis,
            &db,
            rate,
            STEP_DURATION,
            tap.as_ref(),
        )
        .await;
        println!("  step                {}", run.line());
        if !run.sustained() {
            break;
        }
        best = Some(run);
    }
    match best {
        _ if fixed_only => {}
        Some(run) => println!(
            "highest sustained     {}   target >= {TARGET_SUSTAINED_PER_SECOND}/s: {}",
            run.line(),
            verdict(run.offered >= TARGET_SUSTAINED_PER_SECOND)
        ),
        None => println!(
            "highest sustained     none of the offered rates was sustained   target >= \
             {TARGET_SUSTAINED_PER_SECOND}/s: NOT MET"
        ),
    }

    cache.stop().await;
    processor.stop().await;
    commands.stop().await;
    stack.remove(&redis).await;
}

/// The pgbench script: the intake statement with every parameter generated in SQL for
/// [`PGBENCH_BATCH`] commands, unique per transaction (`:client_id`, `:a`, `:b`), under the
/// client id `client` (its outbox rows name `topic`, which no relay reads, so they stay
/// until the clean-up).
fn pgbench_script(client: &str, topic: &str) -> String {
    let id = "md5(:client_id || '-' || :a || '-' || :b || '-' || g)::uuid";
    let array = |expression: String| {
        format!("ARRAY(SELECT {expression} FROM generate_series(1, {PGBENCH_BATCH}) AS g)")
    };
    let parameter = |n: usize| -> String {
        match n {
            1 | 17 => array(id.to_owned()),
            2 => array(format!("'{client}'::text")),
            3 => array("'create'::text".to_owned()),
            4 => array("'pgbench'::text".to_owned()),
            5 | 9 | 15 => array(format!("({id})::text")),
            6 => array("NULL::int8".to_owned()),
            7 => array(r#"'{"n": 1, "title": "benchmark document"}'::jsonb"#.to_owned()),
            8 => array("now()".to_owned()),
            10 => array(format!("decode(md5(({id})::text), 'hex')")),
            11 => array(format!("'/v1/commands/' || ({id})")),
            12 => array(format!(
                "convert_to('{{\"commandId\":\"' || ({id}) || '\",\"status\":\"accepted\"}}', 'UTF8')"
            )),
            13 => "86400".to_owned(),
            14 => array(format!("'{topic}'::text")),
            16 => array("'command.create'::text".to_owned()),
            18 => array(format!(
                "jsonb_build_object('commandId', {id}, 'type', 'create', 'collection', 'pgbench', \
                 'id', {id}, 'payload', '{{\"n\": 1, \"title\": \"benchmark document\"}}'::jsonb)"
            )),
            19 | 20 => array("NULL::text".to_owned()),
            21 => array(format!("'{client}:' || ({id})")),
            _ => panic!("the intake statement has no parameter ${n}"),
        }
    };
    // `$n` → its expression (longest numbers first is implied: digits are read greedily).
    let sql = command_service::intake::INTAKE_SQL.as_str();
    let mut script = String::with_capacity(sql.len() * 4);
    let mut chars = sql.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c != '$' {
            script.push(c);
            continue;
        }
        let mut end = at + 1;
        while let Some((i, d)) = chars.peek().copied() {
            if !d.is_ascii_digit() {
                break;
            }
            end = i + 1;
            chars.next();
        }
        script.push_str(&parameter(sql[at + 1..end].parse().unwrap()));
    }
    format!("\\set a random(1, 1000000000)\n\\set b random(1, 1000000000)\n{script};\n")
}

/// The peer of phase 1: pgbench running the intake statement (see the module docs); commands
/// per second. Removes what it wrote.
async fn pgbench_commands_per_second(db: &PgPool, pgbench: &std::ffi::OsStr) -> f64 {
    let run = Uuid::new_v4().simple().to_string();
    let client = format!("pgbench-{run}");
    let topic = format!("pgbench-peer-{run}");
    let script = std::env::temp_dir().join(format!("meridian-pgbench-{run}.sql"));
    std::fs::write(&script, pgbench_script(&client, &topic)).unwrap();
    let url = Deps::from_env().database_url;
    let pgbench = pgbench.to_owned();
    let script_path = script.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(pgbench)
            .args(["-n", "-M", "prepared", "-j", "2"])
            .args(["-c", &PGBENCH_CLIENTS.to_string()])
            .args(["-T", &ACCEPT_DURATION.as_secs().to_string()])
            .arg("-f")
            .arg(&script_path)
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // "tps = 3456.789012 (without initial connection time)"
    let tps: f64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{stdout}"));
    for (statement, value) in [
        ("DELETE FROM outbox WHERE topic = $1", &topic),
        ("DELETE FROM idempotency_keys WHERE client_id = $1", &client),
        ("DELETE FROM commands WHERE client_id = $1", &client),
    ] {
        sqlx::query(statement)
            .bind(value)
            .execute(db)
            .await
            .unwrap();
    }
    vacuum(db).await;
    tps * PGBENCH_BATCH as f64
}

/// Phases 1 and 2.
async fn accept_and_relay(db: &PgPool, redis: &redis::Client) {
    let accepted = accepted_per_second(db, redis).await;
    println!(
        "accepted commands/s   {accepted:>8.0}   (POST /v1/commands, {ACCEPT_CONCURRENCY} concurrent \
         clients, {} s)   target >= {TARGET_ACCEPTED_PER_SECOND:.0}: {}",
        ACCEPT_DURATION.as_secs(),
        verdict(accepted >= TARGET_ACCEPTED_PER_SECOND)
    );

    match std::env::var_os("BENCH_PGBENCH") {
        Some(pgbench) => {
            let peer = pgbench_commands_per_second(db, &pgbench).await;
            println!(
                "  peer: pgbench       {peer:>8.0}   (the intake statement, {PGBENCH_BATCH} commands \
                 per statement, {PGBENCH_CLIENTS} clients, {} s)   accepted / pgbench {:.2}   \
                 target >= {TARGET_PGBENCH_RATIO}: {}",
                ACCEPT_DURATION.as_secs(),
                accepted / peer,
                verdict(accepted / peer >= TARGET_PGBENCH_RATIO)
            );
        }
        None => println!(
            "  peer: pgbench       not measured (BENCH_PGBENCH is not set; `just bench-pipeline` sets it)"
        ),
    }

    let (relayed, left) = relayed_per_second(db, redis).await;
    println!(
        "relayed events/s      {relayed:>8.0}   ({RELAY_ROWS} outbox rows -> Kafka, batch \
         {RELAY_BATCH_SIZE}{})   target >= {TARGET_RELAYED_PER_SECOND:.0}: {}",
        if left > 0 {
            format!(", {left} left after 60 s")
        } else {
            String::new()
        },
        verdict(relayed >= TARGET_RELAYED_PER_SECOND)
    );
}
