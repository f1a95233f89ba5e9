//! The command API on real PostgreSQL and Kafka: idempotency semantics, problem+json
//! rejections that store nothing, and the path POST → Postgres → outbox relay → Kafka.
//! Each test uses its own client id (and, where Kafka is read, its own topic prefix).
#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: failing loudly is the point

use std::time::Duration;

use command_service::CommandService;
use common::config::{CommonConfig, KafkaConfig};
use common::kafka;
use common::test_support::{TestApp, test_vars, wait_until};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::Headers;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

struct Harness {
    app: TestApp,
    db: PgPool,
    client: String,
    http: reqwest::Client,
    topic: String,
    kafka: KafkaConfig,
}

impl Harness {
    /// A command service with its own topic prefix, ready (migrations applied).
    async fn start(extra: &[(&str, &str)]) -> Self {
        let prefix = format!("it-{}-", Uuid::new_v4().simple());
        let mut vars = test_vars()
            .with("KAFKA_TOPIC_PREFIX", prefix.clone())
            .with("COMMANDS_OUTBOX_POLL_INTERVAL_MS", "100");
        for (k, v) in extra {
            vars = vars.with(*k, *v);
        }
        let _telemetry = common::telemetry::init("it", &vars.parse::<CommonConfig>().unwrap());
        std::mem::forget(_telemetry); // keep the propagator and tracer for the whole process
        let kafka: KafkaConfig = vars.parse().unwrap();
        let topic = kafka.topic(kafka::TOPIC_COMMANDS);
        let admin = kafka::admin(&kafka, "it-admin").unwrap();
        kafka::ensure_topics(&admin, &[(&topic, 3)], 1)
            .await
            .unwrap();

        let app = TestApp::start::<CommandService>(&vars).await;
        let ready = app.url("/ready");
        common::test_support::wait_ready(&ready, Duration::from_secs(30)).await;
        let db = PgPool::connect(&common::test_support::Deps::from_env().database_url)
            .await
            .unwrap();
        Self {
            app,
            db,
            client: format!("client-{}", Uuid::new_v4()),
            http: reqwest::Client::new(),
            topic,
            kafka,
        }
    }

    fn post(&self, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(self.app.url("/v1/commands"))
            .header("x-client-id", &self.client);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
    }

    async fn rows(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE client_id = $1"
        ))
        .bind(&self.client)
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    async fn outbox_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE payload->>'clientId' = $1")
            .bind(&self.client)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Stops the app and, once this client's outbox rows are all relayed, deletes the topic.
    async fn stop(self) {
        wait_until(
            "this test's outbox rows to be relayed",
            Duration::from_secs(20),
            || async { self.outbox_rows().await == 0 },
        )
        .await;
        self.app.stop().await;
        let admin = kafka::admin(&self.kafka, "it-admin").unwrap();
        let _ = admin
            .delete_topics(&[&self.topic], &rdkafka::admin::AdminOptions::new())
            .await;
    }
}

fn create(id: &str, title: &str) -> Value {
    json!({"type": "create", "collection": "books", "id": id, "payload": {"title": title}})
}

struct Answer {
    status: u16,
    location: Option<String>,
    content_type: String,
    body: Vec<u8>,
}

async fn answer(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (location, content_type) = (
        header("location"),
        header("content-type").unwrap_or_default(),
    );
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap().to_vec();
    Answer {
        status,
        location,
        content_type,
        body,
    }
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/problem+json");
        let body = self.json();
        assert_eq!(
            body["type"],
            format!("https://meridian.dev/problems/{slug}")
        );
        assert_eq!(body["status"], status);
    }
}

#[tokio::test]
async fn a_repeated_key_replays_the_first_response_and_a_changed_payload_is_refused() {
    let h = Harness::start(&[]).await;
    let first = answer(h.post(Some("k-1")).json(&create("b-1", "Dune"))).await;
    assert_eq!(
        first.status,
        202,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let body = first.json();
    let location = first.location.clone().unwrap();
    assert_eq!(
        location,
        format!("/v1/commands/{}", body["commandId"].as_str().unwrap())
    );
    assert_eq!(body["status"], "accepted");

    // Same key, same payload (keys in another order): the very same response.
    let again = answer(
        h.post(Some("k-1"))
            .header("content-type", "application/json")
            .body(
                r#"{"payload":{"title":"Dune"},"id":"b-1","collection":"books","type":"create"}"#,
            ),
    )
    .await;
    assert_eq!(again.status, 202);
    assert_eq!(again.location, first.location);
    assert_eq!(
        again.body, first.body,
        "the replay is byte for byte the first body"
    );

    // Same key, different payload.
    answer(h.post(Some("k-1")).json(&create("b-1", "Emma")))
        .await
        .assert_problem(422, "idempotency-key-reused");
    // The same key from another client is another key.
    let other = answer(
        h.http
            .post(h.app.url("/v1/commands"))
            .header("x-client-id", format!("{}-other", h.client))
            .header("idempotency-key", "k-1")
            .json(&create("b-1", "Emma")),
    )
    .await;
    assert_eq!(other.status, 202);
    assert_ne!(other.location, first.location);

    assert_eq!(
        h.rows("commands").await,
        1,
        "one command for the repeated key"
    );
    assert_eq!(h.rows("idempotency_keys").await, 1);

    // The status resource answers for its owner only.
    let (status, resource) = {
        let r = answer(
            h.http
                .get(h.app.url(&location))
                .header("x-client-id", &h.client),
        )
        .await;
        (r.status, r.json())
    };
    assert_eq!(status, 200);
    assert_eq!(resource["commandId"], body["commandId"]);
    assert_eq!(resource["collection"], "books");
    answer(
        h.http
            .get(h.app.url(&location))
            .header("x-client-id", "someone-else"),
    )
    .await
    .assert_problem(404, "not-found");
    h.stop().await;
}

/// Writes a live idempotency record for (`client`, `key`) with `fingerprint` on `conn` (in the
/// caller's transaction, which decides when it is seen).
async fn insert_record(conn: &mut sqlx::PgConnection, client: &str, key: &str, fingerprint: &[u8]) {
    sqlx::query(
        "INSERT INTO idempotency_keys (client_id, key, fingerprint, command_id, response_status, \
         response_body, expires_at) VALUES ($1, $2, $3, $4, 202, '\\x00', now() + interval '1 hour')",
    )
    .bind(client)
    .bind(key)
    .bind(fingerprint)
    .bind(Uuid::now_v7())
    .execute(conn)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_missing_key_is_400_and_a_key_in_progress_is_409() {
    let h = Harness::start(&[]).await;
    answer(h.post(None).json(&create("b-1", "Dune")))
        .await
        .assert_problem(400, "idempotency-key-missing");

    // Hold the first request inside its transaction: an uncommitted idempotency row for the
    // same (client, key) makes its final insert wait on our transaction.
    let mut blocker = h.db.begin().await.unwrap();
    insert_record(&mut blocker, &h.client, "k-2", &[0]).await;
    let our_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *blocker)
        .await
        .unwrap();
    let first = tokio::spawn(answer(h.post(Some("k-2")).json(&create("b-2", "Dune"))));
    let db = h.db.clone();
    wait_until("the first request to wait on our transaction", Duration::from_secs(10), || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))",
            )
            .bind(our_pid)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    })
    .await;
    answer(h.post(Some("k-2")).json(&create("b-2", "Dune")))
        .await
        .assert_problem(409, "idempotency-in-progress");
    blocker.rollback().await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 202);

    let replay = answer(h.post(Some("k-2")).json(&create("b-2", "Dune"))).await;
    assert_eq!((replay.status, &replay.body), (202, &first.body));
    assert_eq!(h.rows("commands").await, 1);
    h.stop().await;
}

/// The intake claims a key (`meridian_claim_idempotency_key`) by taking its lock, then reading
/// its record with a snapshot of its own: a record that the lock's previous holder committed
/// after the claiming statement began is seen. The statement's own snapshot (the same
/// statement's subquery, the control) does not see it: a claim reading with it would let the
/// request be written a second time.
#[tokio::test]
async fn a_claim_sees_a_record_committed_by_the_previous_lock_holder_after_it_began() {
    let h = Harness::start(&[]).await;
    let lock = format!("{}:{}:k-race", h.client.len(), h.client);
    let mut holder = h.db.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(&lock)
        .execute(&mut *holder)
        .await
        .unwrap();
    insert_record(&mut holder, &h.client, "k-race", &[1]).await;

    // Takes its snapshot now, sleeps until the holder has committed, then claims.
    let (db, client) = (h.db.clone(), h.client.clone());
    let claim = tokio::spawn(async move {
        sqlx::query_as::<_, (bool, Option<Vec<u8>>, Option<Vec<u8>>)>(
            "WITH began AS MATERIALIZED (SELECT pg_sleep(1) /* claim-race */) \
             SELECT c.locked, c.fingerprint, (SELECT k.fingerprint FROM idempotency_keys k \
             WHERE k.client_id = $2 AND k.key = 'k-race') \
             FROM began CROSS JOIN LATERAL meridian_claim_idempotency_key($1, $2, 'k-race') AS c",
        )
        .bind(lock)
        .bind(client)
        .fetch_one(&db)
        .await
        .unwrap()
    });
    let db = h.db.clone();
    // In its sleep, not just `active`: a session shows the statement as active already while
    // it is being prepared (sqlx's Parse), and its snapshot is only taken at Bind.
    wait_until(
        "the claiming statement to sleep",
        Duration::from_secs(10),
        || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep' \
                 AND query LIKE '%/* claim-race */%' AND pid <> pg_backend_pid())",
                )
                .fetch_one(&db)
                .await
                .unwrap()
            }
        },
    )
    .await;
    holder.commit().await.unwrap();
    let (locked, claimed, seen_by_statement) = claim.await.unwrap();
    assert!(locked, "the holder's lock ended with its transaction");
    assert_eq!(
        claimed.as_deref(),
        Some(&[1u8][..]),
        "the claim saw the record"
    );
    assert_eq!(
        seen_by_statement, None,
        "the statement's snapshot predates the record"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_burst_is_written_in_shared_transactions_with_one_command_per_key() {
    const KEYS: usize = 100;
    let h = Harness::start(&[("COMMANDS_BATCH_WRITERS", "2")]).await;
    // Every key twice at once (and one key 20 times), all concurrently: batches form, and a
    // key may meet its twin inside a batch or in another writer's transaction.
    let mut requests = Vec::new();
    let harness = &h;
    for n in 0..KEYS {
        for _ in 0..if n == 0 { 20 } else { 2 } {
            let key = format!("burst-{n}");
            let body = create(&format!("b-{n}"), "Dune");
            requests.push(async move { (n, answer(harness.post(Some(&key)).json(&body)).await) });
        }
    }
    let answers = futures::future::join_all(requests).await;

    let mut first_bodies: Vec<Option<Vec<u8>>> = vec![None; KEYS];
    for (n, answer) in &answers {
        match answer.status {
            202 => match &first_bodies[*n] {
                // A replay repeats the one accepted response byte for byte.
                Some(body) => assert_eq!(body, &answer.body, "key {n}"),
                None => first_bodies[*n] = Some(answer.body.clone()),
            },
            409 => answer.assert_problem(409, "idempotency-in-progress"),
            other => panic!(
                "key {n}: unexpected {other}: {:?}",
                String::from_utf8_lossy(&answer.body)
            ),
        }
    }
    assert!(
        first_bodies.iter().all(Option::is_some),
        "every key accepted once"
    );
    assert_eq!(h.rows("commands").await, KEYS as i64);
    assert_eq!(h.rows("idempotency_keys").await, KEYS as i64);

    // Group commit happened: fewer transactions than submissions.
    let metrics = reqwest::get(h.app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let (transactions, submissions) = (
        value("commands_batch_size_count"),
        value("commands_batch_size_sum"),
    );
    // The registry is per process: other tests of this binary may have submitted too.
    assert!(submissions as usize >= answers.len());
    assert!(
        transactions < submissions,
        "{transactions} transactions for {submissions} submissions"
    );
    h.stop().await;
}

#[tokio::test]
async fn expired_keys_are_cleaned_up_and_can_be_used_again() {
    let h = Harness::start(&[
        ("COMMANDS_IDEMPOTENCY_TTL_SECONDS", "1"),
        ("COMMANDS_IDEMPOTENCY_CLEANUP_INTERVAL_MS", "200"),
    ])
    .await;
    let first = answer(h.post(Some("k-3")).json(&create("b-3", "Dune"))).await;
    assert_eq!(first.status, 202);
    wait_until(
        "the expired key to be deleted",
        Duration::from_secs(10),
        || async { h.rows("idempotency_keys").await == 0 },
    )
    .await;
    // After expiry the key is free: a different payload is a new command, not a 422.
    let second = answer(h.post(Some("k-3")).json(&create("b-3", "Emma"))).await;
    assert_eq!(second.status, 202);
    assert_ne!(second.location, first.location);
    assert_eq!(h.rows("commands").await, 2);
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_get_problem_json_and_store_nothing() {
    let h = Harness::start(&[("COMMANDS_MAX_BODY_BYTES", "1024")]).await;
    let raw = |body: &'static str| {
        h.post(Some("k-bad"))
            .header("content-type", "application/json")
            .body(body)
    };
    answer(raw("{not json"))
        .await
        .assert_problem(400, "invalid-json");
    answer(raw(
        r#"{"type":"create","collection":"books","id":7,"payload":{}}"#,
    ))
    .await
    .assert_problem(422, "validation-failed");
    answer(raw(
        r#"{"type":"launch","collection":"books","id":"b","payload":{}}"#,
    ))
    .await
    .assert_problem(422, "validation-failed");
    answer(raw(r#"{"type":"delete","collection":"bo/oks","id":"b"}"#))
        .await
        .assert_problem(422, "validation-failed");
    answer(h.post(Some("k-bad")).body("{}"))
        .await
        .assert_problem(415, "invalid-json");
    let big = "x".repeat(2048);
    answer(h.post(Some("k-bad")).json(&create("b", &big)))
        .await
        .assert_problem(413, "payload-too-large");
    answer(
        h.http
            .post(h.app.url("/v1/commands"))
            .header("idempotency-key", "k-bad")
            .json(&create("b", "x")),
    )
    .await
    .assert_problem(401, "unauthorized");
    answer(h.http.get(h.app.url("/v1/nothing-here")))
        .await
        .assert_problem(404, "not-found");

    // A client still sending a body declared over the limit reads the 413, and its body is
    // taken (no reset), every time.
    for attempt in 0..5 {
        let (response, sent) = common::test_support::post_oversize(
            h.app.addr,
            "/v1/commands",
            &[
                format!("X-Client-Id: {}", h.client),
                "Idempotency-Key: k-huge".to_owned(),
            ],
            4 * 1024 * 1024,
        )
        .await;
        assert!(
            response.starts_with("HTTP/1.1 413") && response.contains("payload-too-large"),
            "attempt {attempt}: {response}"
        );
        assert!(sent, "attempt {attempt}: the body was not read");
    }

    assert_eq!(h.rows("commands").await, 0);
    assert_eq!(h.rows("idempotency_keys").await, 0);
    assert_eq!(h.outbox_rows().await, 0);
    h.stop().await;
}

#[tokio::test]
async fn an_accepted_command_reaches_kafka_keyed_with_its_envelope_and_trace() {
    let h = Harness::start(&[("COMMANDS_CUSTOM_TYPES", "approve,archive")]).await;
    let consumer =
        kafka::consumer(&h.kafka, "it-consumer", &format!("it-{}", Uuid::new_v4())).unwrap();
    consumer.subscribe(&[&h.topic]).unwrap();

    let trace_id = "4bf92f3577b34da6a36f3db1c6a8e1a2";
    let accepted = answer(
        h.post(Some("k-happy"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&json!({"type": "patch", "collection": "books", "id": "b-9",
                          "expectedVersion": 3, "payload": {"title": "Dune"}})),
    )
    .await;
    assert_eq!(
        accepted.status,
        202,
        "{}",
        String::from_utf8_lossy(&accepted.body)
    );
    let command_id = accepted.json()["commandId"].as_str().unwrap().to_owned();
    let status: String = sqlx::query_scalar("SELECT status FROM commands WHERE id = $1")
        .bind(Uuid::parse_str(&command_id).unwrap())
        .fetch_one(&h.db)
        .await
        .unwrap();
    assert_eq!(status, "accepted");
    // A configured custom type is accepted too.
    let custom = answer(
        h.post(Some("k-custom"))
            .json(&json!({"type": "approve", "collection": "books", "id": "b-9"})),
    )
    .await;
    assert_eq!(custom.status, 202);

    let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
        .await
        .expect("no message on the commands topic within 20 s")
        .unwrap();
    assert_eq!(message.key(), Some(&b"books/b-9"[..]));
    let envelope: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
    assert_eq!(envelope["commandId"], command_id);
    assert_eq!(envelope["type"], "patch");
    assert_eq!(envelope["collection"], "books");
    assert_eq!(envelope["id"], "b-9");
    assert_eq!(envelope["expectedVersion"], 3);
    assert_eq!(envelope["payload"], json!({"title": "Dune"}));
    assert_eq!(envelope["clientId"], h.client.as_str());
    assert!(envelope["acceptedAt"].as_str().unwrap().ends_with('Z'));
    let header = |name: &str| {
        message
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
    };
    assert_eq!(header("message-type").as_deref(), Some("command.patch"));
    assert_eq!(header("command-id"), Some(command_id));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    let traceparent = header("traceparent").expect("a traceparent header");
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(trace_id),
        "{traceparent}"
    );

    wait_until(
        "the outbox rows to be deleted after the ack",
        Duration::from_secs(10),
        || async { h.outbox_rows().await == 0 },
    )
    .await;
    let metrics = reqwest::get(h.app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "commands_accepted_total",
        "outbox_relayed_total",
        "outbox_backlog",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    h.stop().await;
}
