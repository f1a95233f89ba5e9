//! The pipeline under test: the command service's binary (HTTP intake + the `outbox` relay)
//! and the processor, on the real PostgreSQL and Kafka, with a topic prefix, client id and
//! collection of their own.

use std::path::PathBuf;
use std::time::Duration;

use common::config::{CommonConfig, KafkaConfig, Vars};
use common::kafka;
use common::service::ServiceConfig;
use common::shutdown::CancellationToken;
use common::test_support::{ChildProcess, Deps, free_port, get_json, test_vars, wait_until};
use processor::handler::Handlers;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

/// Partitions of the test topics.
pub const PARTITIONS: i32 = 3;

/// A processor running in this process.
pub struct InProcess {
    pub url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), processor::Error>>,
}

impl InProcess {
    pub async fn start(vars: &Vars, handlers: Handlers) -> Self {
        let config = processor::Config::from_vars(vars).unwrap();
        let state = processor::AppState::with_handlers(&config, handlers).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(processor::run(listener, state, shutdown.clone()));
        wait_ready(&url, "the processor").await;
        Self {
            url,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the processor did not stop within 30 s")
            .unwrap()
            .unwrap();
    }
}

pub async fn wait_ready(base: &str, what: &str) {
    let ready = format!("{base}/ready");
    wait_until(
        &format!("{what} to be ready"),
        Duration::from_secs(60),
        || {
            let ready = ready.clone();
            async move { matches!(get_json(&ready).await, Some((200, _))) }
        },
    )
    .await;
}

/// A service binary with a fixed port, so a restarted process answers at the same address.
pub struct Binary {
    name: &'static str,
    pub port: u16,
    env: Vec<(&'static str, String)>,
    process: Option<ChildProcess>,
    starts: u32,
}

impl Binary {
    pub fn new(name: &'static str, env: Vec<(&'static str, String)>) -> Self {
        Self {
            name,
            port: free_port(),
            env,
            process: None,
            starts: 0,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "meridian-it-{}-{}-{}.log",
            self.name, self.port, self.starts
        ))
    }

    pub async fn start(&mut self) {
        self.starts += 1;
        let mut env = self.env.clone();
        env.push(("PORT", self.port.to_string()));
        env.push(("BIND_ADDRESS", "127.0.0.1".into()));
        let program = common::test_support::workspace_binary(self.name);
        self.process = Some(ChildProcess::spawn(&program, &env, &self.log()));
        wait_ready(
            &self.url(),
            &format!("{} (log {})", self.name, self.log().display()),
        )
        .await;
    }

    /// SIGKILL (the child is spawned with `kill_on_drop`), then waits until the port is
    /// closed, i.e. the process is gone.
    pub async fn kill_9(&mut self) {
        drop(self.process.take());
        let port = self.port;
        wait_until(
            "the killed process's port to close",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
            },
        )
        .await;
    }

    pub async fn terminate(&mut self) {
        if let Some(process) = self.process.take() {
            let status = process.terminate(Duration::from_secs(30)).await;
            assert!(status.success(), "{} exited with {status}", self.name);
        }
    }
}

/// Everything a pipeline test needs.
pub struct Stack {
    /// The variables every process of this stack gets.
    pub env: Vec<(&'static str, String)>,
    pub kafka: KafkaConfig,
    pub db: PgPool,
    pub http: reqwest::Client,
    pub client: String,
    pub collection: String,
    pub command_service: Binary,
    pub processor: Option<InProcess>,
}

impl Stack {
    /// Creates the topics of a fresh prefix, starts the command service binary and, when
    /// `handlers` is given, the processor in this process. `extra` variables go to both
    /// (and to [`Stack::env`], for processor binaries a test starts itself).
    pub async fn start(extra: &[(&'static str, &str)], handlers: Option<Handlers>) -> Self {
        let prefix = format!("it-proc-{}.", Uuid::new_v4().simple());
        let mut env: Vec<(&'static str, String)> = vec![
            ("KAFKA_TOPIC_PREFIX", prefix),
            ("COMMANDS_OUTBOX_POLL_INTERVAL_MS", "100".into()),
            ("PROCESSOR_OUTBOX_POLL_INTERVAL_MS", "100".into()),
            ("PROCESSOR_BACKOFF_BASE_MS", "20".into()),
            ("PROCESSOR_BACKOFF_MAX_MS", "200".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let vars = env
            .iter()
            .fold(test_vars(), |vars, (k, v)| vars.with(*k, v.clone()));
        env.push(("RUST_LOG", "warn".into()));

        let telemetry = common::telemetry::init("it", &vars.parse::<CommonConfig>().unwrap());
        std::mem::forget(telemetry); // keep the propagator for the whole test process
        let kafka: KafkaConfig = vars.parse().unwrap();
        let admin = kafka::admin(&kafka, "it-admin").unwrap();
        let topics = topics(&kafka);
        let with_partitions: Vec<(&str, i32)> =
            topics.iter().map(|t| (t.as_str(), PARTITIONS)).collect();
        kafka::ensure_topics(&admin, &with_partitions, 1)
            .await
            .unwrap();

        let mut command_service = Binary::new("command-service", env.clone());
        command_service.start().await;
        let processor = match handlers {
            Some(handlers) => Some(InProcess::start(&vars, handlers).await),
            None => None,
        };
        let db = PgPool::connect(&Deps::from_env().database_url)
            .await
            .unwrap();
        Self {
            env,
            kafka,
            db,
            http: reqwest::Client::new(),
            client: format!("client-{}", Uuid::new_v4()),
            collection: format!("c{}", Uuid::new_v4().simple()),
            command_service,
            processor,
        }
    }

    /// This stack's variables, for a processor a test starts in this process.
    pub fn vars(&self) -> Vars {
        self.env
            .iter()
            .fold(test_vars(), |vars, (k, v)| vars.with(*k, v.clone()))
    }

    pub fn topic(&self, name: &str) -> String {
        self.kafka.topic(name)
    }

    /// POSTs a command (fresh idempotency key) and returns its id.
    pub async fn submit(&self, command: Value) -> Uuid {
        self.submit_traced(command, None).await
    }

    pub async fn submit_traced(&self, mut command: Value, traceparent: Option<&str>) -> Uuid {
        if command.get("collection").is_none() {
            command["collection"] = json!(self.collection);
        }
        let mut request = self
            .http
            .post(format!("{}/v1/commands", self.command_service.url()))
            .header("x-client-id", &self.client)
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(&command);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{body}");
        Uuid::parse_str(body["commandId"].as_str().unwrap()).unwrap()
    }

    /// `GET /v1/commands/{id}`.
    pub async fn status(&self, id: Uuid) -> Value {
        let response = self
            .http
            .get(format!("{}/v1/commands/{id}", self.command_service.url()))
            .header("x-client-id", &self.client)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.unwrap()
    }

    /// Waits until the command is `succeeded`, `failed` or `dead_lettered`; returns its status.
    pub async fn final_status(&self, id: Uuid) -> Value {
        let db = self.db.clone();
        wait_until(
            &format!("command {id} to reach a final status"),
            Duration::from_secs(30),
            || {
                let db = db.clone();
                async move {
                    let status: Option<String> =
                        sqlx::query_scalar("SELECT status FROM commands WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&db)
                            .await
                            .unwrap();
                    status.is_some_and(|s| !matches!(s.as_str(), "accepted" | "processing"))
                }
            },
        )
        .await;
        self.status(id).await
    }

    /// `GET /v1/documents/{collection}/{id}`: status, ETag and body.
    pub async fn document(&self, id: &str) -> (u16, Option<String>, Value) {
        let response = self
            .http
            .get(format!(
                "{}/v1/documents/{}/{id}",
                self.command_service.url(),
                self.collection
            ))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let etag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, etag, response.json().await.unwrap_or(Value::Null))
    }

    /// A consumer of `topic` from its beginning.
    pub fn reader(&self, topic: &str) -> StreamConsumer {
        let consumer =
            kafka::consumer(&self.kafka, "it-reader", &format!("it-{}", Uuid::new_v4())).unwrap();
        consumer.subscribe(&[&self.topic(topic)]).unwrap();
        consumer
    }

    /// Stops everything, waits until no outbox row targets this stack's topics, deletes them.
    pub async fn stop(mut self) {
        let topics = topics(&self.kafka);
        for table in ["outbox", "processor_outbox"] {
            let db = self.db.clone();
            let topics = topics.clone();
            wait_until(
                &format!("this test's {table} rows to be relayed"),
                Duration::from_secs(30),
                || {
                    let (db, topics) = (db.clone(), topics.clone());
                    async move {
                        let left: i64 = sqlx::query_scalar(&format!(
                            "SELECT count(*) FROM {table} WHERE topic = ANY($1)"
                        ))
                        .bind(&topics)
                        .fetch_one(&db)
                        .await
                        .unwrap();
                        left == 0
                    }
                },
            )
            .await;
        }
        if let Some(processor) = self.processor.take() {
            processor.stop().await;
        }
        self.command_service.terminate().await;
        let admin = kafka::admin(&self.kafka, "it-admin").unwrap();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = admin
            .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
            .await;
    }
}

fn topics(kafka: &KafkaConfig) -> Vec<String> {
    [
        kafka::TOPIC_COMMANDS,
        kafka::TOPIC_EVENTS,
        kafka::TOPIC_COMMANDS_DLQ,
    ]
    .map(|t| kafka.topic(t))
    .to_vec()
}

/// A header's value as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

/// Reads `consumer` until `done` holds for what was read (or panics after `timeout`).
pub async fn read_until(
    consumer: &StreamConsumer,
    timeout: Duration,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let mut read = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&read) {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out after {timeout:?}; read {} messages", read.len()))
            .unwrap();
        read.push(message.detach());
    }
    read
}

/// The JSON payload of a message.
pub fn payload(message: &OwnedMessage) -> Value {
    serde_json::from_slice(message.payload().unwrap()).unwrap()
}
