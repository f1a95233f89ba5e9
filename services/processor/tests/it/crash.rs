//! Crash safety: `kill -9` of the processor and of the command service (whose process runs
//! the `outbox` relay) in the middle of 5,000 commands, then restarts. Every command must end
//! `succeeded` exactly once: document versions and per-command result versions prove that
//! nothing was applied twice, and the events topic proves that nothing was lost.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::kafka;
use common::test_support::wait_until;
use futures::StreamExt as _;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{Binary, Stack, payload, read_until};

const DOCUMENTS: usize = 50;
const COMMANDS: usize = 5_000;
const CONCURRENCY: usize = 16;

/// POSTs `command` with `key` until it is accepted (or replayed): connection errors and
/// 5xx/409 while a process is down or restarting are retried with the same key, which is
/// exactly what the `Idempotency-Key` contract is for.
async fn submit_until_accepted(
    http: &reqwest::Client,
    url: &str,
    client: &str,
    key: &str,
    command: &Value,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let sent = http
            .post(url)
            .header("x-client-id", client)
            .header("idempotency-key", key)
            .json(command)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(response) if response.status().as_u16() == 202 => return,
            Ok(response) => {
                let status = response.status().as_u16();
                assert!(
                    status >= 500 || status == 409,
                    "command {key} refused with {status}: {}",
                    response.text().await.unwrap_or_default()
                );
            }
            Err(_) => {} // the command service is down: retry
        }
        assert!(Instant::now() < deadline, "command {key} never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(db: &PgPool, client: &str, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM commands WHERE client_id = $1 AND status = $2")
        .bind(client)
        .bind(status)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn wait_succeeded(db: &PgPool, client: &str, at_least: i64) {
    wait_until(
        &format!("{at_least} commands to succeed"),
        // Generous: the machine running the suite may be busy with other builds and tests.
        Duration::from_secs(120),
        || async { count(db, client, "succeeded").await >= at_least },
    )
    .await;
}

#[tokio::test]
async fn kill_9_of_processor_and_relay_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let started = Instant::now();
    let mut stack = Stack::start(
        &[
            ("PROCESSOR_OUTBOX_BATCH_SIZE", "200"),
            ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ],
        None,
    )
    .await;
    let mut processor = Binary::new("processor", stack.env.clone());
    processor.start().await;
    let events = stack.reader(kafka::TOPIC_EVENTS);

    // 50 creates, then 4,950 patches spread over the documents, each adding its own member.
    let collection = stack.collection.clone();
    let creates: Vec<(String, Value)> = (0..DOCUMENTS)
        .map(|d| {
            (
                format!("create-{d}"),
                json!({"type": "create", "collection": collection, "id": format!("d{d}"),
                       "payload": {"doc": d}}),
            )
        })
        .collect();
    let patches: Vec<(String, Value)> = (DOCUMENTS..COMMANDS)
        .map(|n| {
            (
                format!("patch-{n}"),
                json!({"type": "patch", "collection": collection,
                       "id": format!("d{}", n % DOCUMENTS), "payload": {format!("p{n}"): n}}),
            )
        })
        .collect();
    let (http, url, client) = (
        stack.http.clone(),
        format!("{}/v1/commands", stack.command_service.url()),
        stack.client.clone(),
    );
    let submitter = tokio::spawn(async move {
        for batch in [creates, patches] {
            futures::stream::iter(batch)
                .for_each_concurrent(CONCURRENCY, |(key, command)| {
                    let (http, url, client) = (&http, &url, &client);
                    async move { submit_until_accepted(http, url, client, &key, &command).await }
                })
                .await;
        }
    });

    // Mid-stream: kill both processes, restart them; later kill the processor once more.
    wait_succeeded(&stack.db, &stack.client, 1_000).await;
    let phase = |what: &str| {
        eprintln!(
            "crash test: {what} at {:.1} s",
            started.elapsed().as_secs_f64()
        )
    };
    phase("1,000 succeeded; killing both");
    processor.kill_9().await;
    stack.command_service.kill_9().await;
    stack.command_service.start().await;
    processor.start().await;
    phase("both restarted");
    wait_succeeded(&stack.db, &stack.client, 3_000).await;
    phase("3,000 succeeded; killing the processor");
    processor.kill_9().await;
    processor.start().await;

    submitter.await.unwrap();
    phase("all submitted");
    let db = stack.db.clone();
    let client = stack.client.clone();
    wait_until(
        "every command to reach a final status",
        Duration::from_secs(120),
        || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM commands WHERE client_id = $1 \
                 AND status IN ('accepted', 'processing')",
            )
            .bind(&client)
            .fetch_one(&db)
            .await
            .unwrap();
            open == 0
        },
    )
    .await;

    phase("all final");
    // Exactly 5,000 commands (retried requests were replays), all succeeded.
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM commands WHERE client_id = $1 GROUP BY status",
    )
    .bind(&stack.client)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    assert_eq!(statuses, vec![("succeeded".to_owned(), COMMANDS as i64)]);

    // Each document's version is exactly its number of commands, and the commands' result
    // versions are 1..=version without repeats: nothing applied twice, nothing skipped.
    let documents: Vec<(String, i64, sqlx::types::Json<Value>, i64, i64)> = sqlx::query_as(
        "SELECT d.id, d.version, d.data, count(c.id), count(DISTINCT c.result_version) \
         FROM documents d JOIN commands c ON c.collection = d.collection AND c.document_id = d.id \
         WHERE d.collection = $1 GROUP BY d.id, d.version, d.data",
    )
    .bind(&stack.collection)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    assert_eq!(documents.len(), DOCUMENTS);
    for (id, version, data, commands, distinct_versions) in &documents {
        assert_eq!(version, commands, "document {id}");
        assert_eq!(distinct_versions, commands, "document {id}");
        // Every patch left its member: nothing lost.
        assert_eq!(
            data.0.as_object().unwrap().len() as i64,
            *commands,
            "document {id}"
        );
    }

    // Every command produced exactly one event (a relay crash may repeat a message, but then
    // with the same event id and version).
    let mut by_command: HashMap<String, HashSet<(String, i64)>> = HashMap::new();
    read_until(&events, Duration::from_secs(90), |read| {
        if let Some(last) = read.last() {
            let event = payload(last);
            by_command
                .entry(event["commandId"].as_str().unwrap().to_owned())
                .or_default()
                .insert((
                    event["eventId"].as_str().unwrap().to_owned(),
                    event["version"].as_i64().unwrap(),
                ));
        }
        by_command.len() == COMMANDS
    })
    .await;
    for (command, seen) in &by_command {
        assert_eq!(seen.len(), 1, "command {command} produced {seen:?}");
        assert!(Uuid::parse_str(command).is_ok());
    }

    eprintln!(
        "crash test: {COMMANDS} commands with 3 kill -9s in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stack.stop().await;
    processor.terminate().await;
}
