//! Command handlers: the [`Handler`] trait, the four built-in handlers (`create`, `replace`,
//! `patch` with JSON Merge Patch, `delete`) and the [`Handlers`] registry that maps a command
//! type to its handler (built-in, a Rust handler registered by the embedding program, or a
//! webhook from `PROCESSOR_WEBHOOKS`).
//!
//! A handler *decides*; it never writes. It gets the command and the document's current
//! state and returns the [`Change`] to make; the processor then applies it in one
//! transaction with the command's status and the event's outbox row, guarded by the
//! document's version (see [`crate::apply`]).

use std::collections::HashMap;
use std::sync::Arc;

use common::envelope::CommandEnvelope;
use common::outbox::TraceContext;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde_json::Value;

/// The failure reason of a command whose `expectedVersion` did not match.
pub const REASON_VERSION_CONFLICT: &str = "version_conflict";
/// The failure reason of a `create` on a document that exists.
pub const REASON_ALREADY_EXISTS: &str = "already_exists";
/// The failure reason of a `replace`, `patch` or `delete` on a document that does not exist.
pub const REASON_NOT_FOUND: &str = "not_found";
/// The failure reason of a built-in command whose payload has the wrong shape (the command
/// service refuses those; this guards messages produced to Kafka by other means).
pub const REASON_INVALID_PAYLOAD: &str = "invalid_payload";

/// A live (not deleted) document as the handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Its current version (≥ 1).
    pub version: i64,
    /// Its current content.
    pub data: Value,
}

/// What a handler gets.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    /// The command.
    pub command: &'a CommandEnvelope,
    /// The document the command addresses, when it exists.
    pub current: Option<&'a Document>,
    /// The trace context to forward to remote handlers.
    pub trace: &'a TraceContext,
}

/// The document change a handler decided on.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Store `data` as the document's full new state; emits an event of `event_type`.
    Upsert {
        /// The event type (`created`, `replaced`, or a custom type).
        event_type: String,
        /// The new full state.
        data: Value,
    },
    /// Apply a JSON Merge Patch (RFC 7396) to the current state (`{}` when there is none);
    /// emits an event of `event_type` carrying the full patched state.
    Patch {
        /// The event type (`patched`, or a custom type).
        event_type: String,
        /// The merge patch.
        patch: Value,
    },
    /// Delete the document (a no-op when it does not exist); emits a `deleted` event.
    Delete,
    /// Change nothing: the command succeeds without an event.
    None,
}

/// Why a handler did not produce a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The command is refused for good: it ends `failed` with this machine-readable reason.
    #[error("command rejected: {reason}")]
    Rejected {
        /// `version_conflict`, `not_found`, or a handler's own reason.
        reason: String,
    },
    /// The handler could not decide now (a webhook timed out, answered 5xx, …): retried with
    /// backoff, dead-lettered after `PROCESSOR_MAX_ATTEMPTS`.
    #[error("handler failed transiently: {0}")]
    Transient(String),
    /// The handler answered something unusable (a malformed webhook reply): the command is
    /// dead-lettered at once, since retrying cannot help and an operator must look at it.
    #[error("handler failed: {0}")]
    Broken(String),
}

impl HandlerError {
    /// A rejection with `reason`.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected {
            reason: reason.into(),
        }
    }
}

/// Business logic for one command type.
///
/// Implementations must be deterministic in what they return for a given command and
/// document state only as far as they want redeliveries to be harmless: the processor calls
/// a handler again for a redelivered command only if its first effect was never committed.
pub trait Handler: Send + Sync + 'static {
    /// Decides the change for `call.command` given the document's current state.
    fn handle<'a>(&'a self, call: Invocation<'a>) -> BoxFuture<'a, Result<Change, HandlerError>>;
}

/// `create`: the document must not exist; its payload becomes the document.
#[derive(Debug, Clone, Copy, Default)]
pub struct Create;

/// `replace`: the document must exist; its payload becomes the document.
#[derive(Debug, Clone, Copy, Default)]
pub struct Replace;

/// `patch`: the document must exist; its payload is merged in (RFC 7396).
#[derive(Debug, Clone, Copy, Default)]
pub struct Patch;

/// `delete`: the document must exist; it is removed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delete;

fn object_payload(command: &CommandEnvelope) -> Result<Value, HandlerError> {
    match &command.payload {
        Some(value @ Value::Object(_)) => Ok(value.clone()),
        _ => Err(HandlerError::rejected(REASON_INVALID_PAYLOAD)),
    }
}

impl Create {
    fn decide(call: Invocation<'_>) -> Result<Change, HandlerError> {
        if call.current.is_some() {
            return Err(HandlerError::rejected(REASON_ALREADY_EXISTS));
        }
        Ok(Change::Upsert {
            event_type: "created".into(),
            data: object_payload(call.command)?,
        })
    }
}

impl Replace {
    fn decide(call: Invocation<'_>) -> Result<Change, HandlerError> {
        if call.current.is_none() {
            return Err(HandlerError::rejected(REASON_NOT_FOUND));
        }
        Ok(Change::Upsert {
            event_type: "replaced".into(),
            data: object_payload(call.command)?,
        })
    }
}

impl Patch {
    fn decide(call: Invocation<'_>) -> Result<Change, HandlerError> {
        if call.current.is_none() {
            return Err(HandlerError::rejected(REASON_NOT_FOUND));
        }
        Ok(Change::Patch {
            event_type: "patched".into(),
            patch: object_payload(call.command)?,
        })
    }
}

impl Delete {
    fn decide(call: Invocation<'_>) -> Result<Change, HandlerError> {
        if call.current.is_none() {
            return Err(HandlerError::rejected(REASON_NOT_FOUND));
        }
        Ok(Change::Delete)
    }
}

macro_rules! pure_handler {
    ($($ty:ty),*) => {$(
        impl Handler for $ty {
            fn handle<'a>(
                &'a self,
                call: Invocation<'a>,
            ) -> BoxFuture<'a, Result<Change, HandlerError>> {
                Box::pin(std::future::ready(Self::decide(call)))
            }
        }
    )*};
}
pure_handler!(Create, Replace, Patch, Delete);

/// A registered handler and whether it is one of the built-in, in-process ones (those run
/// in microseconds, so the processor does not announce `processing` before calling them).
#[derive(Clone)]
pub struct Registered {
    /// The handler.
    pub handler: Arc<dyn Handler>,
    /// Whether it is `create`, `replace`, `patch` or `delete`.
    pub built_in: bool,
}

/// Command type → handler.
#[derive(Clone)]
pub struct Handlers(HashMap<String, Registered>);

impl Default for Handlers {
    fn default() -> Self {
        Self::built_in()
    }
}

impl Handlers {
    /// The four built-in handlers.
    pub fn built_in() -> Self {
        let mut map: HashMap<String, Registered> = HashMap::new();
        let built_ins: [(&str, Arc<dyn Handler>); 4] = [
            ("create", Arc::new(Create)),
            ("replace", Arc::new(Replace)),
            ("patch", Arc::new(Patch)),
            ("delete", Arc::new(Delete)),
        ];
        for (name, handler) in built_ins {
            map.insert(
                name.to_owned(),
                Registered {
                    handler,
                    built_in: true,
                },
            );
        }
        Self(map)
    }

    /// Registers (or replaces) the handler of `command_type`.
    #[must_use]
    pub fn with(mut self, command_type: impl Into<String>, handler: impl Handler) -> Self {
        self.0.insert(
            command_type.into(),
            Registered {
                handler: Arc::new(handler),
                built_in: false,
            },
        );
        self
    }

    /// The handler of `command_type`, if one is registered.
    pub fn get(&self, command_type: &str) -> Option<&Registered> {
        self.0.get(command_type)
    }

    /// Runs `call.command`'s handler and returns its decision if it is ready at once (the
    /// built-ins always are); `None` when no handler is registered or it would have to wait.
    pub fn decide_now(&self, call: Invocation<'_>) -> Option<Result<Change, HandlerError>> {
        self.get(&call.command.command_type)?
            .handler
            .handle(call)
            .now_or_never()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use uuid::Uuid;

    fn command(kind: &str, payload: Option<Value>) -> CommandEnvelope {
        CommandEnvelope {
            command_id: Uuid::now_v7(),
            command_type: kind.into(),
            collection: "books".into(),
            id: "b1".into(),
            expected_version: None,
            payload,
            client_id: "c".into(),
            accepted_at: Utc::now(),
        }
    }

    async fn decide(
        kind: &str,
        payload: Option<Value>,
        current: Option<&Document>,
    ) -> Result<Change, HandlerError> {
        let handlers = Handlers::built_in();
        let command = command(kind, payload);
        let trace = TraceContext::default();
        let registered = handlers.get(kind).unwrap();
        registered
            .handler
            .handle(Invocation {
                command: &command,
                current,
                trace: &trace,
            })
            .await
    }

    #[tokio::test]
    async fn create_refuses_an_existing_document_and_the_others_a_missing_one() {
        let doc = Document {
            version: 3,
            data: serde_json::json!({"a": 1}),
        };
        let payload = Some(serde_json::json!({"a": 2}));
        assert_eq!(
            decide("create", payload.clone(), Some(&doc)).await,
            Err(HandlerError::rejected(REASON_ALREADY_EXISTS))
        );
        for kind in ["replace", "patch"] {
            assert_eq!(
                decide(kind, payload.clone(), None).await,
                Err(HandlerError::rejected(REASON_NOT_FOUND))
            );
        }
        assert_eq!(
            decide("delete", None, None).await,
            Err(HandlerError::rejected(REASON_NOT_FOUND))
        );
    }

    #[tokio::test]
    async fn built_ins_name_their_events_and_carry_the_payload() {
        let doc = Document {
            version: 1,
            data: serde_json::json!({"a": 1}),
        };
        let payload = serde_json::json!({"a": null, "b": 2});
        assert_eq!(
            decide("create", Some(payload.clone()), None).await,
            Ok(Change::Upsert {
                event_type: "created".into(),
                data: payload.clone()
            })
        );
        assert_eq!(
            decide("patch", Some(payload.clone()), Some(&doc)).await,
            Ok(Change::Patch {
                event_type: "patched".into(),
                patch: payload
            })
        );
        assert_eq!(decide("delete", None, Some(&doc)).await, Ok(Change::Delete));
    }

    #[tokio::test]
    async fn a_payload_that_is_not_an_object_is_rejected() {
        assert_eq!(
            decide("create", Some(Value::from(3)), None).await,
            Err(HandlerError::rejected(REASON_INVALID_PAYLOAD))
        );
        assert_eq!(
            decide("create", None, None).await,
            Err(HandlerError::rejected(REASON_INVALID_PAYLOAD))
        );
    }

    #[test]
    fn registered_handlers_are_not_built_in_and_can_override() {
        let handlers = Handlers::built_in().with("approve", Create);
        assert!(handlers.get("create").unwrap().built_in);
        assert!(!handlers.get("approve").unwrap().built_in);
        assert!(handlers.get("unknown").is_none());
    }
}
