//! The command pipeline end to end on real PostgreSQL and Kafka: command service binary →
//! `commands` → processor (in this process) → write model + `processor_outbox` → `events`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::kafka;
use futures::future::BoxFuture;
use processor::handler::{Change, Handler, HandlerError, Handlers, Invocation};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{InProcess, Stack, header, payload, read_until};

const TRACE_ID: &str = "4bf92f3577b34da6a36f3db1c6a8e1a2";

#[tokio::test]
async fn commands_become_documents_with_versions_and_events_with_the_callers_trace() {
    let stack = Stack::start(&[], Some(Handlers::built_in())).await;
    let events = stack.reader(kafka::TOPIC_EVENTS);
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");

    let created = stack
        .submit_traced(
            json!({"type": "create", "id": "b1", "payload": {"title": "Dune", "year": 1965}}),
            Some(&traceparent),
        )
        .await;
    let status = stack.final_status(created).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["resultVersion"], 1);
    let (code, etag, body) = stack.document("b1").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(etag.as_deref(), Some("\"1\""));
    assert_eq!(body["version"], 1);
    assert_eq!(body["collection"], stack.collection.as_str());
    assert_eq!(body["id"], "b1");
    assert_eq!(body["data"], json!({"title": "Dune", "year": 1965}));
    assert!(body["updatedAt"].as_str().unwrap().ends_with('Z'));

    // A merge patch: `null` removes a member.
    let patched = stack
        .submit(json!({"type": "patch", "id": "b1", "expectedVersion": 1,
                       "payload": {"year": null, "author": "Herbert"}}))
        .await;
    assert_eq!(stack.final_status(patched).await["resultVersion"], 2);
    let (_, etag, body) = stack.document("b1").await;
    assert_eq!(etag.as_deref(), Some("\"2\""));
    assert_eq!(body["data"], json!({"title": "Dune", "author": "Herbert"}));

    let deleted = stack.submit(json!({"type": "delete", "id": "b1"})).await;
    assert_eq!(stack.final_status(deleted).await["resultVersion"], 3);
    assert_eq!(stack.document("b1").await.0, 404);
    // Re-creating continues the version sequence past the delete.
    let recreated = stack
        .submit(json!({"type": "create", "id": "b1", "payload": {"title": "Dune II"}}))
        .await;
    assert_eq!(stack.final_status(recreated).await["resultVersion"], 4);

    let key = format!("{}/b1", stack.collection);
    let read = read_until(&events, Duration::from_secs(30), |m| m.len() >= 4).await;
    let expected = [
        (created, "created", json!({"title": "Dune", "year": 1965})),
        (
            patched,
            "patched",
            json!({"title": "Dune", "author": "Herbert"}),
        ),
        (deleted, "deleted", Value::Null),
        (recreated, "created", json!({"title": "Dune II"})),
    ];
    for (version, (message, (command_id, kind, data))) in read.iter().zip(expected).enumerate() {
        use rdkafka::Message as _;
        assert_eq!(message.key(), Some(key.as_bytes()));
        let event = payload(message);
        assert_eq!(event["type"], kind, "{event}");
        assert_eq!(event["version"], version as i64 + 1);
        assert_eq!(event["data"], data);
        assert_eq!(event["commandId"], command_id.to_string());
        assert_eq!(event["collection"], stack.collection.as_str());
        assert_eq!(event["id"], "b1");
        assert!(Uuid::parse_str(event["eventId"].as_str().unwrap()).is_ok());
        assert!(event["occurredAt"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            header(message, "message-type"),
            Some(format!("event.{kind}"))
        );
        assert_eq!(header(message, "command-id"), Some(command_id.to_string()));
    }
    let first_trace = header(&read[0], "traceparent").expect("the event carries a traceparent");
    assert_eq!(
        first_trace.split('-').nth(1),
        Some(TRACE_ID),
        "{first_trace}"
    );

    let metrics = reqwest::get(format!("{}/metrics", stack.processor.as_ref().unwrap().url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // (`outbox_relayed_total` is not asserted: the relay leading `processor_outbox` may be
    // another test's processor.)
    for name in [
        "commands_processed_total",
        "command_handler_duration_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    stack.stop().await;
}

#[tokio::test]
async fn refused_commands_fail_with_a_reason_and_change_nothing() {
    let stack = Stack::start(&[], Some(Handlers::built_in())).await;
    let created = stack
        .submit(json!({"type": "create", "id": "d1", "payload": {"n": 1}}))
        .await;
    assert_eq!(stack.final_status(created).await["status"], "succeeded");

    let cases = [
        (
            json!({"type": "patch", "id": "d1", "expectedVersion": 7, "payload": {"n": 2}}),
            "version_conflict",
        ),
        (
            json!({"type": "create", "id": "d1", "payload": {"n": 3}}),
            "already_exists",
        ),
        (
            json!({"type": "replace", "id": "missing", "payload": {"n": 4}}),
            "not_found",
        ),
        (json!({"type": "delete", "id": "missing"}), "not_found"),
    ];
    for (command, reason) in cases {
        let id = stack.submit(command.clone()).await;
        let status = stack.final_status(id).await;
        assert_eq!(status["status"], "failed", "{command}: {status}");
        assert_eq!(status["failureReason"], reason, "{command}: {status}");
        assert!(status.get("resultVersion").is_none(), "{status}");
    }
    let (_, etag, body) = stack.document("d1").await;
    assert_eq!(etag.as_deref(), Some("\"1\""));
    assert_eq!(body["data"], json!({"n": 1}));
    assert_eq!(stack.document("missing").await.0, 404);
    stack.stop().await;
}

#[tokio::test]
async fn a_backlog_is_decided_in_batches_with_the_outcomes_of_one_by_one_processing() {
    // Accepted while no processor runs, so the processor finds a backlog and takes each
    // partition's waiting commands together.
    let mut stack = Stack::start(&[], None).await;
    let mut expected: Vec<(Uuid, &str, Value)> = Vec::new();
    for doc in ["a", "b", "c"] {
        let id = stack
            .submit(json!({"type": "create", "id": doc, "payload": {"n": 0}}))
            .await;
        expected.push((id, "succeeded", json!(1)));
        for n in 1..=20 {
            let id = stack
                .submit(
                    json!({"type": "patch", "id": doc, "expectedVersion": n, "payload": {"n": n}}),
                )
                .await;
            expected.push((id, "succeeded", json!(n + 1)));
        }
        let id = stack
            .submit(json!({"type": "patch", "id": doc, "expectedVersion": 1, "payload": {"n": -1}}))
            .await;
        expected.push((id, "failed", json!("version_conflict")));
        let id = stack
            .submit(json!({"type": "create", "id": doc, "payload": {"n": -2}}))
            .await;
        expected.push((id, "failed", json!("already_exists")));
    }
    let id = stack
        .submit(json!({"type": "delete", "id": "c", "expectedVersion": 21}))
        .await;
    expected.push((id, "succeeded", json!(22)));
    let id = stack
        .submit(json!({"type": "create", "id": "c", "payload": {"again": true}}))
        .await;
    expected.push((id, "succeeded", json!(23)));

    stack.processor = Some(InProcess::start(&stack.vars(), Handlers::built_in()).await);
    for (id, status, detail) in &expected {
        let found = stack.final_status(*id).await;
        assert_eq!(found["status"], *status, "{found}");
        let field = if *status == "failed" {
            "failureReason"
        } else {
            "resultVersion"
        };
        assert_eq!(found[field], *detail, "{found}");
    }
    for (doc, version, data) in [
        ("a", 21, json!({"n": 20})),
        ("b", 21, json!({"n": 20})),
        ("c", 23, json!({"again": true})),
    ] {
        let (status, etag, body) = stack.document(doc).await;
        assert_eq!(status, 200);
        assert_eq!(etag, Some(format!("\"{version}\"")));
        assert_eq!(body["data"], data);
    }
    // One event per new version, in version order per document.
    let events = stack.reader(kafka::TOPIC_EVENTS);
    let received = read_until(&events, Duration::from_secs(60), |seen| seen.len() >= 65).await;
    let mut versions: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for message in &received {
        let event = payload(message);
        versions
            .entry(event["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(event["version"].as_i64().unwrap());
    }
    for (doc, last) in [("a", 21), ("b", 21), ("c", 23)] {
        assert_eq!(versions[doc], (1..=last).collect::<Vec<_>>(), "{doc}");
    }
    // Commands written in one transaction share its timestamp: fewer distinct ones than
    // commands means the backlog was taken in batches.
    let (commands, writes): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT updated_at) FROM commands WHERE collection = $1",
    )
    .bind(&stack.collection)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(commands, expected.len() as i64);
    assert!(
        writes < commands,
        "{writes} transactions for {commands} commands"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_command_delivered_twice_is_applied_once() {
    let stack = Stack::start(&[], Some(Handlers::built_in())).await;
    let created = stack
        .submit(json!({"type": "create", "id": "r1", "payload": {"n": 0}}))
        .await;
    assert_eq!(stack.final_status(created).await["status"], "succeeded");

    // Produce the same patch command twice straight to Kafka, as a relay that crashed after
    // the broker's ack (but before deleting its rows) would.
    let producer = kafka::producer(&stack.kafka, "it-producer").unwrap();
    let command_id = Uuid::now_v7();
    let envelope = json!({
        "commandId": command_id, "type": "patch", "collection": stack.collection, "id": "r1",
        "payload": {"n": 1}, "clientId": stack.client, "acceptedAt": "2026-11-27T00:00:00Z"
    });
    let key = format!("{}/r1", stack.collection);
    let topic = stack.topic(kafka::TOPIC_COMMANDS);
    let body = envelope.to_string();
    let id_text = command_id.to_string();
    for _ in 0..2 {
        let headers = OwnedHeaders::new().insert(Header {
            key: "command-id",
            value: Some(id_text.as_str()),
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&body)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // A later command on the same key is processed after both copies (same partition, in
    // order), so once it is final the duplicate has been seen.
    let later = stack
        .submit(json!({"type": "patch", "id": "r1", "payload": {"m": 1}}))
        .await;
    assert_eq!(stack.final_status(later).await["resultVersion"], 3);
    let status = stack.status(command_id).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["resultVersion"], 2);
    let (_, etag, body) = stack.document("r1").await;
    assert_eq!(etag.as_deref(), Some("\"3\""));
    assert_eq!(body["data"], json!({"n": 1, "m": 1}));
    let succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM commands WHERE collection = $1 AND status = 'succeeded'",
    )
    .bind(&stack.collection)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(succeeded, 3);
    stack.stop().await;
}

/// Inserts a command row for `document` and produces a mangled message (`{not json`, key
/// `<collection>/<document>`) for it, as a broken producer would. Returns the command's id.
async fn send_poison(stack: &Stack, document: &str) -> Uuid {
    let command_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO commands (id, client_id, type, collection, document_id) \
         VALUES ($1, $2, 'create', $3, $4)",
    )
    .bind(command_id)
    .bind(&stack.client)
    .bind(&stack.collection)
    .bind(document)
    .execute(&stack.db)
    .await
    .unwrap();
    let key = format!("{}/{document}", stack.collection);
    let id_text = command_id.to_string();
    kafka::producer(&stack.kafka, "it-producer")
        .unwrap()
        .send(
            FutureRecord::to(&stack.topic(kafka::TOPIC_COMMANDS))
                .key(&key)
                .payload("{not json")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "command-id",
                    value: Some(id_text.as_str()),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    command_id
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_consumption_continues() {
    let stack = Stack::start(&[], Some(Handlers::built_in())).await;
    let dlq = stack.reader(kafka::TOPIC_COMMANDS_DLQ);
    // A command row whose Kafka message arrives mangled.
    let command_id = send_poison(&stack, "p1").await;
    let (key, id_text) = (format!("{}/p1", stack.collection), command_id.to_string());

    let status = stack.final_status(command_id).await;
    assert_eq!(status["status"], "dead_lettered", "{status}");
    assert_eq!(status["failureReason"], "unparseable");
    let read = read_until(&dlq, Duration::from_secs(20), |m| !m.is_empty()).await;
    use rdkafka::Message as _;
    assert_eq!(read[0].payload(), Some(&b"{not json"[..]));
    assert_eq!(read[0].key(), Some(key.as_bytes()));
    assert_eq!(header(&read[0], "command-id"), Some(id_text));
    assert_eq!(
        header(&read[0], "dlq-reason").as_deref(),
        Some("unparseable")
    );
    assert!(header(&read[0], "dlq-error").is_some());

    // The same key (hence partition) keeps flowing.
    let next = stack
        .submit(json!({"type": "create", "id": "p1", "payload": {"ok": true}}))
        .await;
    assert_eq!(stack.final_status(next).await["status"], "succeeded");
    stack.stop().await;
}

/// A Rust handler registered in the processor: stamps the payload onto the document.
struct Stamp;

impl Handler for Stamp {
    fn handle<'a>(&'a self, call: Invocation<'a>) -> BoxFuture<'a, Result<Change, HandlerError>> {
        Box::pin(async move {
            let mut data = call.current.map_or(json!({}), |d| d.data.clone());
            data["stamp"] = call.command.payload.clone().unwrap_or(Value::Null);
            Ok(Change::Upsert {
                event_type: "stamped".into(),
                data,
            })
        })
    }
}

/// What the webhook saw: its `traceparent` header and body, per call.
type Seen = Vec<(Option<String>, Value)>;

#[derive(Clone, Default)]
struct Webhooks {
    flaky_calls: Arc<AtomicU32>,
    seen: Arc<std::sync::Mutex<Seen>>,
}

async fn webhook_server(hooks: Webhooks) -> String {
    let approve = |hooks: Webhooks| {
        move |headers: HeaderMap, axum::Json(body): axum::Json<Value>| async move {
            let traceparent = headers
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned());
            hooks.seen.lock().unwrap().push((traceparent, body));
            axum::Json(json!({"change": "patch", "patch": {"approved": true}, "type": "approved"}))
        }
    };
    let flaky = |hooks: Webhooks| {
        move || async move {
            if hooks.flaky_calls.fetch_add(1, Ordering::SeqCst) < 2 {
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})))
            } else {
                (
                    StatusCode::OK,
                    axum::Json(json!({"change": "upsert", "data": {"flaky": "done"}})),
                )
            }
        }
    };
    let app = Router::new()
        .route("/approve", post(approve(hooks.clone())))
        .route("/flaky", post(flaky(hooks.clone())))
        .route(
            "/refuse",
            post(|| async {
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(json!({"reason": "insufficient_stock"})),
                )
            }),
        )
        .route(
            "/down",
            post(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn webhook_and_rust_handlers_decide_custom_commands() {
    let hooks = Webhooks::default();
    let base = webhook_server(hooks.clone()).await;
    let webhooks = json!({
        "approve": format!("{base}/approve"),
        "flaky": format!("{base}/flaky"),
        "refuse": format!("{base}/refuse"),
        "down": format!("{base}/down"),
    })
    .to_string();
    let stack = Stack::start(
        &[
            ("COMMANDS_CUSTOM_TYPES", "approve,flaky,refuse,down,stamp"),
            ("PROCESSOR_WEBHOOKS", &webhooks),
            ("PROCESSOR_MAX_ATTEMPTS", "3"),
        ],
        Some(Handlers::built_in().with("stamp", Stamp)),
    )
    .await;
    let events = stack.reader(kafka::TOPIC_EVENTS);
    let dlq = stack.reader(kafka::TOPIC_COMMANDS_DLQ);
    let created = stack
        .submit(json!({"type": "create", "id": "o1", "payload": {"total": 10}}))
        .await;
    assert_eq!(stack.final_status(created).await["status"], "succeeded");

    // A webhook patch: it sees the command and the document, with the trace context.
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let approved = stack
        .submit_traced(
            json!({"type": "approve", "id": "o1", "payload": {"by": "alice"}}),
            Some(&traceparent),
        )
        .await;
    let status = stack.final_status(approved).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["resultVersion"], 2);
    let (_, _, body) = stack.document("o1").await;
    assert_eq!(body["data"], json!({"total": 10, "approved": true}));
    {
        let seen = hooks.seen.lock().unwrap();
        let (trace, request) = &seen[0];
        assert_eq!(request["commandId"], approved.to_string());
        assert_eq!(request["type"], "approve");
        assert_eq!(request["payload"], json!({"by": "alice"}));
        assert_eq!(request["document"]["version"], 1);
        assert_eq!(request["document"]["data"], json!({"total": 10}));
        let trace = trace.as_deref().expect("the webhook got a traceparent");
        assert_eq!(trace.split('-').nth(1), Some(TRACE_ID), "{trace}");
    }

    // Two 503s, then an answer: retried, succeeded once.
    let flaky = stack
        .submit(json!({"type": "flaky", "id": "f1", "payload": {}}))
        .await;
    let status = stack.final_status(flaky).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["resultVersion"], 1);
    assert_eq!(hooks.flaky_calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        stack.document("f1").await.2["data"],
        json!({"flaky": "done"})
    );

    // A 4xx with a reason: failed with that reason.
    let refused = stack
        .submit(json!({"type": "refuse", "id": "o1", "payload": {}}))
        .await;
    let status = stack.final_status(refused).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["failureReason"], "insufficient_stock");

    // Always 500: dead-lettered after PROCESSOR_MAX_ATTEMPTS.
    let down = stack
        .submit(json!({"type": "down", "id": "o1", "payload": {}}))
        .await;
    let status = stack.final_status(down).await;
    assert_eq!(status["status"], "dead_lettered", "{status}");
    assert_eq!(status["failureReason"], "max_attempts_exceeded");
    let dead = read_until(&dlq, Duration::from_secs(20), |m| !m.is_empty()).await;
    assert_eq!(header(&dead[0], "command-id"), Some(down.to_string()));
    assert_eq!(
        header(&dead[0], "dlq-reason").as_deref(),
        Some("max_attempts_exceeded")
    );
    assert_eq!(header(&dead[0], "dlq-attempts").as_deref(), Some("3"));

    // The Rust handler.
    let stamped = stack
        .submit(json!({"type": "stamp", "id": "o1", "payload": "s-1"}))
        .await;
    assert_eq!(stack.final_status(stamped).await["resultVersion"], 3);
    assert_eq!(
        stack.document("o1").await.2["data"],
        json!({"total": 10, "approved": true, "stamp": "s-1"})
    );

    // Events: created, approved (custom type from the reply), upsert for flaky (the command
    // type by default), stamped.
    let read = read_until(&events, Duration::from_secs(30), |m| m.len() >= 4).await;
    let types: Vec<String> = read
        .iter()
        .map(|m| payload(m)["type"].as_str().unwrap().to_owned())
        .collect();
    for expected in ["created", "approved", "flaky", "stamped"] {
        assert!(types.iter().any(|t| t == expected), "{types:?}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn dead_lettered_commands_are_replayed_once_after_their_handler_is_deployed() {
    // No `stamp` handler yet: the command is dead-lettered at once.
    let mut stack = Stack::start(
        &[("COMMANDS_CUSTOM_TYPES", "stamp")],
        Some(Handlers::built_in()),
    )
    .await;
    let stamped = stack
        .submit(json!({"type": "stamp", "id": "r1", "payload": "late"}))
        .await;
    let status = stack.final_status(stamped).await;
    assert_eq!(status["status"], "dead_lettered", "{status}");
    assert_eq!(status["failureReason"], "no_handler");
    // And a dead letter no replay can fix: its message is not a command.
    let poisoned = send_poison(&stack, "r2").await;
    assert_eq!(
        stack.final_status(poisoned).await["status"],
        "dead_lettered"
    );

    // The handler is deployed; the dead letters are replayed.
    stack.processor.take().unwrap().stop().await;
    let handlers = Handlers::built_in().with("stamp", Stamp);
    stack.processor = Some(InProcess::start(&stack.vars(), handlers).await);
    // The processor counts the dead letters a replay would send.
    let url = stack.processor.as_ref().unwrap().url.clone();
    wait_for_pending(&url, 2).await;
    let commands = stack.reader(kafka::TOPIC_COMMANDS);
    let config =
        <processor::Config as common::service::ServiceConfig>::from_vars(&stack.vars()).unwrap();
    let stop = common::shutdown::CancellationToken::new();
    let summary = processor::replay::replay(&config, 100, &stop)
        .await
        .unwrap();
    assert_eq!(
        (
            summary.read,
            summary.replayed,
            summary.finished,
            summary.unusable
        ),
        (2, 1, 0, 1),
        "{summary}"
    );
    assert!(!summary.more_left);
    let status = stack.final_status(stamped).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    let (code, _, body) = stack.document("r1").await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["stamp"], "late", "{body}");
    // The replayed message is the original, without the dead-letter headers.
    let stamped_text = stamped.to_string();
    let read = read_until(&commands, Duration::from_secs(20), |messages| {
        messages
            .iter()
            .any(|m| header(m, "dlq-replayed-from").is_some())
    })
    .await;
    let replayed = read
        .iter()
        .find(|m| header(m, "dlq-replayed-from").is_some())
        .unwrap();
    assert_eq!(header(replayed, "command-id"), Some(stamped_text));
    assert_eq!(header(replayed, "dlq-reason"), None);
    assert_eq!(payload(replayed)["payload"], "late");

    // Run again: what was replayed is never replayed twice.
    let again = processor::replay::replay(&config, 100, &stop)
        .await
        .unwrap();
    assert_eq!((again.read, again.replayed), (0, 0), "{again}");
    wait_for_pending(&url, 0).await;
    stack.stop().await;
}

/// Waits until the processor at `url` reports `count` dead letters pending a replay.
async fn wait_for_pending(url: &str, count: u64) {
    let line = format!("dead_letters_pending{{service=\"processor\"}} {count}");
    common::test_support::wait_until(&line, Duration::from_secs(30), || async {
        common::test_support::metrics_text(url)
            .await
            .lines()
            .any(|l| l == line)
    })
    .await;
}
