//! The batch write against the real PostgreSQL: all of it lands, or — when a guard does not
//! hold — none of it.

use common::config::{PostgresConfig, Vars};
use common::envelope::CommandEnvelope;
use common::outbox::{OutboxTable, TraceContext, Waker};
use common::postgres::Postgres;
use processor::apply::Store;
use processor::batch;
use processor::handler::{Handlers, Invocation};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

struct Fixture {
    pool: PgPool,
    store: Store,
    collection: String,
}

impl Fixture {
    async fn new() -> Self {
        let config: PostgresConfig = Vars::from_env().parse().unwrap();
        let postgres = Postgres::connect_lazy(&config).unwrap();
        common::schema::MIGRATOR.run(postgres.pool()).await.unwrap();
        let pool = postgres.pool().clone();
        let table = OutboxTable::new(processor::OUTBOX_TABLE).unwrap();
        let store = Store::new(pool.clone(), Waker::new(table), "store-test.events".into());
        Self {
            pool,
            store,
            collection: format!("store-{}", Uuid::new_v4().simple()),
        }
    }

    /// A command with its `commands` row, as the command service writes it.
    async fn accepted(&self, kind: &str, id: &str, payload: Value) -> CommandEnvelope {
        let command = CommandEnvelope {
            command_id: Uuid::now_v7(),
            command_type: kind.into(),
            collection: self.collection.clone(),
            id: id.into(),
            expected_version: None,
            payload: Some(payload),
            client_id: "store-test".into(),
            accepted_at: chrono::Utc::now(),
        };
        sqlx::query(
            "INSERT INTO commands (id, client_id, type, collection, document_id, payload) \
             VALUES ($1, 'store-test', $2, $3, $4, $5)",
        )
        .bind(command.command_id)
        .bind(kind)
        .bind(&command.collection)
        .bind(id)
        .bind(sqlx::types::Json(command.payload.as_ref()))
        .execute(&self.pool)
        .await
        .unwrap();
        command
    }

    /// Reads, plans with the built-in handlers, runs `meanwhile`, then writes; returns what
    /// the write answered.
    async fn batch(&self, commands: &[CommandEnvelope], meanwhile: &str) -> bool {
        let handlers = Handlers::built_in();
        let trace = TraceContext::default();
        let traces = vec![trace.clone(); commands.len()];
        let mut conn = self.pool.acquire().await.unwrap();
        let reads = self.store.snapshot_many(&mut conn, commands).await.unwrap();
        let plan = batch::plan(commands, reads, |i, current| {
            handlers.decide_now(Invocation {
                command: &commands[i],
                current,
                trace: &trace,
            })
        })
        .unwrap();
        if !meanwhile.is_empty() {
            sqlx::query(meanwhile)
                .bind(&self.collection)
                .execute(&self.pool)
                .await
                .unwrap();
        }
        self.store
            .commit_plan(&mut conn, commands, &plan, &traces)
            .await
            .unwrap()
    }

    async fn statuses(&self, commands: &[CommandEnvelope]) -> Vec<String> {
        let mut statuses = Vec::new();
        for command in commands {
            let status: String = sqlx::query_scalar("SELECT status FROM commands WHERE id = $1")
                .bind(command.command_id)
                .fetch_one(&self.pool)
                .await
                .unwrap();
            statuses.push(status);
        }
        statuses
    }

    async fn documents(&self) -> Vec<(String, i64, Option<Value>)> {
        sqlx::query_as::<_, (String, i64, Option<sqlx::types::Json<Value>>)>(
            "SELECT id, version, data FROM documents WHERE collection = $1 ORDER BY id",
        )
        .bind(&self.collection)
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, version, data)| (id, version, data.map(|d| d.0)))
        .collect()
    }

    async fn events(&self, commands: &[CommandEnvelope]) -> i64 {
        let ids: Vec<Uuid> = commands.iter().map(|c| c.command_id).collect();
        sqlx::query_scalar("SELECT count(*) FROM processor_outbox WHERE command_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn remove(self) {
        sqlx::raw_sql(&format!(
            "DELETE FROM processor_outbox WHERE message_key LIKE '{0}/%'; \
             DELETE FROM documents WHERE collection = '{0}'; \
             DELETE FROM commands WHERE collection = '{0}'",
            self.collection
        ))
        .execute(&self.pool)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_batch_writes_statuses_documents_and_events_together() {
    let f = Fixture::new().await;
    let first = [
        f.accepted("create", "a", json!({"n": 1})).await,
        f.accepted("create", "b", json!({"n": 1})).await,
    ];
    assert!(f.batch(&first, "").await);
    let second = [
        f.accepted("patch", "a", json!({"n": 2})).await,
        f.accepted("create", "b", json!({"n": 9})).await, // already exists: refused
        f.accepted("create", "c", json!({"n": 1})).await,
        f.accepted("delete", "a", json!({})).await,
    ];
    assert!(f.batch(&second, "").await);
    assert_eq!(
        f.statuses(&second).await,
        ["succeeded", "failed", "succeeded", "succeeded"]
    );
    assert_eq!(
        f.documents().await,
        [
            ("a".into(), 3, None),
            ("b".into(), 1, Some(json!({"n": 1}))),
            ("c".into(), 1, Some(json!({"n": 1}))),
        ]
    );
    assert_eq!(f.events(&first).await + f.events(&second).await, 5);
    f.remove().await;
}

#[tokio::test]
async fn a_batch_whose_guard_fails_writes_nothing() {
    let f = Fixture::new().await;
    assert!(
        f.batch(&[f.accepted("create", "a", json!({"n": 1})).await], "")
            .await
    );
    // A document updated between the read and the write (another processor, during a
    // rebalance overlap): the claim and the new document of the same batch are undone too.
    let raced = [
        f.accepted("create", "new", json!({"n": 1})).await,
        f.accepted("patch", "a", json!({"n": 2})).await,
    ];
    let bump = "UPDATE documents SET version = version + 1 WHERE collection = $1 AND id = 'a'";
    assert!(!f.batch(&raced, bump).await);
    assert_eq!(f.statuses(&raced).await, ["accepted", "accepted"]);
    assert_eq!(
        f.documents().await,
        [("a".into(), 2, Some(json!({"n": 1})))]
    );
    assert_eq!(f.events(&raced).await, 0);
    // A new document created meanwhile: the same.
    let created = [
        f.accepted("patch", "a", json!({"n": 3})).await,
        f.accepted("create", "late", json!({"n": 1})).await,
    ];
    let insert = "INSERT INTO documents (collection, id, version, data, last_command_id) \
                  VALUES ($1, 'late', 1, '{}', gen_random_uuid())";
    assert!(!f.batch(&created, insert).await);
    assert_eq!(f.statuses(&created).await, ["accepted", "accepted"]);
    assert_eq!(f.events(&created).await, 0);
    // A command finished meanwhile (a second copy elsewhere): nothing of the batch lands.
    let finished = [
        f.accepted("patch", "a", json!({"n": 4})).await,
        f.accepted("create", "other", json!({"n": 1})).await,
    ];
    let finish = format!(
        "UPDATE commands SET status = 'succeeded' WHERE collection = $1 AND id = '{}'",
        finished[0].command_id
    );
    assert!(!f.batch(&finished, &finish).await);
    assert_eq!(f.statuses(&finished).await, ["succeeded", "accepted"]);
    assert_eq!(f.events(&finished).await, 0);
    assert_eq!(
        f.documents()
            .await
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        ["a", "late"]
    );
    f.remove().await;
}
