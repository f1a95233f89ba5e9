//! Group commit for `POST /v1/commands`.
//!
//! Handlers validate and prepare a [`Submission`] (command id, envelope, the exact `202` body)
//! and hand it to [`Intake::submit`]. A few writer tasks take whatever submissions are queued
//! — up to `COMMANDS_BATCH_MAX` — and write them in **one transaction** of four round trips
//! whatever the batch size: `BEGIN`; the idempotency locks; one statement that looks up the
//! live records and writes the commands without one, their idempotency records and their
//! outbox rows; the commit (one WAL flush). Every
//! submission gets its own answer. Nothing waits to fill a batch: a writer takes what is
//! queued when it becomes free, so an idle service writes batches of one with no added
//! latency, and a busy one writes larger batches instead of queueing behind one flush each.
//!
//! The idempotency rules are those of one request per transaction (see [`crate::commands`]):
//! - a transaction-scoped advisory lock on (client, key) marks a request in progress; a
//!   submission whose lock is taken by another transaction — or whose key already appears
//!   earlier in the same batch — answers 409;
//! - a live record with the same fingerprint is replayed byte for byte, one with another
//!   fingerprint answers 422; both write nothing.
//!
//! If a batch's transaction fails, each of its submissions is retried in a transaction of its
//! own, so one bad submission cannot fail the others, and each failure is its own error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::metrics::COMMANDS_BATCH_SIZE;
use common::outbox::{self, OutboxTable, TraceContext, Waker};
use common::shutdown::CancellationToken;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::Json;
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::NAME;
use crate::error::ApiError;

/// A validated command request, ready to be written.
#[derive(Debug)]
pub struct Submission {
    /// The caller (`X-Client-Id`).
    pub client: String,
    /// The `Idempotency-Key`.
    pub key: String,
    /// SHA-256 of the canonical request.
    pub fingerprint: Vec<u8>,
    /// The new command's id.
    pub command_id: Uuid,
    /// `create`, `replace`, … or a custom type.
    pub kind: String,
    /// The document's collection.
    pub collection: String,
    /// The document's id.
    pub document_id: String,
    /// Optimistic concurrency: the version the document must have.
    pub expected_version: Option<i64>,
    /// The command's payload.
    pub payload: Option<Value>,
    /// Acceptance time (microsecond precision, as stored).
    pub accepted_at: DateTime<Utc>,
    /// The Kafka message for `commands` (a `CommandEnvelope`).
    pub envelope: Value,
    /// The exact `202` body, stored for replays.
    pub body: Vec<u8>,
    /// `Location` of the `202`.
    pub location: String,
    /// The request's W3C trace context, for the Kafka headers.
    pub trace: TraceContext,
}

impl Submission {
    /// The advisory-lock name of (client, key) (the client's length keeps `a:b` + `c`
    /// distinct from `a` + `b:c`).
    fn lock_name(&self) -> String {
        format!("{}:{}:{}", self.client.len(), self.client, self.key)
    }
}

/// What became of a submission that did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written; answer `202` with the submission's body.
    Accepted,
    /// A live record with the same request exists: answer with it, byte for byte.
    Replay {
        /// The stored status.
        status: u16,
        /// The stored `Location`.
        location: Option<String>,
        /// The stored body.
        body: Vec<u8>,
    },
}

type Reply = oneshot::Sender<Result<Outcome, ApiError>>;

struct Job {
    submission: Submission,
    reply: Reply,
}

/// How the writers work.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    /// Submissions per transaction at most (`COMMANDS_BATCH_MAX`).
    pub max_batch: usize,
    /// Concurrent writer tasks, each with at most one transaction open
    /// (`COMMANDS_BATCH_WRITERS`).
    pub writers: usize,
    /// Full name of the `commands` topic.
    pub commands_topic: String,
    /// Idempotency record lifetime.
    pub idempotency_ttl: Duration,
}

/// The handlers' side: submit and await the outcome. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    sender: mpsc::Sender<Job>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    settings: Arc<IntakeSettings>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Intake {
    /// A queue for `settings`; [`Intake::run`] starts its writers.
    pub fn new(settings: IntakeSettings) -> Self {
        let settings = IntakeSettings {
            max_batch: settings.max_batch.max(1),
            writers: settings.writers.max(1),
            ..settings
        };
        // Enough room for every writer's next batch; beyond it handlers wait (back-pressure).
        let (sender, receiver) = mpsc::channel(settings.max_batch * settings.writers * 2);
        Self {
            sender,
            queue: Arc::new(Mutex::new(receiver)),
            settings: Arc::new(settings),
        }
    }

    /// Queues `submission` and waits for its outcome.
    pub async fn submit(&self, submission: Submission) -> Result<Outcome, ApiError> {
        let (reply, outcome) = oneshot::channel();
        self.sender
            .send(Job { submission, reply })
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        outcome.await.map_err(|_| ApiError::ShuttingDown)?
    }

    /// Runs the writers until `shutdown` fires (the service cancels it once the HTTP server
    /// has drained, so queued submissions are written first).
    pub async fn run(self, pool: PgPool, waker: Waker, shutdown: CancellationToken) {
        let writer = Arc::new(Writer {
            pool,
            waker,
            settings: Arc::clone(&self.settings),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.settings.writers {
            let (queue, writer, shutdown) = (
                Arc::clone(&self.queue),
                Arc::clone(&writer),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                while let Some(batch) =
                    next_batch(&queue, writer.settings.max_batch, &shutdown).await
                {
                    writer.write(batch).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Waits for one job, then takes every job already queued, up to `max`; `None` on shutdown.
async fn next_batch(
    queue: &Mutex<mpsc::Receiver<Job>>,
    max: usize,
    shutdown: &CancellationToken,
) -> Option<Vec<Job>> {
    let mut queue = tokio::select! {
        () = shutdown.cancelled() => return None,
        queue = queue.lock() => queue,
    };
    let first = tokio::select! {
        () = shutdown.cancelled() => return None,
        job = queue.recv() => job?,
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

struct Writer {
    pool: PgPool,
    waker: Waker,
    settings: Arc<IntakeSettings>,
}

/// A live idempotency record, of the `n`-th (from 1) submission looked up.
#[derive(sqlx::FromRow)]
struct Stored {
    n: i64,
    fingerprint: Vec<u8>,
    response_status: i16,
    response_location: Option<String>,
    response_body: Vec<u8>,
}

impl Writer {
    async fn write(&self, batch: Vec<Job>) {
        metrics::histogram!(COMMANDS_BATCH_SIZE, "service" => NAME).record(batch.len() as f64);
        // A key repeated within the batch: the first occurrence is "in progress" for the rest.
        let mut seen = HashSet::with_capacity(batch.len());
        let mut jobs = Vec::with_capacity(batch.len());
        for job in batch {
            let id = (job.submission.client.clone(), job.submission.key.clone());
            if seen.insert(id) {
                jobs.push(job);
            } else {
                let _ = job.reply.send(Err(ApiError::IdempotencyInProgress));
            }
        }
        let submissions: Vec<&Submission> = jobs.iter().map(|j| &j.submission).collect();
        let span = tracing::debug_span!("commands.write_batch", size = submissions.len());
        match self.transact(&submissions).instrument(span).await {
            Ok(outcomes) => {
                self.finish(jobs.into_iter().zip(outcomes));
            }
            Err(error) if jobs.len() > 1 => {
                tracing::warn!(%error, size = jobs.len(), "A batch of commands failed; writing them one by one.");
                for job in jobs {
                    let outcome = match self.transact(&[&job.submission]).await {
                        // One submission in, one outcome out.
                        Ok(mut outcomes) => outcomes.pop().unwrap_or(Ok(Outcome::Accepted)),
                        Err(error) => Err(ApiError::Database(error)),
                    };
                    self.finish(std::iter::once((job, outcome)));
                }
            }
            Err(error) => {
                if let Some(job) = jobs.into_iter().next() {
                    let _ = job.reply.send(Err(ApiError::Database(error)));
                }
            }
        }
    }

    /// Answers the jobs; wakes the relays if anything was written.
    fn finish(&self, results: impl Iterator<Item = (Job, Result<Outcome, ApiError>)>) {
        let mut written = false;
        for (job, outcome) in results {
            written |= matches!(outcome, Ok(Outcome::Accepted));
            let _ = job.reply.send(outcome);
        }
        if written {
            self.waker.wake();
        }
    }

    /// One transaction for `submissions` (no repeated keys); one outcome each, in order.
    async fn transact(
        &self,
        submissions: &[&Submission],
    ) -> Result<Vec<Result<Outcome, ApiError>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let locks: Vec<String> = submissions.iter().map(|s| s.lock_name()).collect();
        let locked: Vec<(i64, bool)> = sqlx::query_as(
            "SELECT i, pg_try_advisory_xact_lock(hashtextextended(name, 0)) \
             FROM unnest($1::text[]) WITH ORDINALITY AS t(name, i) ORDER BY i",
        )
        .bind(&locks)
        .fetch_all(&mut *tx)
        .await?;
        let locked: HashSet<usize> = locked
            .into_iter()
            .filter(|(_, locked)| *locked)
            .filter_map(|(i, _)| usize::try_from(i - 1).ok())
            .collect();

        let candidates: Vec<&Submission> = submissions
            .iter()
            .enumerate()
            .filter(|(i, _)| locked.contains(i))
            .map(|(_, s)| *s)
            .collect();
        // Positions (1-based, in `candidates`) of the live records found; the others were
        // written by the same statement.
        let stored: HashMap<i64, Stored> = if candidates.is_empty() {
            HashMap::new()
        } else {
            self.lookup_or_insert(&mut tx, &candidates)
                .await?
                .into_iter()
                .map(|s| (s.n, s))
                .collect()
        };

        let mut outcomes = Vec::with_capacity(submissions.len());
        let mut candidate = 0i64;
        for (i, submission) in submissions.iter().enumerate() {
            if !locked.contains(&i) {
                outcomes.push(Err(ApiError::IdempotencyInProgress));
                continue;
            }
            candidate += 1;
            outcomes.push(match stored.get(&candidate) {
                Some(record) if record.fingerprint != submission.fingerprint => {
                    Err(ApiError::IdempotencyKeyReused)
                }
                Some(record) => Ok(Outcome::Replay {
                    status: u16::try_from(record.response_status).unwrap_or(202),
                    location: record.response_location.clone(),
                    body: record.response_body.clone(),
                }),
                None => Ok(Outcome::Accepted),
            });
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// One statement for the `candidates` (whose locks this transaction holds): looks up
    /// their live idempotency records and, for those without one, writes the command, its
    /// idempotency record and its outbox row. Returns the records found (a submission with a
    /// record writes nothing: it is a replay or a reused key). The lookup sees everything
    /// committed before the statement, which started after the locks were taken.
    async fn lookup_or_insert(
        &self,
        conn: &mut sqlx::PgConnection,
        candidates: &[&Submission],
    ) -> Result<Vec<Stored>, sqlx::Error> {
        let clients: Vec<&str> = candidates.iter().map(|s| s.client.as_str()).collect();
        let kinds: Vec<&str> = candidates.iter().map(|s| s.kind.as_str()).collect();
        let collections: Vec<&str> = candidates.iter().map(|s| s.collection.as_str()).collect();
        let document_ids: Vec<&str> = candidates.iter().map(|s| s.document_id.as_str()).collect();
        let keys: Vec<&str> = candidates.iter().map(|s| s.key.as_str()).collect();
        let locations: Vec<&str> = candidates.iter().map(|s| s.location.as_str()).collect();
        let ids: Vec<Uuid> = candidates.iter().map(|s| s.command_id).collect();
        let expected: Vec<Option<i64>> = candidates.iter().map(|s| s.expected_version).collect();
        let payloads: Vec<Option<Json<&Value>>> = candidates
            .iter()
            .map(|s| s.payload.as_ref().map(Json))
            .collect();
        let accepted: Vec<DateTime<Utc>> = candidates.iter().map(|s| s.accepted_at).collect();
        let fingerprints: Vec<&[u8]> = candidates
            .iter()
            .map(|s| s.fingerprint.as_slice())
            .collect();
        let bodies: Vec<&[u8]> = candidates.iter().map(|s| s.body.as_slice()).collect();
        let envelopes: Vec<Json<&Value>> = candidates.iter().map(|s| Json(&s.envelope)).collect();
        let parents: Vec<Option<&str>> = candidates
            .iter()
            .map(|s| s.trace.traceparent.as_deref())
            .collect();
        let states: Vec<Option<&str>> = candidates
            .iter()
            .map(|s| s.trace.tracestate.as_deref())
            .collect();
        let sql = format!(
            "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::int8[], $7::jsonb[], $8::timestamptz[], $9::text[], $10::bytea[], \
             $11::text[], $12::bytea[], $15::jsonb[], $16::text[], $17::text[]) WITH ORDINALITY \
             AS t(id, client_id, type, collection, document_id, expected_version, payload, \
             accepted_at, key, fingerprint, location, body, envelope, traceparent, tracestate, n)), \
             stored AS (SELECT i.n, k.fingerprint, k.response_status, k.response_location, \
             k.response_body FROM input i JOIN idempotency_keys k \
             ON k.client_id = i.client_id AND k.key = i.key WHERE k.expires_at > now()), \
             new AS (SELECT * FROM input WHERE n NOT IN (SELECT n FROM stored)), \
             c AS (INSERT INTO commands (id, client_id, type, collection, document_id, \
             expected_version, payload, accepted_at, updated_at) SELECT id, client_id, type, \
             collection, document_id, expected_version, payload, accepted_at, accepted_at \
             FROM new), \
             k AS (INSERT INTO idempotency_keys (client_id, key, fingerprint, command_id, \
             response_status, response_location, response_body, expires_at) \
             SELECT client_id, key, fingerprint, id, 202, location, body, \
             now() + make_interval(secs => $13) FROM new \
             ON CONFLICT (client_id, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
             command_id = EXCLUDED.command_id, response_status = EXCLUDED.response_status, \
             response_location = EXCLUDED.response_location, \
             response_body = EXCLUDED.response_body, created_at = now(), \
             expires_at = EXCLUDED.expires_at), \
             messages AS (SELECT $14::text AS topic, collection || '/' || document_id AS message_key, \
             'command.' || type AS message_type, id AS command_id, envelope AS payload, \
             traceparent, tracestate, n FROM new), \
             o AS ({}) \
             SELECT n, fingerprint, response_status, response_location, response_body FROM stored",
            outbox::insert_from(OutboxTable::DEFAULT, "messages")
        );
        sqlx::query_as(&sql)
            .bind(&ids)
            .bind(&clients)
            .bind(&kinds)
            .bind(&collections)
            .bind(&document_ids)
            .bind(&expected)
            .bind(&payloads)
            .bind(&accepted)
            .bind(&keys)
            .bind(&fingerprints)
            .bind(&locations)
            .bind(&bodies)
            .bind(self.settings.idempotency_ttl.as_secs_f64())
            .bind(&self.settings.commands_topic)
            .bind(&envelopes)
            .bind(&parents)
            .bind(&states)
            .fetch_all(&mut *conn)
            .await
    }
}
