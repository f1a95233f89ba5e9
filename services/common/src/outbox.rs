//! The transactional outbox: a message is written with [`enqueue`] in the same transaction
//! as the state change it announces, and a [`Relay`] publishes it to Kafka afterwards and
//! deletes it once the broker acknowledged it. The relay is generic over the outbox table
//! ([`OutboxTable`]: any table shaped like `outbox` in the stack's migrations), so the command
//! service and the processor run the same code.
//!
//! # Design
//!
//! **Gap safety.** The relay keeps no cursor. Every batch reads the *oldest remaining* rows
//! (`ORDER BY id LIMIT n`), and a row leaves the table only when Kafka acknowledged it. A
//! transaction that took id 5 and commits after ids 6..=9 were relayed and deleted simply makes
//! row 5 visible to the next batch — nothing can be skipped, because visibility, not an id
//! watermark, decides what is read. (A cursor over identity ids would skip row 5: ids are
//! assigned at insert time, not commit time.)
//!
//! **Per-key order with several relay instances.** Exactly one relay per table is active: the
//! one holding a session-level PostgreSQL advisory lock on `meridian.outbox.<table>`. The lock
//! is held by the same dedicated connection that reads and deletes the batches, so a leader
//! that lost its connection also lost the lock and cannot delete anything afterwards; standbys
//! retry the lock every poll interval and take over within one interval of a leader's
//! shutdown or crash (PostgreSQL releases the lock when the session ends). We chose leadership
//! over per-row locking (`FOR UPDATE SKIP LOCKED`) because row locking alone lets a second
//! relay publish a later row of a key while the first still holds an earlier one; preventing
//! that needs per-key exclusion, which limits a hot key to one row per batch. One leader
//! publishing in id order through one idempotent producer (`acks=all`, ordered per partition
//! across retries) keeps each key's order with full batching; throughput scales with the batch
//! size, not the number of relays. The standbys are for availability.
//!
//! **Delivery.** At least once. Acknowledged rows are deleted by the statement that reads the
//! next batch (a data-modifying `WITH`; the read leaves them out; small batches only, see
//! [`FOLD_DELETES_UP_TO`]), or by a `DELETE` of their own once no read came for
//! [`DELETE_ACKED_AFTER`]: one round trip per batch instead of two at moderate rates. A
//! leader that dies after Kafka acknowledged a batch but before the delete commits has its
//! successor publish those rows again (consumers deduplicate by
//! `command-id`); so does a database crash that loses the relay's latest deletes (they commit
//! asynchronously: they need no WAL flush, and only ever lose a suffix, so order holds). Rows
//! whose delivery fails stay and are retried; a failed row can be overtaken by a later row of
//! the same key that was acknowledged in the same batch, which librdkafka's idempotent
//! producer only allows after `message.timeout.ms` elapsed.
//!
//! **Missing topics.** Rows whose topic does not exist (deleted, or not created yet) stay in
//! the table and are left out of the batches for a while ([`TOPIC_QUARANTINE`]), so they
//! neither block nor slow down other topics; they are published once the topic exists.
//! `outbox_backlog` keeps counting them.
//!
//! **Wake-ups.** After a transaction that enqueued rows commits, the writer calls
//! [`Waker::wake`]: a relay in the same process is woken at once, and — unless that relay is
//! the table's leader, when no other relay has anything to do — the waker's task sends
//! `NOTIFY <table>` for the leader in another process, which `LISTEN`s on that channel. Every
//! relay also polls every `poll_interval`, so a lost notification (or a listener reconnect, or
//! the moment a leader elsewhere takes over from this process's) delays a message by at most
//! one interval. The `NOTIFY` is deliberately *not* part of the writing transaction (no
//! trigger): PostgreSQL serialises the commits of all transactions that notified (a
//! database-wide lock held from pre-commit until the commit record is flushed), which would cap
//! intake at one WAL flush at a time. The waker sends at most one `NOTIFY` at a time, as one
//! statement in a transaction of its own with `synchronous_commit = off`, and folds every
//! wake-up that arrives meanwhile into the next one. Skipping it while this process leads
//! matters under load: one `NOTIFY` per commit was a fifth of the statements the whole
//! pipeline sent to PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::global;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use tokio::sync::Notify;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

use crate::kafka::{HEADER_COMMAND_ID, HEADER_CONTENT_TYPE, HEADER_MESSAGE_TYPE};
use crate::metrics::{
    OUTBOX_BACKLOG, OUTBOX_RELAY_BATCH_DURATION_SECONDS, OUTBOX_RELAY_FAILURES_TOTAL,
    OUTBOX_RELAYED_TOTAL,
};
use crate::shutdown::CancellationToken;

/// The W3C `traceparent` header.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const HEADER_TRACESTATE: &str = "tracestate";

/// The name of an outbox table, checked to be a plain SQL identifier (it is interpolated into
/// statements and used as the `LISTEN` channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxTable(&'static str);

/// A table name that is not a lowercase SQL identifier.
#[derive(Debug, thiserror::Error)]
#[error("invalid outbox table name {0:?}: use lowercase letters, digits and underscores")]
pub struct InvalidTableName(pub String);

impl OutboxTable {
    /// The `outbox` table of the stack's migrations.
    pub const DEFAULT: Self = Self("outbox");

    /// Checks `name` (`[a-z_][a-z0-9_]*`, at most 63 bytes).
    pub fn new(name: &'static str) -> Result<Self, InvalidTableName> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Self(name))
        } else {
            Err(InvalidTableName(name.to_owned()))
        }
    }

    /// The table's name.
    pub fn name(self) -> &'static str {
        self.0
    }
}

/// The W3C trace context of the request that produced a message, stored with the row so the
/// relay can forward it to Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`, when the current span has a valid context.
    pub traceparent: Option<String>,
    /// `tracestate`, when non-empty.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of the current `tracing` span (through the global W3C propagator).
    pub fn current() -> Self {
        Self::of(&tracing::Span::current().context())
    }

    /// The context of the current span or, when that has none (spans filtered out by
    /// `RUST_LOG`), the caller's context from the request `headers`, so the trace still
    /// reaches Kafka.
    pub fn current_or_from_http(headers: &http::HeaderMap) -> Self {
        let current = Self::current();
        if current.traceparent.is_some() {
            current
        } else {
            Self::of(&crate::telemetry::extract_http(headers))
        }
    }

    /// The W3C fields of `cx`.
    pub fn of(cx: &opentelemetry::Context) -> Self {
        let mut fields: HashMap<String, String> = HashMap::new();
        global::get_text_map_propagator(|p| p.inject_context(cx, &mut fields));
        Self {
            traceparent: fields.remove(HEADER_TRACEPARENT).filter(|v| !v.is_empty()),
            tracestate: fields.remove(HEADER_TRACESTATE).filter(|v| !v.is_empty()),
        }
    }
}

/// A message to write to the outbox.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    /// Full topic name (with the stack's `KAFKA_TOPIC_PREFIX`).
    pub topic: &'a str,
    /// Kafka key: `collection/id`.
    pub key: &'a str,
    /// `message-type` header (`command.create`, …).
    pub message_type: &'a str,
    /// `command-id` header.
    pub command_id: Option<Uuid>,
    /// The envelope (sent as JSON).
    pub payload: &'a serde_json::Value,
    /// Trace context to forward.
    pub trace: &'a TraceContext,
}

/// Writes `message` to `table` on `conn` — call it inside the transaction that makes the
/// change the message announces. Returns the row's id.
pub async fn enqueue(
    conn: &mut PgConnection,
    table: OutboxTable,
    message: &NewMessage<'_>,
) -> Result<i64, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {} (topic, message_key, message_type, command_id, payload, traceparent, tracestate) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        table.name()
    );
    sqlx::query_scalar(&sql)
        .bind(message.topic)
        .bind(message.key)
        .bind(message.message_type)
        .bind(message.command_id)
        .bind(sqlx::types::Json(message.payload))
        .bind(message.trace.traceparent.as_deref())
        .bind(message.trace.tracestate.as_deref())
        .fetch_one(conn)
        .await
}

/// Wakes the relays of one outbox table after a commit that enqueued rows (see the module
/// docs, "Wake-ups"). Cheap to clone; [`Waker::run`] must be running for relays in other
/// processes to hear of the rows before their next poll.
#[derive(Clone)]
pub struct Waker(Arc<WakerShared>);

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Waker").field(&self.0.table).finish()
    }
}

struct WakerShared {
    table: OutboxTable,
    /// Wakes a relay of this process (one stored permit: wake-ups coalesce).
    local: Notify,
    /// Asks the task to send a `NOTIFY` (one stored permit: wake-ups coalesce).
    remote: Notify,
    /// Whether the relay of this process woken by this waker leads the table (then a
    /// `NOTIFY` would only reach standbys, which have nothing to do).
    leading: AtomicBool,
}

impl Waker {
    /// A waker for `table`.
    pub fn new(table: OutboxTable) -> Self {
        Self(Arc::new(WakerShared {
            table,
            local: Notify::new(),
            remote: Notify::new(),
            leading: AtomicBool::new(false),
        }))
    }

    /// The table this waker is for.
    pub fn table(&self) -> OutboxTable {
        self.0.table
    }

    /// Call after the transaction that enqueued rows committed. Never blocks.
    pub fn wake(&self) {
        self.0.local.notify_one();
        if !self.0.leading.load(Ordering::Acquire) {
            self.0.remote.notify_one();
        }
    }

    /// Sends one `NOTIFY <table>` per burst of wake-ups until `shutdown` fires. A failed
    /// `NOTIFY` is logged at debug level and otherwise ignored: the relays' poll covers it.
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) {
        let table = self.0.table.name();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.0.remote.notified() => {
                    if let Err(error) = notify(&pool, table).await {
                        tracing::debug!(%error, table, "Failed to notify the outbox relays; they will poll.");
                    }
                }
            }
        }
    }
}

/// `NOTIFY <table>` in a transaction of its own that does not wait for its WAL flush (losing
/// a notification in a crash is harmless: relays poll). One statement, so one round trip: the
/// implicit transaction's commit sees the transaction-local `synchronous_commit`.
async fn notify(pool: &PgPool, table: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')")
        .bind(table)
        .execute(pool)
        .await
        .map(drop)
}

/// Marks this process's relay as the leader for as long as it lives (see [`Waker::wake`]).
struct Leading<'a>(Option<&'a Waker>);

impl<'a> Leading<'a> {
    fn start(waker: Option<&'a Waker>) -> Self {
        if let Some(waker) = waker {
            waker.0.leading.store(true, Ordering::Release);
        }
        Self(waker)
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if let Some(waker) = self.0 {
            waker.0.leading.store(false, Ordering::Release);
        }
    }
}

/// Writes `messages` to `table` in one statement, in order (their ids ascend in slice order,
/// so per-key order follows it) — call it inside the transaction that makes the changes.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    table: OutboxTable,
    messages: &[NewMessage<'_>],
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    bind_many(sqlx::query(&insert_many_sql(table, 1)), messages)
        .execute(conn)
        .await?;
    Ok(())
}

/// The `INSERT` that [`enqueue_many`] runs, with its seven array parameters numbered from
/// `$first`, for a writer that makes it part of a larger statement (a data-modifying `WITH`
/// clause); bind them with [`bind_many`]. Rows are inserted in the arrays' order.
pub fn insert_many_sql(table: OutboxTable, first: usize) -> String {
    insert_many_sql_where(table, first, "true")
}

/// [`insert_many_sql`] inserting only the messages for which `condition` (an SQL boolean
/// expression over the columns `topic`, `message_key`, `message_type`, `command_id`,
/// `payload`, `traceparent` and `tracestate`) holds: for a statement that decides in SQL
/// which of the messages it was given are to be sent.
pub fn insert_many_sql_where(table: OutboxTable, first: usize, condition: &str) -> String {
    let arrays: Vec<String> = ["text", "text", "text", "uuid", "jsonb", "text", "text"]
        .iter()
        .enumerate()
        .map(|(i, kind)| format!("${}::{kind}[]", first + i))
        .collect();
    format!(
        "INSERT INTO {} (topic, message_key, message_type, command_id, payload, traceparent, tracestate) \
         SELECT topic, message_key, message_type, command_id, payload, traceparent, tracestate \
         FROM unnest({}) \
         WITH ORDINALITY AS t(topic, message_key, message_type, command_id, payload, traceparent, tracestate, n) \
         WHERE {condition} ORDER BY n",
        table.name(),
        arrays.join(", ")
    )
}

/// Binds `messages` as the seven parameters of [`insert_many_sql`], next in `query`'s order.
pub fn bind_many<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    messages: &[NewMessage<'q>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let topics: Vec<&str> = messages.iter().map(|m| m.topic).collect();
    let keys: Vec<&str> = messages.iter().map(|m| m.key).collect();
    let types: Vec<&str> = messages.iter().map(|m| m.message_type).collect();
    let command_ids: Vec<Option<Uuid>> = messages.iter().map(|m| m.command_id).collect();
    let payloads: Vec<sqlx::types::Json<&serde_json::Value>> = messages
        .iter()
        .map(|m| sqlx::types::Json(m.payload))
        .collect();
    let parents: Vec<Option<&str>> = messages
        .iter()
        .map(|m| m.trace.traceparent.as_deref())
        .collect();
    let states: Vec<Option<&str>> = messages
        .iter()
        .map(|m| m.trace.tracestate.as_deref())
        .collect();
    query
        .bind(topics)
        .bind(keys)
        .bind(types)
        .bind(command_ids)
        .bind(payloads)
        .bind(parents)
        .bind(states)
}

/// How long acknowledged rows wait to be deleted by the next batch's read before a
/// statement of their own deletes them. Under load the next read comes within milliseconds
/// and deletes them in the same round trip; a relay that dies meanwhile has its successor
/// publish them again (at least once, as after any crash between acknowledgement and delete).
pub const DELETE_ACKED_AFTER: Duration = Duration::from_millis(20);

/// Acknowledged rows deleted by the next batch's read at most; more get a `DELETE` of their
/// own first. The read leaves the rows it deletes out by comparing each row it passes with
/// every one of them (`NOT (id = ANY($3))`: a parameter array is not hashed), which for full
/// batches of 500 cost more than the round trip saved (the relay phase of `just
/// bench-pipeline`, alternating: 43–57k against 52–83k rows/s). Under a latency-bound load
/// batches are a few rows, and those are the round trips worth saving.
pub const FOLD_DELETES_UP_TO: usize = 32;

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Service name for logs and metrics.
    pub service: &'static str,
    /// The table to relay.
    pub table: OutboxTable,
    /// Rows per batch.
    pub batch_size: u32,
    /// Fallback poll (and standby lock retry) interval.
    pub poll_interval: Duration,
}

/// The relay failed; it backs off, gives up leadership and starts over.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A database statement failed.
    #[error("failed to read or delete outbox rows: {0}")]
    Database(#[from] sqlx::Error),
    /// No row of a batch was acknowledged by Kafka.
    #[error("failed to publish any of {0} outbox rows")]
    Delivery(usize),
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    message_key: String,
    message_type: String,
    command_id: Option<Uuid>,
    payload: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Row {
    /// A producer span for this row when it carries a sampled trace: a child of the stored
    /// context, so the trace shows the hop through the outbox and Kafka. Rows without a
    /// sampled trace cost no span.
    fn publish_span(&self) -> Option<tracing::Span> {
        let parent = self
            .traceparent
            .as_deref()
            .and_then(crate::telemetry::sampled_context)?;
        let span = tracing::info_span!(
            "outbox.publish",
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.destination.name = %self.topic,
            message_type = %self.message_type,
            outbox_id = self.id,
        );
        crate::telemetry::set_parent(&span, parent);
        Some(span)
    }

    /// The Kafka headers; `traceparent` is that of `span` (the row's producer span) when there
    /// is one, else the stored one.
    fn headers(&self, span: Option<&tracing::Span>) -> OwnedHeaders {
        let command_id = self.command_id.map(|id| id.to_string());
        let traceparent = span
            .and_then(crate::telemetry::traceparent_of)
            .or_else(|| self.traceparent.clone());
        let optional = [
            (HEADER_TRACEPARENT, traceparent.as_deref()),
            (HEADER_TRACESTATE, self.tracestate.as_deref()),
            (HEADER_COMMAND_ID, command_id.as_deref()),
        ];
        let mut headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: HEADER_MESSAGE_TYPE,
                value: Some(self.message_type.as_str()),
            })
            .insert(Header {
                key: HEADER_CONTENT_TYPE,
                value: Some("application/json"),
            });
        for (key, value) in optional {
            if let Some(value) = value {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        headers
    }
}

/// Publishes an outbox table to Kafka (see the module docs for the guarantees).
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    settings: RelaySettings,
    waker: Option<Waker>,
    statements: Arc<Statements>,
}

/// A relay's statements on its table, written once.
struct Statements {
    /// `$1` batch size, `$2` quarantined topics, `$3` acknowledged ids to delete meanwhile.
    read_batch: String,
    /// `$1` acknowledged ids.
    delete_acked: String,
    backlog: String,
}

impl Statements {
    fn new(table: &str) -> Self {
        Self {
            read_batch: format!(
                "WITH deleted AS (DELETE FROM {table} WHERE id = ANY($3)) \
                 SELECT id, topic, message_key, message_type, command_id, payload::text AS payload, \
                 traceparent, tracestate FROM {table} \
                 WHERE NOT (topic = ANY($2)) AND NOT (id = ANY($3)) ORDER BY id LIMIT $1"
            ),
            delete_acked: format!("DELETE FROM {table} WHERE id = ANY($1)"),
            backlog: format!("SELECT count(*) FROM {table}"),
        }
    }
}

impl Relay {
    /// A relay of `settings.table` through `producer` (which must be idempotent; see
    /// [`crate::kafka::producer`]).
    pub fn new(pool: PgPool, producer: FutureProducer, settings: RelaySettings) -> Self {
        Self {
            statements: Arc::new(Statements::new(settings.table.name())),
            pool,
            producer,
            settings,
            waker: None,
        }
    }

    /// Also wakes up on `waker`, the one the writers of this process use, without waiting for
    /// the `NOTIFY` round trip through PostgreSQL; [`Relay::run`] then also runs the waker's
    /// `NOTIFY` task for relays in other processes.
    pub fn woken_by(mut self, waker: &Waker) -> Self {
        self.waker = Some(waker.clone());
        self
    }

    /// Runs until `shutdown` fires: waits for leadership, then relays; on errors backs off
    /// (with the shared connect backoff) and starts over. With a waker ([`Relay::woken_by`]),
    /// its `NOTIFY` task runs alongside, leader or not.
    pub async fn run(self, shutdown: CancellationToken) {
        let notifier = async {
            if let Some(waker) = &self.waker {
                waker.clone().run(self.pool.clone(), shutdown.clone()).await;
            }
        };
        tokio::join!(self.relay(&shutdown), notifier);
    }

    async fn relay(&self, shutdown: &CancellationToken) {
        let (service, table) = (self.settings.service, self.settings.table.name());
        let mut failures = 0u32;
        loop {
            match self.lead(shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(100)
                        .saturating_mul(2u32.saturating_pow(failures.min(6)))
                        .min(Duration::from_secs(5));
                    tracing::warn!(%error, service, table, retry_in_ms = delay.as_millis() as u64, "Outbox relay failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        tracing::info!(service, table, "Outbox relay stopped.");
    }

    /// Becomes the leader, then relays until shutdown (`Ok`) or an error.
    async fn lead(&self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let (service, table) = (self.settings.service, self.settings.table.name());
        // A connection of our own (detached from the pool) holds the session lock; closing it
        // is what releases leadership, so it must never return to the pool.
        let mut conn = self.pool.acquire().await?.detach();
        let lock = format!("meridian.outbox.{table}");
        loop {
            let leader: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(&lock)
                    .fetch_one(&mut conn)
                    .await?;
            if leader {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
        tracing::info!(service, table, "Outbox relay is the leader.");
        // Until this returns (shutdown, or an error that gave up the lock with the connection).
        let _leading = Leading::start(self.waker.as_ref());
        // An outbox is a queue: rows come and go thousands of times a second, so its
        // statistics are always stale and the planner, believing the table nearly empty,
        // would read the batch by scanning every (mostly dead) page and sorting, and delete
        // the acknowledged rows the same way: tens of milliseconds per statement once the
        // table has churned. Both statements want the primary key; this session only runs
        // them. Its deletes need no WAL flush either: asynchronous commit can only lose the
        // latest commits, so after a database crash the last acknowledged rows come back and
        // are sent again, in their order — the at-least-once delivery consumers already
        // handle (a relay crash between acknowledgement and delete does the same).
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut conn)
            .await?;
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut conn)
            .await?;

        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(table).await?;
        let mut quarantine = Quarantine::default();
        let mut backlog_measured: Option<Instant> = None;
        // Acknowledged by Kafka, not deleted yet (see `relay_batch`).
        let mut acked: Vec<i64> = Vec::new();
        loop {
            // Drain: full batches mean there is probably more.
            loop {
                let relayed = self
                    .relay_batch(&mut conn, &mut quarantine, &mut acked)
                    .await?;
                if relayed < self.settings.batch_size as usize || shutdown.is_cancelled() {
                    break;
                }
            }
            // The backlog gauge (a full count, less the rows about to be deleted) at most once
            // per poll interval, not per drain.
            if backlog_measured.is_none_or(|at| at.elapsed() >= self.settings.poll_interval) {
                let backlog: i64 = sqlx::query_scalar(&self.statements.backlog)
                    .fetch_one(&mut conn)
                    .await?;
                let backlog = backlog.saturating_sub(acked.len() as i64).max(0);
                metrics::gauge!(OUTBOX_BACKLOG, "service" => service, "table" => table)
                    .set(backlog as f64);
                backlog_measured = Some(Instant::now());
            }
            let poll = tokio::time::sleep(self.settings.poll_interval);
            tokio::pin!(poll);
            let delete_after = tokio::time::sleep(DELETE_ACKED_AFTER);
            tokio::pin!(delete_after);
            loop {
                let local = async {
                    match &self.waker {
                        Some(waker) => waker.0.local.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => {
                        self.delete_acked(&mut conn, &mut acked).await?;
                        return Ok(());
                    }
                    notification = listener.recv() => {
                        notification?;
                        // One drain serves every notification already received.
                        while listener.next_buffered().is_some() {}
                        break;
                    }
                    () = local => break,
                    () = &mut poll => break,
                    () = &mut delete_after, if !acked.is_empty() => {
                        self.delete_acked(&mut conn, &mut acked).await?;
                    }
                }
            }
        }
    }

    /// Deletes the rows of `acked` (acknowledged by Kafka) now, when no batch read is coming
    /// to do it (see [`Self::relay_batch`]).
    async fn delete_acked(
        &self,
        conn: &mut PgConnection,
        acked: &mut Vec<i64>,
    ) -> Result<(), RelayError> {
        if !acked.is_empty() {
            sqlx::query(&self.statements.delete_acked)
                .bind(&*acked)
                .execute(&mut *conn)
                .await?;
            acked.clear();
        }
        Ok(())
    }

    /// Publishes the oldest rows; returns how many rows were read. The rows Kafka
    /// acknowledged are added to `acked` and deleted by the statement that reads the next
    /// batch (one round trip for both; that read leaves them out, as its snapshot still shows
    /// them; up to [`FOLD_DELETES_UP_TO`] rows) or, if none comes within
    /// [`DELETE_ACKED_AFTER`], by [`Self::delete_acked`].
    async fn relay_batch(
        &self,
        conn: &mut PgConnection,
        quarantine: &mut Quarantine,
        acked: &mut Vec<i64>,
    ) -> Result<usize, RelayError> {
        let (service, table) = (self.settings.service, self.settings.table.name());
        let started = Instant::now();
        if acked.len() > FOLD_DELETES_UP_TO {
            self.delete_acked(conn, acked).await?;
        }
        let rows: Vec<Row> = sqlx::query_as(&self.statements.read_batch)
            .bind(i64::from(self.settings.batch_size))
            .bind(quarantine.topics())
            .bind(&*acked)
            .fetch_all(&mut *conn)
            .await?;
        acked.clear();
        if rows.is_empty() {
            return Ok(0);
        }
        let read = rows.len();
        // Rows of topics that do not exist are left out before anything is sent: librdkafka
        // would otherwise hold the whole batch until its metadata wait times out.
        let mut missing = self.missing_topics(&rows, quarantine).await;
        let sendable: Vec<&Row> = rows
            .iter()
            .filter(|r| !missing.contains(&r.topic))
            .collect();
        let span = tracing::debug_span!("outbox.relay_batch", table, rows = sendable.len());
        let (delivered, failed, missing_on_send) = self.publish(&sendable).instrument(span).await;
        for topic in missing_on_send {
            if !missing.contains(&topic) {
                missing.push(topic);
            }
        }
        for topic in &missing {
            let waiting = rows.iter().filter(|r| &r.topic == topic).count();
            tracing::warn!(
                service,
                table,
                topic,
                waiting,
                retry_in_s = TOPIC_QUARANTINE.as_secs(),
                "Topic does not exist; its outbox rows stay and are retried later without holding up other topics."
            );
            quarantine.add(topic.clone());
        }
        metrics::counter!(OUTBOX_RELAYED_TOTAL, "service" => service, "table" => table)
            .increment(delivered.len() as u64);
        if failed > 0 {
            metrics::counter!(OUTBOX_RELAY_FAILURES_TOTAL, "service" => service, "table" => table)
                .increment(failed as u64);
        }
        metrics::histogram!(OUTBOX_RELAY_BATCH_DURATION_SECONDS, "service" => service, "table" => table)
            .record(started.elapsed().as_secs_f64());
        // Rows of a missing topic are not a relay failure (they wait in quarantine); anything
        // else that made a whole batch fail is, and restarts the relay with back-off.
        if delivered.is_empty() && missing.is_empty() {
            return Err(RelayError::Delivery(read));
        }
        acked.extend(delivered);
        Ok(read)
    }

    /// The topics of `rows` that Kafka reports as not existing (checked by a metadata request
    /// unless seen to exist within [`TOPIC_VERIFIED_FOR`]). A topic whose check fails for
    /// another reason (broker unreachable) is not reported: publishing will tell.
    async fn missing_topics(&self, rows: &[Row], topics: &mut Quarantine) -> Vec<String> {
        topics.expire_verified();
        let mut unverified: Vec<String> = rows
            .iter()
            .map(|r| &r.topic)
            .filter(|t| !topics.is_verified(t))
            .cloned()
            .collect();
        unverified.sort();
        unverified.dedup();
        let mut missing = Vec::new();
        for topic in unverified {
            let producer = self.producer.clone();
            let name = topic.clone();
            let exists = tokio::task::spawn_blocking(move || {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                    .ok()?;
                let found = metadata.topics().iter().find(|t| t.name() == name);
                Some(found.is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()))
            })
            .await
            .ok()
            .flatten();
            match exists {
                Some(true) => topics.verified(topic),
                Some(false) => missing.push(topic),
                None => {}
            }
        }
        missing
    }

    /// Enqueues every row in id order (so each partition receives them in order), then
    /// awaits the acknowledgements. Returns the acknowledged ids, the number of failures and
    /// the topics that turned out not to exist.
    async fn publish(&self, rows: &[&Row]) -> (Vec<i64>, usize, Vec<String>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut failed = 0;
        let mut missing: Vec<String> = Vec::new();
        let mut note_missing = |error: &KafkaError, topic: &str| {
            if is_missing_topic(error) && !missing.iter().any(|t| t == topic) {
                missing.push(topic.to_owned());
            }
        };
        for row in rows {
            let span = row.publish_span();
            let mut record = FutureRecord::to(&row.topic)
                .key(&row.message_key)
                .payload(&row.payload)
                .headers(row.headers(span.as_ref()));
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        // The span ends when Kafka acknowledged the message.
                        pending.push((row.id, row.topic.as_str(), delivery, span));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        tracing::warn!(%error, id = row.id, topic = row.topic, "Failed to enqueue an outbox message.");
                        note_missing(&error, &row.topic);
                        failed += 1;
                        break;
                    }
                }
            }
        }
        let mut acked = Vec::with_capacity(pending.len());
        for (id, topic, delivery, span) in pending {
            match delivery
                .instrument(span.unwrap_or_else(tracing::Span::none))
                .await
            {
                Ok(Ok(_)) => acked.push(id),
                Ok(Err((error, _))) => {
                    tracing::warn!(%error, id, topic, "Kafka did not acknowledge an outbox message.");
                    note_missing(&error, topic);
                    failed += 1;
                }
                Err(_) => failed += 1,
            }
        }
        (acked, failed, missing)
    }
}

/// How long the rows of a topic that does not exist are left out of the batches.
const TOPIC_QUARANTINE: Duration = Duration::from_secs(30);
/// How long a topic seen to exist is trusted without another metadata request.
const TOPIC_VERIFIED_FOR: Duration = Duration::from_secs(60);
/// Bound of one topic metadata request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Topics found missing, with when they may be tried again. Without this, rows of a deleted
/// (or not yet created) topic — the oldest rows, so the head of every batch — would make each
/// batch wait for librdkafka's metadata timeout and slow every other topic down. Leaving them
/// out keeps per-key order: every row of such a topic is left out, and no other topic's rows
/// are involved.
/// Topics recently seen to exist are remembered too, so the check before a batch costs a
/// metadata request only for new topics (and once a minute).
#[derive(Default)]
struct Quarantine {
    missing: HashMap<String, Instant>,
    verified: HashMap<String, Instant>,
}

impl Quarantine {
    fn add(&mut self, topic: String) {
        self.verified.remove(&topic);
        self.missing
            .insert(topic, Instant::now() + TOPIC_QUARANTINE);
    }

    /// The topics still quarantined (expired entries are dropped).
    fn topics(&mut self) -> Vec<String> {
        let now = Instant::now();
        self.missing.retain(|_, until| *until > now);
        self.missing.keys().cloned().collect()
    }

    fn verified(&mut self, topic: String) {
        self.verified
            .insert(topic, Instant::now() + TOPIC_VERIFIED_FOR);
    }

    /// Forgets verifications older than [`TOPIC_VERIFIED_FOR`] (once per batch, not per row).
    fn expire_verified(&mut self) {
        let now = Instant::now();
        self.verified.retain(|_, until| *until > now);
    }

    fn is_verified(&self, topic: &str) -> bool {
        self.verified.contains_key(topic)
    }
}

fn is_missing_topic(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_insert_numbers_its_seven_parameters_from_the_one_given() {
        let sql = insert_many_sql(OutboxTable::DEFAULT, 17);
        assert!(sql.starts_with("INSERT INTO outbox "));
        let numbered: Vec<usize> = (1..30)
            .filter(|i| sql.contains(&format!("${i}:")))
            .collect();
        assert_eq!(numbered, (17..=23).collect::<Vec<_>>());
        assert!(sql.ends_with("ORDER BY n"));
    }

    #[test]
    fn missing_topics_are_recognised_and_quarantined_for_a_while() {
        assert!(is_missing_topic(&KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        assert!(is_missing_topic(&KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopic
        )));
        assert!(!is_missing_topic(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
        )));
        let mut quarantine = Quarantine::default();
        assert!(quarantine.topics().is_empty());
        quarantine.verified("gone.events".to_owned());
        assert!(quarantine.is_verified("gone.events"));
        quarantine.add("gone.events".to_owned());
        assert_eq!(quarantine.topics(), vec!["gone.events".to_owned()]);
        assert!(!quarantine.is_verified("gone.events"));
    }

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(OutboxTable::new("outbox").is_ok());
        assert!(OutboxTable::new("outbox_test_42").is_ok());
        for bad in [
            "",
            "1outbox",
            "Outbox",
            "outbox; DROP TABLE x",
            "out-box",
            "a.b",
        ] {
            assert!(OutboxTable::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn headers_carry_type_content_type_command_id_and_trace_context() {
        use rdkafka::message::Headers as _;
        let id = Uuid::now_v7();
        let row = Row {
            id: 1,
            topic: "commands".into(),
            message_key: "books/1".into(),
            message_type: "command.create".into(),
            command_id: Some(id),
            payload: "{}".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        };
        let headers = row.headers(None);
        let found: HashMap<&str, &[u8]> = headers
            .iter()
            .map(|h| (h.key, h.value.unwrap_or_default()))
            .collect();
        assert_eq!(found[HEADER_MESSAGE_TYPE], b"command.create");
        assert_eq!(found[HEADER_CONTENT_TYPE], b"application/json");
        assert_eq!(found[HEADER_COMMAND_ID], id.to_string().as_bytes());
        assert_eq!(
            found[HEADER_TRACEPARENT],
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert!(!found.contains_key(HEADER_TRACESTATE));
    }
}
