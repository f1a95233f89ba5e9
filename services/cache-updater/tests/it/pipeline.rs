//! The whole chain in one process on the real dependencies: command service (HTTP → Postgres
//! → outbox relay → `commands`) → processor (→ Postgres → its outbox relay → `events`) → cache
//! updater (→ Redis read model + rooms + `cache`). Every test uses its own topic prefix, Redis
//! prefix, client id and collection name (the write model's tables are shared).

use std::time::Duration;

use cache_updater::CacheUpdater;
use command_service::CommandService;
use common::readmodel::Lookup;
use common::service::ServiceConfig as _;
use common::shutdown::CancellationToken;
use common::test_support::{Deps, TestApp, wait_until};
use futures::StreamExt as _;
use processor::Processor;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{Stack, next_publication};

pub struct Pipeline {
    pub stack: Stack,
    apps: Vec<TestApp>,
    commands_url: String,
    http: reqwest::Client,
    client: String,
    db: PgPool,
    /// A collection only this test writes to.
    pub collection: String,
}

impl Pipeline {
    pub async fn start() -> Self {
        let stack = Stack::new().await;
        let extra = [
            ("COMMANDS_OUTBOX_POLL_INTERVAL_MS", "100"),
            ("PROCESSOR_OUTBOX_POLL_INTERVAL_MS", "100"),
        ];
        let commands = stack.start::<CommandService>(&extra).await;
        let processor = stack.start::<Processor>(&extra).await;
        let cache = stack.start::<CacheUpdater>(&extra).await;
        let db = PgPool::connect(&Deps::from_env().database_url)
            .await
            .unwrap();
        Self {
            commands_url: commands.url(""),
            apps: vec![cache, processor, commands],
            stack,
            http: reqwest::Client::new(),
            client: format!("it-client-{}", Uuid::new_v4()),
            db,
            collection: format!("it{}", Uuid::new_v4().simple()),
        }
    }

    /// POSTs a command with a fresh idempotency key; returns its id.
    pub async fn submit(&self, command: &Value) -> Uuid {
        let response = self
            .http
            .post(format!("{}/v1/commands", self.commands_url))
            .header("x-client-id", &self.client)
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(command)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "command refused");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let body: Value = response.json().await.unwrap();
        let id: Uuid = body["commandId"].as_str().unwrap().parse().unwrap();
        assert_eq!(location, format!("/v1/commands/{id}"));
        id
    }

    pub async fn status(&self, id: Uuid) -> Value {
        self.http
            .get(format!("{}/v1/commands/{id}", self.commands_url))
            .header("x-client-id", &self.client)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits for `succeeded`; returns the resulting document version.
    pub async fn succeeded(&self, id: Uuid) -> i64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let last = self.status(id).await;
            match last["status"].as_str() {
                Some("succeeded") => return last["resultVersion"].as_i64().unwrap(),
                Some("accepted" | "processing") => {}
                _ => panic!("command {id} ended {last}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "command {id} not done in 60 s: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The write model's live document, from the command service's
    /// `GET /v1/documents/{collection}/{id}` (`None` on 404: deleted or never written).
    pub async fn write_model(&self, id: &str) -> Option<(i64, Value)> {
        let response = self
            .http
            .get(format!(
                "{}/v1/documents/{}/{id}",
                self.commands_url, self.collection
            ))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            404 => None,
            200 => {
                let body: Value = response.json().await.unwrap();
                Some((body["version"].as_i64().unwrap(), body["data"].clone()))
            }
            status => panic!("GET /v1/documents answered {status}"),
        }
    }

    /// The read model in the write model's terms: the live document, or `None`.
    pub async fn read_model_live(&self, id: &str) -> Option<(i64, Value)> {
        match self.read_model(id).await {
            Lookup::Found { version, data } => Some((version, data)),
            Lookup::Deleted { .. } | Lookup::Missing => None,
        }
    }

    pub async fn read_model(&self, id: &str) -> Lookup {
        self.stack.lookup(&self.collection, id).await
    }

    pub fn command(&self, kind: &str, id: &str, payload: Option<Value>) -> Value {
        json!({"type": kind, "collection": self.collection, "id": id, "payload": payload})
    }

    pub async fn stop(self) {
        for app in self.apps {
            app.stop().await;
        }
        sqlx::query("DELETE FROM documents WHERE collection = $1")
            .bind(&self.collection)
            .execute(&self.db)
            .await
            .unwrap();
        for table in ["idempotency_keys", "commands"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE client_id = $1"))
                .bind(&self.client)
                .execute(&self.db)
                .await
                .unwrap();
        }
        self.stack.cleanup().await;
    }
}

#[tokio::test]
async fn a_command_reaches_the_read_model_and_the_document_room() {
    let pipeline = Pipeline::start().await;
    let mut room = pipeline
        .stack
        .subscribe(&format!("doc:{}:b1", pipeline.collection))
        .await;

    let id = pipeline
        .submit(&pipeline.command("create", "b1", Some(json!({"title": "Dune"}))))
        .await;
    assert_eq!(pipeline.succeeded(id).await, 1);

    wait_until(
        "the read model to hold v1",
        Duration::from_secs(30),
        || async { pipeline.read_model("b1").await != Lookup::Missing },
    )
    .await;
    assert_eq!(
        pipeline.read_model("b1").await,
        Lookup::Found {
            version: 1,
            data: json!({"title": "Dune"})
        }
    );
    let event = next_publication(&mut room).await;
    assert_eq!(
        (event.command_id, event.version, event.event_type.as_str()),
        (id, 1, "created")
    );
    assert_eq!(event.data, Some(json!({"title": "Dune"})));
    pipeline.stop().await;
}

/// The ordering case. A patch needs an existing document and every change counts, the
/// create included (version 1 = the create), so "1,000 changes end at version 1,000" is one
/// create followed by 999 concurrent patches, each with its own idempotency key and each
/// setting its own field: the final version proves that every patch was applied exactly
/// once, and the final document (all 999 fields) that none was lost or overwritten.
#[tokio::test]
async fn concurrent_patches_to_one_document_end_at_version_1000_and_the_models_agree() {
    const PATCHES: usize = 999;
    let pipeline = Pipeline::start().await;
    let created = pipeline
        .submit(&pipeline.command("create", "hot", Some(json!({"created": true}))))
        .await;
    assert_eq!(pipeline.succeeded(created).await, 1);

    let ids: Vec<Uuid> = futures::stream::iter(0..PATCHES)
        .map(|i| {
            let command = pipeline.command("patch", "hot", Some(json!({ format!("f{i}"): i })));
            let pipeline = &pipeline;
            async move { pipeline.submit(&command).await }
        })
        .buffer_unordered(100)
        .collect()
        .await;

    wait_until(
        "the read model to reach version 1000",
        Duration::from_secs(120),
        || async {
            matches!(
                pipeline.read_model("hot").await,
                Lookup::Found { version: 1000, .. }
            )
        },
    )
    .await;
    let mut versions: Vec<i64> = futures::stream::iter(&ids)
        .map(|id| pipeline.succeeded(*id))
        .buffer_unordered(50)
        .collect()
        .await;
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=1000).collect::<Vec<i64>>(),
        "each patch applied once"
    );

    let read = pipeline.read_model("hot").await;
    let Lookup::Found { data, .. } = &read else {
        panic!("unexpected read model {read:?}")
    };
    assert_eq!(data.as_object().unwrap().len(), PATCHES + 1);
    assert_eq!(
        pipeline.write_model("hot").await,
        pipeline.read_model_live("hot").await
    );
    pipeline.stop().await;
}

#[tokio::test]
async fn wiping_and_rebuilding_yields_the_same_read_model() {
    let pipeline = Pipeline::start().await;
    let docs: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
    let mut ids = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        ids.push(
            pipeline
                .submit(&pipeline.command("create", doc, Some(json!({"i": i}))))
                .await,
        );
    }
    for id in ids.drain(..) {
        pipeline.succeeded(id).await;
    }
    for (i, doc) in docs.iter().enumerate() {
        let command = match i % 3 {
            0 => pipeline.command("delete", doc, None),
            1 => pipeline.command("patch", doc, Some(json!({"patched": true}))),
            _ => pipeline.command("replace", doc, Some(json!({"replaced": i}))),
        };
        ids.push(pipeline.submit(&command).await);
    }
    for id in ids {
        assert_eq!(pipeline.succeeded(id).await, 2);
    }
    wait_until(
        "every change to be projected",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for doc in &docs {
                let read = pipeline.read_model(doc).await;
                all &= read != Lookup::Missing
                    && pipeline.read_model_live(doc).await == pipeline.write_model(doc).await;
            }
            all
        },
    )
    .await;
    let mut before = Vec::new();
    for doc in &docs {
        before.push(pipeline.read_model(doc).await);
    }

    let config = cache_updater::Config::from_vars(&pipeline.stack.vars).unwrap();
    let summary = cache_updater::rebuild::rebuild(&config, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.events, 24);
    assert_eq!(summary.cleared, 12);

    let mut after = Vec::new();
    for doc in &docs {
        after.push(pipeline.read_model(doc).await);
    }
    assert_eq!(after, before);
    pipeline.stop().await;
}
