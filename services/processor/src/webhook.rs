//! Webhook handlers: business logic in any language, configured per command type with
//! `PROCESSOR_WEBHOOKS` (`{"approve-order": "http://orders.example:8080/approve"}`).
//!
//! # Protocol
//! The processor `POST`s a JSON body: the command envelope (`commandId`, `type`,
//! `collection`, `id`, `expectedVersion?`, `payload`, `clientId`, `acceptedAt`) plus
//! `document`, the addressed document's current state (`{"version": 3, "data": {…}}`, or
//! `null` when it does not exist). Headers: `content-type: application/json`, W3C
//! `traceparent`/`tracestate`, `command-id`, and `idempotency-key: <commandId>` (a command can
//! be delivered more than once if an earlier attempt timed out).
//!
//! The reply decides:
//! - `2xx` with `{"change": "upsert", "data": {…}, "type"?: "approved"}`: `data` becomes the
//!   document; the event type is `type`, default the command's type.
//! - `2xx` with `{"change": "patch", "patch": {…}, "type"?: …}`: a JSON Merge Patch.
//! - `2xx` with `{"change": "delete"}` or `{"change": "none"}`.
//! - `4xx` (except 408, 425, 429): the command is refused; it ends `failed` with the reply's
//!   `reason` (`{"reason": "insufficient_stock"}`; letters, digits, `_ . -`, at most 64), or
//!   `rejected`.
//! - `5xx`, 408, 425, 429, a timeout (`PROCESSOR_WEBHOOK_TIMEOUT_MS`) or a connection error:
//!   transient, retried with backoff, dead-lettered after `PROCESSOR_MAX_ATTEMPTS`.
//! - a `2xx` whose body is not one of the replies above, or whose change would make the
//!   document something other than a JSON object: dead-lettered at once (`handler_error`).

use std::time::{Duration, Instant};

use common::envelope::CommandEnvelope;
use common::kafka::HEADER_COMMAND_ID;
use common::outbox::{HEADER_TRACEPARENT, HEADER_TRACESTATE};
use futures::future::BoxFuture;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::handler::{Change, Document, Handler, HandlerError, Invocation};

/// The reason of a webhook refusal that names none.
pub const REASON_REJECTED: &str = "rejected";

/// Calls one URL for one command type.
#[derive(Debug, Clone)]
pub struct WebhookHandler {
    client: reqwest::Client,
    url: url::Url,
}

/// A webhook's decision (the `2xx` body).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "change", rename_all = "lowercase", deny_unknown_fields)]
pub enum Reply {
    /// Store `data` as the new state.
    Upsert {
        /// The full new state.
        data: Value,
        /// Event type (default: the command's type).
        #[serde(default, rename = "type")]
        event_type: Option<String>,
    },
    /// Merge `patch` into the current state.
    Patch {
        /// The merge patch.
        patch: Value,
        /// Event type (default: the command's type).
        #[serde(default, rename = "type")]
        event_type: Option<String>,
    },
    /// Delete the document.
    Delete,
    /// Change nothing.
    None,
}

#[derive(Serialize)]
struct Request<'a> {
    #[serde(flatten)]
    command: &'a CommandEnvelope,
    document: Option<DocumentBody<'a>>,
}

#[derive(Serialize)]
struct DocumentBody<'a> {
    version: i64,
    data: &'a Value,
}

#[derive(Deserialize)]
struct Refusal {
    #[serde(default)]
    reason: Option<String>,
}

impl WebhookHandler {
    /// A handler POSTing to `url` through `client` (which carries the timeout).
    pub fn new(client: reqwest::Client, url: url::Url) -> Self {
        Self { client, url }
    }

    async fn call(&self, call: Invocation<'_>) -> Result<Change, HandlerError> {
        let body = Request {
            command: call.command,
            document: call.current.map(|d: &Document| DocumentBody {
                version: d.version,
                data: &d.data,
            }),
        };
        let command_id = call.command.command_id.to_string();
        let mut request = self
            .client
            .post(self.url.clone())
            .json(&body)
            .header(HEADER_COMMAND_ID, &command_id)
            .header("idempotency-key", &command_id);
        if let Some(traceparent) = &call.trace.traceparent {
            request = request.header(HEADER_TRACEPARENT, traceparent);
        }
        if let Some(tracestate) = &call.trace.tracestate {
            request = request.header(HEADER_TRACESTATE, tracestate);
        }
        let started = Instant::now();
        let response = request.send().await.map_err(|error| {
            // reqwest's error text names the URL; webhook URLs carry no credentials by contract.
            HandlerError::Transient(format!("webhook request failed: {error}"))
        })?;
        let status = response.status();
        tracing::debug!(
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Webhook answered."
        );
        let bytes = response
            .bytes()
            .await
            .map_err(|error| HandlerError::Transient(format!("webhook reply was cut: {error}")))?;
        decide(status, &bytes, &call.command.command_type)
    }
}

/// Maps a webhook's status and body to a decision.
fn decide(status: StatusCode, body: &[u8], command_type: &str) -> Result<Change, HandlerError> {
    if status.is_success() {
        let reply: Reply = serde_json::from_slice(body).map_err(|error| {
            HandlerError::Broken(format!(
                "webhook replied {status} with an invalid body: {error}"
            ))
        })?;
        let event_type = |t: Option<String>| t.unwrap_or_else(|| command_type.to_owned());
        return Ok(match reply {
            Reply::Upsert {
                data,
                event_type: t,
            } => Change::Upsert {
                event_type: event_type(t),
                data,
            },
            Reply::Patch {
                patch,
                event_type: t,
            } => Change::Patch {
                event_type: event_type(t),
                patch,
            },
            Reply::Delete => Change::Delete,
            Reply::None => Change::None,
        });
    }
    let transient = status.is_server_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        );
    if transient || !status.is_client_error() {
        return Err(HandlerError::Transient(format!("webhook replied {status}")));
    }
    let reason = serde_json::from_slice::<Refusal>(body)
        .ok()
        .and_then(|r| r.reason)
        .filter(|r| {
            (1..=64).contains(&r.len())
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        })
        .unwrap_or_else(|| REASON_REJECTED.to_owned());
    Err(HandlerError::Rejected { reason })
}

impl Handler for WebhookHandler {
    fn handle<'a>(&'a self, call: Invocation<'a>) -> BoxFuture<'a, Result<Change, HandlerError>> {
        Box::pin(self.call(call))
    }
}

/// The HTTP client shared by every webhook handler.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn success_replies_become_changes_with_the_command_type_as_default_event_type() {
        let ok = StatusCode::OK;
        assert_eq!(
            decide(
                ok,
                &body(json!({"change": "upsert", "data": {"a": 1}})),
                "approve"
            ),
            Ok(Change::Upsert {
                event_type: "approve".into(),
                data: json!({"a": 1})
            })
        );
        assert_eq!(
            decide(
                ok,
                &body(json!({"change": "patch", "patch": {"a": 1}, "type": "approved"})),
                "approve"
            ),
            Ok(Change::Patch {
                event_type: "approved".into(),
                patch: json!({"a": 1})
            })
        );
        assert_eq!(
            decide(ok, &body(json!({"change": "delete"})), "x"),
            Ok(Change::Delete)
        );
        assert_eq!(
            decide(StatusCode::CREATED, &body(json!({"change": "none"})), "x"),
            Ok(Change::None)
        );
    }

    #[test]
    fn a_malformed_success_reply_is_broken_not_retried() {
        for reply in [&b"not json"[..], &body(json!({"change": "explode"}))] {
            assert!(matches!(
                decide(StatusCode::OK, reply, "x"),
                Err(HandlerError::Broken(_))
            ));
        }
    }

    #[test]
    fn client_errors_reject_with_the_given_reason_and_server_errors_are_transient() {
        assert_eq!(
            decide(
                StatusCode::UNPROCESSABLE_ENTITY,
                &body(json!({"reason": "insufficient_stock"})),
                "x"
            ),
            Err(HandlerError::rejected("insufficient_stock"))
        );
        assert_eq!(
            decide(StatusCode::BAD_REQUEST, b"", "x"),
            Err(HandlerError::rejected(REASON_REJECTED))
        );
        assert_eq!(
            decide(
                StatusCode::CONFLICT,
                &body(json!({"reason": "has spaces and is unsafe"})),
                "x"
            ),
            Err(HandlerError::rejected(REASON_REJECTED))
        );
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::REQUEST_TIMEOUT,
        ] {
            assert!(matches!(
                decide(status, b"", "x"),
                Err(HandlerError::Transient(_))
            ));
        }
    }
}
