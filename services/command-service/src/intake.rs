//! Group commit for `POST /v1/commands`.
//!
//! Handlers validate and prepare a [`Submission`] (command id, envelope, the exact `202` body)
//! and hand it to [`Intake::submit`]. A few writer tasks take whatever submissions are queued
//! — up to `COMMANDS_BATCH_MAX` — and write them in **one statement** ([`INTAKE_SQL`], its own
//! transaction: one round trip and one WAL flush for the batch): the idempotency claims (lock,
//! then live record), and the commands, their idempotency records and their outbox rows of
//! the submissions whose claim came back free. Every submission gets its own answer. An idle
//! service writes batches of one with no added latency; nothing waits to fill a batch. What
//! arrives while another writer's transaction runs waits for that transaction to end — up to
//! `COMMANDS_BATCH_SHARE_MS` — and goes into the next one with everything that arrived
//! meanwhile: at moderate rates the writers take turns instead of each writing a batch of one
//! or two (four writers at 1,000 commands/s averaged 1.3 commands per transaction), and a
//! transaction that is slow or stuck on a lock holds the others up by that bound at most,
//! after which the next writer starts alongside.
//!
//! The idempotency rules are those of one request per transaction (see [`crate::commands`]):
//! - a transaction-scoped advisory lock on (client, key) marks a request in progress; a
//!   submission whose lock is taken by another transaction — or whose key already appears
//!   earlier in the same batch — answers 409;
//! - a live record with the same fingerprint is replayed byte for byte, one with another
//!   fingerprint answers 422; both write nothing. The record is read after the lock is held,
//!   with a snapshot of its own (`meridian_claim_idempotency_key`): the statement's snapshot
//!   predates the lock and could miss a record its previous holder committed meanwhile.
//!
//! If a batch's transaction fails, each of its submissions is retried in a transaction of its
//! own, so one bad submission cannot fail the others, and each failure is its own error.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::metrics::COMMANDS_BATCH_SIZE;
use common::outbox::{self, NewMessage, OutboxTable, TraceContext, Waker};
use common::postgres::HeldConnection;
use common::shutdown::CancellationToken;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{FromRow as _, PgPool};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::NAME;
use crate::error::ApiError;

/// A batch's whole write, in one statement (its own transaction, so one round trip): for each
/// submission, in order, the claim on its (client, key) — the advisory lock of a request in
/// progress and, only once that is held, the key's live record (the migration's
/// `meridian_claim_idempotency_key`, which reads with a snapshot taken after the lock) — then,
/// for the submissions that got the lock and have no live record, the command (`$1`–`$8`),
/// its idempotency record (`$9`–`$13`, `$13` the time to live in seconds, replacing an
/// expired one) and its outbox row (`$14`–`$20`, as [`outbox::insert_many_sql_where`] takes
/// them; one per submission, matched by command id). `$21` holds the lock names. Returns
/// each submission's claim, in order: whether it got the lock, and the live record if any.
/// Public for the plan tests.
pub static INTAKE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
         $5::text[], $6::int8[], $7::jsonb[], $8::timestamptz[], $9::text[], $10::bytea[], \
         $11::text[], $12::bytea[], $21::text[]) WITH ORDINALITY AS t(id, client_id, type, \
         collection, document_id, expected_version, payload, accepted_at, key, fingerprint, \
         location, body, lock_name, i)), \
         claimed AS MATERIALIZED (SELECT input.*, c.locked, c.fingerprint AS stored_fingerprint, \
         c.response_status, c.response_location, c.response_body FROM input \
         CROSS JOIN LATERAL meridian_claim_idempotency_key(input.lock_name, input.client_id, \
         input.key) AS c), \
         new AS (SELECT * FROM claimed WHERE locked AND stored_fingerprint IS NULL), \
         c AS (INSERT INTO commands (id, client_id, type, collection, document_id, \
         expected_version, payload, accepted_at, updated_at) SELECT id, client_id, type, \
         collection, document_id, expected_version, payload, accepted_at, accepted_at \
         FROM new ORDER BY i), \
         k AS (INSERT INTO idempotency_keys (client_id, key, fingerprint, command_id, \
         response_status, response_location, response_body, expires_at) \
         SELECT client_id, key, fingerprint, id, 202, location, body, \
         now() + make_interval(secs => $13) FROM new ORDER BY i \
         ON CONFLICT (client_id, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
         command_id = EXCLUDED.command_id, response_status = EXCLUDED.response_status, \
         response_location = EXCLUDED.response_location, \
         response_body = EXCLUDED.response_body, created_at = now(), \
         expires_at = EXCLUDED.expires_at), \
         o AS ({}) \
         SELECT locked, stored_fingerprint AS fingerprint, response_status, response_location, \
         response_body FROM claimed ORDER BY i",
        outbox::insert_many_sql_where(
            OutboxTable::DEFAULT,
            14,
            "command_id IN (SELECT id FROM new)"
        )
    )
});

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
    /// How long a batch waits for another writer's running transaction to end before it
    /// starts alongside it (`COMMANDS_BATCH_SHARE_MS`).
    pub share: Duration,
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
        let running = Arc::new(Running::default());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.settings.writers {
            let (queue, writer, running, shutdown) = (
                Arc::clone(&self.queue),
                Arc::clone(&writer),
                Arc::clone(&running),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                // Kept between batches (see `HeldConnection`).
                let mut conn = HeldConnection::new(writer.pool.clone());
                while let Some(batch) =
                    next_batch(&queue, &writer.settings, &running, &mut conn, &shutdown).await
                {
                    running.count.fetch_add(1, Ordering::AcqRel);
                    writer.write(batch, &mut conn).await;
                    running.count.fetch_sub(1, Ordering::AcqRel);
                    running.ended.notify_waiters();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// The writers' transactions in progress.
#[derive(Default)]
struct Running {
    /// How many.
    count: AtomicUsize,
    /// Notified each time one ends.
    ended: Notify,
}

/// Waits for one job, then takes every job queued, up to `settings.max_batch`: those already
/// waiting and, while another writer's transaction runs, those that arrive until it ends or
/// `settings.share` has passed. `None` on shutdown before the first job. Until the first job
/// comes, `conn` goes back to the pool once idle for long enough.
async fn next_batch(
    queue: &Mutex<mpsc::Receiver<Job>>,
    settings: &IntakeSettings,
    running: &Running,
    conn: &mut HeldConnection,
    shutdown: &CancellationToken,
) -> Option<Vec<Job>> {
    let mut queue = loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            queue = queue.lock() => break queue,
            () = conn.release_when_idle() => {}
        }
    };
    let first = loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            job = queue.recv() => break job?,
            () = conn.release_when_idle() => {}
        }
    };
    let mut batch = vec![first];
    let share_until = tokio::time::Instant::now() + settings.share;
    loop {
        while batch.len() < settings.max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() >= settings.max_batch {
            break;
        }
        // Registered before the count is read, so an end in between is not missed.
        let ended = running.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if running.count.load(Ordering::Acquire) == 0 {
            break;
        }
        tokio::select! {
            // The jobs taken are written (and answered) whatever happens.
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(share_until) => break,
            () = &mut ended => {}
            job = queue.recv() => match job {
                Some(job) => batch.push(job),
                None => break,
            },
        }
    }
    Some(batch)
}

struct Writer {
    pool: PgPool,
    waker: Waker,
    settings: Arc<IntakeSettings>,
}

/// A submission's claim on its key, as [`INTAKE_SQL`] returns it.
#[derive(sqlx::FromRow)]
struct Claim {
    /// Whether the advisory lock was free (else another request with the key is in progress).
    locked: bool,
    /// The live record's fingerprint; `None` when there is none (then the command was written).
    fingerprint: Option<Vec<u8>>,
    response_status: Option<i16>,
    response_location: Option<String>,
    response_body: Option<Vec<u8>>,
}

impl Claim {
    /// What becomes of `submission`, given this claim.
    fn outcome(self, submission: &Submission) -> Result<Outcome, ApiError> {
        if !self.locked {
            return Err(ApiError::IdempotencyInProgress);
        }
        match self.fingerprint {
            None => Ok(Outcome::Accepted),
            Some(stored) if stored != submission.fingerprint => Err(ApiError::IdempotencyKeyReused),
            Some(_) => Ok(Outcome::Replay {
                status: self
                    .response_status
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(202),
                location: self.response_location,
                body: self.response_body.unwrap_or_default(),
            }),
        }
    }
}

impl Writer {
    async fn write(&self, batch: Vec<Job>, conn: &mut HeldConnection) {
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
        match self.transact(conn, &submissions).instrument(span).await {
            Ok(outcomes) => {
                self.finish(jobs.into_iter().zip(outcomes));
            }
            Err(error) if jobs.len() > 1 => {
                tracing::warn!(%error, size = jobs.len(), "A batch of commands failed; writing them one by one.");
                for job in jobs {
                    let outcome = match self.transact(conn, &[&job.submission]).await {
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

    /// One transaction for `submissions` (no repeated keys) on `conn`; one outcome each, in
    /// order. After a failure the connection goes back to the pool (which checks it).
    async fn transact(
        &self,
        conn: &mut HeldConnection,
        submissions: &[&Submission],
    ) -> Result<Vec<Result<Outcome, ApiError>>, sqlx::Error> {
        let transacted = self.transact_on(conn, submissions).await;
        conn.settle(transacted.is_ok());
        transacted
    }

    /// [`Self::transact`] on `held`: [`INTAKE_SQL`].
    async fn transact_on(
        &self,
        held: &mut HeldConnection,
        submissions: &[&Submission],
    ) -> Result<Vec<Result<Outcome, ApiError>>, sqlx::Error> {
        let conn = held.get().await?;
        let clients: Vec<&str> = submissions.iter().map(|s| s.client.as_str()).collect();
        let kinds: Vec<&str> = submissions.iter().map(|s| s.kind.as_str()).collect();
        let collections: Vec<&str> = submissions.iter().map(|s| s.collection.as_str()).collect();
        let document_ids: Vec<&str> = submissions.iter().map(|s| s.document_id.as_str()).collect();
        let keys: Vec<&str> = submissions.iter().map(|s| s.key.as_str()).collect();
        let locations: Vec<&str> = submissions.iter().map(|s| s.location.as_str()).collect();
        let ids: Vec<Uuid> = submissions.iter().map(|s| s.command_id).collect();
        let expected: Vec<Option<i64>> = submissions.iter().map(|s| s.expected_version).collect();
        let payloads: Vec<Option<Json<&Value>>> = submissions
            .iter()
            .map(|s| s.payload.as_ref().map(Json))
            .collect();
        let accepted: Vec<DateTime<Utc>> = submissions.iter().map(|s| s.accepted_at).collect();
        let fingerprints: Vec<&[u8]> = submissions
            .iter()
            .map(|s| s.fingerprint.as_slice())
            .collect();
        let bodies: Vec<&[u8]> = submissions.iter().map(|s| s.body.as_slice()).collect();
        let locks: Vec<String> = submissions.iter().map(|s| s.lock_name()).collect();
        let message_keys: Vec<String> = submissions
            .iter()
            .map(|s| format!("{}/{}", s.collection, s.document_id))
            .collect();
        let types: Vec<String> = submissions
            .iter()
            .map(|s| format!("command.{}", s.kind))
            .collect();
        let messages: Vec<NewMessage<'_>> = submissions
            .iter()
            .enumerate()
            .map(|(i, s)| NewMessage {
                topic: &self.settings.commands_topic,
                key: &message_keys[i],
                message_type: &types[i],
                command_id: Some(s.command_id),
                payload: &s.envelope,
                trace: &s.trace,
            })
            .collect();
        let query = sqlx::query(&INTAKE_SQL)
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
            .bind(self.settings.idempotency_ttl.as_secs_f64());
        let claims = outbox::bind_many(query, &messages)
            .bind(&locks)
            .try_map(|row: PgRow| Claim::from_row(&row))
            .fetch_all(&mut *conn)
            .await?;
        if claims.len() != submissions.len() {
            return Err(sqlx::Error::Protocol(format!(
                "the intake statement returned {} claims for {} submissions",
                claims.len(),
                submissions.len()
            )));
        }
        Ok(claims
            .into_iter()
            .zip(submissions)
            .map(|(claim, submission)| claim.outcome(submission))
            .collect())
    }
}
