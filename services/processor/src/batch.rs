//! Deciding a run of commands together, so that they share one read and one transaction.
//!
//! A partition's worker hands the engine every message already waiting (up to
//! `PROCESSOR_BATCH_MAX`). The longest leading run of commands with built-in handlers (which
//! decide synchronously, from the document alone) is handled as one batch — a run of one
//! included — on one connection, in two round trips:
//!
//! 1. one query reads every command's status and every addressed document;
//! 2. [`plan`] decides the commands in order, in memory: a command sees the document as the
//!    commands before it in the run left it, exactly as if they had been committed one by
//!    one, so the outcomes (versions, conflicts, rejections) are the ones the one-by-one path
//!    would produce;
//! 3. one statement (its own transaction: `apply::commit_plan_sql`) writes every status, each
//!    touched document's final state (guarded by the version read in step 1) and every
//!    event's outbox row, in order, and rolls all of it back if a guard did not hold.
//!
//! Anything unusual sends the whole run back to the one-by-one path, which has the retry,
//! race and dead-letter handling: a command without a `commands` row, a handler that is not
//! ready at once or errs, a change that is not an object, a database error, or a guard that
//! did not hold (another processor wrote during a rebalance overlap). Nothing is written in
//! those cases (the statement rolls back), so the fallback starts from the same state.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use common::envelope::CommandEnvelope;
use serde_json::Value;
use uuid::Uuid;

use crate::apply::{Effect, Row, Snapshot, resolve};
use crate::handler::{Change, Document, HandlerError, REASON_VERSION_CONFLICT};

/// What the batch decided for one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Already final (processed before, or an earlier copy in this run): nothing to write.
    Duplicate,
    /// Refused with `reason`.
    Failed {
        /// The machine-readable reason.
        reason: String,
    },
    /// Succeeded without a change; `version` is the live document's (if any).
    Unchanged {
        /// The live document's version.
        version: Option<i64>,
    },
    /// Succeeded with a new document version and an event.
    Applied {
        /// The document's new version.
        version: i64,
        /// The event type.
        event_type: String,
        /// The new state (`None`: deleted).
        data: Option<Value>,
    },
}

/// The final state of one document the batch changes.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentWrite<'a> {
    /// The document's collection.
    pub collection: &'a str,
    /// The document's id.
    pub id: &'a str,
    /// The version read before deciding (the write's guard); `None`: no row existed.
    pub read_version: Option<i64>,
    /// The version after the batch.
    pub version: i64,
    /// The state after the batch (`None`: deleted).
    pub data: Option<Value>,
    /// The last command of the batch that changed it.
    pub last_command_id: Uuid,
}

/// Every decision of a run (one per command, in order) and the documents to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<'a> {
    /// One per command, in the run's order.
    pub decisions: Vec<Decision>,
    /// Each changed document once, with its final state.
    pub documents: Vec<DocumentWrite<'a>>,
}

/// Why a run cannot be handled as a batch (it goes through the one-by-one path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unbatchable {
    /// A command has no `commands` row yet (produced by something other than the command
    /// service).
    #[error("a command has no row yet")]
    NoCommandRow,
    /// A handler did not decide at once, or failed in a way that needs retries or the DLQ.
    #[error("a handler needs the one-by-one path")]
    Handler,
    /// A change would make a document something other than a JSON object.
    #[error("a change would make a document something other than an object")]
    NotAnObject,
}

/// One document as the run has left it so far.
struct Tracked {
    read_version: Option<i64>,
    row: Option<Row>,
    last_command_id: Option<Uuid>,
}

/// Decides `commands` in order from what was read for them (`reads[i]` for `commands[i]`:
/// `None` when the command has no row). `decide(i, current)` runs `commands[i]`'s handler;
/// it answers `None` when it cannot decide synchronously.
pub fn plan<'a>(
    commands: &'a [CommandEnvelope],
    reads: Vec<Option<Snapshot>>,
    mut decide: impl FnMut(usize, Option<&Document>) -> Option<Result<Change, HandlerError>>,
) -> Result<Plan<'a>, Unbatchable> {
    let mut documents: HashMap<(&str, &str), Tracked> = HashMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    let mut seen = HashSet::new();
    let mut decisions = Vec::with_capacity(commands.len());
    for (index, (command, read)) in commands.iter().zip(reads).enumerate() {
        let snapshot = read.ok_or(Unbatchable::NoCommandRow)?;
        if snapshot.is_final() || !seen.insert(command.command_id) {
            decisions.push(Decision::Duplicate);
            continue;
        }
        let key = (command.collection.as_str(), command.id.as_str());
        let tracked = match documents.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                order.push(key);
                entry.insert(Tracked {
                    read_version: snapshot.row.as_ref().map(|r| r.version),
                    row: snapshot.row,
                    last_command_id: None,
                })
            }
        };
        let current = tracked.row.as_ref().and_then(|r| r.live.as_ref());
        let live_version = current.map(|d| d.version);
        if let Some(expected) = command.expected_version
            && expected != live_version.unwrap_or(0)
        {
            decisions.push(Decision::Failed {
                reason: REASON_VERSION_CONFLICT.to_owned(),
            });
            continue;
        }
        let change = match decide(index, current).ok_or(Unbatchable::Handler)? {
            Ok(change) => change,
            Err(HandlerError::Rejected { reason }) => {
                decisions.push(Decision::Failed { reason });
                continue;
            }
            Err(HandlerError::Transient(_) | HandlerError::Broken(_)) => {
                return Err(Unbatchable::Handler);
            }
        };
        match resolve(change, current).map_err(|_| Unbatchable::NotAnObject)? {
            Effect::Unchanged => decisions.push(Decision::Unchanged {
                version: live_version,
            }),
            Effect::Write { event_type, data } => {
                let version = tracked.row.as_ref().map_or(0, |r| r.version) + 1;
                tracked.row = Some(Row {
                    version,
                    live: data.clone().map(|data| Document { version, data }),
                });
                tracked.last_command_id = Some(command.command_id);
                decisions.push(Decision::Applied {
                    version,
                    event_type,
                    data,
                });
            }
        }
    }
    let documents = order
        .into_iter()
        .filter_map(|key| {
            let tracked = documents.remove(&key)?;
            let last_command_id = tracked.last_command_id?;
            let row = tracked.row?;
            Some(DocumentWrite {
                collection: key.0,
                id: key.1,
                read_version: tracked.read_version,
                version: row.version,
                data: row.live.map(|d| d.data),
                last_command_id,
            })
        })
        .collect();
    Ok(Plan {
        decisions,
        documents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{Handlers, Invocation};
    use common::outbox::TraceContext;
    use serde_json::json;

    fn command(kind: &str, id: &str, expected: Option<i64>, payload: Value) -> CommandEnvelope {
        CommandEnvelope {
            command_id: Uuid::now_v7(),
            command_type: kind.into(),
            collection: "books".into(),
            id: id.into(),
            expected_version: expected,
            payload: Some(payload),
            client_id: "c".into(),
            accepted_at: chrono::Utc::now(),
        }
    }

    fn accepted(row: Option<(i64, Option<Value>)>) -> Option<Snapshot> {
        Some(Snapshot {
            status: "accepted".into(),
            row: row.map(|(version, data)| Row {
                version,
                live: data.map(|data| Document { version, data }),
            }),
        })
    }

    /// Plans with the built-in handlers, all reads taken from `reads`.
    fn plan_built_in<'a>(
        commands: &'a [CommandEnvelope],
        reads: Vec<Option<Snapshot>>,
    ) -> Result<Plan<'a>, Unbatchable> {
        let handlers = Handlers::built_in();
        let trace = TraceContext::default();
        plan(commands, reads, |i, current| {
            handlers.decide_now(Invocation {
                command: &commands[i],
                current,
                trace: &trace,
            })
        })
    }

    #[test]
    fn later_commands_see_the_document_as_earlier_ones_left_it() {
        let commands = [
            command("create", "1", None, json!({"title": "Dune", "n": 1})),
            command("patch", "1", Some(1), json!({"n": 2})),
            command("patch", "1", None, json!({"title": null})),
        ];
        let plan = plan_built_in(
            &commands,
            vec![accepted(None), accepted(None), accepted(None)],
        )
        .unwrap();
        let versions: Vec<_> = plan
            .decisions
            .iter()
            .map(|d| match d {
                Decision::Applied { version, .. } => *version,
                other => panic!("not applied: {other:?}"),
            })
            .collect();
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(
            plan.documents,
            [DocumentWrite {
                collection: "books",
                id: "1",
                read_version: None,
                version: 3,
                data: Some(json!({"n": 2})),
                last_command_id: commands[2].command_id,
            }]
        );
    }

    #[test]
    fn conflicts_and_rejections_are_decided_on_the_state_within_the_run() {
        let commands = [
            command("patch", "1", Some(4), json!({"a": 1})),
            // The document is now at 5: expecting 4 again conflicts.
            command("patch", "1", Some(4), json!({"a": 2})),
            command("delete", "1", Some(5), json!({})),
            command("patch", "1", None, json!({"a": 3})),
            command("create", "1", Some(0), json!({"b": 1})),
        ];
        let read = || accepted(Some((4, Some(json!({"a": 0})))));
        let plan = plan_built_in(&commands, vec![read(), read(), read(), read(), read()]).unwrap();
        assert!(matches!(
            plan.decisions[0],
            Decision::Applied { version: 5, .. }
        ));
        assert_eq!(
            plan.decisions[1],
            Decision::Failed {
                reason: REASON_VERSION_CONFLICT.into()
            }
        );
        assert_eq!(
            plan.decisions[2],
            Decision::Applied {
                version: 6,
                event_type: common::envelope::EVENT_DELETED.into(),
                data: None
            }
        );
        assert_eq!(
            plan.decisions[3],
            Decision::Failed {
                reason: crate::handler::REASON_NOT_FOUND.into()
            }
        );
        // Re-created after the tombstone: the version sequence continues.
        assert!(matches!(
            plan.decisions[4],
            Decision::Applied { version: 7, .. }
        ));
        assert_eq!(plan.documents.len(), 1);
        assert_eq!(plan.documents[0].read_version, Some(4));
        assert_eq!(plan.documents[0].version, 7);
        assert_eq!(plan.documents[0].data, Some(json!({"b": 1})));
    }

    #[test]
    fn final_commands_and_repeated_copies_are_duplicates_and_change_nothing() {
        let first = command("create", "1", None, json!({"a": 1}));
        let commands = [
            command("create", "2", None, json!({"a": 1})),
            first.clone(),
            first,
        ];
        let done = Some(Snapshot {
            status: "succeeded".into(),
            row: None,
        });
        let plan = plan_built_in(&commands, vec![done, accepted(None), accepted(None)]).unwrap();
        assert_eq!(plan.decisions[0], Decision::Duplicate);
        assert!(matches!(
            plan.decisions[1],
            Decision::Applied { version: 1, .. }
        ));
        assert_eq!(plan.decisions[2], Decision::Duplicate);
        assert_eq!(plan.documents.len(), 1);
        assert_eq!(plan.documents[0].id, "1");
    }

    #[test]
    fn refusals_write_no_document() {
        let commands = [
            command("delete", "gone", None, json!({})),
            command("replace", "missing", None, json!({"a": 1})),
        ];
        let tombstone = accepted(Some((3, None)));
        let plan = plan_built_in(&commands, vec![tombstone, accepted(None)]).unwrap();
        assert_eq!(
            plan.decisions,
            [
                Decision::Failed {
                    reason: crate::handler::REASON_NOT_FOUND.into()
                },
                Decision::Failed {
                    reason: crate::handler::REASON_NOT_FOUND.into()
                },
            ]
        );
        assert!(plan.documents.is_empty());
    }

    #[test]
    fn what_the_batch_cannot_decide_goes_one_by_one() {
        let commands = [command("create", "1", None, json!({"a": 1}))];
        assert_eq!(
            plan_built_in(&commands, vec![None]),
            Err(Unbatchable::NoCommandRow)
        );
        let pending = plan(&commands, vec![accepted(None)], |_, _| None);
        assert_eq!(pending, Err(Unbatchable::Handler));
        let transient = plan(&commands, vec![accepted(None)], |_, _| {
            Some(Err(HandlerError::Transient("503".into())))
        });
        assert_eq!(transient, Err(Unbatchable::Handler));
        let scalar = plan(&commands, vec![accepted(None)], |_, _| {
            Some(Ok(Change::Upsert {
                event_type: "created".into(),
                data: json!(3),
            }))
        });
        assert_eq!(scalar, Err(Unbatchable::NotAnObject));
    }
}
