//! One `commands` message from receipt to a final outcome: parse, decide, apply, retry,
//! dead-letter.
//!
//! # Errors and retries
//! - **Rejections** (`version_conflict`, `already_exists`, `not_found`, a webhook's 4xx) end
//!   the command `failed` with the reason; no retry.
//! - **Transient errors** (a webhook's 5xx, timeout or refused connection; a database error
//!   that is not an outage) are retried with exponential backoff and jitter
//!   (`PROCESSOR_BACKOFF_BASE_MS` doubling up to `PROCESSOR_BACKOFF_MAX_MS`); after
//!   `PROCESSOR_MAX_ATTEMPTS` attempts the message is dead-lettered.
//! - **Database outages** (connection refused or lost, pool timeout, `57P0x`, …) are retried
//!   with the shared connect backoff *without* a limit and do not use up attempts: an outage
//!   is not the command's fault, and the command's status could not be written anyway. The
//!   partition waits; the others do too once they reach the database.
//! - **Unusable input** (a message that is not a command envelope, a command type without a
//!   handler, a malformed webhook reply) is dead-lettered at once.
//!
//! Dead-lettering copies the original message (key, payload, headers) to `commands.dlq` with
//! `dlq-*` headers saying why, waits for Kafka's acknowledgement, then marks the command
//! `dead_lettered` (when it has a row). Only then is the offset stored. A crash in between
//! produces a second DLQ copy on redelivery, never a lost message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use common::envelope::CommandEnvelope;
use common::kafka::HEADER_COMMAND_ID;
use common::metrics::{
    COMMAND_HANDLER_DURATION_SECONDS, COMMAND_RETRIES_TOTAL, COMMANDS_DEAD_LETTERED_TOTAL,
    COMMANDS_PROCESSED_TOTAL, PROCESSOR_BATCH_SIZE,
};
use common::outbox::TraceContext;
use common::postgres::HeldConnection;
use common::shutdown::CancellationToken;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::NAME;
use crate::apply::{ApplyError, Committed, Store, is_unavailable};
use crate::batch::{self, Decision};
use crate::handler::{HandlerError, Handlers, Invocation, REASON_VERSION_CONFLICT};

/// Dead-letter reason: the message is not a command envelope.
pub const DLQ_UNPARSEABLE: &str = "unparseable";
/// Dead-letter reason: no handler is registered for the command's type.
pub const DLQ_NO_HANDLER: &str = "no_handler";
/// Dead-letter reason: the handler answered something unusable.
pub const DLQ_HANDLER_ERROR: &str = "handler_error";
/// Dead-letter reason: transient errors persisted through every attempt.
pub const DLQ_MAX_ATTEMPTS: &str = "max_attempts_exceeded";

/// DLQ header: why the message was dead-lettered (one of the `DLQ_*` reasons).
pub const HEADER_DLQ_REASON: &str = "dlq-reason";
/// DLQ header: the last error's text.
pub const HEADER_DLQ_ERROR: &str = "dlq-error";
/// DLQ header: how many attempts were made.
pub const HEADER_DLQ_ATTEMPTS: &str = "dlq-attempts";
/// DLQ header: `topic/partition/offset` of the original message.
pub const HEADER_DLQ_SOURCE: &str = "dlq-source";
/// DLQ header: when it was dead-lettered (RFC 3339).
pub const HEADER_DLQ_AT: &str = "dlq-at";

/// Retry and dead-letter settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Full name of the dead-letter topic.
    pub dlq_topic: String,
    /// Attempts before a transiently failing command is dead-lettered (≥ 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub backoff_base: Duration,
    /// Longest delay between retries.
    pub backoff_max: Duration,
}

/// Decides and applies commands.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    handlers: Arc<Handlers>,
    producer: FutureProducer,
    settings: Arc<EngineSettings>,
}

/// How a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (`version`: the document's new version, `None` when nothing existed).
    Succeeded {
        /// The document's version after the command.
        version: Option<i64>,
    },
    /// Refused with a reason.
    Failed {
        /// The machine-readable reason.
        reason: String,
    },
    /// Already processed before (a redelivery); nothing was done.
    Duplicate,
    /// Copied to the dead-letter topic.
    DeadLettered {
        /// One of the `DLQ_*` reasons.
        reason: &'static str,
    },
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Self::Succeeded { .. } => "succeeded",
            Self::Failed { .. } => "failed",
            Self::Duplicate => "duplicate",
            Self::DeadLettered { .. } => "dead_lettered",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ProcessError {
    /// The database is unreachable: retried without limit.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// Worth retrying, within the attempt budget.
    #[error("{error}")]
    Transient { cause: &'static str, error: String },
    /// Retrying cannot help.
    #[error("{error}")]
    Permanent { reason: &'static str, error: String },
}

impl From<sqlx::Error> for ProcessError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            Self::Unavailable(error)
        } else {
            Self::Transient {
                cause: "database",
                error: error.to_string(),
            }
        }
    }
}

/// How often a command is decided again when its document keeps changing under it (only
/// possible while two consumers overlap during a rebalance) before that counts as a
/// transient failure.
const MAX_RACES: usize = 5;

impl Engine {
    /// An engine writing through `store`, dead-lettering through `producer`.
    pub fn new(
        store: Store,
        handlers: Handlers,
        producer: FutureProducer,
        settings: EngineSettings,
    ) -> Self {
        Self {
            store,
            handlers: Arc::new(handlers),
            producer,
            settings: Arc::new(settings),
        }
    }

    /// Processes consecutive messages of one partition in order, each to its final outcome;
    /// returns how many were (fewer than all only when `shutdown` interrupted, and then the
    /// rest must not have their offsets stored). Leading runs of commands with built-in
    /// handlers are decided and written together (see [`crate::batch`]); the others, and any
    /// run the batch path hands back, go one by one through [`Self::handle`].
    ///
    /// Batches are read and written on `conn` (the worker's, kept between batches).
    pub async fn handle_all(
        &self,
        messages: &[OwnedMessage],
        conn: &mut HeldConnection,
        shutdown: &CancellationToken,
    ) -> usize {
        let mut done = 0;
        while done < messages.len() {
            let rest = &messages[done..];
            let run = self.batchable_run(rest);
            if !run.is_empty() && self.handle_together(&rest[..run.len()], &run, conn).await {
                done += run.len();
                continue;
            }
            for message in &rest[..run.len().max(1)] {
                if self.handle(message, shutdown).await.is_none() {
                    return done;
                }
                done += 1;
            }
        }
        done
    }

    /// The commands of the leading messages that parse and have a built-in handler.
    fn batchable_run(&self, messages: &[OwnedMessage]) -> Vec<CommandEnvelope> {
        messages
            .iter()
            .map_while(|message| {
                let command: CommandEnvelope =
                    serde_json::from_slice(message.payload().unwrap_or_default()).ok()?;
                self.handlers
                    .get(&command.command_type)
                    .filter(|r| r.built_in)
                    .map(|_| command)
            })
            .collect()
    }

    /// Handles `commands` (parsed from `messages`) as one batch; false when nothing was
    /// written and they must go one by one.
    async fn handle_together(
        &self,
        messages: &[OwnedMessage],
        commands: &[CommandEnvelope],
        held: &mut HeldConnection,
    ) -> bool {
        let together = self.write_together(messages, commands, held).await;
        // Whatever went wrong, the connection may be the cause: the pool checks it.
        held.settle(together);
        together
    }

    /// [`Self::handle_together`] on `held`.
    async fn write_together(
        &self,
        messages: &[OwnedMessage],
        commands: &[CommandEnvelope],
        held: &mut HeldConnection,
    ) -> bool {
        let spans: Vec<tracing::Span> = messages.iter().map(command_span).collect();
        let traces: Vec<TraceContext> = spans
            .iter()
            .zip(messages)
            .map(|(span, message)| span.in_scope(|| trace_of(message)))
            .collect();
        for (span, command) in spans.iter().zip(commands) {
            span.record("command_id", tracing::field::display(command.command_id));
            span.record("command_type", command.command_type.as_str());
        }
        // One connection for the read and the write: two round trips for the whole run.
        let conn = match held.get().await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::debug!(%error, "No connection for the batch; handling the commands one by one.");
                return false;
            }
        };
        let reads = match self.store.snapshot_many(conn, commands).await {
            Ok(reads) => reads,
            Err(error) => {
                tracing::debug!(%error, "Batch read failed; handling the commands one by one.");
                return false;
            }
        };
        let planned = batch::plan(commands, reads, |index, current| {
            let command = &commands[index];
            let started = Instant::now();
            let decided = self.handlers.decide_now(Invocation {
                command,
                current,
                trace: &traces[index],
            });
            metrics::histogram!(COMMAND_HANDLER_DURATION_SECONDS, "service" => NAME, "type" => command.command_type.clone())
                .record(started.elapsed().as_secs_f64());
            decided
        });
        let plan = match planned {
            Ok(plan) => plan,
            Err(why) => {
                tracing::debug!(%why, "Handling the commands one by one.");
                return false;
            }
        };
        let committed = self.store.commit_plan(conn, commands, &plan, &traces).await;
        match committed {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(
                    "A document changed under the batch; handling the commands one by one."
                );
                return false;
            }
            Err(error) => {
                tracing::debug!(%error, "Batch write failed; handling the commands one by one.");
                return false;
            }
        }
        metrics::histogram!(PROCESSOR_BATCH_SIZE, "service" => NAME).record(commands.len() as f64);
        for ((span, command), decision) in spans.iter().zip(commands).zip(plan.decisions) {
            let outcome = match decision {
                Decision::Duplicate => Outcome::Duplicate,
                Decision::Failed { reason } => Outcome::Failed { reason },
                Decision::Unchanged { version } => Outcome::Succeeded { version },
                Decision::Applied { version, .. } => Outcome::Succeeded {
                    version: Some(version),
                },
            };
            span.record("outcome", outcome.label());
            metrics::counter!(COMMANDS_PROCESSED_TOTAL, "service" => NAME, "type" => command.command_type.clone(), "outcome" => outcome.label())
                .increment(1);
        }
        true
    }

    /// Processes one message to its final outcome. `None` means `shutdown` interrupted it:
    /// its offset must not be stored (it will be redelivered).
    pub async fn handle(
        &self,
        message: &OwnedMessage,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let span = command_span(message);
        let work = async {
            let trace = trace_of(message);
            let payload = message.payload().unwrap_or_default();
            let (outcome, kind) = match serde_json::from_slice::<CommandEnvelope>(payload) {
                Ok(command) => {
                    let span = tracing::Span::current();
                    span.record("command_id", tracing::field::display(command.command_id));
                    span.record("command_type", command.command_type.as_str());
                    let outcome = self.process(&command, &trace, message, shutdown).await?;
                    (outcome, command.command_type)
                }
                Err(error) => {
                    tracing::warn!(%error, "A commands message is not a command envelope; dead-lettering it.");
                    let command_id = header_command_id(message);
                    let error = error.to_string();
                    self.dead_letter(message, command_id, DLQ_UNPARSEABLE, &error, 1, shutdown)
                        .await?;
                    (
                        Outcome::DeadLettered {
                            reason: DLQ_UNPARSEABLE,
                        },
                        "unknown".to_owned(),
                    )
                }
            };
            tracing::Span::current().record("outcome", outcome.label());
            metrics::counter!(COMMANDS_PROCESSED_TOTAL, "service" => NAME, "type" => kind, "outcome" => outcome.label())
                .increment(1);
            Some(outcome)
        };
        work.instrument(span).await
    }

    async fn process(
        &self,
        command: &CommandEnvelope,
        trace: &TraceContext,
        message: &OwnedMessage,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let attempts = AtomicU32::new(0);
        let kind = command.command_type.clone();
        let handler_backoff = ExponentialBuilder::default()
            .with_min_delay(self.settings.backoff_base)
            .with_max_delay(self.settings.backoff_max)
            .with_jitter()
            .with_max_times(self.settings.max_attempts.saturating_sub(1) as usize);
        // Inner: transient errors, within the attempt budget. Outer: database outages,
        // without limit (a fresh inner budget after the database is back).
        let within_budget = || {
            (|| {
                let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                self.attempt(command, trace, attempt)
            })
            .retry(handler_backoff)
            .when(|e| matches!(e, ProcessError::Transient { .. }))
            .notify(|error, delay| {
                let cause = match error {
                    ProcessError::Transient { cause, .. } => *cause,
                    _ => "handler",
                };
                metrics::counter!(COMMAND_RETRIES_TOTAL, "service" => NAME, "type" => kind.clone(), "cause" => cause)
                    .increment(1);
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Command failed transiently; retrying.");
            })
        };
        let retried = within_budget
            .retry(common::retry::connect_backoff())
            .when(|e| matches!(e, ProcessError::Unavailable(_)))
            .notify(|error, delay| {
                metrics::counter!(COMMAND_RETRIES_TOTAL, "service" => NAME, "type" => kind.clone(), "cause" => "database")
                    .increment(1);
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Database unavailable; retrying the command.");
            });
        let result = tokio::select! {
            result = retried => result,
            () = shutdown.cancelled() => return None,
        };
        let (reason, error) = match result {
            Ok(outcome) => return Some(outcome),
            Err(ProcessError::Transient { error, .. }) => (DLQ_MAX_ATTEMPTS, error),
            Err(ProcessError::Permanent { reason, error }) => (reason, error),
            // The outer retry has no limit; only shutdown ends it (handled above).
            Err(ProcessError::Unavailable(error)) => (DLQ_MAX_ATTEMPTS, error.to_string()),
        };
        tracing::warn!(%error, reason, "Dead-lettering the command.");
        let attempts = attempts.load(Ordering::SeqCst);
        self.dead_letter(
            message,
            Some(command.command_id),
            reason,
            &error,
            attempts,
            shutdown,
        )
        .await?;
        Some(Outcome::DeadLettered { reason })
    }

    /// One attempt: read, decide, apply (deciding again if the document raced).
    async fn attempt(
        &self,
        command: &CommandEnvelope,
        trace: &TraceContext,
        attempt: u32,
    ) -> Result<Outcome, ProcessError> {
        for _ in 0..MAX_RACES {
            let snapshot = self.store.snapshot(command).await?;
            if snapshot.is_final() {
                return Ok(Outcome::Duplicate);
            }
            if let Some(expected) = command.expected_version
                && expected != snapshot.live_version()
            {
                return self.fail(command, REASON_VERSION_CONFLICT).await;
            }
            let Some(registered) = self.handlers.get(&command.command_type) else {
                return Err(ProcessError::Permanent {
                    reason: DLQ_NO_HANDLER,
                    error: format!("no handler for command type {:?}", command.command_type),
                });
            };
            if snapshot.status == "accepted" && (!registered.built_in || attempt > 1) {
                self.store.mark_processing(command.command_id).await?;
            }
            let started = Instant::now();
            let decided = registered
                .handler
                .handle(Invocation {
                    command,
                    current: snapshot.current(),
                    trace,
                })
                .await;
            metrics::histogram!(COMMAND_HANDLER_DURATION_SECONDS, "service" => NAME, "type" => command.command_type.clone())
                .record(started.elapsed().as_secs_f64());
            let change = match decided {
                Ok(change) => change,
                Err(HandlerError::Rejected { reason }) => return self.fail(command, &reason).await,
                Err(HandlerError::Transient(error)) => {
                    return Err(ProcessError::Transient {
                        cause: "handler",
                        error,
                    });
                }
                Err(HandlerError::Broken(error)) => {
                    return Err(ProcessError::Permanent {
                        reason: DLQ_HANDLER_ERROR,
                        error,
                    });
                }
            };
            match self
                .store
                .commit_change(command, &snapshot, change, trace)
                .await
            {
                Ok(Committed::Applied { version }) => {
                    return Ok(Outcome::Succeeded {
                        version: Some(version),
                    });
                }
                Ok(Committed::Unchanged) => {
                    return Ok(Outcome::Succeeded {
                        version: snapshot.current().map(|d| d.version),
                    });
                }
                Ok(Committed::Duplicate) => return Ok(Outcome::Duplicate),
                Err(ApplyError::Raced) => {
                    tracing::debug!("The document changed while deciding; deciding again.");
                }
                Err(ApplyError::Database(error)) => return Err(error.into()),
                Err(error @ (ApplyError::Encode(_) | ApplyError::NotAnObject(_))) => {
                    return Err(ProcessError::Permanent {
                        reason: DLQ_HANDLER_ERROR,
                        error: error.to_string(),
                    });
                }
            }
        }
        Err(ProcessError::Transient {
            cause: "database",
            error: "the document kept changing while the command was decided".into(),
        })
    }

    async fn fail(&self, command: &CommandEnvelope, reason: &str) -> Result<Outcome, ProcessError> {
        let ended = self
            .store
            .finish_unsuccessfully(command.command_id, "failed", reason)
            .await?;
        Ok(if ended {
            Outcome::Failed {
                reason: reason.to_owned(),
            }
        } else {
            Outcome::Duplicate
        })
    }

    /// Copies `message` to the DLQ and marks its command `dead_lettered`, retrying both
    /// until they succeed; `None` when `shutdown` interrupted.
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        command_id: Option<Uuid>,
        reason: &'static str,
        error: &str,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        let headers = dlq_headers(message, reason, error, attempts);
        let topic = &self.settings.dlq_topic;
        let produce = || async {
            let mut record = FutureRecord::to(topic)
                .payload(message.payload().unwrap_or_default())
                .headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            self.producer
                .send(record, rdkafka::util::Timeout::Never)
                .await
                .map(drop)
                .map_err(|(error, _)| error)
        };
        common::retry::until_connected(NAME, "kafka", shutdown, produce).await?;
        if let Some(command_id) = command_id {
            let mark = || async {
                self.store
                    .finish_unsuccessfully(command_id, "dead_lettered", reason)
                    .await
            };
            common::retry::until_connected(NAME, "postgres", shutdown, mark).await?;
        }
        metrics::counter!(COMMANDS_DEAD_LETTERED_TOTAL, "service" => NAME, "reason" => reason)
            .increment(1);
        Some(())
    }
}

/// The span of one command, continuing the trace in the message's headers.
fn command_span(message: &OwnedMessage) -> tracing::Span {
    let span = tracing::info_span!(
        "processor.command",
        otel.kind = "consumer",
        partition = message.partition(),
        offset = message.offset(),
        command_id = tracing::field::Empty,
        command_type = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    common::telemetry::set_parent_from_kafka(&span, message.headers());
    span
}

/// The trace context to forward (call it inside the command's span): the current span's
/// context (a child of the producer's); when spans are filtered out, the producer's context
/// itself, so the trace still continues downstream.
fn trace_of(message: &OwnedMessage) -> TraceContext {
    let trace = TraceContext::current();
    if trace.traceparent.is_some() {
        return trace;
    }
    TraceContext::of(&common::telemetry::extract_kafka(message.headers()))
}

/// The `command-id` header as a UUID, if present and valid.
fn header_command_id(message: &OwnedMessage) -> Option<Uuid> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == HEADER_COMMAND_ID)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| Uuid::parse_str(v).ok())
}

/// The original headers plus the `dlq-*` ones.
fn dlq_headers(message: &OwnedMessage, reason: &str, error: &str, attempts: u32) -> OwnedHeaders {
    let mut headers = message.headers().cloned().unwrap_or_default();
    // Errors can be long (a webhook body); Kafka headers need not carry all of it.
    let error: String = error.chars().take(1024).collect();
    let source = format!(
        "{}/{}/{}",
        message.topic(),
        message.partition(),
        message.offset()
    );
    let attempts = attempts.to_string();
    let at = crate::apply::rfc3339(Utc::now());
    for (key, value) in [
        (HEADER_DLQ_REASON, reason),
        (HEADER_DLQ_ERROR, error.as_str()),
        (HEADER_DLQ_ATTEMPTS, attempts.as_str()),
        (HEADER_DLQ_SOURCE, source.as_str()),
        (HEADER_DLQ_AT, at.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    #[test]
    fn dlq_headers_keep_the_original_ones_and_say_why() {
        let original = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        });
        let message = OwnedMessage::new(
            Some(b"{".to_vec()),
            Some(b"books/1".to_vec()),
            "p.commands".into(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(original),
        );
        let headers = dlq_headers(&message, DLQ_UNPARSEABLE, "EOF while parsing", 1);
        let found: std::collections::HashMap<&str, &[u8]> = headers
            .iter()
            .map(|h| (h.key, h.value.unwrap_or_default()))
            .collect();
        assert_eq!(
            found["traceparent"],
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(found[HEADER_DLQ_REASON], b"unparseable");
        assert_eq!(found[HEADER_DLQ_ERROR], b"EOF while parsing");
        assert_eq!(found[HEADER_DLQ_ATTEMPTS], b"1");
        assert_eq!(found[HEADER_DLQ_SOURCE], b"p.commands/2/41");
    }

    #[test]
    fn the_command_id_header_is_read_when_valid() {
        let id = Uuid::now_v7();
        let with = |value: &str| {
            OwnedMessage::new(
                None,
                None,
                "t".into(),
                Timestamp::NotAvailable,
                0,
                0,
                Some(OwnedHeaders::new().insert(Header {
                    key: HEADER_COMMAND_ID,
                    value: Some(value),
                })),
            )
        };
        assert_eq!(header_command_id(&with(&id.to_string())), Some(id));
        assert_eq!(header_command_id(&with("not-a-uuid")), None);
    }
}
