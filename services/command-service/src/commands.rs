//! The command API: `POST /v1/commands` (idempotent intake) and `GET /v1/commands/{id}`.
//!
//! # Idempotency (IETF httpapi `Idempotency-Key` draft)
//! Keys are scoped per caller (the token's subject, see [`crate::caller`]), and so is a
//! command's status: only the caller who sent it can read it. One transaction does everything (shared with other requests by the group commit
//! in [`crate::intake`]): it takes a transaction-scoped advisory lock on (client, key) — the
//! in-progress marker: a concurrent request with the same key fails to get it and answers
//! 409 — then looks up a live record (same request fingerprint → replay the stored status,
//! `Location` and body byte for byte; different → 422), and otherwise inserts the command, its
//! outbox row and the idempotency record with the response, and commits. Nothing is written
//! on a 4xx. The lock vanishes with the transaction, so a crashed request
//! never leaves a key stuck "in progress". Records expire after `COMMANDS_IDEMPOTENCY_TTL_SECONDS`
//! (expired ones are ignored at once and deleted by [`cleanup_expired_keys`]).
//! The lock is on a 64-bit hash of (client, key); a hash collision can only cause a spurious
//! 409, never a wrong replay (replays compare the stored client, key and fingerprint).

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, extract::DefaultBodyLimit};
use chrono::{DateTime, SecondsFormat, Utc};
use common::access::Action;
use common::envelope::CommandEnvelope;
use common::metrics::{
    COMMANDS_ACCEPTED_TOTAL, COMMANDS_REJECTED_TOTAL, IDEMPOTENCY_KEYS_EXPIRED_TOTAL,
    IDEMPOTENCY_REPLAYS_TOTAL,
};
use common::outbox::TraceContext;
use common::shutdown::CancellationToken;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::caller::Caller;
use crate::error::{ApiError, Json, Path};
use crate::intake::{Outcome, Submission};
use crate::{AppState, NAME};

/// The idempotency header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The built-in command types.
pub const BUILT_IN_TYPES: [&str; 4] = ["create", "replace", "patch", "delete"];

/// `/v1/commands` routes, with the body limit.
pub fn router(state: &AppState) -> Router {
    Router::new()
        .route("/v1/commands", post(submit))
        .route("/v1/commands/{id}", get(status))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.settings.max_body_bytes,
            refuse_declared_oversize,
        ))
        .with_state(state.clone())
}

/// A body declared larger than the limit is refused before it is read, and its rest read in
/// the background ([`common::http::linger`]), so the client gets the 413 rather than a
/// reset. (A chunked body over the limit is refused by `DefaultBodyLimit` once it passes it;
/// the gateway always forwards a length.)
async fn refuse_declared_oversize(
    axum::extract::State(limit): axum::extract::State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if common::http::declared_length(request.headers()).is_some_and(|l| l > limit as u64) {
        common::http::linger(request.into_body());
        return ApiError::PayloadTooLarge.into_response();
    }
    next.run(request).await
}

/// A command as submitted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandRequest {
    /// `create`, `replace`, `patch`, `delete` or a configured custom type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The document's collection.
    pub collection: String,
    /// The document's id.
    pub id: String,
    /// Optimistic concurrency: the version the document must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<i64>,
    /// The document (`create`, `replace`), merge patch (`patch`), nothing (`delete`) or any
    /// JSON (custom types).
    #[serde(default)]
    pub payload: Option<Value>,
}

/// A command's state, as returned by both routes (and read back as one row).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct CommandStatus {
    command_id: Uuid,
    #[serde(rename = "type")]
    kind: String,
    collection: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_version: Option<i64>,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_reason: Option<String>,
    #[serde(serialize_with = "serialize_rfc3339")]
    accepted_at: DateTime<Utc>,
    #[serde(serialize_with = "serialize_rfc3339")]
    updated_at: DateTime<Utc>,
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn serialize_rfc3339<S: serde::Serializer>(
    at: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*at))
}

/// The `Idempotency-Key` (an RFC 8941 string; surrounding quotes are optional).
fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let raw = headers
        .get(IDEMPOTENCY_KEY)
        .ok_or(ApiError::IdempotencyKeyMissing)?;
    parse_idempotency_key(raw.as_bytes())
}

/// An `Idempotency-Key` field value: an RFC 9651 sf-string (`"abc-1"`, escapes included),
/// parsed with `sfv`, or leniently the same characters unquoted (`abc-1`). The key is 1 to 255
/// visible ASCII characters.
pub fn parse_idempotency_key(value: &[u8]) -> Result<String, ApiError> {
    let invalid = |why: &str| ApiError::InvalidHeader(format!("Idempotency-Key {why}"));
    let text = std::str::from_utf8(value)
        .map_err(|_| invalid("must be ASCII"))?
        .trim();
    let key = if text.starts_with('"') {
        let item = sfv::Parser::new(text)
            .parse_item::<sfv::Item>()
            .map_err(|e| invalid(&format!("is not a structured-field string: {e}")))?;
        item.bare_item
            .as_string()
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| invalid("must be a string"))?
    } else {
        text.to_owned()
    };
    if key.is_empty() || key.len() > 255 || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid("must be 1 to 255 visible ASCII characters"));
    }
    Ok(key)
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '~'))
}

/// Checks a request against the command rules (`custom` are the configured custom types).
pub fn validate(request: &CommandRequest, custom: &[String]) -> Result<(), ApiError> {
    let fail = |m: String| Err(ApiError::Validation(m));
    let built_in = BUILT_IN_TYPES.contains(&request.kind.as_str());
    if !built_in && !custom.contains(&request.kind) {
        return fail(format!("unknown command type {:?}", request.kind));
    }
    if !valid_name(&request.collection) {
        return fail("collection must be 1 to 128 characters of [A-Za-z0-9_.~-]".into());
    }
    if !valid_name(&request.id) {
        return fail("id must be 1 to 128 characters of [A-Za-z0-9_.~-]".into());
    }
    if request.expected_version.is_some_and(|v| v < 0) {
        return fail("expectedVersion must not be negative".into());
    }
    match (request.kind.as_str(), &request.payload) {
        ("create" | "replace" | "patch", Some(Value::Object(_))) => Ok(()),
        ("create" | "replace" | "patch", _) => fail(format!(
            "a {} command needs an object payload",
            request.kind
        )),
        ("delete", None) => Ok(()),
        ("delete", Some(_)) => fail("a delete command takes no payload".into()),
        _ => Ok(()),
    }
}

/// JSON with object keys sorted at every level, so equal requests hash equally.
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// SHA-256 of the canonical request: what "the same payload" means for a repeated key.
pub fn fingerprint(request: &CommandRequest) -> Vec<u8> {
    let value = serde_json::to_value(request).unwrap_or_default();
    let bytes = serde_json::to_vec(&canonical(&value)).unwrap_or_default();
    Sha256::digest(bytes).to_vec()
}

#[tracing::instrument(skip_all, fields(client_id = %caller.subject, command_id))]
async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<CommandRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let result = accept(&state, &caller, &headers, body).await;
    if let Err(error) = &result {
        let problem = error.problem();
        if problem.status.is_client_error() {
            metrics::counter!(COMMANDS_REJECTED_TOTAL, "service" => NAME, "reason" => problem.kind.slug())
                .increment(1);
        }
    }
    result
}

fn respond(status: u16, location: Option<&str>, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// Validates the request, prepares everything the write needs (and the exact `202` body), and
/// hands it to the group commit ([`crate::intake`]).
async fn accept(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Json<CommandRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    let Json(request) = body?;
    validate(&request, &state.settings.custom_types)?;
    caller.authorize(Action::Write, &request.collection, &request.id)?;
    let client = caller.subject.as_str();
    let fingerprint = fingerprint(&request);

    let command_id = Uuid::now_v7();
    tracing::Span::current().record("command_id", tracing::field::display(command_id));
    let now = Utc::now();
    let accepted_at = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    // The shared wire type, so the processor reads exactly what is written here.
    let envelope = serde_json::to_value(CommandEnvelope {
        command_id,
        command_type: request.kind.clone(),
        collection: request.collection.clone(),
        id: request.id.clone(),
        expected_version: request.expected_version,
        payload: request.payload.clone(),
        client_id: client.to_owned(),
        accepted_at,
    })
    .map_err(|e| ApiError::Database(sqlx::Error::Encode(Box::new(e))))?;
    let status = CommandStatus {
        command_id,
        kind: request.kind.clone(),
        collection: request.collection.clone(),
        id: request.id.clone(),
        expected_version: request.expected_version,
        status: "accepted".into(),
        result_version: None,
        failure_reason: None,
        accepted_at,
        updated_at: accepted_at,
    };
    let body = serde_json::to_vec(&status).unwrap_or_default();
    let location = format!("/v1/commands/{command_id}");
    let kind = request.kind.clone();
    let submission = Submission {
        client: client.to_owned(),
        key,
        fingerprint,
        command_id,
        kind: request.kind,
        collection: request.collection,
        document_id: request.id,
        expected_version: request.expected_version,
        payload: request.payload,
        accepted_at,
        envelope,
        body: body.clone(),
        location: location.clone(),
        trace: TraceContext::current_or_from_http(headers),
    };
    match state.intake.submit(submission).await? {
        Outcome::Accepted => {
            metrics::counter!(COMMANDS_ACCEPTED_TOTAL, "service" => NAME, "type" => kind)
                .increment(1);
            Ok(respond(202, Some(&location), body))
        }
        Outcome::Replay {
            status,
            location,
            body,
        } => {
            metrics::counter!(IDEMPOTENCY_REPLAYS_TOTAL, "service" => NAME).increment(1);
            Ok(respond(status, location.as_deref(), body))
        }
    }
}

#[tracing::instrument(skip_all, fields(client_id = %caller.subject, command_id = %id))]
async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let status: Option<CommandStatus> = sqlx::query_as(
        "SELECT id AS command_id, type AS kind, collection, document_id AS id, expected_version, \
         status, result_version, failure_reason, accepted_at, updated_at \
         FROM commands WHERE id = $1 AND client_id = $2",
    )
    .bind(id)
    .bind(&caller.subject)
    .fetch_optional(state.db.pool())
    .await?;
    Ok(axum::Json(status.ok_or(ApiError::NotFound)?).into_response())
}

/// Deletes expired idempotency records every `interval` until `shutdown` fires.
pub async fn cleanup_expired_keys(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= now()")
            .execute(&pool)
            .await
        {
            Ok(done) => metrics::counter!(IDEMPOTENCY_KEYS_EXPIRED_TOTAL, "service" => NAME)
                .increment(done.rows_affected()),
            Err(error) => tracing::warn!(%error, "Failed to delete expired idempotency keys."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: &str, payload: Option<Value>) -> CommandRequest {
        CommandRequest {
            kind: kind.into(),
            collection: "books".into(),
            id: "b-1".into(),
            expected_version: None,
            payload,
        }
    }

    #[test]
    fn built_in_types_need_the_right_payload_shape() {
        let doc = Some(serde_json::json!({"title": "Dune"}));
        for kind in ["create", "replace", "patch"] {
            assert!(validate(&request(kind, doc.clone()), &[]).is_ok());
            assert!(validate(&request(kind, None), &[]).is_err());
            assert!(validate(&request(kind, Some(Value::from(3))), &[]).is_err());
        }
        assert!(validate(&request("delete", None), &[]).is_ok());
        assert!(validate(&request("delete", doc), &[]).is_err());
    }

    #[test]
    fn unknown_types_are_refused_unless_configured() {
        assert!(validate(&request("approve", None), &[]).is_err());
        assert!(validate(&request("approve", None), &["approve".into()]).is_ok());
    }

    #[test]
    fn names_with_slashes_or_colons_are_refused() {
        let mut r = request("delete", None);
        r.id = "a/b".into();
        assert!(validate(&r, &[]).is_err());
        r.id = "a:b".into();
        assert!(validate(&r, &[]).is_err());
    }

    #[test]
    fn the_fingerprint_ignores_key_order_but_not_values() {
        let a = request(
            "create",
            Some(serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}})),
        );
        let b = request(
            "create",
            Some(serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap()),
        );
        let c = request(
            "create",
            Some(serde_json::json!({"a": 2, "b": {"c": 2, "d": 3}})),
        );
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn quoted_and_bare_idempotency_keys_are_the_same_key() {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("\"abc-1\""));
        assert_eq!(idempotency_key(&headers).unwrap(), "abc-1");
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("abc-1"));
        assert_eq!(idempotency_key(&headers).unwrap(), "abc-1");
        // A structured-field string's escapes are undone; a broken one is refused.
        assert_eq!(parse_idempotency_key(br#""a\"b""#).unwrap(), r#"a"b"#);
        assert_eq!(parse_idempotency_key(br#""k";v=1"#).unwrap(), "k");
        for bad in [
            &br#""unterminated"#[..],
            br#""a" "b""#,
            b"",
            b"two words",
            br#""""#,
        ] {
            assert!(
                matches!(parse_idempotency_key(bad), Err(ApiError::InvalidHeader(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        headers.remove(IDEMPOTENCY_KEY);
        assert!(matches!(
            idempotency_key(&headers),
            Err(ApiError::IdempotencyKeyMissing)
        ));
    }
}
