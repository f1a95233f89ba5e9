//! Applying one command to the write model, exactly once.
//!
//! # Idempotency
//! The command's row in `commands` is the "already processed" marker: its status leaves
//! `accepted`/`processing` only in the transaction that makes the effect (or records the
//! failure). That transaction starts with
//! `UPDATE commands SET status = … WHERE id = $1 AND status IN ('accepted', 'processing')`,
//! which takes the row lock; a redelivered copy processed concurrently (a rebalance overlap,
//! a second processor) waits on it and then updates zero rows, so it rolls back without
//! touching the document. A copy that arrives later sees a final status in the first read
//! and is skipped (`duplicate`). A command produced to Kafka by something other than the
//! command service gets its `commands` row inserted from the envelope first.
//!
//! # Optimistic document writes
//! The handler runs *outside* the transaction (a webhook may take seconds; no transaction
//! or row lock is held meanwhile) on the state read before it. The write is then guarded by
//! that state's version (`UPDATE … WHERE version = $read`, or `INSERT … ON CONFLICT DO
//! NOTHING` for a new document); if another writer got there first, the transaction rolls
//! back and the command is decided again on the new state ([`ApplyError::Raced`]).
//!
//! # Versions
//! A document's version is 1 on its first write and +1 per change; a delete keeps a
//! tombstone row, so re-creating the document continues the sequence. `expectedVersion` is
//! compared with the live document's version (0 when it does not exist or was deleted).

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use common::envelope::{CommandEnvelope, EVENT_DELETED, EventEnvelope, document_key};
use common::outbox::{self, NewMessage, OutboxTable, TraceContext, Waker};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::batch::{Decision, DocumentWrite, Plan};
use crate::handler::{Change, Document};

// The statements that read or write a batch's rows. Each finds its rows by primary key in any
// plan, whatever the tables' statistics say (see `common::postgres`, "Plans"); public for the
// plan tests, which check that on empty tables.

/// One command's status and its document's state (`$1` command id, `$2` collection, `$3`
/// document id).
pub const SNAPSHOT_SQL: &str = "SELECT c.status, d.version, d.data FROM (SELECT $1::uuid AS id) AS k \
     LEFT JOIN commands c ON c.id = k.id \
     LEFT JOIN documents d ON d.collection = $2 AND d.id = $3";

/// [`SNAPSHOT_SQL`] for a batch, in its order: lateral subqueries with a `LIMIT` are never
/// flattened into joins, so each is a primary-key probe per command.
pub const SNAPSHOT_MANY_SQL: &str = "SELECT c.status, d.version, d.data \
     FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS k(id, collection, doc, n) \
     LEFT JOIN LATERAL (SELECT c.status FROM commands c WHERE c.id = k.id LIMIT 1) AS c ON true \
     LEFT JOIN LATERAL (SELECT d.version, d.data FROM documents d \
     WHERE d.collection = k.collection AND d.id = k.doc LIMIT 1) AS d ON true \
     ORDER BY k.n";

/// SQLSTATE of the error `meridian_require` raises (see the migration that creates it).
pub const GUARD_FAILED: &str = "MRD01";

/// Writes a batch's decisions in one statement, which is its own transaction: every status,
/// each changed document's final state and every event's outbox row, each part for the whole
/// batch. The last line checks what the parts did — every command claimed (still not final),
/// every existing document still at the version read, every new document really new — and
/// raises [`GUARD_FAILED`] otherwise, which rolls the whole statement back.
///
/// - `$1`–`$4`, `$5`: the commands (ids, statuses, versions, reasons) and the time;
///   `c.id = ANY($1)` makes the batch's ids the index condition on `commands` on whichever
///   side of the join the planner puts it.
/// - `$6`–`$11`: the existing documents (collection, id, version read, new version, state,
///   writer). The key has two columns, so each row's location comes from a lateral
///   primary-key probe and the update joins on it; a row updated meanwhile has moved and no
///   longer matches, which counts as a conflict just as a changed version does.
/// - `$12`–`$16`: the new documents (collection, id, version, state, writer).
/// - `$17`–`$23`: the events, as [`outbox::insert_many_sql`] takes them.
///
/// Sent as separate statements in a transaction, the same writes took six round trips
/// (`BEGIN`, four statements, `COMMIT`); every one is a wake-up of the session's backend and
/// of this service, on cores the whole pipeline shares.
pub fn commit_plan_sql(outbox: OutboxTable) -> String {
    format!(
        "WITH claimed AS (UPDATE commands AS c SET status = u.status, \
         result_version = u.version, failure_reason = u.reason, updated_at = $5 \
         FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[]) AS u(id, status, version, reason) \
         WHERE c.id = ANY($1) AND c.id = u.id AND c.status IN ('accepted', 'processing') \
         RETURNING 1), \
         updated AS (UPDATE documents AS d SET version = u.version, \
         data = u.data, deleted = u.data IS NULL, last_command_id = u.command_id, updated_at = $5 \
         FROM unnest($6::text[], $7::text[], $8::int8[], $9::int8[], $10::jsonb[], $11::uuid[]) \
         AS u(collection, id, read_version, version, data, command_id) \
         CROSS JOIN LATERAL (SELECT x.ctid AS row FROM documents x \
         WHERE x.collection = u.collection AND x.id = u.id LIMIT 1) AS x \
         WHERE d.ctid = x.row AND d.version = u.read_version RETURNING 1), \
         inserted AS (INSERT INTO documents (collection, id, version, data, deleted, \
         last_command_id, created_at, updated_at) \
         SELECT collection, id, version, data, data IS NULL, command_id, $5, $5 \
         FROM unnest($12::text[], $13::text[], $14::int8[], $15::jsonb[], $16::uuid[]) \
         AS u(collection, id, version, data, command_id) \
         ON CONFLICT DO NOTHING RETURNING 1), \
         queued AS ({}) \
         SELECT meridian_require((SELECT count(*) FROM claimed) = cardinality($1) \
         AND (SELECT count(*) FROM updated) = cardinality($6) \
         AND (SELECT count(*) FROM inserted) = cardinality($12), \
         'a command or document changed under the batch')",
        outbox::insert_many_sql(outbox, 17)
    )
}

/// A command's status and its document's state, read before deciding.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The command's status (`accepted`, `processing`, `succeeded`, …).
    pub status: String,
    /// The document's row: its version (tombstones included) and live state.
    pub row: Option<Row>,
}

/// The document's stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The stored version (also of a tombstone).
    pub version: i64,
    /// The live document (`None` when deleted).
    pub live: Option<Document>,
}

impl Snapshot {
    /// Whether the command already reached a final status.
    pub fn is_final(&self) -> bool {
        !matches!(self.status.as_str(), "accepted" | "processing")
    }

    /// The live document, when there is one.
    pub fn current(&self) -> Option<&Document> {
        self.row.as_ref().and_then(|r| r.live.as_ref())
    }

    /// The version `expectedVersion` is compared with: the live document's, else 0.
    pub fn live_version(&self) -> i64 {
        self.current().map_or(0, |d| d.version)
    }
}

/// Applying failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A database statement failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The document changed between the read and the write: decide again.
    #[error("the document changed while the command was being decided")]
    Raced,
    /// The event could not be encoded.
    #[error("failed to encode the event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The handler's change would make the document something other than a JSON object.
    #[error("a document must be a JSON object, the change would make it {0}")]
    NotAnObject(&'static str),
}

/// What [`commit_change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// The change and its event were committed; the document is now at `version`.
    Applied {
        /// The new version.
        version: i64,
    },
    /// The change was a no-op (`none`, or a delete of a missing document); the command
    /// succeeded with the document's current version (if any).
    Unchanged,
    /// Another copy of the command finished first; nothing was written.
    Duplicate,
}

/// Where and how changes are written.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    outbox: Waker,
    events_topic: String,
    /// [`commit_plan_sql`] for `outbox`'s table.
    commit_plan_sql: Arc<str>,
}

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    status: Option<String>,
    version: Option<i64>,
    data: Option<sqlx::types::Json<Value>>,
}

impl SnapshotRow {
    /// The command's status (`None`: it has no row) and the document's row.
    fn into_parts(self) -> (Option<String>, Option<Row>) {
        let row = self.version.map(|version| Row {
            version,
            live: self.data.map(|data| Document {
                version,
                data: data.0,
            }),
        });
        (self.status, row)
    }
}

impl Store {
    /// A store writing events for `events_topic` to `outbox`'s table (and waking its relays
    /// after each commit).
    pub fn new(pool: PgPool, outbox: Waker, events_topic: String) -> Self {
        Self {
            commit_plan_sql: commit_plan_sql(outbox.table()).into(),
            pool,
            outbox,
            events_topic,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Reads the command's status and the document's state; inserts the command's row from
    /// the envelope when the command service did not write one.
    pub async fn snapshot(&self, command: &CommandEnvelope) -> Result<Snapshot, sqlx::Error> {
        let read = || {
            sqlx::query_as::<_, SnapshotRow>(SNAPSHOT_SQL)
                .bind(command.command_id)
                .bind(&command.collection)
                .bind(&command.id)
                .fetch_one(&self.pool)
        };
        let mut found = read().await?;
        if found.status.is_none() {
            sqlx::query(
                "INSERT INTO commands (id, client_id, type, collection, document_id, \
                 expected_version, payload, accepted_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) ON CONFLICT (id) DO NOTHING",
            )
            .bind(command.command_id)
            .bind(&command.client_id)
            .bind(&command.command_type)
            .bind(&command.collection)
            .bind(&command.id)
            .bind(command.expected_version.filter(|v| *v >= 0))
            .bind(command.payload.as_ref().map(sqlx::types::Json))
            .bind(command.accepted_at)
            .execute(&self.pool)
            .await?;
            found = read().await?;
        }
        let (status, row) = found.into_parts();
        Ok(Snapshot {
            status: status.unwrap_or_else(|| "accepted".into()),
            row,
        })
    }

    /// Marks the command `processing` (before a slow handler or a retry), if it is still
    /// `accepted`.
    pub async fn mark_processing(&self, command_id: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE commands SET status = 'processing', updated_at = now() \
             WHERE id = $1 AND status = 'accepted'",
        )
        .bind(command_id)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Ends a command that is not final yet with `status` (`failed` or `dead_lettered`) and
    /// `reason`. Returns whether this call ended it (false: it was final already).
    pub async fn finish_unsuccessfully(
        &self,
        command_id: Uuid,
        status: &str,
        reason: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE commands SET status = $2, failure_reason = $3, result_version = NULL, \
             updated_at = now() WHERE id = $1 AND status IN ('accepted', 'processing')",
        )
        .bind(command_id)
        .bind(status)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Applies `change` (decided on `snapshot`) in one transaction: the command's status,
    /// the version-guarded document write and the event's outbox row.
    pub async fn commit_change(
        &self,
        command: &CommandEnvelope,
        snapshot: &Snapshot,
        change: Change,
        trace: &TraceContext,
    ) -> Result<Committed, ApplyError> {
        let read_version = snapshot.row.as_ref().map(|r| r.version);
        let version = read_version.unwrap_or(0) + 1;
        let (event_type, data) = match resolve(change, snapshot.current())? {
            Effect::Unchanged => return self.succeed_unchanged(command, snapshot).await,
            Effect::Write { event_type, data } => (event_type, data),
        };
        let now = micros(Utc::now());

        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "UPDATE commands SET status = 'succeeded', result_version = $2, failure_reason = NULL, \
             updated_at = $3 WHERE id = $1 AND status IN ('accepted', 'processing')",
        )
        .bind(command.command_id)
        .bind(version)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Ok(Committed::Duplicate); // dropping `tx` rolls back
        }
        let data_json = data.as_ref().map(sqlx::types::Json);
        let written = match read_version {
            Some(read) => {
                sqlx::query(
                    "UPDATE documents SET version = $3, data = $4, deleted = $5, \
                     last_command_id = $6, updated_at = $7 \
                     WHERE collection = $1 AND id = $2 AND version = $8",
                )
                .bind(&command.collection)
                .bind(&command.id)
                .bind(version)
                .bind(data_json)
                .bind(data.is_none())
                .bind(command.command_id)
                .bind(now)
                .bind(read)
                .execute(&mut *tx)
                .await?
            }
            None => {
                sqlx::query(
                    "INSERT INTO documents (collection, id, version, data, deleted, \
                     last_command_id, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT DO NOTHING",
                )
                .bind(&command.collection)
                .bind(&command.id)
                .bind(version)
                .bind(data_json)
                .bind(data.is_none())
                .bind(command.command_id)
                .bind(now)
                .execute(&mut *tx)
                .await?
            }
        };
        if written.rows_affected() == 0 {
            return Err(ApplyError::Raced);
        }
        let event = EventEnvelope {
            event_id: Uuid::now_v7(),
            event_type,
            collection: command.collection.clone(),
            id: command.id.clone(),
            version,
            data,
            command_id: command.command_id,
            occurred_at: now,
        };
        let payload = serde_json::to_value(&event)?;
        outbox::enqueue(
            &mut tx,
            self.outbox.table(),
            &NewMessage {
                topic: &self.events_topic,
                key: &document_key(&command.collection, &command.id),
                message_type: &format!("event.{}", event.event_type),
                command_id: Some(command.command_id),
                payload: &payload,
                trace,
            },
        )
        .await?;
        tx.commit().await?;
        self.outbox.wake();
        Ok(Committed::Applied { version })
    }

    /// [`Self::snapshot`] for a run of commands in one query on `conn`, without inserting
    /// missing command rows: `None` for a command that has none.
    pub async fn snapshot_many(
        &self,
        conn: &mut PgConnection,
        commands: &[CommandEnvelope],
    ) -> Result<Vec<Option<Snapshot>>, sqlx::Error> {
        let ids: Vec<Uuid> = commands.iter().map(|c| c.command_id).collect();
        let collections: Vec<&str> = commands.iter().map(|c| c.collection.as_str()).collect();
        let documents: Vec<&str> = commands.iter().map(|c| c.id.as_str()).collect();
        let rows = sqlx::query_as::<_, SnapshotRow>(SNAPSHOT_MANY_SQL)
            .bind(&ids)
            .bind(&collections)
            .bind(&documents)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|found| {
                let (status, row) = found.into_parts();
                Some(Snapshot {
                    status: status?,
                    row,
                })
            })
            .collect())
    }

    /// Writes a [`Plan`] of `commands` on `conn` in one statement ([`commit_plan_sql`]):
    /// every status, each document's final state (guarded by the version read), every
    /// event's outbox row (`traces[i]` for `commands[i]`). `Ok(false)`, with nothing written,
    /// when a guard did not hold: another writer got there first, and the run must go the
    /// one-by-one way.
    pub async fn commit_plan(
        &self,
        conn: &mut PgConnection,
        commands: &[CommandEnvelope],
        plan: &Plan<'_>,
        traces: &[TraceContext],
    ) -> Result<bool, ApplyError> {
        let now = micros(Utc::now());
        let mut ids = Vec::new();
        let mut statuses = Vec::new();
        let mut versions = Vec::new();
        let mut reasons = Vec::new();
        let mut events = Vec::new();
        for ((command, decision), trace) in commands.iter().zip(&plan.decisions).zip(traces) {
            let (status, version, reason) = match decision {
                Decision::Duplicate => continue,
                Decision::Failed { reason } => ("failed", None, Some(reason.as_str())),
                Decision::Unchanged { version } => ("succeeded", *version, None),
                Decision::Applied {
                    version,
                    event_type,
                    data,
                } => {
                    let event = EventEnvelope {
                        event_id: Uuid::now_v7(),
                        event_type: event_type.clone(),
                        collection: command.collection.clone(),
                        id: command.id.clone(),
                        version: *version,
                        data: data.clone(),
                        command_id: command.command_id,
                        occurred_at: now,
                    };
                    events.push((
                        document_key(&command.collection, &command.id),
                        format!("event.{event_type}"),
                        command.command_id,
                        serde_json::to_value(&event)?,
                        trace,
                    ));
                    ("succeeded", Some(*version), None)
                }
            };
            ids.push(command.command_id);
            statuses.push(status);
            versions.push(version);
            reasons.push(reason);
        }
        if ids.is_empty() {
            return Ok(true); // every command was final already: nothing to write
        }
        let messages: Vec<NewMessage<'_>> = events
            .iter()
            .map(
                |(key, message_type, command_id, payload, trace)| NewMessage {
                    topic: &self.events_topic,
                    key,
                    message_type,
                    command_id: Some(*command_id),
                    payload,
                    trace,
                },
            )
            .collect();
        let (updates, inserts): (Vec<_>, Vec<_>) = plan
            .documents
            .iter()
            .partition(|d| d.read_version.is_some());
        let query = sqlx::query(&self.commit_plan_sql)
            .bind(&ids)
            .bind(&statuses)
            .bind(&versions)
            .bind(&reasons)
            .bind(now)
            .bind(updates.iter().map(|d| d.collection).collect::<Vec<_>>())
            .bind(updates.iter().map(|d| d.id).collect::<Vec<_>>())
            .bind(updates.iter().map(|d| d.read_version).collect::<Vec<_>>())
            .bind(updates.iter().map(|d| d.version).collect::<Vec<_>>())
            .bind(states(&updates))
            .bind(writers(&updates))
            .bind(inserts.iter().map(|d| d.collection).collect::<Vec<_>>())
            .bind(inserts.iter().map(|d| d.id).collect::<Vec<_>>())
            .bind(inserts.iter().map(|d| d.version).collect::<Vec<_>>())
            .bind(states(&inserts))
            .bind(writers(&inserts));
        match outbox::bind_many(query, &messages).execute(conn).await {
            Ok(_) => {}
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(GUARD_FAILED) => {
                return Ok(false);
            }
            Err(error) => return Err(error.into()),
        }
        if !messages.is_empty() {
            self.outbox.wake();
        }
        Ok(true)
    }

    async fn succeed_unchanged(
        &self,
        command: &CommandEnvelope,
        snapshot: &Snapshot,
    ) -> Result<Committed, ApplyError> {
        let version = snapshot.current().map(|d| d.version);
        let done = sqlx::query(
            "UPDATE commands SET status = 'succeeded', result_version = $2, failure_reason = NULL, \
             updated_at = now() WHERE id = $1 AND status IN ('accepted', 'processing')",
        )
        .bind(command.command_id)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(if done.rows_affected() == 0 {
            Committed::Duplicate
        } else {
            Committed::Unchanged
        })
    }
}

/// What a decided [`Change`] does to a document.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing (`none`, or a delete of a missing document): the command succeeds without an
    /// event.
    Unchanged,
    /// A new version with `data` (`None`: deleted), announced by an event of `event_type`.
    Write {
        /// The event type.
        event_type: String,
        /// The new state; `None` for a delete.
        data: Option<Value>,
    },
}

/// The effect of `change` on the live document `current`: the merge patch applied, a delete
/// of nothing turned into [`Effect::Unchanged`], and a result that is not a JSON object
/// refused.
pub fn resolve(change: Change, current: Option<&Document>) -> Result<Effect, ApplyError> {
    let (event_type, data) = match change {
        Change::None => return Ok(Effect::Unchanged),
        Change::Delete if current.is_none() => return Ok(Effect::Unchanged),
        Change::Delete => (EVENT_DELETED.to_owned(), None),
        Change::Upsert { event_type, data } => (event_type, Some(data)),
        Change::Patch { event_type, patch } => {
            let mut data =
                current.map_or_else(|| Value::Object(Default::default()), |d| d.data.clone());
            json_patch::merge(&mut data, &patch);
            (event_type, Some(data))
        }
    };
    if let Some(data) = &data
        && !data.is_object()
    {
        return Err(ApplyError::NotAnObject(json_kind(data)));
    }
    Ok(Effect::Write { event_type, data })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `at` truncated to PostgreSQL's microsecond precision, so the event and the row agree.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// RFC 3339 with microseconds, UTC (`2026-01-01T00:00:00.000000Z`).
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Whether a database error means "the database is unreachable or overloaded right now"
/// (retried without limit: dead-lettering commands because of an outage would be wrong),
/// as opposed to an error this statement would hit again.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P01-03: shutdown,
            // crash shutdown, cannot connect now; 40001/40P01: serialization failure and
            // deadlock (retrying is the documented remedy).
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
        }),
        _ => false,
    }
}

/// The final states of `documents`, as the `jsonb[]` parameter of a batch write.
fn states<'d>(documents: &'d [&DocumentWrite<'_>]) -> Vec<Option<sqlx::types::Json<&'d Value>>> {
    documents
        .iter()
        .map(|d| d.data.as_ref().map(sqlx::types::Json))
        .collect()
}

/// The last writing command of each of `documents`.
fn writers(documents: &[&DocumentWrite<'_>]) -> Vec<Uuid> {
    documents.iter().map(|d| d.last_command_id).collect()
}
